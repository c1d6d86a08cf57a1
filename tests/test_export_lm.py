"""`vqtok export-lm`: a token dataset as rows of text and image ids in one vocabulary
(jobs/export_lm.py, pipeline/lm_export.py). Real Ray (`ray_local`), real files, real readers.

Most tests export small token datasets written with the real TokenWriter (synthetic codes and
captions: many parts in a second); the first ones go through `vqtok tokenize` on real captioned
WebDataset shards."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as HFTokenizer

from conftest import kill_group, png_bytes, run_cli, write_tar
from vqtok import ConfigError, DataError, TokenDataset, Vocabulary, export_lm, tokenize
from vqtok.models.text_tokenizer import TextTokenizer, train_bpe
from vqtok.pipeline import lm_export as lm

CAPTIONS = [
    "a red dress, photographed on a white background",
    "  two spaces before,\ttab inside, and a\nnewline  ",
    "ünïcödé — 東京の夜景 🌃",
    "ends with a backslash \\",
    "a caption with <|endoftext|> and <boi> <img_3> written in it",
    "long " * 60,  # cut by --max-text-tokens
]
WORDS = "a red blue dress shirt photographed on white background with 東京 🌃 long sleeves trouser <eoi>".split()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def make_dataset(path, n_parts: int, rows: int, *, seed: int = 0, start: int = 0, grid=(4, 4), k: int = 64,
                 captions: bool = True, drop: bool = False, signature: str = "s"):
    """A token dataset written by the real TokenWriter: units /in/unit-NNN.tar (start .. start+n_parts),
    random codes, random captions (1 in 10 null) and labels."""
    from vqtok.pipeline import token_format as fmt
    from vqtok.pipeline import token_writer as tw
    from vqtok.pipeline.sources import Unit

    meta = fmt.dataset_metadata(codebook_size=k, tokenizer_id="image-tok", grid=grid, preprocess={"p": 1},
                                vqtok_version="test")
    units = [Unit(url=f"/in/unit-{i:03d}.tar", kind="tar", signature=signature) for i in range(start, start + n_parts)]
    with tw.TokenWriter.open(str(path), meta, units, removed="drop" if drop else "keep") as w:
        for unit, index in w.pending(units):
            rng = np.random.default_rng([seed, int(unit.url[-7:-4])])
            caps = [None if not captions or rng.random() < 0.1 else " ".join(rng.choice(WORDS, rng.integers(1, 40)))
                    for _ in range(rows)]
            keys = [f"{unit.url}/{r}" for r in range(rows)]
            table = fmt.part_table(meta, keys, rng.integers(0, k, (rows, *grid)),
                                   [int(x) for x in rng.integers(0, 10, rows)], unit.url, captions=caps)
            w.commit(unit, index, table, [])
    return Path(path)


def source_rows(tokens) -> dict:
    """key -> (caption, tokens as a flat list, label) of a token dataset."""
    ds = TokenDataset(tokens)
    t = ds.to_table(["key", "caption", "label"])
    grids = ds.to_numpy()[0].reshape(t.num_rows, -1)
    return {k: (c, g.tolist(), lab) for k, c, g, lab in zip(t.column("key").to_pylist(), t.column("caption").to_pylist(),
                                                            grids, t.column("label").to_pylist())}


def export_table(out) -> pa.Table:
    files = sorted((Path(out) / "data").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def tree(out) -> dict:
    """relative path -> sha256 of every file under out."""
    out = Path(out)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def mtimes(out) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(Path(out).rglob("*")) if p.is_file()}


def check_decodes(out, tokens, text: TextTokenizer, order: str, normalise=lambda c: c):
    """Every row decodes through out/tokenizer.json to its caption (cut as the export cuts) and its
    image's exact tokens, and is exactly Vocabulary.sequence of them."""
    layout = json.loads((Path(out) / "layout.json").read_text())
    vocab = Vocabulary.from_dict(layout)
    tok = HFTokenizer.from_file(str(Path(out) / "tokenizer.json"))
    src = source_rows(tokens)
    t = export_table(out)
    rows = t.to_pylist()
    orders = ["text-first", "image-first"] if order == "both" else [order]
    assert len(rows) == len(src) * len(orders)
    want_order = [o for _ in src for o in orders]
    assert [r["order"] for r in rows] == want_order
    for r in rows:
        caption, grid, label = src[r["key"]]
        ids = text.encode(caption) if caption is not None else []
        kept = ids[: vocab.max_text_tokens]
        assert r["input_ids"] == vocab.sequence(kept, grid, r["order"]).tolist()
        assert r["text_tokens"] == len(kept) and r["caption_cut"] == (len(ids) > vocab.max_text_tokens)
        assert r["label"] == label
        if len(ids) <= vocab.max_text_tokens:  # a cut caption decodes to its first ids' text
            assert tok.decode(r["input_ids"], skip_special_tokens=True) == normalise(caption or "")
        names = [tok.id_to_token(i) for i in r["input_ids"]]
        assert [int(n[5:-1]) for n in names if n.startswith("<img_")] == grid
        assert names[0] == "<bos>" and names.count("<boi>") == 1 and names.count("<eoi>") == 1
        parsed = vocab.parse(r["input_ids"])
        assert parsed.ok and parsed.order == r["order"] and parsed.tokens.reshape(-1).tolist() == grid
    return rows


