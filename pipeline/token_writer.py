"""Writing a token dataset (pipeline/token_format.py): the commit protocol, the plan of a run, and
garbage collection. `vqtok tokenize` (jobs/tokenize.py) drives it.

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
Refusals are OutputRefused errors that say what was found; the job that knows its command line
(jobs/tokenize.py) turns them into messages naming its flags.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError
from .lease import DEFAULT_TTL, Lease
from .captions import CaptionNote, TextFields
from .sources import Failure, Unit
from .token_format import (COMMITS_DIR, ERRORS_DIR, FORMAT, MANIFEST, MANIFEST_VERSION, SCHEMA_VERSION, STAGING_DIR,
                           caption_counts, errors_name, fingerprint, input_changed, parquet_bytes, part_name, read_committed, same_tokens,
                           sha256)

CONFIG = "_tokenize_config.json"

COMPACT_AT = 1000  # fold the commit records into the manifest once there are this many (and as many as it holds)

CHANGED = ("redo", "refuse")  # what a run does with a committed unit whose input changed since
REMOVED = ("refuse", "keep", "drop")  # ... and with committed units no longer among the inputs


class OutputRefused(ConfigError):
    """The writer will not write the dataset as asked. `found` says what it found; `fix` what to do,
    in TokenWriter.open's terms (a command that knows its own flags names those instead, by `kind`):
    "unwritable", "other_tokenizer", "other_text", "foreign_files", "changed" or "removed"."""

    def __init__(self, kind: str, found: str, fix: str):
        super().__init__(f"{found}: {fix}")
        self.kind, self.found, self.fix = kind, found, fix


@dataclass
class Plan:
    """What a run found when it opened OUT: units by state, as unit URLs."""

    new: list[str]
    changed: list[str]
    removed: list[str]
    kept: list[str]  # removed inputs whose rows stay (removed="keep")
    dropped: list[str]  # removed inputs whose rows were dropped (removed="drop")
    # committed parts written before token datasets had captions (schema_version 1): they stay, and
    # read with null captions; a new OUT (or removing them) gives their images captions
    uncaptioned: list[str] = field(default_factory=list)


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
            raise _unwritable(url, e) from None
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
            raise _unwritable(url, e) from None
        fp = fingerprint(meta)
        if state is None:
            _refuse_foreign_contents(fs, root, url)
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "manifest_version": MANIFEST_VERSION,
                        "fingerprint": fp, "metadata": meta, "units": {}, "committed": {}, "seq": 0,
                        "created": time.time()}
        else:
            manifest, committed = state
            manifest["committed"] = committed
            old = manifest.get("metadata", {})
            if not same_tokens(old, meta):
                raise OutputRefused(
                    "other_tokenizer",
                    f"{url} already holds tokens from another tokenizer or preprocessing (tokenizer "
                    f"{str(old.get('tokenizer_id'))[:12]}, grid {old.get('grid')}; this run: tokenizer "
                    f"{meta['tokenizer_id'][:12]}, grid {meta['grid']}). Mixing them would make one dataset with two "
                    f"vocabularies", f"write to a new location, or delete {url} to start over")
            if "text" in old and old["text"] != meta.get("text"):
                raise OutputRefused(
                    "other_text", f"{url} was written keeping other text beside the images ({_text_options(old['text'])}; "
                    f"this run: {_text_options(meta.get('text'))}): its rows would differ from one part to the next",
                    "give the same caption and metadata options as before, or write to a new location")
            # a dataset written before captions (schema_version 1) continues: its parts stay as they
            # are (read with null captions), new parts carry captions; the run says so (Plan.uncaptioned)
            manifest["metadata"], manifest["fingerprint"] = meta, fp
            manifest["schema_version"] = SCHEMA_VERSION
            manifest["manifest_version"] = MANIFEST_VERSION
            manifest["seq"] = max([manifest.get("seq", 0)] + [c.get("seq", 0) for c in manifest["committed"].values()])
        if tokenizer_location:
            manifest["tokenizer"] = tokenizer_location
        out = cls(url, fs, root, manifest, lease)
        out._plan(units, changed, removed)
        out.plan.uncaptioned = sorted(u for u, c in out.committed.items()
                                      if c.get("schema_version", 1) < 2 and u not in out.redo)
        manifest["run"] = lease.run  # from here on only this run's commit records count
        try:
            out._write_manifest()
        except (PermissionError, OSError) as e:
            raise _unwritable(url, e) from None
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
            raise OutputRefused(
                "changed", f"{len(p.changed)} committed input units changed since they were tokenized "
                f"({list_some(p.changed)}): their rows would be stale",
                "open with changed='redo' to re-tokenize them (each part is replaced atomically), or restore the inputs")
        if p.removed and removed == "refuse":
            raise OutputRefused(
                "removed", f"{len(p.removed)} committed input units are no longer among the inputs ({list_some(p.removed)})",
                "open with removed='keep' to keep their rows, or removed='drop' to drop them (a clean run over the "
                "inputs you gave would not have them)")
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

    def caption_counts(self) -> dict[str, int]:
        return caption_counts(self.committed)

    @property
    def damaged_units(self) -> int:
        """Committed units whose input was cut short or unreadable (Failure.unit_damaged)."""
        return sum(bool(c.get("damaged")) for c in self.committed.values())

    # --- committing ---------------------------------------------------------------------------
    def commit(self, unit: Unit, index: int, table: pa.Table, failures: Sequence[Failure],
               notes: Sequence[CaptionNote] = ()) -> dict:
        """Write one unit's part and error records (skipped images, then repaired or unusable
        captions), then its commit record: O(1) bytes per unit. Returns the record."""
        self.lease.check()
        name = part_name(index, self.lease.run)
        data = parquet_bytes(table)
        self._put(name, data)
        if failures or notes:
            lines = "".join(json.dumps(asdict(f)) + "\n" for f in failures)
            lines += "".join(json.dumps(n.record()) + "\n" for n in notes)
            self._put(errors_name(name), lines.encode())
        seq = self.manifest["seq"] + len(self.records) + 1
        captions = table.num_rows - table.column("caption").null_count if "caption" in table.column_names else 0
        record = {"part": name, "rows": table.num_rows, "bytes": len(data), "sha256": sha256(data),
                  "failures": len(failures), "damaged": any(f.unit_damaged for f in failures),
                  "signature": unit.signature, "committed": time.time(), "seq": seq,
                  "schema_version": SCHEMA_VERSION, "captions": captions,
                  "captions_repaired": sum(n.kept for n in notes if n.column == "caption"),
                  "captions_unusable": sum(not n.kept for n in notes if n.column == "caption")}
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


def _text_options(text: dict | None) -> str:
    t = TextFields.from_dict(text or {})
    return (f"caption column {t.caption_column or 'caption/text/txt'}, kept metadata "
            f"{','.join(t.keep_columns) or 'none'}, captions cut at {t.max_caption_bytes} bytes")


def _unwritable(url: str, e: Exception) -> OutputRefused:
    return OutputRefused("unwritable", f"{url}: cannot write there ({type(e).__name__}: {e})",
                         "choose a writable directory or bucket prefix")


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
        raise OutputRefused(
            "foreign_files", f"{url} exists and holds other files ({', '.join(sorted(foreign)[:5])})",
            "give an empty or new directory for the token dataset"
        )
