"""Corpus sources: URL patterns -> sorted units of work -> raw samples.

A unit is the unit of work: one input file (a WebDataset tar shard, a Parquet file with an
image-bytes column, an IDX file) or a fixed group of files of an image folder (a "folder unit").
Units are listed and sorted on the driver; everything downstream is a function of that list.

    units = list_units(["/data/train-{000000..000099}.tar", "s3://bucket/more/*.tar"])
    for sample in iter_unit(units[0], on_failure=failures.add):
        pixels = preprocess.decode(sample.data, max_pixels)  # (S, S, C) uint8, or DecodeError

Raw samples carry encoded image bytes (tar members, image files) or already-decoded uint8 pixels
(IDX); Preprocess.decode (models/tokenizer.py) makes either into model pixels, and refuses what is
not a safe, whole image with a DecodeError; callers skip and record those (a Failure each).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
from braceexpand import braceexpand

from .captions import CAPTION_MEMBERS, META_MEMBER, PARQUET_CAPTION_COLUMNS, TextFields
from .errors import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
SIDECAR_EXTS = ("txt", "json")  # image folders: NAME.txt (caption) and NAME.json (metadata) beside NAME.jpg
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Parquet inputs: the first column found by these names (image: binary, or a struct with a
# "bytes" field as Hugging Face datasets write images; key: any type; label: integer)
PARQUET_IMAGE_COLUMNS = ("image", "img", "png", "jpg", "jpeg", "webp", "image_bytes", "bytes")
PARQUET_KEY_COLUMNS = ("key", "__key__", "id", "name", "path")
PARQUET_LABEL_COLUMNS = ("label", "cls", "labels", "class")
IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$")
# IDX captions: a text file beside the images file, named like it with "captions.txt" (or
# "captions.txt.gz") in place of "images-idx3-ubyte[.gz]": t10k-images-idx3-ubyte.gz -> t10k-captions.txt
IDX_CAPTIONS = re.compile(r"(images-)?idx3-ubyte(\.gz)?$")
IDX_CAPTION_SUFFIXES = ("captions.txt", "captions.txt.gz")  # the first found is used
FOLDER_UNIT_SIZE = 1000  # image files per unit, on average, when reading an image folder (see _folder_units)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Unit:
    url: str  # the shard or file; for a folder unit, FOLDER#RELATIVE/PATH of the file that starts it
    kind: str  # "tar" | "idx" | "files" | "parquet"
    files: tuple[str, ...] = ()  # "files": the image files of this folder unit
    labels: tuple[int | None, ...] = ()  # "files": the label of each file (from its parent folder)
    labels_url: str | None = None  # "idx": the matching labels file, when there is one
    # "idx": the captions file beside it (one line per image; see _idx_captions_url), when there is one
    captions_url: str | None = None
    # "files": each file's caption sidecar (NAME.txt beside NAME.jpg) and metadata sidecar
    # (NAME.json), "" where there is none; empty tuples when the folder unit has no sidecars at all
    captions: tuple[str, ...] = ()
    metas: tuple[str, ...] = ()
    signature: str = ""  # what the unit held when listed (sizes, ETags or mtimes, files, labels), hashed


@dataclass
class RawSample:
    key: str
    data: bytes | np.ndarray  # encoded image bytes, or uint8 pixels (H, W[, C])
    label: int | None
    unit: str
    caption: object = None  # raw: bytes (a member, a sidecar), a Parquet value, None (none); see captions.py
    meta: bytes | dict | None = None  # raw: a KEY.json member's or sidecar's bytes, or Parquet values by column


@dataclass
class Failure:
    key: str
    unit: str
    reason: str
    # True when the unit itself is damaged (a cut-short or corrupt shard, an unreadable Parquet or
    # IDX file): one Failure then stands for every image lost after `key` ("<after N samples>"),
    # however many, so jobs count these apart from bad images
    unit_damaged: bool = False


@dataclass
class FailureLog:
    """Counts skipped inputs and keeps the first few for the report."""

    keep: int = 20
    count: int = 0
    examples: list[Failure] = field(default_factory=list)
    verbose: bool = True

    def add(self, f: Failure) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f)
            if self.verbose:
                print(f"vqtok: skipped {f.key!r} in {f.unit}: {f.reason}", flush=True)


# ----------------------------------------------------------------------------------------------
# Patterns -> units
# ----------------------------------------------------------------------------------------------
def split_patterns(data: str | Sequence[str]) -> list[str]:
    """'a.tar,b-{0..3}.tar' or ['a.tar', ...] -> patterns (commas inside braces are kept)."""
    items = [data] if isinstance(data, str) else list(data)
    out: list[str] = []
    for item in items:
        depth, cur = 0, ""
        for ch in item:
            depth += ch == "{"
            depth -= ch == "}"
            if ch == "," and depth == 0:
                out.append(cur)
                cur = ""
            else:
                cur += ch
        out.append(cur)
    return [p.strip() for p in out if p.strip()]


def list_units(data: str | Sequence[str], *, folder_unit_size: int = FOLDER_UNIT_SIZE) -> list[Unit]:
    """Expand patterns (braces, globs, directories, any fsspec URL) into sorted, de-duplicated units,
    each with its signature. Raises DataError naming any pattern that matches nothing."""
    patterns = split_patterns(data)
    if not patterns:
        raise DataError("no input data given: pass --data with a path or URL pattern (e.g. /data/train-{000..009}.tar)")
    units: dict[str, Unit] = {}
    for pattern in patterns:
        found = 0
        for url in braceexpand(pattern):
            for unit in _units_for(url, folder_unit_size):
                units.setdefault(unit.url, unit)
                found += 1
        if not found:
            raise DataError(
                f"input pattern {pattern!r} matches no input: check the path (brace ranges look like "
                f"train-{{000000..000099}}.tar; globs like shards/*.tar), or that the directory holds "
                f".tar shards, Parquet files, IDX files or images ({', '.join(IMAGE_EXTS)})"
            )
    return sorted(units.values(), key=lambda u: u.url)


def _units_for(url: str, folder_unit_size: int) -> list[Unit]:
    fs, path = fsspec.core.url_to_fs(url)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    full = lambda p: proto + p if proto and not p.startswith(proto) else p  # noqa: E731
    if _GLOB_CHARS.search(path):
        found = fs.glob(path, detail=True)
        files = {full(p): info for p, info in sorted(found.items()) if info.get("type") != "directory"}
        return _classify(files, folder_unit_size, base=None)
    if not fs.exists(path):
        return []
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        files = {full(p): info for p, info in sorted(found.items()) if not posixpath.basename(p).startswith(".")}
        return _classify(files, folder_unit_size, base=full(path))
    return _classify({full(path): fs.info(path)}, folder_unit_size, base=None)


def _stamp(info: dict) -> str:
    """What identifies a file's version without reading it: its size and its ETag (object stores)
    or modification time (local disk)."""
    version = next((info[k] for k in ("ETag", "etag", "md5", "generation", "mtime", "LastModified", "last_modified",
                                      "created") if info.get(k) is not None), "")
    return f"{info.get('size')}:{version}"


def _signature(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _classify(files: dict[str, dict], folder_unit_size: int, base: str | None) -> list[Unit]:
    """files: {url: fsspec info}, sorted by URL."""
    urls = list(files)
    units = [Unit(url=f, kind="tar", signature=_signature(_stamp(files[f]))) for f in urls if f.endswith(TAR_SUFFIXES)]
    units += [Unit(url=f, kind="parquet", signature=_signature(_stamp(files[f])))
              for f in urls if f.endswith(PARQUET_SUFFIXES)]
    for f in urls:
        if IDX_IMAGES.search(f):
            labels = re.sub(r"images-idx3", "labels-idx1", f).replace("idx3-ubyte", "idx1-ubyte")
            label_info = files.get(labels) or (_info(labels) if labels != f else None)
            stamps = [_stamp(files[f]), label_info and _stamp(label_info)]
            captions, caption_info = _idx_captions_url(f, files)
            if caption_info:  # only then: a unit without captions keeps the signature it had before
                stamps.append(_stamp(caption_info))
            units.append(Unit(url=f, kind="idx", labels_url=labels if label_info else None,
                              captions_url=captions if caption_info else None, signature=_signature(*stamps)))
    images = [f for f in urls if _ext(f) in IMAGE_EXTS]
    if images and len(units) == 0:
        units += _folder_units(images, [_stamp(files[f]) for f in images], folder_unit_size, base,
                               sidecars={f: _stamp(info) for f, info in files.items() if _ext(f) in SIDECAR_EXTS})
    return units


def _folder_units(images: list[str], stamps: list[str], size: int, base: str | None,
                  sidecars: dict[str, str] | None = None) -> list[Unit]:
    """An image folder's files (sorted) cut into units at content-defined boundaries: a file starts
    a new unit when the hash of its path relative to the folder is 0 mod `size` (so units hold
    `size` files on average). Adding or removing a file changes only the unit it falls into (or
    splits/merges one unit, if the file is itself a boundary): the other units keep their files,
    names and committed parts. A unit is named after the file that starts it (`FOLDER#first/file.jpg`;
    the first unit, before any boundary, is `FOLDER#`).

    sidecars: {url: stamp} of the folder's .txt and .json files; NAME.txt beside NAME.jpg is its
    caption, NAME.json its metadata. They are part of the unit's input (their stamps go into its
    signature, so an edited caption redoes the unit); a unit without any keeps the signature it had
    before vqtok read sidecars, so datasets tokenized then are not redone."""
    sidecars = sidecars or {}
    parents = [posixpath.basename(posixpath.dirname(f)) for f in images]
    labels: list[int | None]
    if base is not None and all(posixpath.dirname(f) != base.rstrip("/") for f in images):
        # Every image sits in a sub-folder: the sub-folder names are the classes.
        if all(p.isdigit() for p in parents):
            labels = [int(p) for p in parents]
        else:
            classes = {name: i for i, name in enumerate(sorted(set(parents)))}
            labels = [classes[p] for p in parents]
    else:
        labels = [None] * len(images)
    root = base.rstrip("/") if base else posixpath.dirname(images[0])
    rel = [f[len(root) + 1:] if f.startswith(root + "/") else posixpath.basename(f) for f in images]
    starts = [0] + [i for i in range(1, len(images)) if _boundary(rel[i], size)]
    stem = lambda f: f.rsplit(".", 1)[0]  # noqa: E731
    captions = [f"{stem(f)}.txt" if f"{stem(f)}.txt" in sidecars else "" for f in images]
    metas = [f"{stem(f)}.json" if f"{stem(f)}.json" in sidecars else "" for f in images]
    units = []
    for a, b in zip(starts, starts[1:] + [len(images)]):
        name = rel[a] if a else ""
        cap, met = captions[a:b], metas[a:b]
        if any(cap) or any(met):
            side = [[sidecars[c] if c else None, sidecars[m] if m else None] for c, m in zip(cap, met)]
            signature = _signature(rel[a:b], stamps[a:b], labels[a:b], side)
            cap, met = tuple(cap), tuple(met)
        else:
            signature, cap, met = _signature(rel[a:b], stamps[a:b], labels[a:b]), (), ()
        units.append(Unit(url=f"{root}#{name}", kind="files", files=tuple(images[a:b]), labels=tuple(labels[a:b]),
                          captions=cap, metas=met, signature=signature))
    return units


def _idx_captions_url(images_url: str, files: dict[str, dict]) -> tuple[str | None, dict | None]:
    """The captions file of an IDX images file, and its fsspec info; (None, None) when there is none.

    X-images-idx3-ubyte[.gz] -> X-captions.txt, else X-captions.txt.gz (the first that exists). The
    file holds one caption per image, in the images' order: line i (lines end with "\\n"; a final line
    end is optional) is image i's caption, so a caption cannot contain a newline. Its stamp joins the
    unit's signature: editing, adding or removing the file redoes the unit."""
    for suffix in IDX_CAPTION_SUFFIXES:
        url = IDX_CAPTIONS.sub(suffix, images_url)
        if url == images_url:
            continue
        info = files.get(url) or _info(url)
        if info and info.get("type") != "directory":
            return url, info
    return None, None


