"""The token dataset format: Parquet parts, their schema, and a reader.

A token dataset is a directory (or object-store prefix) holding

    part-NNNNNN.parquet   one per input unit, zstd; columns key, tokens, grid_h, grid_w, label, source
    _manifest.json        the source of truth: which parts are committed (rows, bytes, sha256)
    _errors/              one JSON line per skipped input (key, unit, reason), a file per unit

Schema metadata key b"vqtok" holds JSON: schema_version, codebook_size, tokenizer_id, grid,
preprocess, vqtok_version. Everything here is plain pyarrow: a user without vqtok reads the parts
listed in _manifest.json (or `pyarrow.dataset.dataset(OUT)`, which skips the _-prefixed entries).

    ds = TokenDataset("out/tokens")
    ds.num_rows, ds.grid, ds.codebook_size
    tokens, labels = ds.to_numpy()                 # (N, h, w) uint16/int32, (N,) int32 (-1 = none)
    for batch in ds.iter_batches(4096): ...        # streaming pyarrow RecordBatches
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError

SCHEMA_VERSION = 1
METADATA_KEY = b"vqtok"
MANIFEST = "_manifest.json"
ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
FORMAT = "vqtok-tokens"


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


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
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def dataset_metadata(*, codebook_size: int, tokenizer_id: str, grid: tuple[int, int], preprocess: dict,
                     vqtok_version: str) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "codebook_size": int(codebook_size),
        "tokenizer_id": tokenizer_id,
        "grid": [int(grid[0]), int(grid[1])],
        "preprocess": preprocess,
        "vqtok_version": vqtok_version,
    }


def tokens_array(tokens: np.ndarray, codebook_size: int) -> pa.ListArray:
    """(n, h, w) integer grids -> list<uint16|int32> rows, row-major."""
    n = tokens.shape[0]
    flat = np.ascontiguousarray(tokens.reshape(n, -1)).astype(token_type(codebook_size).to_pandas_dtype(), copy=False)
    per = flat.shape[1]
    offsets = pa.array(np.arange(0, (n + 1) * per, per, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))


def part_table(meta: dict, keys, tokens, labels, source: str) -> pa.Table:
    """A part's rows. keys/labels: lists or Arrow arrays; tokens: (n, h, w) integer grids, or the
    list<uint16|int32> Arrow column the encoders return (used as it is)."""
    n = len(keys)
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
        ],
        schema=token_schema(meta),
    )


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(fs, root: str) -> dict | None:
    path = f"{root}/{MANIFEST}"
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); it is written atomically, so something else wrote it") from None


@dataclass(frozen=True)
class Part:
    name: str
    unit: str
    rows: int
    bytes: int
    sha256: str


class _DescribedByMetadata:
    """What the schema metadata (`self.metadata`) says about tokens: shared by TokenDataset and
    TokenCorpus (pipeline.token_stream)."""

    metadata: dict

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.metadata["grid"]
        return int(h), int(w)

    @property
    def codebook_size(self) -> int:
        return int(self.metadata["codebook_size"])

    @property
    def tokenizer_id(self) -> str:
        return self.metadata["tokenizer_id"]


class TokenDataset(_DescribedByMetadata):
    """A committed token dataset, read with plain pyarrow. Only parts recorded in _manifest.json
    are read: an orphan part from a crashed run is invisible."""

    def __init__(self, path: str, *, storage_options: dict | None = None):
        self.path = str(path).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.path, **(storage_options or {}))
        manifest = read_manifest(self.fs, self.root)
        if manifest is None:
            raise FileNotFoundError(
                f"{path} is not a token dataset: no {MANIFEST} (write one with `vqtok tokenize --out {path}`)"
            )
        if manifest.get("format") != FORMAT:
            raise DataError(f"{path}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise DataError(f"{path}: schema_version {manifest['schema_version']} is newer than this vqtok reads "
                             f"({SCHEMA_VERSION}); upgrade vqtok")
        self.manifest = manifest
        self.metadata: dict = manifest["metadata"]
        committed = manifest.get("committed", {})
        self.parts = sorted(
            (Part(c["part"], unit, c["rows"], c["bytes"], c["sha256"]) for unit, c in committed.items()),
            key=lambda p: p.name,
        )

    # --- what it holds ------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def tokenizer_location(self) -> str:
        """Where `vqtok tokenize` read the tokenizer bundle from ("" for datasets written before
        vqtok recorded it)."""
        return self.manifest.get("tokenizer", "")

    @property
    def schema(self) -> pa.Schema:
        return token_schema(self.metadata)

    @property
    def failures(self) -> int:
        return int(sum(c.get("failures", 0) for c in self.manifest.get("committed", {}).values()))

    def files(self) -> list[str]:
        """Full paths (as the filesystem names them) of the committed parts, in part order."""
        return [f"{self.root}/{p.name}" for p in self.parts]

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}: {self.num_rows} rows in {len(self.parts)} parts, grid {self.grid}, "
                f"K={self.codebook_size})")

    # --- reading ------------------------------------------------------------------------------
    def iter_batches(self, batch_size: int = 4096, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the rows in part order, one part open at a time."""
        for path in self.files():
            with self.fs.open(path, "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def read_part(self, i: int, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.files()[i], "rb") as f:
            return pq.read_table(f, columns=columns)

    def to_table(self, columns: list[str] | None = None) -> pa.Table:
        tables = [self.read_part(i, columns) for i in range(len(self.parts))]
        if not tables:
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def grids(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """The tokens column of a batch as an (n, h, w) numpy array."""
        col = batch.column("tokens")
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        h, w = self.grid
        return col.values.to_numpy(zero_copy_only=False).reshape(len(batch), h, w)

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """All token grids (N, h, w) and labels (N,) int32 with -1 where there is none."""
        t = self.to_table(["tokens", "label"])
        labels = t.column("label").fill_null(-1).to_numpy() if t.num_rows else np.zeros(0, np.int32)
        return self.grids(t), labels.astype(np.int32)

    def to_torch(self):
        """(tokens int64 (N, h, w), labels int64 (N,)) as torch tensors."""
        import torch

        tokens, labels = self.to_numpy()
        return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))

    def describe(self, rows: int = 5) -> str:
        """What `vqtok inspect` prints: manifest summary, schema metadata, the first rows."""
        m = self.manifest
        size = sum(p.bytes for p in self.parts)
        lines = [
            f"token dataset {self.path}",
            f"  rows {self.num_rows:,} in {len(self.parts)} committed parts ({size / 1024:,.1f} KiB); "
            f"{len(m.get('units', {})) - len(self.parts)} planned units not committed; {self.failures} inputs skipped"
            + (f" (records in {ERRORS_DIR}/)" if self.failures else ""),
            f"  tokenizer {self.tokenizer_id}" + (f" (read from {self.tokenizer_location})" if self.tokenizer_location else ""),
            f"  grid {self.grid[0]}x{self.grid[1]}, codebook size {self.codebook_size}, tokens "
            f"{token_type(self.codebook_size)}, schema_version {self.metadata['schema_version']}, "
            f"vqtok {self.metadata.get('vqtok_version')}",
            f"  preprocess {json.dumps(self.metadata.get('preprocess'), sort_keys=True)}",
            "  schema: " + ", ".join(f"{f.name} {f.type}" for f in self.schema),
        ]
        if self.parts:
            lines.append("  first parts: " + ", ".join(f"{p.name} ({p.rows} rows from {p.unit})" for p in self.parts[:3]))
        if rows > 0 and self.parts:
            lines.append(f"  first {rows} rows:")
            t = self.read_part(0).slice(0, rows)
            grids = self.grids(t)
            for r, g in zip(t.to_pylist(), grids):
                flat = " ".join(str(v) for v in g.reshape(-1)[:12])
                lines.append(f"    key {r['key']!r} label {r['label']} tokens [{flat}{' ...' if g.size > 12 else ''}] "
                             f"({r['grid_h']}x{r['grid_w']})")
        return "\n".join(lines)

    def verify(self) -> list[str]:
        """Re-hash every committed part against the manifest; returns the problems found."""
        problems = []
        for p, path in zip(self.parts, self.files()):
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                problems.append(f"{p.name}: missing")
                continue
            if sha256(data) != p.sha256:
                problems.append(f"{p.name}: sha256 differs from the manifest")
        return problems
