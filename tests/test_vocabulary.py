"""The one vocabulary (models/vocabulary.py): exact ids, sequences and their parsing, truncation, the
layout written down, and the extended tokenizer.json that decodes rows and names image tokens."""
from __future__ import annotations

import time

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vqtok.models.text_tokenizer import TextTokenizer, train_bpe
from vqtok.models.vocabulary import ORDERS, Vocabulary

CAPTIONS = ["a photo of a cat", "  leading and trailing  ", "tab\tand\nnewline", "héllo wörld 🎉🐈‍⬛", "日本語",
            "<boi> <img_3> literal layout names", "", "x" * 40]
K, GRID = 32, (7, 7)


def vocab_for(text: TextTokenizer, k: int = K, grid=GRID, max_text_tokens: int = 128) -> Vocabulary:
    return Vocabulary(text.vocab_size, text.id, k, grid, "sha256:img", max_text_tokens)


def codes(seed: int = 0, k: int = K, grid=GRID) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=grid)


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    corpus = [f"{c} {w}" for c in CAPTIONS for w in ("red", "blue bird", "on the mat")] * 30
    return TextTokenizer.from_hf(train_bpe(iter(corpus), vocab_size=380))


def test_the_ids_are_exactly_the_documented_layout():
    v = Vocabulary(256, "bytes-utf8-v1", K, GRID, "img")
    assert (v.pad, v.bos, v.eot, v.boi, v.eoi, v.image_offset, v.size, v.image_span) == (
        256, 257, 258, 259, 260, 261, 256 + 5 + K, 49)
    assert v.special_tokens() == {"<pad>": 256, "<bos>": 257, "<eot>": 258, "<boi>": 259, "<eoi>": 260}
    grid = codes()
    text_first = v.sequence([104, 105], grid)
    assert text_first.dtype == np.int32
    assert text_first.tolist() == [257, 104, 105, 259, *(grid.reshape(-1) + 261).tolist(), 260]
    image_first = v.sequence([104, 105], grid, order="image-first")
    assert image_first.tolist() == [257, 259, *(grid.reshape(-1) + 261).tolist(), 260, 104, 105, 258]
    # the empty caption (classifier-free guidance) and a null one: zero text ids
    assert v.sequence([], grid).tolist()[:2] == [257, 259] and v.sequence(None, grid).tolist()[:2] == [257, 259]
    assert v.sequence(None, grid, "image-first").tolist()[-2:] == [260, 258]
    assert [v.token_name(i) for i in (5, 256, 260, 261, v.size - 1)] == ["text 5", "<pad>", "<eoi>", "<img_0>",
                                                                        f"<img_{K - 1}>"]
    assert ORDERS == ("text-first", "image-first", "both")


@pytest.mark.parametrize("order", ["text-first", "image-first"])
def test_parse_gives_back_what_sequence_was_given(order):
    text = TextTokenizer.load("bytes")
    v = vocab_for(text)
    for i, caption in enumerate(CAPTIONS):
        ids, grid = text.encode(caption), codes(i)
        p = v.parse(v.sequence(ids, grid, order))
        assert p.ok and p.notes == () and p.order == order
        assert p.text_ids == ids and np.array_equal(p.tokens, grid) and p.tokens.shape == GRID


def test_captions_longer_than_max_text_tokens_keep_their_first_ids():
    v = Vocabulary(256, "b", K, GRID, "img", max_text_tokens=5)
    assert v.truncate([1, 2, 3]) == ([1, 2, 3], False)
    assert v.truncate(list(range(9))) == ([0, 1, 2, 3, 4], True)
    assert v.truncate(None) == ([], False)
    ids, was_cut = v.truncate(np.arange(9))
    assert was_cut and ids.tolist() == [0, 1, 2, 3, 4]
    for order in ("text-first", "image-first"):
        p = v.parse(v.sequence(list(range(10, 19)), codes(), order))
        assert p.text_ids == [10, 11, 12, 13, 14], order
    assert len(v.sequence(list(range(9)), codes())) == 1 + 5 + 1 + 49 + 1
    assert Vocabulary(256, "b", K, GRID, "img", max_text_tokens=0).sequence([1, 2], codes()).tolist()[:2] == [257, 259]