def _boundary(relative_path: str, size: int) -> bool:
    h = int.from_bytes(hashlib.blake2b(relative_path.encode(), digest_size=8).digest(), "big")
    return size <= 1 or h % size == 0


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""


def _info(url: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# Units -> raw samples
# ----------------------------------------------------------------------------------------------
def iter_unit(unit: Unit, on_failure: Callable[[Failure], None], text: TextFields | None = None) -> Iterator[RawSample]:
    """Raw samples of one unit, in stored order, with their raw captions and metadata
    (pipeline/captions.py; `text` says which Parquet columns). Bad members are reported through
    on_failure and skipped; a unit that cannot be read past some point (a truncated tar) is
    reported and ended."""
    text = text or TextFields()
    if unit.kind == "tar":
        yield from _iter_tar(unit, on_failure)
    elif unit.kind == "idx":
        yield from _iter_idx(unit, on_failure)
    elif unit.kind == "files":
        yield from _iter_files(unit, on_failure)
    elif unit.kind == "parquet":
        yield from _iter_parquet(unit, on_failure, text)
    else:
        raise DataError(f"unknown unit kind {unit.kind!r} for {unit.url}")


class _TailReader:
    """A read-through wrapper that counts bytes and keeps the last block, to tell a tar that ended
    with its end-of-archive marker from one cut off at a member boundary (which tarfile's stream
    mode takes for a normal end, silently)."""

    def __init__(self, f):
        self.f, self.total, self.tail = f, 0, b""

    def read(self, n=-1):
        data = self.f.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-512:]
        return data

    def complete(self) -> bool:
        self.read(1 << 16)  # what tarfile left unread: padding after the marker
        return self.total > 0 and self.total % 512 == 0 and self.tail == bytes(512)


