"""Decode speed at 256 px: the whole JPEG decode (old policy) vs the reduced one (new policy).

What `vqtok tokenize` does to each image, in one process on one core: encoded bytes ->
Preprocess.decode (models/tokenizer.py) -> (256, 256, 3) uint8, under Preprocess's LEGACY_POLICY (every
pixel decoded, then shorter side to 256 bicubic, center crop) and its POLICY (a JPEG decoded at
1/2, 1/4 or 1/8 scale by libjpeg, PIL's draft, keeping the shorter side >= 2 x 256, then the same
resize and crop). Inputs, real colour JPEGs from the Debian desktop-background packages
(mate-backgrounds, plasma-workspace-wallpapers; installed if missing):
  (a) originals: every colour JPEG picture of at least 1 Mpx there (photographs, and some rendered
      art), the largest file of each picture (plasma ships each at several sizes), decoded from
      the packaged file's bytes;
  (b) 256 px JPEGs: each original reduced as a web-scale dataset stores images near the model's
      size: shorter side to 384 px (1.5 x 256; bicubic), center-cropped to 512 x 384 (or 384 x 512),
      re-encoded at JPEG quality 90. Neither policy reduces these (384 < 2 x 256): the row checks
      that the new policy costs nothing there.
Timing: a pass decodes every image of a set once; passes of the policies take turns (their order
alternating from round to round), after one warm-up pass each; img/s = images / median pass time.
Accuracy: PSNR of each image's new-policy pixels against its old-policy pixels (the whole decode is
the reference), min and median over the set. To show why the policy keeps 2 x 256, the reduced
decode is also run keeping only >= 1 x 256 and >= 4 x 256 (same code path, jpeg_draft with the other
bound): the choice of margin is the accuracy/speed trade in that table.

    python benchmarks/decode_speed.py [--rounds 5] [--size 256] [--no-append]
"""
from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table  # noqa: E402

from vqtok.models.tokenizer import DRAFT_MARGIN, LEGACY_POLICY, POLICY, Preprocess, jpeg_draft  # noqa: E402

PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")
ROOTS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
MIN_PIXELS = 1_000_000


def originals() -> list[Path]:
    """Every colour JPEG of at least MIN_PIXELS under the background folders, installing the packages
    when none is there."""
    def scan() -> list[Path]:
        found = []
        for root in ROOTS:
            for f in sorted(root.rglob("*")):
                f = f.resolve()  # plasma links its smaller sizes' names to the larger files
                if f.suffix.lower() in (".jpg", ".jpeg") and f.is_file():
                    with Image.open(f) as im:
                        if im.format == "JPEG" and im.mode == "RGB" and im.size[0] * im.size[1] >= MIN_PIXELS:
                            found.append(f)
        # one file per picture: plasma ships each wallpaper at several sizes, mate some too (Elephants_WxH.jpg)
        largest: dict[str, tuple[int, Path]] = {}
        for f in found:
            with Image.open(f) as im:
                area = im.size[0] * im.size[1]
            key = _picture(f)
            if key not in largest or area > largest[key][0]:
                largest[key] = (area, f)
        return sorted({f for _, f in largest.values()})

    files = scan()
    if not files:
        print(f"installing the Debian packages {', '.join(PACKAGES)} ...", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=False)
        files = scan()
    if not files:
        sys.exit(f"no colour JPEG of >= {MIN_PIXELS} pixels under {', '.join(map(str, ROOTS))}")
    return files


