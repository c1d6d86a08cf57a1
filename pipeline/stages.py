"""The stages of batch tokenization, as plain functions on Arrow tables (Ray Data runs them, from
jobs/tokenize.py; tests and benchmarks can call them directly).

    read_units      (Ray tasks)   a unit -> batches of preprocessed pixels, failures recorded
    BatchEncoder    (Ray actors)  pixels -> token grids; pixels are dropped here
    UnitAssembler   (driver)      token rows -> one complete, ordered table per unit, for commit

A batch here is up to batch_size good images of one unit, in order. Rows carry (part_index, pos):
the number of the unit's part (part-NNNNNN.parquet) and the image's position among the unit's good
images. Encoding groups rows by (part_index, pos // batch_size), so every image is encoded in the
same group whatever the number of workers or how Ray splits blocks: `vqtok tokenize` gives exactly
`Tokenizer.encode(unit_images, batch_size)`. The last batch of a unit carries `total` (its number
of good images) and its failures as JSON; a unit whose last batch would be empty sends one
placeholder row with a null key and null pixels.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.tokenizer import Preprocess
from .sources import DecodeError, Failure, Unit, decode_sample, iter_unit
from .token_dataset import tokens_array


def unit_to_json(unit: Unit) -> str:
    return json.dumps(asdict(unit))


def unit_from_json(s: str) -> Unit:
    d = json.loads(s)
    return Unit(url=d["url"], kind=d["kind"], files=tuple(d["files"]), labels=tuple(d["labels"]),
                labels_url=d["labels_url"], signature=d["signature"])


def batch_schema(pixel_bytes: int) -> pa.Schema:
    return pa.schema([
        ("part_index", pa.int32()), ("pos", pa.int64()), ("key", pa.string()), ("label", pa.int32()),
        ("pixels", pa.binary(pixel_bytes)), ("total", pa.int64()), ("failures", pa.string()),
    ])


def read_units(batch: pa.Table, *, preprocess: Preprocess, batch_size: int, max_pixels: int):
    """Ray Data map_batches generator: rows (unit JSON, part_index) -> tables of pixel rows, one per batch."""
    s, c = preprocess.image_size, preprocess.channels
    schema = batch_schema(s * s * c)
    for unit_json, part_index in zip(batch.column("unit").to_pylist(), batch.column("part_index").to_pylist()):
        unit = unit_from_json(unit_json)
        failures: list[Failure] = []
        keys, labels, pixels = [], [], []
        pos = 0

        def flush(last: bool):
            n = len(keys)
            total = [-1] * n
            fails = [None] * n
            pix = pa.array(pixels, pa.binary(s * s * c))
            rows_keys, rows_labels = list(keys), list(labels)
            if last:
                if n == 0:  # placeholder row so the driver learns the unit is done
                    rows_keys, rows_labels, pix, total, fails = [None], [None], pa.nulls(1, pa.binary(s * s * c)), [0], [None]
                    n = 1
                total[-1] = pos + len(keys)
                fails[-1] = json.dumps([asdict(f) for f in failures])
            start = pos
            return pa.Table.from_arrays([
                pa.array([part_index] * n, pa.int32()), pa.array(np.arange(start, start + n), pa.int64()),
                pa.array(rows_keys, pa.string()), pa.array(rows_labels, pa.int32()), pix,
                pa.array(total, pa.int64()), pa.array(fails, pa.string()),
            ], schema=schema)

        for raw in iter_unit(unit, failures.append):
            try:
                arr = decode_sample(raw, preprocess, max_pixels)
            except DecodeError as e:
                failures.append(Failure(raw.key, unit.url, str(e)))
                continue
            keys.append(raw.key)
            labels.append(raw.label)
            pixels.append(arr.tobytes())
            if len(keys) == batch_size:
                yield flush(last=False)
                pos += len(keys)
                keys, labels, pixels = [], [], []
        yield flush(last=True)


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

    def __init__(self, bundle, *, batch_size: int, device: str = "cpu", threads: int = 0, workers: int = 1):
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
        self.batch_size = batch_size
        cfg = self.tok.config
        self.shape = (cfg.image_size, cfg.image_size, cfg.channels)
        self.k = cfg.codebook_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column("pixels").combine_chunks()
        valid = pc.is_valid(batch.column("key")).to_numpy(zero_copy_only=False)
        n = len(batch)
        size = int(np.prod(self.shape))
        # The pixels column is fixed_size_binary(S*S*C): buffers()[1] is its data buffer, every
        # image `size` bytes back to back. A column sliced out of a bigger one still points at the
        # whole buffer, with `offset` counting the rows before the slice, so this column's images
        # are bytes [offset * size, (offset + n) * size): zero-copy, no per-row Python objects.
        buf = np.frombuffer(pixels.buffers()[1], dtype=np.uint8)[pixels.offset * size:(pixels.offset + n) * size]
        images = buf.reshape(n, *self.shape)  # (n, S, S, C) uint8
        h = self.tok.grid[0]
        grids = np.zeros((n, h, self.tok.grid[1]), dtype=np.int64)
        parts = batch.column("part_index").to_numpy()
        groups = batch.column("pos").to_numpy() // self.batch_size
        # encode each (part_index, pos // batch_size) group on its own: what is encoded together
        # is a function of the data only, never of how the rows were spread over workers
        order = np.lexsort((groups, parts))
        keys = np.stack([parts[order], groups[order]], 1)
        cuts = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
        for rows in np.split(order, cuts):
            rows = rows[valid[rows]]
            if len(rows):
                grids[rows] = self.tok.encode(images[rows], batch_size=self.batch_size).cpu().numpy()
        out = batch.drop_columns(["pixels"])
        return out.append_column("tokens", tokens_array(grids, self.k))


class UnitAssembler:
    """Driver side: collects token rows per unit (by part_index index) until the unit is complete."""

    def __init__(self):
        self.tables: dict[int, list[pa.Table]] = defaultdict(list)
        self.rows: dict[int, int] = defaultdict(int)
        self.total: dict[int, int] = {}
        self.failures: dict[int, list[dict]] = {}

    def add(self, table: pa.Table) -> list[tuple[int, pa.Table, list[dict]]]:
        """Add encoded rows; return the units they completed as (part_index, rows ordered by pos, failures)."""
        done = []
        parts = table.column("part_index").to_numpy()
        for part_index in np.unique(parts):
            t = table.filter(pc.equal(table.column("part_index"), int(part_index)))
            part_index = int(part_index)
            last = t.filter(pc.greater_equal(t.column("total"), 0))
            if last.num_rows:
                self.total[part_index] = int(last.column("total")[0].as_py())
                self.failures[part_index] = json.loads(last.column("failures")[0].as_py())
            good = t.filter(pc.is_valid(t.column("key")))  # drops the placeholder row
            self.tables[part_index].append(good)
            self.rows[part_index] += good.num_rows
            if part_index in self.total and self.rows[part_index] >= self.total[part_index]:
                finished = self._finish(part_index)
                if finished is not None:
                    done.append(finished)
        return done

    def _finish(self, part_index: int) -> tuple[int, pa.Table, list[dict]] | None:
        t = pa.concat_tables(self.tables[part_index]).sort_by("pos")
        pos = t.column("pos").to_numpy()
        if len(pos) > 1 and (np.diff(pos) == 0).any():  # a retried task delivered a batch twice
            t = t.filter(pa.array(np.concatenate([[True], np.diff(pos) != 0])))
        if t.num_rows < self.total[part_index]:  # duplicates counted; a batch is still to come
            self.tables[part_index], self.rows[part_index] = [t], t.num_rows
            return None
        del self.tables[part_index], self.rows[part_index]
        self.total.pop(part_index)
        return part_index, t, self.failures.pop(part_index)

    @property
    def in_flight(self) -> int:
        return len(self.tables)