_TAR_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # KEY.EXT: the key ends at the basename's first dot


def tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream, in order, reading the 512-byte headers
    directly (ustar and GNU names, pax `path` records, base-256 sizes): about 20x less work per
    member than tarfile's TarInfo objects, which matters once each image has a caption and a .json
    beside it. Stops at the end-of-archive block; raises tarfile.ReadError on a bad header checksum
    or a member cut short (a stream that simply ends is left to the caller, see _TailReader)."""
    long_name = None
    while True:
        h = f.read(512)
        if not h or h == bytes(512):
            return
        if len(h) < 512:
            raise tarfile.ReadError(f"a tar header cut short ({len(h)} of 512 bytes)")
        want = _octal(h[148:156])
        if want != sum(h[:148]) + 256 + sum(h[156:]):  # the checksum field counts as 8 spaces
            raise tarfile.ReadError("bad tar header checksum: the shard is corrupt")
        size = int.from_bytes(h[125:136], "big") if h[124] & 0x80 else _octal(h[124:136])
        data = f.read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"a tar member cut short ({len(data)} of {size} bytes)")
        f.read(-size % 512)
        kind = h[156:157]
        if kind == b"L":  # GNU: the next member's long name
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax: the next member's path, when it has one
            for line in data.decode("utf-8", "surrogateescape").splitlines():
                key, _, value = line.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers: no file
            long_name = None
            continue
        name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = h[345:500].split(b"\0", 1)[0] if h[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        yield (long_name or name), data
        long_name = None


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"bad tar header number {field!r}: the shard is corrupt") from None


def tar_samples(f) -> Iterator[dict]:
    """A tar stream's members grouped into samples as WebDataset groups them: consecutive members
    KEY.EXT with the same KEY make one sample {"__key__": KEY, EXT (lowercased): bytes}. A KEY with
    the same EXT twice raises ValueError (tar_members: tarfile.ReadError for corrupt streams)."""
    sample: dict | None = None
    for name, data in tar_members(f):
        m = _TAR_KEY.match(name)
        if m is None:
            continue  # no extension: not part of any sample
        key, ext = m.group(1), m.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if ext in sample:
            raise ValueError(f"{name}: a second {ext!r} member for key {key!r} (duplicate file name in the shard)")
        sample[ext] = data
    if sample is not None:
        yield sample


def _iter_tar(unit: Unit, on_failure) -> Iterator[RawSample]:
    n = 0
    try:
        with fsspec.open(unit.url, "rb", compression="infer") as f:
            reader = _TailReader(f)
            for sample in tar_samples(reader):
                key = sample["__key__"]
                n += 1
                image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if image_ext is None:
                    found = sorted(k for k in sample if not k.startswith("__"))
                    on_failure(Failure(key, unit.url, f"no image member (found: {', '.join(found) or 'nothing'})"))
                    continue
                label = None
                if "cls" in sample:
                    try:
                        label = int(sample["cls"].decode().strip())
                    except (ValueError, UnicodeDecodeError):
                        on_failure(Failure(key, unit.url, f"bad .cls label {sample['cls'][:20]!r}: expected an integer"))
                        continue
                caption = next((sample[e] for e in CAPTION_MEMBERS if e in sample), None)
                yield RawSample(key=key, data=sample[image_ext], label=label, unit=unit.url, caption=caption,
                                meta=sample.get(META_MEMBER))
            if not reader.complete():
                raise tarfile.ReadError(f"no end-of-archive marker after {reader.total} bytes: the shard is cut short")
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        # truncated or corrupt archive (or a duplicate member name): keep what was read, report the rest
        on_failure(Failure(f"<after {n} samples>", unit.url, f"unreadable tar ({type(e).__name__}: {e})",
                           unit_damaged=True))


def _parquet_columns(schema, text: TextFields | None = None) -> tuple[str | None, str | None, str | None, str | None, list[str]]:
    """(image, key, label, caption, kept metadata columns) of a Parquet schema; None where absent."""
    import pyarrow as pa

    text = text or TextFields()
    names = {n.lower(): n for n in schema.names}

    def first(candidates, ok):
        return next((names[c] for c in candidates if c in names and ok(schema.field(names[c]).type)), None)

    is_image = lambda t: (pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
                          or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))
    image = first(PARQUET_IMAGE_COLUMNS, is_image)
    if text.caption_column:  # named: exactly that column (a file without it has no captions)
        caption = text.caption_column if text.caption_column in schema.names else None
    else:
        caption = first(PARQUET_CAPTION_COLUMNS, lambda t: True)
    if text.keep_all:
        kept = [n for n in schema.names if n != image]
    else:
        kept = [n for n in text.keep_columns if n in schema.names]
    return (image, first(PARQUET_KEY_COLUMNS, lambda t: True), first(PARQUET_LABEL_COLUMNS, pa.types.is_integer),
            caption, kept)


def _iter_parquet(unit: Unit, on_failure, text: TextFields) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    stem = posixpath.basename(unit.url).rsplit(".", 1)[0]
    row = 0
    try:
        with fsspec.open(unit.url, "rb") as f:
            pf = pq.ParquetFile(f)
            image, key, label, caption, kept = _parquet_columns(pf.schema_arrow, text)
            if image is None:
                on_failure(Failure("<file>", unit.url, f"no image column: expected a binary column named one of "
                                   f"{', '.join(PARQUET_IMAGE_COLUMNS)} (found {', '.join(pf.schema_arrow.names)})",
                                   unit_damaged=True))
                return
            columns = list(dict.fromkeys(c for c in (image, key, label, caption, *kept) if c))
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                col = batch.column(image)
                if hasattr(col.type, "get_field_index"):  # struct<bytes, path>
                    col = col.field("bytes")
                datas = col.to_pylist()
                keys = batch.column(key).to_pylist() if key else [None] * len(datas)
                labels = batch.column(label).to_pylist() if label else [None] * len(datas)
                captions = batch.column(caption).to_pylist() if caption else [None] * len(datas)
                metas = ([dict(zip(kept, values)) for values in zip(*(batch.column(c).to_pylist() for c in kept))]
                         if kept else [None] * len(datas))
                for data, k, lab, cap, meta in zip(datas, keys, labels, captions, metas):
                    k = f"{stem}/{row:08d}" if k is None else str(k)
                    row += 1
                    if data is None:
                        on_failure(Failure(k, unit.url, "null image bytes"))
                        continue
                    yield RawSample(key=k, data=data, label=lab, unit=unit.url, caption=cap, meta=meta)
    except Exception as e:  # a corrupt or truncated file: keep what was read, report the rest
        on_failure(Failure(f"<after {row} rows>", unit.url, f"unreadable Parquet file ({type(e).__name__}: {e})",
                           unit_damaged=True))


def read_idx(url: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array; uint8 data only."""
    with fsspec.open(url, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{url} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim)  # writable
    if body.size != int(np.prod(dims)):
        raise DataError(f"{url}: IDX header says {dims} ({int(np.prod(dims))} bytes) but holds {body.size} bytes")
    return body.reshape(dims)


