"""Batch tokenization on a real local Ray: exact tokens, exactly-once commits, resume, bad input.

In-process tests share one embedded Ray (the `ray_local` fixture); the CLI tests start their own,
as a user's command does.
"""
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import (PER_SHARD, committed, kill_group, make_bundle, part_hashes, pids_with, png_bomb_header, png_bytes,
                      run_cli, start_tokenize, wait_for, write_shards, write_tar)
from vqtok import ConfigError, DataError, TokenDataset, Tokenizer, tokenize
from vqtok.pipeline import token_writer as plan
from vqtok.pipeline.token_format import part_name


def expected_rows(bundle: Path, images, labels, n_shards: int, batch: int):
    """What tokenization must give: Tokenizer.encode over each unit's images, in stored order."""
    tok = Tokenizer.load(bundle)
    keys, grids, labs = [], [], []
    for s in range(n_shards):
        idx = range(s * PER_SHARD, (s + 1) * PER_SHARD)
        keys += [f"img{i:06d}" for i in idx]
        grids.append(tok.encode(images[list(idx)], batch_size=batch).numpy())
        labs += [int(labels[i]) for i in idx]
    return keys, np.concatenate(grids), labs


def test_tokens_equal_tokenizer_encode_and_read_back_with_plain_pyarrow(tmp_path, bundle, shards, fmnist, ray_local):
    images, labels = fmnist
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(shards / "*.tar"), out, batch_size=64, verbose=False)
    assert (r.rows, r.parts, r.failures, r.units_run) == (4 * PER_SHARD, 4, 0, 4)

    keys, grids, labs = expected_rows(bundle, images, labels, 4, batch=64)
    ds = TokenDataset(out)
    assert ds.num_rows == 4 * PER_SHARD and ds.grid == (7, 7) and ds.codebook_size == 32
    assert ds.tokenizer_id == Tokenizer.load(bundle).id
    t = ds.to_table()
    assert t.column("key").to_pylist() == keys
    assert t.column("label").to_pylist() == labs
    tokens, got_labels = ds.to_numpy()
    np.testing.assert_array_equal(tokens, grids)
    assert tokens.dtype == np.uint16 and got_labels.tolist() == labs
    assert set(t.column("source").to_pylist()) == {str(p) for p in sorted(shards.glob("*.tar"))}

    # plain pyarrow, no vqtok: the directory reads as one table (the _-prefixed entries are skipped)
    plain = pads.dataset(str(out), format="parquet").to_table()
    assert plain.num_rows == 4 * PER_SHARD and sorted(plain.column("key").to_pylist()) == sorted(keys)
    meta = json.loads(pq.read_schema(ds.files()[0]).metadata[b"vqtok"])
    assert meta["schema_version"] == 2 and meta["codebook_size"] == 32 and meta["grid"] == [7, 7]
    assert meta["tokenizer_id"] == ds.tokenizer_id and meta["preprocess"]["image_size"] == 28
    assert ds.verify() == []
    # streaming read gives the same rows
    streamed = np.concatenate([ds.grids(b) for b in ds.iter_batches(100)])
    np.testing.assert_array_equal(streamed, grids)


def test_parquet_and_idx_inputs(tmp_path, bundle, fmnist, ray_local):
    import pyarrow as pa

    images, labels = fmnist
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"image": [png_bytes(images[i]) for i in range(100)],
                             "label": pa.array(labels[:100].astype(np.int64))}), data / "part-a.parquet")
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(data / "*.parquet"), out, batch_size=32, verbose=False)
    assert r.rows == 100
    tokens, got = TokenDataset(out).to_numpy()
    np.testing.assert_array_equal(tokens, Tokenizer.load(bundle).encode(images[:100], batch_size=32).numpy())
    assert got.tolist() == labels[:100].tolist()
    assert TokenDataset(out).to_table().column("key").to_pylist()[:2] == ["part-a/00000000", "part-a/00000001"]

    # the bundled IDX sample is one unit of 10,000 images, labels from the labels file beside it
    from conftest import SAMPLE_DIR

    r = tokenize(bundle, str(SAMPLE_DIR), tmp_path / "idx", verbose=False)
    assert (r.rows, r.parts) == (10_000, 1)
    tokens, got = TokenDataset(tmp_path / "idx").to_numpy()
    np.testing.assert_array_equal(tokens[:256], Tokenizer.load(bundle).encode(images[:256], batch_size=256).numpy())
    assert got.tolist() == labels.tolist()


