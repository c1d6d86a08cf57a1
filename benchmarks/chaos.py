"""Chaos: SIGKILL parts of `vqtok tokenize` at random moments, re-run until it completes, and check
that every completed dataset equals a clean run's, row for row.

    python benchmarks/chaos.py [--kills 100] [--seed 0] [--quick] [--no-append]

The corpus is the bundled Fashion-MNIST sample (examples/fashion-mnist) written as --shards small
WebDataset shards, the tokenizer a tiny random bundle (tests/conftest.py's). One clean run (the
embedded Ray, default options) gives the reference dataset. Then, with a seeded RNG, over and over:
start `vqtok tokenize --workers 2` as a subprocess (a new session), wait 0.5-8 s, and SIGKILL one
victim of a kind drawn at random:
  driver       the `vqtok tokenize` process, then its process group (the embedded Ray's processes
               outlive the driver); the next start resumes the dataset;
  encoder      a BatchEncoder actor's process (Ray Data restarts it, its batch is retried);
  read task    a worker process while it runs read_units (Ray retries the task);
  worker node  every process of the cluster's worker node (its raylet, its workers): a lost node.
               A replacement node joins 1-3 s later, as an autoscaler would start one.
Most runs go to a local two-node cluster started once with `ray start` (head: 1 CPU, worker: 2
CPUs, both on 127.0.0.1) through --address, which keeps a cycle short; about one run in four (never
a worker-node kill; always the first driver kill) uses the embedded Ray of a plain `vqtok tokenize`,
as a user's default command.
A run that was not killed outright continues; whether it completes or dies, the next start
re-runs it until it completes. Each completed dataset is compared with the clean one by key: rows
missing, duplicated, extra or different (tokens or label) are "differing rows"; whether the two
tables are equal and every part's sha256 matches (TokenDataset.verify) is checked too. A run
still going after --run-timeout seconds counts as a hang and is killed.

Exit status 1 when any row differs, a dataset is not identical, or a run hung.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "out" / "chaos"
BIN = Path(sys.executable).parent
SAMPLE = REPO / "examples" / "fashion-mnist"
KINDS = ("driver", "encoder", "read task", "worker node")
WEIGHTS = (0.35, 0.30, 0.25, 0.10)
MATCH = {"encoder": "BatchEncoder", "read task": "read_units"}


# ----------------------------------------------------------------------------------------------
# corpus and tokenizer
# ----------------------------------------------------------------------------------------------
def prepare(n_shards: int, per: int) -> tuple[Path, Path]:
    """WebDataset shards of the bundled sample (KEY.png + KEY.cls) and a tiny random tokenizer."""
    import numpy as np
    from PIL import Image

    from vqtok.pipeline.sources import read_idx

    data = OUT / f"shards-{n_shards}x{per}"
    if not (data / "_done").exists():
        images = read_idx(str(SAMPLE / "t10k-images-idx3-ubyte.gz"))
        labels = read_idx(str(SAMPLE / "t10k-labels-idx1-ubyte.gz"))
        assert n_shards * per <= len(images), f"the sample has {len(images)} images"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        for s in range(n_shards):
            with tarfile.open(data / f"shard-{s:04d}.tar", "w") as tf:
                for i in range(s * per, (s + 1) * per):
                    buf = io.BytesIO()
                    Image.fromarray(np.asarray(images[i])).save(buf, format="PNG")
                    for name, payload in ((f"img{i:06d}.png", buf.getvalue()),
                                          (f"img{i:06d}.cls", str(int(labels[i])).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tf.addfile(info, io.BytesIO(payload))
        (data / "_done").write_text("")
    bundle = OUT / "tokenizer-tiny"
    if not (bundle / "model.safetensors").exists():
        import torch

        from vqtok import Tokenizer, VQVAEConfig
        from vqtok.models import VQVAE

        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig(width=32, code_dim=16, codebook_size=32, res_blocks=1))
        with torch.no_grad():  # a spread-out codebook, so tokens vary from image to image
            model.quantizer.codebook.normal_()
        Tokenizer(model).save(bundle)
    return data, bundle


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------
def session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[3])  # a zombie is dead already
    except (OSError, ValueError, IndexError):
        return None


def pids_in(sessions: set[int], text: str = "") -> list[int]:
    """Live processes of the given sessions whose command line contains `text`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or session_of(int(d.name)) not in sessions:
            continue
        try:
            if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(d.name))
        except OSError:
            pass
    return found


