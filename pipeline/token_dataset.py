"""Reading token datasets (the format: pipeline/token_format.py). Only committed parts are read.

    ds = TokenDataset("out/tokens")
    ds.num_rows, ds.grid, ds.codebook_size
    tokens, labels = ds.to_numpy()                 # (N, h, w) uint16/int32, (N,) int32 (-1 = none)
    for batch in ds.iter_batches(4096): ...        # streaming pyarrow RecordBatches
    ds.to_table(["key", "caption"])                # captions (null where none; parts written before
                                                   # captions, schema_version 1, read as all null)

    corpus = TokenCorpus(["out/tokens", "more"])   # one or more datasets of one tokenizer (every part's
    stats = corpus.stats()                         # schema metadata checked); unigram counts, labels
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .token_format import (ERRORS_DIR, caption_counts, describe_captions, FORMAT, MANIFEST, METADATA_KEY, SCHEMA_VERSION, TEXT_FIELDS, Part, flat_tokens,
                           read_committed, sha256, token_schema, token_type)


def iter_part_rows(part: Part, batch_rows: int, *, captions: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
    """A part's rows in record batches: (tokens (m, h*w) as stored (uint16/int32), labels (m,)
    int64 with -1 where there is none[, captions (m,) object array of str or None]). A part
    written before captions (schema_version 1) gives None captions."""
    with fsspec.open(part.url, "rb") as f:
        pf = pq.ParquetFile(f)
        has_caption = "caption" in pf.schema_arrow.names
        columns = ["tokens", "label"] + (["caption"] if captions and has_caption else [])
        for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
            tokens = flat_tokens(rb.column(0)).reshape(len(rb), -1)
            labels = rb.column(1).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            if not captions:
                yield tokens, labels
                continue
            text = np.empty(len(rb), dtype=object)
            if has_caption:
                text[:] = rb.column(2).to_pylist()
            yield tokens, labels, text


class _DescribedByMetadata:
    """What the schema metadata (`self.metadata`) says about tokens: shared by TokenDataset and
    TokenCorpus (below)."""

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

    def caption_counts(self) -> dict[str, int]:
        """Rows by caption (token_format.caption_counts)."""
        return caption_counts(self.committed)

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
        """Stream the rows in part order, one part open at a time (the dataset's schema: a part
        written before captions gives null captions)."""
        for path in self.files():
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                have = set(pf.schema_arrow.names)
                for rb in pf.iter_batches(batch_size=batch_size, columns=[c for c in columns or self.schema.names
                                                                          if c in have]):
                    yield self._conform(pa.Table.from_batches([rb]), columns).to_batches()[0] if len(rb) else rb

    def read_part(self, i: int, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.files()[i], "rb") as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            return self._conform(pf.read(columns=[c for c in columns or self.schema.names if c in have]), columns)

    def _conform(self, table: pa.Table, columns: list[str] | None) -> pa.Table:
        """A part's table in the dataset's schema (or `columns` of it): the text columns a part of
        schema_version 1 lacks are added as nulls."""
        names = columns or self.schema.names
        if all(n in table.column_names for n in names):
            return table.select(names) if columns is None else table
        arrays = [table.column(n) if n in table.column_names else pa.nulls(table.num_rows, self.schema.field(n).type)
                  for n in names]
        missing = [n for n in names if n not in table.column_names and n not in TEXT_FIELDS]
        if missing:
            raise DataError(f"{self.path}: no column {missing[0]!r} (columns: {', '.join(self.schema.names)})")
        return pa.Table.from_arrays(arrays, schema=pa.schema([self.schema.field(n) for n in names],
                                                             metadata=self.schema.metadata))

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
            "  " + describe_captions(self.caption_counts()),
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
                caption = r["caption"] if r["caption"] is None or len(r["caption"]) <= 60 else r["caption"][:57] + "..."
                lines.append(f"    key {r['key']!r} label {r['label']} tokens [{flat}{' ...' if g.size > 12 else ''}] "
                             f"({r['grid_h']}x{r['grid_w']}) caption {caption!r}"
                             + (f" meta {r['meta'][:60]}" if r["meta"] else ""))
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


# ---------------------------------------------------------------------------------------------
# Several token datasets of one tokenizer, as one corpus
# ---------------------------------------------------------------------------------------------
@dataclass
class CorpusStats:
    rows: int
    tokens: int
    counts: np.ndarray  # (K,) occurrences of each code
    labeled_rows: int
    max_label: int  # -1 when no row has a label
    sampled: bool  # True when only the first max_rows rows were counted

    @property
    def unigram_entropy_bits(self) -> float:
        """Entropy (bits per token) of the codes' empirical distribution: what a model that ignores
        context would score; a prior's bits per token should be well below it."""
        p = self.counts[self.counts > 0] / max(self.counts.sum(), 1)
        return float(-(p * np.log2(p)).sum())

    @property
    def codes_used(self) -> int:
        return int((self.counts > 0).sum())


