"""Connecting to Ray, shared by the jobs: the embedded local Ray by default, a cluster with
--address (or RAY_ADDRESS, which `ray job submit` sets), and resource checks that fail before any
work starts. Also keeps Ray's harmless start-up notices out of the user's terminal (_quiet_ray_noise)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import tempfile
import time

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
    # appear twice; vqtok's workers print their own progress. Workers of the embedded Ray inherit
    # this (a cluster's workers have their own environment).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    address = address or None
    # An exported but empty RAY_ADDRESS means unset. Ray itself would read it as "auto" and join
    # whatever cluster `ray start` left on this machine, so it is hidden from ray.init (and the Ray
    # processes it starts) and put back after.
    empty_env = os.environ.get("RAY_ADDRESS") == ""
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    if embedded:
        # embedded: always a fresh local Ray owned by this process, even when `ray start` left a
        # cluster running on this machine (join that one with --address auto). The dashboard
        # (loopback only) serves the State API that Ray Train's placement-group cleaner polls;
        # without it that actor logs a warning every few seconds.
        address = "local"
        kwargs |= dict(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=os.cpu_count())
    _quiet_ray_noise()
    try:
        if empty_env:
            del os.environ["RAY_ADDRESS"]
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = os.environ.get("RAY_ADDRESS") if address in (None, "local") else address
        raise ConfigError(
            f"--address {where}: cannot connect to a Ray cluster there ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Start one with `ray start --head`, pass its address (e.g. 127.0.0.1:6379), or leave --address out "
            f"to run on an embedded local Ray"
        ) from None
    finally:
        if empty_env:
            os.environ["RAY_ADDRESS"] = ""
    _quiet_ray_data()
    if embedded:
        _spend_actor_args_notice(ray)
    return ray


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # vqtok prints its own progress
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# Ray's harmless noise, each message silenced where it is made and nothing else with it (as of Ray 2.60):
# - ray.init of a new local Ray (and joining one with address auto, when a token exists) logs at
#   WARNING that token authentication is on: Ray's secure default, which vqtok keeps. Setting
#   RAY_AUTH_MODE=token would say the same without the notice, but only when set before `import
#   ray` (RayConfig reads it once; set later, the driver and the GCS disagree and start-up fails).
#   The opposite warning, that authentication is *off*, still shows.
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
# - Ray Data warns, once per process, that progress bars are off: vqtok turns them off itself.
_PROGRESS_LOGGER = "ray.data._internal.progress"
_PROGRESS_NOTICE = "Progress bars disabled"
# - Ray's C++ core worker logs at ERROR level, once per process, that an actor with an
#   object-store argument and max_restarts > 0 may not restart if that object is lost
#   (ray-project/ray#53727). Ray Data's actor pools always start so (their map function travels
#   as an ObjectRef, restarts unlimited), and so does Ray Train's controller with its helper
#   actors; the owners hold those objects for the whole run. The driver prints its own copy
#   straight to file descriptor 2 (spdlog: no Python logger, and no knob but
#   RAY_BACKEND_LOG_LEVEL, which would hide every C++ error); a worker's copy reaches the terminal
#   through Ray's log forwarding, where RAY_DEDUP_LOGS_SKIP_REGEX drops the lines that match.
#   Both copies stay in Ray's log files.
_ACTOR_ARGS_NOTICE = r"core_worker\.cc:\d+: Actor .*has constructor arguments in the object store and max_restarts > 0"


class _DropNotice(logging.Filter):
    """Drops one logger's records whose message starts with `prefix`; all others pass."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _drop_notice(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(getattr(f, "prefix", None) == prefix for f in logger.filters):
        logger.addFilter(_DropNotice(prefix))


