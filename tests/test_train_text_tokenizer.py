"""`vqtok train-text-tokenizer` (jobs/train_text_tokenizer.py): a byte-level BPE on a token
dataset's captions, streamed; every caption decodes back; the file is written whole."""
from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import run_cli
from vqtok.jobs.train_text_tokenizer import fit_text_tokenizer, save_tokenizer_json, train_text_tokenizer
from vqtok.models.config import ConfigError
from vqtok.models.text_tokenizer import TextTokenizer
from vqtok.pipeline.errors import DataError

ODD = ["  leading", "trailing  ", "double  space", "tab\there", "new\nline\r\n", "héllo wörld", "🎉 emoji 🐈‍⬛",
       "日本語のキャプション", "ctrl\x00\x07", " ", "<|endoftext|> literal"]
CAPTIONS = [f"a {c} bird on a {t}" for c in ("red", "blue", "green", "small") for t in ("branch", "wire", "roof")] * 40


def test_fit_trains_checks_and_counts():
    captions = CAPTIONS + ODD + [None, None, None]
    passes = []

    def stream():
        passes.append(1)
        return iter(captions)

    tok, r = fit_text_tokenizer(stream, 300)
    assert len(passes) == 2  # one pass to train, one to check
    assert (r.captions, r.null_captions, r.not_round_trip) == (len(CAPTIONS) + len(ODD), 3, 0)
    assert r.vocab_size == tok.get_vocab_size() and 256 < r.vocab_size <= 300
    words = {w for c in CAPTIONS + ODD for w, _ in tok.pre_tokenizer.pre_tokenize_str(c)}
    assert r.distinct_words == len(words)
    for c in ODD:
        assert tok.decode(tok.encode(c, add_special_tokens=False).ids) == c
    _, r = fit_text_tokenizer(stream, 300, max_captions=10)
    assert r.captions == 10


def test_a_caption_that_does_not_come_back_is_counted_and_shown():
    # a tokenizer that lowercases cannot give "A Red Bird" back: the check must say so
    from tokenizers import normalizers

    from vqtok.jobs import train_text_tokenizer as job

    real = job.train_bpe

    def lowercasing(texts, vocab_size, length=None):
        tok = real(texts, vocab_size, length)
        tok.normalizer = normalizers.Lowercase()
        return tok

    job.train_bpe = lowercasing
    try:
        _, r = fit_text_tokenizer(lambda: iter(["A Red Bird", "a red bird", "Two"]), 300)
    finally:
        job.train_bpe = real
    assert r.not_round_trip == 2 and r.bad_examples == ["A Red Bird", "Two"]


def test_no_captions_at_all_fails_saying_so():
    with pytest.raises(DataError, match=r"no captions to train on \(4 rows without one\)"):
        fit_text_tokenizer(lambda: iter([None] * 4), 300)


def test_the_file_is_written_whole_locally_and_to_a_url(tmp_path):
    import fsspec

    out = tmp_path / "deep" / "dir" / "text.json"
    save_tokenizer_json(b'{"x": 1}', str(out))
    assert out.read_bytes() == b'{"x": 1}'
    assert [p.name for p in out.parent.iterdir()] == ["text.json"]  # no temporary file left
    save_tokenizer_json(b"{}", "memory://bucket/text.json")
    with fsspec.open("memory://bucket/text.json", "rb") as f:
        assert f.read() == b"{}"
    with pytest.raises(ConfigError, match=r"--out .* is a directory: give the file to write"):
        save_tokenizer_json(b"{}", str(tmp_path))


def test_bad_options_fail_naming_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"--vocab-size 100: a byte-level BPE needs at least 256"):
        train_text_tokenizer(str(tmp_path), 100, str(tmp_path / "t.json"))
    with pytest.raises(ConfigError, match=r"--out is required"):
        train_text_tokenizer(str(tmp_path), 1000, "")
    with pytest.raises(FileNotFoundError, match=r"is not a token dataset"):
        train_text_tokenizer(str(tmp_path / "none"), 1000, str(tmp_path / "t.json"))


# ----------------------------------------------------------------------------------------------
# End to end: a token dataset with a caption column
# ----------------------------------------------------------------------------------------------
def _captioned_dataset(path, captions_per_part: list[list[str | None]]):
    from vqtok.pipeline import token_format as fmt
    from vqtok.pipeline import token_writer as tw
    from vqtok.pipeline.sources import Unit

    if "captions" not in inspect.signature(fmt.part_table).parameters:
        pytest.skip("token datasets have no caption column yet")
    meta = fmt.dataset_metadata(codebook_size=16, tokenizer_id="tok", grid=(2, 2), preprocess={"p": 1},
                                vqtok_version="test")
    units = [Unit(url=f"/in/unit-{i:03d}.tar", kind="tar", signature="s") for i in range(len(captions_per_part))]
    with tw.TokenWriter.open(str(path), meta, units) as w:
        for unit, index in w.pending(units):
            caps = captions_per_part[units.index(unit)]
            keys = [f"{unit.url}/{r}" for r in range(len(caps))]
            table = fmt.part_table(meta, keys, np.zeros((len(caps), 2, 2), np.int64), [0] * len(caps), unit.url,
                                   captions=caps)
            w.commit(unit, index, table, [])
    return path


def test_the_command_trains_on_a_token_datasets_captions(tmp_path):
    parts = [CAPTIONS[:200] + [None, "  odd  spacing "], CAPTIONS[200:] + ODD + [None]]
    tokens = _captioned_dataset(tmp_path / "tokens", parts)
    out = tmp_path / "text" / "tokenizer.json"
    r = run_cli("train-text-tokenizer", "--tokens", str(tokens), "--vocab-size", "320", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    n = sum(c is not None for p in parts for c in p)
    assert f"from {n:,} captions" in r.stdout and "2 rows without a caption" in r.stdout
    assert "every caption decodes back to itself" in r.stdout
    assert "sha256:" + hashlib.sha256(data).hexdigest()[:16] in r.stdout
    text = TextTokenizer.load(str(out))
    assert text.id == "sha256:" + hashlib.sha256(data).hexdigest() and 256 < text.vocab_size <= 320
    for c in [c for p in parts for c in p if c is not None]:
        assert text.decode(text.encode(c)) == c
    assert json.loads(data)["model"]["type"] == "BPE" and Tokenizer.from_file(str(out)).get_vocab_size() == text.vocab_size
    # from Python, on the same data: the same tokenizer (training is deterministic)
    again = train_text_tokenizer(str(tokens), 320, str(tmp_path / "again.json"))
    assert again.id == text.id and again.not_round_trip == 0 and again.null_captions == 2


def test_a_dataset_without_captions_is_refused_plainly(tmp_path):
    tokens = _captioned_dataset(tmp_path / "tokens", [[None, None], [None]])
    r = run_cli("train-text-tokenizer", "--tokens", str(tokens), "--vocab-size", "300", "--out", str(tmp_path / "t.json"))
    assert r.returncode == 2 and "no captions to train on (3 rows without one)" in r.stderr
    assert not (tmp_path / "t.json").exists()
