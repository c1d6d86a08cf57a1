"""The VQGAN-class architecture (`--arch vqgan`), presets, bundles of either kind, k-means
initialisation that gathers enough vectors first, training (1 and 2 workers, resume after a kill)."""
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
import torch.nn.functional as F

from conftest import REPO, SAMPLE_DIR, run_cli
from vqtok import ConfigError, Tokenizer
from vqtok.jobs.rundir import list_checkpoints, load_checkpoint
from vqtok.jobs.options import add_options, config_from_args
from vqtok.jobs.run import PipelineConfig
from vqtok.jobs.train_vqvae import TrainConfig
from vqtok.models import VQVAE, VQVAEConfig
from vqtok.models.vqvae import VectorQuantizer

OLD_BUNDLE = REPO / "tests" / "fixtures" / "bundle-conv-v1"
# a reduced-width vqgan for grayscale 16px images: two levels (downsample 2), 8x8 tokens
TINY_VQGAN = ["--arch", "vqgan", "--image-size", "16", "--width", "32", "--channel-mult", "1,2", "--res-blocks", "1",
              "--code-dim", "32", "--codebook-dim", "8"]


def tiny_vqgan(**kw) -> VQVAEConfig:
    return VQVAEConfig(**(dict(arch="vqgan", image_size=16, channels=3, width=32, channel_mult=[1, 2], res_blocks=1,
                               code_dim=32, codebook_dim=8, codebook_size=64) | kw))


def test_llamagen_vq16_preset_has_the_published_shape():
    cfg = VQVAEConfig.from_preset("llamagen-vq16")
    assert (cfg.arch, cfg.image_size, cfg.grid, cfg.codebook_size, cfg.codebook_dim) == ("vqgan", 256, 16, 16384, 8)
    model = VQVAE(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 71e6 < n < 73e6, n  # LlamaGen reports 72M parameters for VQ-16
    # attention at the lowest resolution (each of its res blocks) and in the middle block, nowhere else
    assert [len(level.attn) for level in model.encoder.levels] == [0, 0, 0, 0, 2]
    assert [len(level.attn) for level in model.decoder.levels] == [3, 0, 0, 0, 0]
    vq8 = VQVAEConfig.from_preset("llamagen-vq8")
    assert vq8.channel_mult == [1, 2, 2, 4] and vq8.grid == 32


def test_a_flag_overrides_the_preset_on_the_command_line_in_files_and_in_python(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser, TrainConfig)
    args = parser.parse_args(["--data", "x", "--out", "y", "--preset", "llamagen-vq8", "--image-size", "64"])
    m = config_from_args(TrainConfig, args).model
    assert (m.preset, m.image_size, m.grid, m.codebook_size, m.channel_mult) == ("llamagen-vq8", 64, 8, 16384, [1, 2, 2, 4])
    # a flag equal to the plain default still overrides the preset's value
    args = parser.parse_args(["--data", "x", "--out", "y", "--preset", "llamagen-vq16", "--codebook-size", "512"])
    assert config_from_args(TrainConfig, args).model.codebook_size == 512
    # the pipeline config takes presets too
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text("out: runs/x\ndata: [a.tar]\ntrain:\n  model:\n    preset: llamagen-vq16\n    image_size: 128\n")
    model = PipelineConfig.load(pipe).stage_config("train").model
    assert (model.image_size, model.grid, model.codebook_size) == (128, 8, 16384)
    assert VQVAEConfig.from_preset("llamagen-vq8", image_size=64).grid == 8
    with pytest.raises(ConfigError, match="from_preset"):
        VQVAEConfig(preset="llamagen-vq16")
    with pytest.raises(ConfigError, match="preset 'vq99' is unknown"):
        VQVAEConfig.from_dict({"preset": "vq99"})


@pytest.mark.parametrize("kw,message", [
    (dict(width=40), "not a multiple of GroupNorm's 32 groups"),
    (dict(downsample=8), "downsample=8 but channel_mult=[1, 2] has 2 levels"),
    (dict(channel_mult="1,x"), "expected integers"),
    (dict(arch="convnext"), "arch='convnext': use one of conv, vqgan"),
    (dict(image_size=15), "image_size=15 is not divisible by downsample=2"),
])
def test_bad_vqgan_shapes_name_the_value_and_the_fix(kw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_vqgan(**kw)
    with pytest.raises(ConfigError, match="only --arch vqgan has per-level channel multipliers"):
        VQVAEConfig(channel_mult=[1, 2])


def test_vqgan_bundle_round_trip_records_the_architecture(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(tiny_vqgan())
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    tok = Tokenizer(model)
    before = tok.encode(images)
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())["model"]
    assert config["arch"] == "vqgan" and config["channel_mult"] == [1, 2] and config["width"] == 32
    loaded = Tokenizer.load(tmp_path / "tok")
    assert isinstance(loaded.model.encoder, type(model.encoder)) and loaded.grid == (8, 8)
    assert torch.equal(loaded.encode(images), before)
    assert torch.equal(loaded.decode(before), tok.decode(before))


def test_a_bundle_written_before_architectures_existed_loads_and_gives_the_same_tokens():
    """tests/fixtures/bundle-conv-v1 was written by vqtok before --arch (commit 6df9e8a): its
    config.json has no arch, channel_mult or preset; it loads as conv and tokenizes as it did."""
    config = json.loads((OLD_BUNDLE / "tokenizer" / "config.json").read_text())
    assert "arch" not in config["model"]
    expected = np.load(OLD_BUNDLE / "expected.npz")
    tok = Tokenizer.load(OLD_BUNDLE / "tokenizer")
    assert tok.config.arch == "conv" and tok.id == "c942b2724cb4b6468a85c1b634f57868619a0fa25f39668db6e7f95fee334c5d"
    np.testing.assert_array_equal(tok.encode(expected["images"]).numpy(), expected["codes"])
    np.testing.assert_array_equal(tok.decode(torch.from_numpy(expected["codes"])).numpy(), expected["decoded"])


# ---------------------------------------------------------------------------------------------
# k-means initialisation at large K: gather enough vectors first
# ---------------------------------------------------------------------------------------------
def batches(n: int, size: int = 50, dim: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, 1, 1, generator=g) for _ in range(n)]


def test_kmeans_waits_for_enough_vectors_then_initialises_from_all_of_them():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=64, dim=4, l2_normalize=False, restart_window=0).train()
    data = batches(7)  # 50 vectors a batch, 4 * 64 = 256 needed: the 6th batch initialises
    start = q.codebook.clone()
    for i, x in enumerate(data[:5]):
        q(x)
        assert not bool(q.initialized) and int(q.kmeans_filled) == 50 * (i + 1)
        assert torch.equal(q.codebook, start)  # no EMA updates on a codebook that k-means will replace
    q(data[5])
    assert bool(q.initialized) and q.kmeans_points.numel() == 0
    # every code is a centroid of the 300 gathered vectors: a real cluster, not a copied point
    pts = torch.cat([x.reshape(50, 4) for x in data[:6]])
    assert int(torch.unique(q.codebook, dim=0).shape[0]) == 64
    assert not any(bool((pts == c).all(1).any()) for c in q.codebook[:8])


