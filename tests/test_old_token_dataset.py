"""A token dataset written by vqtok before issue 21 (commit 28dafdb: one token_dataset.py, the old
row protocol between the tokenize stages) still loads, today's code gives byte-identical parts for
the same inputs, and a re-run into it continues it (tests/fixtures/tokens-v1, made by its
make_fixture.py)."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import png_bytes, write_tar
from vqtok import TokenDataset, tokenize

FIXTURE = Path(__file__).parent / "fixtures" / "tokens-v1"
BUNDLE = Path(__file__).parent / "fixtures" / "bundle-conv-v1" / "tokenizer"
sys.path.insert(0, str(FIXTURE))
from make_fixture import MTIME, write_shards  # noqa: E402


@pytest.fixture
def shards(tmp_path, fmnist):
    folder = tmp_path / "shards"
    write_shards(folder, *fmnist)
    for old in sorted((FIXTURE / "shards").glob("*.tar")):  # the same inputs, rebuilt byte for byte
        assert (folder / old.name).read_bytes() == old.read_bytes()
    return folder


def test_an_old_token_dataset_loads_with_its_rows_and_failures(tmp_path):
    ds = TokenDataset(FIXTURE / "tokens")
    assert (ds.num_rows, len(ds.parts), ds.failures, ds.grid, ds.codebook_size) == (40, 2, 1, (7, 7), 32)
    tokens, labels = ds.to_numpy()
    assert tokens.shape == (40, 7, 7) and (labels >= 0).all()


def test_todays_tokenize_writes_the_old_datasets_rows(tmp_path, shards, ray_local):
    """Every column but `source` (the input's URL, elsewhere here) equal, schema and metadata included
    (but for what schema_version 2 added: the caption and meta columns, null in both, and the text
    options)."""
    new = tmp_path / "new"
    tokenize(BUNDLE, str(shards), new, batch_size=8, verbose=False)
    old, now = TokenDataset(FIXTURE / "tokens"), TokenDataset(new)
    assert [(p.unit.rsplit("/", 1)[1], p.rows) for p in now.parts] == [(p.unit.rsplit("/", 1)[1], p.rows) for p in old.parts]
    a, b = old.to_table().drop_columns(["source"]), now.to_table().drop_columns(["source"])
    assert a.equals(b)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("vqtok_version", "schema_version", "text")}  # noqa: E731
    assert drop(old.metadata) == drop(now.metadata)
    assert (old.metadata["schema_version"], now.metadata["schema_version"]) == (1, 2)
    assert a.column("caption").null_count == b.column("caption").null_count == a.num_rows
    assert old.tokenizer_id == now.tokenizer_id and now.failures == old.failures == 1


def test_a_rerun_into_an_old_dataset_continues_it(tmp_path, shards, fmnist, ray_local):
    images, labels = fmnist
    out = tmp_path / "old"
    shutil.copytree(FIXTURE / "tokens", out)
    before = {p.name: p.sha256 for p in TokenDataset(out).parts}
    # the recorded units are the fixture's paths; these copies are the same inputs elsewhere, so the
    # old units are "no longer among the inputs" and kept, and the copies are new units
    r = tokenize(BUNDLE, str(shards), out, batch_size=8, verbose=False, removed_inputs="keep")
    assert (r.units_run, len(r.plan.kept)) == (2, 2)
    # in place (the fixture's own shard paths, mtimes as recorded): nothing to redo, a new unit appended
    out2 = tmp_path / "in-place"
    shutil.copytree(FIXTURE / "tokens", out2)
    data = tmp_path / "fixture-shards"
    shutil.copytree(FIXTURE / "shards", data)
    for tar in data.glob("*.tar"):
        os.utime(tar, (MTIME, MTIME))
    _retarget(out2, data)
    r = tokenize(BUNDLE, str(data), out2, batch_size=8, verbose=False)
    assert (r.units_run, r.units_skipped, r.rows) == (0, 2, 40)
    assert len(r.plan.uncaptioned) == 2  # said plainly: their rows read with null captions
    members = [(f"n{i:02d}.png", png_bytes(images[40 + i])) for i in range(5)] + [("n00.txt", b"a new caption")]
    write_tar(data / "shard-0002.tar", sorted(members))
    r = tokenize(BUNDLE, str(data), out2, batch_size=8, verbose=False)
    assert (r.units_run, r.units_skipped, r.rows) == (1, 2, 45)
    assert r.captions == {"rows": 45, "captioned": 1, "repaired": 0, "unusable": 0, "missing": 4, "before_captions": 40}
    assert TokenDataset(out2).to_table(["key", "caption"]).to_pylist()[40] == {"key": "n00", "caption": "a new caption"}
    assert {p.name: p.sha256 for p in TokenDataset(out2).parts if p.name in before} == before
    assert before  # the old parts are still there, untouched


def _retarget(dataset: Path, inputs: Path) -> None:
    """Point a copied dataset's recorded unit URLs (where make_fixture.py ran) at a copy of its inputs,
    as if the inputs had always been there: the manifest is plain JSON."""
    m = dataset / "_manifest.json"
    manifest = json.loads(m.read_text())
    (recorded,) = {str(Path(u).parent) for u in manifest["units"]}
    m.write_text(m.read_text().replace(recorded, str(inputs)))
