"""The stages of batch tokenization, as plain functions on Arrow tables (Ray Data runs them, from
jobs/tokenize.py; tests and benchmarks can call them directly). The rows between them are
pipeline/unit_rows.py's (UnitRows: the schema, batches, end of unit, failures).

    read_units      (Ray tasks)   a unit -> batches of preprocessed pixels, then its end row
    BatchEncoder    (Ray actors)  pixels -> token grids, one (unit, batch) group per encode call
    UnitCollector   (driver)      token rows -> one complete, ordered table per unit, for commit
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from ..models.preprocess import DecodeError, Preprocess
from .sources import Failure, iter_unit
from .token_format import tokens_array
from .unit_rows import UnitRows, units_of


def read_units(items: pa.Table, *, preprocess: Preprocess, batch_size: int, max_pixels: int):
    """Ray Data map_batches generator: unit items (unit_rows.unit_items) -> for each unit, tables
    of up to batch_size decoded images (batch numbers 0, 1, ...), then its end row."""
    codec = UnitRows(preprocess.shape)
    for unit, part_index in units_of(items):
        failures: list[Failure] = []
        keys, labels, pixels = [], [], []
        batch, pos = 0, 0
        for raw in iter_unit(unit, failures.append):
            try:
                arr = preprocess.decode(raw.data, max_pixels)
            except DecodeError as e:
                failures.append(Failure(raw.key, unit.url, str(e)))
                continue
            keys.append(raw.key)
            labels.append(raw.label)
            pixels.append(arr.tobytes())
            if len(keys) == batch_size:
                yield codec.image_rows(part_index, batch, pos, keys, labels, pixels)
                batch, pos = batch + 1, pos + len(keys)
                keys, labels, pixels = [], [], []
        if keys:
            yield codec.image_rows(part_index, batch, pos, keys, labels, pixels)
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