# ----------------------------------------------------------------------------------------------
# Through vqtok tokenize: real shards with captions
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioned(tmp_path_factory, fmnist, bundle):
    images, _ = fmnist
    folder = tmp_path_factory.mktemp("captioned")
    for s in range(2):
        members = []
        for i in range(s * 8, s * 8 + 8):
            members.append((f"img{i:04d}.png", png_bytes(images[i])))
            if i != 5:  # one image without a caption
                members.append((f"img{i:04d}.txt", CAPTIONS[i % len(CAPTIONS)].encode()))
        write_tar(folder / f"shard-{s}.tar", members)
    out = folder / "tokens"
    tokenize(bundle, str(folder / "shard-*.tar"), out, verbose=False)
    assert TokenDataset(out).caption_counts()["captioned"] == 15
    return out


@pytest.mark.parametrize("order", ["text-first", "image-first", "both"])
def test_rows_decode_to_the_caption_and_the_exact_tokens_bytes(tmp_path, captioned, ray_local, order):
    r = export_lm(captioned, "bytes", tmp_path / "export", order=order, max_text_tokens=200, verbose=False)
    text = TextTokenizer.load("bytes")
    rows = check_decodes(tmp_path / "export", captioned, text, order)
    assert r.complete and r.images == 16 and r.samples == len(rows) == r.rows
    # img0005 has no caption (the empty caption); img0011's "long " * 60 is 300 bytes: cut at 200
    assert r.empty_captions == 1 and r.captions_cut == 1
    assert sum(row["caption_cut"] for row in rows) == (2 if order == "both" else 1)
    # the export directory is what decode_sequence reads (layout.json + tokenizer.json)
    from vqtok.jobs.decode_sequence import load_layout

    layout = load_layout(str(tmp_path / "export"))
    assert layout.vocab == Vocabulary.from_dict(r.layout)
    ds = TokenDataset(captioned)
    assert layout.vocab.grid == ds.grid and layout.vocab.image_tokenizer_id == ds.tokenizer_id


