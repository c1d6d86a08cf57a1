"""Captions and source metadata through `vqtok tokenize` (pipeline/captions.py): exact from WebDataset
shards, Parquet files and image folders; odd captions cost no image and are counted and recorded;
an edited caption is redone; a dataset written before captions continues."""
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, run_cli, write_tar
from vqtok import TokenDataset, tokenize
from vqtok.models.config import ConfigError
from vqtok.pipeline.captions import MAX_CAPTION_BYTES, TextFields, clean_caption, clean_meta
from vqtok.pipeline.sources import iter_unit, list_units

ODD = [
    "a red dress, photographed on a white background",
    "  two spaces before,\ttab inside, and a\nnewline  ",
    "ünïcödé — 東京の夜景 🌃",
    "ends with a backslash \\",
]


def _images(fmnist, n, start=0):
    images, labels = fmnist
    return [png_bytes(images[start + i]) for i in range(n)], [int(v) for v in labels[start:start + n]]


def _errors(out) -> list[dict]:
    lines = []
    for name in sorted(os.listdir(out / "_errors")) if (out / "_errors").exists() else []:
        lines += [json.loads(x) for x in (out / "_errors" / name).read_text().splitlines()]
    return lines


def _captions(out) -> dict:
    t = TokenDataset(out).to_table(["key", "caption"])
    return dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist()))


# --- the cleaning rules, one by one -----------------------------------------------------------
@pytest.mark.parametrize("raw, caption, note, kept", [
    (b"a shirt", "a shirt", None, True),
    ("a shirt", "a shirt", None, True),
    (b"a shirt\n", "a shirt", None, True),  # one trailing line end is not part of the caption
    (b"a shirt\r\n", "a shirt", None, True),
    (b"a shirt\n\n", "a shirt\n", None, True),  # only one
    (b"\xef\xbb\xbfa shirt", "a shirt", None, True),  # a UTF-8 byte-order mark
    (b"two\r\nlines", "two\nlines", None, True),
    ("  spaced\tout  ", "  spaced\tout  ", None, True),  # no stripping
    (None, None, None, False),  # missing: only counted
    (b"", None, "empty caption", False),
    (b"   \n", None, "empty caption", False),
    (b"caf\xe9 au lait", "caf\ufffd au lait", "not UTF-8 (1 bad bytes written as U+FFFD)", True),
    (b"bell\x07 and nul\x00", "bell  and nul ", "2 control characters replaced by spaces", True),
    (7, "7", "a int value, not text: written as text", True),
    (["a", "b"], '["a", "b"]', "a list value, not text: written as JSON", True),
])
def test_clean_caption_rules(raw, caption, note, kept):
    assert clean_caption(raw) == (caption, note, kept)


def test_long_captions_are_cut_at_a_character_boundary():
    text = "é" * 3000  # 6,000 bytes
    caption, note, kept = clean_caption(text.encode(), max_bytes=MAX_CAPTION_BYTES)
    assert kept and caption == "é" * 2048 and len(caption.encode()) == 4096
    assert note == "6,000 bytes, cut to 4,096 (--max-caption-bytes 4096)"
    caption, _, _ = clean_caption("ab" + "é" * 10, max_bytes=5)
    assert caption == "abé"  # 4 bytes: the next "é" would cross the cut


def test_clean_meta_keeps_named_fields_or_all():
    raw = json.dumps({"url": "http://x/1.jpg", "original_width": 640, "sha256": "ab"}).encode()
    assert clean_meta(raw, TextFields()) == (None, None)
    assert clean_meta(raw, TextFields(keep_columns=("url", "absent"))) == ('{"url":"http://x/1.jpg"}', None)
    assert json.loads(clean_meta(raw, TextFields(keep_columns=("*",)))[0]) == json.loads(raw)
    assert clean_meta(b"{not json", TextFields(keep_columns=("*",)))[0] is None
    assert "not a JSON object" in clean_meta(b"[1, 2]", TextFields(keep_columns=("*",)))[1]


# --- the three sources, end to end ------------------------------------------------------------
def test_webdataset_captions_and_metadata_are_exact(tmp_path, fmnist, bundle, ray_local):
    imgs, _ = _images(fmnist, 6)
    members = []
    for i, img in enumerate(imgs):
        members.append((f"{i:04d}.png", img))
        if i < len(ODD):
            members.append((f"{i:04d}.txt", ODD[i].encode()))
        if i == 4:
            members.append((f"{i:04d}.caption", b"from a .caption member"))
        members.append((f"{i:04d}.json", json.dumps({"url": f"http://example.com/{i}.png", "original_width": 28 + i,
                                                      "status": "success"}).encode()))
    write_tar(tmp_path / "shard-0.tar", members)
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(tmp_path / "shard-0.tar"), out, verbose=False, keep_columns=["url", "original_width"])
    assert _captions(out) == {"0000": ODD[0], "0001": ODD[1], "0002": ODD[2], "0003": ODD[3],
                              "0004": "from a .caption member", "0005": None}
    t = TokenDataset(out).to_table(["key", "meta"])
    assert [json.loads(m) for m in t.column("meta").to_pylist()] == [
        {"url": f"http://example.com/{i}.png", "original_width": 28 + i} for i in range(6)]
    assert r.captions == {"rows": 6, "captioned": 5, "repaired": 0, "unusable": 0, "missing": 1, "before_captions": 0}
    assert _errors(out) == []  # a missing caption is only counted


