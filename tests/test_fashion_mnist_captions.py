"""The captioned Fashion-MNIST that ships with vqtok (examples/make_fashion_mnist_captions.py,
examples/fashion-mnist/t10k-captions.txt) and IDX captions files (pipeline/sources.py): the captions
are deterministic and true of their images, the shipped file is what the script writes, and an IDX
unit's captions file is read line by line and is part of the unit's input only when it exists."""
import gzip
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SAMPLE_DIR
from vqtok import TokenDataset, tokenize
from vqtok.pipeline.sources import _signature, _stamp, iter_unit, list_units, read_idx

sys.path.insert(0, str(REPO / "examples"))
import make_fashion_mnist_captions as fm  # noqa: E402

SHIPPED = SAMPLE_DIR / "t10k-captions.txt"
TRAIN = fm.FULL_DIR / "train-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def t10k():
    images, labels = fm.read_split(SAMPLE_DIR, "t10k")
    return images, labels, fm.captions(images, labels)


def _words(phrase: str) -> re.Pattern:
    return re.compile(fm._phrase_pattern(phrase))


# --- the captions are true ----------------------------------------------------------------------
def test_captions_are_deterministic_and_one_per_image(t10k):
    images, labels, caps = t10k
    assert len(caps) == len(images) == 10_000
    assert fm.captions(images, labels) == caps
    for i in (0, 1, 17, 4321, 9999):
        assert fm.caption(images[i], labels[i], i) == caps[i]
        assert fm.caption(images[i].copy(), int(labels[i]), i) == caps[i]
    assert all("\n" not in c and "\r" not in c and c == c.strip() for c in caps)
    assert len(set(caps)) > 500  # varied: phrasings x templates x brightness


def test_every_caption_names_its_garment_by_a_training_phrasing(t10k):
    _, labels, caps = t10k
    used = {c: set() for c in fm.GARMENT_PHRASES}
    for cap, label in zip(caps, labels):
        label = int(label)
        assert fm.garment_of(cap) == label, cap
        named = {p for p in fm.GARMENT_PHRASES[label] if _words(p).search(cap.replace("dark ", "").replace("light ", ""))}
        assert named, f"{cap!r} names no phrasing of {fm.CLASS_NAMES[label]}"
        used[label] |= named
    # every training phrasing is used; no phrasing belongs to two classes
    assert used == {c: set(p) for c, p in fm.GARMENT_PHRASES.items()}
    every = [p for c in fm.GARMENT_PHRASES for p in fm.GARMENT_PHRASES[c] + fm.HELD_OUT_PHRASES[c]]
    assert len(every) == len(set(every))


def test_held_out_phrasings_never_appear_but_are_recognised(t10k):
    _, _, caps = t10k
    text = "\n".join(caps)
    for c, phrases in fm.HELD_OUT_PHRASES.items():
        assert phrases and not set(phrases) & set(fm.GARMENT_PHRASES[c])
        for p in phrases:
            for adj in (None, fm.DARK, fm.LIGHT):
                held = re.sub(r"^an? ", "", fm.noun_phrase(p, adj))  # "dark tee top", "pair of dark pants"
                assert not _words(held).search(text), f"held-out {held!r} is in the captions"
            # a prompt in any template names the class, for the captioning and fidelity measures
            for template in fm.TEMPLATES:
                for adj in (None, fm.DARK, fm.LIGHT):
                    assert fm.garment_of(fm.prompt(p, adj, template)) == c
    for c, phrases in fm.GARMENT_PHRASES.items():
        for p in phrases:
            assert fm.garment_of(fm.prompt(p, fm.DARK, "a photo of {}")) == c
    assert fm.garment_of("a shirt and a dress") is None and fm.garment_of("a cat") is None
    assert fm.noun_phrase("ankle boot") == "an ankle boot" and fm.noun_phrase("ankle boot", "dark") == "a dark ankle boot"
    assert fm.noun_phrase("pair of trousers", "light") == "a pair of light trousers"
    assert fm.noun_phrase("trousers", "dark") == "dark trousers"


