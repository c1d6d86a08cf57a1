"""Exactly-once under what users meet: inputs that change between runs, two runs into one OUT, the
commit protocol's cost and its readers, readers outside vqtok.

Writer-level tests drive TokenWriter directly (no Ray); input-change tests run `tokenize` on a
real embedded Ray and compare with a clean run over the new inputs.
"""
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PER_SHARD, png_bytes, write_shards
from vqtok import ConfigError, TokenDataset, tokenize
from vqtok.pipeline import token_format as fmt
from vqtok.pipeline import token_writer as td
from vqtok.pipeline.lease import LeaseHeld, LeaseLost
from vqtok.pipeline.sources import Unit, list_units


# ----------------------------------------------------------------------------------------------
# Writer level: a fake tokenizer's metadata and synthetic parts
# ----------------------------------------------------------------------------------------------
def meta(tokenizer_id: str = "tok-a") -> dict:
    return fmt.dataset_metadata(codebook_size=16, tokenizer_id=tokenizer_id, grid=(2, 2), preprocess={"p": 1},
                               vqtok_version="test")


def units(n: int, signature: str = "s") -> list[Unit]:
    return [Unit(url=f"/in/unit-{i:03d}.tar", kind="tar", signature=signature) for i in range(n)]


def table(m: dict, unit: Unit, value: int, rows: int = 3) -> pa.Table:
    keys = [f"{unit.url}/{r}" for r in range(rows)]
    return fmt.part_table(m, keys, np.full((rows, 2, 2), value, np.int64), [value] * rows, unit.url)


def write(out, m, us, value=1, **open_kw):
    with td.TokenWriter.open(str(out), m, us, **open_kw) as w:
        for u, i in w.pending(us):
            w.commit(u, i, table(m, u, value), [])
    return w


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_ends(tmp_path):
    m, us = meta(), units(2)
    first = td.TokenWriter.open(str(tmp_path), m, us)
    t0 = time.time()
    with pytest.raises(LeaseHeld, match=rf"being written by another run: run {first.lease.run} \(host .*pid {os.getpid()}"):
        td.TokenWriter.open(str(tmp_path), meta("tok-b"), us)
    assert time.time() - t0 < 5
    first.close()
    write(tmp_path, m, us)  # free again
    assert TokenDataset(tmp_path).num_rows == 6


