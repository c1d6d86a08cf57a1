"""The end-of-training replica check ("a mismatch fails the run"), with two real processes (gloo on
127.0.0.1, no Ray): equal replica state passes, and a replica that differs on one rank fails the
run on every rank with a message that says so."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqtok.jobs.trainer import replicas_in_sync
from vqtok.models.distributed import Collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, perturb: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    codebook, counts = torch.randn(16, 4), torch.rand(16)  # the same on both ranks
    if perturb and rank == 1:
        codebook[3, 2] = torch.nextafter(codebook[3, 2], torch.tensor(float("inf")))  # one ulp on one rank
    try:
        result = {"in_sync": replicas_in_sync([codebook, counts], Collectives.current())}
    except RuntimeError as e:
        result = {"error": str(e)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_replicas_that_differ_fail_the_run_on_every_rank(tmp_path, perturb):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), perturb), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if not perturb:
        assert results == [{"in_sync": True}] * 2
        return
    for r in results:
        assert "model replicas diverged across ranks" in r.get("error", ""), results


def test_one_process_or_no_replica_state_is_not_checked():
    assert replicas_in_sync([torch.ones(3)], Collectives()) is None
    assert replicas_in_sync([], Collectives(rank=0, world_size=2)) is None