def test_dark_and_light_are_read_from_the_pixels(t10k):
    images, labels, caps = t10k
    brightness = fm.garment_brightness(images)
    said = np.array([fm.DARK if re.search(r"\bdark\b", c) else fm.LIGHT if re.search(r"\blight\b", c) else ""
                     for c in caps])
    # an independent measure of the same thing: mean of the pixels above 32 (not the captioner's 16)
    x = images.reshape(len(images), -1).astype(float)
    other = (x * (x > 32)).sum(1) / np.maximum((x > 32).sum(1), 1)
    for c in range(10):
        mine = labels == c
        dark, light, neutral = (mine & (said == fm.DARK)), (mine & (said == fm.LIGHT)), (mine & (said == ""))
        n = mine.sum()
        for part in (dark, light, neutral):  # thirds, about (the cuts were fitted on the train split)
            assert 0.25 * n < part.sum() < 0.42 * n
        # every "dark" image of a class is darker than every "light" one, with the middle third between
        assert brightness[dark].max() < brightness[neutral].min() <= brightness[neutral].max() < brightness[light].min()
        low, high = fm.BRIGHTNESS_TERTILES[c]
        assert (brightness[dark] < low).all() and (brightness[light] > high).all()
        assert other[dark].mean() + 20 < other[light].mean()  # and by a clear margin, measured another way
        # what a human sees: the mean of the whole picture (background included) is lower too
        assert x[dark].mean() < x[light].mean()
    assert fm.garment_brightness(np.zeros((28, 28), np.uint8)) == 0.0
    assert fm.brightness_class(0.0, 0) == fm.DARK and fm.brightness_class(255.0, 0) == fm.LIGHT


@pytest.mark.skipif(not TRAIN.is_file(), reason="the 60k train split (Debian dataset-fashion-mnist) is not installed")
def test_brightness_cuts_are_the_train_splits_thirds():
    images, labels = fm.read_split(fm.FULL_DIR, "train")
    assert fm.brightness_tertiles(images, labels) == fm.BRIGHTNESS_TERTILES


# --- the shipped file ---------------------------------------------------------------------------
def test_the_shipped_file_is_what_the_script_writes(tmp_path, t10k):
    assert fm.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "t10k-captions.txt").read_bytes() == SHIPPED.read_bytes()
    assert SHIPPED.read_text(encoding="utf-8").split("\n") == t10k[2] + [""]  # "\n" after each, UTF-8
    assert SHIPPED.stat().st_size < 400_000
    assert fm.main(["--out", str(tmp_path), "--gzip"]) == 0
    gz = (tmp_path / "t10k-captions.txt.gz").read_bytes()
    assert gzip.decompress(gz) == SHIPPED.read_bytes()
    fm.main(["--out", str(tmp_path), "--gzip"])
    assert (tmp_path / "t10k-captions.txt.gz").read_bytes() == gz  # no timestamp in it


# --- IDX captions files through sources and tokenize ----------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), mtime=0))
    return path


