"""Real captioned images, offline: openclipart drawings (Debian `openclipart-svg`) with their human
titles, written the way captioned corpora come.

    python benchmarks/make_captioned_sample.py --out DIR [--count N|all] [--size 32] [--shard-size 1000]
                                               [--odd K] [--forms shards,parquet,plain] [--jobs 2]

Each chosen SVG (/usr/share/openclipart/svg/<category>/.../*.svg, 8,121 public-domain drawings) is
rendered with `rsvg-convert` on white, aspect ratio kept, centred on a white SIZE x SIZE square (RGB
PNG). Its caption is the drawing's title: the text of `cc:Work/dc:title` in the SVG's metadata
exactly as written (XML-unescaped by the parser, nothing else: no stripping, no fixing of the
double-escaped entities (`L&Atilde;&copy;zard`) or the cp1252 bytes some titles carry; an empty
title stays empty). Keywords are the `rdf:li` items of its `dc:subject`.

Forms written under DIR (any of --forms):

  shards/openclipart-00000.tar ...   img2dataset-style WebDataset shards: KEY.png, KEY.txt (the title,
                                     no line end added), KEY.json = {"key", "url" (the SVG's path),
                                     "title", "keywords", "original_width", "original_height" (the SVG's
                                     size in px, from width/height or the viewBox; null if it has none),
                                     "sha256" (of the SVG file), "license"}
  plain/openclipart-00000.tar ...    the same shards with KEY.png only (same keys, images and split)
  openclipart.parquet                LAION-style: key, image (struct<bytes, path> as Hugging Face
                                     datasets write images), TEXT (the title), URL, WIDTH, HEIGHT,
                                     similarity (float64: the Jaccard overlap of the title's lower-case
                                     words with the keywords; a real, noisy text-to-text score standing
                                     in for LAION's CLIP similarity, which these drawings do not have),
                                     uid (DataComp-style: the first 32 hex digits of the SVG's sha256)
  index.json                         what was chosen: count, size, keys, the titles, rsvg failures

KEY is img2dataset's: the shard number (5 digits) then the index in the shard (4 digits).

Choice (deterministic): the SVGs sorted by path; --odd K of them have odd titles, taken in turn from
each kind (control characters, empty, spaces at an end, '&', non-ASCII), spread evenly within it;
the rest are spread evenly over the others; `--count all` takes every drawing. A drawing rsvg-convert cannot render is
left out and listed in index.json: 3 of the 8,121 with rsvg-convert 2.54.7 (malformed XML that
Python's parser reads: an xmlns:xlink of '&#38;#38;...ns_xlink;', a bad XML declaration).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SVG_ROOT = Path("/usr/share/openclipart/svg")
LICENSE = "public domain (openclipart.org; Debian openclipart-svg)"
_DC = "{http://purl.org/dc/elements/1.1/}"
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_UNITS = {"px": 1.0, "": 1.0, "pt": 96 / 72, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}
_LENGTH = re.compile(r"^\s*([0-9.eE+-]+)\s*([a-z]*)\s*$")


def ensure_openclipart() -> Path:
    if not SVG_ROOT.is_dir():
        print("installing the Debian package openclipart-svg ...", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "openclipart-svg", "librsvg2-bin"], check=True)
    return SVG_ROOT


def _px(value: str | None) -> float | None:
    m = _LENGTH.match(value or "")
    if not m or m.group(2) not in _UNITS:
        return None
    try:
        return float(m.group(1)) * _UNITS[m.group(2)]
    except ValueError:
        return None


def read_svg(path: Path) -> dict:
    """The drawing's title (exact), keywords, size and sha256."""
    data = path.read_bytes()
    root = ET.fromstring(data)
    title, keywords = None, []
    work = next((e for e in root.iter() if e.tag.endswith("}Work")), None)
    if work is not None:
        t = work.find(_DC + "title")
        if t is not None:
            title = "".join(t.itertext())
        subject = work.find(_DC + "subject")
        if subject is not None:
            keywords = ["".join(li.itertext()) for li in subject.iter(_RDF + "li")]
    w, h = _px(root.get("width")), _px(root.get("height"))
    if (w is None or h is None) and root.get("viewBox"):
        try:
            _, _, w, h = (float(v) for v in root.get("viewBox").replace(",", " ").split())
        except ValueError:
            w = h = None
    return {"title": title, "keywords": keywords, "original_width": None if w is None else round(w),
            "original_height": None if h is None else round(h), "sha256": hashlib.sha256(data).hexdigest()}


def odd_kind(title: str | None) -> str | None:
    """Why a title is odd (the first that applies), or None."""
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in title or ""):
        return "control characters"
    if not (title or "").strip():
        return "empty"
    if title != title.strip():
        return "spaces at an end"
    if "&" in title:
        return "ampersand"
    if any(ord(c) > 126 for c in title):
        return "non-ASCII"
    return None


def is_odd(title: str | None) -> bool:
    return odd_kind(title) is not None


