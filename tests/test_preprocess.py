"""The preprocessing policy's reduced JPEG decode (issue 15, item 4): new bundles decode large JPEGs
at 1/2-1/8 scale (PIL's draft) close to the whole decode; bundles that recorded the old policy, or
none, keep the whole decode bit for bit; other formats, unknown policies and the decompression-bomb
limit. Speed is measured by benchmarks/decode_speed.py, not here."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vqtok import Tokenizer, VQVAEConfig
from vqtok.models import VQVAE
from vqtok.models.tokenizer import LEGACY_POLICY, POLICY, DecodeError, Preprocess

W, H = 3000, 2000  # a 6 Mpx camera-sized original


def photo_like(mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A synthetic photograph: smooth colour fields, hard-edged discs, sensor noise, and a lower half
    of fine ripples (period 5 px, like sand or fabric). The ripples are what a too-eager reduction
    gets wrong: decoded at 1/4 scale (keeping only >= 1 x 256 px) this image's 256 px output is
    ~41 dB from the whole decode; at the policy's 1/2 (>= 2 x 256 px) it is ~57 dB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([120 + 60 * np.sin(x / 370 + c) * np.cos(y / 290 - c) + 40 * (x / W) for c in (0.0, 1.3, 2.6)], -1)
    img[H // 2:] += (45 * np.sin(2 * np.pi * (x[H // 2:] + 0.3 * y[H // 2:]) / 5))[..., None]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(30):
        x0, y0, r = int(rng.integers(0, W)), int(rng.integers(0, H // 2)), int(rng.integers(20, 200))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    pil.convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return photo_like()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def whole_decode(data: bytes, pre: Preprocess) -> np.ndarray:
    """The old policy done by hand: every pixel decoded, then resize and crop."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return pre.decode(img)


@pytest.mark.parametrize("channels", [3, 1])
def test_new_policy_decodes_a_large_jpeg_reduced_and_close_to_the_whole_decode(jpeg, channels):
    pre = Preprocess(image_size=256, channels=channels)
    assert pre.policy == POLICY
    # the decoder really works at reduced size: 1/2 keeps the shorter side >= 2 x 256
    assert pre.open(jpeg).size == (W // 2, H // 2)
    assert Preprocess(image_size=64, channels=channels).open(jpeg).size == (W // 8, H // 8)
    new, full = pre.decode(jpeg), whole_decode(jpeg, pre)
    assert new.shape == full.shape == (256, 256, channels) and new.dtype == np.uint8
    assert not np.array_equal(new, full)  # a different decode ...
    assert psnr(new, full) > 48  # ... within a bound that a 1/4-scale decode (~41 dB here) misses


def test_new_policy_on_a_grayscale_jpeg():
    data = photo_like(mode="L")
    pre = Preprocess(image_size=256, channels=1)
    assert pre.open(data).size == (W // 2, H // 2)
    assert psnr(pre.decode(data), whole_decode(data, pre)) > 48


@pytest.mark.parametrize("recorded", ["old", "none", "no-preprocess-key"])
def test_bundles_that_recorded_the_old_policy_or_none_give_the_whole_decode_bit_for_bit(jpeg, tmp_path, recorded):
    model = VQVAE(VQVAEConfig(image_size=32, channels=3, width=16, code_dim=8, codebook_size=32, res_blocks=1))
    model.quantizer.codebook.normal_()
    Tokenizer(model).save(tmp_path / "tok")
    cfg_path = tmp_path / "tok" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["preprocess"]["policy"] == POLICY  # what a new bundle records
    if recorded == "old":
        cfg["preprocess"]["policy"] = LEGACY_POLICY
    elif recorded == "none":
        del cfg["preprocess"]["policy"]
    else:
        del cfg["preprocess"]
    cfg_path.write_text(json.dumps(cfg))
    old = Tokenizer.load(tmp_path / "tok")
    assert old.preprocess.policy == LEGACY_POLICY
    assert old.preprocess.open(jpeg).size == (W, H)  # no reduced decode
    pixels = old.preprocess.decode(jpeg)
    assert np.array_equal(pixels, whole_decode(jpeg, old.preprocess))
    assert torch.equal(old.encode(pixels[None]), old.encode(whole_decode(jpeg, old.preprocess)[None]))
    # the new policy would have decoded this image differently (so the test above can fail)
    assert not np.array_equal(Preprocess(image_size=32, channels=3).decode(jpeg), pixels)
    # re-saving keeps the recorded policy; token datasets record the same preprocess dict
    old.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["preprocess"] == old.preprocess.to_dict()
    assert old.preprocess.to_dict() == {"image_size": 32, "channels": 3, "policy": LEGACY_POLICY}


def test_a_new_tokenizer_records_the_new_policy_and_keeps_it_on_load(tmp_path):
    tok = Tokenizer(VQVAE(VQVAEConfig(width=16, code_dim=8, codebook_size=32, res_blocks=1)))
    assert tok.preprocess.policy == POLICY
    tok.save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").preprocess.policy == POLICY


def test_a_png_is_decoded_whole_under_either_policy():
    data = photo_like(fmt="PNG")
    new, old = Preprocess(image_size=256, channels=3), Preprocess(image_size=256, channels=3, policy=LEGACY_POLICY)
    assert new.open(data).size == (W, H)
    assert np.array_equal(new.decode(data), old.decode(data))


def test_a_small_jpeg_is_decoded_whole():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (384, 512, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    pre = Preprocess(image_size=256, channels=3)  # 384 < 2 x 256: no reduction
    assert pre.open(buf.getvalue()).size == (512, 384)
    assert np.array_equal(pre.decode(buf.getvalue()), whole_decode(buf.getvalue(), pre))


def test_an_unknown_policy_is_refused_by_name(tmp_path):
    future = "jpeg-draft(>=3x)+lanczos; uint8/127.5-1"
    with pytest.raises(ValueError, match=r"unknown preprocessing policy 'jpeg-draft\(>=3x\)\+lanczos.*newer vqtok"):
        Preprocess(image_size=28, channels=1, policy=future)
    Tokenizer(VQVAE(VQVAEConfig(width=16, code_dim=8, codebook_size=32, res_blocks=1))).save(tmp_path / "tok")
    cfg_path = tmp_path / "tok" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocess"]["policy"] = future
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unknown preprocessing policy 'jpeg-draft\(>=3x\).*newer vqtok"):
        Tokenizer.load(tmp_path / "tok")


def test_the_reduced_decode_still_judges_max_pixels_on_the_original_size(jpeg):
    pre = Preprocess(image_size=64, channels=3)  # would decode at 1/8: 375 x 250
    with pytest.raises(DecodeError, match=f"decompression bomb refused: {W}x{H} = {W * H} pixels > max {W * H - 1}"):
        pre.decode(jpeg, max_pixels=W * H - 1)
    assert pre.open(jpeg, max_pixels=W * H).size == (W // 8, H // 8)
    assert pre.decode(jpeg, max_pixels=W * H).shape == (64, 64, 3)
