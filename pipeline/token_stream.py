"""Token datasets as training data for the prior: one corpus from one or more token datasets
(refused when they were made by different tokenizers), its statistics, and a streaming,
shuffled, rank-disjoint, resumable batch stream.

    corpus = TokenCorpus(["out/tokens"])             # checks every part's schema metadata
    stats = corpus.stats()                            # unigram counts, labels -> entropy, classes
    stream = TokenStream(corpus.parts, corpus.grid, seed=0, rank=r, world_size=w)
    for batch in stream.batches(64, skip=resume_rows): batch.tokens, batch.labels, batch.consumed

Never the whole dataset in memory: a rank holds one Parquet record batch being read plus its
shuffle buffer. The order, the ranks' shares, the shuffle buffer and resume are those of every
training stream (pipeline/sharded_stream.py); the manifest's row counts let a resumed run pass
over whole epochs without reading them, then over the rows it had consumed within the epoch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from .errors import DataError
from .sharded_stream import ShardedStream
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
    """Token grids and labels of Parquet parts through one ShardedStream (pipeline/sharded_stream.py:
    the epoch order, the shards over ranks, the shuffle buffer, resume); the parts' row counts come
    from the manifest, so a resumed run passes over whole epochs without reading them."""

    def __init__(self, parts: Sequence[Part], grid: tuple[int, int], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 20_000, read_rows: int = 2048):
        self.grid, self.read_rows = grid, read_rows
        self.stream = ShardedStream(parts, lambda part: iter_part_rows(part, self.read_rows), size=lambda part: part.rows,
                                    seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                                    shuffle_buffer=shuffle_buffer, what=("part", "row"))

    def epoch_rows(self, epoch: int) -> int:
        """Rows this rank reads in epoch e, from the manifest's counts (nothing is read)."""
        return self.stream.epoch_size(epoch)

    def rows(self, skip: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(epoch, tokens, labels) chunks forever, starting after `skip` rows of this rank's stream."""
        for chunk in self.stream.chunks(skip):
            yield chunk.epoch, *chunk.columns

    def _batch(self, tokens: np.ndarray, labels: np.ndarray, consumed: int, epoch: int) -> TokenBatch:
        h, w = self.grid
        return TokenBatch(torch.from_numpy(tokens.astype(np.int64)).view(len(labels), h, w),
                          torch.from_numpy(labels), consumed, epoch)

    def one_pass(self, batch_size: int, max_rows: int | None = None) -> Iterator[TokenBatch]:
        """Epoch 0 once (the first max_rows rows of it), in batches; the last one may be short.
        For evaluation: unshuffled, every rank its own disjoint share."""
        want = self.epoch_rows(0) if max_rows is None else min(max_rows, self.epoch_rows(0))
        done = 0
        for chunk in self.stream.chunks(epochs=1):
            tokens, labels = chunk.columns
            for i in range(0, len(labels), batch_size):
                take = min(batch_size, len(labels) - i, want - done)
                if take <= 0:
                    return
                done += take
                yield self._batch(tokens[i:i + take], labels[i:i + take], done, 0)

    def batches(self, batch_size: int, *, skip: int = 0) -> Iterator[TokenBatch]:
        """Batches of batch_size rows forever (epochs run into each other)."""
        pend_t: list[np.ndarray] = []
        pend_l: list[np.ndarray] = []
        have, consumed = 0, skip
        for chunk in self.stream.chunks(skip):
            tokens, labels = chunk.columns
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
                yield self._batch(t[s], lab[s], consumed, chunk.epoch)
            pend_t, pend_l = [t[nb * batch_size:]], [lab[nb * batch_size:]]
            have = len(pend_l[0])