def _iter_idx(unit: Unit, on_failure) -> Iterator[RawSample]:
    try:
        images = read_idx(unit.url)
        labels = read_idx(unit.labels_url) if unit.labels_url else None
    except Exception as e:
        on_failure(Failure("<file>", unit.url, f"unreadable IDX file ({type(e).__name__}: {e})", unit_damaged=True))
        return
    if labels is not None and len(labels) != len(images):
        on_failure(Failure("<labels>", unit.url, f"{len(labels)} labels for {len(images)} images: labels ignored"))
        labels = None
    captions = _idx_captions(unit, len(images))
    stem = os.path.basename(unit.url).split(".")[0]
    for i in range(len(images)):
        yield RawSample(key=f"{stem}/{i:06d}", data=images[i], label=None if labels is None else int(labels[i]),
                        unit=unit.url, caption=None if captions is None else captions[i])


def _idx_captions(unit: Unit, n_images: int) -> list[bytes] | None:
    """The lines of an IDX unit's captions file as bytes (captions.py cleans each; an empty line is
    an empty caption), or None when it has none, or when the file cannot be read or does not hold
    one line per image. Those two are not failed images (every image is still read, with no
    caption, counted as missing): they are printed as a warning, not passed to on_failure (which
    counts each report as a failed image)."""
    if not unit.captions_url:
        return None
    try:
        with fsspec.open(unit.captions_url, "rb", compression="infer") as f:
            data = f.read()
    except Exception as e:
        _warn(f"unreadable captions file {unit.captions_url} ({type(e).__name__}: {e}): captions ignored for {unit.url}")
        return None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the final line end
        lines.pop()
    if len(lines) != n_images:
        _warn(f"{unit.captions_url} holds {len(lines)} captions for {n_images} images (one line per image, in order): "
              f"captions ignored for {unit.url}")
        return None
    return lines


def _warn(message: str) -> None:
    print(f"vqtok: warning: {message}", file=sys.stderr, flush=True)


def _iter_files(unit: Unit, on_failure) -> Iterator[RawSample]:
    root = unit.url.split("#", 1)[0]
    captions = unit.captions or ("",) * len(unit.files)
    metas = unit.metas or ("",) * len(unit.files)
    for path, label, caption_url, meta_url in zip(unit.files, unit.labels, captions, metas):
        key = posixpath.splitext(path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path))[0]
        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except Exception as e:
            on_failure(Failure(key, unit.url, f"unreadable file {path} ({type(e).__name__}: {e})"))
            continue
        yield RawSample(key=key, data=data, label=label, unit=unit.url, caption=_read_sidecar(caption_url),
                        meta=_read_sidecar(meta_url))


def _read_sidecar(url: str) -> bytes | None:
    """A sidecar's bytes; None where there is none (or it went since listing: a missing caption)."""
    if not url:
        return None
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
