"""A deterministic, resumable stream of preprocessed image batches for training and evaluation.

    stream = ImageStream(units, preprocess, seed=0, rank=r, world_size=w, shuffle_buffer=10_000)
    for batch in stream.batches(64, skip=resume_samples): batch.pixels, batch.labels, batch.consumed

The raw samples (still encoded) of the input units go through one ShardedStream
(pipeline/sharded_stream.py: the epoch order, the shards over ranks, the shuffle buffer, resume),
then are decoded and batched. `consumed` counts raw samples taken from the stream, those that
failed to decode included, so a resumed run skips exactly what it had read, without decoding it.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from ..models.preprocess import DEFAULT_MAX_PIXELS, DecodeError, Preprocess
from .errors import DataError
from .sharded_stream import Columns, ShardedStream, object_column
from .sources import Failure, FailureLog, Unit, iter_unit

READ_CHUNK = 256  # raw samples per chunk read from a unit (part of the data order: the buffer fills by chunks)


@dataclass
class Batch:
    pixels: torch.Tensor  # uint8 (B, S, S, C)
    labels: list[int | None]
    keys: list[str]
    consumed: int  # raw samples taken from the shuffled stream so far (the resume position)


class ImageStream:
    def __init__(
        self,
        units: Sequence[Unit],
        preprocess: Preprocess,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        failures: FailureLog | None = None,
    ):
        self.preprocess, self.max_pixels = preprocess, max_pixels
        self.failures = failures if failures is not None else FailureLog()
        self.raw = ShardedStream(units, self._read, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                                 shuffle_buffer=shuffle_buffer, what=("unit", "sample"))

    def _read(self, unit: Unit) -> Iterator[Columns]:
        samples = iter_unit(unit, self.failures.add)  # bad members are logged and skipped
        while chunk := list(islice(samples, READ_CHUNK)):
            yield (object_column(chunk),)

    def batches(self, batch_size: int, *, skip: int = 0, epochs: int | None = None,
                drop_last: bool = True) -> Iterator[Batch]:
        """Decoded batches. `skip` raw samples are passed over without decoding (resume). Fails when
        a whole epoch read after the resume point decodes nothing."""
        pixels: list[np.ndarray] = []
        labels: list[int | None] = []
        keys: list[str] = []
        epoch_now, decoded, whole = None, 0, skip == 0  # whole: epoch_now was read from its start
        end = skip
        for chunk in self.raw.chunks(skip, epochs):
            if chunk.epoch != epoch_now:
                if whole and epoch_now is not None and decoded == 0:
                    raise DataError(f"none of the {self.failures.count} samples read in a whole pass over "
                                    f"the data could be decoded; first: {self.failures.examples[:1]}")
                whole = whole or epoch_now is not None  # every epoch after the first one seen
                epoch_now, decoded = chunk.epoch, 0
            start, end = chunk.end - len(chunk), chunk.end
            for i, raw in enumerate(chunk.columns[0]):
                try:
                    pixels.append(self.preprocess.decode(raw.data, self.max_pixels))
                except DecodeError as e:
                    self.failures.add(Failure(raw.key, raw.unit, str(e)))
                    continue
                decoded += 1
                labels.append(raw.label)
                keys.append(raw.key)
                if len(pixels) == batch_size:
                    yield Batch(torch.from_numpy(np.stack(pixels)), labels, keys, start + i + 1)
                    pixels, labels, keys = [], [], []
        if pixels and not drop_last:
            yield Batch(torch.from_numpy(np.stack(pixels)), labels, keys, end)

