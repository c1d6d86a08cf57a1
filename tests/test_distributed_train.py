"""Tokenizer training on Ray Train with real worker processes (gloo on CPU): replicas stay identical,
2 workers track 1, and a killed worker or driver resumes from the last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DIR, TINY_MODEL, pids_with, run_cli, wait_for

pytestmark = pytest.mark.slow  # Ray Train start-up dominates: about 30 s per run
FAST = [*TINY_MODEL, "--warmup-steps", "5", "--log-every", "10"]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_two_workers_track_one_worker_with_identical_codebooks(tmp_path):
    args = ["--data", str(SAMPLE_DIR), "--steps", "200", "--batch-size", "64", "--seed", "3", *FAST]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli("train-vqvae", *args, "--out", str(one))
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli("train-vqvae", *args, "--out", str(two), "--workers", "2")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    m1, m2 = metrics(one), metrics(two)
    assert m2["workers"] == 2 and m2["replicas_in_sync"] is True  # bitwise-equal codebooks on both ranks
    assert m1["workers"] == 1 and m1["replicas_in_sync"] is None
    # the same global batch, data order and seed: the loss curves agree within 15% over the last
    # 100 steps, and the final reconstruction error within 20% (k-means seeding sees the same
    # images in another order, and DDP sums gradients in another order, so they are not bitwise)
    c1 = {h["step"]: h["loss"] for h in m1["train"]["history"]}
    c2 = {h["step"]: h["loss"] for h in m2["train"]["history"]}
    late = [s for s in c1 if s > 100]
    rel = np.mean([abs(c2[s] - c1[s]) / c1[s] for s in late])
    print(f"mean relative loss difference over steps 110-200: {rel:.3f}; "
          f"final mse {m1['train_eval']['mse']:.5f} (1 worker) vs {m2['train_eval']['mse']:.5f} (2 workers)")
    assert rel < 0.15
    assert abs(m2["train_eval"]["mse"] - m1["train_eval"]["mse"]) / m1["train_eval"]["mse"] < 0.20


def start_training(out: Path, *extra: str) -> subprocess.Popen:
    """The CLI in its own process group, its output to OUT.log (a pipe nobody reads could fill)."""
    exe = Path(sys.executable).with_name("vqtok")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(
        [str(exe), "train-vqvae", "--data", str(SAMPLE_DIR), "--out", str(out), "--steps", "600", "--batch-size", "32",
         "--checkpoint-every", "50", *FAST, *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))


def registered_step(out: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered (its directory appears before
    the registration: a worker killed in between restarts from the previous one)."""
    try:
        snapshot = json.loads((out / "ray_train" / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return 0


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_the_run_finishes(tmp_path):
    out = tmp_path / "run"
    p = start_training(out, "--workers", "2")
    try:
        wait_for(lambda: registered_step(out) >= 50 and pids_with("RayTrainWorker"))
        victim = max(pids_with("RayTrainWorker"))  # one worker process, by PID
        at_kill = registered_step(out)
        os.kill(victim, signal.SIGKILL)
        p.wait(timeout=600)
        log = (tmp_path / "run.log").read_text()
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, log[-4000:]
    assert at_kill < 600, "training ended before the kill; nothing was tested"
    assert "vqtok: resumed from step" in log, "\n".join(l for l in log.splitlines() if "Placement" not in l)[-6000:]
    m = metrics(out)
    assert m["steps"] == 600 and m["replicas_in_sync"] is True and m["resumed_from"] is not None
    assert (out / "tokenizer" / "model.safetensors").exists()


def test_a_killed_driver_rerun_resumes_instead_of_starting_over(tmp_path):
    out = tmp_path / "run"
    p = start_training(out, "--workers", "2")
    try:
        wait_for(lambda: registered_step(out) >= 100)
        at_kill = registered_step(out)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the Ray processes the driver started
        except ProcessLookupError:
            pass
    time.sleep(1)
    r = run_cli("train-vqvae", "--data", str(SAMPLE_DIR), "--out", str(out), "--steps", "600", "--batch-size", "32",
                "--checkpoint-every", "50", *FAST, "--workers", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in r.stdout.splitlines()
               if "resumed from step" in line]
    assert resumed and resumed[0] >= at_kill, r.stdout[-3000:]
    m = metrics(out)
    assert m["steps"] == 600 and m["resumed_from"] == resumed[0] and m["replicas_in_sync"] is True


def test_run_directory_on_an_object_store(tmp_path, s3_env):
    """--out s3://...: checkpoints go there through Ray Train, the bundle and metrics are uploaded,
    and the same command again resumes from the stored checkpoint."""
    import fsspec

    from vqtok import Tokenizer

    args = ["--data", str(SAMPLE_DIR), "--out", "s3://vqtok/run", "--steps", "40", "--batch-size", "32",
            "--checkpoint-every", "20", *FAST]
    r = run_cli("train-vqvae", *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = {p.split("vqtok/run/", 1)[1] for p in fs.find("vqtok/run")}
    assert {"tokenizer/config.json", "tokenizer/model.safetensors", "metrics.json", "config.json",
            "reconstructions.png", "codebook_usage.png"} <= names, names
    assert any(n.startswith("ray_train/checkpoint_") for n in names), names
    tok = Tokenizer.load("s3://vqtok/run/tokenizer")
    assert tok.config.codebook_size == 32 and tok.id == json.loads(fs.cat_file("vqtok/run/metrics.json"))["tokenizer_id"]

    r = run_cli("train-vqvae", *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step 40" in r.stdout
