"""The token dataset's format: what is on disk, and which of it is committed. Both the writer
(pipeline/token_writer.py) and the reader (pipeline/token_dataset.py) follow it.

A token dataset is a directory (or object-store prefix) holding

    part-NNNNNN-RUN.parquet  one per input unit, zstd; columns key, tokens, grid_h, grid_w, label, source,
                             caption, meta (schema_version 2; parts of version 1 have no caption/meta)
    _manifest.json           the plan (unit -> part number) and the committed parts (rows, bytes, sha256,
                             the input's signature), as of the last compaction
    _commits/SEQ-RUN.json    one small record per unit committed since then (the commit point)
    _errors/                 one JSON line per skipped input (key, unit, reason, unit_damaged) and per
                             repaired or unusable caption (key, unit, reason, kind "caption"), a file per part
    _lease                   (_lease.json on object stores) who is writing (pipeline/lease.py)

Schema metadata key b"vqtok" holds JSON: schema_version, codebook_size, tokenizer_id, grid,
preprocess, text (caption_column, keep_columns, max_caption_bytes: pipeline/captions.py),
vqtok_version. Everything here is plain pyarrow; the committed set is the manifest plus
the commit records (read_committed), so a reader outside vqtok reads the files TokenDataset(OUT).files()
lists (`vqtok inspect OUT --files`): a directory listing would also take a crashed run's orphan part.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .sources import Unit

SCHEMA_VERSION = 2  # of the parts. 2: caption and meta columns (1: none; read as nulls)
TEXT_FIELDS = ("caption", "meta")  # added in schema_version 2, both string, null where there is none
MANIFEST_VERSION = 2  # 2: commit records in _commits/, folded into the manifest (1: manifest rewritten per commit)
METADATA_KEY = b"vqtok"
MANIFEST = "_manifest.json"
ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
COMMITS_DIR = "_commits"
FORMAT = "vqtok-tokens"


def part_name(index: int, run: str) -> str:
    """part-NNNNNN-RUN.parquet: the unit's part number (fixed when the unit is first planned, in the
    order of the sorted inputs) and the id of the run that wrote it (so a run that lost its lease
    cannot overwrite the new holder's parts)."""
    return f"part-{index:06d}-{run}.parquet"


def errors_name(part: str) -> str:
    return f"{ERRORS_DIR}/{part.removesuffix('.parquet')}.jsonl"


def token_type(codebook_size: int) -> pa.DataType:
    return pa.uint16() if codebook_size <= 65536 else pa.int32()


def token_schema(meta: dict) -> pa.Schema:
    """The explicit Arrow schema of a part, with the dataset's metadata attached."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(token_type(meta["codebook_size"])), nullable=False),
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),  # the image's caption (pipeline/captions.py)
        pa.field("meta", pa.string(), nullable=True),  # kept source metadata, a JSON object as text
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def dataset_metadata(*, codebook_size: int, tokenizer_id: str, grid: tuple[int, int], preprocess: dict,
                     vqtok_version: str, text: dict | None = None) -> dict:
    """text: TextFields.to_dict(), what the run keeps of captions and metadata."""
    from .captions import TextFields

    return {
        "schema_version": SCHEMA_VERSION,
        "codebook_size": int(codebook_size),
        "tokenizer_id": tokenizer_id,
        "grid": [int(grid[0]), int(grid[1])],
        "preprocess": preprocess,
        "text": text if text is not None else TextFields().to_dict(),
        "vqtok_version": vqtok_version,
    }


def tokens_array(tokens: np.ndarray, codebook_size: int, mask: np.ndarray | None = None) -> pa.ListArray:
    """(n, h, w) integer grids -> list<uint16|int32> rows, row-major; rows where `mask` is True are null."""
    n = tokens.shape[0]
    flat = np.ascontiguousarray(tokens.reshape(n, -1)).astype(token_type(codebook_size).to_pandas_dtype(), copy=False)
    per = flat.shape[1]
    offsets = pa.array(np.arange(0, (n + 1) * per, per, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)),
                                    mask=None if mask is None else pa.array(mask, pa.bool_()))


def part_table(meta: dict, keys, tokens, labels, source: str, captions=None, metas=None) -> pa.Table:
    """A part's rows. keys/labels/captions/metas: lists or Arrow arrays (captions, metas: None for
    all null); tokens: (n, h, w) integer grids, or the list<uint16|int32> Arrow column the encoders
    return (used as it is)."""
    n = len(keys)
    text = lambda v: pa.nulls(n, pa.string()) if v is None else pa.array(v, pa.string()) if isinstance(v, list) else v  # noqa: E731
    h, w = meta["grid"]
    if isinstance(tokens, np.ndarray):
        tokens = tokens_array(tokens, meta["codebook_size"])
    return pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()) if isinstance(keys, list) else keys,
            tokens,
            pa.array(np.full(n, h, np.int16)),
            pa.array(np.full(n, w, np.int16)),
            pa.array(labels, pa.int32()) if isinstance(labels, list) else labels,
            pa.array([source] * n, pa.string()),
            text(captions),
            text(metas),
        ],
        schema=token_schema(meta),
    )


def flat_tokens(col: pa.ListArray | pa.ChunkedArray) -> np.ndarray:
    """A list<uint16|int32> column's values, (rows * h * w,), honouring a sliced array's offset
    (`ListArray.values` would not: it is the whole child array, whatever the slice)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TOKEN_IDENTITY = ("tokenizer_id", "preprocess", "codebook_size", "grid")  # what makes two datasets' tokens alike