def test_one_and_two_workers_write_identical_datasets(tmp_path, bundle, shards, ray_local):
    one, two = tmp_path / "one", tmp_path / "two"
    tokenize(bundle, str(shards), one, batch_size=32, workers=1, verbose=False)
    tokenize(bundle, str(shards), two, batch_size=32, workers=2, verbose=False)
    assert part_hashes(one) == part_hashes(two)  # byte-identical parts


def test_rerun_is_a_no_op_and_new_units_are_appended(tmp_path, bundle, fmnist, ray_local):
    images, labels = fmnist
    data = tmp_path / "data"
    write_shards(data, images, labels, 2)
    out = tmp_path / "tokens"
    tokenize(bundle, str(data), out, verbose=False)
    before = part_hashes(out)
    r = tokenize(bundle, str(data), out, verbose=False)
    assert r.units_run == 0 and r.units_skipped == 2 and part_hashes(out) == before

    write_shards(data, images, labels, 1, start=2)
    r = tokenize(bundle, str(data), out, verbose=False)
    assert (r.units_run, r.units_skipped, r.rows) == (1, 2, 3 * PER_SHARD)
    after = part_hashes(out)
    assert {u: after[u] for u in before} == before
    assert after[str(data / "shard-0002.tar")][0] == "000002"


def test_a_different_tokenizer_into_the_same_out_is_refused(tmp_path, bundle, shards, ray_local):
    out = tmp_path / "tokens"
    tokenize(bundle, str(shards / "shard-0000.tar"), out, verbose=False)
    other = make_bundle(tmp_path / "other", seed=1)
    held, new = Tokenizer.load(bundle).id, Tokenizer.load(other).id
    assert held[:12] != new[:12]
    with pytest.raises(ConfigError, match="already holds tokens from another tokenizer") as e:
        tokenize(other, str(shards / "shard-0000.tar"), out, verbose=False)
    msg = str(e.value)
    # names both tokenizers (by short id: the one OUT holds, then this run's) and says how to go on
    assert held[:12] in msg and new[:12] in msg and msg.index(held[:12]) < msg.index(new[:12]), msg
    assert str(out) in msg and "a new --out" in msg and "delete" in msg, msg  # the place, and the fix
    assert TokenDataset(out).tokenizer_id == held


def test_crash_between_part_write_and_commit_redoes_the_unit(tmp_path, bundle, shards, monkeypatch, ray_local):
    clean = tmp_path / "clean"
    tokenize(bundle, str(shards), clean, verbose=False)

    out = tmp_path / "crashed"
    real_commit, calls = plan.TokenWriter.commit, []

    def crash_on_third(self, unit, index, table, failures, notes=()):
        calls.append(index)
        if len(calls) == 3:  # write the part (with a corrupt payload), then die before the manifest
            self._put(part_name(index, self.lease.run), b"half-written garbage")
            raise KeyboardInterrupt("simulated crash")
        return real_commit(self, unit, index, table, failures, notes)

    monkeypatch.setattr(plan.TokenWriter, "commit", crash_on_third)
    # a hard crash: nothing tidies up after it (a clean exit would compact and delete the orphan)
    monkeypatch.setattr(plan.TokenWriter, "close", lambda self: self.lease.release())
    with pytest.raises(KeyboardInterrupt):
        tokenize(bundle, str(shards), out, verbose=False)
    monkeypatch.undo()

    orphan = next(p.name for p in out.glob(f"part-{calls[2]:06d}-*.parquet"))
    assert (out / orphan).exists()
    ds = TokenDataset(out)  # the orphan is not read: the manifest does not list it
    assert len(ds.parts) == 2 and orphan not in [p.name for p in ds.parts]
    assert ds.num_rows == 2 * PER_SHARD and ds.to_table().num_rows == 2 * PER_SHARD

    r = tokenize(bundle, str(shards), out, verbose=False)
    assert r.units_run == 2 and r.units_skipped == 2
    assert part_hashes(out) == part_hashes(clean)
    assert TokenDataset(out).verify() == []