def test_parquet_captions_by_name_any_case_or_named_column(tmp_path, fmnist, bundle, ray_local):
    imgs, labels = _images(fmnist, 4)
    table = pa.table({"image": imgs, "TEXT": ["one", None, "three", "four"], "alt": ["w", "x", "y", "z"],
                      "similarity": [0.31, 0.29, 0.4, 0.5], "label": labels})
    pq.write_table(table, tmp_path / "laion.parquet")
    out = tmp_path / "tokens"
    tokenize(bundle, str(tmp_path / "laion.parquet"), out, verbose=False, keep_columns=["similarity"])
    assert list(_captions(out).values()) == ["one", None, "three", "four"]
    metas = TokenDataset(out).to_table(["meta"]).column("meta").to_pylist()
    assert [json.loads(m)["similarity"] for m in metas] == [0.31, 0.29, 0.4, 0.5]
    out2 = tmp_path / "tokens-alt"
    tokenize(bundle, str(tmp_path / "laion.parquet"), out2, verbose=False, caption_column="alt")
    assert list(_captions(out2).values()) == ["w", "x", "y", "z"]
    assert TokenDataset(out2).to_table(["meta"]).column("meta").null_count == 4  # nothing asked to be kept


def test_parquet_non_string_captions_are_repaired_and_recorded(tmp_path, fmnist, bundle, ray_local):
    imgs, _ = _images(fmnist, 3)
    pq.write_table(pa.table({"image": imgs, "caption": pa.array([1, None, 3], pa.int64())}), tmp_path / "c.parquet")
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(tmp_path / "c.parquet"), out, verbose=False)
    assert list(_captions(out).values()) == ["1", None, "3"]
    assert (r.captions["repaired"], r.captions["missing"], r.failures, r.rows) == (2, 1, 0, 3)
    assert [(e["kind"], e["written"]) for e in _errors(out)] == [("caption", "repaired")] * 2


def test_folder_sidecars_and_odd_captions_cost_no_image(tmp_path, fmnist, bundle, ray_local):
    imgs, _ = _images(fmnist, 8)
    folder = tmp_path / "folder"
    folder.mkdir()
    sidecars = {0: b"plain caption", 1: b"caf\xe9", 2: b"", 3: "x" * 5000, 4: b"ctrl\x1b[0m", 6: ODD[2].encode()}
    for i, img in enumerate(imgs):
        (folder / f"img{i}.png").write_bytes(img)
        if i in sidecars:
            data = sidecars[i]
            (folder / f"img{i}.txt").write_bytes(data if isinstance(data, bytes) else data.encode())
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(folder), out, verbose=False)
    caps = _captions(out)
    assert r.rows == 8 and r.failures == 0  # every image has its row
    assert caps["img0"] == "plain caption" and caps["img6"] == ODD[2]
    assert caps["img1"] == "caf\ufffd" and caps["img2"] is None and caps["img3"] == "x" * 4096
    assert caps["img4"] == "ctrl [0m" and caps["img5"] is None and caps["img7"] is None
    assert r.captions == {"rows": 8, "captioned": 5, "repaired": 3, "unusable": 1, "missing": 2, "before_captions": 0}
    errs = {e["key"]: e for e in _errors(out)}
    assert set(errs) == {"img1", "img2", "img3", "img4"}
    assert all(e["kind"] == "caption" for e in errs.values()) and errs["img2"]["written"] == "null"
    assert TokenDataset(out).failures == 0  # caption records are not failed images


def test_editing_a_caption_redoes_its_unit_only(tmp_path, fmnist, bundle, ray_local):
    imgs, _ = _images(fmnist, 4)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, img in enumerate(imgs):
        (folder / f"img{i}.png").write_bytes(img)
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "tokens"
    tokenize(bundle, str(folder), out, verbose=False, folder_unit_size=1)  # one unit per file
    before = {p.unit: p.name for p in TokenDataset(out).parts}
    time.sleep(0.01)
    (folder / "img2.txt").write_text("caption two, edited")
    os.utime(folder / "img2.txt", (time.time() + 5, time.time() + 5))
    r = tokenize(bundle, str(folder), out, verbose=False, folder_unit_size=1)
    assert len(r.plan.changed) == 1 and r.units_run == 1
    assert _captions(out)["img2"] == "caption two, edited"
    after = {p.unit: p.name for p in TokenDataset(out).parts}
    assert sum(before[u] != after[u] for u in before) == 1
    # a tar shard's caption member is part of the shard: rewriting the shard redoes it (its stamp)
    tar = tmp_path / "s.tar"
    write_tar(tar, [("0.png", imgs[0]), ("0.txt", b"before")])
    tokenize(bundle, str(tar), tmp_path / "t2", verbose=False)
    write_tar(tar, [("0.png", imgs[0]), ("0.txt", b"after!")])  # same size
    os.utime(tar, (time.time() + 5, time.time() + 5))
    tokenize(bundle, str(tar), tmp_path / "t2", verbose=False)
    assert _captions(tmp_path / "t2") == {"0": "after!"}