def test_rows_decode_exactly_with_a_trained_bpe(tmp_path, captioned, ray_local):
    bpe = train_bpe(iter(CAPTIONS * 20), 300)
    path = tmp_path / "bpe.json"
    path.write_text(bpe.to_str())
    text = TextTokenizer.load(str(path))
    assert text.vocab_size > 256  # merges were learned
    r = export_lm(captioned, str(path), tmp_path / "export", max_text_tokens=1000, verbose=False)
    check_decodes(tmp_path / "export", captioned, text, "text-first")
    assert r.layout["text_tokenizer_id"] == text.id and r.captions_cut == 0
    meta = json.loads(pq.read_schema(sorted((tmp_path / "export" / "data").glob("*.parquet"))[0]).metadata[b"vqtok"])
    assert meta["layout"]["text_tokenizer_id"] == text.id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_rows_decode_with_an_llm_style_tokenizer_as_it_normalises(tmp_path, captioned, ray_local):
    """A tokenizer.json built like an LLM's: a lowercasing normaliser (CLIP's), its own special token
    above its vocabulary and a post-processor that would add it; the export adds none of it."""
    from tokenizers import AddedToken, normalizers, processors

    tok = train_bpe(iter(CAPTIONS * 20), 300)
    tok.normalizer = normalizers.Lowercase()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)])
    path = tmp_path / "llm" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(tok.to_str())
    text = TextTokenizer.load(str(path.parent))  # a directory holding tokenizer.json
    assert text.vocab_size == eot + 1
    export_lm(captioned, str(path.parent), tmp_path / "export", max_text_tokens=1000, verbose=False)
    rows = check_decodes(tmp_path / "export", captioned, text, "text-first", normalise=str.lower)
    assert all(eot not in r["input_ids"] for r in rows)  # the caption's literal <|endoftext|> is text


# ----------------------------------------------------------------------------------------------
# Readers outside vqtok
# ----------------------------------------------------------------------------------------------
def test_read_by_hugging_face_datasets_ray_data_and_pyarrow(tmp_path, ray_local):
    tokens = make_dataset(tmp_path / "tokens", 3, 50)
    out = tmp_path / "export"
    r = export_lm(tokens, "bytes", out, order="both", verbose=False)
    expected = export_table(out)
    assert expected.num_rows == r.rows == 300
    # pyarrow: the files, and the directory as a dataset
    assert pq.ParquetDataset(str(out / "data")).read().sort_by([("key", "ascending"), ("order", "ascending")]).equals(
        expected.sort_by([("key", "ascending"), ("order", "ascending")]))
    meta = json.loads(pq.read_schema(out / "data" / "part-000000.parquet").metadata[b"vqtok"])
    assert meta["layout"] == r.layout and meta["order"] == "both" and meta["layout"]["grid"] == [4, 4]
    assert meta["layout"]["image_tokenizer_id"] == "image-tok" and meta["layout"]["text_tokenizer_id"] == "bytes-utf8-v1"
    # Ray Data
    got = ray_local.data.read_parquet(str(out / "data")).to_pandas()
    assert sorted(map(tuple, got[["key", "order"]].values.tolist())) == sorted(
        zip(expected.column("key").to_pylist(), expected.column("order").to_pylist()))
    by_key = {(k, o): list(v) for k, o, v in zip(got["key"], got["order"], got["input_ids"])}
    assert all(by_key[(k, o)] == v for k, o, v in zip(*(expected.column(c).to_pylist()
                                                      for c in ("key", "order", "input_ids"))))
    # Hugging Face datasets
    from datasets import load_dataset

    hf = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    assert hf.num_rows == 300 and hf["input_ids"] == expected.column("input_ids").to_pylist()
    assert hf["key"] == expected.column("key").to_pylist()


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["text-first", "both"])
def test_packed_rows_are_exactly_seq_len_and_unpack_to_the_unpacked_rows(tmp_path, ray_local, order):
    tokens = make_dataset(tmp_path / "tokens", 3, 120)
    vocab_len = 3 + 40 + 16 + (1 if order == "both" else 0)  # the longest sample with --max-text-tokens 40
    seq_len = 2 * vocab_len + 7
    plain = export_lm(tokens, "bytes", tmp_path / "plain", order=order, max_text_tokens=40, verbose=False)
    packed = export_lm(tokens, "bytes", tmp_path / "packed", order=order, max_text_tokens=40, pack=seq_len,
                       row_group_rows=50, verbose=False)  # several record batches per part: packing spans them
    pad = Vocabulary.from_dict(packed.layout).pad
    bos = Vocabulary.from_dict(packed.layout).bos
    unpacked = []
    for f in sorted((tmp_path / "packed" / "data").glob("*.parquet")):
        t = pq.read_table(f)
        part_samples = []
        for row in t.to_pylist():
            ids = row["input_ids"]
            assert len(ids) == seq_len
            assert row["starts"][0] == 0 and len(row["keys"]) == len(row["starts"]) == len(row["lengths"])
            end = 0
            for key, o, s, n in zip(row["keys"], row["orders"], row["starts"], row["lengths"]):
                assert s == end and ids[s] == bos  # samples follow each other, each from its own <bos>
                sample = ids[s:s + n]
                assert pad not in sample  # never split: the whole sample is in this row
                part_samples.append((key, o, sample))
                end = s + n
            assert all(i == pad for i in ids[end:])  # only padding after the last sample
            # padding only where the next sample did not fit
            assert ids.count(pad) == seq_len - end
        unpacked += part_samples
        # a row is closed only when its next sample would not fit
        for row, nxt in zip(t.to_pylist(), t.to_pylist()[1:]):
            used = row["starts"][-1] + row["lengths"][-1]
            assert used + nxt["lengths"][0] > seq_len
    plain_rows = export_table(tmp_path / "plain")
    assert unpacked == list(zip(*(plain_rows.column(c).to_pylist() for c in ("key", "order", "input_ids"))))
    assert packed.samples == plain.samples == plain.rows and packed.rows * seq_len == packed.ids
    assert packed.ids - packed.pad_ids == plain.ids
    facts = json.loads((tmp_path / "packed" / "layout.json").read_text())["export"]
    assert facts["pack"] == seq_len and set(facts["columns"]) == {"input_ids", "keys", "orders", "starts", "lengths"}


