"""The tokenizer bundle and its API: save/load round trip, id, encode/decode shapes and dtypes."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok import Tokenizer, VQVAEConfig
from vqtok.models import VQVAE


@pytest.fixture
def tokenizer(tmp_path):
    model = VQVAE(VQVAEConfig(width=16, code_dim=8, codebook_size=32, res_blocks=1))
    model.quantizer.codebook.normal_()
    tok = Tokenizer(model)
    tok.save(tmp_path / "tok")
    return tok


def test_bundle_round_trip_gives_identical_tokens(tokenizer, tmp_path, fmnist):
    images = fmnist[0][:64]
    before = tokenizer.encode(images)
    loaded = Tokenizer.load(tmp_path / "tok")
    assert torch.equal(loaded.encode(images), before)
    assert torch.equal(loaded.decode(before), tokenizer.decode(before))
    assert loaded.id == tokenizer.id


def test_bundle_files_and_id(tokenizer, tmp_path):
    d = tmp_path / "tok"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"]["codebook_size"] == 32 and cfg["grid"] == [7, 7]
    assert cfg["preprocess"]["image_size"] == 28 and "center-crop" in cfg["preprocess"]["policy"]
    h = hashlib.sha256((d / "config.json").read_bytes() + (d / "model.safetensors").read_bytes()).hexdigest()
    assert tokenizer.id == h
    # The bundle holds the codebook but no training statistics.
    from safetensors.torch import load_file

    keys = load_file(str(d / "model.safetensors")).keys()
    assert "quantizer.codebook" in keys and not any("ema_" in k or "usage_ring" in k for k in keys)
    # saving again is deterministic: same id
    assert Tokenizer(tokenizer.model).save(tmp_path / "tok2") == tokenizer.id


def test_encode_decode_shapes_and_dtypes(tokenizer, fmnist):
    imgs = fmnist[0][:5]
    t = tokenizer.encode(imgs)  # (B, H, W)
    assert t.shape == (5, 7, 7) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < 32
    assert torch.equal(tokenizer.encode(imgs[..., None]), t)  # (B, H, W, C)
    assert torch.equal(tokenizer.encode(torch.from_numpy(imgs.copy())), t)  # tensors
    assert torch.equal(tokenizer.encode([Image.fromarray(a) for a in imgs]), t)  # PIL
    out = tokenizer.decode(t)
    assert out.shape == (5, 28, 28) and out.dtype == torch.uint8


def test_encode_applies_the_bundle_preprocessing(tokenizer):
    big = np.random.default_rng(0).integers(0, 255, (2, 56, 70, 3), dtype=np.uint8)  # RGB, wrong size
    t = tokenizer.encode(big)
    assert t.shape == (2, 7, 7)
    pil = [Image.fromarray(a).convert("L").resize((35, 28), Image.Resampling.BICUBIC) for a in big]
    assert tokenizer.preprocess.batch(big).shape == (2, 28, 28, 1)
    assert tokenizer.preprocess.batch(pil).shape == (2, 28, 28, 1)


def test_rgb_tokenizer(tmp_path):
    model = VQVAE(VQVAEConfig(image_size=32, channels=3, downsample=8, width=16, code_dim=8, codebook_size=16,
                              res_blocks=1))
    tok = Tokenizer(model)
    imgs = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    t = tok.encode(imgs)
    assert t.shape == (3, 4, 4)
    out = tok.decode(t)
    assert out.shape == (3, 32, 32, 3) and out.dtype == torch.uint8


def test_decode_rejects_bad_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tokenizer.decode(torch.full((1, 7, 7), 99))
    with pytest.raises(ValueError, match=r"\(B, 7, 7\)"):
        tokenizer.decode(torch.zeros(1, 4, 4, dtype=torch.int64))


def test_load_names_a_missing_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer bundle"):
        Tokenizer.load(tmp_path / "nowhere")
