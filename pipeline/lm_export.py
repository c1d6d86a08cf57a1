"""The LM export's format, and the work of one export part: a token-dataset part (images, captions)
to rows of ids in the one vocabulary (models/vocabulary.py). `vqtok export-lm` (jobs/export_lm.py)
plans the export, runs `export_part` in parallel Ray tasks and records what they wrote here.

An export is a directory (or object-store prefix):

    data/part-NNNNNN.parquet  one per committed token-dataset part, NNNNNN = that part's number in
                              the token dataset (fixed when its unit was first planned); zstd
    layout.json               Vocabulary.to_dict() (every offset, written down) + "export": the
                              export's own facts (order, pack, columns, counts, source)
    tokenizer.json            the text tokenizer extended with <pad> <bos> <eot> <boi> <eoi> and
                              <img_0> .. <img_{K-1}> at exactly the layout's ids (Vocabulary.extend)
    _export.json              the export manifest: options and their fingerprint, the source
                              dataset, per part: source part and sha256, rows, bytes, sha256;
                              "complete": true once every part is written
    _staging/                 (local disk, during a run) parts being written, renamed into data/

Rows (unpacked, the default), one per image and order, in the source part's row order (with
`--order both`: each image's text-first row, then its image-first row):

    key          string        the image's key in the token dataset
    order        string        "text-first" or "image-first"
    input_ids    list<int32>   Vocabulary.sequence(caption ids, image tokens, order)
    text_tokens  int32         caption ids in the sequence (after the --max-text-tokens cut)
    caption_cut  bool          the caption had more than --max-text-tokens ids and was cut
    label        int32         the token dataset's label (null where none)

Packed rows (`--pack SEQ_LEN`), exactly SEQ_LEN ids each:

    input_ids    list<int32>   samples concatenated, then <pad> to SEQ_LEN
    keys         list<string>  the samples' keys, in order
    orders       list<string>  each sample's order
    starts       list<int32>   offset of each sample's <bos> in input_ids
    lengths      list<int32>   each sample's length in ids (sample i = input_ids[starts[i]:][:lengths[i]])

Packing rules: samples go into rows in the unpacked rows' order; each starts with its own <bos>,
which is what separates samples (no separator token, and nothing masks one sample from another:
build a block-diagonal mask from `starts` if the trainer wants one). A sample is never split across
rows: when it does not fit in what is left of the row, the row is filled with <pad> and the sample
starts the next row. A sample longer than SEQ_LEN is an error (the job refuses such a --pack before
it starts: it knows the longest sample from --max-text-tokens and the grid). Packing is within one
export part, so parts stay independent; the last row of a part is padded. <pad> is never inside a
sample, so trailing <pad>s are exactly the padding.

Each part's Parquet schema metadata (key b"vqtok") holds JSON: format, version, the layout
(Vocabulary.to_dict(): special ids, image_offset, K, grid, text and image tokenizer ids), order,
pack, max_text_tokens and the source part's name and sha256.

A part is a deterministic function of its source part's bytes and the export's options: the same
inputs give the same bytes, whoever writes them and with however many workers. It is written whole:
streamed to a temporary file, then renamed into data/ (local disk) or uploaded in one PUT (object
stores, where an object appears whole or not at all).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models.text_tokenizer import BYTES, TextTokenizer
from ..models.vocabulary import ORDERS, Vocabulary
from .errors import DataError
from .token_format import METADATA_KEY, flat_tokens

FORMAT = "vqtok-lm-export"
VERSION = 1
MANIFEST = "_export.json"
LAYOUT_FILE = "layout.json"  # the names jobs/decode_sequence.py reads
TOKENIZER_FILE = "tokenizer.json"
DATA_DIR = "data"
STAGING_DIR = "_staging"
ROW_GROUP_ROWS = 2048  # images read, tokenized and written at a time (one Parquet row group)

COLUMNS = {
    "key": "the image's key in the token dataset",
    "order": "text-first or image-first",
    "input_ids": "the sequence's ids (list<int32>), Vocabulary.sequence",
    "text_tokens": "caption ids in the sequence, after the --max-text-tokens cut (int32)",
    "caption_cut": "the caption had more than --max-text-tokens ids and was cut (bool)",
    "label": "the token dataset's label (int32, null where none)",
}
PACKED_COLUMNS = {
    "input_ids": "exactly --pack ids (list<int32>): samples, each from its own <bos>, then <pad>",
    "keys": "the samples' keys, in order (list<string>)",
    "orders": "each sample's order (list<string>)",
    "starts": "offset of each sample's <bos> in input_ids (list<int32>)",
    "lengths": "each sample's length in ids (list<int32>)",
}


def part_file(index: int) -> str:
    return f"{DATA_DIR}/part-{index:06d}.parquet"


_SOURCE_INDEX = re.compile(r"part-(\d+)")


def source_index(source_name: str) -> int:
    """The token dataset's part number, from its part's name (part-NNNNNN-RUN.parquet, or
    part-NNNNNN.parquet in datasets written before run ids)."""
    m = _SOURCE_INDEX.match(source_name.rsplit("/", 1)[-1])
    if not m:
        raise DataError(f"token dataset part {source_name!r}: not named part-NNNNNN...; not a vqtok token dataset part")
    return int(m.group(1))


def orders_of(order: str) -> tuple[str, ...]:
    return ("text-first", "image-first") if order == "both" else (order,)


def longest_sample(vocab: Vocabulary, order: str) -> int:
    """The most ids one sample can have: <bos>, max_text_tokens caption ids, <boi>, h*w, <eoi>,
    and <eot> when image-first."""
    return 3 + vocab.max_text_tokens + vocab.image_span + (1 if "image-first" in orders_of(order) else 0)


def shortest_sample(vocab: Vocabulary, order: str) -> int:
    """The fewest ids (the empty caption): <bos> <boi> image <eoi> (+ <eot> when image-first only)."""
    return 3 + vocab.image_span + (1 if orders_of(order) == ("image-first",) else 0)


@dataclass(frozen=True)
class ExportSpec:
    """What a part's content depends on besides its source part: the layout and the options.
    Travels to the Ray tasks (small: the text tokenizer itself goes separately, by reference)."""

    layout: dict  # Vocabulary.to_dict()
    order: str
    pack: int | None
    row_group_rows: int = ROW_GROUP_ROWS

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary.from_dict(self.layout)

    def options(self) -> dict:
        """The options an export is bound to (recorded in _export.json; a re-run with others is refused)."""
        v = self.layout
        return {"format": FORMAT, "version": VERSION, "order": self.order, "pack": self.pack,
                "max_text_tokens": v["max_text_tokens"], "text_tokenizer_id": v["text_tokenizer_id"],
                "text_vocab_size": v["text_vocab_size"], "image_tokenizer_id": v["image_tokenizer_id"],
                "codebook_size": v["codebook_size"], "grid": list(v["grid"]),
                "row_group_rows": self.row_group_rows}

    def schema(self, source_name: str = "", source_sha256: str = "") -> pa.Schema:
        meta = {"format": FORMAT, "version": VERSION, "layout": self.layout, "order": self.order, "pack": self.pack,
                "max_text_tokens": self.layout["max_text_tokens"], "source_part": source_name,
                "source_sha256": source_sha256}
        if self.pack:
            fields = [pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
                      pa.field("keys", pa.list_(pa.string()), nullable=False),
                      pa.field("orders", pa.list_(pa.string()), nullable=False),
                      pa.field("starts", pa.list_(pa.int32()), nullable=False),
                      pa.field("lengths", pa.list_(pa.int32()), nullable=False)]
        else:
            fields = [pa.field("key", pa.string(), nullable=False),
                      pa.field("order", pa.string(), nullable=False),
                      pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
                      pa.field("text_tokens", pa.int32(), nullable=False),
                      pa.field("caption_cut", pa.bool_(), nullable=False),
                      pa.field("label", pa.int32(), nullable=True)]
        return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def fingerprint(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Text tokenizers in the tasks: shipped as their bytes (the id is their sha256), parsed once per process
# ---------------------------------------------------------------------------------------------
_TEXT_CACHE: dict[str, TextTokenizer] = {}


def text_tokenizer_from(kind_and_data: tuple[str, bytes]) -> TextTokenizer:
    kind, data = kind_and_data
    key = kind + ":" + hashlib.sha256(data).hexdigest()
    if key not in _TEXT_CACHE:
        _TEXT_CACHE.clear()
        _TEXT_CACHE[key] = TextTokenizer.load(BYTES) if kind == BYTES else TextTokenizer.from_json(data)
    return _TEXT_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Samples and packing
# ---------------------------------------------------------------------------------------------
@dataclass
class PartCounts:
    images: int = 0
    samples: int = 0
    rows: int = 0
    ids: int = 0  # every id written, <pad> included
    sample_ids: int = 0  # ids of the samples (ids without the padding)
    pad_ids: int = 0
    text_ids: int = 0  # caption ids written (over all samples)
    captions_cut: int = 0  # images whose caption was cut by max_text_tokens
    empty_captions: int = 0  # images with no caption ids (null caption, or one that encodes to nothing)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _list_array(arrays: list[np.ndarray], value_type=pa.int32()) -> pa.ListArray:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


class Packer:
    """Samples in, rows of exactly seq_len ids out; a sample is never split (see the module docstring)."""

    def __init__(self, seq_len: int, pad: int):
        self.seq_len, self.pad = seq_len, pad
        self._ids: list[np.ndarray] = []
        self._keys: list[str] = []
        self._orders: list[str] = []
        self._starts: list[int] = []
        self._used = 0
        self.rows: list[tuple[np.ndarray, list[str], list[str], list[int], list[int]]] = []

    def add(self, key: str, order: str, ids: np.ndarray) -> None:
        if len(ids) > self.seq_len:
            raise DataError(f"sample {key!r} ({order}) is {len(ids)} ids, longer than --pack {self.seq_len}: a sample "
                            f"is never split; give --pack {len(ids)} or more, or a smaller --max-text-tokens")
        if self._used + len(ids) > self.seq_len:
            self._close_row()
        self._starts.append(self._used)
        self._ids.append(ids)
        self._keys.append(key)
        self._orders.append(order)
        self._used += len(ids)

    def _close_row(self) -> None:
        if not self._ids:
            return
        row = np.full(self.seq_len, self.pad, np.int32)
        row[: self._used] = np.concatenate(self._ids)
        self.rows.append((row, self._keys, self._orders, self._starts, [len(a) for a in self._ids]))
        self._ids, self._keys, self._orders, self._starts, self._used = [], [], [], [], 0

    def finish(self) -> None:
        self._close_row()

    def take(self) -> pa.Table | None:
        """The rows completed so far, as a table (None if there are none)."""
        if not self.rows:
            return None
        rows, self.rows = self.rows, []
        return pa.table({
            "input_ids": _list_array([r[0] for r in rows]),
            "keys": pa.array([r[1] for r in rows], pa.list_(pa.string())),
            "orders": pa.array([r[2] for r in rows], pa.list_(pa.string())),
            "starts": pa.array([r[3] for r in rows], pa.list_(pa.int32())),
            "lengths": pa.array([r[4] for r in rows], pa.list_(pa.int32())),
        })


def read_source_batches(url: str, vocab: Vocabulary, batch_rows: int):
    """A token-dataset part in record batches: (keys, tokens (m, h*w), labels, captions). Parts
    written before captions (schema_version 1) have no caption column: their captions are None.
    The part's own schema metadata must name the dataset's image tokenizer and grid."""
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("tokenizer_id") != vocab.image_tokenizer_id or list(meta.get("grid", [])) != list(vocab.grid):
            raise DataError(f"token dataset part {url} was made by tokenizer {str(meta.get('tokenizer_id'))[:16]} (grid "
                            f"{meta.get('grid')}), its dataset by {vocab.image_tokenizer_id[:16]} (grid "
                            f"{list(vocab.grid)}): the dataset mixes tokenizers; re-tokenize it into a new --out")
        have = set(pf.schema_arrow.names)
        columns = [c for c in ("key", "tokens", "label", "caption") if c in have]
        for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
            m = len(rb)
            keys = rb.column("key").to_pylist()
            tokens = flat_tokens(rb.column("tokens")).reshape(m, -1)
            labels = rb.column("label").to_pylist() if "label" in have else [None] * m
            captions = rb.column("caption").to_pylist() if "caption" in have else [None] * m
            yield keys, tokens, labels, captions


def export_part(source_url: str, source_name: str, source_sha256: str, out_url: str, index: int,
                spec: ExportSpec, text_spec: tuple[str, bytes]) -> dict:
    """Write export part `index` of the export at `out_url` from the token-dataset part at
    `source_url`; returns its record for the manifest. Streams: one record batch of the source at a
    time, into a streaming Parquet writer on a temporary file; then the file is put in place whole."""
    vocab = spec.vocab
    text = text_tokenizer_from(text_spec)
    if text.id != vocab.text_tokenizer_id:
        raise DataError(f"text tokenizer {text.id[:23]} is not the layout's ({vocab.text_tokenizer_id[:23]})")
    orders = orders_of(spec.order)
    counts = PartCounts()
    fs, root = fsspec.core.url_to_fs(out_url)
    local = is_local(fs)
    name = part_file(index)
    final = f"{root}/{name}"
    if local:
        staging = f"{root}/{STAGING_DIR}"
        os.makedirs(staging, exist_ok=True)
        tmp = f"{staging}/{os.path.basename(name)}.{uuid.uuid4().hex[:8]}"
    else:
        fd, tmp = tempfile.mkstemp(prefix="vqtok-export-", suffix=".parquet")
        os.close(fd)
    schema = spec.schema(source_name, source_sha256)
    packer = Packer(spec.pack, vocab.pad) if spec.pack else None
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            def write(table: pa.Table) -> None:
                counts.rows += table.num_rows
                writer.write_table(pa.Table.from_arrays(table.columns, schema=schema), row_group_size=1 << 30)

            for keys, tokens, labels, captions in read_source_batches(source_url, vocab, spec.row_group_rows):
                present = [i for i, c in enumerate(captions) if c is not None]
                encoded = text.encode_batch([captions[i] for i in present]) if present else []
                text_ids: list = [[]] * len(keys)
                for i, ids in zip(present, encoded):
                    text_ids[i] = ids
                seqs, out_keys, out_orders, n_text, cut_flags, out_labels = [], [], [], [], [], []
                for key, grid, label, ids in zip(keys, tokens, labels, text_ids):
                    kept, cut = vocab.truncate(ids)
                    counts.images += 1
                    counts.captions_cut += cut
                    counts.empty_captions += len(kept) == 0
                    for order in orders:
                        seq = vocab.sequence(kept, grid, order)
                        counts.samples += 1
                        counts.sample_ids += len(seq)
                        counts.text_ids += len(kept)
                        if packer is not None:
                            packer.add(key, order, seq)
                        else:
                            seqs.append(seq)
                            out_keys.append(key)
                            out_orders.append(order)
                            n_text.append(len(kept))
                            cut_flags.append(cut)
                            out_labels.append(label)
                if packer is not None:
                    table = packer.take()
                    if table is not None:
                        write(table)
                elif seqs:
                    write(pa.table({"key": pa.array(out_keys, pa.string()), "order": pa.array(out_orders, pa.string()),
                                    "input_ids": _list_array(seqs), "text_tokens": pa.array(n_text, pa.int32()),
                                    "caption_cut": pa.array(cut_flags, pa.bool_()),
                                    "label": pa.array(out_labels, pa.int32())}))
            if packer is not None:
                packer.finish()
                table = packer.take()
                if table is not None:
                    write(table)
        counts.ids = counts.rows * spec.pack if spec.pack else counts.sample_ids
        counts.pad_ids = counts.ids - counts.sample_ids
        digest, size = _hash_file(tmp)
        if local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
        else:
            fs.put_file(tmp, final)  # one PUT (or one multipart upload): the object appears whole
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"part": name, "source_part": source_name, "source_sha256": source_sha256, "bytes": size, "sha256": digest,
            **counts.to_dict()}


def _hash_file(path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# ---------------------------------------------------------------------------------------------
# The export manifest and small files
# ---------------------------------------------------------------------------------------------
def read_manifest(fs, root: str) -> dict | None:
    path = f"{root}/{MANIFEST}"
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); it is written whole, so something else wrote it") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if int(manifest.get("version", 0)) > VERSION:
        raise DataError(f"{path}: export version {manifest['version']} is newer than this vqtok writes ({VERSION}); "
                        f"upgrade vqtok, or export into a new --out")
    return manifest


def dumps(obj) -> bytes:
    """Deterministic JSON (sorted keys): the same export always has the same bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def put_whole(fs, root: str, name: str, data: bytes) -> None:
    """Make root/name hold data, all at once: a temporary file renamed into place locally, one PUT elsewhere."""
    final = f"{root}/{name}"
    if is_local(fs):
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        tmp = f"{os.path.dirname(final) or '.'}/.{os.path.basename(final)}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:
        fs.pipe_file(final, data)


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def read_bytes(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


__all__ = ["FORMAT", "VERSION", "MANIFEST", "LAYOUT_FILE", "TOKENIZER_FILE", "DATA_DIR", "ORDERS", "ExportSpec",
           "Packer", "export_part", "part_file", "source_index", "orders_of", "longest_sample", "shortest_sample"]
