"""Importing pretrained tokenizers (`vqtok import-tokenizer`) against the reference code's own outputs.

The fixtures under tests/fixtures/import/ were made by make_fixtures.py there, with LlamaGen's
vq_model.py and taming-transformers 0.0.1 themselves: a reduced-width model with random weights,
saved as each project saves it, six real photographs, the reference's codes, the float64 gap to the
second-nearest code at every position, and the reference's decode of those codes and of random ones.
"""
import argparse
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from vqtok import ConfigError, Tokenizer, import_tokenizer

FIXTURES = REPO / "tests" / "fixtures" / "import"
CHECKPOINT = {"llamagen": FIXTURES / "llamagen" / "checkpoint.pt", "taming": FIXTURES / "taming" / "checkpoint.ckpt"}
NEAR_TIE = 1e-4  # a squared-distance gap this small is within float32 rounding of the two computations


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2), after clamping both to that range."""
    mse = np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.mark.parametrize("source", ["llamagen", "taming"])
def test_imported_tokenizer_reproduces_the_reference_codes_and_decodes(tmp_path, source):
    out = tmp_path / "tok"
    r = run_cli("import-tokenizer", "--from", source, "--checkpoint", str(CHECKPOINT[source]), "--out", str(out),
                "--image-size", "64")
    assert r.returncode == 0, r.stderr
    assert f"a {source} VQGAN" in r.stdout and str(out) in r.stdout
    expected = np.load(FIXTURES / source / "expected.npz")
    images = np.load(FIXTURES / source / "images.npy")
    tok = Tokenizer.load(out)

    codes = tok.encode(images).numpy()
    same = codes == expected["codes"]
    print(f"{source}: {same.mean():.4%} of {same.size} codes equal; smallest margin {expected['margin'].min():.2e}")
    assert same.mean() >= 0.999
    assert (expected["margin"][~same] < NEAR_TIE).all()  # any difference only at a measured near-tie
    assert len(np.unique(codes)) >= 20  # the fixture exercises many codes

    with torch.no_grad():
        for name, key in (("decoded", "codes"), ("decoded_other", "other_codes")):
            ours = tok.model.decode(torch.from_numpy(expected[key])).numpy()
            db = psnr(ours, expected[name])
            print(f"{source}: decode of {key}: PSNR {db:.1f} dB vs the reference, max |diff| "
                  f"{np.abs(ours - expected[name]).max():.2e}")
            assert db >= 45

    config = json.loads((out / "config.json").read_text())
    reference = json.loads((FIXTURES / source / "fixture.json").read_text())
    assert config["origin"]["source"] == source and len(config["origin"]["sha256"]) == 64
    assert config["model"]["arch"] == "vqgan" and config["model"]["l2_normalize"] == (source == "llamagen")
    assert tok.config.codebook_size == reference["config"].get("ModelArgs", {}).get("codebook_size",
                                                                                  reference["config"].get("n_embed"))


def test_python_api_imports_the_same_bundle(tmp_path):
    a = import_tokenizer("llamagen", CHECKPOINT["llamagen"], tmp_path / "a", image_size=64)
    b = import_tokenizer("llamagen", CHECKPOINT["llamagen"], tmp_path / "b", image_size=64)
    assert a.tokenizer_id == b.tokenizer_id == Tokenizer.load(tmp_path / "a").id
    assert a.ignored == ["quantize.codebook_used"] and a.config["channel_mult"] == [2, 1, 1, 1, 1]
    # the same weights at 256px: the same shape, a 16x16 grid
    c = import_tokenizer("llamagen", CHECKPOINT["llamagen"], tmp_path / "c")
    assert Tokenizer.load(tmp_path / "c").grid == (16, 16)


# ---------------------------------------------------------------------------------------------
# Refusals: before any work, nothing written, each problem named
# ---------------------------------------------------------------------------------------------
def _resave(tmp_path: Path, edit) -> Path:
    ckpt = torch.load(CHECKPOINT["llamagen"], weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


def _refused(tmp_path, path, *args, source="llamagen") -> str:
    out = tmp_path / "never"
    r = run_cli("import-tokenizer", "--from", source, "--checkpoint", str(path), "--out", str(out), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
    return r.stderr


def test_a_llamagen_training_checkpoint_imports(tmp_path):
    """What LlamaGen's vq_train.py saves: model, optimizer, discriminator, steps, its argparse args."""
    def as_training(ckpt):
        ckpt.update(optimizer={"state": {}, "param_groups": []}, discriminator={"w": torch.zeros(2)}, steps=5000,
                    args=argparse.Namespace(lr=1e-4, vq_model="VQ-16"))

    r = import_tokenizer("llamagen", _resave(tmp_path, as_training), tmp_path / "tok", image_size=64)
    plain = import_tokenizer("llamagen", CHECKPOINT["llamagen"], tmp_path / "plain", image_size=64)
    assert Tokenizer.load(tmp_path / "tok").config == Tokenizer.load(tmp_path / "plain").config
    assert (tmp_path / "tok" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert r.ignored == plain.ignored


def test_missing_and_unexpected_weights_are_refused_by_name(tmp_path):
    def drop(ckpt):
        del ckpt["model"]["decoder.conv_blocks.0.attn.1.k.weight"]
        del ckpt["model"]["encoder.mid.2.conv2.bias"]

    err = _refused(tmp_path, _resave(tmp_path, drop))
    assert "missing 2: decoder.conv_blocks.0.attn.1.k.weight, encoder.mid.2.conv2.bias" in err

    def add(ckpt):
        ckpt["model"]["encoder.extra.weight"] = torch.zeros(3)
        ckpt["model"]["decoder.conv_blocks.0.attn.9.q.weight"] = torch.zeros(3)

    err = _refused(tmp_path, _resave(tmp_path, add))
    assert "unexpected 2: decoder.conv_blocks.0.attn.9.q.weight, encoder.extra.weight" in err


def test_files_that_are_not_importable_checkpoints_are_refused_clearly(tmp_path):
    data = CHECKPOINT["llamagen"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _refused(tmp_path, truncated)

    photo = REPO / "examples" / "photos" / "aqua.jpg"
    assert "not a PyTorch checkpoint" in _refused(tmp_path, photo)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "the file is empty" in _refused(tmp_path, empty)

    # a checkpoint holding Python objects: loading would run pickle's code, so it is refused with
    # how to re-save the weights
    code = _resave(tmp_path, lambda c: c.update(where=Path("/data/run")))
    err = _refused(tmp_path, code)
    assert "would execute code" in err and "pathlib.PosixPath" in err and "torch.save" in err

    # and a pickle that would really run something is never run
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    assert "checkpoint" in _refused(tmp_path, evil) and not marker.exists()

    # a taming checkpoint given as llamagen names where the weights should be
    err = _refused(tmp_path, CHECKPOINT["taming"])
    assert 'holds its weights under "model"' in err and "--from llamagen" in err

    assert "no such file" in _refused(tmp_path, tmp_path / "nope.pt")
    assert "image_size=72 is not divisible by downsample=16" in _refused(tmp_path, CHECKPOINT["llamagen"],
                                                                        "--image-size", "72")
    r = run_cli("import-tokenizer", "--from", "maskgit", "--checkpoint", "x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--from maskgit" in r.stderr and "one of llamagen, taming" in r.stderr


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_changed_layout_cannot_import_silently(tmp_path):
    """Attention somewhere vqtok's vqgan has none is refused (not dropped)."""
    def move(ckpt):
        sd = ckpt["model"]
        for k in [k for k in sd if k.startswith("encoder.conv_blocks.4.attn.")]:
            sd[k.replace("conv_blocks.4", "conv_blocks.2")] = sd[k]

    err = _refused(tmp_path, _resave(tmp_path, move))
    assert "self-attention at encoder levels [2, 4]" in err
