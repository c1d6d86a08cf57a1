"""Checkpoints record the data order they were written in (stream_version): one written before the
image and token streams became one (tests/fixtures/checkpoints, by main at 28dafdb) is refused by
name, saying why and what to do, not resumed in another data order."""
import shutil

import pytest
import torch

from conftest import REPO, SAMPLE_DIR
from test_train_prior import write_token_dataset
from vqtok import ConfigError, TrainConfig, train_prior, train_vqvae
from vqtok.jobs.rundir import list_checkpoints, load_checkpoint
from vqtok.pipeline.sharded_stream import STREAM_VERSION

FIXTURES = REPO / "tests" / "fixtures" / "checkpoints"
TINY_VQVAE = {"width": 8, "code_dim": 4, "codebook_size": 8, "res_blocks": 1}  # the fixture's model
MAIN_KEYS = {"step", "consumed", "consumed_by_rank", "model", "optimizer", "model_config", "rng", "cuda_rng", "config"}


def _run_dir_with(tmp_path, fixture: str):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / fixture, out / "checkpoints" / "step-00000002.pt")
    return out


def test_the_fixtures_are_checkpoints_of_the_old_format():
    for name in ("vqvae-main-28dafdb.pt", "prior-main-28dafdb.pt"):
        assert set(load_checkpoint(FIXTURES / name)) == MAIN_KEYS, name


def test_an_old_tokenizer_checkpoint_is_refused_naming_stream_version(tmp_path):
    out = _run_dir_with(tmp_path, "vqvae-main-28dafdb.pt")
    with pytest.raises(ConfigError) as e:
        train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(out), steps=4, batch_size=8, checkpoint_every=2,
                                model=TINY_VQVAE))
    msg = str(e.value)
    assert f"stream_version 1; this vqtok's is {STREAM_VERSION}" in msg and "another order" in msg
    assert "use a new --out directory" in msg and str(out / "checkpoints") in msg
    assert not (out / "metrics.json").exists()


def test_an_old_prior_checkpoint_is_refused_naming_stream_version(tmp_path, bundle):
    tokens = write_token_dataset(tmp_path / "tokens", bundle, 2)
    out = _run_dir_with(tmp_path, "prior-main-28dafdb.pt")
    with pytest.raises(ConfigError, match=f"stream_version 1; this vqtok's is {STREAM_VERSION}"):
        train_prior(tokens=[str(tokens)], out=str(out), steps=4, batch_size=8, sample_grid=False,
                    model={"n_layer": 1, "n_head": 1, "n_embd": 8})


def test_new_checkpoints_record_the_stream_version_and_resume(tmp_path):
    out = tmp_path / "run"
    cfg = dict(data=[str(SAMPLE_DIR)], out=str(out), batch_size=8, checkpoint_every=2, model=TINY_VQVAE)
    train_vqvae(TrainConfig(steps=2, **cfg))
    (ckpt,) = list_checkpoints(out)
    state = load_checkpoint(ckpt)
    assert state["stream_version"] == STREAM_VERSION and set(state) == MAIN_KEYS | {"stream_version"}
    assert train_vqvae(TrainConfig(steps=4, **cfg)).resumed_from == 2
    # the same checkpoint without the key (as every checkpoint before it) is refused
    del state["stream_version"]
    torch.save(state, list_checkpoints(out)[-1])
    with pytest.raises(ConfigError, match="stream_version 1"):
        train_vqvae(TrainConfig(steps=6, **cfg))
