"""Corpus sources on real files: WebDataset shards, image folders, IDX; bad inputs reported."""

from pathlib import Path

import tarfile
import numpy as np
import pytest

from conftest import SAMPLE_DIR, SAMPLE_IMAGES, png_bomb_header, png_bytes, write_tar
from vqtok import DataError, Preprocess, convert
from vqtok.models.tokenizer import DecodeError
from vqtok.pipeline.sources import FailureLog, iter_unit, list_units, split_patterns
from vqtok.pipeline.sharded_stream import ImageStream

PRE = Preprocess(image_size=28, channels=1)


def _read_all(data):
    failures = FailureLog(verbose=False)
    stream = ImageStream(list_units(data), PRE, shuffle=False, failures=failures)
    keys, pixels, labels = [], [], []
    for b in stream.batches(100, epochs=1, drop_last=False):
        keys += b.keys
        pixels.append(b.pixels.numpy())
        labels += b.labels
    return keys, np.concatenate(pixels) if pixels else None, labels, failures


def test_split_patterns_keeps_commas_inside_braces():
    assert split_patterns("a-{0,1}.tar,b.tar") == ["a-{0,1}.tar", "b.tar"]
    assert split_patterns(["x.tar", "y-{000..002}.tar, z"]) == ["x.tar", "y-{000..002}.tar", "z"]


def test_idx_directory_is_one_unit_with_labels(fmnist):
    units = list_units(str(SAMPLE_DIR))
    assert [u.kind for u in units] == ["idx"] and units[0].labels_url
    samples = list(iter_unit(units[0], FailureLog().add))
    assert len(samples) == 10_000 and samples[7].label == int(fmnist[1][7])
    assert np.array_equal(samples[7].data, fmnist[0][7])


def test_convert_then_read_shards_round_trip(tmp_path, fmnist):
    res = convert(str(SAMPLE_IMAGES), str(tmp_path / "shards"), shard_size=400, verbose=False)
    assert res.images == 10_000 and len(res.shards) == 25
    # brace pattern, glob and directory all find the same sorted shards
    brace = list_units(str(tmp_path / "shards" / "shard-{000000..000024}.tar"))
    glob = list_units(str(tmp_path / "shards" / "*.tar"))
    folder = list_units(str(tmp_path / "shards"))
    assert [u.url for u in brace] == [u.url for u in glob] == [u.url for u in folder]
    assert len(brace) == 25 and all(u.kind == "tar" for u in brace)
    # the first two shards read back bit-exactly, labels included
    keys, pixels, labels, failures = _read_all([brace[0].url, brace[1].url])
    assert failures.count == 0 and len(keys) == 800
    assert np.array_equal(pixels[..., 0], fmnist[0][:800])
    assert labels == [int(v) for v in fmnist[1][:800]]
    assert keys[0] == "t10k-images-idx3-ubyte/000000"


def test_image_folder_with_labels_from_parent(tmp_path, fmnist):
    for i in range(6):
        d = tmp_path / "imgs" / ("shirt" if i % 2 else "boot")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(png_bytes(fmnist[0][i]))
    keys, pixels, labels, failures = _read_all(str(tmp_path / "imgs"))
    assert sorted(keys) == sorted(f"{'shirt' if i % 2 else 'boot'}/{i}" for i in range(6))
    assert {k.split("/")[0]: l for k, l in zip(keys, labels)} == {"boot": 0, "shirt": 1}
    # convert writes an image folder to shards too
    res = convert(str(tmp_path / "imgs"), str(tmp_path / "out"), verbose=False)
    assert res.images == 6


def test_bad_members_are_skipped_counted_and_named(tmp_path, fmnist):
    good = png_bytes(fmnist[0][0])
    shard = write_tar(tmp_path / "bad.tar", [
        ("a.png", good), ("a.cls", b"3"),
        ("trunc.png", good[: len(good) // 2]),
        ("empty.png", b""),
        ("text.png", b"this is not an image at all"),
        ("bomb.png", png_bomb_header()),
        ("nolabel.json", b"{}"),
        ("b.png", png_bytes(fmnist[0][1])),
    ])
    keys, pixels, labels, failures = _read_all(str(shard))
    assert keys == ["a", "b"] and labels == [3, None]
    reasons = {f.key: f.reason for f in failures.examples}
    assert set(reasons) == {"trunc", "empty", "text", "bomb", "nolabel"}
    assert "truncated" in reasons["trunc"] and "zero-byte" in reasons["empty"]
    assert "not an image" in reasons["text"] and "decompression bomb" in reasons["bomb"]
    assert "no image member" in reasons["nolabel"]


def test_truncated_tar_keeps_what_was_readable(tmp_path, fmnist):
    members = [(f"{i:03d}.png", png_bytes(fmnist[0][i])) for i in range(20)]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2])
    keys, pixels, labels, failures = _read_all(str(tmp_path / "cut.tar"))
    assert 5 <= len(keys) < 20
    assert np.array_equal(pixels[..., 0], fmnist[0][: len(keys)])
    assert failures.count == 1 and "unreadable tar" in failures.examples[0].reason


