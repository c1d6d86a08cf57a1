"""The training data of both models: one seeded, sharded, shuffled, resumable stream of items
(ShardedStream), under image samples (ImageStream: the tokenizer's, and evaluation's) and token rows
(TokenStream: the prior's).

    stream = ImageStream(units, preprocess, seed=0, rank=r, world_size=w, shuffle_buffer=10_000)
    for batch in stream.batches(64, skip=resume_samples): batch.pixels, batch.labels, batch.consumed
    stream = TokenStream(corpus.parts, corpus.grid, seed=0, rank=r, world_size=w)
    for batch in stream.batches(64, skip=resume_rows): batch.tokens, batch.labels, batch.consumed

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

ImageStream: the raw samples (still encoded) of the input units go through the stream, then are
decoded and batched. `consumed` counts raw samples taken from the stream, those that failed to
decode included, so a resumed run skips exactly what it had read, without decoding it.

TokenStream: token grids and labels of Parquet parts (pipeline/token_dataset.py's TokenCorpus);
never the whole dataset in memory: a rank holds one Parquet record batch being read plus its
shuffle buffer, and the manifest's row counts let a resumed run pass over whole epochs without
reading them, then over the rows it had consumed within the epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Generic, TypeVar

import numpy as np
import torch

from ..models.tokenizer import DEFAULT_MAX_PIXELS, DecodeError, Preprocess
from .errors import DataError
from .sources import Failure, FailureLog, Unit, iter_unit
from .token_dataset import iter_part_rows
from .token_format import Part

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


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Token grids
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    tokens: torch.Tensor  # int64 (B, h, w)
    labels: torch.Tensor  # int64 (B,), -1 where the row has no label
    consumed: int  # rows this rank has taken from its stream so far (the resume position)
    epoch: int
    captions: list[str | None] | None = None  # with TokenStream(captions=True): each row's caption


class TokenStream:
    """Token grids and labels of Parquet parts through one ShardedStream (pipeline/sharded_stream.py:
    the epoch order, the shards over ranks, the shuffle buffer, resume); the parts' row counts come
    from the manifest, so a resumed run passes over whole epochs without reading them."""

    def __init__(self, parts: Sequence[Part], grid: tuple[int, int], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 20_000, read_rows: int = 2048,
                 captions: bool = False):
        """captions: also carry each row's caption (TokenBatch.captions; the data order is the same)."""
        self.grid, self.read_rows, self.captions = grid, read_rows, captions
        self.stream = ShardedStream(parts, lambda part: iter_part_rows(part, self.read_rows, captions=captions),
                                    size=lambda part: part.rows,
                                    seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                                    shuffle_buffer=shuffle_buffer, what=("part", "row"))

    def epoch_rows(self, epoch: int) -> int:
        """Rows this rank reads in epoch e, from the manifest's counts (nothing is read)."""
        return self.stream.epoch_size(epoch)

    def rows(self, skip: int = 0) -> Iterator[tuple]:
        """(epoch, tokens, labels[, captions]) chunks forever, starting after `skip` rows of this rank's stream."""
        for chunk in self.stream.chunks(skip):
            yield chunk.epoch, *chunk.columns

    def _batch(self, columns: tuple[np.ndarray, ...], consumed: int, epoch: int) -> TokenBatch:
        tokens, labels = columns[0], columns[1]
        h, w = self.grid
        return TokenBatch(torch.from_numpy(tokens.astype(np.int64)).view(len(labels), h, w),
                          torch.from_numpy(labels), consumed, epoch,
                          columns[2].tolist() if self.captions else None)

    def one_pass(self, batch_size: int, max_rows: int | None = None) -> Iterator[TokenBatch]:
        """Epoch 0 once (the first max_rows rows of it), in batches; the last one may be short.
        For evaluation: unshuffled, every rank its own disjoint share."""
        want = self.epoch_rows(0) if max_rows is None else min(max_rows, self.epoch_rows(0))
        done = 0
        for chunk in self.stream.chunks(epochs=1):
            n = len(chunk.columns[0])
            for i in range(0, n, batch_size):
                take = min(batch_size, n - i, want - done)
                if take <= 0:
                    return
                done += take
                yield self._batch(tuple(c[i:i + take] for c in chunk.columns), done, 0)

    def batches(self, batch_size: int, *, skip: int = 0) -> Iterator[TokenBatch]:
        """Batches of batch_size rows forever (epochs run into each other)."""
        pending: list[tuple[np.ndarray, ...]] = []
        have, consumed = 0, skip
        for chunk in self.stream.chunks(skip):
            pending.append(chunk.columns)
            have += len(chunk.columns[0])
            if have < batch_size:
                continue
            cols = tuple(np.concatenate(c) for c in zip(*pending))
            nb = have // batch_size
            for i in range(nb):
                s = slice(i * batch_size, (i + 1) * batch_size)
                consumed += batch_size
                yield self._batch(tuple(c[s] for c in cols), consumed, chunk.epoch)
            pending = [tuple(c[nb * batch_size:] for c in cols)]
            have = len(pending[0][0])
