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


@pytest.mark.parametrize("source", ["llamagen", "taming"])
def test_imported_tokenizer_on_cuda_gives_the_reference_codes(tmp_path, source):
    """The import fixtures' reference codes (computed on CPU in fp32 by LlamaGen's / taming's own
    code) from the imported bundle on CUDA: strict with TF32 off, near-ties only with it on."""
    import numpy as np

    from test_import import CHECKPOINT, FIXTURES, NEAR_TIE
    from vqtok import import_tokenizer

    import_tokenizer(source, CHECKPOINT[source], tmp_path / "tok", image_size=64)
    expected = np.load(FIXTURES / source / "expected.npz")
    images = np.load(FIXTURES / source / "images.npy")
    tok = Tokenizer.load(tmp_path / "tok", device="cuda")
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        strict = tok.encode(images).cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
    same = strict == expected["codes"]
    assert same.mean() >= 0.999 and (expected["margin"][~same] < NEAR_TIE).all()
    default = tok.encode(images).cpu().numpy()
    print(f"{source} on CUDA: {same.mean():.2%} equal in fp32, {(default == expected['codes']).mean():.2%} "
          f"with torch's default TF32 convolutions")
    assert (default == expected["codes"]).mean() >= 0.98
