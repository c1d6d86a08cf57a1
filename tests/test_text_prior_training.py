"""`vqtok train-prior --text-tokenizer`: a text prior trained on a captioned token dataset (the one
vocabulary's sequences), held-out bits with and without the caption, prompts, captions, resume."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, wait_for
from test_train_prior import class_grids
from vqtok import ConfigError, Prior, Tokenizer, train_prior
from vqtok.models.text_prior import TextPrior
from vqtok.pipeline.sources import Unit
from vqtok.pipeline.token_format import dataset_metadata, part_table
from vqtok.pipeline.token_writer import TokenWriter

NAMES = ["shirt", "trousers", "pullover", "dress", "coat", "sandal", "top", "sneaker", "bag", "boot"]
ROWS = 150
TINY = dict(n_layer=2, n_head=2, n_embd=32)


def write_captioned(out: Path, tokenizer: Path, n_parts: int, seed: int = 0) -> Path:
    """Class-structured grids (test_train_prior.class_grids) captioned "a NAME" by class; every
    seventh row has no caption."""
    tok = Tokenizer.load(tokenizer)
    grids, labels = class_grids(n_parts * ROWS, tok.grid, tok.config.codebook_size, seed)
    meta = dataset_metadata(codebook_size=tok.config.codebook_size, tokenizer_id=tok.id, grid=tok.grid,
                            preprocess=tok.preprocess.to_dict(), vqtok_version="test")
    units = [Unit(url=f"mem://unit-{i:03d}", kind="tar") for i in range(n_parts)]
    with TokenWriter.open(str(out), meta, units, tokenizer_location=str(tokenizer)) as output:
        for unit, index in output.pending(units):
            sl = slice(index * ROWS, (index + 1) * ROWS)
            caps = [None if i % 7 == 0 else f"a {NAMES[labels[i]]}" for i in range(sl.start, sl.stop)]
            output.commit(unit, index, part_table(meta, [f"k{i}" for i in range(sl.start, sl.stop)], grids[sl],
                                                  [int(x) for x in labels[sl]], unit.url, captions=caps), [])
    return out


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, bundle) -> Path:
    return write_captioned(tmp_path_factory.mktemp("cap") / "train", bundle, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, captioned):
    out = tmp_path_factory.mktemp("tp") / "run"
    return train_prior(tokens=[str(captioned)], out=str(out), steps=400, batch_size=32, lr=3e-3, eval_every=1000,
                       text_tokenizer="bytes", order="both", max_text_tokens=12, model=TINY)


def test_the_caption_carries_information_and_is_counted(trained, captioned):
    t = trained.metrics["text"]
    assert t["caption_bits_per_image"] > 5  # the caption names the class template
    assert trained.metrics["train_eval"]["bits_per_token"] < t["bits_per_image_token_empty_caption"]
    assert t["rows_trained"] == 400 * 32 and t["order"] == "both"
    expected_empty = t["rows_trained"] / 7  # every seventh row has no caption
    assert abs(t["rows_with_empty_caption"] - expected_empty) < 0.2 * expected_empty
    assert t["captions_truncated"] == 0
    assert Path(trained.samples).exists()


def test_prompts_give_their_class_and_the_prior_captions(trained, bundle):
    """Samples for "a bag" sit nearer the bag template than any other; greedy captions of a class's
    template name its class."""
    tok = Tokenizer.load(bundle)
    rng = np.random.default_rng(0)
    temps = rng.integers(0, tok.config.codebook_size, (10, *tok.grid))
    prior = Prior.load(trained.prior_dir)
    assert isinstance(prior, TextPrior)
    for c in (8, 3):
        s = prior.sample([f"a {NAMES[c]}"], n=8, cfg_scale=2.0, top_k=4, seed=0, decode=False)
        agree = [(s.tokens == torch.from_numpy(t)).float().mean().item() for t in temps]
        assert int(np.argmax(agree)) == c and agree[c] > 0.5
    captions = prior.captions(torch.from_numpy(temps[[8, 3, 9]]))
    assert captions == ["a bag", "a dress", "a boot"]


def test_cli_samples_from_prompts(trained, tmp_path):
    out = tmp_path / "grid.png"
    p = run_cli("sample", "--prior", trained.run_dir, "--prompt", "a bag", "--prompt", "a boot", "--n", "4",
                "--cfg-scale", "2", "--out", str(out), "--save-tokens", str(tmp_path / "t.parquet"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.exists() and "4 samples for each of 2 prompts" in p.stdout
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "t.parquet")
    assert t.num_rows == 8 and t.column("caption").to_pylist() == ["a bag"] * 4 + ["a boot"] * 4
    bad = run_cli("sample", "--prior", trained.run_dir, "--class", "3", "--out", str(out))
    assert bad.returncode == 2 and "--prompt TEXT instead" in bad.stderr


def test_text_options_need_a_text_tokenizer(captioned, tmp_path):
    with pytest.raises(ConfigError, match="--order both: only for a text prior"):
        train_prior(tokens=[str(captioned)], out=str(tmp_path / "x"), order="both")
    with pytest.raises(ConfigError, match="--text-tokenizer /nope.json"):
        train_prior(tokens=[str(captioned)], out=str(tmp_path / "x"), text_tokenizer="/nope.json", steps=1)


@pytest.mark.slow
def test_two_ray_train_workers_train_a_text_prior(captioned, tmp_path):
    """--workers 2 on Ray Train (DDP): the text loss through DDP, held-out bits with and without the
    caption summed over ranks, a prompt samples from the result."""
    out = tmp_path / "run"
    r = run_cli("train-prior", "--tokens", str(captioned), "--out", str(out), "--workers", "2", "--batch-size", "32",
                "--steps", "250", "--checkpoint-every", "125", "--log-every", "50", "--eval-every", "125", "--lr", "3e-3",
                "--text-tokenizer", "bytes", "--order", "both", "--max-text-tokens", "12", "--n-layer", "2",
                "--n-head", "2", "--n-embd", "32", timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "on Ray Train with 2 workers" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["workers"] == 2 and m["text"]["rows_trained"] > 0
    assert m["train_eval"]["bits_per_token"] < m["text"]["bits_per_image_token_empty_caption"]
    s = Prior.load(out).sample(["a bag"], n=2, seed=0)
    assert s.images.shape == (2, 28, 28)


@pytest.mark.slow
def test_resume_after_kill_equals_a_clean_run(captioned, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "vqtok.jobs.train_prior", "--tokens", str(captioned), "--out", str(out), "--steps", "300",
            "--batch-size", "16", "--checkpoint-every", "25", "--log-every", "50", "--eval-every", "1000",
            "--no-sample-grid", "--dropout", "0", "--text-tokenizer", "bytes", "--order", "both",
            "--max-text-tokens", "12", "--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: (out / "checkpoints" / "step-00000050.pt").exists() or proc.poll() is not None, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step" in r.stdout
    clean = tmp_path / "clean"
    train_prior(tokens=[str(captioned)], out=str(clean), steps=300, batch_size=16, checkpoint_every=25, log_every=50,
                eval_every=1000, sample_grid=False, dropout=0.0, text_tokenizer="bytes", order="both",
                max_text_tokens=12, model=TINY)
    a, b = Prior.load(out).state_dict(), Prior.load(clean).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert json.loads((out / "metrics.json").read_text())["text"]["rows_trained"] > 0


def test_caption_command_writes_a_caption_per_image(trained, tmp_path, fmnist):
    """`vqtok caption` on real image files: one row per image (key, the prior's caption, the source's
    own caption); the prior's caption is what Prior.captions gives for the tokens tokenize would make;
    a class prior is refused by name."""
    import pyarrow.parquet as pq

    from conftest import png_bytes, write_tar

    images, _ = fmnist
    members = []
    for i in range(5):
        members += [(f"{i}.png", png_bytes(images[i]))] + ([(f"{i}.txt", b"a source caption")] if i == 2 else [])
    write_tar(tmp_path / "s.tar", members)
    out = tmp_path / "caps.parquet"
    p = run_cli("caption", "--prior", trained.run_dir, "--data", str(tmp_path / "s.tar"), "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    t = pq.read_table(out).to_pylist()
    assert [r["key"] for r in t] == ["0", "1", "2", "3", "4"]
    assert [r["source_caption"] for r in t] == [None, None, "a source caption", None, None]
    prior = Prior.load(trained.prior_dir)
    tok = prior.load_tokenizer()
    want = prior.captions(tok.encode_file([png_bytes(images[i]) for i in range(5)]))
    assert [r["caption"] for r in t] == want
    jsonl = tmp_path / "caps.jsonl"
    assert run_cli("caption", "--prior", trained.run_dir, "--data", str(tmp_path / "s.tar"), "--out",
                   str(jsonl)).returncode == 0
    assert [json.loads(x)["caption"] for x in jsonl.read_text().splitlines()] == want