def test_bad_inputs_to_sequence_fail_naming_the_value():
    v = Vocabulary(256, "bytes-utf8-v1", K, GRID, "img")
    with pytest.raises(ValueError, match=r"image tokens: 48 given, the grid 7x7 needs 49"):
        v.sequence([1], np.zeros(48, int))
    with pytest.raises(ValueError, match=r"image token 32 is outside the codebook \[0, 32\)"):
        v.sequence([1], np.full(49, 32))
    with pytest.raises(ValueError, match=r"image token -1 is outside"):
        v.sequence([1], np.full(49, -1))
    with pytest.raises(ValueError, match=r"text id 300 is outside the text vocabulary \[0, 256\)"):
        v.sequence([1, 300], codes())
    with pytest.raises(ValueError, match=r"order 'both': .*'text-first' or 'image-first'"):
        v.sequence([1], codes(), order="both")


def test_malformed_sequences_say_what_is_wrong():
    v = Vocabulary(256, "b", K, GRID, "img")
    seq = v.sequence([104, 105], codes()).tolist()
    cut = seq[: 1 + 2 + 1 + 40]  # a generated sequence stopped after 40 image tokens
    p = v.parse(cut)
    assert p.tokens is None and p.text_ids == [104, 105]
    assert p.errors == ("image span has 40 of 49 tokens (7x7 grid) and no <eoi>",)
    p = v.parse(seq[:-10] + [v.eoi])  # closed early
    assert p.tokens is None and p.errors[0] == "image span has 40 of 49 tokens (7x7 grid)"
    p = v.parse(seq[:-1])  # a whole image without its <eoi>: usable, noted
    assert p.ok and np.array_equal(p.tokens, codes()) and "no <eoi> after the image" in p.notes
    stray = seq[:10] + [104] + seq[10:]  # a text id inside the image
    p = v.parse(stray)
    assert p.tokens is None and any("non-image ids (first: text 104)" in e for e in p.errors)
    p = v.parse([v.bos, 104, 105])
    assert p.tokens is None and p.errors[0].startswith("no <boi>") and p.text_ids == [104, 105]
    p = v.parse(seq + [v.pad] * 3)
    assert p.ok and "3 trailing <pad> ignored" in p.notes
    p = v.parse(seq[1:])
    assert p.ok and "no <bos> at the start" in p.notes
    with pytest.raises(ValueError, match=r"id 293 is outside the vocabulary of 293 ids"):
        v.parse(seq + [293])
    with pytest.raises(ValueError, match=r"id -1 is outside"):
        v.parse([-1])
    img_first = v.sequence([104, 105], codes(), "image-first").tolist()
    p = v.parse(img_first[:-1])  # generation stopped before <eot>
    assert p.ok and p.text_ids == [104, 105] and any("no <eot>" in n for n in p.notes)


def test_the_layout_written_down_reads_back_and_refuses_edits():
    v = Vocabulary(50257, "sha256:abc", 16384, (16, 16), "sha256:img", 77)
    d = v.to_dict()
    assert d["format"] == "vqtok-lm-layout" and d["version"] == 1
    assert d["special_tokens"] == {"<pad>": 50257, "<bos>": 50258, "<eot>": 50259, "<boi>": 50260, "<eoi>": 50261}
    assert (d["image_offset"], d["size"], d["codebook_size"], d["grid"], d["image_span"]) == (
        50262, 50262 + 16384, 16384, [16, 16], 256)
    assert d["image_ids"] == [50262, 50262 + 16383] and d["text_ids"] == [0, 50256]
    assert (d["text_tokenizer_id"], d["image_tokenizer_id"], d["max_text_tokens"]) == ("sha256:abc", "sha256:img", 77)
    assert set(d["sequences"]) == {"text-first", "image-first", "unconditional"}
    assert Vocabulary.from_dict(d) == v
    import json

    assert Vocabulary.from_dict(json.loads(json.dumps(d))) == v
    with pytest.raises(ValueError, match=r"layout: image_offset 50263 does not match layout version 1 "
                                         r"\(expected 50262\)"):
        Vocabulary.from_dict(d | {"image_offset": 50263})
    with pytest.raises(ValueError, match=r"format 'other', expected 'vqtok-lm-layout'"):
        Vocabulary.from_dict(d | {"format": "other"})
    with pytest.raises(ValueError, match=r"layout version 2 is newer"):
        Vocabulary.from_dict(d | {"version": 2})


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_the_extended_tokenizer_decodes_rows_to_their_captions_and_names_image_tokens(kind, bpe, tmp_path):
    text = TextTokenizer.load("bytes") if kind == "bytes" else bpe
    v = vocab_for(text)
    ext = v.extend(text)
    ext.save(str(tmp_path / "tokenizer.json"))
    ext = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what a user of the export loads
    assert ext.get_vocab_size(with_added_tokens=True) == v.size
    for name, i in v.special_tokens().items():
        assert ext.token_to_id(name) == i and ext.id_to_token(i) == name
    for c in range(K):
        assert ext.token_to_id(f"<img_{c}>") == v.image_offset + c and ext.id_to_token(v.image_offset + c) == f"<img_{c}>"
    for i, caption in enumerate(CAPTIONS):
        for order in ("text-first", "image-first"):
            seq = v.sequence(text.encode(caption), codes(i), order).tolist()
            assert ext.decode(seq, skip_special_tokens=True) == caption, (caption, order)
            named = [ext.id_to_token(t) for t in seq if t >= v.image_offset]
            assert named == [f"<img_{c}>" for c in codes(i).reshape(-1)]
    # the text tokenizer itself is left as it was
    assert text.hf().token_to_id("<boi>") is None and text.vocab_size == v.text_vocab_size
    # the layout recovered from the tokenizer.json alone is the written one
    found = Vocabulary.from_tokenizer(ext, GRID, image_tokenizer_id="sha256:img", text_tokenizer_id=text.id)
    assert found == v and found.to_dict() == v.to_dict()


