"""Captions for Fashion-MNIST that are true of each image: its garment, in one of several phrasings,
and whether the picture is dark or light for its kind, read from the pixels.

    python examples/make_fashion_mnist_captions.py                       # the shipped file (below)
    python examples/make_fashion_mnist_captions.py --split train --out DIR [--copy-images]

The first writes examples/fashion-mnist/t10k-captions.txt, one caption per line (UTF-8, "\\n" after
each), line i for image i of t10k-images-idx3-ubyte.gz. vqtok reads a file named like that beside an
IDX images file as its captions (pipeline/sources.py), so `vqtok tokenize --data examples/fashion-mnist`
gives every row its caption. The second captions the 60k train split (read from --source, by default
/usr/share/datasets/fashion-mnist, the Debian package dataset-fashion-mnist) into DIR/train-captions.txt;
with --copy-images the split's IDX images and labels are copied beside it, so DIR is a captioned
dataset for `vqtok tokenize --data DIR`. The same code makes both, and the output is the same bytes
on every run (nothing random but a hash of the image's index).

How each caption is made (caption(image, label, index)):

1. The garment, from the image's label, in one of its class's phrasings (GARMENT_PHRASES; three or
   four per class, e.g. class 0 "T-shirt/top": t-shirt, tee, top, t-shirt top), chosen by a hash of
   the image's index. One more phrasing per class (HELD_OUT_PHRASES, e.g. "tee top", "pair of pants",
   "hand bag") never appears in any caption: prompts that use them test whether a text-conditioned
   prior generalises to wordings it was not trained on. Every phrasing is true of every image of its
   class (no "long-sleeved shirt": Fashion-MNIST's shirts are not all long-sleeved); none is shared
   between classes, and garment_of(text) names the class a text's phrasings point to.
2. Brightness, from the pixels: garment_brightness() is the mean intensity (0-255) of the image's
   garment pixels (those above BRIGHTNESS_THRESHOLD = 16; the background is 0). Each class's
   brightnesses were cut into thirds on the 60k train split (BRIGHTNESS_TERTILES, fitted by
   brightness_tertiles()): an image in its class's bottom third is "dark", in the top third
   "light", and in the middle third it gets no adjective, so a "dark" and a "light" image of the
   same class always differ by at least the middle third's width. "Dark" and "light" describe the
   picture as stored and shown (white garment pixels on a black background), which is what
   samples from a prior are measured on. Fashion-MNIST negated its product photos, so a "dark"
   picture is of a light-coloured product and the other way round; the captions describe the
   pictures, not the products.
3. A template (TEMPLATES, chosen by another hash of the index): "X", "a photo of X", "a product shot
   of X", "a picture of X", "a grayscale photo of X", "X on a black background" (every picture is
   grayscale on black). X is the noun phrase with its article: "a dark ankle boot", "an ankle boot",
   "light trousers", "a pair of trousers".

Nothing else is claimed. Size words ("small", "large") were left out: Fashion-MNIST scaled every
product so its longer side fills the 28 px frame, so a bounding box tells the aspect ratio, not
the product's size.

On the shipped 10k test split: 3,398 "dark", 3,300 "light", 3,302 with no brightness word (the
60k train split: 20,010, 20,004, 19,986); 684 distinct captions; the file is 291,115 bytes.

Also imported by benchmarks/fmnist_classifier.py and the prompt-fidelity benchmark (the phrasings,
garment_brightness, garment_of): keep this file importable without side effects.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHIPPED_DIR = HERE / "fashion-mnist"  # the 10k test split that ships with vqtok
FULL_DIR = Path("/usr/share/datasets/fashion-mnist")  # the 70k, from the Debian package dataset-fashion-mnist

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
# The garment phrasings used in captions (noun phrases without article; noun_phrase() adds it).
GARMENT_PHRASES: dict[int, tuple[str, ...]] = {
    0: ("t-shirt", "tee", "top", "t-shirt top"),
    1: ("trousers", "pants", "pair of trousers", "long trousers"),
    2: ("pullover", "sweater", "jumper", "long-sleeved pullover"),
    3: ("dress", "frock", "women's dress", "one-piece dress"),
    4: ("coat", "jacket", "overcoat", "outdoor coat"),
    5: ("sandal", "strappy sandal", "open-toe sandal", "open shoe"),
    6: ("shirt", "blouse", "casual shirt"),
    7: ("sneaker", "trainer", "running shoe", "sports shoe"),
    8: ("bag", "handbag", "purse"),
    9: ("ankle boot", "boot", "short boot", "bootie"),
}
# Phrasings of the same garments that no caption uses: for prompts never seen in training. Each is
# made of words the class's captions use (a byte- or BPE-level text model can read them), or a
# spelling variant ("hand bag").
HELD_OUT_PHRASES: dict[int, tuple[str, ...]] = {
    0: ("tee top",),
    1: ("pair of pants",),
    2: ("pullover sweater",),
    3: ("one-piece frock",),
    4: ("outdoor jacket",),
    5: ("strappy shoe",),
    6: ("casual blouse",),
    7: ("sports sneaker",),
    8: ("hand bag",),
    9: ("ankle-high boot",),
}
PLURAL = frozenset({"trousers", "pants", "long trousers"})  # no article: "dark trousers"
TEMPLATES = ("{}", "a photo of {}", "a product shot of {}", "a picture of {}", "a grayscale photo of {}",
             "{} on a black background")
DARK, LIGHT = "dark", "light"

BRIGHTNESS_THRESHOLD = 16  # garment pixels: intensity above this (the background is 0, its noise below)
# Each class's 1/3 and 2/3 quantiles of garment_brightness on the 60k train split, rounded to 0.1
# (brightness_tertiles(train images, train labels); tests check they are still what it gives).
BRIGHTNESS_TERTILES: dict[int, tuple[float, float]] = {
    0: (131.6, 183.6), 1: (159.0, 189.6), 2: (133.0, 187.9), 3: (150.6, 192.2), 4: (165.8, 195.3),
    5: (115.9, 141.3), 6: (116.1, 174.1), 7: (130.4, 156.0), 8: (157.5, 184.4), 9: (165.7, 186.4),
}


# ----------------------------------------------------------------------------------------------
# What the pixels say
# ----------------------------------------------------------------------------------------------
def garment_brightness(images: np.ndarray) -> np.ndarray:
    """Mean intensity (0-255) of the garment pixels (> BRIGHTNESS_THRESHOLD) of each image: (N, H, W)
    uint8 -> (N,) float64; (H, W) -> a float. An image with no garment pixel is 0 (dark). Lower is
    darker, as the picture is shown."""
    x = np.asarray(images)
    single = x.ndim == 2
    x = x.reshape((1,) + x.shape) if single else x
    x = x.reshape(len(x), -1).astype(np.float64)
    mask = x > BRIGHTNESS_THRESHOLD
    out = (x * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return float(out[0]) if single else out


def brightness_class(brightness: float, label: int) -> str | None:
    """"dark" (the class's bottom third on the train split), "light" (its top third) or None (the
    middle third: no claim)."""
    low, high = BRIGHTNESS_TERTILES[int(label)]
    if brightness < low:
        return DARK
    if brightness > high:
        return LIGHT
    return None


def brightness_tertiles(images: np.ndarray, labels: np.ndarray) -> dict[int, tuple[float, float]]:
    """Each class's 1/3 and 2/3 quantiles of garment_brightness, rounded to 0.1: how
    BRIGHTNESS_TERTILES was fitted (on the 60k train split)."""
    b, labels = garment_brightness(images), np.asarray(labels)
    return {c: tuple(round(float(np.quantile(b[labels == c], q)), 1) for q in (1 / 3, 2 / 3))
            for c in range(len(CLASS_NAMES))}


# ----------------------------------------------------------------------------------------------
# Words
# ----------------------------------------------------------------------------------------------
def noun_phrase(phrase: str, adjective: str | None = None) -> str:
    """A garment phrasing with its article and an optional adjective: ("ankle boot", "dark") -> "a dark
    ankle boot"; ("ankle boot",) -> "an ankle boot"; ("trousers", "light") -> "light trousers";
    ("pair of trousers", "dark") -> "a pair of dark trousers"."""
    if phrase.startswith("pair of "):
        return "a pair of " + noun_phrase(phrase[len("pair of "):], adjective)
    words = f"{adjective} {phrase}" if adjective else phrase
    if phrase in PLURAL:
        return words
    return ("an " if words[0] in "aeiou" else "a ") + words


def prompt(phrase: str, adjective: str | None = None, template: str = "{}") -> str:
    """A caption-shaped text: template.format(noun_phrase(phrase, adjective)) ("a photo of a dark tee")."""
    return template.format(noun_phrase(phrase, adjective))


def _pick(index: int, what: str, n: int) -> int:
    h = hashlib.blake2b(f"fashion-mnist caption {what} {int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % n


def caption(image: np.ndarray, label: int, index: int) -> str:
    """The caption of one image (H, W) uint8 with its class label and its index in its split."""
    return _caption(garment_brightness(image), int(label), int(index))


def _caption(brightness: float, label: int, index: int) -> str:
    phrases = GARMENT_PHRASES[label]
    phrase = phrases[_pick(index, "phrase", len(phrases))]
    template = TEMPLATES[_pick(index, "template", len(TEMPLATES))]
    return prompt(phrase, brightness_class(brightness, label), template)


def captions(images: np.ndarray, labels: np.ndarray) -> list[str]:
    """caption(images[i], labels[i], i) for every i (the brightness computed in one pass)."""
    b = garment_brightness(images)
    return [_caption(float(b[i]), int(labels[i]), i) for i in range(len(labels))]


def _phrase_pattern(phrase: str) -> str:
    import re

    # whole words: "shirt" is not found in "t-shirt", "coat" not in "overcoat"
    return r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])"


def garment_of(text: str) -> int | None:
    """The class whose phrasings (GARMENT_PHRASES or HELD_OUT_PHRASES, as whole words, any case) a
    text names; None when it names none, or phrasings of more than one class."""
    import re

    text = text.lower()
    found = {c for c in GARMENT_PHRASES for p in GARMENT_PHRASES[c] + HELD_OUT_PHRASES[c]
             if re.search(_phrase_pattern(p), text)}
    return found.pop() if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of a split ("t10k" or "train") from IDX files in source."""
    from vqtok.pipeline.sources import read_idx

    return (read_idx(str(source / f"{split}-images-idx3-ubyte.gz")),
            read_idx(str(source / f"{split}-labels-idx1-ubyte.gz")))


