"""Training the prior on token datasets and sampling from it: the streaming reader, the job (CLI
and API), resume after a kill, tokenizer checks, sampling to pictures of the tokenizer's size."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import make_bundle, run_cli, wait_for
from vqtok import DataError, Prior, TokenDataset, Tokenizer, train_prior
from vqtok.pipeline.sources import Unit
from vqtok.pipeline.token_format import dataset_metadata, part_table
from vqtok.pipeline.token_writer import TokenWriter
from vqtok.pipeline.sharded_stream import TokenStream
from vqtok.pipeline.token_dataset import TokenCorpus

ROWS_PER_PART = 150
TINY_PRIOR = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]


def class_grids(n: int, grid: tuple[int, int], k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token grids with structure a prior can learn: each of 10 classes has a template grid, and
    each token is swapped for a random code with probability 0.3."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, k, (10, *grid))
    labels = rng.integers(0, 10, n)
    grids = templates[labels]
    noise = rng.random(grids.shape) < 0.3
    grids[noise] = rng.integers(0, k, int(noise.sum()))
    return grids, labels


def write_token_dataset(out: Path, tokenizer: Path, n_parts: int, record_location: bool = True, seed: int = 0) -> Path:
    """A committed token dataset in the format `vqtok tokenize` writes, for the tokenizer at
    `tokenizer` (without starting Ray). The grids are class-structured synthetic ones: the tiny
    test tokenizer maps nearly every image to one code, which leaves a prior nothing to learn."""
    tok = Tokenizer.load(tokenizer)
    grids_all, labels = class_grids(n_parts * ROWS_PER_PART, tok.grid, tok.config.codebook_size, seed)
    meta = dataset_metadata(codebook_size=tok.config.codebook_size, tokenizer_id=tok.id, grid=tok.grid,
                            preprocess=tok.preprocess.to_dict(), vqtok_version="test")
    units = [Unit(url=f"mem://unit-{i:03d}", kind="tar") for i in range(n_parts)]
    with TokenWriter.open(str(out), meta, units, tokenizer_location=str(tokenizer) if record_location else None) as output:
        for unit, index in output.pending(units):
            sl = slice(index * ROWS_PER_PART, (index + 1) * ROWS_PER_PART)
            grids = grids_all[sl]
            keys = [f"img{i:06d}" for i in range(sl.start, sl.stop)]
            output.commit(unit, index, part_table(meta, keys, grids, [int(x) for x in labels[sl]], unit.url), [])
    return out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, bundle) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("tokens") / "train", bundle, 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokens) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("prior") / "run"
    r = run_cli("train-prior", "--tokens", str(tokens), "--out", str(out), "--steps", "120", "--batch-size", "32",
                "--log-every", "20", "--eval-every", "60", "--lr", "3e-3", "--warmup-steps", "10", *TINY_PRIOR)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


# ----------------------------------------------------------------------------------------------
# The reader
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 3, 5])  # 5 > 4 parts: rows are strided instead of parts
def test_ranks_read_disjoint_shares_that_cover_every_row_each_epoch(tokens, workers):
    corpus = TokenCorpus([str(tokens)])
    for epoch in (0, 1):
        seen = []
        for rank in range(workers):
            s = TokenStream(corpus.parts, corpus.grid, seed=3, rank=rank, world_size=workers, shuffle_buffer=64)
            rows = [t for e, t, _ in _take_epoch(s, epoch)]
            assert sum(len(t) for t in rows) == s.epoch_rows(epoch)
            seen.append(np.concatenate(rows))
        allrows = np.concatenate(seen)
        assert len(allrows) == corpus.num_rows == 4 * ROWS_PER_PART
        ref = TokenDataset(str(tokens)).to_numpy()[0].reshape(len(allrows), -1)
        assert sorted(map(bytes, allrows)) == sorted(map(bytes, ref))  # each row exactly once


def _take_epoch(stream: TokenStream, epoch: int):
    skip = sum(stream.epoch_rows(e) for e in range(epoch))
    for e, t, lab in stream.rows(skip):
        if e != epoch:
            return
        yield e, t, lab


def test_stream_is_shuffled_and_resumes_exactly_where_it_stopped(tokens):
    corpus = TokenCorpus([str(tokens)])
    s = TokenStream(corpus.parts, corpus.grid, seed=1, shuffle_buffer=100)
    it = s.batches(32)
    run = [next(it) for _ in range(60)]  # three epochs and a bit
    assert run[-1].epoch >= 2
    resumed = s.batches(32, skip=run[24].consumed)
    for a in run[25:]:
        b = next(resumed)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels) and a.consumed == b.consumed
    in_order = TokenDataset(str(tokens)).to_numpy()[0][:32]
    assert not np.array_equal(run[0].tokens.numpy(), in_order)
    e0 = np.concatenate([run[i].tokens.numpy() for i in range(18)]).reshape(18 * 32, -1)
    e1 = np.concatenate([run[i].tokens.numpy() for i in range(19, 37)]).reshape(18 * 32, -1)
    assert not np.array_equal(e0[:100], e1[:100])  # epochs are shuffled differently


def test_a_sliced_record_batch_reads_its_own_rows(tokens):
    """Arrow slices share their parent's buffers: reading a slice's grids must honour its offset."""
    ds = TokenDataset(str(tokens))
    table = ds.read_part(1)
    whole = ds.grids(table)
    for start, n in ((0, 5), (7, 11), (len(table) - 3, 3)):
        for piece in (table.slice(start, n), table.to_batches()[0].slice(start, n)):
            assert np.array_equal(ds.grids(piece), whole[start:start + n])


def test_corpus_statistics(tokens):
    corpus = TokenCorpus([str(tokens)])
    stats = corpus.stats()
    grids, labels = TokenDataset(str(tokens)).to_numpy()
    p = np.bincount(grids.reshape(-1), minlength=corpus.codebook_size) / grids.size
    p = p[p > 0]
    assert stats.unigram_entropy_bits == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert stats.max_label == labels.max() and stats.labeled_rows == len(labels) and not stats.sampled
    assert corpus.stats(max_rows=100).rows == 100


# ----------------------------------------------------------------------------------------------
# Mixed tokenizers are refused
# ----------------------------------------------------------------------------------------------
def test_datasets_from_different_tokenizers_are_refused(tmp_path, tokens):
    other = make_bundle(tmp_path / "other", seed=5)
    other_ds = write_token_dataset(tmp_path / "other-tokens", other, 1, seed=1)
    with pytest.raises(DataError, match="different tokenizers|made by tokenizer"):
        TokenCorpus([str(tokens), str(other_ds)])
    # a part copied in from the other dataset: the manifest says one tokenizer, the part another
    mixed = tmp_path / "mixed"
    import shutil

    shutil.copytree(tokens, mixed)
    victim = TokenDataset(mixed).parts[2].name
    shutil.copy(TokenDataset(other_ds).files()[0], mixed / victim)
    with pytest.raises(DataError, match=f"part .*{victim} was made by tokenizer"):
        TokenCorpus([str(mixed)])
    r = run_cli("train-prior", "--tokens", str(mixed), "--out", str(tmp_path / "p"), "--steps", "5", timeout=120)
    assert r.returncode == 2 and "mixes tokenizers" in r.stderr, r.stderr[-2000:]
    r = run_cli("train-prior", "--tokens", str(tokens), "--val-tokens", str(other_ds), "--out", str(tmp_path / "p"),
                "--steps", "5", timeout=120)
    assert r.returncode == 2 and "held-out tokens must come from the same tokenizer" in r.stderr, r.stderr[-2000:]
    r = run_cli("train-prior", "--tokens", str(tokens), "--tokenizer", str(other), "--out", str(tmp_path / "p"),
                "--steps", "5", timeout=120)
    assert r.returncode == 2 and "pass the tokenizer that wrote --tokens" in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def test_train_prior_learns_and_writes_its_outputs(trained, tokens, bundle):
    out, r = trained
    m = json.loads((out / "metrics.json").read_text())
    history = m["history"]
    first = float(next(line for line in r.stdout.splitlines() if "step 20/120" in line).split("bits ")[1].split()[0])
    assert history[-1]["eval_bits"] < first - 0.3, (first, history)  # it learned
    assert m["train_eval"]["bits_per_token"] < m["unigram_entropy_bits"]  # and beats the unigram model
    assert m["num_classes"] == 10 and m["tokenizer_id"] == Tokenizer.load(bundle).id
    assert "tok/s" in r.stdout and "unigram entropy" in r.stdout and "bits/token" in r.stdout
    for step in (20, 120):  # epochs at the step reported (32 rows a step of 600), not the mean since the last report
        line = next(line for line in r.stdout.splitlines() if f"step {step}/120" in line)
        assert f"epochs {step * 32 / 600:.4g} |" in line, line
    cfg = json.loads((out / "prior" / "config.json").read_text())
    assert cfg["tokenizer"] == {"id": Tokenizer.load(bundle).id, "path": str(Path(bundle).resolve())}
    assert Image.open(out / "samples.png").size[0] > 0


def test_the_final_evaluation_reads_every_held_out_row_and_a_bounded_share_of_the_training_data(tmp_path, tokens,
                                                                                              bundle):
    """--val-tokens: the final figure is over every held-out row, whatever --eval-rows says. Without:
    over the first --train-eval-rows training rows (a full pass over a large corpus would cost an
    epoch). Both recomputed here from the saved prior over exactly those rows, made afresh."""
    val = write_token_dataset(tmp_path / "val", bundle, 2, seed=1)
    common = dict(tokens=[str(tokens)], steps=6, batch_size=32, eval_every=1000, eval_rows=100, sample_grid=False,
                  dropout=0.0, n_layer=2, n_head=2, n_embd=32)
    held = train_prior(out=str(tmp_path / "held"), val_tokens=[str(val)], **common).metrics
    train = train_prior(out=str(tmp_path / "train"), train_eval_rows=250, **common).metrics
    assert "train_eval" not in held and "held_out" not in train
    assert held["held_out"]["rows"] == 2 * ROWS_PER_PART and train["train_eval"]["rows"] == 250

    tok = Tokenizer.load(bundle)

    def bits_over(run: Path, parts: int, seed: int, rows: int) -> float:
        grids, labels = class_grids(parts * ROWS_PER_PART, tok.grid, tok.config.codebook_size, seed)  # the dataset's rows
        grids, labels = grids[:rows], labels[:rows]
        prior = Prior.load(run).eval()
        with torch.no_grad():
            nats = prior.loss(torch.from_numpy(grids), torch.from_numpy(labels), reduction="sum").item()
        return nats / grids.size / np.log(2)

    assert held["held_out"]["bits_per_token"] == pytest.approx(bits_over(tmp_path / "held", 2, 1, 2 * ROWS_PER_PART), rel=1e-5)
    assert train["train_eval"]["bits_per_token"] == pytest.approx(bits_over(tmp_path / "train", 4, 0, 250), rel=1e-5)


def test_prior_load_sample_decodes_to_the_tokenizers_image_size(trained, bundle):
    out, _ = trained
    prior = Prior.load(out)
    tok = Tokenizer.load(bundle)
    s = prior.sample(12, classes=[0, 1, 2] * 4, seed=0, top_k=10)
    assert s.tokens.shape == (12, *tok.grid) and s.tokens.max() < tok.config.codebook_size
    assert s.images.shape == (12, tok.preprocess.image_size, tok.preprocess.image_size) and s.images.dtype == torch.uint8
    again = prior.sample(12, classes=[0, 1, 2] * 4, seed=0, top_k=10)
    assert torch.equal(s.tokens, again.tokens)  # a seed fixes the samples


def test_sample_cli_writes_grid_images_and_tokens(trained, tmp_path, bundle):
    out, _ = trained
    r = run_cli("sample", "--prior", str(out), "--n", "20", "--class", "3", "--temperature", "0.9", "--top-p", "0.9",
                "--cfg-scale", "2", "--out", str(tmp_path / "grid.png"), "--save-images", str(tmp_path / "imgs"),
                "--save-tokens", str(tmp_path / "t.parquet"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and "samples/s" in r.stdout
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    assert len(pngs) == 20 and all(p.name.endswith("-class3.png") for p in pngs)
    assert Image.open(pngs[0]).size == (28, 28)
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.num_rows == 20 and set(table.column("label").to_pylist()) == {3}
    meta = json.loads(table.schema.metadata[b"vqtok"])
    assert meta["tokenizer_id"] == Tokenizer.load(bundle).id
    r = run_cli("sample", "--prior", str(out), "--n", "10", "--out", str(tmp_path / "all.png"),
                "--save-tokens", str(tmp_path / "t.npy"), timeout=120)
    assert r.returncode == 0 and np.load(tmp_path / "t.npy").shape == (10, 7, 7), r.stderr[-2000:]


def test_sampling_refuses_a_tokenizer_the_prior_was_not_trained_for(trained, tmp_path):
    out, _ = trained
    other = make_bundle(tmp_path / "other", seed=9)
    r = run_cli("sample", "--prior", str(out), "--n", "4", "--tokenizer", str(other), "--out", str(tmp_path / "g.png"),
                timeout=120)
    assert r.returncode == 2 and "is not the one this prior was trained for" in r.stderr, r.stderr[-2000:]
    r = run_cli("sample", "--prior", str(out), "--n", "4", "--class", "12", "--out", str(tmp_path / "g.png"), timeout=120)
    assert r.returncode == 2 and "--class 12: this prior has classes 0..9" in r.stderr


def test_a_run_directory_of_a_prior_for_another_tokenizer_is_refused(trained, tmp_path):
    out, _ = trained
    other = make_bundle(tmp_path / "other", seed=7)
    other_ds = write_token_dataset(tmp_path / "other-tokens", other, 1, seed=1)
    r = run_cli("train-prior", "--tokens", str(other_ds), "--out", str(out), "--steps", "130", *TINY_PRIOR, timeout=120)
    assert r.returncode == 2 and "different model or tokenizer" in r.stderr and "tokenizer_id" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--n-embd", "30", "--n-head", "4"], "must be divisible by --n-head"),
    (["--num-classes", "3"], "the data has labels up to 9"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--workers", "2", "--batch-size", "33"], "must split evenly"),
])
def test_bad_arguments_are_named(tokens, tmp_path, args, message):
    r = run_cli("train-prior", "--tokens", str(tokens), "--out", str(tmp_path / "p"), "--steps", "5", *args, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_not_a_token_dataset(tmp_path):
    r = run_cli("train-prior", "--tokens", str(tmp_path), "--out", str(tmp_path / "p"), timeout=120)
    assert r.returncode == 2 and "is not a token dataset" in r.stderr


def test_resume_after_kill(tokens, tmp_path):
    """SIGKILL mid-run, then the same command: it resumes from the last checkpoint and finishes
    with the model the uninterrupted run would have (same data order, same optimizer state)."""
    out = tmp_path / "run"
    args = ["-m", "vqtok.jobs.train_prior", "--tokens", str(tokens), "--out", str(out), "--steps", "1000",
            "--batch-size", "32", "--checkpoint-every", "50", "--log-every", "50", "--eval-every", "1000",
            "--no-sample-grid", "--dropout", "0", *TINY_PRIOR]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: (out / "checkpoints" / "step-00000100.pt").exists() or proc.poll() is not None, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)  # generous: CI machines share cores
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"] >= 100 and m["steps"] == 1000
    # the same run without interruption ends with the same weights
    clean = tmp_path / "clean"
    r = train_prior(tokens=[str(tokens)], out=str(clean), steps=1000, batch_size=32, checkpoint_every=50,
                    log_every=50, eval_every=1000, sample_grid=False, dropout=0.0, n_layer=2, n_head=2, n_embd=32)
    a, b = Prior.load(out).state_dict(), Prior.load(clean).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ----------------------------------------------------------------------------------------------
# Ray Train and object stores (slow)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ray_train_workers_train_and_a_rerun_resumes(tokens, tmp_path):
    out = tmp_path / "run"
    common = ["train-prior", "--tokens", str(tokens), "--out", str(out), "--workers", "2", "--batch-size", "32",
              "--checkpoint-every", "20", "--log-every", "20", "--eval-every", "40", "--lr", "3e-3",
              "--warmup-steps", "10", *TINY_PRIOR]
    r = run_cli(*common, "--steps", "80", timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "on Ray Train with 2 workers" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["workers"] == 2 and m["train_eval"]["bits_per_token"] < m["unigram_entropy_bits"]
    assert (out / "ray_train").is_dir() and (out / "prior" / "model.safetensors").is_file()
    r = run_cli(*common, "--steps", "100", timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "resumed from step 80" in r.stdout
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 80
    s = Prior.load(out).sample(4, classes=1, seed=0)
    assert s.images.shape == (4, 28, 28)


@pytest.mark.slow
def test_token_datasets_on_an_object_store(tokens, tmp_path, s3_env):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(tokens), "vqtok/prior-tokens", recursive=True)
    corpus = TokenCorpus(["s3://vqtok/prior-tokens"])
    assert corpus.parts[0].url.startswith("s3://") and corpus.num_rows == 4 * ROWS_PER_PART
    local = TokenCorpus([str(tokens)])
    assert corpus.stats().unigram_entropy_bits == pytest.approx(local.stats().unigram_entropy_bits)
    a = next(TokenStream(corpus.parts, corpus.grid, seed=2).batches(50))
    b = next(TokenStream(local.parts, local.grid, seed=2).batches(50))
    assert torch.equal(a.tokens, b.tokens)
    r = train_prior(tokens=["s3://vqtok/prior-tokens"], out=str(tmp_path / "p"), steps=10, batch_size=16,
                    sample_grid=False, n_layer=1, n_head=2, n_embd=16)
    assert r.metrics["data"]["datasets"] == ["s3://vqtok/prior-tokens"]
