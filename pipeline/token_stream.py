"""Token datasets as training data for the prior: one corpus from one or more token datasets
(refused when they were made by different tokenizers), its statistics, and a streaming,
shuffled, rank-disjoint, resumable batch stream.

    corpus = TokenCorpus(["out/tokens"])             # checks every part's schema metadata
    stats = corpus.stats()                            # unigram counts, labels -> entropy, classes
    stream = TokenStream(corpus.parts, corpus.grid, seed=0, rank=r, world_size=w)
    for batch in stream.batches(64, skip=resume_rows): batch.tokens, batch.labels, batch.consumed

Never the whole dataset in memory: a rank holds one Parquet record batch being read plus its
shuffle buffer. Epoch e visits the parts in an order drawn from (seed, e); with at least as many
parts as ranks each rank takes every world_size-th part of that order (disjoint), otherwise each
rank reads all parts and keeps rows i % world_size == rank (disjoint too). Rows pass a seeded
block shuffle buffer that is flushed at the end of each epoch, so epoch e of rank r is a fixed
sequence: a resumed run skips whole epochs by their row counts (from the manifest, without
reading) and then the rows it had consumed within the epoch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from .errors import DataError
from .token_dataset import TokenDataset, _DescribedByMetadata, iter_part_rows
from .token_format import METADATA_KEY, Part


@dataclass
class CorpusStats:
    rows: int
    tokens: int
    counts: np.ndarray  # (K,) occurrences of each code
    labeled_rows: int
    max_label: int  # -1 when no row has a label
    sampled: bool  # True when only the first max_rows rows were counted

    @property
    def unigram_entropy_bits(self) -> float:
        """Entropy (bits per token) of the codes' empirical distribution: what a model that ignores
        context would score; a prior's bits per token should be well below it."""
        p = self.counts[self.counts > 0] / max(self.counts.sum(), 1)
        return float(-(p * np.log2(p)).sum())

    @property
    def codes_used(self) -> int:
        return int((self.counts > 0).sum())


