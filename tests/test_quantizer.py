"""The quantizer's math: which parameters each loss reaches, the EMA update, restarts, k-means."""
import numpy as np
import pytest
import torch

from vqtok.models import VQVAE, VQVAEConfig
from vqtok.models.vqvae import VectorQuantizer, kmeans, perplexity


def _z(b=4, c=8, h=3, w=3):
    return torch.randn(b, c, h, w)


def test_each_loss_reaches_only_its_parameters():
    """codebook loss -> codebook only; commitment loss -> encoder side only. Several well-known
    implementations had these two swapped."""
    vq = VectorQuantizer(codebook_size=16, dim=8, codebook_dim=4, ema=False, kmeans_init=False, restart_window=0)
    z = _z().requires_grad_(True)
    out = vq(z)
    enc_side = [z, vq.proj_in.weight, vq.proj_in.bias]

    g_cb = torch.autograd.grad(out.codebook_loss, [vq.codebook, *enc_side], retain_graph=True, allow_unused=True)
    assert g_cb[0] is not None and g_cb[0].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for g in g_cb[1:])

    g_cm = torch.autograd.grad(out.commitment_loss, [vq.codebook, *enc_side], retain_graph=True, allow_unused=True)
    assert g_cm[0] is None or g_cm[0].abs().sum() == 0
    assert all(g is not None and g.abs().sum() > 0 for g in g_cm[1:])

    # The total is codebook + beta * commitment, beta = 0.25.
    assert torch.allclose(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)


def test_straight_through_passes_the_gradient_unchanged():
    vq = VectorQuantizer(codebook_size=16, dim=8, ema=False, kmeans_init=False, restart_window=0)
    z = _z().requires_grad_(True)
    out = vq(z)
    (g,) = torch.autograd.grad(out.quantized.sum(), z)
    assert torch.equal(g, torch.ones_like(z))
    # and the forward value is the chosen code
    idx = out.indices.reshape(-1)
    assert torch.allclose(out.quantized.permute(0, 2, 3, 1).reshape(-1, 8), vq.codebook[idx])


@pytest.mark.parametrize("l2", [False, True])
def test_straight_through_behind_a_projection(l2):
    """With low-dimensional codes behind proj_in/proj_out (and l2 normalisation), the gradient
    that reaches z is exactly that of the continuous path proj_out(norm(proj_in(z))): the
    quantization step itself is the identity for gradients, whatever the projections are."""
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, dim=8, codebook_dim=4, l2_normalize=l2, ema=False, kmeans_init=False,
                         restart_window=0)
    z = _z().requires_grad_(True)
    w = torch.randn(4, 8, 3, 3)  # a non-uniform upstream gradient
    (g,) = torch.autograd.grad((vq(z).quantized * w).sum(), z)

    def continuous(z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
        z_e = vq.proj_in(flat)
        if l2:
            z_e = torch.nn.functional.normalize(z_e, dim=-1)
        return vq.proj_out(z_e).reshape(4, 3, 3, 8).permute(0, 3, 1, 2)

    (want,) = torch.autograd.grad((continuous(z) * w).sum(), z)
    torch.testing.assert_close(g, want)
    assert not torch.allclose(g, w)  # the projections really are in the path


def test_ema_update_matches_a_hand_computation():
    k, d, decay, eps = 4, 2, 0.9, 1e-5
    vq = VectorQuantizer(codebook_size=k, dim=d, decay=decay, eps=eps, kmeans_init=False, restart_window=0)
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    vq.codebook.copy_(codebook)
    vq.ema_sum.copy_(codebook * 2.0)
    vq.ema_count.fill_(2.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [1.0, 9.0], [2.0, 2.0]])  # codes 0, 0, 1, 2, 0
    vq.train()
    out = vq(x.t().reshape(1, d, 1, 5))
    assert out.indices.flatten().tolist() == [0, 0, 1, 2, 0]

    counts = np.array([3.0, 1.0, 1.0, 0.0])
    sums = np.array([[3.0, 3.0], [9.0, 1.0], [1.0, 9.0], [0.0, 0.0]])
    n_k = decay * 2.0 + (1 - decay) * counts
    m_k = decay * codebook.numpy() * 2.0 + (1 - decay) * sums
    n = n_k.sum()
    smoothed = (n_k + eps) / (n + k * eps) * n
    expected = m_k / smoothed[:, None]
    assert np.allclose(vq.ema_count.numpy(), n_k)
    assert np.allclose(vq.ema_sum.numpy(), m_k)
    assert np.allclose(vq.codebook.numpy(), expected, atol=1e-6)
    # The codebook is a buffer, not a parameter: only the EMA moves it.
    assert "codebook" not in dict(vq.named_parameters())


