"""Connecting to Ray, shared by the jobs: the embedded local Ray by default, a cluster with
--address (or RAY_ADDRESS, which `ray job submit` sets), and resource checks that fail before any
work starts."""
from __future__ import annotations

import logging
import os
import socket

from ..pipeline.errors import ConfigError


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """Fail fast (seconds, not Ray's minutes of retries) when --address names nothing reachable."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected HOST:PORT (e.g. 127.0.0.1:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"--address {address}: nothing answers there ({e.strerror or e}). Start a cluster with "
            f"`ray start --head --port {port}`, check the host and port, or leave --address out to run on an "
            f"embedded local Ray"
        ) from None


def init_ray(address: str | None):
    """Start or join Ray once per process; returns the ray module."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray Train tees every print in a worker to its logger as well, so each progress line would
    # appear twice; vqtok's workers print their own progress
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address is None and "RAY_ADDRESS" not in os.environ:
        # embedded: always a fresh local Ray owned by this process, even when `ray start` left a
        # cluster running on this machine (join that one with --address auto). The dashboard
        # (loopback only) serves the State API that Ray Train's placement-group cleaner polls;
        # without it that actor logs a warning every few seconds.
        address = "local"
        kwargs |= dict(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=os.cpu_count())
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = os.environ.get("RAY_ADDRESS") if address in (None, "local") else address
        raise ConfigError(
            f"--address {where}: cannot connect to a Ray cluster there ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Start one with `ray start --head`, pass its address (e.g. 127.0.0.1:6379), or leave --address out "
            f"to run on an embedded local Ray"
        ) from None
    _quiet_ray_data()
    return ray


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # vqtok prints its own progress
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_resources(ray, *, workers: int, gpus_per_worker: float) -> None:
    total = ray.cluster_resources()
    if gpus_per_worker > 0:
        have = total.get("GPU", 0)
        need = workers * gpus_per_worker
        if need > have:
            raise ConfigError(
                f"--workers {workers} x --gpus-per-worker {gpus_per_worker} needs {need:g} GPUs but the Ray cluster "
                f"has {have:g}: lower --workers, or pass --gpus-per-worker 0 to run on CPU"
            )
