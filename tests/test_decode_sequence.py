"""`vqtok.decode_sequence` / `vqtok decode-sequence` (jobs/decode_sequence.py): a sequence in an
export's vocabulary back to its caption and the picture Tokenizer.decode gives for its tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_bundle, run_cli
from vqtok import Tokenizer
from vqtok.jobs.decode_sequence import decode_sequence, load_layout
from vqtok.models.text_tokenizer import TextTokenizer, train_bpe
from vqtok.models.vocabulary import Vocabulary
from vqtok.pipeline.errors import DataError

CAPTIONS = ["a T-shirt, white", "  ankle boot\twith laces\n", "sandale été 🩴", ""]


@pytest.fixture(scope="module")
def image_tok(bundle) -> Tokenizer:
    return Tokenizer.load(bundle)


@pytest.fixture(scope="module")
def grids(image_tok) -> np.ndarray:
    """Codes that differ at every position, so a transposed or shifted image span shows."""
    return np.random.default_rng(0).integers(0, image_tok.config.codebook_size, (len(CAPTIONS), *image_tok.grid))


def write_export(path, text: TextTokenizer, image_tok: Tokenizer):
    """What `vqtok export-lm` writes beside its data: layout.json and the extended tokenizer.json."""
    vocab = Vocabulary(text.vocab_size, text.id, image_tok.config.codebook_size, image_tok.grid, image_tok.id)
    path.mkdir(parents=True, exist_ok=True)
    (path / "layout.json").write_text(json.dumps(vocab.to_dict()))
    vocab.extend(text).save(str(path / "tokenizer.json"))
    return vocab


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
@pytest.mark.parametrize("order", ["text-first", "image-first"])
def test_a_sequence_decodes_to_its_caption_and_the_tokenizers_picture(tmp_path, bundle, image_tok, grids, kind, order):
    text = TextTokenizer.load("bytes") if kind == "bytes" else TextTokenizer.from_hf(
        train_bpe(iter(CAPTIONS * 30 + ["a red bird", "boots and shirts"] * 30), 300))
    vocab = write_export(tmp_path / "export", text, image_tok)
    layout = load_layout(str(tmp_path / "export"))
    for i, caption in enumerate(CAPTIONS):
        ids = vocab.sequence(text.encode(caption), grids[i], order)
        for source in (str(tmp_path / "export"), str(tmp_path / "export" / "tokenizer.json"), layout):
            d = decode_sequence(ids.tolist(), source, bundle)
            assert d.caption == caption and d.order == order
            assert np.array_equal(d.tokens, grids[i])
            assert np.array_equal(d.image, image_tok.decode(grids[i][None])[0].numpy())
            assert d.image.dtype == np.uint8 and d.notes == ()
    d = decode_sequence(np.asarray(ids), layout, image_tok)  # numpy ids, a loaded tokenizer
    assert np.array_equal(d.tokens, grids[-1])


def test_a_malformed_or_foreign_sequence_fails_saying_what_is_wrong(tmp_path, bundle, image_tok, grids):
    text = TextTokenizer.load("bytes")
    vocab = write_export(tmp_path / "export", text, image_tok)
    ids = vocab.sequence(text.encode("a shirt"), grids[0]).tolist()
    cut = ids[: 1 + 7 + 1 + 40]  # a generated sequence stopped after 40 of 49 image tokens
    with pytest.raises(DataError, match=r"cannot decode the image: image span has 40 of 49 tokens \(7x7 grid\) "
                                        r"and no <eoi>"):
        decode_sequence(cut, str(tmp_path / "export"), bundle)
    with pytest.raises(DataError, match=r"cannot decode the image: no <boi>"):
        decode_sequence(ids[:8], str(tmp_path / "export"), bundle)
    with pytest.raises(DataError, match=rf"id {vocab.size} is outside the vocabulary of {vocab.size} ids"):
        decode_sequence(ids + [vocab.size], str(tmp_path / "export"), bundle)
    d = decode_sequence(ids[:-1], str(tmp_path / "export"), bundle)  # a whole image without <eoi>: decoded, noted
    assert np.array_equal(d.tokens, grids[0]) and "no <eoi> after the image" in d.notes
    # another image tokenizer than the export's
    other = make_bundle(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match=r"was made with image tokenizer .*give that bundle"):
        decode_sequence(ids, str(tmp_path / "export"), other)
    # layout.json and tokenizer.json of different exports
    bpe = TextTokenizer.from_hf(train_bpe(iter(CAPTIONS * 20), 290))
    write_export(tmp_path / "bpe", bpe, image_tok)
    (tmp_path / "export" / "tokenizer.json").write_bytes((tmp_path / "bpe" / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match=r"tokenizer.json \(text ids \d+, K=32\) and layout.json \(text ids 256, "
                                        r"K=32\) disagree"):
        decode_sequence(ids, str(tmp_path / "export"), bundle)
    with pytest.raises(FileNotFoundError, match=r"--layout .*nowhere: no such file or directory"):
        decode_sequence(ids, str(tmp_path / "nowhere"), bundle)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "layout.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in it"):
        decode_sequence(ids, str(tmp_path / "half"), bundle)


def test_the_command_prints_the_caption_and_writes_the_picture(tmp_path, bundle, image_tok, grids):
    text = TextTokenizer.load("bytes")
    vocab = write_export(tmp_path / "export", text, image_tok)
    ids = vocab.sequence(text.encode("ankle boot, black"), grids[1]).tolist()
    out = tmp_path / "pic.png"
    r = run_cli("decode-sequence", "--layout", str(tmp_path / "export"), "--tokenizer", str(bundle),
                "--ids", ",".join(map(str, ids)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "caption: ankle boot, black" in r.stdout and "text-first" in r.stdout
    assert np.array_equal(np.asarray(Image.open(out)), image_tok.decode(grids[1][None])[0].numpy())
    (tmp_path / "row.json").write_text(json.dumps({"input_ids": ids[:30]}))
    r = run_cli("decode-sequence", "--layout", str(tmp_path / "export" / "tokenizer.json"), "--tokenizer", str(bundle),
                "--ids-file", str(tmp_path / "row.json"), "--out", str(tmp_path / "cut.png"))
    assert r.returncode == 2 and "image span has 11 of 49 tokens" in r.stderr
    r = run_cli("decode-sequence", "--layout", str(tmp_path / "export"), "--tokenizer", str(bundle),
                "--ids", "1,x,3", "--out", str(out))
    assert r.returncode == 2 and "--ids: 'x' is not an integer id" in r.stderr