def test_odd_modes_follow_the_policy():
    from PIL import Image
    import io

    def enc(img):
        b = io.BytesIO()
        img.save(b, format="PNG")
        return b.getvalue()

    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # fully transparent -> white
    assert PRE.decode(enc(rgba)).min() == 255
    i16 = Image.fromarray(np.full((28, 28), 65535, dtype=np.uint16))
    assert PRE.decode(enc(i16)).min() == 255
    pal = Image.new("P", (28, 28))
    assert Preprocess(image_size=16, channels=3).decode(enc(pal)).shape == (16, 16, 3)
    with pytest.raises(DecodeError, match="bomb"):
        PRE.decode(enc(Image.new("L", (100, 100))), max_pixels=5000)


def test_patterns_that_match_nothing_are_named(tmp_path):
    with pytest.raises(DataError, match=r"'/no/such/dir/\*\.tar'"):
        list_units("/no/such/dir/*.tar")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="matches no input"):
        list_units(str(tmp_path))


def test_a_corpus_where_nothing_decodes_fails_instead_of_looping(tmp_path):
    shard = write_tar(tmp_path / "junk.tar", [(f"{i}.png", b"junk") for i in range(5)])
    stream = ImageStream(list_units(str(shard)), PRE, failures=FailureLog(verbose=False))
    with pytest.raises(DataError, match="could be decoded"):
        next(stream.batches(4))


def test_ranks_split_the_single_process_stream_exactly(tmp_path):
    """With fewer units than ranks, rank batches j together are exactly the 1-process batch j;
    with enough units, ranks read disjoint units that together cover every sample once."""
    one = ImageStream(list_units(str(SAMPLE_DIR)), PRE, seed=3, failures=FailureLog(verbose=False))
    ranks = [ImageStream(list_units(str(SAMPLE_DIR)), PRE, seed=3, rank=r, world_size=2,
                         failures=FailureLog(verbose=False)) for r in range(2)]
    for j, (b, b0, b1) in enumerate(zip(one.batches(64), ranks[0].batches(32), ranks[1].batches(32))):
        assert sorted(b.keys) == sorted(b0.keys + b1.keys)
        if j == 20:  # past the first shuffle-buffer refills
            break
    convert(str(SAMPLE_IMAGES), str(tmp_path / "shards"), shard_size=2500, verbose=False)
    units = list_units(str(tmp_path / "shards"))
    seen = []
    for r in range(2):
        s = ImageStream(units, PRE, seed=1, rank=r, world_size=2, failures=FailureLog(verbose=False))
        seen.append([k for b in s.batches(500, epochs=1, drop_last=False) for k in b.keys])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 10_000