class TokenCorpus(_DescribedByMetadata):
    """One or more token datasets of the same tokenizer, as one list of parts."""

    def __init__(self, paths: Sequence[str], *, what: str = "--tokens", check_parts: bool = True):
        paths = [str(p) for p in paths]
        if not paths:
            raise DataError(f"{what}: no token dataset given (the --out of `vqtok tokenize`)")
        self.datasets = [TokenDataset(p) for p in paths]
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if ds.tokenizer_id != first.tokenizer_id or ds.grid != first.grid or ds.codebook_size != first.codebook_size:
                raise DataError(
                    f"{what}: {ds.path} was made by tokenizer {ds.tokenizer_id[:16]} (grid {ds.grid}, K={ds.codebook_size}) "
                    f"but {first.path} by tokenizer {first.tokenizer_id[:16]} (grid {first.grid}, K={first.codebook_size}). "
                    f"A prior models one tokenizer's codes: re-tokenize everything with one tokenizer, or train one "
                    f"prior per tokenizer"
                )
        self.parts: list[Part] = [part for ds in self.datasets for part in ds.parts]
        owners = [ds for ds in self.datasets for _ in ds.parts]
        if check_parts:  # footers only; in parallel, since on an object store each is a request
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda a: self._check_part(a[0], a[1].url, what), zip(owners, self.parts)))
        if not self.parts:
            raise DataError(f"{what}: {', '.join(paths)} holds no committed parts yet (is `vqtok tokenize` still running?)")
        self.metadata = first.metadata

    @staticmethod
    def _check_part(ds: TokenDataset, url: str, what: str) -> None:
        """Each part carries its tokenizer in its own schema metadata: a part copied in from
        another dataset is caught here, not after hours of training on mixed vocabularies."""
        import json

        with fsspec.open(url, "rb") as f:
            raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("tokenizer_id") != ds.tokenizer_id or list(meta.get("grid", [])) != list(ds.grid):
            raise DataError(
                f"{what}: part {url} was made by tokenizer {str(meta.get('tokenizer_id'))[:16]} (grid {meta.get('grid')}), "
                f"but its dataset {ds.path} by tokenizer {ds.tokenizer_id[:16]} (grid {list(ds.grid)}): the dataset "
                f"mixes tokenizers. Remove that part (and its manifest entry) or re-tokenize into a new --out"
            )

    @property
    def num_rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def paths(self) -> list[str]:
        return [ds.path for ds in self.datasets]

    def stats(self, max_rows: int | None = None) -> CorpusStats:
        """Stream the tokens and labels once (or the first max_rows rows, in part order)."""
        k = self.codebook_size
        counts = np.zeros(k, np.int64)
        rows = labeled = 0
        max_label = -1
        for part in self.parts:
            for tokens, labels in iter_part_rows(part, 8192):
                if max_rows is not None and rows + len(labels) > max_rows:
                    tokens, labels = tokens[: max_rows - rows], labels[: max_rows - rows]
                counts += np.bincount(tokens.reshape(-1), minlength=k)[:k]
                rows += len(labels)
                has = labels >= 0
                labeled += int(has.sum())
                if has.any():
                    max_label = max(max_label, int(labels[has].max()))
                if max_rows is not None and rows >= max_rows:
                    break
            if max_rows is not None and rows >= max_rows:
                break
        n = self.grid[0] * self.grid[1]
        return CorpusStats(rows, rows * n, counts, labeled, max_label, sampled=rows < self.num_rows)

    def describe(self) -> str:
        return (f"{self.num_rows:,} token grids in {len(self.parts)} parts of {', '.join(self.paths)} "
                f"(grid {self.grid[0]}x{self.grid[1]}, K={self.codebook_size}, tokenizer {self.tokenizer_id[:16]})")