def small_jpeg(data: bytes, short: int) -> bytes:
    """An original as a dataset near the model's size stores it: shorter side `short` (bicubic),
    center-cropped to 4:3 (short x 4/3 short, in the image's orientation), JPEG quality 90."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = short / min(w, h)
    nw, nh = max(short, round(w * s)), max(short, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    cw, ch = (short * 4 // 3, short) if nw >= nh else (short, short * 4 // 3)
    left, top = (nw - cw) // 2, (nh - ch) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + cw, top + ch)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timed passes per method (median taken)")
    p.add_argument("--size", type=int, default=256, help="image_size")
    p.add_argument("--small-repeat", type=int, default=10,
                   help="(b) is decoded this many times per pass, so that a pass lasts long enough to time")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    t_start = time.perf_counter()
    S = args.size
    files = originals()
    big = {f: f.read_bytes() for f in files}
    small = {f: small_jpeg(d, S * 3 // 2) for f, d in big.items()}
    old = Preprocess(image_size=S, channels=3, policy=LEGACY_POLICY)
    new = Preprocess(image_size=S, channels=3, policy=POLICY)

    def margin_decode(data: bytes, margin: int) -> np.ndarray:
        # Preprocess.decode's steps with another draft bound (the size check is done by Preprocess.decode runs)
        img = Image.open(io.BytesIO(data))
        jpeg_draft(img, margin * S)
        img.load()
        return new.decode(img)

    def reduction(data: bytes, margin: int) -> int:
        with Image.open(io.BytesIO(data)) as img:
            return jpeg_draft(img, margin * S)

    margins = sorted({1, DRAFT_MARGIN, 4})
    sets = {"(a) originals": list(big.values()), "(b) 256 px JPEGs": list(small.values())}
    rows, margin_rows = [], []
    for name, datas in sets.items():
        repeat = 1 if name.startswith("(a)") else args.small_repeat
        ref = [old.decode(d) for d in datas]
        got = [new.decode(d) for d in datas]
        # the margin variant at the policy's own margin is the policy: same pixels
        assert all(np.array_equal(margin_decode(d, DRAFT_MARGIN), g) for d, g in zip(datas, got))
        methods = {"old": lambda ds=datas: [old.decode(d) for d in ds * repeat],
                   "new": lambda ds=datas: [new.decode(d) for d in ds * repeat]}
        if name.startswith("(a)"):
            for m in margins:
                if m != DRAFT_MARGIN:
                    methods[f">={m}x"] = lambda ds=datas, m=m: [margin_decode(d, m) for d in ds]
        times: dict[str, list[float]] = {k: [] for k in methods}
        for fn in methods.values():
            fn()  # warm-up
        order = list(methods)
        for r in range(args.rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                methods[k]()
                times[k].append(time.perf_counter() - t0)
        n = len(datas) * repeat
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        q = [psnr(g, r_) for g, r_ in zip(got, ref)]
        reds = [reduction(d, DRAFT_MARGIN) for d in datas]
        mpx = statistics.median(Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] / 1e6
                                for d in datas)
        red_text = ", ".join(f"{'none' if k == 1 else f'1/{k}'}: {reds.count(k)}" for k in (1, 2, 4, 8) if reds.count(k))
        rows.append([name, len(datas), f"{mpx:.1f}", red_text, f"{rate['old']:.1f}", f"{rate['new']:.1f}",
                     f"{rate['new'] / rate['old']:.2f}x", _db(min(q)), _db(statistics.median(q))])
        if name.startswith("(a)"):
            for m in margins:
                qm = q if m == DRAFT_MARGIN else [psnr(margin_decode(d, m), r_) for d, r_ in zip(datas, ref)]
                worst_m = min(range(len(qm)), key=qm.__getitem__)
                k = "new" if m == DRAFT_MARGIN else f">={m}x"
                margin_rows.append([f">= {m} x {S}" + (" (the policy)" if m == DRAFT_MARGIN else ""),
                                    f"{rate[k]:.1f}", f"{rate[k] / rate['old']:.2f}x", _db(min(qm)),
                                    _db(statistics.median(qm)), _name(files[worst_m])])
            margin_rows.append(["whole decode (old policy)", f"{rate['old']:.1f}", "1.00x", "reference", "", ""])
        print(f"{name}: done in {time.perf_counter() - t_start:.0f} s", flush=True)

    t1 = table(["input", "images", "Mpx (median)", "new policy's reduction", "old img/s", "new img/s",
                "speed-up", "PSNR new vs old, min", "median"], rows)
    t2 = table(["(a) originals, reduced decode keeping the shorter side", "img/s", "vs whole",
                "PSNR vs whole, min", "median", "worst image"], margin_rows)
    progressive = sum(1 for d in big.values() if Image.open(io.BytesIO(d)).info.get("progressive"))
    notes = (f"One process, one core: Preprocess.decode(bytes) -> ({S}, {S}, 3) uint8, old = {LEGACY_POLICY!r}, "
             f"new = {POLICY!r}. Passes of the methods alternate, {args.rounds} rounds after a warm-up, "
             f"img/s = images / median pass. (a): every colour JPEG of >= {MIN_PIXELS / 1e6:.0f} Mpx under "
             f"{' and '.join(map(str, ROOTS))} (packages {', '.join(PACKAGES)}; photographs and some rendered "
             f"art; the largest file of each picture; {progressive} of them "
             f"progressive JPEGs, whose entropy decoding the reduction does not shorten). (b): each original "
             f"as a {S * 3 // 2}-px-shorter-side 4:3 center crop (bicubic), re-encoded at quality 90; "
             f"decoded {args.small_repeat}x per pass. PSNR: per image, the new policy's pixels against the "
             f"whole decode's.\n"
             f"Whole run: {time.perf_counter() - t_start:.0f} s.")
    body = f"{t1}\n\n{t2}\n\n{notes}"
    print(body)
    if not args.no_append:
        append_results("Decode speed at 256 px: whole vs reduced JPEG decode (benchmarks/decode_speed.py)", body)
    return 0


def _picture(f: Path) -> str:
    """Which picture a file is: plasma's Autumn/contents/images/2560x1600.jpg -> Autumn/images (its
    images_dark is another picture); mate's Elephants_3840x2160.jpg -> Elephants."""
    parts = f.parts
    if "contents" in parts:
        i = parts.index("contents")
        return f"{parts[i - 1]}/{parts[i + 1]}"
    return str(f.parent / re.sub(r"_\d+x\d+$", "", f.stem))


def _name(f: Path) -> str:
    return f"{_picture(f)}/{f.name}" if "contents" in f.parts else f.name


def _db(x: float) -> str:
    return "identical" if x == float("inf") else f"{x:.1f} dB"


if __name__ == "__main__":
    raise SystemExit(main())