def _clip_like() -> TextTokenizer:
    """A tokenizer.json with CLIP's structure (no LLM file is available offline): a lowercasing,
    whitespace-collapsing normaliser, a byte-level BPE with added <|startoftext|>/<|endoftext|>
    special tokens, and a post-processor that wraps every encoding in them."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [c.lower() for c in CAPTIONS] * 20 + ["a red bird on a branch", "the cat sat on the mat"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)])
    return TextTokenizer.from_hf(tok)


def test_a_clip_like_tokenizer_decodes_to_the_caption_as_it_normalises_it():
    text = _clip_like()
    v = vocab_for(text)
    ext = Tokenizer.from_str(v.extend(text).to_str())
    assert v.text_vocab_size == text.hf().token_to_id("<|endoftext|>") + 1  # its own specials are text ids
    for caption in ["A Red Bird on a BRANCH", "The Cat  sat on the Mat", "Café ÜBER"]:
        ids = text.encode(caption)
        assert text.hf().token_to_id("<|startoftext|>") not in ids  # no specials of its own
        seq = v.sequence(ids, codes())
        assert ext.decode(seq.tolist(), skip_special_tokens=True) == caption.lower()
        assert v.parse(seq).text_ids == ids


def test_extend_refuses_clashing_names_holes_and_another_text_tokenizer(bpe):
    hf = Tokenizer.from_str(bpe.hf().to_str())
    hf.add_tokens(["<boi>"])  # a text vocabulary that already has one of the layout's names
    clash = TextTokenizer.from_hf(hf)
    with pytest.raises(ValueError, match=r"already has a token '<boi>' \(id \d+\)"):
        vocab_for(clash).extend(clash)
    holes = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "c": 5}, merges=[]))  # ids 2..4 unused
    holed = TextTokenizer.from_hf(holes)
    assert holed.vocab_size == 6
    with pytest.raises(ValueError, match=r"<pad> was given id 3, the layout needs 6; its ids are not contiguous"):
        vocab_for(holed).extend(holed)
    with pytest.raises(ValueError, match=r"is not the one this layout was made for"):
        vocab_for(TextTokenizer.load("bytes")).extend(bpe)
    with pytest.raises(ValueError, match=r"no <pad> token: not a vqtok export's tokenizer.json"):
        Vocabulary.from_tokenizer(bpe.hf(), GRID)


def test_extending_with_a_large_codebook(capsys):
    text = TextTokenizer.load("bytes")
    v = vocab_for(text, k=16384, grid=(16, 16))
    t0 = time.perf_counter()
    ext = v.extend(text)
    extend_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = Tokenizer.from_str(ext.to_str())
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert Vocabulary.from_tokenizer(again, (16, 16)).same_layout(v)
    recover_s = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nK=16384: extend {extend_s:.3f}s, load {load_s:.3f}s, from_tokenizer {recover_s:.3f}s")
    assert extend_s < 10 and load_s < 10
    assert again.id_to_token(v.size - 1) == "<img_16383>"
