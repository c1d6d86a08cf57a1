"""Bundles: how a trained model is stored, for the tokenizer and the prior alike.

A bundle is a directory (or object-store prefix) of two files:

    config.json         {"format": "vqtok-tokenizer" | "vqtok-prior", "format_version": N, ...}
    model.safetensors   every weight the model needs

Its id is the sha256 of config.json's bytes followed by model.safetensors' bytes: token datasets
and priors record the id of the tokenizer they belong to. Loading reads JSON and safetensors only,
so it never executes code from the bundle. Writing is atomic: the files go to a staging directory
that replaces the old bundle by rename (the old one is moved aside first and removed last, so a
crash leaves either the old bundle or the new one under the name, never neither).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def vqtok_version() -> str:
    """The installed vqtok's version, recorded in bundles and token datasets."""
    try:
        from importlib.metadata import version

        return version("vqtok")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def bundle_hash(config_bytes: bytes, weights_bytes: bytes) -> str:
    return hashlib.sha256(config_bytes + weights_bytes).hexdigest()


def write_bundle(path: str | os.PathLike, config: dict, weights: dict[str, torch.Tensor]) -> str:
    """Write config.json and model.safetensors to the directory `path`, atomically; returns the id."""
    from safetensors.torch import save_file

    path = Path(path)
    staging = path.with_name(path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-write
    staging.mkdir(parents=True)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    (staging / CONFIG_FILE).write_bytes(config_bytes)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": config["format"]})
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)
    return bundle_hash(config_bytes, (path / WEIGHTS_FILE).read_bytes())


def read_bundle(path: str | os.PathLike, *, what: str = "tokenizer bundle",
                hint: str = "train one with `vqtok train-vqvae`, which writes RUN_DIR/tokenizer/") -> tuple[bytes, bytes]:
    """The bytes of a bundle's config.json and model.safetensors, from a directory or fsspec URL."""
    import fsspec

    base = str(path).rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(base)
        return fs.cat_file(f"{root}/{CONFIG_FILE}"), fs.cat_file(f"{root}/{WEIGHTS_FILE}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"{path} is not a {what}: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it ({hint})") from None


def parse_config(config_bytes: bytes, *, fmt: str, version: int, where: str) -> dict:
    """config.json's contents, after checking it is a bundle of this kind that this vqtok reads."""
    config = json.loads(config_bytes)
    if config.get("format") != fmt:
        raise ValueError(f"{where}/{CONFIG_FILE}: format is {config.get('format')!r}, expected {fmt!r}")
    if config.get("format_version", 0) > version:
        raise ValueError(f"{where}/{CONFIG_FILE}: bundle format_version {config['format_version']} is newer than this "
                         f"vqtok understands ({version}); upgrade vqtok")
    return config


def load_weights(weights_bytes: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(weights_bytes)


def bundle_id(path: str | os.PathLike) -> str:
    """The id of the bundle at `path` (a directory or URL)."""
    return bundle_hash(*read_bundle(path))