class TokenCorpus(_DescribedByMetadata):
    """One or more token datasets of the same tokenizer, as one list of parts."""

    def __init__(self, paths: Sequence[str], *, what: str = "--tokens", check_parts: bool = True):
        paths = [str(p) for p in paths]
        if not paths:
            raise DataError(f"{what}: no token dataset given (the --out of `vqtok tokenize`)")
        self.datasets = [TokenDataset(p) for p in paths]
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if ds.tokenizer_id != first.tokenizer_id or ds.grid != first.grid or ds.codebook_size != first.codebook_size:
                raise DataError(
                    f"{what}: {ds.path} was made by tokenizer {ds.tokenizer_id[:16]} (grid {ds.grid}, K={ds.codebook_size}) "
                    f"but {first.path} by tokenizer {first.tokenizer_id[:16]} (grid {first.grid}, K={first.codebook_size}). "
                    f"A prior models one tokenizer's codes: re-tokenize everything with one tokenizer, or train one "
                    f"prior per tokenizer"
                )
        self.parts: list[Part] = [part for ds in self.datasets for part in ds.parts]
        owners = [ds for ds in self.datasets for _ in ds.parts]
        if check_parts:  # footers only; in parallel, since on an object store each is a request
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda a: self._check_part(a[0], a[1].url, what), zip(owners, self.parts)))
        if not self.parts:
            raise DataError(f"{what}: {', '.join(paths)} holds no committed parts yet (is `vqtok tokenize` still running?)")
        self.metadata = first.metadata

    @staticmethod
    def _check_part(ds: TokenDataset, url: str, what: str) -> None:
        """Each part carries its tokenizer in its own schema metadata: a part copied in from
        another dataset is caught here, not after hours of training on mixed vocabularies."""
        import json

        with fsspec.open(url, "rb") as f:
            raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("tokenizer_id") != ds.tokenizer_id or list(meta.get("grid", [])) != list(ds.grid):
            raise DataError(
                f"{what}: part {url} was made by tokenizer {str(meta.get('tokenizer_id'))[:16]} (grid {meta.get('grid')}), "
                f"but its dataset {ds.path} by tokenizer {ds.tokenizer_id[:16]} (grid {list(ds.grid)}): the dataset "
                f"mixes tokenizers. Remove that part (and its manifest entry) or re-tokenize into a new --out"
            )

    @property
    def num_rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def paths(self) -> list[str]:
        return [ds.path for ds in self.datasets]

    def stats(self, max_rows: int | None = None) -> CorpusStats:
        """Stream the tokens and labels once (or the first max_rows rows, in part order)."""
        k = self.codebook_size
        counts = np.zeros(k, np.int64)
        rows = labeled = 0
        max_label = -1
        for part in self.parts:
            for tokens, labels in iter_part_rows(part, 8192):
                if max_rows is not None and rows + len(labels) > max_rows:
                    tokens, labels = tokens[: max_rows - rows], labels[: max_rows - rows]
                counts += np.bincount(tokens.reshape(-1), minlength=k)[:k]
                rows += len(labels)
                has = labels >= 0
                labeled += int(has.sum())
                if has.any():
                    max_label = max(max_label, int(labels[has].max()))
                if max_rows is not None and rows >= max_rows:
                    break
            if max_rows is not None and rows >= max_rows:
                break
        n = self.grid[0] * self.grid[1]
        return CorpusStats(rows, rows * n, counts, labeled, max_label, sampled=rows < self.num_rows)

    def describe(self) -> str:
        return (f"{self.num_rows:,} token grids in {len(self.parts)} parts of {', '.join(self.paths)} "
                f"(grid {self.grid[0]}x{self.grid[1]}, K={self.codebook_size}, tokenizer {self.tokenizer_id[:16]})")


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # int64 (B, h, w)
    labels: torch.Tensor  # int64 (B,), -1 where the row has no label
    consumed: int  # rows this rank has taken from its stream so far (the resume position)
    epoch: int


