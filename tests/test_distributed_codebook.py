"""The quantizer's distributed behaviour, with two real processes (gloo on 127.0.0.1, no Ray):
every rank sees different data, yet codebook statistics are all-reduced and the random draws
(k-means seeding, dead-code restarts) come from rank 0, so the replicas stay bitwise identical."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqtok.models.distributed import Collectives
from vqtok.models.vqvae import VectorQuantizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different data and different local randomness on each rank
    vq = VectorQuantizer(codebook_size=32, dim=8, codebook_dim=4, l2_normalize=True, restart_window=5,
                         comm=Collectives.current())  # the trainer passes its collectives in
    torch.manual_seed(0)
    vq.proj_in.reset_parameters()  # identical weights, as DDP would make them
    torch.manual_seed(100 + rank)
    vq.train()
    for step in range(23):  # k-means init, EMA updates, four restart checks
        z = torch.randn(4, 8, 6, 6) * (1 + rank) + rank
        vq(z)
    torch.save({k: v.clone() for k, v in vq.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_codebooks_stay_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in ("codebook", "ema_count", "ema_sum", "usage_ring"):
        assert torch.equal(a[name], b[name]), name
    assert bool(a["initialized"]) and int(a["steps"]) == 23
    # the statistics really are global: counts over the window sum both ranks' vectors
    assert float(a["usage_ring"].sum()) == 5 * 2 * 4 * 6 * 6
