"""Text tokenizers (models/text_tokenizer.py): bytes and Hugging Face tokenizer.json, exact round
trips of odd captions, no special tokens added, a trained byte-level BPE."""
from __future__ import annotations

import hashlib
import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vqtok.models.config import ConfigError
from vqtok.models.text_tokenizer import BYTES_ID, TextTokenizer, train_bpe

ODD = [
    "a photo of a cat",
    "  leading spaces", "trailing spaces  ", "double  space", "tab\tseparated", "new\nline", "crlf\r\nend",
    "", " ", "\n",
    "héllo wörld, Ünïcödé", "日本語のキャプション", "emoji 🎉🐈‍⬛ and flags 🇫🇷", "zero\u200bwidth", "ctrl \x00\x07 bytes",
    "<|endoftext|> is text here", "<boi> <img_3> look like layout tokens",
    "Ελληνικά και русский", "x" * 500,
]
CORPUS = [f"{c} {i % 7}" for i, c in enumerate(ODD * 20)] + [
    "a red bird on a branch", "a blue bird in the sky", "the cat sat on the mat", "two dogs play in the park",
] * 50


def test_bytes_ids_are_the_utf8_bytes_and_decode_back_exactly():
    text = TextTokenizer.load("bytes")
    assert (text.kind, text.id, text.vocab_size) == ("bytes", BYTES_ID, 256)
    for c in ODD:
        assert text.encode(c) == list(c.encode("utf-8"))
        assert text.decode(text.encode(c)) == c
    assert text.encode_batch(ODD) == [list(c.encode("utf-8")) for c in ODD]
    assert text.decode([0xE6, 0x97]) == b"\xe6\x97".decode("utf-8", errors="replace")  # a cut character: U+FFFD
    with pytest.raises(ValueError, match=r"text id 256 is outside .*\[0, 256\)"):
        text.decode([65, 256])


def test_bytes_as_a_hugging_face_tokenizer_gives_the_same_ids():
    hf = TextTokenizer.load("bytes").hf()
    assert hf.get_vocab_size(with_added_tokens=True) == 256
    for c in ODD:
        assert hf.encode(c, add_special_tokens=False).ids == list(c.encode("utf-8")), c
        assert hf.decode(list(c.encode("utf-8"))) == c, c
    # the same after a save and load (the export's tokenizer.json is built on it)
    again = Tokenizer.from_str(hf.to_str())
    assert all(again.encode(c).ids == list(c.encode("utf-8")) and again.decode(again.encode(c).ids) == c for c in ODD)


def test_a_trained_bpe_decodes_every_caption_back_exactly():
    tok = train_bpe(iter(CORPUS), vocab_size=400)
    assert 256 < tok.get_vocab_size() <= 400  # merges were learned
    text = TextTokenizer.from_hf(tok)
    for c in set(CORPUS) | set(ODD):
        ids = text.encode(c)
        assert text.decode(ids) == c, c
        assert tok.decode(ids) == c, c
    assert len(text.encode("the cat sat on the mat")) < len(b"the cat sat on the mat")
    assert text.encode_batch(ODD) == [text.encode(c) for c in ODD]


def test_training_consumes_the_captions_once_as_a_stream():
    pulled = []

    def captions():
        for i, c in enumerate(CORPUS):
            pulled.append(i)
            yield c

    stream = captions()
    train_bpe(stream, vocab_size=300)
    assert len(pulled) == len(CORPUS)  # every caption, read once
    assert next(stream, None) is None
    with pytest.raises(ConfigError, match=r"--vocab-size 100: .*at least 256"):
        train_bpe(iter(CORPUS), vocab_size=100)


def _llm_like(lowercase: bool = False) -> Tokenizer:
    """A tokenizer.json with an LLM's structure: byte-level BPE, its own <|endoftext|> added as a
    special token above the model's vocabulary, and a post-processor that adds it (as GPT-2/CLIP do)."""
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens(["<|endoftext|>"])
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", eot)])
    return tok


def test_a_tokenizer_json_loads_from_a_path_or_url_with_its_sha256_as_id(tmp_path):
    import fsspec

    data = _llm_like().to_str(pretty=True).encode()
    path = tmp_path / "llm" / "tokenizer.json"
    path.parent.mkdir()
    path.write_bytes(data)
    with fsspec.open("memory://models/tokenizer.json", "wb") as f:
        f.write(data)
    for spec in (str(path), str(path.parent), "memory://models/tokenizer.json"):
        text = TextTokenizer.load(spec)
        assert text.kind == "hf" and text.id == "sha256:" + hashlib.sha256(data).hexdigest(), spec
        assert text.vocab_size == text.hf().token_to_id("<|endoftext|>") + 1  # the added token counts
        assert "tokenizer.json" in text.name


def test_encoding_never_adds_the_tokenizers_own_special_tokens():
    tok = _llm_like()
    text = TextTokenizer.from_hf(tok)
    eot = tok.token_to_id("<|endoftext|>")
    assert eot in tok.encode("a red bird").ids  # the tokenizer would add them by default ...
    assert eot not in text.encode("a red bird")  # ... vqtok does not
    assert all(eot not in ids for ids in text.encode_batch(["a red bird", "the cat"]))
    # special-token text inside a caption stays text: no control token injected, decodes back exactly
    c = "<|endoftext|> is text here"
    assert eot not in text.encode(c) and text.decode(text.encode(c)) == c


def test_a_lowercasing_tokenizer_decodes_to_the_lowercased_caption():
    text = TextTokenizer.from_hf(_llm_like(lowercase=True))
    for c in ["A Red Bird", "The CAT sat  on the Mat", "ÜBER Café"]:
        assert text.decode(text.encode(c)) == c.lower()


def test_bad_specs_fail_naming_the_value_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text tokenizer .*nope.json: no such file; .*\"bytes\""):
        TextTokenizer.load(str(tmp_path / "nope.json"))
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ConfigError, match=r"vocab.json: not a Hugging Face tokenizer.json"):
        TextTokenizer.load(str(tmp_path / "vocab.json"))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin.json: not a Hugging Face tokenizer.json"):
        TextTokenizer.load(str(tmp_path / "bin.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: a directory without tokenizer.json"):
        TextTokenizer.load(str(tmp_path / "empty"))
