"""Training through the `vqtok` CLI as a user runs it: outputs, resume after a kill, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_DIR, TINY_MODEL, png_bytes, run_cli, write_tar
from vqtok import ConfigError, TrainConfig, Tokenizer, train_vqvae
from vqtok.jobs.rundir import list_checkpoints, load_checkpoint

FAST = [*TINY_MODEL, "--batch-size", "32", "--log-every", "10", "--warmup-steps", "5"]


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/place", "--out", "{out}"], "'/no/such/place' matches no input"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--image-size", "30"],
     "image_size=30 is not divisible by downsample=4"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--codebook-size", "1"], "codebook_size=1"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--downsample", "3"], "downsample=3: use 4, 8 or 16"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--steps", "0"], "--steps 0"),
    (["--data", str(SAMPLE_DIR), "--out", "/proc/vqtok-cannot-write"], "cannot write there"),
    (["--out", "{out}"], "--data is required"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--workers", "2", "--batch-size", "63"], "must split evenly"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--workers", "2", "--address", "127.0.0.1:1"],
     "nothing answers there"),
    (["--data", "/no/such/place", "--out", "{out}", "--workers", "2"], "'/no/such/place' matches no input"),
    (["--data", str(SAMPLE_DIR), "--out", "{out}", "--workers", "2", "--gpus-per-worker", "1"],
     "needs 2 GPUs but the Ray cluster has 0"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    t0 = time.time()
    r = run_cli("train-vqvae", *[a.replace("{out}", str(out)) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "checkpoints").exists() and not (out / "tokenizer").exists()
    assert not (out / "ray_train").exists()
    assert time.time() - t0 < 60  # seconds, not a stalled connection or a started run


def test_train_writes_bundle_metrics_and_pictures(tmp_path, fmnist):
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("steps: 999\nseed: 3\nmodel:\n  codebook_size: 16\n")
    r = run_cli("train-vqvae", "--config", str(cfg_file), "--data", str(SAMPLE_DIR), "--out", str(out),
                "--val-data", str(SAMPLE_DIR), *FAST, "--steps", "30", "--checkpoint-every", "10")
    assert r.returncode == 0, r.stderr
    assert "step 30/30" in r.stdout and "img/s" in r.stdout and "usage" in r.stdout
    for name in ("reconstructions.png", "codebook_usage.png", "metrics.json", "config.json"):
        assert (out / name).is_file() and str(out / name) in r.stdout or name == "config.json"
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["steps"] == 30 and resolved["seed"] == 3  # flags override the file, file fills the rest
    assert resolved["model"]["codebook_size"] == 32  # --codebook-size in TINY_MODEL beats the file
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["images"] == 10_000 and 0 < held["mse"] < 0.2 and 0 < held["usage"] <= 1
    assert held["psnr"] == pytest.approx(10 * np.log10(1 / held["mse"]))
    assert 1 <= held["perplexity"] <= 32
    assert len(list_checkpoints(out)) == 3  # keeps the last three
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.id == metrics["tokenizer_id"]
    assert tok.encode(fmnist[0][:4]).shape == (4, 7, 7)
    # eval-vqvae on the same bundle reproduces the held-out numbers
    r = run_cli("eval-vqvae", "--tokenizer", str(out / "tokenizer"), "--data", str(SAMPLE_DIR),
                "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert ev["mse"] == pytest.approx(held["mse"], rel=1e-4) and ev["usage"] == held["usage"]
    assert (tmp_path / "eval" / "reconstructions.png").is_file()


def _train_cmd(out, steps, every):
    return [str(Path(sys.executable).with_name("vqtok")), "train-vqvae", "--data", str(SAMPLE_DIR), "--out",
            str(out), *FAST, "--steps", str(steps), "--checkpoint-every", str(every), "--seed", "1"]


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL mid-run, re-run the same command: it resumes and ends where a clean run ends."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    steps, every = 40, 10
    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(killed, steps, every), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    deadline = time.time() + 300
    while not list_checkpoints(killed) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    done = [int(load_checkpoint(c)["step"]) for c in list_checkpoints(killed)]
    assert done and max(done) < steps
    r = subprocess.run(_train_cmd(killed, steps, every), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {max(done)}" in r.stdout

    clean = tmp_path / "clean"
    r2 = subprocess.run(_train_cmd(clean, steps, every), capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0 and "resumed" not in r2.stdout
    a = load_checkpoint(list_checkpoints(killed)[-1])
    b = load_checkpoint(list_checkpoints(clean)[-1])
    assert a["step"] == b["step"] == steps and a["consumed"] == b["consumed"]
    for k in b["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k


def test_resume_refuses_a_different_model(tmp_path):
    out = tmp_path / "run"
    train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(out), steps=2, batch_size=8, checkpoint_every=1,
                            model={"width": 16, "code_dim": 8, "codebook_size": 16, "res_blocks": 1}))
    with pytest.raises(ConfigError, match="codebook_size: 16 in the checkpoint vs 32 now"):
        train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(out), steps=4, batch_size=8,
                                model={"width": 16, "code_dim": 8, "codebook_size": 32, "res_blocks": 1}))


def test_the_result_is_read_back_from_the_run_directory(tmp_path, monkeypatch):
    """One way results come back, in this process as on Ray: from the outputs' location and the
    metrics.json rank 0 wrote there."""
    import vqtok.jobs.trainer as trainer

    read = []
    real = trainer.read_json
    monkeypatch.setattr(trainer, "read_json", lambda where, name: read.append((where, name)) or real(where, name))
    out = tmp_path / "run"
    r = train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(out), steps=2, batch_size=8,
                                model={"width": 16, "code_dim": 8, "codebook_size": 16, "res_blocks": 1}))
    assert read == [(str(out), "metrics.json")]
    assert r.metrics == json.loads((out / "metrics.json").read_text())
    assert (r.run_dir, r.tokenizer_dir, r.reconstructions) == (str(out), f"{out}/tokenizer", f"{out}/reconstructions.png")
    assert r.tokenizer_id == Tokenizer.load(r.tokenizer_dir).id and r.resumed_from is None


def test_corrupt_members_never_crash_training(tmp_path, fmnist):
    members = []
    for i in range(200):
        members.append((f"{i:04d}.png", png_bytes(fmnist[0][i])))
        if i % 50 == 0:
            members.append((f"{i:04d}x.png", b"\x89PNG\r\n\x1a\n garbage"))
            members.append((f"{i:04d}z.png", b""))
    shard = write_tar(tmp_path / "s.tar", members)
    out = tmp_path / "run"
    r = run_cli("train-vqvae", "--data", str(shard), "--out", str(out), *FAST, "--steps", "12")
    assert r.returncode == 0, r.stderr
    assert "skipped '0000x'" in r.stdout and "skipped '0000z'" in r.stdout
    assert json.loads((out / "metrics.json").read_text())["skipped_inputs"] >= 8


def test_too_many_bad_inputs_fail_with_a_clear_message(tmp_path, fmnist):
    members = [(f"{i:04d}.png", b"not an image") for i in range(60)] + [("ok.png", png_bytes(fmnist[0][0]))]
    shard = write_tar(tmp_path / "bad.tar", members)
    r = run_cli("train-vqvae", "--data", str(shard), "--out", str(tmp_path / "run"), *FAST, "--steps", "5",
                "--batch-size", "4")
    assert r.returncode == 2
    assert "--max-failure-fraction" in r.stderr


def test_module_entry_point_and_help():
    r = subprocess.run([sys.executable, "-m", "vqtok.jobs.train_vqvae", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--codebook-size" in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0 and "train-vqvae" in r.stdout and "convert" in r.stdout


@pytest.mark.slow
def test_demo_sized_run_learns_a_useful_tokenizer(tmp_path, fmnist):
    """A guard against quality regressions: the README's demo settings on the bundled sample."""
    res = train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(tmp_path / "run"), steps=1500, log_every=500))
    m = res.metrics["train_eval"]
    assert m["mse"] < 0.008 and m["usage"] > 0.9 and m["perplexity"] > 250, m
    tok = Tokenizer.load(res.tokenizer_dir)
    recon = tok.decode(tok.encode(fmnist[0][:256])).float() / 255
    assert float(((recon - torch.from_numpy(fmnist[0][:256]).float() / 255) ** 2).mean()) < 0.01
