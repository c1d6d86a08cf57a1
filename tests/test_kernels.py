"""nearest_code against the fp64 reference: ties, exact matches, chunking."""
import pytest
import torch

from vqtok.kernels import nearest_code, nearest_code_reference


@pytest.mark.parametrize("n,k,d", [(1, 1, 8), (1000, 512, 64), (77, 3, 12), (5000, 300, 200)])
def test_matches_fp64_reference(n, k, d):
    x, e = torch.randn(n, d), torch.randn(k, d)
    idx, dist = nearest_code(x, e, return_distance=True)
    ref_idx, ref_dist = nearest_code_reference(x, e)
    # Either the fp64 argmin or a code whose fp64 distance is within fp32 rounding of it.
    chosen = ((x.double() - e.double()[idx]) ** 2).sum(1)
    bound = 1e-5 * (x.double().pow(2).sum(1) + e.double().pow(2).sum(1).max())
    assert torch.all(chosen - ref_dist <= bound)
    assert (idx == ref_idx).float().mean() > 0.999
    assert torch.allclose(dist.double(), ref_dist, atol=1e-3, rtol=1e-4)


def test_ties_go_to_lowest_index_and_exact_match_is_zero():
    e = torch.randn(16, 8)
    e[9] = e[3]  # an exact duplicate code
    idx, dist = nearest_code(e[[3, 9, 5]], e, return_distance=True)
    assert idx.tolist() == [3, 3, 5]
    assert torch.all(dist >= 0) and not torch.isnan(dist).any()
    assert dist[2] <= 1e-5


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="same D"):
        nearest_code(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="backend"):
        nearest_code(torch.randn(4, 8), torch.randn(4, 8), backend="cuda-magic")
