"""One seeded, sharded, shuffled, resumable stream of items: the training data under both models,
image samples (pipeline/image_stream.py) and token rows (pipeline/token_stream.py).

    stream = ShardedStream(units, read, size=rows_of, seed=0, rank=r, world_size=w, shuffle_buffer=20_000)
    for chunk in stream.chunks(skip=consumed):   # forever (or `epochs` passes)
        chunk.columns    # equal-length numpy arrays: the items (one column, or tokens and labels)
        chunk.end        # items of this rank's stream taken so far: the resume position after it

`read(unit)` yields a unit's items as tuples of equal-length numpy arrays (an object array of raw
samples, or token grids and labels); `size(unit)`, when given, tells a unit's item count without
reading it. The rules, the same for both kinds of data:

- Order. Epoch e visits the units in an order drawn from (seed, e), the same on every rank.
- Shards. With at least as many units as ranks, rank r takes units r, r + W, r + 2W, ... of that
  order (the ranks' shares are disjoint and together hold every unit once). With fewer, every rank
  reads every unit, shuffles the same way, and keeps items i with i % W == r of the shuffled epoch,
  so the ranks' items j together are exactly the items one process would have taken.
- Shuffle buffer. Items pass a block shuffle: the pool fills until it holds `shuffle_buffer` items,
  is permuted, and all but half a buffer is emitted (the half that stays mixes with what comes
  next); the pool is emptied, permuted, at the end of each epoch. So epoch e of rank r is a fixed
  sequence of items, a function of (units, seed, rank, world_size, shuffle_buffer).
- Resume. `skip` items are passed over: an epoch whose size the units tell (`size`) without
  reading it, otherwise by reading and dropping them (the reader's items, never decoded).
- Random numbers. numpy's default_rng((seed, epoch, 0)) orders the units and
  default_rng((seed, epoch, 1)) drives the buffer, on every rank alike. Changing any of this changes
  every run's data order: bump STREAM_VERSION, which checkpoints record (jobs/trainer.py refuses
  to resume a checkpoint of another version, since its data order cannot be continued).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from .errors import DataError

# The data order defined above. 1 (implied by checkpoints that record none): the two streams vqtok
# had before this one, with their own orders; they cannot be continued by this one.
STREAM_VERSION = 2

U = TypeVar("U")  # a unit: an input file or shard, a Parquet part
Columns = tuple[np.ndarray, ...]


@dataclass
class Chunk:
    epoch: int
    columns: Columns  # equal-length arrays: consecutive items of this rank's stream
    end: int  # items of this rank's stream taken up to and including this chunk (skipped ones too)

    def __len__(self) -> int:
        return len(self.columns[0])


class ShardedStream(Generic[U]):
    def __init__(self, units: Sequence[U], read: Callable[[U], Iterator[Columns]], *,
                 size: Callable[[U], int] | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, shuffle_buffer: int = 10_000, what: tuple[str, str] = ("unit", "item")):
        """what: how errors name a unit and an item ("part", "row")."""
        if not units:
            raise DataError(f"no input {what[0]}s to read")
        self.units, self.read, self.size = list(units), read, size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.what = shuffle, max(1, shuffle_buffer), what
        self.by_unit = len(self.units) >= world_size  # else every rank reads everything and strides

    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng((self.seed % 2**64, epoch, purpose))  # seeds must not be negative

    def epoch_units(self, epoch: int) -> list[U]:
        """The units this rank reads in epoch e, in order."""
        order = self._rng(epoch, 0).permutation(len(self.units)) if self.shuffle else range(len(self.units))
        units = [self.units[i] for i in order]
        return units[self.rank:: self.world_size] if self.by_unit else units

    def epoch_size(self, epoch: int) -> int | None:
        """Items this rank takes in epoch e, from the units' sizes (nothing is read); None without `size`."""
        if self.size is None:
            return None
        total = sum(self.size(u) for u in self.epoch_units(epoch))
        return total if self.by_unit else len(range(self.rank, total, self.world_size))

    def _epoch(self, epoch: int) -> Iterator[Columns]:
        """This rank's items of epoch e, shuffled."""
        items = (cols for unit in self.epoch_units(epoch) for cols in self.read(unit))
        if self.shuffle:
            items = self._shuffled(items, self._rng(epoch, 1))
        if self.by_unit:
            yield from items
            return
        offset = 0  # item index over the whole shuffled epoch, the same on every rank
        for cols in items:
            keep = (np.arange(offset, offset + len(cols[0])) % self.world_size) == self.rank
            offset += len(cols[0])
            yield tuple(c[keep] for c in cols)

    def _shuffled(self, items: Iterator[Columns], rng: np.random.Generator) -> Iterator[Columns]:
        """The block shuffle buffer (see the module's docstring)."""
        pool: list[Columns] = []
        size, keep = 0, self.shuffle_buffer // 2
        for cols in items:
            pool.append(cols)
            size += len(cols[0])
            if size >= self.shuffle_buffer:
                merged = _permuted(pool, rng)
                yield tuple(c[: size - keep] for c in merged)
                pool, size = [tuple(c[size - keep:] for c in merged)], keep
        if size:
            yield _permuted(pool, rng)

    def chunks(self, skip: int = 0, epochs: int | None = None) -> Iterator[Chunk]:
        """This rank's items after the first `skip`, epoch after epoch (forever, or `epochs` of
        them), in chunks as they come (not of a fixed size)."""
        pos, epoch = 0, 0
        while epochs is None or epoch < epochs:
            n = self.epoch_size(epoch)
            if n is not None and n > 0 and pos + n <= skip:  # an epoch already consumed: not read
                pos += n
                epoch += 1
                continue
            taken = 0
            if n != 0:
                for cols in self._epoch(epoch):
                    k = len(cols[0])
                    drop = min(k, max(0, skip - pos))
                    pos, taken = pos + k, taken + k
                    if drop < k:
                        yield Chunk(epoch, tuple(c[drop:] for c in cols) if drop else cols, pos)
            if taken == 0:
                unit, item = self.what
                raise DataError(f"rank {self.rank} of {self.world_size}: epoch {epoch} over {len(self.units)} "
                                f"{unit}(s) produced no {item}s")
            epoch += 1


def _permuted(pool: list[Columns], rng: np.random.Generator) -> Columns:
    merged = tuple(np.concatenate(c) for c in zip(*pool)) if len(pool) > 1 else pool[0]
    perm = rng.permutation(len(merged[0]))
    return tuple(c[perm] for c in merged)


def object_column(items: Sequence) -> np.ndarray:
    """Python objects (raw samples) as a 1-d object array, a column for ShardedStream."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # one by one: numpy would unpack items that are sequences
        out[i] = item
    return out