def test_large_k_seeding_in_rounds_gives_distinct_codes_that_cover_the_data():
    from vqtok.models.vqvae import SEQUENTIAL_SEEDING_MAX, kmeans

    torch.manual_seed(0)
    k = SEQUENTIAL_SEEDING_MAX + 904  # the rounds path
    x = torch.randn(4 * k, 4)
    centroids, sizes = kmeans(x, k, iters=2)
    assert centroids.shape == (k, 4) and torch.isfinite(centroids).all()
    assert int(torch.unique(centroids, dim=0).shape[0]) == k and int(sizes.sum()) == 4 * k
    assert int((sizes == 0).sum()) < 0.02 * k  # nearly every code holds points after two Lloyd steps


def test_a_checkpoint_taken_while_gathering_resumes_exactly():
    def run(stop_at: int | None):
        torch.manual_seed(1)
        q = VectorQuantizer(codebook_size=64, dim=4, l2_normalize=True, restart_window=0).train()
        for i, x in enumerate(batches(8)):
            if i == stop_at:  # "killed": a fresh quantizer loads the saved state and carries on
                state, rng = q.state_dict(), torch.get_rng_state()
                torch.manual_seed(99)
                q = VectorQuantizer(codebook_size=64, dim=4, l2_normalize=True, restart_window=0).train()
                q.load_state_dict(state)
                torch.set_rng_state(rng)
            q(x)
        return q.codebook

    assert torch.equal(run(None), run(3))


def test_a_checkpoint_without_the_kmeans_buffers_still_loads():
    q = VectorQuantizer(codebook_size=16, dim=4)
    state = {k: v for k, v in q.state_dict().items() if not k.startswith("kmeans")}
    VectorQuantizer(codebook_size=16, dim=4).load_state_dict(state)


