"""The one training stream under image and token data (pipeline/sharded_stream.py): every epoch
of every rank's share covers the data once, ranks split one process's order exactly when they
stride, a resume continues exactly, whole epochs of known size are skipped without reading, and
the order is a function of the seed."""
import numpy as np
import pytest

from vqtok import DataError
from vqtok.pipeline.sharded_stream import ShardedStream, object_column

SIZES = [37, 5, 60, 0, 23, 41]  # items per unit, an empty unit among them


def units_and_reads(sizes=SIZES):
    """Units 0..n-1, unit u holding items u*1000 + i; `reads` counts each unit's reads."""
    reads = []

    def read(u):
        reads.append(u)
        items = np.arange(sizes[u]) + 1000 * u
        for s in range(0, len(items), 16):  # chunks of 16, as a reader yields them
            yield (items[s:s + 16], -items[s:s + 16])  # two columns that must stay aligned

    return list(range(len(sizes))), read, reads


def take(stream: ShardedStream, n: int, skip: int = 0) -> list[np.ndarray]:
    out, got = [], 0
    for chunk in stream.chunks(skip):
        a, b = chunk.columns
        assert np.array_equal(a, -b)  # the columns travel together through the buffer
        out.append((chunk.epoch, a, chunk.end))
        got += len(a)
        if got >= n:
            break
    return out


def epoch_items(stream: ShardedStream, epoch: int) -> np.ndarray:
    return np.concatenate([a for e, a, _ in take(stream, 10 ** 6) if e == epoch] or [np.array([], int)])


@pytest.mark.parametrize("world", [1, 2, 3, 7])  # 7 > 6 units: items are strided instead of units
@pytest.mark.parametrize("sized", [True, False])
def test_every_epoch_the_ranks_cover_every_item_once(world, sized):
    units, read, _ = units_and_reads()
    allitems = np.concatenate([np.arange(n) + 1000 * u for u, n in enumerate(SIZES)])
    for epoch in (0, 1, 2):
        shares = []
        for rank in range(world):
            s = ShardedStream(units, read, size=(lambda u: SIZES[u]) if sized else None, seed=4, rank=rank,
                              world_size=world, shuffle_buffer=30)
            share = []
            for chunk in s.chunks(epochs=epoch + 1):
                if chunk.epoch == epoch:
                    share.append(chunk.columns[0])
            shares.append(np.concatenate(share))
            if sized:
                assert s.epoch_size(epoch) == len(shares[-1])
        got = np.concatenate(shares)
        assert sorted(got) == sorted(allitems)  # each item exactly once


def test_striding_ranks_split_one_process_order_exactly():
    units, read, _ = units_and_reads([201])  # one unit, three ranks (epochs of 67 items each)
    one = np.concatenate([a for _, a, _ in take(ShardedStream(units, read, seed=1, shuffle_buffer=50), 600)])[:600]
    ranks = [np.concatenate([a for _, a, _ in take(ShardedStream(units, read, seed=1, rank=r, world_size=3,
                                                                 shuffle_buffer=50), 200)])[:200] for r in range(3)]
    for j in range(200):
        assert sorted(one[3 * j:3 * j + 3]) == sorted(r[j] for r in ranks)


@pytest.mark.parametrize("sized", [True, False])
def test_a_resume_continues_exactly_and_skips_whole_epochs_unread(sized):
    units, read, reads = units_and_reads()
    s = ShardedStream(units, read, size=(lambda u: SIZES[u]) if sized else None, seed=2, shuffle_buffer=40)
    run = np.concatenate([a for _, a, _ in take(s, 700)])[:700]  # four epochs and a bit
    assert not np.array_equal(run[:166], run[166:332])  # epochs are shuffled differently
    for skip in (0, 1, 39, 166, 500, 523):
        reads.clear()
        chunks = take(s, 700 - skip, skip=skip)
        again = np.concatenate([a for _, a, _ in chunks])[:700 - skip]
        assert np.array_equal(again, run[skip:]), skip
        assert chunks[0][2] - len(chunks[0][1]) == skip  # positions count the skipped items
        touched = 4 - skip // sum(SIZES) + 1  # epochs from the one holding `skip` to the 5th
        if sized:  # whole epochs before `skip` are passed over without reading a unit
            assert len(reads) <= touched * len(SIZES), (skip, reads)
        else:
            assert len(reads) >= 4 * len(SIZES)


def test_the_order_is_a_function_of_the_seed():
    units, read, _ = units_and_reads()
    a = epoch_items(ShardedStream(units, read, seed=0, shuffle_buffer=40), 0)
    assert np.array_equal(a, epoch_items(ShardedStream(units, read, seed=0, shuffle_buffer=40), 0))
    assert not np.array_equal(a, epoch_items(ShardedStream(units, read, seed=1, shuffle_buffer=40), 0))
    assert len(epoch_items(ShardedStream(units, read, seed=-3, shuffle_buffer=40), 0)) == sum(SIZES)
    rank0 = ShardedStream(units, read, seed=0, world_size=2)  # a different share of the units each epoch
    assert len({tuple(sorted(rank0.epoch_units(e))) for e in range(6)}) > 1
    unshuffled = epoch_items(ShardedStream(units, read, shuffle=False), 0)
    assert np.array_equal(unshuffled, np.concatenate([np.arange(n) + 1000 * u for u, n in enumerate(SIZES)]))


def test_an_empty_epoch_fails_naming_what_it_read():
    units, read, _ = units_and_reads([0, 0])
    with pytest.raises(DataError, match="epoch 0 over 2 part.* produced no rows"):
        next(ShardedStream(units, read, what=("part", "row")).chunks())
    with pytest.raises(DataError, match="epoch 0 over 2 part.* produced no rows"):
        next(ShardedStream(units, read, size=lambda u: 0, what=("part", "row")).chunks())
    with pytest.raises(DataError, match="no input units"):
        ShardedStream([], read)


def test_object_columns_hold_python_objects():
    col = object_column([("a", 1), ("b", 2)])
    assert col.shape == (2,) and col[1] == ("b", 2)