def write_captions(lines: list[str], path: Path) -> Path:
    """One caption per line, each followed by "\\n", UTF-8; gzipped (with no timestamp, so the bytes
    are the same on every run) when path ends with .gz."""
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"a caption cannot hold a line end: {line!r}")
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("t10k", "train", "test"), default="t10k",
                    help="t10k (= test, the 10k that ship) or train (the 60k)")
    ap.add_argument("--source", type=Path, default=None,
                    help=f"folder holding the split's IDX files (default: {SHIPPED_DIR} for t10k, {FULL_DIR} for train)")
    ap.add_argument("--out", type=Path, default=None, help=f"folder to write SPLIT-captions.txt in (default: {SHIPPED_DIR}"
                                                          f" for t10k; required for train)")
    ap.add_argument("--gzip", action="store_true", help="write SPLIT-captions.txt.gz")
    ap.add_argument("--copy-images", action="store_true",
                    help="also copy the split's IDX images and labels into --out (a captioned dataset folder)")
    ap.add_argument("--fit-tertiles", action="store_true",
                    help="print each class's brightness tertiles on this split (how BRIGHTNESS_TERTILES was made)")
    args = ap.parse_args(argv)
    split = "t10k" if args.split == "test" else args.split
    source = args.source or (SHIPPED_DIR if split == "t10k" and (SHIPPED_DIR / "t10k-images-idx3-ubyte.gz").is_file()
                             else FULL_DIR)
    if args.out is None and split == "train":
        ap.error("--split train needs --out DIR (only the 10k test split's captions ship)")
    out = args.out or SHIPPED_DIR
    images, labels = read_split(source, split)
    if args.fit_tertiles:
        print(brightness_tertiles(images, labels))
        return 0
    lines = captions(images, labels)
    path = write_captions(lines, out / f"{split}-captions.txt{'.gz' if args.gzip else ''}")
    if args.copy_images and source.resolve() != out.resolve():
        for kind in ("images-idx3", "labels-idx1"):
            shutil.copyfile(source / f"{split}-{kind}-ubyte.gz", out / f"{split}-{kind}-ubyte.gz")
    kinds = [brightness_class(b, c) for b, c in zip(garment_brightness(images), labels)]
    print(f"wrote {path} ({path.stat().st_size:,} bytes): {len(lines):,} captions, {kinds.count(DARK):,} dark, "
          f"{kinds.count(LIGHT):,} light, {kinds.count(None):,} with no brightness word; "
          f"{len(set(lines)):,} distinct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