def spread(items: list, k: int) -> list:
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def render(svg: Path, size: int) -> bytes:
    from PIL import Image

    png = subprocess.run(["rsvg-convert", "-a", "-w", str(size), "-h", str(size), "-b", "white", str(svg)],
                         capture_output=True, check=True, timeout=120).stdout
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        canvas = Image.new("RGB", (size, size), "white")
        canvas.paste(im, ((size - im.size[0]) // 2, (size - im.size[1]) // 2))
    buf = io.BytesIO()
    canvas.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def similarity(title: str | None, keywords: list[str]) -> float:
    words = set(re.findall(r"\w+", (title or "").lower()))
    keys = {k.lower() for k in keywords}
    return round(len(words & keys) / len(words | keys), 6) if words | keys else 0.0


def choose(count: int | None, odd: int) -> list[tuple[Path, dict]]:
    files = sorted(ensure_openclipart().rglob("*.svg"))
    meta = [(f, read_svg(f)) for f in files]
    if count is None or count >= len(meta):
        return meta
    kinds: dict[str, list] = {}
    for m in meta:
        kinds.setdefault(odd_kind(m[1]["title"]), []).append(m)
    others = kinds.pop(None, [])
    odd_ones = []  # round robin over the kinds, each spread evenly
    lists = [spread(v, min(len(v), odd)) for _, v in sorted(kinds.items())]
    while len(odd_ones) < min(odd, count) and any(lists):
        for v in lists:
            if v and len(odd_ones) < min(odd, count):
                odd_ones.append(v.pop(0))
    picked = {m[0] for m in odd_ones + spread(others, count - len(odd_ones))}
    return [m for m in meta if m[0] in picked]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def make(out: Path, count: int | None, size: int, shard_size: int, odd: int, forms: set[str], jobs: int) -> dict:
    t0 = time.time()
    chosen = choose(count, odd)
    with ThreadPoolExecutor(jobs) as pool:
        def one(item):
            try:
                return render(item[0], size)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                return e
        pngs = list(pool.map(one, chosen))
    failed = [str(p) for (p, _), png in zip(chosen, pngs) if not isinstance(png, bytes)]
    rows = [(p, m, png) for (p, m), png in zip(chosen, pngs) if isinstance(png, bytes)]
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (path, m, png) in enumerate(rows):
        shard, idx = divmod(i, shard_size)
        key = f"{shard:05d}{idx:04d}"
        records.append({"key": key, "shard": shard, "url": str(path), **m, "license": LICENSE, "png": png})
    shards = sorted({r["shard"] for r in records})
    for form in ("shards", "plain"):
        if form not in forms:
            continue
        (out / form).mkdir(exist_ok=True)
        for s in shards:
            members = []
            for r in (r for r in records if r["shard"] == s):
                members.append((f"{r['key']}.png", r["png"]))
                if form == "shards":
                    members.append((f"{r['key']}.txt", (r["title"] or "").encode("utf-8")))
                    info = {k: r[k] for k in ("key", "url", "title", "keywords", "original_width", "original_height",
                                              "sha256", "license")}
                    members.append((f"{r['key']}.json", json.dumps(info, ensure_ascii=False).encode("utf-8")))
            _tar(out / form / f"openclipart-{s:05d}.tar", members)
    if "parquet" in forms:
        import pyarrow as pa
        import pyarrow.parquet as pq

        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        table = pa.table({
            "key": pa.array([r["key"] for r in records], pa.string()),
            "image": pa.array([{"bytes": r["png"], "path": f"{r['key']}.png"} for r in records], image_type),
            "TEXT": pa.array([r["title"] for r in records], pa.string()),
            "URL": pa.array([r["url"] for r in records], pa.string()),
            "WIDTH": pa.array([r["original_width"] for r in records], pa.int64()),
            "HEIGHT": pa.array([r["original_height"] for r in records], pa.int64()),
            "similarity": pa.array([similarity(r["title"], r["keywords"]) for r in records], pa.float64()),
            "uid": pa.array([r["sha256"][:32] for r in records], pa.string()),
        })
        tmp = out / "openclipart.parquet.tmp"
        pq.write_table(table, tmp, row_group_size=256)
        tmp.replace(out / "openclipart.parquet")
    kinds: dict[str, int] = {}
    for r in records:
        if is_odd(r["title"]):
            kinds[odd_kind(r["title"])] = kinds.get(odd_kind(r["title"]), 0) + 1
    index = {"source": str(SVG_ROOT), "count": len(records), "size": size, "shard_size": shard_size,
             "odd_titles": sum(kinds.values()), "odd_kinds": kinds, "rsvg_failed": failed,
             "rows": [{"key": r["key"], "url": r["url"], "title": r["title"]} for r in records]}
    (out / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n")
    index["seconds"] = time.time() - t0
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--count", default="96", help="drawings to take, or 'all' (8,121)")
    p.add_argument("--size", type=int, default=32, help="pixels per side of the square PNGs")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--odd", type=int, default=0, help="of --count, this many with odd titles (see above)")
    p.add_argument("--forms", default="shards,parquet", help="comma-separated: shards, plain, parquet")
    p.add_argument("--jobs", type=int, default=2, help="rsvg-convert processes at once")
    a = p.parse_args(argv)
    forms = {f.strip() for f in a.forms.split(",") if f.strip()}
    if forms - {"shards", "plain", "parquet"}:
        p.error(f"--forms: unknown {sorted(forms - {'shards', 'plain', 'parquet'})}")
    index = make(Path(a.out), None if a.count == "all" else int(a.count), a.size, a.shard_size, a.odd, forms, a.jobs)
    print(f"{index['count']:,} drawings ({index['odd_titles']} with odd titles) at {a.size} px into {a.out} "
          f"({', '.join(sorted(forms))}) in {index['seconds']:.1f} s; rsvg-convert failed on {len(index['rsvg_failed'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
