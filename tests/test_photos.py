"""Real-resolution tokenization: 256px colour photographs through a VQ-16-shaped tokenizer on Ray,
and codebooks larger than 65,536 codes stored as int32 end to end (tokenize, TokenDataset, prior)."""
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, PER_SHARD
from vqtok import Prior, TokenDataset, Tokenizer, VQVAEConfig, tokenize, train_prior
from vqtok.models import VQVAE

PHOTOS = REPO / "examples" / "photos"


def spread_codebook(model: VQVAE) -> None:
    """Random unit codes, so tokens vary across an image (random weights, untrained)."""
    with torch.no_grad():
        q = model.quantizer
        q.codebook.copy_(F.normalize(torch.randn_like(q.codebook), dim=-1))


def near_tie(tok: Tokenizer, pixels: np.ndarray, pos: tuple[int, int], a: int, b: int, gap: float = 5e-3) -> bool:
    """Are codes a and b within `gap` squared distance of the encoder's vector at grid position pos?"""
    model = tok.model
    with torch.no_grad():
        z = model.encoder(tok.preprocess.to_model(torch.from_numpy(pixels[None])))[0, :, pos[0], pos[1]]
        z = F.normalize(model.quantizer.proj_in(z), dim=-1)
        d = ((model.quantizer.codebook[[int(a), int(b)]] - z) ** 2).sum(1)
    return float((d[0] - d[1]).abs()) < gap


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """The eight sample photographs (512px JPEGs) plus a multi-megapixel JPEG made from one of them,
    which the bundle's policy decodes reduced (PIL draft) before the resize."""
    folder = tmp_path_factory.mktemp("photos")
    for p in sorted(PHOTOS.glob("*.jpg")):
        (folder / p.name).write_bytes(p.read_bytes())
    big = Image.open(PHOTOS / "dune.jpg").resize((2560, 1600), Image.Resampling.BICUBIC)
    big.save(folder / "dune-2560.jpg", quality=92)
    return folder


def test_256px_photographs_tokenize_to_16x16_grids_equal_to_encode(tmp_path, photo_folder, ray_local):
    torch.manual_seed(0)
    cfg = VQVAEConfig.from_preset("llamagen-vq16", width=32, code_dim=32, codebook_size=1024, res_blocks=1)
    model = VQVAE(cfg)
    spread_codebook(model)
    bundle = tmp_path / "tok"
    Tokenizer(model).save(bundle)
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(photo_folder), out, batch_size=4, verbose=False)
    assert (r.rows, r.failures) == (9, 0)

    ds = TokenDataset(out)
    assert ds.grid == (16, 16) and ds.codebook_size == 1024
    t = ds.to_table()
    tokens, _ = ds.to_numpy()
    tok = Tokenizer.load(bundle)
    # what the pipeline must have computed: each file through the bundle's decode, then encode
    # (one image at a time here, four a batch there: GroupNorm's CPU reduction order follows the
    # batch, so encoder outputs differ by ~1e-4 relative and a code may flip at a near-tie)
    differ = 0
    for key, grid in zip(t.column("key").to_pylist(), tokens):
        path = photo_folder / f"{key}.jpg"  # a folder key is the relative path without its extension
        pixels = tok.preprocess.decode(path.read_bytes())
        assert pixels.shape == (256, 256, 3)
        expected = tok.encode(pixels[None]).numpy()[0]
        for i, j in zip(*np.nonzero(grid != expected)):
            differ += 1
            assert near_tie(tok, pixels, (i, j), grid[i, j], expected[i, j]), (key, i, j)
    assert differ <= 0.005 * tokens.size, differ
    assert len(np.unique(tokens)) > 50
    meta = ds.metadata
    assert meta["preprocess"]["policy"].startswith("jpeg-draft") and meta["grid"] == [16, 16]


def test_more_than_65536_codes_are_int32_from_tokenize_to_the_prior(tmp_path, shards, ray_local):
    torch.manual_seed(0)
    k = 70_000
    model = VQVAE(VQVAEConfig(width=32, code_dim=16, codebook_size=k, res_blocks=1))
    spread_codebook(model)
    bundle = tmp_path / "tok"
    Tokenizer(model).save(bundle)
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(shards / "*.tar"), out, batch_size=64, verbose=False)
    assert r.rows == 4 * PER_SHARD

    ds = TokenDataset(out)
    tokens, _ = ds.to_numpy()
    assert tokens.dtype == np.int32 and ds.codebook_size == k
    assert tokens.max() >= 65536  # codes above uint16's range survive the round trip
    schema = pq.read_schema(ds.files()[0])
    assert str(schema.field("tokens").type) == "list<element: int32>"
    tok = Tokenizer.load(bundle)
    assert tok.decode(torch.from_numpy(tokens[:8].astype(np.int64))).shape == (8, 28, 28)

    res = train_prior(tokens=[str(out)], out=str(tmp_path / "prior"), steps=3, batch_size=16, n_layer=1, n_head=2,
                      n_embd=32, log_every=1, eval_every=1000, warmup_steps=1)
    prior = Prior.load(tmp_path / "prior")
    assert prior.cfg.codebook_size == k
    s = prior.sample(4, seed=0, temperature=1.0)
    assert s.tokens.shape == (4, 7, 7) and int(s.tokens.max()) < k and s.tokens.dtype == torch.int64
    assert res.metrics["tokenizer_id"] == tok.id
