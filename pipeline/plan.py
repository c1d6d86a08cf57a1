"""The tokenization plan and its commit protocol: which units go to which part, and how a part
becomes visible exactly once.

    out = TokenOutput.open("out/tokens", meta, units)     # refuses an OUT from another tokenizer
    for unit, index in out.pending(): ...                  # units not yet committed, with their part
    out.commit(unit, index, table, failures)               # write part, then record it

Protocol per unit: the part's bytes go to `_staging/` and are renamed to `part-NNNNNN.parquet`
(local disk), or are written with one PUT (object stores, where an object appears whole or not
at all); its error records go to `_errors/part-NNNNNN.jsonl` the same way; only then is the unit
recorded in `_manifest.json` (itself replaced atomically). A crash before the manifest write
leaves an orphan part that no reader takes (readers go by the manifest) and that the next run
rewrites. Part numbers are fixed in the manifest when a unit is first planned, so a resumed run
names its parts exactly as a clean run would.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError
from .sources import Failure, Unit
from .tokens import (ERRORS_DIR, FORMAT, MANIFEST, SCHEMA_VERSION, STAGING_DIR, parquet_bytes, part_name,
                     read_manifest, sha256)


CONFIG = "_tokenize_config.json"


def fingerprint(meta: dict) -> str:
    """What must match for two runs to write into the same OUT: the tokenizer, the preprocessing
    and the schema version."""
    key = {k: meta[k] for k in ("tokenizer_id", "preprocess", "schema_version", "codebook_size", "grid")}
    return sha256(json.dumps(key, sort_keys=True).encode())


class TokenOutput:
    def __init__(self, url: str, fs, root: str, manifest: dict):
        self.url, self.fs, self.root, self.manifest = url, fs, root, manifest
        self.local = isinstance(fs, LocalFileSystem)

    # --- planning -----------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, meta: dict, units: Sequence[Unit], *, storage_options: dict | None = None,
             tokenizer_location: str | None = None) -> "TokenOutput":
        """tokenizer_location: where the tokenizer bundle was read from, recorded in the manifest
        (the newest run's) so `vqtok train-prior` can tell the prior where its decoder lives."""
        url = str(url).rstrip("/")
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        try:
            manifest = read_manifest(fs, root)
        except PermissionError as e:
            raise ConfigError(f"--out {url}: cannot read ({e}); choose a location you can write") from None
        fp = fingerprint(meta)
        if manifest is None:
            _refuse_foreign_contents(fs, root, url)
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": fp, "metadata": meta,
                        "units": {}, "committed": {}, "created": time.time()}
        elif manifest.get("fingerprint") != fp:
            old = manifest.get("metadata", {})
            raise ConfigError(
                f"--out {url} already holds tokens from another tokenizer or preprocessing (tokenizer "
                f"{str(old.get('tokenizer_id'))[:12]}, grid {old.get('grid')}; this run: tokenizer "
                f"{meta['tokenizer_id'][:12]}, grid {meta['grid']}). Mixing them would make one dataset with two "
                f"vocabularies: write to a new --out, or delete {url} to start over"
            )
        if tokenizer_location:
            manifest["tokenizer"] = tokenizer_location
        out = cls(url, fs, root, manifest)
        planned = manifest["units"]
        next_part = max(planned.values(), default=-1) + 1
        for unit in units:  # sorted on the driver; new units take the next free part numbers
            if unit.url not in planned:
                planned[unit.url] = next_part
                next_part += 1
        try:
            out._write_manifest()
        except (PermissionError, OSError) as e:
            raise ConfigError(f"--out {url}: cannot write there ({type(e).__name__}: {e}); choose a writable "
                              f"directory or bucket prefix") from None
        return out

    def pending(self, units: Sequence[Unit]) -> list[tuple[Unit, int]]:
        committed = self.manifest["committed"]
        return [(u, self.manifest["units"][u.url]) for u in units if u.url not in committed]

    @property
    def committed(self) -> dict:
        return self.manifest["committed"]

    # --- committing ---------------------------------------------------------------------------
    def commit(self, unit: Unit, index: int, table: pa.Table, failures: Sequence[Failure]) -> dict:
        """Write one unit's part and error records, then record the commit. Returns its record."""
        name = part_name(index)
        data = parquet_bytes(table)
        self._put(name, data)
        errors_name = f"{ERRORS_DIR}/{name.removesuffix('.parquet')}.jsonl"
        if failures:
            lines = "".join(json.dumps({"key": f.key, "unit": f.unit, "reason": f.reason}) + "\n" for f in failures)
            self._put(errors_name, lines.encode())
        elif self.fs.exists(f"{self.root}/{errors_name}"):  # left by an earlier attempt that failed differently
            self.fs.rm_file(f"{self.root}/{errors_name}")
        record = {"part": name, "rows": table.num_rows, "bytes": len(data), "sha256": sha256(data),
                  "failures": len(failures), "committed": time.time()}
        self.manifest["committed"][unit.url] = record
        self._write_manifest()
        return record

    def write_config(self, config: dict) -> None:
        """The run's resolved options, saved beside the dataset as _tokenize_config.json (the
        newest run's; `_`-prefixed, so dataset readers skip it)."""
        self._put(CONFIG, (json.dumps(config, indent=1, sort_keys=True, default=str) + "\n").encode())

    def _write_manifest(self) -> None:
        self.manifest["updated"] = time.time()
        self.manifest["rows"] = sum(c["rows"] for c in self.manifest["committed"].values())
        self.manifest["failures"] = sum(c["failures"] for c in self.manifest["committed"].values())
        self._put(MANIFEST, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())

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
        else:
            self.fs.pipe_file(final, data)


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
