"""Reading a token dataset (the format: pipeline/token_format.py). Only committed parts are read.

    ds = TokenDataset("out/tokens")
    ds.num_rows, ds.grid, ds.codebook_size
    tokens, labels = ds.to_numpy()                 # (N, h, w) uint16/int32, (N,) int32 (-1 = none)
    for batch in ds.iter_batches(4096): ...        # streaming pyarrow RecordBatches
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .token_format import (ERRORS_DIR, FORMAT, MANIFEST, SCHEMA_VERSION, Part, flat_tokens, read_committed, sha256,
                           token_schema, token_type)


def iter_part_rows(part: Part, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A part's rows in record batches: (tokens (m, h*w) as stored (uint16/int32), labels (m,)
    int64 with -1 where there is none)."""
    with fsspec.open(part.url, "rb") as f:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["tokens", "label"]):
            tokens = flat_tokens(rb.column(0)).reshape(len(rb), -1)
            labels = rb.column(1).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            yield tokens, labels


class _DescribedByMetadata:
    """What the schema metadata (`self.metadata`) says about tokens: shared by TokenDataset and
    TokenCorpus (pipeline/token_stream.py)."""

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
    """A committed token dataset, read with plain pyarrow. Only committed parts are read (the
    manifest plus the commit records of the run writing it, see read_committed): an orphan part
    from a crashed run is invisible. Parts are in the order of their input units' URLs, which is
    the order a clean run over the same inputs writes, whatever the dataset's history."""

    def __init__(self, path: str, *, storage_options: dict | None = None):
        self.path = str(path).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.path, **(storage_options or {}))
        state = read_committed(self.fs, self.root)
        if state is None:
            raise FileNotFoundError(
                f"{path} is not a token dataset: no {MANIFEST} (write one with `vqtok tokenize --out {path}`)"
            )
        manifest, committed = state
        if manifest.get("format") != FORMAT:
            raise DataError(f"{path}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise DataError(f"{path}: schema_version {manifest['schema_version']} is newer than this vqtok reads "
                             f"({SCHEMA_VERSION}); upgrade vqtok")
        self.manifest = manifest
        self.metadata: dict = manifest["metadata"]
        self.committed: dict[str, dict] = committed  # unit URL -> its commit record
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        self.parts = sorted(
            (Part(c["part"], unit, c["rows"], c["bytes"], c["sha256"], f"{prefix}{self.root}/{c['part']}")
             for unit, c in committed.items()),
            key=lambda p: p.unit,
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
        return int(sum(c.get("failures", 0) for c in self.committed.values()))

    def files(self) -> list[str]:
        """Full paths (as the filesystem names them) of the committed parts, in order."""
        return [f"{self.root}/{p.name}" for p in self.parts]

    def urls(self) -> list[str]:
        """The committed parts' URLs (s3://... on object stores), in order: the list to hand a reader
        outside vqtok (`ray.data.read_parquet(urls)`, `datasets.load_dataset("parquet",
        data_files=urls)`), which would otherwise also take a crashed run's orphan part."""
        return [p.url for p in self.parts]

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
        h, w = self.grid
        return flat_tokens(batch.column("tokens")).reshape(len(batch), h, w)

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