def kill_session(sid: int) -> None:
    for pid in pids_in({sid}):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head (1 CPU) and a worker node (2 CPUs) started with `ray start` on 127.0.0.1, each in
    a session of its own: the worker node's session is everything a lost node takes with it."""

    def __init__(self, env: dict):
        self.env = env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head = self._start(["--head", "--port", str(self.port), "--num-cpus", "1", "--dashboard-host",
                                 "127.0.0.1", "--dashboard-port", str(free_port()), "--ray-client-server-port",
                                 str(free_port()), "--disable-usage-stats"])
        self.worker = self.add_worker()

    def _start(self, args: list[str]) -> int:
        """Runs `ray start ARGS` in a new session; returns the session id, which the node's
        processes keep after `ray start` itself exits."""
        p = subprocess.Popen([str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                             start_new_session=True)
        log, _ = p.communicate(timeout=180)
        if p.returncode != 0 or not pids_in({p.pid}, "raylet"):
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log[-3000:]}")
        return p.pid

    def add_worker(self) -> int:
        self.worker = self._start(["--address", self.address, "--num-cpus", "2"])
        return self.worker

    def worker_alive(self) -> bool:
        return bool(pids_in({self.worker}, "raylet"))

    def kill_worker(self) -> int:
        n = len(pids_in({self.worker}))
        kill_session(self.worker)
        return n

    def sessions(self) -> set[int]:
        return {self.head, self.worker}

    def shutdown(self) -> None:
        for sid in (self.worker, self.head):
            kill_session(sid)


# ----------------------------------------------------------------------------------------------
# comparing a dataset with the clean one
# ----------------------------------------------------------------------------------------------
def compare(clean, got) -> dict:
    """Differing rows between two token tables, by key: missing, duplicated, extra, different."""
    want = {k: (t, lab) for k, t, lab in zip(clean.column("key").to_pylist(), clean.column("tokens").to_pylist(),
                                              clean.column("label").to_pylist())}
    seen: Counter = Counter()
    different = extra = 0
    for k, t, lab in zip(got.column("key").to_pylist(), got.column("tokens").to_pylist(),
                         got.column("label").to_pylist()):
        seen[k] += 1
        if seen[k] > 1:
            continue
        if k not in want:
            extra += 1
        elif want[k] != (t, lab):
            different += 1
    missing = sum(1 for k in want if k not in seen)
    duplicated = sum(c - 1 for c in seen.values())
    return {"missing": missing, "duplicated": duplicated, "extra": extra, "different": different,
            "differing": missing + duplicated + extra + different}


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
@dataclass
class Stats:
    kills: Counter = field(default_factory=Counter)  # by kind
    continued: Counter = field(default_factory=Counter)  # non-driver kills after which the run still completed
    died: Counter = field(default_factory=Counter)  # non-driver kills after which the run exited non-zero
    starts: int = 0
    embedded_starts: int = 0
    missed: int = 0  # runs that completed before their kill came
    hangs: int = 0
    completed: int = 0
    differing: int = 0
    not_identical: int = 0
    verify_problems: int = 0
    failures: list = field(default_factory=list)  # the last lines of runs that died without being killed outright
    run_seconds: list = field(default_factory=list)


