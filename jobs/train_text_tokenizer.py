"""Fit a text tokenizer on a token dataset's captions: `vqtok train-text-tokenizer --tokens DATASET
--vocab-size N --out FILE.json`.

    result = vqtok.train_text_tokenizer("runs/demo/tokens", 16000, "text-tokenizer.json")
    text = vqtok.models.text_tokenizer.TextTokenizer.load(result.out)    # then export-lm --text-tokenizer FILE

A byte-level BPE (models/text_tokenizer.py `train_bpe`, Hugging Face `tokenizers`): every caption is
representable and decodes back to the same string. Two streamed passes over the captions, one part
at a time (memory is the trainer's count per distinct word, not the rows):

1. training: the captions go to the trainer in batches as they are read;
2. checking: every caption is encoded and decoded again with the trained tokenizer, and the
   distinct words (the trainer's pre-tokenizer split) are counted. A caption that does not come back
   exactly is counted and the first few are shown (there should be none: `not_round_trip` is 0).

Null captions (rows whose source had none) are skipped and counted. The tokenizer.json is written
with fsspec (a local path or URL); a local file is written to a temporary name and renamed into
place, so a crash never leaves half a file under the real name. Its id (recorded wherever its text
ids are written) is "sha256:" + the sha256 of the file's bytes, printed at the end.

The core, `fit_text_tokenizer(captions, vocab_size)`, takes a function returning an iterable of
captions (None for a null caption), so any source of text can be used from Python.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..models.config import Config, ConfigError, option
from ..models.text_tokenizer import TextTokenizer, train_bpe
from ..pipeline.errors import DataError
from .options import Command, job_main
from .progress import fmt_duration
from .rundir import is_url

CHECK_BATCH = 1024
SHOW_BAD = 3  # captions that fail the round trip, shown in full
PROGRESS_EVERY = 10.0  # seconds between progress lines


@dataclass(kw_only=True)
class TextTokenizerConfig(Config):
    WHAT = "train-text-tokenizer config"
    tokens: str = option("", "the token dataset whose captions to train on (the --out of vqtok tokenize)")
    vocab_size: int = option(16_000, "ids in the trained tokenizer (at most; at least 256, one per byte)")
    out: str = option("", "the tokenizer.json to write (a path or URL)")
    max_captions: int | None = option(None, "train on the first N captions only")

    def __post_init__(self):
        if not self.tokens:
            raise ConfigError("--tokens is required: a token dataset with captions (the --out of vqtok tokenize)")
        if not self.out:
            raise ConfigError("--out is required: the tokenizer.json file to write (e.g. runs/text-tokenizer.json)")
        if self.vocab_size < 256:
            raise ConfigError(f"--vocab-size {self.vocab_size}: a byte-level BPE needs at least 256 ids (one per "
                              f"byte); typical sizes are 8,000 to 64,000")
        if self.max_captions is not None and self.max_captions < 1:
            raise ConfigError(f"--max-captions {self.max_captions}: must be at least 1 (or leave it out for all)")


@dataclass
class TextTokenizerResult:
    out: str
    id: str  # "sha256:" + the sha256 of the written file
    vocab_size: int  # ids in the trained tokenizer (can be fewer than asked on a small corpus)
    captions: int  # captions trained on
    null_captions: int  # rows without a caption, skipped
    distinct_words: int  # distinct pre-tokenized words over the captions
    not_round_trip: int  # captions whose decode(encode(c)) != c (0 expected)
    bad_examples: list[str] = field(default_factory=list)
    train_seconds: float = 0.0
    check_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class _Counter:
    """Counts a caption stream as it passes and prints progress every PROGRESS_EVERY seconds."""

    what: str
    captions: int = 0
    nulls: int = 0
    t0: float = field(default_factory=time.time)
    _last: float = field(default_factory=time.time)

    def count(self, captions: Iterable[str | None], limit: int | None = None) -> Iterator[str]:
        for c in captions:
            if limit is not None and self.captions >= limit:
                return
            if c is None:
                self.nulls += 1
                continue
            self.captions += 1
            if time.time() - self._last > PROGRESS_EVERY:
                self._last = time.time()
                rate = self.captions / max(self._last - self.t0, 1e-9)
                print(f"vqtok train-text-tokenizer: {self.what}: {self.captions:,} captions ({rate:,.0f}/s)", flush=True)
            yield c


def dataset_captions(tokens: str) -> Callable[[], Iterator[str | None]]:
    """A function streaming the `caption` column of a token dataset (None for a null caption), one
    part at a time; refuses a dataset without captions, naming it."""
    from ..pipeline.token_dataset import TokenDataset

    try:
        ds = TokenDataset(tokens)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--tokens {e}") from None
    if "caption" not in ds.schema.names:
        raise DataError(f"--tokens {tokens}: the dataset has no caption column (written before vqtok kept "
                        f"captions); re-run vqtok tokenize on captioned images into a new --out")

    def stream() -> Iterator[str | None]:
        for batch in ds.iter_batches(columns=["caption"]):
            yield from batch.column(0).to_pylist()

    return stream


def fit_text_tokenizer(captions: Callable[[], Iterable[str | None]], vocab_size: int, *,
                       max_captions: int | None = None, length: int | None = None):
    """Train a byte-level BPE on the captions `captions()` yields, then check in a second pass that
    each decodes back to itself. Returns (tokenizers.Tokenizer, TextTokenizerResult without out/id)."""
    t0 = time.time()
    seen = _Counter("training")
    tok = train_bpe(seen.count(captions(), max_captions), vocab_size, length=length)
    train_seconds = time.time() - t0
    if seen.captions == 0:
        raise DataError(f"no captions to train on ({seen.nulls:,} rows without one): give a token dataset of "
                        f"captioned images (one written before vqtok kept captions has none: re-run vqtok tokenize "
                        f"on the captioned source into a new --out)")
    print(f"vqtok train-text-tokenizer: trained on {seen.captions:,} captions in {fmt_duration(train_seconds)} "
          f"({seen.nulls:,} rows without a caption skipped); checking that each decodes back", flush=True)

    t1 = time.time()
    checked = _Counter("checking")
    words: set[str] = set()
    pre = tok.pre_tokenizer
    bad, examples = 0, []
    batch: list[str] = []

    def check(batch: list[str]) -> None:
        nonlocal bad
        ids = [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
        for caption, back in zip(batch, tok.decode_batch(ids, skip_special_tokens=False)):
            words.update(w for w, _ in pre.pre_tokenize_str(caption))
            if back != caption:
                bad += 1
                if len(examples) < SHOW_BAD:
                    examples.append(caption)

    for caption in checked.count(captions(), max_captions):
        batch.append(caption)
        if len(batch) == CHECK_BATCH:
            check(batch)
            batch = []
    if batch:
        check(batch)
    if checked.captions != seen.captions:
        raise DataError(f"the captions changed while training: {seen.captions:,} read to train, "
                        f"{checked.captions:,} to check; train again on a dataset that is not being written")
    result = TextTokenizerResult(out="", id="", vocab_size=tok.get_vocab_size(with_added_tokens=True),
                                 captions=seen.captions, null_captions=seen.nulls, distinct_words=len(words),
                                 not_round_trip=bad, bad_examples=examples, train_seconds=train_seconds,
                                 check_seconds=time.time() - t1)
    return tok, result


def save_tokenizer_json(data: bytes, out: str) -> None:
    """Write a tokenizer.json: a local path atomically (temporary file, then rename), a URL in one write."""
    import fsspec

    if is_url(out):
        try:
            with fsspec.open(out, "wb") as f:
                f.write(data)
        except Exception as e:
            raise ConfigError(f"--out {out}: cannot write there ({type(e).__name__}: {e}); check the URL and "
                              f"credentials, or give a local path") from None
        return
    path = Path(out.removeprefix("file://"))
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory: give the file to write (e.g. {path / 'tokenizer.json'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror}); choose a writable path") from None


def run(cfg: TextTokenizerConfig) -> TextTokenizerResult:
    t0 = time.time()
    captions = dataset_captions(cfg.tokens)
    print(f"vqtok train-text-tokenizer: a byte-level BPE of up to {cfg.vocab_size:,} ids on the captions of "
          f"{cfg.tokens}", flush=True)
    tok, result = fit_text_tokenizer(captions, cfg.vocab_size, max_captions=cfg.max_captions)
    data = tok.to_str(pretty=True).encode("utf-8")
    save_tokenizer_json(data, cfg.out)
    result.out, result.id = cfg.out, "sha256:" + hashlib.sha256(data).hexdigest()
    assert TextTokenizer.from_json(data).id == result.id
    result.seconds = time.time() - t0
    check = ("every caption decodes back to itself" if result.not_round_trip == 0 else
             f"{result.not_round_trip:,} captions do NOT decode back to themselves, e.g. "
             + "; ".join(repr(c[:80]) for c in result.bad_examples))
    print(f"vqtok train-text-tokenizer: done in {fmt_duration(result.seconds)}: {result.vocab_size:,} ids "
          f"from {result.captions:,} captions ({result.distinct_words:,} distinct words, {result.null_captions:,} "
          f"rows without a caption); training {fmt_duration(result.train_seconds)}, checking "
          f"{fmt_duration(result.check_seconds)}; {check}", flush=True)
    print(f"vqtok train-text-tokenizer: wrote {cfg.out} (id {result.id[:23]}...)", flush=True)
    return result


def train_text_tokenizer(tokens: str | TextTokenizerConfig, vocab_size: int = 16_000, out: str = "",
                         **options) -> TextTokenizerResult:
    """Fit a byte-level BPE on a token dataset's captions and write its tokenizer.json."""
    cfg = tokens if isinstance(tokens, TextTokenizerConfig) else TextTokenizerConfig(
        tokens=str(tokens), vocab_size=vocab_size, out=str(out), **options)
    return run(cfg)


COMMAND = Command("train-text-tokenizer", "fit a byte-level BPE text tokenizer on a token dataset's captions",
                  TextTokenizerConfig, run)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
