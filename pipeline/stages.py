"""The stages of batch tokenization and the rows between them, as plain functions and classes on
Arrow tables (Ray Data runs the stages, from jobs/tokenize.py; tests and benchmarks call them directly):

    read_units      (Ray tasks)   a unit -> batches of preprocessed pixels, then its end row
    BatchEncoder    (Ray actors)  pixels -> token grids, one (unit, batch) group per encode call
    UnitCollector   (driver)      token rows -> one complete, ordered table per unit
    commit_unit     (driver)      a complete unit -> its Parquet part, committed by the TokenWriter

The rows in flight have one codec, UnitRows. Every unit travels as Arrow tables of one schema, in
two kinds of row:

    image row   part_index, batch, pos, key, label, pixels (S*S*C bytes), [extra per-row columns]
    end row     part_index, images (the unit's number of good images), failures; pixels null

A read task sends a unit's image rows in batches, then exactly one end row, which also stands for
an empty unit; failures are a typed column (list<struct<key, unit, reason, unit_damaged>>), not
text. `batch` is fixed once, when the read task cuts the unit into batches of --batch-size: the
encoders encode each (part_index, batch) group in one call, so what is encoded together depends on
the data only, never on how Ray spreads rows over workers, and `vqtok tokenize` gives exactly
`Tokenizer.encode_file(unit_files, batch_size)`, byte-identical with 1 or N encoders (a batch must
reach an encoder whole: jobs/tokenize.py keeps Ray Data's blocks large enough). The encoders
replace `pixels` by `tokens` (null on end rows). The driver's UnitCollector gathers rows by unit,
drops the copies a retried read task delivers twice (by pos; rows of a unit already handed back),
and hands back each unit once, when its end row and all its image rows are in.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.tokenizer import DecodeError, Preprocess
from .captions import CaptionNote, TextFields, clean_caption, clean_meta
from .sources import Failure, Unit, iter_unit
from .token_format import part_table, tokens_array


# ---------------------------------------------------------------------------------------------
# The rows in flight
# ---------------------------------------------------------------------------------------------
FAILURE_TYPE = pa.struct([("key", pa.string()), ("unit", pa.string()), ("reason", pa.string()),
                          ("unit_damaged", pa.bool_())])
# the text beside each image (pipeline/captions.py): the caption and kept metadata, and what was
# wrong with either (null when nothing was); the notes become _errors/ records at commit
TEXT_COLUMNS = [pa.field("caption", pa.string()), pa.field("meta", pa.string()),
                pa.field("caption_note", pa.string()), pa.field("meta_note", pa.string())]


# --- what the read tasks are given: one row per unit ------------------------------------------
def unit_items(pending: Sequence[tuple[Unit, int]]) -> list[dict]:
    """(unit, part_index) pairs -> the rows of the dataset the read tasks map over."""
    return [{"unit": json.dumps(asdict(u)), "part_index": i} for u, i in pending]


def units_of(items: pa.Table) -> Iterator[tuple[Unit, int]]:
    """The inverse of unit_items, in a read task."""
    for text, part_index in zip(items.column("unit").to_pylist(), items.column("part_index").to_pylist()):
        d = json.loads(text)
        yield Unit(**{**d, **{k: tuple(d[k]) for k in ("files", "labels", "captions", "metas")}}), part_index


@dataclass
class FinishedUnit:
    part_index: int
    rows: pa.Table  # the unit's image rows ordered by pos: key, label, tokens and the extra columns
    failures: list[Failure]

    def caption_notes(self, unit: str) -> list[CaptionNote]:
        """The repaired or unusable captions and metadata of the unit's rows (TEXT_COLUMNS), in order."""
        if "caption_note" not in self.rows.column_names:
            return []
        notes = []
        rows = zip(self.rows.column("key").to_pylist(), self.rows.column("caption").to_pylist(),
                   self.rows.column("caption_note").to_pylist(), self.rows.column("meta_note").to_pylist())
        for key, caption, caption_note, meta_note in rows:
            if caption_note is not None:
                notes.append(CaptionNote(key, unit, caption_note, kept=caption is not None))
            if meta_note is not None:
                notes.append(CaptionNote(key, unit, meta_note, kept=False, column="meta"))
        return notes


class UnitRows:
    """The codec: the schema, how rows are made (read side) and how encoders see them (the driver's
    side is UnitCollector). `extra`: more per-row columns, carried from the read
    tasks to the committed rows unchanged (null on end rows)."""

    def __init__(self, shape: tuple[int, int, int], extra: Sequence[pa.Field] = ()):
        self.shape = tuple(shape)  # (S, S, C) uint8 pixels per image
        self.pixel_bytes = int(np.prod(self.shape))
        self.extra = list(extra)
        self.schema = pa.schema([
            ("part_index", pa.int32()), ("batch", pa.int32()), ("pos", pa.int64()), ("key", pa.string()),
            ("label", pa.int32()), ("pixels", pa.binary(self.pixel_bytes)), ("images", pa.int64()),
            ("failures", pa.list_(FAILURE_TYPE)), *self.extra,
        ])

    # --- read side ------------------------------------------------------------------------------
    def image_rows(self, part_index: int, batch: int, start: int, keys: list[str], labels: list[int | None],
                   pixels: list[bytes], extra: dict[str, list] | None = None) -> pa.Table:
        """One batch of a unit's good images; `start` is the first one's position in the unit."""
        n = len(keys)
        extra = extra or {}
        return pa.Table.from_arrays([
            pa.array(np.full(n, part_index, np.int32)), pa.array(np.full(n, batch, np.int32)),
            pa.array(np.arange(start, start + n, dtype=np.int64)), pa.array(keys, pa.string()),
            pa.array(labels, pa.int32()), pa.array(pixels, pa.binary(self.pixel_bytes)),
            pa.nulls(n, pa.int64()), pa.nulls(n, pa.list_(FAILURE_TYPE)),
            *(pa.array(extra.get(f.name, [None] * n), f.type) for f in self.extra),
        ], schema=self.schema)

    def end_row(self, part_index: int, images: int, failures: Sequence[Failure]) -> pa.Table:
        """The unit is complete: it held `images` good images (rows sent before) and these failures."""
        return pa.Table.from_arrays([
            pa.array([part_index], pa.int32()), pa.nulls(1, pa.int32()), pa.nulls(1, pa.int64()),
            pa.nulls(1, pa.string()), pa.nulls(1, pa.int32()), pa.array([None], pa.binary(self.pixel_bytes)),
            pa.array([images], pa.int64()), pa.array([[asdict(f) for f in failures]], pa.list_(FAILURE_TYPE)),
            *(pa.nulls(1, f.type) for f in self.extra),
        ], schema=self.schema)

    # --- encoder side ---------------------------------------------------------------------------
    def pixels(self, table: pa.Table) -> np.ndarray:
        """The pixels column as (n, S, S, C) uint8, zero-copy (end rows' slots are zeros). The column
        is fixed_size_binary: buffers()[1] holds every row's bytes back to back, and a sliced column
        still points at its whole buffer with `offset` counting the rows before the slice."""
        col = table.column("pixels").combine_chunks()
        n = len(col)
        buf = np.frombuffer(col.buffers()[1], dtype=np.uint8)[col.offset * self.pixel_bytes:(col.offset + n) * self.pixel_bytes]
        return buf.reshape(n, *self.shape)

    @staticmethod
    def encode_groups(table: pa.Table) -> list[np.ndarray]:
        """The image rows, as index arrays, one per (part_index, batch) group: what an encoder
        encodes in one call."""
        batch = table.column("batch").fill_null(-1).to_numpy()
        parts = table.column("part_index").to_numpy()
        rows = np.flatnonzero(batch >= 0)
        order = rows[np.lexsort((batch[rows], parts[rows]))]
        keys = np.stack([parts[order], batch[order]], 1)
        cuts = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
        return [g for g in np.split(order, cuts) if len(g)]

    @staticmethod
    def with_tokens(table: pa.Table, tokens: pa.Array) -> pa.Table:
        """What an encoder returns: the rows without pixels, with their tokens (null on end rows)."""
        return table.drop_columns(["pixels"]).append_column("tokens", tokens)


class UnitCollector:
    """Driver side: gathers encoded rows by unit; add() returns the units they completed."""

    def __init__(self):
        self.tables: dict[int, list[pa.Table]] = defaultdict(list)
        self.ends: dict[int, tuple[int, list[Failure]]] = {}  # part_index -> (images, failures)
        self.finished: set[int] = set()  # handed back: later copies of their rows are dropped

    def add(self, table: pa.Table) -> list[FinishedUnit]:
        done = []
        parts = table.column("part_index").to_numpy()
        for part_index in np.unique(parts).tolist():
            if part_index in self.finished:
                continue
            t = table.filter(pc.equal(table.column("part_index"), part_index))
            is_end = pc.is_valid(t.column("images"))
            end = t.filter(is_end)
            if end.num_rows and part_index not in self.ends:
                fails = [Failure(**f) for f in end.column("failures")[0].as_py()]
                self.ends[part_index] = (end.column("images")[0].as_py(), fails)
            self.tables[part_index].append(t.filter(pc.invert(is_end)))
            finished = self._finish(part_index)
            if finished is not None:
                done.append(finished)
        return done

    def _finish(self, part_index: int) -> FinishedUnit | None:
        if part_index not in self.ends:
            return None
        images, failures = self.ends[part_index]
        if sum(t.num_rows for t in self.tables[part_index]) < images:
            return None  # rows still to come (or copies counted: checked below)
        t = pa.concat_tables(self.tables[part_index]).sort_by("pos")
        pos = t.column("pos").to_numpy()
        if len(pos) > 1 and (np.diff(pos) == 0).any():  # a retried read task delivered a batch twice
            t = t.filter(pa.array(np.concatenate([[True], np.diff(pos) != 0])))
        if t.num_rows < images:  # copies counted: a batch is still to come
            self.tables[part_index] = [t]
            return None
        del self.tables[part_index], self.ends[part_index]
        self.finished.add(part_index)
        rows = t.drop_columns(["part_index", "batch", "pos", "images", "failures"])
        return FinishedUnit(part_index, rows, failures)

    @property
    def in_flight(self) -> int:
        return len(self.tables)


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------
def read_units(items: pa.Table, *, preprocess: Preprocess, batch_size: int, max_pixels: int,
               text: TextFields | None = None):
    """Ray Data map_batches generator: unit items (unit_items) -> for each unit, tables
    of up to batch_size decoded images (batch numbers 0, 1, ...), then its end row. Each image row
    carries its caption and kept metadata (TEXT_COLUMNS, pipeline/captions.py)."""
    text = text or TextFields()
    codec = UnitRows(preprocess.shape, extra=TEXT_COLUMNS)
    for unit, part_index in units_of(items):
        failures: list[Failure] = []
        keys, labels, pixels = [], [], []
        extra: dict[str, list] = {f.name: [] for f in TEXT_COLUMNS}
        batch, pos = 0, 0
        for raw in iter_unit(unit, failures.append, text):
            try:
                arr = preprocess.decode(raw.data, max_pixels)
            except DecodeError as e:
                failures.append(Failure(raw.key, unit.url, str(e)))
                continue
            keys.append(raw.key)
            labels.append(raw.label)
            pixels.append(arr.tobytes())
            caption, caption_note, _ = clean_caption(raw.caption, text.max_caption_bytes)
            meta, meta_note = clean_meta(raw.meta, text)
            for name, value in zip(extra, (caption, meta, caption_note, meta_note)):
                extra[name].append(value)
            if len(keys) == batch_size:
                yield codec.image_rows(part_index, batch, pos, keys, labels, pixels, extra)
                batch, pos = batch + 1, pos + len(keys)
                keys, labels, pixels = [], [], []
                extra = {name: [] for name in extra}
        if keys:
            yield codec.image_rows(part_index, batch, pos, keys, labels, pixels, extra)
            pos += len(keys)
        yield codec.end_row(part_index, pos, failures)


def encoder_threads(workers: int) -> int:
    """Torch threads for one CPU encoder, computed where the encoder runs (not on the driver, whose
    machine may differ from the worker nodes): the CPUs this process may use (its affinity mask,
    which honours taskset and container cpusets; os.cpu_count() where there is none) divided by
    the `workers` encoders of the job, at least 1. How many of them Ray placed on this node is not
    knowable when one starts (the others may still be starting), so all are assumed to share it:
    exact on the embedded Ray and on a single-node cluster; where Ray spreads the encoders over
    several nodes, each node is under-subscribed rather than over-subscribed (--threads-per-worker
    sets the count outright)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


class BatchEncoder:
    """Ray Data actor: loads the tokenizer once, turns pixel rows into token rows."""

    def __init__(self, bundle, *, device: str = "cpu", threads: int = 0, workers: int = 1):
        """bundle: the (config.json, model.safetensors) bytes, or a callable that returns them
        (the job passes a small handle to one copy in Ray's object store). threads: torch threads;
        0 on CPU sizes them on this node for `workers` encoders (encoder_threads), 0 on a GPU
        leaves torch's setting alone."""
        import torch

        from ..models.tokenizer import Tokenizer

        if threads > 0 or device == "cpu":
            torch.set_num_threads(threads or encoder_threads(workers))
        if callable(bundle):
            bundle = bundle()
        self.tok = Tokenizer.from_bytes(*bundle, device=device)
        self.codec = UnitRows(self.tok.preprocess.shape)

    def __call__(self, table: pa.Table) -> pa.Table:
        images = self.codec.pixels(table)  # (n, S, S, C) uint8
        grids = np.zeros((table.num_rows, *self.tok.grid), dtype=np.int64)
        is_image = np.zeros(table.num_rows, dtype=bool)
        for rows in self.codec.encode_groups(table):  # one (unit, batch) per call, whatever the block
            grids[rows] = self.tok.encode(images[rows], batch_size=len(rows)).cpu().numpy()
            is_image[rows] = True
        tokens = tokens_array(grids, self.tok.config.codebook_size, mask=~is_image)
        return self.codec.with_tokens(table, tokens)


def commit_unit(output, meta: dict, unit: Unit, finished: FinishedUnit) -> pa.Table:
    """Driver side, last: a finished unit's rows become its part (pipeline/token_format.py), which
    `output` (the run's TokenWriter) writes and commits with the unit's failures and caption notes.
    The encoders' columns go into the part as they are: no trip through Python. Returns the part."""
    rows = finished.rows
    column = lambda name: rows.column(name).combine_chunks()  # noqa: E731
    table = part_table(meta, column("key"), column("tokens"), column("label"), unit.url,
                       captions=column("caption"), metas=column("meta"))
    output.commit(unit, finished.part_index, table, finished.failures, finished.caption_notes(unit.url))
    return table