def fingerprint(meta: dict) -> str:
    """The tokens' identity (TOKEN_IDENTITY: tokenizer and preprocessing), hashed, as manifests
    record it. Manifests of schema_version 1 hashed schema_version with it; writers compare
    TOKEN_IDENTITY itself (same_tokens), which both carry in their metadata."""
    key = {k: meta[k] for k in TOKEN_IDENTITY}
    return sha256(json.dumps(key, sort_keys=True).encode())


def same_tokens(a: dict, b: dict) -> bool:
    """Whether two datasets' metadata describe the same tokens (tokenizer, preprocessing, K, grid)."""
    return all(json.dumps(a.get(k), sort_keys=True) == json.dumps(b.get(k), sort_keys=True) for k in TOKEN_IDENTITY)


def caption_counts(committed: dict[str, dict]) -> dict[str, int]:
    """Rows by caption, from commit records: with a caption (of them repaired), unusable (null:
    empty, ...), missing (none in the source), and rows in parts written before captions."""
    c = list(committed.values())
    rows = sum(r["rows"] for r in c)
    old = sum(r["rows"] for r in c if r.get("schema_version", 1) < 2)
    captioned = sum(r.get("captions", 0) for r in c)
    unusable = sum(r.get("captions_unusable", 0) for r in c)
    return {"rows": rows, "captioned": captioned, "repaired": sum(r.get("captions_repaired", 0) for r in c),
            "unusable": unusable, "missing": rows - old - captioned - unusable, "before_captions": old}


def describe_captions(c: dict[str, int]) -> str:
    """'captions: 9,812 of 10,000 rows (12 repaired; 3 unusable, null; 185 with none in the source)'."""
    notes = [f"{c['repaired']:,} repaired"] if c["repaired"] else []
    notes += [f"{c['unusable']:,} unusable, null"] if c["unusable"] else []
    notes += [f"{c['missing']:,} with none in the source"] if c["missing"] else []
    notes += [f"{c['before_captions']:,} in parts written before captions"] if c["before_captions"] else []
    return f"captions: {c['captioned']:,} of {c['rows']:,} rows" + (f" ({'; '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class Part:
    """A committed part, as the manifest records it."""

    name: str  # part-NNNNNN.parquet
    unit: str  # the input unit it holds the tokens of
    rows: int
    bytes: int
    sha256: str
    url: str  # where to read it (an fsspec URL)


# ---------------------------------------------------------------------------------------------
# The committed set: the manifest plus the commit records not yet folded into it
# ---------------------------------------------------------------------------------------------
def read_manifest(fs, root: str) -> dict | None:
    path = f"{root}/{MANIFEST}"
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); it is written atomically, so something else wrote it") from None


def read_committed(fs, root: str) -> tuple[dict, dict[str, dict]] | None:
    """(manifest, {unit url: commit record}) as of now, or None where there is no dataset.

    A record in _commits/ counts when it was written by the run the manifest names and comes after
    the last one folded into the manifest (its seq is higher); the newest record of a unit wins.
    Records are listed before the manifest is read, so one folded and deleted while we read is in
    the manifest we read; a record that vanishes between listing and reading means a compaction
    ran in between: read again."""
    for _ in range(10):
        fs.invalidate_cache(f"{root}/{COMMITS_DIR}")
        try:
            names = sorted(fs.ls(f"{root}/{COMMITS_DIR}", detail=False))
        except FileNotFoundError:
            names = []
        manifest = read_manifest(fs, root)
        if manifest is None:
            return None
        committed = dict(manifest.get("committed", {}))
        folded, run = manifest.get("seq", 0), manifest.get("run")
        wanted = [n for n in names if _record_counts(n, folded, run)]
        got = fs.cat(wanted, on_error="return") if wanted else {}  # concurrent GETs on object stores
        errors = [v for v in got.values() if isinstance(v, Exception)]
        if any(isinstance(e, FileNotFoundError) for e in errors):
            continue
        if errors:
            raise errors[0]
        records = [json.loads(v) for v in got.values()]
        for r in sorted(records, key=lambda r: r["seq"]):
            committed[r.pop("unit")] = r
        return manifest, committed
    raise DataError(f"{root}: the commit records kept changing while being read; try again")


def _record_counts(name: str, folded: int, run: str | None) -> bool:
    """Commit records are named SEQ-RUN.json (see TokenWriter.commit)."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".json")
    seq, _, by = stem.partition("-")
    return seq.isdigit() and int(seq) > folded and by == run


def input_changed(record: dict, unit: Unit) -> bool:
    """Whether a committed unit's input differs from what was tokenized (its signature changed).
    Records written before vqtok kept signatures count as unchanged."""
    return record.get("signature", unit.signature) != unit.signature