def _quiet_ray_noise() -> None:
    _drop_notice(_TOKEN_AUTH_LOGGER, _TOKEN_AUTH_NOTICE)
    _drop_notice(_PROGRESS_LOGGER, _PROGRESS_NOTICE)
    # Worker lines forwarded to this driver: what RAY_DEDUP_LOGS_SKIP_REGEX sets, added to the
    # deduplicators Ray made from it at import (a user's own skip pattern is kept). Private to Ray:
    # if it moves, the notice shows again and nothing else changes.
    try:
        from ray._private import ray_logging
    except ImportError:
        return
    for dedup in (getattr(ray_logging, "stdout_deduplicator", None), getattr(ray_logging, "stderr_deduplicator", None)):
        if dedup is None or not hasattr(dedup, "skip_re"):
            continue
        current = dedup.skip_re.pattern if dedup.skip_re is not None else None
        if current is None:
            dedup.skip_re = re.compile(_ACTOR_ARGS_NOTICE)
        elif _ACTOR_ARGS_NOTICE not in current:
            dedup.skip_re = re.compile(f"(?:{current})|(?:{_ACTOR_ARGS_NOTICE})")


_actor_args_notice_spent = False


def _spend_actor_args_notice(ray) -> None:
    """The driver's copy of the actor-arguments notice is logged once per process (its C++ call
    site keeps a flag), so have it logged now, with stderr captured, by creating a throwaway actor
    that cannot be placed (pinned to a node that does not exist): Ray marks it dead at once,
    without starting a worker or printing anything, and Ray Data's actors then start silently.
    Whatever else reaches stderr meanwhile is written back. Only on the embedded Ray, which this
    process owns."""
    global _actor_args_notice_spent
    if _actor_args_notice_spent:
        return
    _actor_args_notice_spent = True
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0, max_restarts=1)
        class _VqtokNoticeProbe:
            def __init__(self, arg):
                pass

        nowhere = NodeAffinitySchedulingStrategy(ray.NodeID.from_random().hex(), soft=False)
        arg = ray.put(None)
        with _stderr_without(re.compile(_ACTOR_ARGS_NOTICE)):
            _VqtokNoticeProbe.options(scheduling_strategy=nowhere).remote(arg)
    except Exception:  # noqa: BLE001 - at worst the notice shows
        pass


@contextlib.contextmanager
def _stderr_without(pattern: re.Pattern):
    """Capture file descriptor 2 (C/C++ writes included) for the block, then write back what was
    written to it, less the lines that match `pattern`."""
    with tempfile.TemporaryFile() as tmp:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is None:
            yield  # no stderr to capture: nothing to filter either
            return
        try:
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True)
                    if not pattern.search(line.decode(errors="replace"))]
            if kept:
                os.write(2, b"".join(kept))


def check_resources(ray, *, workers: int, gpus_per_worker: float, cpus_per_worker: float | None = None,
                    decode_cpus: float = 0.0) -> None:
    """Refuse, in seconds, workers the cluster cannot place (Ray would wait for them forever):
    `workers` x `gpus_per_worker` GPUs and, when cpus_per_worker is given, `workers` x
    `cpus_per_worker` CPUs plus `decode_cpus` (tokenize: its decoding tasks need a CPU of their
    own besides the encoders). Compared with the cluster's current total resources: an
    autoscaling cluster that could grow is refused too."""
    total = ray.cluster_resources()
    deadline = time.time() + 15  # a node that just started may not have reported its resources yet
    while not total.get("CPU") and time.time() < deadline:
        time.sleep(0.2)
        total = ray.cluster_resources()
    if gpus_per_worker > 0:
        have = total.get("GPU", 0)
        need = workers * gpus_per_worker
        if need > have:
            raise ConfigError(
                f"--workers {workers} x --gpus-per-worker {gpus_per_worker} needs {need:g} GPUs but the Ray cluster "
                f"has {have:g}: lower --workers, or pass --gpus-per-worker 0 to run on CPU"
            )
    if cpus_per_worker is not None:
        have = total.get("CPU", 0)
        need = workers * cpus_per_worker + decode_cpus
        if need > have:
            fits = int((have - decode_cpus) / cpus_per_worker + 1e-9)
            plus = f", plus {decode_cpus:g} for decoding" if decode_cpus else ""
            fix = (f"pass --workers {fits} (what fits), or a smaller --cpus-per-worker" if fits >= 1 else
                   f"not even one worker fits: pass a smaller --cpus-per-worker (at most {have - decode_cpus:g}), "
                   f"or run on a cluster with more CPUs")
            raise ConfigError(
                f"--workers {workers} needs {need:g} CPUs ({cpus_per_worker:g} per worker{plus}) but the Ray "
                f"cluster has {have:g}: {fix}"
            )
