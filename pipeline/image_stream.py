"""A deterministic, resumable stream of preprocessed image batches for training.

Epoch e visits this rank's units in an order drawn from (seed, e), passes raw samples through a
seeded shuffle buffer, decodes, and batches. Everything is a function of (units, seed, rank,
world_size), so a resumed run skips exactly the samples it had consumed, without decoding them.

Sharding over ranks: whole units when there are at least as many units as ranks, otherwise every
rank reads and shuffles the same stream and keeps samples i with i % world_size == rank (so the
ranks' batch j together equal a single process's batch j, with per-rank batch size B / world_size).
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models.preprocess import DEFAULT_MAX_PIXELS, DecodeError, Preprocess
from .errors import DataError
from .sources import Failure, FailureLog, RawSample, Unit, iter_unit


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
        if not units:
            raise DataError("no input units to read")
        self.units, self.preprocess = list(units), preprocess
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.max_pixels = shuffle, shuffle_buffer, max_pixels
        self.failures = failures if failures is not None else FailureLog()

    # raw, shuffled, not yet decoded
    def _epoch_raw(self, epoch: int) -> Iterator[RawSample]:
        units = self.units
        by_unit = len(units) >= self.world_size
        if by_unit:
            units = units[self.rank :: self.world_size]
        if self.shuffle:
            units = list(units)
            # one seed per (seed, epoch): a large prime multiplier keeps (seed, epoch) pairs from
            # colliding (seed 0 epoch 5 vs seed 5 epoch 0) as a plain seed + epoch would. Nothing
            # depends on the constant itself, but changing it changes every run's data order.
            random.Random(self.seed * 1_000_003 + epoch).shuffle(units)
        samples = (s for u in units for s in iter_unit(u, self.failures.add))
        if self.shuffle:
            samples = self._shuffled(samples, epoch)
        if by_unit:
            yield from samples
        else:
            # Every rank reads and shuffles the same stream and keeps every world_size-th sample,
            # so rank batches j together hold exactly the samples of a single process's batch j.
            yield from (s for i, s in enumerate(samples) if i % self.world_size == self.rank)

    def _shuffled(self, samples: Iterator[RawSample], epoch: int) -> Iterator[RawSample]:
        """A seeded shuffle buffer (the same on every rank)."""
        # a different prime than the unit order's, so the buffer's draws are not the unit
        # shuffle's stream again; the same on every rank (the row striding relies on it)
        rng = random.Random(self.seed * 7_919 + epoch + 1)
        buf: list[RawSample] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _raw_with_epoch(self, epochs: int | None) -> Iterator[tuple[int, RawSample]]:
        epoch = 0
        while epochs is None or epoch < epochs:
            n = 0
            for s in self._epoch_raw(epoch):
                n += 1
                yield epoch, s
            if n == 0:
                raise DataError(f"rank {self.rank}: an epoch over {len(self.units)} unit(s) produced no samples")
            epoch += 1

    def batches(self, batch_size: int, *, skip: int = 0, epochs: int | None = None,
                drop_last: bool = True) -> Iterator[Batch]:
        """Decoded batches. `skip` raw samples are passed over without decoding (resume)."""
        consumed = 0
        pixels: list[np.ndarray] = []
        labels: list[int | None] = []
        keys: list[str] = []
        epoch_now, decoded_this_epoch, epoch_start = 0, 0, 0
        for epoch, raw in self._raw_with_epoch(epochs):
            if epoch != epoch_now:  # judge only whole epochs read after the resume point
                if decoded_this_epoch == 0 and epoch_start >= skip:
                    raise DataError(f"none of the {self.failures.count} samples read in a whole pass over "
                                    f"the data could be decoded; first: {self.failures.examples[:1]}")
                epoch_now, decoded_this_epoch, epoch_start = epoch, 0, consumed
            consumed += 1
            if consumed <= skip:
                continue
            try:
                pixels.append(self.preprocess.decode(raw.data, self.max_pixels))
            except DecodeError as e:
                self.failures.add(Failure(raw.key, raw.unit, str(e)))
                continue
            decoded_this_epoch += 1
            labels.append(raw.label)
            keys.append(raw.key)
            if len(pixels) == batch_size:
                yield Batch(torch.from_numpy(np.stack(pixels)), labels, keys, consumed)
                pixels, labels, keys = [], [], []
        if pixels and not drop_last:
            yield Batch(torch.from_numpy(np.stack(pixels)), labels, keys, consumed)