def start_run(bundle: Path, data: Path, out: Path, address: str | None, env: dict, log) -> subprocess.Popen:
    args = [str(BIN / "vqtok"), "tokenize", "--tokenizer", str(bundle), "--data", str(data), "--out", str(out),
            "--workers", "2", "--progress-seconds", "2"] + (["--address", address] if address else [])
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait(p: subprocess.Popen, timeout: float) -> int | None:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def tail(path: Path, n: int = 6) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="6 kills (one of each kind first), for the test suite")
    p.add_argument("--shards", type=int, default=30)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--run-timeout", type=float, default=240.0, help="a run still going after this is a hang")
    p.add_argument("--embedded-fraction", type=float, default=0.25,
                   help="runs on the embedded Ray instead of the cluster (never for worker-node kills)")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args()
    kills_wanted = 6 if args.quick else args.kills
    rng = random.Random(args.seed)
    t_start = time.time()

    data, bundle = prepare(args.shards, args.per_shard)
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    base_env.pop("RAY_ADDRESS", None)
    cluster_env = dict(base_env, RAY_AUTH_MODE="token", PATH=f"{BIN}:{base_env.get('PATH', '')}")
    work = Path(tempfile.mkdtemp(prefix="chaos-", dir=OUT))
    from vqtok import TokenDataset

    # the reference: one clean run on the embedded Ray with default options
    clean_dir = work / "clean"
    t = time.time()
    with open(work / "clean.log", "w") as log:
        rc = subprocess.run([str(BIN / "vqtok"), "tokenize", "--tokenizer", str(bundle), "--data", str(data),
                             "--out", str(clean_dir)], stdout=log, stderr=subprocess.STDOUT, env=base_env,
                            start_new_session=True).returncode
    if rc != 0:
        print(f"the clean run failed:\n{tail(work / 'clean.log', 30)}")
        return 2
    clean = TokenDataset(clean_dir).to_table()
    clean_seconds = time.time() - t
    print(f"clean run: {clean.num_rows:,} rows from {args.shards} shards in {clean_seconds:.1f}s (embedded Ray); "
          f"work in {work}", flush=True)

    t = time.time()
    cluster = LocalCluster(cluster_env)
    print(f"cluster at {cluster.address}: head 1 CPU, worker node 2 CPUs ({time.time() - t:.1f}s to start)",
          flush=True)

    # the kinds: one of each first (shuffled), then drawn with WEIGHTS
    first = list(KINDS)
    rng.shuffle(first)
    st = Stats()
    episode, out = 0, None
    try:
        while sum(st.kills.values()) < kills_wanted or out is not None:
            if out is None:
                episode += 1
                out = work / f"run-{episode:03d}"
            n_kills = sum(st.kills.values())
            kind = None
            if n_kills < kills_wanted:
                kind = first[n_kills] if n_kills < len(first) else rng.choices(KINDS, WEIGHTS)[0]
            # the first driver kill always on the embedded Ray: its processes outlive the driver
            embedded = kind != "worker node" and (rng.random() < args.embedded_fraction
                                                  or (kind == "driver" and not st.kills["driver"]))
            delay = rng.uniform(0.5, 8.0)
            if not embedded and not cluster.worker_alive():
                cluster.add_worker()
            st.starts += 1
            st.embedded_starts += embedded
            log_path = work / f"run-{episode:03d}-{st.starts:04d}.log"
            t_run = time.time()
            with open(log_path, "w") as log:
                proc = start_run(bundle, data, out, None if embedded else cluster.address,
                                 base_env if embedded else cluster_env, log)
            sessions = {proc.pid} if embedded else cluster.sessions()
            killed = None
            try:
                if kind is not None:
                    deadline = t_run + delay
                    while proc.poll() is None and time.time() < deadline:
                        time.sleep(0.02)
                    victim = None
                    while proc.poll() is None and victim is None and time.time() < deadline + 30:
                        if kind == "driver":
                            victim = proc.pid
                        elif kind == "worker node":
                            victim = cluster.worker
                        else:
                            found = pids_in(sessions, MATCH[kind])
                            victim = rng.choice(found) if found else None
                            if victim is None:
                                time.sleep(0.02)
                    if victim is not None and proc.poll() is None:
                        at = time.time() - t_run
                        if kind == "driver":
                            os.kill(victim, signal.SIGKILL)
                            proc.wait()
                            kill_group(proc)
                        elif kind == "worker node":
                            cluster.kill_worker()
                            time.sleep(rng.uniform(1.0, 3.0))
                            cluster.add_worker()  # what an autoscaler does
                        else:
                            try:
                                os.kill(victim, signal.SIGKILL)
                            except ProcessLookupError:
                                victim = None
                        if victim is not None:
                            killed = kind
                            st.kills[kind] += 1
                rc = wait(proc, max(1.0, args.run_timeout - (time.time() - t_run)))
                if rc is None:
                    st.hangs += 1
                    print(f"  HANG: run {log_path.name} still going after {args.run_timeout:.0f}s "
                          f"(kill: {killed}); last lines:\n{tail(log_path)}", flush=True)
            finally:
                kill_group(proc)  # the embedded Ray's processes outlive a killed driver
            st.run_seconds.append(time.time() - t_run)
            if killed is None and kind is not None:
                st.missed += rc == 0
            if killed not in (None, "driver"):
                (st.continued if rc == 0 else st.died)[killed] += 1
            if rc not in (0, None) and killed != "driver":
                st.failures.append(f"{log_path.name} (kill: {killed}): {tail(log_path, 3)}")
            what = f"{killed} at {at:.1f}s" if killed else ("no kill" if kind is None else f"no {kind} kill (ended)")
            outcome = "completed" if rc == 0 else ("hung" if rc is None else f"exit {rc}")
            note = ""
            if rc == 0:
                ds = TokenDataset(out)
                got = ds.to_table()
                diff = compare(clean, got)
                st.completed += 1
                st.differing += diff["differing"]
                st.not_identical += not got.equals(clean)
                problems = ds.verify()
                st.verify_problems += len(problems)
                note = (f"; dataset {episode}: {diff['differing']} differing rows"
                        + ("" if got.equals(clean) else f" (NOT identical: {diff}, {problems[:3]})"))
                shutil.rmtree(out, ignore_errors=True)
                out = None
            print(f"kill {sum(st.kills.values())}/{kills_wanted} [{', '.join(f'{k} {st.kills[k]}' for k in KINDS)}]: "
                  f"{'embedded' if embedded else 'cluster'} run {st.starts}: {what} -> {outcome}{note}; "
                  f"differing rows so far {st.differing} ({time.time() - t_start:.0f}s)", flush=True)
    finally:
        cluster.shutdown()

    wall = time.time() - t_start
    rows = [[k, st.kills[k], st.continued[k] if k != "driver" else "-", st.died[k] if k != "driver" else "-"]
            for k in KINDS]
    rows.append(["all", sum(st.kills.values()), sum(st.continued.values()), sum(st.died.values())])
    body = table(["victim (SIGKILL)", "kills", "run went on to complete", "run died (re-run)"], rows)
    mean_run = sum(st.run_seconds) / max(1, len(st.run_seconds))
    summary = [
        ["runs started (embedded Ray / cluster)", f"{st.starts} ({st.embedded_starts} / {st.starts - st.embedded_starts})"],
        ["runs that ended before their kill came", st.missed],
        ["hangs (no end within --run-timeout)", st.hangs],
        ["completed datasets compared with the clean run", st.completed],
        ["datasets not identical to the clean run", st.not_identical],
        ["parts failing verify (sha256)", st.verify_problems],
        ["final differing rows (missing + duplicated + extra + different)", st.differing],
        ["wall time", f"{wall / 60:.1f} min (clean run {clean_seconds:.0f}s, mean run {mean_run:.1f}s)"],
    ]
    body += "\n\n" + table(["", ""], summary)
    body += (f"\n\n{clean.num_rows:,} images in {args.shards} WebDataset shards of {args.per_shard}, tiny tokenizer "
             f"(7x7, K=32); `vqtok tokenize --workers 2`, killed 0.5-8 s after start; cluster: `ray start` head 1 CPU + "
             f"worker node 2 CPUs on 127.0.0.1 (a replacement node joins 1-3 s after a worker-node kill); "
             f"{args.embedded_fraction:.0%} of the other runs on the embedded Ray; seed {args.seed}.")
    if st.failures:
        body += f"\nRuns that exited non-zero after a non-driver kill: {len(st.failures)}; last lines of the first:\n"
        body += "\n".join("    " + line for line in st.failures[0].splitlines())
    print()
    print(body)
    print(f"\n{st.differing} differing rows")
    if not args.no_append:
        append_results(f"Chaos: {sum(st.kills.values())} SIGKILLs during `vqtok tokenize` (benchmarks/chaos.py)", body)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if st.differing or st.not_identical or st.hangs or st.verify_problems else 0


if __name__ == "__main__":
    sys.exit(main())
