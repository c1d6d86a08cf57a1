"""Text tokenizers: captions to integer ids, for sequences that hold text and image tokens.

    text = TextTokenizer.load("bytes")                    # built in: UTF-8 bytes, ids 0..255
    text = TextTokenizer.load("llm/tokenizer.json")       # any Hugging Face tokenizer.json (path or fsspec URL)
    ids = text.encode("a red bird")                       # list[int], never the tokenizer's own BOS/EOS
    text.decode(ids) == "a red bird"
    text.id, text.vocab_size                              # recorded wherever text ids are written

Two kinds, one interface:

- `bytes`: a caption is its UTF-8 bytes, id = byte value (vocab_size 256, id "bytes-utf8-v1"). Needs
  no file and decodes every caption exactly. `hf()` builds the same mapping as a Hugging Face
  tokenizer (a byte-level BPE with no merges whose token for byte b has id b), so the export's
  tokenizer.json can be built on it like on any other.
- `hf`: a Hugging Face `tokenizer.json`, the file every current LLM ships. Its id is "sha256:" + the
  sha256 of the file's bytes, so two exports share text ids exactly when they used the same file.
  vocab_size is the largest id + 1 over the model's vocabulary and its added tokens (an LLM's
  `<|endoftext|>` and friends sit above the model's vocabulary).

Encoding rules (the same for the export and the prior):

- The tokenizer's own special tokens are never added (`add_special_tokens=False`): the sequence
  layout (models/vocabulary.py) places its own `<bos>`, `<boi>`, ... .
- A caption is data, not control: special-token text inside a caption (a literal "<|endoftext|>")
  is encoded as ordinary text (`encode_special_tokens=True` on the Hugging Face tokenizer), so a
  caption cannot inject a control token. Decoding with special tokens skipped therefore gives the
  caption back.
- Normalisation is the tokenizer's own: a tokenizer that lowercases (CLIP's) decodes to the
  lowercased caption. That is the tokenizer's promise, not vqtok's.

`train_bpe` fits a byte-level BPE on an iterator of captions (`vqtok train-text-tokenizer` streams a
token dataset's captions into it): GPT-2's byte-to-character alphabet, so every string is
representable and decodes back exactly, whatever its spaces, tabs, newlines or emoji.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePosixPath

from .config import ConfigError

BYTES = "bytes"
BYTES_ID = "bytes-utf8-v1"
KINDS = ("bytes", "hf")
_BATCH = 1024  # captions handed to the Rust side at a time


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - a dependency of vqtok
        raise ImportError("text tokenizers need the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


def byte_level_tokenizer():
    """A Hugging Face tokenizer equal to `bytes`: encode(t).ids == list(t.encode("utf-8")), and
    decode gives t back. A BPE whose vocabulary maps the ByteLevel alphabet's character for byte b
    to id b, with no merges; ByteLevel pre-tokenizer (no prefix space, no regex split) and decoder."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE(vocab={ch: b for b, ch in enumerate(_byte_alphabet())}, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def _byte_alphabet() -> list[str]:
    """The character GPT-2's byte-level BPE uses for each byte 0..255, in byte order: printable
    Latin-1 bytes stand for themselves, the others are shifted to 256 + n in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


class TextTokenizer:
    """Captions <-> text ids. Build with `TextTokenizer.load(spec)` or `TextTokenizer.from_json(data)`."""

    def __init__(self, kind: str, tokenizer, *, id: str, name: str):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        self.kind = kind
        self.id = id
        self.name = name
        self._tok = tokenizer  # tokenizers.Tokenizer, None for bytes until hf() builds it
        self.raw: bytes | None = None  # a tokenizer.json's bytes (from_json)
        if tokenizer is not None:
            tokenizer.encode_special_tokens = True  # special-token text in a caption stays text
            vocab = tokenizer.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        else:
            self.vocab_size = 256

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, storage_options: dict | None = None) -> TextTokenizer:
        """`spec`: "bytes", or a Hugging Face tokenizer.json (a local path or any fsspec URL; a
        directory holding tokenizer.json also works)."""
        spec = str(spec)
        if spec == BYTES:
            return cls(BYTES, None, id=BYTES_ID, name="bytes (UTF-8, 256 ids)")
        import fsspec

        fix = 'give a Hugging Face tokenizer.json (a path or URL) or "bytes"'
        if not spec:
            raise ConfigError(f"text tokenizer: none given; {fix}")
        try:
            fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
            if fs.isdir(path):
                path = path.rstrip("/") + "/tokenizer.json"
                if not fs.exists(path):
                    raise ConfigError(f"text tokenizer {spec}: a directory without tokenizer.json; {fix}")
            with fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"text tokenizer {spec}: no such file; {fix}") from None
        return cls.from_json(data, name="/".join(PurePosixPath(path).parts[-2:]), where=spec)

    @classmethod
    def from_json(cls, data: bytes | str, *, name: str = "tokenizer.json", where: str = "<bytes>") -> TextTokenizer:
        """A tokenizer.json's contents; the id is the sha256 of exactly these bytes."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            tok = _tokenizers().Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # UnicodeDecodeError, or the Rust side's parse error (an Exception)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"text tokenizer {where}: not a Hugging Face tokenizer.json ({first[:200]}); "
                              f"give the tokenizer.json an LLM ships (not vocab.json or tokenizer_config.json), "
                              f'or "bytes"') from None
        model = type(tok.model).__name__
        text = cls("hf", tok, id="sha256:" + hashlib.sha256(raw).hexdigest(), name=name)
        text.name = f"{name} ({model}, {text.vocab_size} ids)"
        text.raw = raw  # the file's bytes: what the id hashes, kept so it can be written out unchanged
        return text

    @classmethod
    def from_hf(cls, tokenizer, *, name: str = "tokenizer.json") -> TextTokenizer:
        """Wrap a tokenizers.Tokenizer: the same as saving it (to_str()) and loading that file."""
        return cls.from_json(tokenizer.to_str(), name=name)

    # --- ids ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A caption's ids, without the tokenizer's own special tokens."""
        if self.kind == BYTES:
            return list(_utf8(text))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each caption; the Hugging Face side runs on several threads."""
        if self.kind == BYTES:
            return [list(_utf8(t)) for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of `ids`, exactly (nothing skipped). For bytes, invalid UTF-8 (a cut or generated
        sequence) becomes U+FFFD, never an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text id {bad[0]} is outside {self.name}'s ids [0, {self.vocab_size})")
        if self.kind == BYTES:
            return bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=False)

    def hf(self):
        """The tokenizers.Tokenizer (for bytes, the equivalent byte-level one, built on first use)."""
        if self._tok is None:
            self._tok = byte_level_tokenizer()
            self._tok.encode_special_tokens = True
        return self._tok

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name}, id {self.id[:23]})"


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"caption {text[:40]!r}... is not valid Unicode text ({e.reason} at {e.start}); "
                         f"captions must encode as UTF-8") from None


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """Fit a byte-level BPE tokenizer (a tokenizers.Tokenizer) of at most `vocab_size` ids on `texts`.

    Streamed: the iterable is consumed lazily, in batches, by the trainer, which keeps one count per
    distinct word (GPT-2's split: words with their leading space, runs of digits, punctuation,
    whitespace), so memory grows with the distinct words, not with the captions. No special tokens
    are added. `length` (the number of captions, if known) only helps progress reporting."""
    tk = _tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
        raise ConfigError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {len(alphabet)} ids "
                          f"(one per byte); typical sizes are 8,000 to 64,000")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=[],
                                     show_progress=False)
    tok.train_from_iterator(_batches(texts), trainer, length=None if length is None else -(-length // _BATCH))
    return tok


def _batches(texts: Iterable[str], size: int = _BATCH) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch
