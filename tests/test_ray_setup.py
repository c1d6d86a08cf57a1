"""Setting up a job's Ray side: the encoders' thread count (sized on their own node), the resource
check that refuses what a cluster cannot place, and which Ray `init_ray` starts or joins."""
import os

import pytest
import torch

from vqtok.models.bundle import read_bundle
from vqtok.pipeline.stages import BatchEncoder


def test_cpu_encoders_size_their_threads_from_the_node_they_run_on(monkeypatch, bundle):
    data = read_bundle(str(bundle))
    saved = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "cpu_count", lambda: 64)  # not what an encoder may use: its affinity is
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
        BatchEncoder(data, batch_size=8, workers=3)
        assert torch.get_num_threads() == 4  # 12 usable CPUs shared by 3 encoders
        BatchEncoder(data, batch_size=8, workers=40)
        assert torch.get_num_threads() == 1  # more encoders than CPUs: one thread each, never 0
        BatchEncoder(data, batch_size=8, workers=3, threads=5)
        assert torch.get_num_threads() == 5  # --threads-per-worker wins
        monkeypatch.delattr(os, "sched_getaffinity")  # where there is no affinity (macOS): os.cpu_count()
        BatchEncoder(data, batch_size=8, workers=4)
        assert torch.get_num_threads() == 16
    finally:
        torch.set_num_threads(saved)
