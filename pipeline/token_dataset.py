"""The token dataset: its format, its writer (the commit protocol) and its reader, in one place.

A token dataset is a directory (or object-store prefix) holding

    part-NNNNNN-RUN.parquet  one per input unit, zstd; columns key, tokens, grid_h, grid_w, label, source
    _manifest.json           the plan (unit -> part number) and the committed parts (rows, bytes, sha256,
                             the input's signature), as of the last compaction
    _commits/SEQ-RUN.json    one small record per unit committed since then (the commit point)
    _errors/                 one JSON line per skipped input (key, unit, reason), a file per part
    _lease                   (_lease.json on object stores) who is writing (pipeline/lease.py)

Schema metadata key b"vqtok" holds JSON: schema_version, codebook_size, tokenizer_id, grid,
preprocess, vqtok_version. Everything here is plain pyarrow; the committed set is the manifest plus
the commit records (read_committed), so a reader outside vqtok reads the files TokenDataset(OUT).files()
lists (`vqtok inspect OUT --files`): a directory listing would also take a crashed run's orphan part.

Reading:

    ds = TokenDataset("out/tokens")
    ds.num_rows, ds.grid, ds.codebook_size
    tokens, labels = ds.to_numpy()                 # (N, h, w) uint16/int32, (N,) int32 (-1 = none)
    for batch in ds.iter_batches(4096): ...        # streaming pyarrow RecordBatches

Writing (`vqtok tokenize` does this):

    with TokenWriter.open("out/tokens", meta, units) as out:  # takes the lease; refuses another tokenizer's OUT
        for unit, index in out.pending(units): ...              # units not committed (or changed), with part numbers
            out.commit(unit, index, table, failures)            # write the part, then its commit record

Protocol per unit: the part's bytes go to `_staging/` and are renamed to their final name (local
disk), or are written with one PUT (object stores, where an object appears whole or not at all);
its error records the same way; then one small commit record in `_commits/`: the unit is committed
when that record exists. A commit writes O(1) bytes whatever the dataset's size. The records are
folded into `_manifest.json` (one atomic replace) when a run opens OUT, when they outnumber the
manifest's entries (so O(1) amortized), and when it ends. A crash before the record leaves an
orphan part that no reader takes and that the next run deletes. Part numbers are fixed in the
manifest when a unit is first planned; every name carries the writing run's id, so a run that lost
its lease cannot overwrite the current holder's files, and its records are not the current run's.

Inputs change: each unit's signature (sizes and mtimes or ETags, a folder unit's file list; see
pipeline/sources.py) is recorded with its commit. A committed unit whose signature changed is
re-tokenized (its new part replaces the old in one commit) or refused by name; committed units no
longer among the inputs are refused, kept or dropped, as the run is told (TokenWriter.open).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError, DataError
from .lease import DEFAULT_TTL, Lease
from .sources import Failure, Unit, is_unit_failure

SCHEMA_VERSION = 1  # of the parts
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


# ---------------------------------------------------------------------------------------------
# Reading the committed set: the manifest plus the commit records not yet folded into it
# ---------------------------------------------------------------------------------------------
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


def input_changed(record: dict, unit: Unit) -> bool:
    """Whether a committed unit's input differs from what was tokenized (its signature changed).
    Records written before vqtok kept signatures count as unchanged."""
    return record.get("signature", unit.signature) != unit.signature


def _record_counts(name: str, folded: int, run: str | None) -> bool:
    """Commit records are named SEQ-RUN.json (see TokenWriter.commit)."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".json")
    seq, _, by = stem.partition("-")
    return seq.isdigit() and int(seq) > folded and by == run


# ---------------------------------------------------------------------------------------------
# Writing: the commit protocol
# ---------------------------------------------------------------------------------------------
CONFIG = "_tokenize_config.json"
COMPACT_AT = 1000  # fold the commit records into the manifest once there are this many (and as many as it holds)


def fingerprint(meta: dict) -> str:
    """What must match for two runs to write into the same OUT: the tokenizer, the preprocessing
    and the schema version."""
    key = {k: meta[k] for k in ("tokenizer_id", "preprocess", "schema_version", "codebook_size", "grid")}
    return sha256(json.dumps(key, sort_keys=True).encode())


