"""GPU paths (bf16 autocast training, tokenizer on CUDA). Skipped without CUDA."""
import pytest
import torch

from conftest import SAMPLE_DIR
from vqtok import Tokenizer, TrainConfig, train_vqvae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_train_on_gpu_with_bf16_autocast_and_encode_matches_cpu(tmp_path, fmnist):
    res = train_vqvae(TrainConfig(data=[str(SAMPLE_DIR)], out=str(tmp_path / "run"), steps=50, batch_size=64,
                                  device="cuda", model={"width": 32, "code_dim": 16, "codebook_size": 64}))
    tok_gpu = Tokenizer.load(res.tokenizer_dir, device="cuda")
    tok_cpu = Tokenizer.load(res.tokenizer_dir)
    a = tok_gpu.encode(fmnist[0][:256]).cpu()
    b = tok_cpu.encode(fmnist[0][:256])
    assert (a == b).float().mean() > 0.99  # TF32/conv algorithm differences may flip near-ties