def test_dead_codes_are_restarted_from_encoder_outputs():
    k, d, window = 8, 4, 3
    vq = VectorQuantizer(codebook_size=k, dim=d, kmeans_init=False, restart_window=window)
    far = torch.full((d,), 1e4)
    vq.codebook[4:] = far  # codes 4..7 are never nearest
    vq.ema_sum[4:] = far
    vq.train()
    data = torch.randn(64, d)
    z = data.t().reshape(1, d, 8, 8)
    for _ in range(window):
        vq(z)
    restarted = vq.codebook[4:]
    assert torch.all(restarted.abs() < 100), "dead codes were not re-seeded"
    # re-seeded from the encoder outputs (one of the batch vectors) ...
    for row in restarted:
        assert torch.isclose(data, row).all(1).any()
    # ... with their EMA statistics reset
    assert torch.all(vq.ema_count[4:] == 1.0)
    assert torch.allclose(vq.ema_sum[4:], restarted)


def test_restarts_leave_live_codes_alone():
    """The restart step re-seeds only the dead codes: the live ones (and their EMA statistics) are
    exactly what the same training steps give without restarts."""
    k, d, window = 8, 4, 3
    vq = VectorQuantizer(codebook_size=k, dim=d, kmeans_init=False, restart_window=window)
    far = torch.full((d,), 1e4)
    vq.codebook[4:] = far  # codes 4..7 are never nearest: dead after `window` steps
    vq.ema_sum[4:] = far
    twin = VectorQuantizer(codebook_size=k, dim=d, kmeans_init=False, restart_window=0)  # never restarts
    twin.load_state_dict({n: b for n, b in vq.state_dict().items() if n != "usage_ring"}, strict=False)
    vq.train()
    twin.train()
    for _ in range(window):
        z = torch.randn(1, d, 8, 8)
        vq(z)
        twin(z)
    assert (vq.usage_ring.sum(0)[:4] > 0).all(), "codes 0..3 should be live"
    assert not torch.equal(vq.codebook[4:], twin.codebook[4:]), "the dead codes were not restarted"
    for name in ("codebook", "ema_sum", "ema_count"):
        assert torch.equal(getattr(vq, name)[:4], getattr(twin, name)[:4]), f"a restart changed live {name}"


def test_kmeans_initialisation_from_the_first_batch():
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    data = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2)
    vq = VectorQuantizer(codebook_size=4, dim=2, kmeans_init=True, restart_window=0)
    vq.train()
    vq(data.t().reshape(1, 2, 10, 20))
    assert bool(vq.initialized)
    # every true center has a code near it
    dist = torch.cdist(centers, vq.codebook)
    assert torch.all(dist.min(1).values < 0.5)
    c, sizes = kmeans(data, 4, 10)
    assert sorted(sizes.tolist()) == [50.0, 50.0, 50.0, 50.0]


def test_quantizer_arithmetic_stays_fp32_under_autocast():
    model = VQVAE(VQVAEConfig(width=16, code_dim=8, codebook_size=16, res_blocks=1))
    model.train()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, q = model(x)
    assert model.quantizer.codebook.dtype == torch.float32
    assert q.commitment_loss.dtype == torch.float32 and q.quantized.dtype == torch.float32
    assert model.quantizer.ema_sum.dtype == torch.float32


def test_l2_normalised_low_dimensional_codes():
    vq = VectorQuantizer(codebook_size=32, dim=16, codebook_dim=4, l2_normalize=True, restart_window=0)
    vq.train()
    out = vq(_z(4, 16, 4, 4))
    assert vq.codebook.shape == (32, 4)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(32), atol=1e-5)
    assert out.quantized.shape == (4, 16, 4, 4)


def test_perplexity_and_usage_window():
    assert perplexity(torch.ones(64)).item() == pytest.approx(64.0, rel=1e-5)
    assert perplexity(torch.tensor([10.0, 0, 0, 0])).item() == pytest.approx(1.0)
    vq = VectorQuantizer(codebook_size=8, dim=2, kmeans_init=False, restart_window=4)
    vq.train()
    vq.codebook.copy_(torch.eye(8, 2) * torch.arange(1, 9)[:, None])
    vq(torch.tensor([[1.0, 0.0]]).reshape(1, 2, 1, 1))
    assert vq.usage() == pytest.approx(1 / 8)


def test_bad_quantizer_options_are_rejected_up_front():
    with pytest.raises(ValueError, match="codebook_size=1"):
        VectorQuantizer(codebook_size=1, dim=4)
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(codebook_size=4, dim=4, decay=1.5)