CHANGED = ("redo", "refuse")  # what a run does with a committed unit whose input changed since
REMOVED = ("refuse", "keep", "drop")  # ... and with committed units no longer among the inputs


@dataclass
class Plan:
    """What a run found when it opened OUT: units by state, as unit URLs."""

    new: list[str]
    changed: list[str]
    removed: list[str]
    kept: list[str]  # removed inputs whose rows stay (removed="keep")
    dropped: list[str]  # removed inputs whose rows were dropped (removed="drop")


class TokenWriter:
    """Writes a token dataset, one unit's part at a time, under a lease (pipeline/lease.py).

        with TokenWriter.open(url, meta, units) as out:
            for unit, index in out.pending(units):
                out.commit(unit, index, table, failures)
    """

    def __init__(self, url: str, fs, root: str, manifest: dict, lease: Lease):
        self.url, self.fs, self.root, self.manifest, self.lease = url, fs, root, manifest, lease
        self.local = isinstance(fs, LocalFileSystem)
        self.records: list[str] = []  # commit records written since the last compaction
        self.plan = Plan([], [], [], [], [])
        self.redo: set[str] = set()

    # --- opening and planning -----------------------------------------------------------------
    @classmethod
    def open(cls, url: str, meta: dict, units: Sequence[Unit], *, storage_options: dict | None = None,
             tokenizer_location: str | None = None, changed: str = "redo", removed: str = "refuse",
             lease_seconds: float = DEFAULT_TTL) -> "TokenWriter":
        """Take the lease on `url`, check the dataset there was made by the same tokenizer and
        preprocessing (`meta`), fold in the commit records left by earlier runs, and plan `units`:
        new ones get the next free part numbers; committed ones whose input changed since (its
        signature differs) are redone (changed="redo") or refused by name (changed="refuse");
        committed units no longer among the inputs are refused by name (removed="refuse"), keep
        their rows ("keep") or lose them ("drop").
        tokenizer_location: where the tokenizer bundle was read from, recorded in the manifest
        (the newest run's) so `vqtok train-prior` can tell the prior where its decoder lives."""
        if changed not in CHANGED or removed not in REMOVED:
            raise ConfigError(f"changed={changed!r}, removed={removed!r}: expected one of {CHANGED} and {REMOVED}")
        url = str(url).rstrip("/")
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        try:
            lease = Lease.acquire(fs, root, url, lease_seconds)
        except (PermissionError, OSError) as e:
            raise ConfigError(f"--out {url}: cannot write there ({type(e).__name__}: {e}); choose a writable "
                              f"directory or bucket prefix") from None
        try:
            out = cls._open_held(url, fs, root, lease, meta, units, tokenizer_location, changed, removed)
        except BaseException:
            lease.release()
            raise
        return out

    @classmethod
    def _open_held(cls, url, fs, root, lease, meta, units, tokenizer_location, changed, removed) -> "TokenWriter":
        try:
            state = read_committed(fs, root)
        except PermissionError as e:
            raise ConfigError(f"--out {url}: cannot read ({e}); choose a location you can write") from None
        fp = fingerprint(meta)
        if state is None:
            _refuse_foreign_contents(fs, root, url)
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "manifest_version": MANIFEST_VERSION,
                        "fingerprint": fp, "metadata": meta, "units": {}, "committed": {}, "seq": 0,
                        "created": time.time()}
        else:
            manifest, committed = state
            manifest["committed"] = committed
            if manifest.get("fingerprint") != fp:
                old = manifest.get("metadata", {})
                raise ConfigError(
                    f"--out {url} already holds tokens from another tokenizer or preprocessing (tokenizer "
                    f"{str(old.get('tokenizer_id'))[:12]}, grid {old.get('grid')}; this run: tokenizer "
                    f"{meta['tokenizer_id'][:12]}, grid {meta['grid']}). Mixing them would make one dataset with two "
                    f"vocabularies: write to a new --out, or delete {url} to start over"
                )
            manifest["manifest_version"] = MANIFEST_VERSION
            manifest["seq"] = max([manifest.get("seq", 0)] + [c.get("seq", 0) for c in manifest["committed"].values()])
        if tokenizer_location:
            manifest["tokenizer"] = tokenizer_location
        out = cls(url, fs, root, manifest, lease)
        out._plan(units, changed, removed)
        manifest["run"] = lease.run  # from here on only this run's commit records count
        try:
            out._write_manifest()
        except (PermissionError, OSError) as e:
            raise ConfigError(f"--out {url}: cannot write there ({type(e).__name__}: {e}); choose a writable "
                              f"directory or bucket prefix") from None
        out._collect_garbage()
        return out

    def _plan(self, units: Sequence[Unit], changed: str, removed: str) -> None:
        planned, committed = self.manifest["units"], self.manifest["committed"]
        wanted = {u.url for u in units}
        p = self.plan
        for unit in units:
            record = committed.get(unit.url)
            if unit.url not in planned:
                p.new.append(unit.url)
            elif record is not None and input_changed(record, unit):
                p.changed.append(unit.url)
        p.removed = sorted(u for u in committed if u not in wanted)
        if p.changed and changed == "refuse":
            raise ConfigError(
                f"{len(p.changed)} committed input units changed since they were tokenized "
                f"({list_some(p.changed)}): their rows would be stale. Re-run with --changed-inputs redo to re-tokenize them "
                f"(each part is replaced atomically), or restore the inputs")
        if p.removed and removed == "refuse":
            raise ConfigError(
                f"{len(p.removed)} committed input units are no longer among the inputs ({list_some(p.removed)}): re-run "
                f"with --removed-inputs keep to keep their rows, or --removed-inputs drop to drop them (a clean run "
                f"over the inputs you gave would not have them)")
        if removed == "drop":
            for u in p.removed:
                del committed[u]
                planned.pop(u, None)
            p.dropped = p.removed
        else:
            p.kept = p.removed
        self.redo = set(p.changed)  # their old parts are read until the new ones are committed
        next_part = max(planned.values(), default=-1) + 1
        for unit in units:  # sorted on the driver; new units take the next free part numbers
            if unit.url not in planned:
                planned[unit.url] = next_part
                next_part += 1

    def pending(self, units: Sequence[Unit]) -> list[tuple[Unit, int]]:
        """The units still to tokenize (not committed, or changed since), with their part numbers."""
        committed = self.manifest["committed"]
        return [(u, self.manifest["units"][u.url]) for u in units if u.url not in committed or u.url in self.redo]

    @property
    def committed(self) -> dict:
        return self.manifest["committed"]

    @property
    def rows(self) -> int:
        return sum(c["rows"] for c in self.committed.values())

    @property
    def failures(self) -> int:
        return sum(c["failures"] for c in self.committed.values())

    @property
    def damaged_units(self) -> int:
        """Committed units whose input was cut short or unreadable (see sources.is_unit_failure)."""
        return sum(bool(c.get("damaged")) for c in self.committed.values())

    # --- committing ---------------------------------------------------------------------------
    def commit(self, unit: Unit, index: int, table: pa.Table, failures: Sequence[Failure]) -> dict:
        """Write one unit's part and error records, then its commit record: O(1) bytes per unit.
        Returns the record."""
        self.lease.check()
        name = part_name(index, self.lease.run)
        data = parquet_bytes(table)
        self._put(name, data)
        if failures:
            lines = "".join(json.dumps(asdict(f)) + "\n" for f in failures)
            self._put(errors_name(name), lines.encode())
        seq = self.manifest["seq"] + len(self.records) + 1
        record = {"part": name, "rows": table.num_rows, "bytes": len(data), "sha256": sha256(data),
                  "failures": len(failures), "damaged": any(is_unit_failure(f) for f in failures),
                  "signature": unit.signature, "committed": time.time(), "seq": seq}
        self.lease.check()
        record_name = f"{COMMITS_DIR}/{seq:012d}-{self.lease.run}.json"
        self._put(record_name, json.dumps({"unit": unit.url, **record}, sort_keys=True).encode())  # the commit point
        self.records.append(record_name)
        self.committed[unit.url] = record
        if len(self.records) >= max(COMPACT_AT, len(self.committed) - len(self.records)):
            self.compact()  # geometric spacing: O(1) amortized bytes per commit
        return record

    def compact(self) -> None:
        """Fold this run's commit records into the manifest (one atomic write), then delete them."""
        self.lease.check()
        self.manifest["seq"] += len(self.records)
        self._write_manifest()
        _rm(self.fs, [f"{self.root}/{name}" for name in self.records])
        self.records = []

    def close(self) -> None:
        """Compact, delete what no reader takes any more (replaced and orphan parts, other runs'
        records), and release the lease."""
        try:
            if not self.lease.lost:
                self.compact()
                self._collect_garbage()
        finally:
            self.lease.release()

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write_config(self, config: dict) -> None:
        """The run's resolved options, saved beside the dataset as _tokenize_config.json (the
        newest run's; `_`-prefixed, so dataset readers skip it)."""
        self._put(CONFIG, (json.dumps(config, indent=1, sort_keys=True, default=str) + "\n").encode())

    def _write_manifest(self) -> None:
        self.manifest["updated"] = time.time()
        self.manifest["rows"] = self.rows
        self.manifest["failures"] = self.failures
        self._put(MANIFEST, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())

    def _collect_garbage(self) -> None:
        """Parts, error files and commit records that no reader takes: replaced or orphan parts (a
        crashed or fenced-out run's), folded or foreign records, staging leftovers."""
        live = {c["part"] for c in self.committed.values()}
        live_errors = {errors_name(p) for p in live}
        base = lambda path: path.rsplit("/", 1)[-1]  # noqa: E731
        garbage = [p for p in _ls(self.fs, self.root)
                   if base(p).startswith("part-") and base(p).endswith(".parquet") and base(p) not in live]
        garbage += [p for p in _ls(self.fs, f"{self.root}/{ERRORS_DIR}") if f"{ERRORS_DIR}/{base(p)}" not in live_errors]
        mine = set(self.records)
        garbage += [p for p in _ls(self.fs, f"{self.root}/{COMMITS_DIR}") if f"{COMMITS_DIR}/{base(p)}" not in mine]
        if self.local:
            garbage += _ls(self.fs, f"{self.root}/{STAGING_DIR}")
        _rm(self.fs, garbage)

    def _put(self, name: str, data: bytes) -> None:
        """Make `root/name` hold `data`, all at once: staging + rename locally, one PUT elsewhere."""
        final = f"{self.root}/{name}"
        if self.local:
            staging = f"{self.root}/{STAGING_DIR}"
            os.makedirs(staging, exist_ok=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{staging}/{os.path.basename(name)}.{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            # the rename is durable once its directory is: a commit record that survives a power
            # cut must not point at a part whose rename did not
            fd = os.open(os.path.dirname(final), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.fs.pipe_file(final, data)


def errors_name(part: str) -> str:
    return f"{ERRORS_DIR}/{part.removesuffix('.parquet')}.jsonl"


def _rm(fs, paths: list[str]) -> None:
    """Delete files, in bulk where the store can (S3: 1,000 keys per request)."""
    if paths:
        fs.rm(paths)


def _ls(fs, path: str) -> list[str]:
    """The files directly under path (none if it does not exist), fresh from the store."""
    fs.invalidate_cache(path)
    try:
        return [e["name"] for e in fs.ls(path, detail=True) if e.get("type") == "file"]
    except FileNotFoundError:
        return []


def list_some(urls: list[str], n: int = 3) -> str:
    return ", ".join(urls[:n]) + (f" and {len(urls) - n} more" if len(urls) > n else "")


def _refuse_foreign_contents(fs, root: str, url: str) -> None:
    """A new dataset goes into a missing or empty location, or one holding only our own entries."""
    try:
        entries = fs.ls(root, detail=False) if fs.isdir(root) else []
    except FileNotFoundError:
        return
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    foreign = [n for n in names if not (n.startswith("_") or n.startswith("part-"))]
    if foreign:
        raise ConfigError(
            f"--out {url} exists and holds other files ({', '.join(sorted(foreign)[:5])}): give an empty or new "
            f"directory for the token dataset"
        )

# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A committed part, as the manifest records it."""

    name: str  # part-NNNNNN.parquet
    unit: str  # the input unit it holds the tokens of
    rows: int
    bytes: int
    sha256: str
    url: str  # where to read it (an fsspec URL)


def flat_tokens(col: pa.ListArray | pa.ChunkedArray) -> np.ndarray:
    """A list<uint16|int32> column's values, (rows * h * w,), honouring a sliced array's offset
    (`ListArray.values` would not: it is the whole child array, whatever the slice)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False)


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
