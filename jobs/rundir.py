"""A job's run directory: its output location (a local directory or an object-store URL: s3://,
gs://, ... any fsspec URL) and the training checkpoints kept in it.

    run_dir = prepare_output(cfg.out)     # a local Path (created, checked writable), or None for a URL
    where = location(cfg.out, run_dir)    # how results name it: the directory as given, or the URL
    upload_outputs(Path(staging), cfg.out)  # a URL --out: files written locally, then copied there
    save_json(metrics, run_dir / "metrics.json"); metrics = read_json(where, "metrics.json")
    save_checkpoint(run_dir, step, state, keep=3); load_checkpoint(latest_checkpoint(run_dir))

Checkpoints (RUN_DIR/checkpoints/step-NNNNNNNN.pt) are dicts of tensors and plain Python values,
written with torch.save to a temporary file and renamed into place, so a crash never leaves a half
checkpoint under the real name; they are loaded with weights_only=True, so loading never executes
code from the file.

Used by the training jobs (jobs/trainer.py) and `vqtok import-tokenizer`. Writing to a URL needs the
object store's fsspec package (s3fs for s3://); `file://` URLs count as local.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..models.config import ConfigError


def is_url(out: str) -> bool:
    """Is `out` an object-store URL (not a local path or file://)?"""
    return "://" in out and not out.startswith("file://")


def prepare_output(out: str) -> Path | None:
    """The local run directory, created; None for an object-store URL (checked writable). Fails now,
    naming --out, when it cannot be written."""
    if is_url(out):
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(out)
            probe = f"{root.rstrip('/')}/.write-test"
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"--out {out}: cannot write there ({type(e).__name__}: {first}); check the bucket, "
                              f"credentials and endpoint, or give a local directory") from None
        return None
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror}); choose a writable directory") from None
    return p


def location(out: str, run_dir: Path | None) -> str:
    """Where a job's outputs are, as its result names them: the local run directory as given, or the
    --out URL without a trailing slash."""
    return str(run_dir) if run_dir is not None else out.rstrip("/")


def upload_outputs(local: Path, out: str) -> None:
    """Copy the files under `local` (not its checkpoints/) to the --out URL, keeping relative paths."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    for path in sorted(local.rglob("*")):
        if path.is_file() and "checkpoints" not in path.parts:
            fs.put_file(str(path), f"{root}/{path.relative_to(local)}")
    print(f"vqtok: uploaded the outputs to {out}", flush=True)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (a temporary file renamed into place), in a local run directory."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, p)


def read_json(where: str, name: str) -> dict:
    """The JSON file `name` under a local directory or a URL."""
    import fsspec

    with fsspec.open(f"{where}/{name}", "r") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 3) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:08d}.pt"
    tmp = d / f".step-{step:08d}.pt.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
