"""Real captions: the shipped openclipart sample (examples/openclipart-sample: 96 public-domain drawings
with their authors' titles, noisy as web captions are) through `vqtok tokenize` as img2dataset-style
shards and as a LAION-style Parquet file, then `vqtok train-text-tokenizer` on those captions.

A caption is the title exactly; the only exceptions are the ones pipeline/captions.py documents:
an empty title gives null (unusable, recorded) and the C1 control characters of the one cp1252
title become spaces (repaired, recorded). Spaces at either end and the doubly escaped entities
(`L&Atilde;&copy;zard`) are kept as they are."""
from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from vqtok import TokenDataset, tokenize, train_text_tokenizer
from vqtok.models.text_tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "openclipart-sample"
C1 = re.compile(r"[\x80-\x9f]")


@pytest.fixture(scope="module")
def index() -> dict:
    return json.loads((SAMPLE / "index.json").read_text())


@pytest.fixture(scope="module")
def titles(index) -> dict:
    return {r["key"]: r["title"] for r in index["rows"]}


@pytest.fixture(scope="module")
def shard_json() -> dict:
    """key -> the KEY.json member of the shipped shards."""
    out = {}
    for tar in sorted((SAMPLE / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[:-5]] = json.loads(tf.extractfile(m).read())
    return out


@pytest.fixture(scope="module")
def from_shards(tmp_path_factory, bundle, ray_local):
    out = tmp_path_factory.mktemp("real") / "shards-tokens"
    r = tokenize(bundle, str(SAMPLE / "shards"), str(out), keep_columns=["url", "keywords"], verbose=False)
    return out, r


@pytest.fixture(scope="module")
def from_parquet(tmp_path_factory, bundle, ray_local):
    out = tmp_path_factory.mktemp("real") / "parquet-tokens"
    r = tokenize(bundle, str(SAMPLE / "openclipart.parquet"), str(out), keep_columns=["similarity", "uid"],
                 verbose=False)
    return out, r


def _rows(out) -> dict:
    t = TokenDataset(out).to_table(["key", "caption", "meta"])
    return {k: (c, m) for k, c, m in zip(*(t.column(n).to_pylist() for n in ("key", "caption", "meta")))}


def _errors(out) -> list[dict]:
    lines = []
    for f in sorted((Path(out) / "_errors").glob("*")):
        lines += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return lines


def _expected(titles: dict) -> tuple[dict, set, set]:
    """key -> the caption vqtok must write; the keys of empty and of repaired titles."""
    empty = {k for k, t in titles.items() if not (t or "").strip()}
    repaired = {k for k, t in titles.items() if k not in empty and C1.search(t)}
    want = {k: None if k in empty else C1.sub(" ", t) if k in repaired else t for k, t in titles.items()}
    return want, empty, repaired


def test_the_sample_is_what_its_readme_says(index, titles):
    _, empty, repaired = _expected(titles)
    assert index["count"] == len(titles) == 96 and index["size"] == 32
    assert (len(empty), len(repaired)) == (8, 1)
    assert sum(t != t.strip() for t in titles.values() if t and t.strip()) == 7  # spaces at an end, kept
    assert "L&Atilde;&copy;zard" in titles.values()  # escaped twice in the SVG: kept as written
    total = sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file())
    assert total < 1_000_000, total


@pytest.mark.skipif(not Path("/usr/share/openclipart/svg").is_dir(), reason="openclipart-svg is not installed")
def test_titles_are_the_svgs_own(index):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_captioned_sample import read_svg

    for r in index["rows"]:
        assert read_svg(Path(r["url"]))["title"] == r["title"], r["url"]


def test_shard_captions_are_the_titles_and_metadata_survives(from_shards, titles, shard_json):
    out, r = from_shards
    want, empty, repaired = _expected(titles)
    rows = _rows(out)
    assert set(rows) == set(titles) and r.rows == 96 and r.failures == 0
    exact = [k for k in titles if k not in empty | repaired]
    assert len(exact) == 87
    for k in exact:
        assert rows[k][0] == titles[k], k  # the title exactly, spaces and entities included
    for k in empty | repaired:
        assert rows[k][0] == want[k], k
    assert r.captions == {"rows": 96, "captioned": 88, "repaired": 1, "unusable": 8, "missing": 0,
                          "before_captions": 0}
    for k, (_, meta) in rows.items():
        assert json.loads(meta) == {"url": shard_json[k]["url"], "keywords": shard_json[k]["keywords"]}, k
    notes = {e["key"]: e for e in _errors(out) if e.get("kind") == "caption"}
    assert set(notes) == empty | repaired
    assert {notes[k]["written"] for k in repaired} == {"repaired"}
    assert {notes[k]["written"] for k in empty} == {"null"}


def test_parquet_captions_are_the_titles_and_metadata_survives(from_parquet, from_shards, titles):
    out, r = from_parquet
    want, _, _ = _expected(titles)
    rows = _rows(out)
    assert set(rows) == set(titles) and r.rows == 96 and r.failures == 0
    assert {k: c for k, (c, _) in rows.items()} == want
    assert r.captions["captioned"] == 88 and r.captions["unusable"] == 8 and r.captions["repaired"] == 1
    src = pq.read_table(SAMPLE / "openclipart.parquet", columns=["key", "similarity", "uid"]).to_pylist()
    for s in src:
        assert json.loads(rows[s["key"]][1]) == {"similarity": s["similarity"], "uid": s["uid"]}
    # the same images give the same tokens whichever form they came in
    a = TokenDataset(from_shards[0]).to_table(["key", "tokens"]).sort_by("key")
    b = TokenDataset(out).to_table(["key", "tokens"]).sort_by("key")
    assert a.column("tokens").to_pylist() == b.column("tokens").to_pylist()


def test_trained_text_tokenizer_round_trips_every_caption(from_shards, tmp_path, titles):
    out, _ = from_shards
    r = train_text_tokenizer(str(out), 400, str(tmp_path / "text.json"))
    assert (r.captions, r.null_captions, r.not_round_trip) == (88, 8, 0)
    assert 256 < r.vocab_size <= 400 and os.path.getsize(tmp_path / "text.json") > 0
    text = TextTokenizer.load(str(tmp_path / "text.json"))
    assert text.id == r.id
    captions = [c for c, _ in _rows(out).values() if c is not None]
    assert len(captions) == 88
    for c in captions:
        assert text.decode(text.encode(c)) == c, c