class TokenStream:
    def __init__(self, parts: Sequence[Part], grid: tuple[int, int], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 20_000, read_rows: int = 2048):
        if not parts:
            raise DataError("no token parts to read")
        self.parts, self.grid = list(parts), grid
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.read_rows = shuffle, max(1, shuffle_buffer), read_rows
        self.by_part = len(self.parts) >= world_size

    def _epoch_parts(self, epoch: int) -> list[Part]:
        order = list(range(len(self.parts)))
        if self.shuffle:
            # seeded by (seed, epoch, 7): the same order on every rank, which then takes its share.
            # The 7 is an arbitrary stream tag (it must only stay fixed: changing it changes every
            # run's part order); rank 7's shuffle buffer below drawing the same numbers is harmless.
            np.random.default_rng([self.seed, epoch, 7]).shuffle(order)
        parts = [self.parts[i] for i in order]
        return parts[self.rank:: self.world_size] if self.by_part else parts

    def epoch_rows(self, epoch: int) -> int:
        """Rows this rank reads in epoch e, from the manifest's counts (nothing is read)."""
        parts = self._epoch_parts(epoch)
        if self.by_part:
            return sum(p.rows for p in parts)
        total = sum(p.rows for p in parts)
        return len(range(self.rank, total, self.world_size))

    def _epoch_chunks(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offset = 0  # row index over the whole epoch (for row striding)
        for part in self._epoch_parts(epoch):
            for tokens, labels in iter_part_rows(part, self.read_rows):
                if not self.by_part:
                    keep = (np.arange(offset, offset + len(labels)) % self.world_size) == self.rank
                    offset += len(labels)
                    tokens, labels = tokens[keep], labels[keep]
                if len(labels):
                    yield tokens, labels

    def _shuffled(self, chunks: Iterator[tuple[np.ndarray, np.ndarray]], epoch: int):
        """Block shuffle buffer: gather rows until the pool holds shuffle_buffer, permute the pool,
        emit all but a random half-buffer, which stays to mix with the next rows. Flushed at the
        end of the epoch."""
        if not self.shuffle:
            yield from chunks
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank])  # per rank: each shuffles its own rows
        pool_t: list[np.ndarray] = []
        pool_l: list[np.ndarray] = []
        size = 0
        keep = self.shuffle_buffer // 2
        for tokens, labels in chunks:
            pool_t.append(tokens)
            pool_l.append(labels)
            size += len(labels)
            if size >= self.shuffle_buffer:
                t, lab = np.concatenate(pool_t), np.concatenate(pool_l)
                perm = rng.permutation(size)
                t, lab = t[perm], lab[perm]
                yield t[: size - keep], lab[: size - keep]
                pool_t, pool_l, size = [t[size - keep:]], [lab[size - keep:]], keep
        if size:
            t, lab = np.concatenate(pool_t), np.concatenate(pool_l)
            perm = rng.permutation(size)
            yield t[perm], lab[perm]

    def rows(self, skip: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(epoch, tokens, labels) chunks forever, starting after `skip` rows of this rank's stream."""
        epoch = 0
        while True:
            n = self.epoch_rows(epoch)
            if n == 0:
                raise DataError(f"rank {self.rank} of {self.world_size}: epoch {epoch} has no rows "
                                f"({len(self.parts)} parts, {sum(p.rows for p in self.parts)} rows in all)")
            if skip >= n:  # a whole epoch already consumed: skip it without reading
                skip -= n
                epoch += 1
                continue
            for tokens, labels in self._shuffled(self._epoch_chunks(epoch), epoch):
                if skip:
                    drop = min(skip, len(labels))
                    tokens, labels, skip = tokens[drop:], labels[drop:], skip - drop
                if len(labels):
                    yield epoch, tokens, labels
            epoch += 1

    def one_pass(self, batch_size: int, max_rows: int | None = None) -> Iterator[TokenBatch]:
        """Epoch 0 once (the first max_rows rows of it), in batches; the last one may be short.
        For evaluation: unshuffled, every rank its own disjoint share."""
        h, w = self.grid
        want = self.epoch_rows(0) if max_rows is None else min(max_rows, self.epoch_rows(0))
        done = 0
        for epoch, tokens, labels in self.rows():
            if epoch > 0 or done >= want:
                return
            for i in range(0, len(labels), batch_size):
                take = min(batch_size, len(labels) - i, want - done)
                if take <= 0:
                    return
                done += take
                yield TokenBatch(torch.from_numpy(tokens[i:i + take].astype(np.int64)).view(take, h, w),
                                 torch.from_numpy(labels[i:i + take]), done, 0)

    def batches(self, batch_size: int, *, skip: int = 0) -> Iterator[TokenBatch]:
        """Batches of batch_size rows forever (epochs run into each other)."""
        h, w = self.grid
        pend_t: list[np.ndarray] = []
        pend_l: list[np.ndarray] = []
        have, consumed = 0, skip
        for epoch, tokens, labels in self.rows(skip):
            pend_t.append(tokens)
            pend_l.append(labels)
            have += len(labels)
            if have < batch_size:
                continue
            t, lab = np.concatenate(pend_t), np.concatenate(pend_l)
            nb = len(lab) // batch_size
            for i in range(nb):
                s = slice(i * batch_size, (i + 1) * batch_size)
                consumed += batch_size
                yield TokenBatch(torch.from_numpy(t[s].astype(np.int64)).view(batch_size, h, w),
                                 torch.from_numpy(lab[s]), consumed, epoch)
            pend_t, pend_l = [t[nb * batch_size:]], [lab[nb * batch_size:]]
            have = len(pend_l[0])