def _slice(folder: Path, n: int = 300, captions: bool = True) -> list[str]:
    """The first n images of the shipped sample as an IDX dataset in folder; their caption lines."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = read_idx(str(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz")), read_idx(str(SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz"))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[:n])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[:n])
    lines = SHIPPED.read_text(encoding="utf-8").split("\n")[:n]
    if captions:
        (folder / "t10k-captions.txt").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return lines


def _captions(out) -> list:
    t = TokenDataset(out).to_table(["key", "caption"])
    by_key = dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist()))
    return [by_key[k] for k in sorted(by_key)]


def _touch_later(path: Path) -> None:
    later = time.time() + 5
    os.utime(path, (later, later))


def test_an_idx_captions_file_is_read_line_by_line(tmp_path):
    lines = _slice(tmp_path / "d", n=5)
    (unit,) = list_units(str(tmp_path / "d"))
    assert unit.captions_url == str(tmp_path / "d" / "t10k-captions.txt") and unit.captions == ()
    assert [s.caption for s in iter_unit(unit, pytest.fail)] == [x.encode() for x in lines]
    # the unit travels to the read tasks as JSON and comes back equal
    from vqtok.pipeline.stages import unit_items, units_of
    import pyarrow as pa

    assert [u for u, _ in units_of(pa.Table.from_pylist(unit_items([(unit, 0)])))] == [unit]
    # no final line end, an empty line, CRLF line ends, non-ASCII: bytes as they are (captions.py cleans)
    (tmp_path / "d" / "t10k-captions.txt").write_bytes(b"one\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\nfour\nfive")
    (unit,) = list_units(str(tmp_path / "d"))
    assert [s.caption for s in iter_unit(unit, pytest.fail)] == [b"one\r", b"\r", "déjà vu".encode(), b"four", b"five"]
    # gzipped, when there is no plain file
    os.remove(tmp_path / "d" / "t10k-captions.txt")
    (tmp_path / "d" / "t10k-captions.txt.gz").write_bytes(gzip.compress(b"a\nb\nc\nd\ne\n"))
    (unit,) = list_units(str(tmp_path / "d"))
    assert unit.captions_url.endswith("t10k-captions.txt.gz")
    assert [s.caption for s in iter_unit(unit, pytest.fail)] == [b"a", b"b", b"c", b"d", b"e"]
    # named after the images file, whatever its prefix; a glob of just the images file finds it too
    shutil.copy(tmp_path / "d" / "t10k-images-idx3-ubyte.gz", tmp_path / "d" / "extra-images-idx3-ubyte.gz")
    (tmp_path / "d" / "extra-captions.txt").write_text("1\n2\n3\n4\n5\n")
    (unit,) = list_units(str(tmp_path / "d" / "extra-*.gz"))
    assert [s.caption for s in iter_unit(unit, pytest.fail)] == [b"1", b"2", b"3", b"4", b"5"]
    assert [s.label for s in iter_unit(unit, pytest.fail)] == [None] * 5  # no extra-labels file


def test_a_captions_file_of_the_wrong_length_is_ignored_with_a_warning(tmp_path, capfd):
    _slice(tmp_path / "d", n=5, captions=False)
    (tmp_path / "d" / "t10k-captions.txt").write_text("one\ntwo\nthree\nfour\n")  # 4 lines for 5 images
    (unit,) = list_units(str(tmp_path / "d"))
    failures = []
    samples = list(iter_unit(unit, failures.append))
    assert failures == []  # a Failure counts as a failed image (jobs/tokenize.py); every image is read
    assert len(samples) == 5 and [s.caption for s in samples] == [None] * 5
    assert [s.label for s in samples] == read_idx(str(SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz"))[:5].tolist()
    err = capfd.readouterr().err
    assert "vqtok: warning:" in err and "4 captions for 5 images" in err and "captions ignored" in err


def test_tokenize_gives_each_idx_row_its_caption_line(tmp_path, bundle, ray_local):
    lines = _slice(tmp_path / "d")
    r = tokenize(bundle, str(tmp_path / "d"), tmp_path / "tokens", verbose=False)
    assert r.rows == 300 and r.failures == 0
    assert _captions(tmp_path / "tokens") == lines
    assert r.captions["captioned"] == 300 and r.captions["missing"] == 0
    _, got = TokenDataset(tmp_path / "tokens").to_numpy()
    assert got.tolist() == read_idx(str(SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz"))[:300].tolist()


def test_the_captions_file_is_part_of_the_unit_only_when_it_exists(tmp_path, bundle, ray_local):
    d, out = tmp_path / "d", tmp_path / "tokens"
    lines = _slice(d, captions=False)
    (unit,) = list_units(str(d))
    images, labels = d / "t10k-images-idx3-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz"
    stamp = lambda p: _stamp({"size": p.stat().st_size, "mtime": p.stat().st_mtime})  # noqa: E731
    assert unit.signature == _signature(stamp(images), stamp(labels))  # the formula from before IDX captions
    assert unit.captions_url is None
    r = tokenize(bundle, str(d), out, verbose=False)
    assert r.captions["missing"] == 300
    r = tokenize(bundle, str(d), out, verbose=False)  # nothing changed: nothing redone
    assert (r.units_run, r.units_skipped, r.plan.changed) == (0, 1, [])

    (d / "t10k-captions.txt").write_text("".join(x + "\n" for x in lines))  # the captions file appears
    r = tokenize(bundle, str(d), out, verbose=False, changed_inputs="redo")
    assert len(r.plan.changed) == 1 and r.units_run == 1
    assert _captions(out) == lines
    r = tokenize(bundle, str(d), out, verbose=False)
    assert (r.units_run, r.plan.changed) == (0, [])

    edited = lines[:7] + ["a photo of an edited caption"] + lines[8:]
    (d / "t10k-captions.txt").write_text("".join(x + "\n" for x in edited))  # edited
    _touch_later(d / "t10k-captions.txt")
    r = tokenize(bundle, str(d), out, verbose=False, changed_inputs="redo")
    assert len(r.plan.changed) == 1 and r.units_run == 1
    assert _captions(out) == edited

    os.remove(d / "t10k-captions.txt")  # it goes: the unit is back to its old signature, redone
    (unit2,) = list_units(str(d))
    assert unit2.signature == unit.signature
    r = tokenize(bundle, str(d), out, verbose=False, changed_inputs="redo")
    assert len(r.plan.changed) == 1 and _captions(out) == [None] * 300


def test_the_judge_classifier_shares_the_captioners_measures():
    """benchmarks/fmnist_classifier.py judges samples by the captioner's own definitions (imported,
    not copied); its API takes uint8 (N, 28, 28) images. (Training it takes minutes: not run here.)"""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fmnist_classifier as clf

    assert clf.garment_brightness is fm.garment_brightness and clf.garment_of is fm.garment_of
    images = read_idx(str(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz"))[:5]
    got = clf.classify(clf.FashionCNN(), images)
    assert got.shape == (5,) and got.dtype == np.int64 and ((0 <= got) & (got < 10)).all()
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        clf.classify(clf.FashionCNN(), images[:, :14])