def test_parquet_files_with_image_bytes(tmp_path, fmnist):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = fmnist
    plain = pa.table({"key": [f"k{i}" for i in range(5)], "image": [png_bytes(images[i]) for i in range(4)] + [b"junk"],
                      "label": pa.array([int(x) for x in labels[:5]], pa.int64())})
    pq.write_table(plain, tmp_path / "a.parquet", row_group_size=2)
    # Hugging Face datasets' layout: image is struct<bytes, path>, no key column
    hf = pa.table({"image": pa.array([{"bytes": png_bytes(images[i]), "path": None} for i in range(5, 8)]),
                   "labels": pa.array([1, 2, 3], pa.int32())})
    pq.write_table(hf, tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": ["no images here"]}), tmp_path / "c.parquet")

    units = list_units(str(tmp_path))
    assert [(Path(u.url).name, u.kind) for u in units] == [("a.parquet", "parquet"), ("b.parquet", "parquet"),
                                                           ("c.parquet", "parquet")]
    failures = []
    samples = [s for u in units for s in iter_unit(u, failures.append)]
    assert [s.key for s in samples] == ["k0", "k1", "k2", "k3", "k4", "b/00000000", "b/00000001", "b/00000002"]
    assert [s.label for s in samples] == [int(x) for x in labels[:5]] + [1, 2, 3]
    pre = Preprocess(image_size=28, channels=1)
    np.testing.assert_array_equal(pre.decode(samples[6].data)[..., 0], images[6])
    with pytest.raises(DecodeError, match="not an image"):
        pre.decode(samples[4].data)
    assert len(failures) == 1 and "no image column" in failures[0].reason and "text" in failures[0].reason


def test_a_damaged_unit_is_marked_apart_from_bad_images(tmp_path, fmnist):
    """A cut-short shard loses every member after the cut but is one Failure: it is marked as a
    unit failure (Failure.unit_damaged) so a job can count damaged units apart from bad images, also
    after the trip through the typed Arrow column that carries failures from the Ray stages to the
    driver (UnitRows in pipeline/stages.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vqtok.pipeline.sources import Failure
    from vqtok.pipeline.stages import UnitCollector, UnitRows

    def collected_failures(codec, failures):
        end = codec.end_row(0, 0, failures)
        (done,) = UnitCollector().add(UnitRows.with_tokens(end, pa.nulls(1, pa.list_(pa.uint16()))))
        return done.failures

    members = [(f"{i:03d}.png", png_bytes(fmnist[0][i])) for i in range(20)] + [("bad.png", b"junk")]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2])
    write_tar(tmp_path / "ok.tar", [("a.png", png_bytes(fmnist[0][0])), ("b.json", b"{}")])
    table = pa.table({"image": [png_bytes(fmnist[0][i]) for i in range(300)]})
    pq.write_table(table, tmp_path / "full.parquet", row_group_size=100)
    data = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"text": ["no images"]}), tmp_path / "noimage.parquet")
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)

    def failures_of(name):
        found = []
        for unit in list_units(str(tmp_path / name)):
            list(iter_unit(unit, found.append))
        return found

    codec = UnitRows((4, 4, 1))
    for name in ("cut.tar", "cut.parquet", "noimage.parquet", "bad-images-idx3-ubyte"):
        (f,) = failures_of(name)
        assert f.unit_damaged, (name, f)
        assert collected_failures(codec, [f]) == [f]  # the typed column the tokenize stages send keeps it
    (member,) = failures_of("ok.tar")
    assert not member.unit_damaged and collected_failures(codec, [member]) == [member]
    assert Failure("k", "u", "r") == Failure(key="k", unit="u", reason="r")  # the fields callers pass


def _tiff_with_rational_strip_offsets() -> bytes:
    """A real 8x8 TIFF whose StripOffsets entry is retyped LONG -> SRATIONAL: PIL reads the header
    fine, then load() seeks to a fraction and raises TypeError (not one of its usual error types)."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 0x0111:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 10)  # type SRATIONAL
            return bytes(data)
    raise AssertionError("no StripOffsets entry")


def test_any_decoder_exception_is_a_decode_error_naming_its_type():
    with pytest.raises(DecodeError, match="TypeError"):
        PRE.decode(_tiff_with_rational_strip_offsets())


def test_max_image_pixels_above_pils_own_limit_lets_genuine_large_images_through():
    """PIL refuses more than 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx) by itself: a user who raises
    --max-image-pixels past that must get the image, with PIL's global put back afterwards."""
    import io

    from PIL import Image

    from vqtok.models.tokenizer import open_image

    size = (18_000, 10_000)  # 180 Mpx, a real PNG: mode "1" compresses to ~22 kB, decodes in ~0.3 s
    assert size[0] * size[1] > 2 * Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.new("1", size).save(buf, format="PNG")
    data = buf.getvalue()
    pil_limit = Image.MAX_IMAGE_PIXELS
    img = open_image(data, max_pixels=300_000_000)
    assert img.size == size and img.getpixel((17_999, 9_999)) == 0
    del img
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # not changed for the rest of the process
    for limit in (None, 179_000_000):  # our limit (default 64 Mpx, or raised but still too low) refuses it
        with pytest.raises(DecodeError, match="decompression bomb.*--max-image-pixels"):
            open_image(data) if limit is None else open_image(data, max_pixels=limit)
        assert Image.MAX_IMAGE_PIXELS == pil_limit


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_tar_reader_groups_samples_as_webdataset_does(tmp_path, fmt):
    """pipeline/sources.py reads tar headers itself (fast); it must give webdataset's samples: long
    names (GNU, pax, ustar prefix), directories skipped, upper-case extensions lowercased, and a
    corrupt header or a member cut short is an error, not a silent end."""
    import io

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from vqtok.pipeline.sources import tar_samples

    long_dir = "d" * 60 + "/" + "e" * 60 if fmt != tarfile.USTAR_FORMAT else "d" * 60 + "/e"
    members = [("a.png", b"1"), ("a.TXT", "caf\u00e9".encode()), (f"{long_dir}/b.c.json", b"{}"),
               (f"{long_dir}/b.c.png", b"2" * 700), ("noext", b"x"), ("z.png", b"")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        tf.addfile(_dir_info("adir"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    want = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
            for s in group_by_keys(dict(m, __url__="x") for m in tar_file_iterator(io.BytesIO(raw)))]
    got = list(tar_samples(io.BytesIO(raw)))
    assert got == want and [s["__key__"] for s in got] == ["a", f"{long_dir}/b", "z"]
    assert got[0]["txt"] == "caf\u00e9".encode() and got[1]["c.png"] == b"2" * 700
    corrupt = bytearray(raw)
    corrupt[600] ^= 0xFF  # inside the second header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_samples(io.BytesIO(bytes(corrupt))))
    cut = raw[: raw.index(b"2" * 700) + 100]  # inside a member's data
    with pytest.raises(tarfile.ReadError, match="cut short"):
        list(tar_samples(io.BytesIO(cut)))


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