@pytest.mark.slow
def test_kmeans_init_at_k16384_and_usage_reported():
    """K = 16384 codes, 8-dim l2 codes (LlamaGen's): 4 x K vectors gathered over several batches,
    k-means++ over them, every code distinct; perplexity and usage measured on the next batch."""
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16384, dim=8, l2_normalize=True, restart_window=0).train()
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    steps = 0
    while not bool(q.initialized):
        q(torch.randn(8192, 8, 1, 1, generator=g))
        steps += 1
    assert steps == 8 and q.codebook.shape == (16384, 8)
    out = q(torch.randn(65536, 8, 1, 1, generator=g))
    used = len(torch.unique(out.indices))
    print(f"k-means init at K=16384 took {time.time() - t0:.1f}s; {used} codes used by 65,536 vectors, "
          f"perplexity {float(out.perplexity):.0f}")
    assert used > 0.9 * 16384 * (1 - np.exp(-4)) and float(out.perplexity) > 8000


# ---------------------------------------------------------------------------------------------
# Training: one process with a resume after SIGKILL, two Ray Train workers
# ---------------------------------------------------------------------------------------------
def _train_cmd(out: Path, steps: int, every: int) -> list[str]:
    # K = 1024 with 8x8 tokens a 16-image batch: k-means gathers over 8 steps, so the kill lands
    # while it gathers (the k-means buffer is in the checkpoint) or just after
    return [str(Path(sys.executable).with_name("vqtok")), "train-vqvae", "--data", str(SAMPLE_DIR), "--out", str(out),
            *TINY_VQGAN, "--channels", "1", "--codebook-size", "1024", "--batch-size", "16", "--steps", str(steps),
            "--checkpoint-every", str(every), "--seed", "2", "--warmup-steps", "2", "--log-every", "5"]


def test_vqgan_trains_and_a_killed_run_resumes_to_the_clean_runs_weights(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    steps, every = 12, 3
    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(killed, steps, every), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env)
    deadline = time.time() + 300
    while not list_checkpoints(killed) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = [int(load_checkpoint(c)["step"]) for c in list_checkpoints(killed)]
    assert done and max(done) < steps
    r = subprocess.run(_train_cmd(killed, steps, every), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {max(done)}" in r.stdout and "VQ-VAE (vqgan" in r.stdout

    clean = tmp_path / "clean"
    r2 = subprocess.run(_train_cmd(clean, steps, every), capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr
    a, b = load_checkpoint(list_checkpoints(killed)[-1]), load_checkpoint(list_checkpoints(clean)[-1])
    assert a["step"] == b["step"] == steps and bool(b["model"]["quantizer.initialized"])
    for k in b["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k
    m = json.loads((clean / "metrics.json").read_text())
    assert m["train_eval"]["usage"] > 0 and m["train_eval"]["perplexity"] > 1
    tok = Tokenizer.load(clean / "tokenizer")
    assert tok.config.arch == "vqgan" and tok.grid == (8, 8)


@pytest.mark.slow
def test_vqgan_on_two_ray_train_workers_keeps_replicas_identical(tmp_path):
    args = ["--data", str(SAMPLE_DIR), *TINY_VQGAN, "--channels", "1", "--codebook-size", "64", "--steps", "20",
            "--batch-size", "32", "--warmup-steps", "2", "--log-every", "5", "--seed", "3"]
    r = run_cli("train-vqvae", *args, "--out", str(tmp_path / "two"), "--workers", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["workers"] == 2 and m["replicas_in_sync"] is True
    assert m["train"]["history"][-1]["loss"] < m["train"]["history"][0]["loss"]


def test_a_checkpoint_written_before_architectures_existed_resumes(tmp_path):
    """A run directory from before --arch: its checkpoint's model config lacks arch, channel_mult and
    preset, and its quantizer lacks the k-means buffers; the same model now resumes from it."""
    from vqtok import TrainConfig, train_vqvae

    model = {"width": 16, "code_dim": 8, "codebook_size": 16, "res_blocks": 1}
    out = tmp_path / "run"
    train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(out), steps=2, batch_size=8, checkpoint_every=2, model=model))
    (path,) = list_checkpoints(out)
    state = load_checkpoint(path)
    for key in ("arch", "channel_mult", "preset"):
        del state["model_config"][key]
    state["model_config"]["downsample"] = 4
    for key in ("quantizer.kmeans_points", "quantizer.kmeans_filled"):
        del state["model"][key]
    torch.save(state, path)
    r = train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(out), steps=4, batch_size=8, checkpoint_every=2,
                                model=model))
    assert r.resumed_from == 2
