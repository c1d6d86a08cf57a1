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
        BatchEncoder(data, workers=3)
        assert torch.get_num_threads() == 4  # 12 usable CPUs shared by 3 encoders
        BatchEncoder(data, workers=40)
        assert torch.get_num_threads() == 1  # more encoders than CPUs: one thread each, never 0
        BatchEncoder(data, workers=3, threads=5)
        assert torch.get_num_threads() == 5  # --threads-per-worker wins
        monkeypatch.delattr(os, "sched_getaffinity")  # where there is no affinity (macOS): os.cpu_count()
        BatchEncoder(data, workers=4)
        assert torch.get_num_threads() == 16
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def ray_local():
    from vqtok.jobs._ray import init_ray

    ray = init_ray(None)
    yield ray
    ray.shutdown()


def test_more_workers_than_the_cluster_can_place_are_refused_up_front(ray_local):
    """Ray Data waits forever for actors it cannot place: the check refuses in seconds instead,
    naming what one worker needs, what the cluster has and the --workers that would fit."""
    from vqtok import ConfigError
    from vqtok.jobs._ray import check_resources

    cpus = ray_local.cluster_resources()["CPU"]
    fits = int((cpus - 1) / 0.5)  # tokenize: 0.5 CPU per CPU encoder, plus 1 for the decoding tasks
    check_resources(ray_local, workers=fits, gpus_per_worker=0, cpus_per_worker=0.5, decode_cpus=1)
    with pytest.raises(ConfigError, match=rf"--workers {fits + 1} needs {(fits + 1) * 0.5 + 1:g} CPUs "
                                          rf"\(0.5 per worker, plus 1 for decoding\) but the Ray cluster has "
                                          rf"{cpus:g}: pass --workers {fits} .*or a smaller --cpus-per-worker"):
        check_resources(ray_local, workers=fits + 1, gpus_per_worker=0, cpus_per_worker=0.5, decode_cpus=1)
    with pytest.raises(ConfigError, match=r"not even one worker.*--cpus-per-worker"):
        check_resources(ray_local, workers=1, gpus_per_worker=0, cpus_per_worker=cpus, decode_cpus=1)
    with pytest.raises(ConfigError, match="needs 1 GPUs but the Ray cluster has 0"):
        check_resources(ray_local, workers=1, gpus_per_worker=1, cpus_per_worker=1.0, decode_cpus=1)
    # as the trainers call it (Ray Train's CPUs are not checked): unchanged
    check_resources(ray_local, workers=1, gpus_per_worker=0)


def test_an_empty_RAY_ADDRESS_starts_an_embedded_ray(monkeypatch):
    """RAY_ADDRESS="" (exported but empty) means unset: a fresh embedded Ray, not whatever cluster
    `ray start` left on the machine (which Ray itself would join for an empty RAY_ADDRESS)."""
    import ray

    from vqtok.jobs import _ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: calls.append((address, dict(os.environ), kw)))
    monkeypatch.setattr(_ray, "_spend_actor_args_notice", lambda ray: None)
    for empty in (None, ""):
        monkeypatch.setenv("RAY_ADDRESS", "")
        _ray.init_ray(empty)
        address, env, kw = calls[-1]
        assert address == "local" and "num_cpus" in kw  # the embedded Ray
        assert "RAY_ADDRESS" not in env  # ray.init (and the Ray it starts) never sees the empty value
        assert os.environ["RAY_ADDRESS"] == ""  # the user's environment is put back
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a real RAY_ADDRESS is still joined
    _ray.init_ray(None)
    assert calls[-1][0] is None and calls[-1][1]["RAY_ADDRESS"] == "127.0.0.1:6379" and "num_cpus" not in calls[-1][2]