HOLD = """
import sys, time
from vqtok.pipeline import token_writer as td
sys.path.insert(0, {tests!r})
from test_exactly_once import meta, units
w = td.TokenWriter.open({out!r}, meta(), units(2))
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_writers_lease_is_free_at_once(tmp_path):
    code = HOLD.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {p.pid}"):
            td.TokenWriter.open(str(tmp_path), meta(), units(2))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    write(tmp_path, meta(), units(2))  # no waiting: the kernel dropped the dead run's lock


def _race(out: str, tokenizer_id: str, barrier, results) -> None:
    m, us = meta(tokenizer_id), units(6)
    barrier.wait()
    try:
        with td.TokenWriter.open(out, m, us) as w:
            for u, i in w.pending(us):
                w.commit(u, i, table(m, u, ord(tokenizer_id[-1]) % 16), [])
                time.sleep(0.05)
        results.put((tokenizer_id, "wrote"))
    except (LeaseHeld, ConfigError) as e:
        results.put((tokenizer_id, f"refused: {e}"))


@pytest.mark.parametrize("same", [True, False], ids=["same-tokenizer", "different-tokenizers"])
def test_two_runs_started_at_the_same_moment_one_writes_and_the_dataset_is_never_mixed(tmp_path, same):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    ids = ["tok-a", "tok-a" if same else "tok-b"]
    procs = [ctx.Process(target=_race, args=(str(tmp_path), t, barrier, results)) for t in ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5)[1].split(":")[0] for _ in procs)
    ds = TokenDataset(tmp_path)
    assert ds.num_rows == 18 and ds.verify() == []
    parts_tok = {json.loads(pq.read_schema(f).metadata[b"vqtok"])["tokenizer_id"] for f in ds.files()}
    assert parts_tok == {ds.tokenizer_id}  # one tokenizer throughout
    if not same:
        assert outcomes == ["refused", "wrote"]


def test_commits_append_a_small_record_and_readers_see_exactly_the_committed_set(tmp_path):
    m, us = meta(), units(5)
    w = td.TokenWriter.open(str(tmp_path), m, us)
    manifest_before = (tmp_path / fmt.MANIFEST).read_bytes()
    for n, (u, i) in enumerate(w.pending(us)[:3], 1):
        w.commit(u, i, table(m, u, n), [])
        assert len(TokenDataset(tmp_path).parts) == n  # visible at once, to a reader in another object
    assert (tmp_path / fmt.MANIFEST).read_bytes() == manifest_before  # not rewritten per commit
    records = sorted((tmp_path / fmt.COMMITS_DIR).iterdir())
    assert len(records) == 3 and all(r.stat().st_size < 400 for r in records)
    # an orphan part (written, never committed) and another run's stray record are not read
    (tmp_path / fmt.part_name(3, "deadbeef")).write_bytes(b"garbage")
    (tmp_path / fmt.COMMITS_DIR / f"{99:012d}-deadbeef.json").write_text(json.dumps(
        {"unit": us[4].url, "part": "part-000004-deadbeef.parquet", "rows": 9, "bytes": 1, "sha256": "x",
         "failures": 0, "seq": 99}))
    ds = TokenDataset(tmp_path)
    assert [p.unit for p in ds.parts] == [u.url for u in us[:3]] and ds.num_rows == 9
    w.close()  # folds the records in, deletes the orphan and the stray record
    assert not list((tmp_path / fmt.COMMITS_DIR).iterdir())
    assert sorted(p.name for p in tmp_path.glob("part-*")) == sorted(p.name for p in ds.parts)
    manifest = json.loads((tmp_path / fmt.MANIFEST).read_text())
    assert len(manifest["committed"]) == 3 and manifest["rows"] == 9
    assert TokenDataset(tmp_path).to_table().equals(ds.to_table())


def test_compaction_is_geometric_so_the_manifest_is_rewritten_log_times(tmp_path, monkeypatch):
    monkeypatch.setattr(td, "COMPACT_AT", 4)
    m, us = meta(), units(40)
    writes = []
    real = td.TokenWriter._write_manifest
    monkeypatch.setattr(td.TokenWriter, "_write_manifest", lambda self: (writes.append(len(self.committed)), real(self)))
    write(tmp_path, m, us)
    # open, then when the records outnumber the manifest's entries (4, 8, 16, 32), then close
    assert writes == [0, 4, 8, 16, 32, 40]
    assert TokenDataset(tmp_path).num_rows == 120


def test_a_reader_racing_a_compaction_still_sees_every_committed_part(tmp_path, monkeypatch):
    m, us = meta(), units(4)
    w = td.TokenWriter.open(str(tmp_path), m, us)
    for u, i in w.pending(us):
        w.commit(u, i, table(m, u, 1), [])
    real_cat, compacted = td.LocalFileSystem.cat_file, []

    def cat_then_compact(self, path, *a, **k):  # the writer compacts between the reader's listing and its reads
        if fmt.COMMITS_DIR in str(path) and not compacted:
            compacted.append(1)
            w.compact()
        return real_cat(self, path, *a, **k)

    monkeypatch.setattr(td.LocalFileSystem, "cat_file", cat_then_compact)
    assert TokenDataset(tmp_path).num_rows == 12 and compacted
    w.close()


def test_s3_lease_refuses_a_live_holder_takes_over_an_expired_one_and_fences_the_old_writer(s3_env):
    import fsspec

    out = "s3://vqtok/lease-test"
    m, us = meta(), units(3)
    a = td.TokenWriter.open(out, m, us, lease_seconds=2)
    with pytest.raises(LeaseHeld, match=f"run {a.lease.run}"):
        td.TokenWriter.open(out, m, us, lease_seconds=2)
    u, i = a.pending(us)[0]
    a.commit(u, i, table(m, u, 1), [])
    # a stalls: no heartbeats; once its lease is older than 2 s a new run takes over
    a.lease._stop.set()
    a.lease._thread.join()
    a.lease.holder.pid = 1  # a live pid: only the heartbeat's age can free it
    with pytest.raises(LeaseHeld):
        td.TokenWriter.open(out, m, us, lease_seconds=2)
    time.sleep(2.5)
    b = td.TokenWriter.open(out, m, us, lease_seconds=2)
    # a wakes up and, not knowing, writes one more unit: b's readers must not see it
    u2, i2 = a.pending(us)[1]
    a.commit(u2, i2, table(m, u2, 7), [])
    assert [p.unit for p in TokenDataset(out).parts] == [us[0].url]
    for u, i in b.pending(us):
        b.commit(u, i, table(m, u, 2), [])
    b.close()
    ds = TokenDataset(out)
    assert ds.num_rows == 9 and ds.verify() == []
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not [p for p in fs.ls(out) if fmt.part_name(i2, a.lease.run) in p]  # a's late part: deleted at b's close
    # a heartbeat that finds its lease taken stops the run before its next commit
    c = td.TokenWriter.open(out, m, us, lease_seconds=2)
    c.lease.etag = "not-the-current-etag"
    time.sleep(1.5)
    with pytest.raises(LeaseLost, match="lost its lease"):
        c.commit(us[0], 0, table(m, us[0], 3), [])


# ----------------------------------------------------------------------------------------------
# Inputs that change between runs: the re-run equals a clean run over the new inputs
# ----------------------------------------------------------------------------------------------
def rows(out) -> pa.Table:
    return TokenDataset(out).to_table()


def clean_equals(bundle, data, out, tmp_path, **kw) -> None:
    clean = tmp_path / f"clean-{time.time_ns()}"
    tokenize(bundle, data, clean, verbose=False, **kw)
    a, b = rows(out), rows(clean)
    assert a.num_rows == b.num_rows and len(set(a.column("key").to_pylist())) == a.num_rows
    assert a.equals(b)


def test_a_shard_rewritten_in_place_is_redone_or_refused_by_name(tmp_path, bundle, fmnist, ray_local):
    images, labels = fmnist
    data, out = tmp_path / "data", tmp_path / "tokens"
    write_shards(data, images, labels, 3)
    tokenize(bundle, str(data), out, verbose=False)
    write_shards(data, images[::-1].copy(), labels[::-1].copy(), 1, start=1)  # shard-0001.tar, new content
    with pytest.raises(ConfigError, match=r"1 committed input units changed .*shard-0001.tar.*--changed-inputs redo"):
        tokenize(bundle, str(data), out, verbose=False, changed_inputs="refuse")
    r = tokenize(bundle, str(data), out, verbose=False)
    assert (r.units_run, r.plan.changed) == (1, [str(data / "shard-0001.tar")])
    clean_equals(bundle, str(data), out, tmp_path)
    assert len(list(out.glob("part-*"))) == 3  # the replaced part is gone


def test_removed_inputs_are_refused_kept_or_dropped_as_asked(tmp_path, bundle, fmnist, ray_local):
    images, labels = fmnist
    data, out = tmp_path / "data", tmp_path / "tokens"
    write_shards(data, images, labels, 3)
    tokenize(bundle, str(data), out, verbose=False)
    gone = data / "shard-0000.tar"
    shutil.move(gone, tmp_path / "elsewhere.tar")
    with pytest.raises(ConfigError, match=r"1 committed input units are no longer among the inputs .*shard-0000.tar"
                                          r".*--removed-inputs keep.*--removed-inputs drop"):
        tokenize(bundle, str(data), out, verbose=False)
    r = tokenize(bundle, str(data), out, verbose=False, removed_inputs="keep")
    assert r.plan.kept == [str(gone)] and r.rows == 3 * PER_SHARD
    r = tokenize(bundle, str(data), out, verbose=False, removed_inputs="drop")
    assert r.plan.dropped == [str(gone)] and r.rows == 2 * PER_SHARD
    clean_equals(bundle, str(data), out, tmp_path)


def test_a_file_added_to_an_image_folder_redoes_only_its_unit(tmp_path, bundle, fmnist, ray_local):
    images, labels = fmnist
    folder, out = tmp_path / "photos", tmp_path / "tokens"
    for i in range(120):
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        (folder / str(labels[i]) / f"im{i:04d}.png").write_bytes(png_bytes(images[i]))
    before = list_units(str(folder), folder_unit_size=10)
    assert len(before) > 5
    tokenize(bundle, str(folder), out, verbose=False, folder_unit_size=10)
    added = folder / str(labels[500]) / "im0055x.png"  # sorts into the middle of the listing
    added.write_bytes(png_bytes(images[500]))
    after = list_units(str(folder), folder_unit_size=10)
    changed = [u.url for u in after if u.url in {b.url for b in before} and u not in before]
    new = [u.url for u in after if u.url not in {b.url for b in before}]
    assert len(changed) + len(new) <= 2  # only the unit it falls into (or a split of it)
    r = tokenize(bundle, str(folder), out, verbose=False, folder_unit_size=10)
    assert r.units_run == len(changed) + len(new) and sorted(r.plan.changed) == sorted(changed)
    clean_equals(bundle, str(folder), out, tmp_path, folder_unit_size=10)
    assert f"{labels[500]}/im0055x" in rows(out).column("key").to_pylist()


@pytest.mark.parametrize("kind", ["parquet", "idx"])
def test_parquet_and_idx_inputs_changed_or_added_give_the_clean_dataset(tmp_path, bundle, fmnist, ray_local, kind):
    images, labels = fmnist
    data, out = tmp_path / "data", tmp_path / "tokens"
    data.mkdir()

    def put(name: str, lo: int, hi: int) -> None:
        if kind == "parquet":
            t = pa.table({"key": [f"{name}-{i}" for i in range(lo, hi)],
                          "image": [png_bytes(images[i]) for i in range(lo, hi)],
                          "label": pa.array(labels[lo:hi].astype(np.int64))})
            pq.write_table(t, data / f"{name}.parquet")
        else:
            body = images[lo:hi].astype(np.uint8)
            header = b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in body.shape)
            (data / f"{name}-images-idx3-ubyte").write_bytes(header + body.tobytes())

    put("a", 0, 50)
    put("b", 50, 100)
    tokenize(bundle, str(data), out, verbose=False)
    put("b", 200, 260)  # rewritten with other images
    put("c", 300, 320)  # added
    r = tokenize(bundle, str(data), out, verbose=False)
    assert r.units_run == 2 and len(r.plan.changed) == 1
    clean_equals(bundle, str(data), out, tmp_path)


# ----------------------------------------------------------------------------------------------
# Readers outside vqtok: the committed-parts listing, with a crashed run's orphan part present
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def dataset_with_orphan(tmp_path) -> Path:
    m, us = meta(), units(3)
    write(tmp_path, m, us)
    orphan = tmp_path / fmt.part_name(7, "deadbeef")
    shutil.copy(TokenDataset(tmp_path).files()[0], orphan)  # a valid Parquet file nobody committed
    return tmp_path


def test_ray_data_reads_exactly_the_committed_rows_from_the_listing(dataset_with_orphan, ray_local):
    import ray

    ds = TokenDataset(dataset_with_orphan)
    table = pa.concat_tables(ray.get(ray.data.read_parquet(ds.urls()).to_arrow_refs()))
    assert table.num_rows == ds.num_rows == 9
    assert sorted(table.column("key").to_pylist()) == sorted(ds.to_table().column("key").to_pylist())
    # the directory itself would also take the orphan
    assert ray.data.read_parquet(str(dataset_with_orphan)).count() == 12


def test_hugging_face_datasets_reads_exactly_the_committed_rows_from_the_listing(dataset_with_orphan, tmp_path_factory):
    import datasets

    cli = subprocess.run([str(Path(sys.executable).with_name("vqtok")), "inspect", str(dataset_with_orphan), "--files"],
                         capture_output=True, text=True, check=True)
    files = cli.stdout.split()
    assert files == TokenDataset(dataset_with_orphan).urls() and len(files) == 3
    hf = datasets.load_dataset("parquet", data_files=files, split="train",
                               cache_dir=str(tmp_path_factory.mktemp("hf-cache")))
    ours = TokenDataset(dataset_with_orphan).to_table()
    assert hf.num_rows == 9 and hf["key"] == ours.column("key").to_pylist()
    assert hf["tokens"] == ours.column("tokens").to_pylist()