def test_a_folder_without_sidecars_keeps_its_signature(tmp_path, fmnist):
    """Units listed before sidecars existed keep their signatures, so their datasets are not redone."""
    from vqtok.pipeline.sources import _signature, _stamp

    imgs, _ = _images(fmnist, 3)
    folder = tmp_path / "f"
    folder.mkdir()
    for i, img in enumerate(imgs):
        (folder / f"{i}.png").write_bytes(img)
    (unit,) = list_units(str(folder))
    files = sorted(folder.glob("*.png"))
    stamps = [_stamp({"size": f.stat().st_size, "mtime": f.stat().st_mtime}) for f in files]
    assert unit.signature == _signature([f.name for f in files], stamps, [None] * 3)  # the old formula
    (folder / "1.txt").write_text("now with a caption")
    (unit2,) = list_units(str(folder))
    assert unit2.signature != unit.signature and unit2.captions == ("", str(folder / "1.txt"), "")
    assert [s.caption for s in iter_unit(unit2, print)] == [None, b"now with a caption", None]


def test_changed_text_options_are_refused_by_name(tmp_path, fmnist, bundle, ray_local):
    imgs, _ = _images(fmnist, 2)
    write_tar(tmp_path / "s.tar", [("0.png", imgs[0]), ("0.txt", b"a"), ("1.png", imgs[1])])
    out = tmp_path / "tokens"
    tokenize(bundle, str(tmp_path / "s.tar"), out, verbose=False)
    with pytest.raises(ConfigError) as e:
        tokenize(bundle, str(tmp_path / "s.tar"), out, verbose=False, keep_columns=["url"])
    msg = str(e.value)
    assert "kept metadata none" in msg and "kept metadata url" in msg and "--keep-columns" in msg
    assert "tokenizer" not in msg.split(":")[0]


def test_inspect_shows_captions(tmp_path, fmnist, bundle, ray_local):
    imgs, _ = _images(fmnist, 3)
    write_tar(tmp_path / "s.tar", [("0.png", imgs[0]), ("0.txt", "a dark shirt".encode()), ("1.png", imgs[1]),
                                   ("2.png", imgs[2]), ("2.txt", b"")])
    out = tmp_path / "tokens"
    tokenize(bundle, str(tmp_path / "s.tar"), out, verbose=False)
    text = TokenDataset(out).describe(rows=3)
    assert "captions: 1 of 3 rows (1 unusable, null; 1 with none in the source)" in text
    assert "caption 'a dark shirt'" in text and "caption None" in text
    p = run_cli("inspect", str(out), "--rows", "1")
    assert p.returncode == 0 and "captions: 1 of 3 rows" in p.stdout and "'a dark shirt'" in p.stdout


def test_convert_keeps_sidecar_captions(tmp_path, fmnist):
    from vqtok import convert

    imgs, _ = _images(fmnist, 3)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, img in enumerate(imgs):
        (folder / f"img{i}.png").write_bytes(img)
    (folder / "img0.txt").write_bytes(ODD[1].encode())
    (folder / "img1.json").write_text('{"url": "http://x"}')
    res = convert(str(folder), str(tmp_path / "shards"), verbose=False)
    (unit,) = list_units(res.shards)
    got = {s.key: (s.caption, s.meta) for s in iter_unit(unit, print)}
    assert got == {"img0": (ODD[1].encode(), None), "img1": (None, b'{"url": "http://x"}'), "img2": (None, None)}


def test_old_parts_read_null_captions(tmp_path):
    from pathlib import Path
    import shutil

    src = Path(__file__).parent / "fixtures" / "tokens-v1" / "tokens"
    shutil.copytree(src, tmp_path / "old")
    ds = TokenDataset(tmp_path / "old")
    t = ds.to_table()
    assert t.column("caption").null_count == t.num_rows == 40 and "meta" in t.column_names
    assert ds.to_table(["caption"]).num_rows == 40
    assert all(b.column(b.schema.get_field_index("caption")).null_count == len(b) for b in ds.iter_batches(7))
    assert ds.caption_counts()["before_captions"] == 40
    assert "40 in parts written before captions" in ds.describe()
    assert np.array_equal(ds.to_numpy()[0], TokenDataset(src).to_numpy()[0])