def test_packer_never_splits_and_pads_exactly():
    p = lm.Packer(10, pad=-1)
    for key, n in [("a", 4), ("b", 4), ("c", 3), ("d", 10), ("e", 1), ("f", 6), ("g", 3), ("h", 2)]:
        p.add(key, "text-first", np.arange(n, dtype=np.int32) + 100)
    p.finish()
    t = p.take().to_pylist()
    assert [r["keys"] for r in t] == [["a", "b"], ["c"], ["d"], ["e", "f", "g"], ["h"]]  # e+f+g fill a row exactly
    assert [r["starts"] for r in t] == [[0, 4], [0], [0], [0, 1, 7], [0]]
    assert [r["lengths"] for r in t] == [[4, 4], [3], [10], [1, 6, 3], [2]]
    assert t[0]["input_ids"] == [100, 101, 102, 103, 100, 101, 102, 103, -1, -1]
    assert t[3]["input_ids"] == [100, 100, 101, 102, 103, 104, 105, 100, 101, 102]
    assert t[4]["input_ids"] == [100, 101] + [-1] * 8
    with pytest.raises(DataError, match=r"sample 'x' \(text-first\) is 11 ids, longer than --pack 10"):
        p.add("x", "text-first", np.zeros(11, np.int32))


# ----------------------------------------------------------------------------------------------
# Exactly once: kill and re-run, re-run with nothing to do, a dataset that grew, workers
# ----------------------------------------------------------------------------------------------
def test_killed_and_rerun_equals_a_clean_export_byte_for_byte(tmp_path, ray_local):
    tokens = make_dataset(tmp_path / "tokens", 30, 2000)
    export_lm(tokens, "bytes", tmp_path / "clean", order="both", verbose=False)
    clean = tree(tmp_path / "clean")
    out = tmp_path / "killed"
    exe = Path(sys.executable).with_name("vqtok")
    p = subprocess.Popen([str(exe), "export-lm", "--tokens", str(tokens), "--text-tokenizer", "bytes", "--out", str(out),
                          "--order", "both", "--progress-seconds", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                         start_new_session=True)
    def recorded() -> int:
        try:
            return len(json.loads((out / "_export.json").read_text())["parts"])
        except (FileNotFoundError, ValueError):
            return 0

    try:
        t0 = time.time()
        # Kill at the manifest's first record: the driver records the first finished part at once, then at
        # most every MANIFEST_EVERY seconds, by which time a fast machine has written all 30 parts.
        while recorded() < 1:
            assert p.poll() is None, p.stdout.read()
            assert time.time() - t0 < 180, "the export wrote no parts in time"
            time.sleep(0.005)
        # then, where the machine allows, one part more on disk than on record (a part the rerun must redo)
        t1 = time.time()
        while len(list((out / "data").glob("*.parquet"))) < 2 and time.time() - t1 < 1.0:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        kill_group(p)
    manifest = json.loads((out / "_export.json").read_text())
    written = len(list((out / "data").glob("*.parquet")))
    done = len(manifest["parts"])
    assert not manifest["complete"] and 1 <= done < 30 and written < 30, "the kill came too late to test anything"
    assert not (out / "layout.json").exists()
    r = run_cli("export-lm", "--tokens", str(tokens), "--text-tokenizer", "bytes", "--out", str(out), "--order", "both")
    assert r.returncode == 0, r.stderr
    assert f"{done} already exported, {30 - done} to do" in r.stdout and "complete: 120,000 rows" in r.stdout
    assert tree(out) == clean


def test_rerun_with_nothing_changed_does_nothing(tmp_path, ray_local):
    tokens = make_dataset(tmp_path / "tokens", 3, 30)
    out = tmp_path / "export"
    export_lm(tokens, "bytes", out, verbose=False)
    before = mtimes(out)
    time.sleep(0.01)
    r = export_lm(tokens, "bytes", out, verbose=False)
    assert r.parts_run == 0 and r.parts_skipped == 3 and r.complete and r.rows == 90
    assert mtimes(out) == before
    # a part file deleted (or damaged to another size) is redone, and only it
    (out / "data" / "part-000001.parquet").unlink()
    r = export_lm(tokens, "bytes", out, verbose=False)
    assert r.parts_run == 1 and r.parts_skipped == 2
    after = mtimes(out)
    assert after["data/part-000000.parquet"] == before["data/part-000000.parquet"]
    assert after["data/part-000002.parquet"] == before["data/part-000002.parquet"]


def test_a_dataset_that_gained_a_part_exports_only_that_part(tmp_path, ray_local):
    tokens = make_dataset(tmp_path / "tokens", 3, 40)
    out = tmp_path / "export"
    export_lm(tokens, "bytes", out, pack=200, verbose=False)
    before = mtimes(out)
    make_dataset(tokens, 4, 40)  # unit-003 is new; the others are committed already
    assert len(TokenDataset(tokens).parts) == 4
    r = export_lm(tokens, "bytes", out, pack=200, verbose=False)
    assert (r.parts_run, r.parts_skipped, r.parts) == (1, 3, 4)
    after = mtimes(out)
    assert all(after[f"data/part-00000{i}.parquet"] == before[f"data/part-00000{i}.parquet"] for i in range(3))
    export_lm(tokens, "bytes", tmp_path / "clean", pack=200, verbose=False)
    assert tree(out) == tree(tmp_path / "clean")
    # a source part re-tokenized (its unit's input changed): that part is redone, the others stay
    make_dataset(tokens, 1, 40, start=1, seed=7, signature="edited")
    before = mtimes(out)
    r = export_lm(tokens, "bytes", out, pack=200, verbose=False)
    assert (r.parts_run, r.parts_skipped) == (1, 3)
    after = mtimes(out)
    assert [n for n in before if n.startswith("data/") and after[n] != before[n]] == ["data/part-000001.parquet"]
    export_lm(tokens, "bytes", tmp_path / "clean1", pack=200, verbose=False)
    assert tree(out) == tree(tmp_path / "clean1")
    # parts whose source part is gone are removed (unit-001 is also re-tokenized back: its signature is "s" again)
    make_dataset(tokens, 2, 40, drop=True)
    r = export_lm(tokens, "bytes", out, pack=200, verbose=False)
    assert (r.parts_run, r.parts_removed, r.parts) == (1, 2, 2)
    assert sorted(os.listdir(out / "data")) == ["part-000000.parquet", "part-000001.parquet"]
    export_lm(tokens, "bytes", tmp_path / "clean2", pack=200, verbose=False)
    assert tree(out) == tree(tmp_path / "clean2")


def test_the_same_export_with_one_and_two_workers(tmp_path, ray_local):
    tokens = make_dataset(tmp_path / "tokens", 5, 300)
    export_lm(tokens, "bytes", tmp_path / "one", order="image-first", pack=400, workers=1, verbose=False)
    export_lm(tokens, "bytes", tmp_path / "two", order="image-first", pack=400, workers=2, verbose=False)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


# ----------------------------------------------------------------------------------------------
# Object stores
# ----------------------------------------------------------------------------------------------
def test_export_into_s3_equals_the_local_export(tmp_path, s3_env, ray_local):
    """From a local token dataset into s3:// (a real S3-compatible server). The command runs as a
    process of its own: its Ray's workers must see the server's endpoint in their environment."""
    import fsspec

    tokens = make_dataset(tmp_path / "tokens", 3, 60)
    local = export_lm(tokens, "bytes", tmp_path / "local", order="both", verbose=False)
    url = "s3://vqtok/exports/lm"
    args = ["export-lm", "--tokens", str(tokens), "--text-tokenizer", "bytes", "--out", url, "--order", "both"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "complete: 360 rows" in r.stdout and local.rows == 360
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    got = {p.removeprefix("vqtok/exports/lm/"): hashlib.sha256(fs.cat_file(p)).hexdigest()
           for p in fs.find("vqtok/exports/lm")}
    want = tree(tmp_path / "local")
    assert set(got) == set(want)  # no staging, nothing else
    same = [k for k in want if k.startswith("data/") or k == "tokenizer.json"]
    assert {k: got[k] for k in same} == {k: want[k] for k in same}  # the parts are the same bytes
    got_manifest = json.loads(fs.cat_file("vqtok/exports/lm/_export.json"))
    assert got_manifest["parts"] == json.loads((tmp_path / "local" / "_export.json").read_text())["parts"]
    assert got_manifest["complete"]
    assert pq.read_table("vqtok/exports/lm/data/part-000000.parquet", filesystem=fs).num_rows == 120
    r = run_cli(*args)  # the same command again: nothing to do
    assert r.returncode == 0 and "nothing to do: all 3 parts" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------
# Errors and odd inputs
# ----------------------------------------------------------------------------------------------
def test_bad_options_fail_in_seconds_naming_the_value(tmp_path):
    tokens = make_dataset(tmp_path / "tokens", 1, 5)
    r = run_cli("export-lm", "--tokens", str(tokens), "--text-tokenizer", "bytes", "--out", str(tmp_path / "x"),
                "--order", "sideways")
    assert r.returncode == 2 and "--order 'sideways': expected one of text-first, image-first, both" in r.stderr
    r = run_cli("export-lm", "--tokens", str(tmp_path / "absent"), "--text-tokenizer", "bytes", "--out",
                str(tmp_path / "x"))
    assert r.returncode == 2 and f"--tokens {tmp_path / 'absent'} is not a token dataset" in r.stderr
    with pytest.raises(ConfigError, match=r"--pack 10 is too small: a sample with no caption is already 19 ids"):
        export_lm(tokens, "bytes", tmp_path / "x", pack=10, verbose=False)
    with pytest.raises(ConfigError, match=r"--pack 100 is shorter than the longest sample: 148 ids .* give --pack 148 or "
                                          r"more, or --max-text-tokens 80 or less"):
        export_lm(tokens, "bytes", tmp_path / "x", pack=100, order="both", verbose=False)
    with pytest.raises(ConfigError, match="--pack 0: must be a positive"):
        export_lm(tokens, "bytes", tmp_path / "x", pack=0, verbose=False)
    with pytest.raises(FileNotFoundError, match="--text-tokenizer .*nope.json: no such file"):
        export_lm(tokens, str(tmp_path / "nope.json"), tmp_path / "x", verbose=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*busy exists and holds other files \(notes.txt\)"):
        export_lm(tokens, "bytes", tmp_path / "busy", verbose=False)
    assert not (tmp_path / "x").exists()  # nothing written by a refused run


def test_other_options_into_an_existing_export_are_refused_naming_the_difference(tmp_path, ray_local):
    tokens = make_dataset(tmp_path / "tokens", 2, 10)
    out = tmp_path / "export"
    export_lm(tokens, "bytes", out, verbose=False)
    before = tree(out)
    with pytest.raises(ConfigError, match=r"other options \(--order text-first -> both; --pack none -> 300\).*"
                                          r"export into a new --out, or delete"):
        export_lm(tokens, "bytes", out, order="both", pack=300, verbose=False)
    bpe = tmp_path / "bpe.json"
    bpe.write_text(train_bpe(iter(WORDS * 10), 270).to_str())
    with pytest.raises(ConfigError, match=r"--text-tokenizer \(id\) bytes-utf8-v1 -> sha256:"):
        export_lm(tokens, str(bpe), out, verbose=False)
    assert tree(out) == before


def test_a_dataset_without_captions_exports_empty_captions_and_says_so(tmp_path, ray_local):
    """tokens-v1: a dataset written before captions (its parts have no caption column)."""
    import shutil

    src = Path(__file__).parent / "fixtures" / "tokens-v1" / "tokens"
    shutil.copytree(src, tmp_path / "old")
    out = tmp_path / "export"
    r = run_cli("export-lm", "--tokens", str(tmp_path / "old"), "--text-tokenizer", "bytes", "--out", str(out),
                "--order", "both")
    assert r.returncode == 0, r.stderr
    assert "all 40 images have no caption: every sequence has the empty caption" in r.stdout
    rows = export_table(out).to_pylist()
    vocab = Vocabulary.from_dict(json.loads((out / "layout.json").read_text()))
    grids = TokenDataset(tmp_path / "old").to_numpy()[0].reshape(40, -1)
    assert len(rows) == 80
    for i, row in enumerate(rows):
        assert row["input_ids"] == vocab.sequence([], grids[i // 2], row["order"]).tolist()
    assert rows[0]["input_ids"][:2] == [vocab.bos, vocab.boi]  # text-first, empty caption: the unconditional prefix
    assert rows[1]["input_ids"][-2:] == [vocab.eoi, vocab.eot]
    m = json.loads((out / "_export.json").read_text())
    assert m["complete"] and m["totals"]["empty_captions"] == 40 and m["totals"]["images"] == 40


def test_python_m_entry_point(tmp_path):
    tokens = make_dataset(tmp_path / "tokens", 1, 5)
    r = subprocess.run([sys.executable, "-m", "vqtok.jobs.export_lm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--text-tokenizer" in r.stdout and "--pack SEQ_LEN" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vqtok.jobs.export_lm", "--tokens", str(tokens), "--text-tokenizer",
                        "bytes", "--out", str(tmp_path / "x"), "--max-text-tokens", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--max-text-tokens -1: must be 0" in r.stderr