def test_corrupt_inputs_are_skipped_counted_and_recorded(tmp_path, bundle, fmnist, ray_local):
    images, labels = fmnist
    good = [(f"ok{i}.png", png_bytes(images[i])) for i in range(20)]
    bad = [
        ("trunc.png", png_bytes(images[50])[:60]),
        ("empty.png", b""),
        ("text.png", b"this is not an image at all"),
        ("bomb.png", png_bomb_header()),
        ("badlabel.png", png_bytes(images[51])), ("badlabel.cls", b"cat"),
        ("trunc.jpg", _jpeg(images[52])[:100]),
    ]
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "a.tar", good[:10] + bad + good[10:])
    full = write_tar(tmp_path / "full.tar", [(f"t{i}.png", png_bytes(images[100 + i])) for i in range(30)])
    (data / "b.tar").write_bytes(full.read_bytes()[:9000])  # a truncated tar: keep what was read

    out = tmp_path / "tokens"
    r = tokenize(bundle, str(data), out, max_failure_fraction=1.0, verbose=False)
    assert r.failures == 7  # six bad members + the truncated tail of b.tar
    ds = TokenDataset(out)
    keys = ds.to_table().column("key").to_pylist()
    assert keys[:20] == [f"ok{i}" for i in range(20)]
    b_keys = keys[20:]
    assert 0 < len(b_keys) < 30 and b_keys == [f"t{i}" for i in range(len(b_keys))]

    records = [json.loads(line) for f in sorted((out / "_errors").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(records) == 7 and all(set(r) == {"key", "unit", "reason", "unit_damaged"} for r in records)
    reasons = {r["key"]: r["reason"] for r in records}
    assert "zero-byte" in reasons["empty"] and "not an image" in reasons["text"]
    assert "decompression bomb" in reasons["bomb"] and "truncated" in reasons["trunc"]
    assert "bad .cls label" in reasons["badlabel"] and "unreadable tar" in reasons[next(k for k in reasons if k.startswith("<after"))]

    with pytest.raises(DataError, match="max-failure-fraction 0.1"):
        tokenize(bundle, str(data), tmp_path / "strict", max_failure_fraction=0.1, verbose=False)


def test_a_cut_short_shard_counts_against_the_failure_fraction_as_a_damaged_unit(tmp_path, bundle, fmnist, ray_local):
    images, labels = fmnist
    data = tmp_path / "data"
    write_shards(data, images, labels, 3)
    shard = data / "shard-0001.tar"
    shard.write_bytes(shard.read_bytes()[: 30 * 1024])  # most of its images are lost; one Failure records it
    with pytest.raises(DataError, match=r"1 of 3 input units are damaged .*--max-failure-fraction 0.1"):
        tokenize(bundle, str(data), tmp_path / "tokens", max_failure_fraction=0.1, verbose=False)
    r = tokenize(bundle, str(data), tmp_path / "lenient", max_failure_fraction=0.5, verbose=False)
    assert r.failures == 1 and TokenDataset(tmp_path / "lenient").committed[str(shard)]["damaged"]


def _jpeg(arr) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_more_gpus_than_the_cluster_has_is_refused(tmp_path, bundle, shards, ray_local):
    with pytest.raises(ConfigError, match="needs 2 GPUs but the Ray cluster has 0"):
        tokenize(bundle, str(shards), tmp_path / "t", workers=2, gpus_per_worker=1, verbose=False)


@pytest.mark.parametrize("args,message", [
    (["--data", "{shards}", "--out", "{out}"], "--tokenizer is required"),
    (["--tokenizer", "/no/such/bundle", "--data", "{shards}", "--out", "{out}"], "is not a tokenizer bundle"),
    (["--tokenizer", "{bundle}", "--data", "/no/such/data/*.tar", "--out", "{out}"], "matches no input"),
    (["--tokenizer", "{bundle}", "--data", "{shards}", "--out", "/proc/vqtok-cannot-write"], "cannot write there"),
    (["--tokenizer", "{bundle}", "--data", "{shards}", "--out", "{out}", "--workers", "0"], "--workers 0"),
    (["--tokenizer", "{bundle}", "--data", "{shards}", "--out", "{out}", "--address", "127.0.0.1:1"],
     "nothing answers there"),
    (["--tokenizer", "{bundle}", "--data", "{shards}", "--out", "{bundle}"], "holds other files"),
])
def test_bad_arguments_fail_before_any_ray_work(tmp_path, bundle, shards, args, message):
    out = tmp_path / "out"
    t0 = time.time()
    fill = {"{out}": str(out), "{shards}": str(shards), "{bundle}": str(bundle)}
    r = run_cli("tokenize", *[fill.get(a, a) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(out.glob("part-*")) and time.time() - t0 < 30


def test_cli_tokenize_then_inspect(tmp_path, bundle, shards):
    out = tmp_path / "tokens"
    r = run_cli("tokenize", "--tokenizer", str(bundle), "--data", str(shards), "--out", str(out), "--batch-size", "64")
    assert r.returncode == 0, r.stderr
    assert "units 4/4" in r.stdout and f"{4 * PER_SHARD:,} rows in 4 parts" in r.stdout and "img/s" in r.stdout
    r = run_cli("inspect", str(out), "--rows", "2", "--verify")
    assert r.returncode == 0, r.stderr
    assert f"rows {4 * PER_SHARD:,} in 4 committed parts" in r.stdout and "key 'img000000'" in r.stdout
    assert "all parts match the manifest" in r.stdout


# ----------------------------------------------------------------------------------------------
# Kills: the driver, then an encoder actor. Real processes, real SIGKILL.
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_driver_killed_mid_job_then_rerun_gives_the_clean_dataset(tmp_path, bundle, many_shards, clean_run):
    out = tmp_path / "tokens"
    p = start_tokenize(bundle, many_shards, out)
    try:
        wait_for(lambda: committed(out) >= 2)
        os.kill(p.pid, signal.SIGKILL)  # the driver, mid-job
        p.wait()
    finally:
        kill_group(p)
    at_kill = committed(out)
    assert 2 <= at_kill < 20, at_kill

    r = run_cli("tokenize", "--tokenizer", str(bundle), "--data", str(many_shards), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{at_kill} already committed" in r.stdout
    assert part_hashes(out) == part_hashes(clean_run)
    a, b = TokenDataset(out).to_table(), TokenDataset(clean_run).to_table()
    assert a.equals(b) and len(set(a.column("key").to_pylist())) == a.num_rows == 10_000


@pytest.mark.slow
def test_encoder_actor_killed_mid_job_the_job_finishes_exactly(tmp_path, bundle, many_shards, clean_run):
    out = tmp_path / "tokens"
    p = start_tokenize(bundle, many_shards, out, "--batch-size", "64")
    try:
        wait_for(lambda: committed(out) >= 1 and pids_with("BatchEncoder"))
        victims = pids_with("BatchEncoder")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        at_kill = committed(out)
        log, _ = p.communicate(timeout=300)
    finally:
        kill_group(p)
    assert p.returncode == 0, log
    assert at_kill < 20, "the job ended before the kill; nothing was tested"
    assert part_hashes(out) == part_hashes(clean_run)
    assert "10,000 rows in 20 parts" in log


# ----------------------------------------------------------------------------------------------
# Object store: a real S3-compatible server (moto) on 127.0.0.1
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_s3_input_bundle_and_output(tmp_path, bundle, shards, s3_env):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for p in sorted(shards.glob("*.tar")):
        fs.put_file(str(p), f"vqtok/shards/{p.name}")
    for name in ("config.json", "model.safetensors"):
        fs.put_file(str(bundle / name), f"vqtok/tok/{name}")

    args = ["--tokenizer", "s3://vqtok/tok", "--data", "s3://vqtok/shards/shard-{0000..0003}.tar", "--batch-size", "64"]
    r = run_cli("tokenize", *args, "--out", "s3://vqtok/tokens")
    assert r.returncode == 0, r.stdout + r.stderr
    local = tmp_path / "local"
    r = run_cli("tokenize", *args[2:], "--tokenizer", str(bundle), "--out", str(local))
    assert r.returncode == 0, r.stderr

    remote = TokenDataset("s3://vqtok/tokens")
    assert remote.num_rows == 4 * PER_SHARD and remote.verify() == []
    a, b = remote.to_table(), TokenDataset(local).to_table()
    assert a.column("tokens").equals(b.column("tokens")) and a.column("key").equals(b.column("key"))
    assert a.column("source").to_pylist()[0] == "s3://vqtok/shards/shard-0000.tar"
    assert not fs.exists("vqtok/tokens/_staging"), "object stores take one PUT per part, no staging"

    r = run_cli("tokenize", *args, "--out", "s3://vqtok/tokens")  # same command again: nothing to do
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
