"""nearest_code on every backend against the fp64 reference.

Criterion (from the kernel issue): every row returns the first fp64 argmin, or a code whose fp64
distance is within a stated rounding bound of it; returned distances are within the same bound.
The bound for fp32-accurate arithmetic: 8 * (D + 2) * 2^-24 * (||x|| + max ||e||)^2, a small
multiple of the worst-case fp32 error of ||e||^2 - 2 x.e. The Triton kernel runs here under the
interpreter (small sizes); `-m gpu` runs it at full size on CUDA.
"""

import os
import subprocess
import sys

import pytest
import torch

from vqtok.kernels import nearest_code, nearest_code_reference

CUDA = torch.cuda.is_available()
BACKENDS = [("torch", "exact"), ("triton", "exact"), ("triton", "fast")]


def rounding_bound(x, e):
    d = x.shape[1]
    scale = (x.double().norm(dim=1) + e.double().norm(dim=1).max()) ** 2
    return 8 * (d + 2) * 2.0**-24 * scale


def check(x, e, backend, precision):
    idx, dist = nearest_code(x, e, backend=backend, precision=precision, return_distance=True)
    assert idx.dtype == torch.int64 and idx.shape == (x.shape[0],)
    x, e, idx, dist = x.cpu(), e.cpu(), idx.cpu(), dist.cpu()  # the reference on the CPU (CUDA inputs too)
    ref_idx, ref_dist = nearest_code_reference(x, e)
    chosen = ((x.double() - e.double()[idx]) ** 2).sum(1)
    bound = rounding_bound(x, e)
    assert torch.all(chosen - ref_dist <= bound), "a row chose a code farther than the bound allows"
    assert torch.all((dist.double() - ref_dist).abs() <= bound)
    assert torch.all(dist >= 0) and not torch.isnan(dist).any()
    return idx, ref_idx


@pytest.mark.parametrize("backend,precision", BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 8), (70, 5, 12), (129, 40, 64), (33, 70, 96), (40, 33, 200),
                                   (50, 17, 256)])
def test_random_shapes(backend, precision, n, k, d):
    g = torch.Generator().manual_seed(n * 1000 + k + d)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx, ref = check(x, e, backend, precision)
    assert (idx == ref).float().mean() >= 0.98


@pytest.mark.parametrize("backend,precision", BACKENDS)
def test_duplicate_codes_and_exact_matches(backend, precision):
    e = torch.randn(40, 12)
    e[30] = e[7]
    e[31] = e[7]
    x = e[[7, 30, 31, 5, 39]]
    idx, dist = nearest_code(x, e, backend=backend, precision=precision, return_distance=True)
    assert idx.tolist() == [7, 7, 7, 5, 39]  # duplicates -> lowest index; x equal to a code -> that code
    assert torch.all(dist == 0)


@pytest.mark.parametrize("backend,precision", BACKENDS)
def test_ties_across_codebook_tiles_go_to_the_lowest_index(backend, precision):
    """Duplicates in different codebook tiles (the interpreter's tile is 32 codes; GPU tiles are 64
    to 256): the running (min, argmin) merge must keep the earlier tile's code on an exact tie,
    also when the later copy sits at a smaller offset inside its own tile."""
    g = torch.Generator().manual_seed(5)
    e = torch.randn(300, 24, generator=g)
    for later in (32, 40, 95, 160, 290):  # tiles 1, 1, 2, 5, 9 of 32 (and 0/1/2/4 of 64/128/256)
        e[later] = e[20]
    e[257] = e[3]  # a tie across a 256-code tile too
    x = torch.cat([e[[20, 32, 40, 95, 160, 290, 3, 257]], e[[20, 3]] + 1e-3 * torch.randn(2, 24, generator=g)])
    idx = nearest_code(x, e, backend=backend, precision=precision)
    assert idx.tolist() == [20, 20, 20, 20, 20, 20, 3, 3, 20, 3]


@pytest.mark.parametrize("backend,precision", BACKENDS)
def test_large_common_offset(backend, precision):
    x = 1000.0 + torch.randn(64, 16)
    e = 1000.0 + torch.randn(20, 16)
    check(x, e, backend, precision)


@pytest.mark.parametrize("backend,precision", BACKENDS)
def test_non_contiguous_inputs(backend, precision):
    x = torch.randn(40, 48)[:, ::3]  # (40, 16), stride 3
    e = torch.randn(16, 25).t()  # (25, 16), column-major
    assert not x.is_contiguous() and not e.is_contiguous()
    idx, ref = check(x, e, backend, precision)
    assert torch.equal(idx, nearest_code(x.contiguous(), e.contiguous(), backend=backend, precision=precision))


@pytest.mark.parametrize("backend,precision", BACKENDS)
def test_repeated_runs_are_bitwise_identical(backend, precision):
    x, e = torch.randn(100, 24), torch.randn(50, 24)
    a = nearest_code(x, e, backend=backend, precision=precision, return_distance=True)
    b = nearest_code(x, e, backend=backend, precision=precision, return_distance=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fast_mode_reports_the_rows_it_re_searched():
    e = torch.randn(64, 32)
    near = e[torch.randint(0, 64, (200,))] + 0.05 * torch.randn(200, 32)  # VQ-like: clear winners
    stats = {}
    nearest_code(near, e, backend="triton", precision="fast", stats=stats)
    assert stats["rows"] == 200 and stats["flagged"] <= 10
    # a point halfway between two codes is a near-tie: flagged and settled by the exact search
    mid, pair = ((e[0] + e[1]) / 2).unsqueeze(0), e[:2]
    stats = {}
    idx = nearest_code(mid, pair, backend="triton", precision="fast", stats=stats)
    assert stats["flagged"] == 1 and idx.tolist() == nearest_code_reference(mid, pair)[0].tolist()


def test_the_kernel_does_not_set_triton_interpret_for_the_whole_process():
    """Without CUDA the kernel runs on Triton's interpreter; importing and running it must leave
    TRITON_INTERPRET as it was (a later Triton user, or a subprocess, would silently interpret)."""
    code = ("import os, torch, vqtok.kernels, vqtok.kernels.triton_kernel; x = torch.randn(5, 4); "
            "assert vqtok.kernels.nearest_code(x, x, backend='triton').tolist() == [0, 1, 2, 3, 4]; "
            "print(repr(os.environ.get('TRITON_INTERPRET')))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    for before, after in ((None, "None"), ("1", "'1'")):  # unset stays unset; a caller's value is kept
        run_env = env if before is None else env | {"TRITON_INTERPRET": before}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == after


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="same D"):
        nearest_code(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="backend"):
        nearest_code(torch.randn(4, 8), torch.randn(4, 8), backend="cuda-magic")
    with pytest.raises(ValueError, match="empty"):
        nearest_code(torch.randn(4, 8), torch.randn(0, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("n,k,d", [(65536, 1024, 64), (65536, 8192, 256), (100_003, 16384, 96), (4099, 1, 200)])
def test_gpu_full_size(precision, n, k, d):
    x, e = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    idx, dist = nearest_code(x, e, precision=precision, return_distance=True)
    sub = torch.randperm(n, device="cuda")[:2048]
    ref_idx, ref_dist = nearest_code_reference(x[sub].cpu(), e.cpu())
    chosen = ((x[sub].double() - e.double()[idx[sub]]) ** 2).sum(1).cpu()
    assert torch.all(chosen - ref_dist <= rounding_bound(x[sub].cpu(), e.cpu()))
    again = nearest_code(x, e, precision=precision)
    assert torch.equal(idx, again)


@pytest.mark.parametrize("k", [64, 65, 100, 1024, 1025, 3000])
def test_cpu_blocked_argmin_keeps_lowest_index_ties(k):
    """The CPU path's blocked argmin across block boundaries and padded tails."""
    g = torch.Generator().manual_seed(k)
    e = torch.randn(k, 8, generator=g)
    dup = [0, k // 2, k - 1]  # the same code at the first, a middle and the last position
    e[dup[1]] = e[dup[0]]
    e[dup[2]] = e[dup[0]]
    x = torch.cat([e[dup], torch.randn(500, 8, generator=g)])
    idx = nearest_code(x, e, backend="torch")
    assert idx[:3].tolist() == [0, 0, 0]
    assert torch.equal(idx, nearest_code_reference(x, e)[0])


# ---------------------------------------------------------------------------------------------
# The kernel's configurations: which are compiled, what they cost, and that they compile for a
# real GPU (Hopper, sm_90) within the shared memory _prune allows. Compiling needs no GPU: Triton
# compiles ahead of time for a named target with the ptxas its wheel carries.
# ---------------------------------------------------------------------------------------------
H100_SMEM = 232_448  # shared memory per block on an H100/H200 (227 KiB, opt-in)


@pytest.mark.parametrize("d,width", [(8, 16), (16, 16), (24, 32), (48, 64), (64, 64), (144, 64), (256, 64),
                                     (1024, 64)])
def test_the_configurations_kept_for_each_d(d, width):
    from vqtok.kernels.triton_kernel import configs_for, d_slice, gpu_configs, smem_bytes

    assert d_slice(d) == width
    for elem in (4, 2):
        kept = configs_for(d, elem, H100_SMEM)
        assert {c.kwargs["BLOCK_D"] for c in kept} == {width}  # one slice per D: the sums' order never tuned
        for c in kept:
            assert smem_bytes(c, elem) <= H100_SMEM
            assert c.num_stages <= max(2, -(-d // c.kwargs["BLOCK_D"]))  # no deeper than the D loop
        assert 6 <= len(kept) <= 18, "each kept configuration costs a compile on the first call"
    # D = 256 at fp32 keeps the matmul-shaped tiles that fit: 128 x 128 x 64 with 3 stages among them
    kept = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in configs_for(256, 4, H100_SMEM)}
    assert (128, 128, 3) in kept and (128, 256, 4) not in kept  # the latter: 416 KiB of tiles
    assert len(gpu_configs()) == 54 and len(configs_for(256, 4, 48 * 1024)) >= 1  # a small GPU still gets one
    assert all(c.kwargs["BLOCK_D"] == width for c in configs_for(d, 4, 48 * 1024))  # ... with D's own slice


AOT_COMPILE = r"""
import json, sys
from vqtok.kernels import triton_kernel as tk

out = []
for d, low, first_only, dtype in json.loads(sys.argv[1]):
    elem = 4 if dtype == "fp32" else 2
    kept = tk.configs_for(d, elem, %(smem)d)
    for c in kept[:1] if first_only else kept:
        k = tk.compile_ahead(c, low=low, dtype=dtype)
        out.append([d, low, dtype, c.kwargs, c.num_stages, tk.smem_bytes(c, elem), k.metadata.shared, len(k.asm["cubin"])])
print(json.dumps(out))
""" % {"smem": H100_SMEM}


def compile_for_sm90(tmp_path, cases) -> list:
    """[d, low, dtype, tile, stages, estimated smem, compiled smem, cubin bytes] per configuration compiled."""
    import json

    pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend cannot compile for sm_90")
    env = os.environ | {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "TRITON_CACHE_DIR": str(tmp_path / "triton"),
                        "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", AOT_COMPILE, json.dumps(cases)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_compiled(rows):
    for d, low, dtype, tile, stages, estimate, shared, cubin in rows:
        assert cubin > 0
        assert shared <= H100_SMEM, f"D={d} {tile} x{stages} stages takes {shared} B of shared memory"
        if dtype == "fp32":  # (16-bit tiles are converted before the dot and not multi-buffered: far less)
            assert shared <= estimate, f"D={d} {tile} x{stages}: the compiler takes {shared} B, _prune assumed {estimate}"
        if not low and dtype == "fp32":  # fp32 tiles staged as loaded: the bound is what the compiler allocates
            assert shared == estimate, f"D={d} {tile} x{stages}: the compiler takes {shared} B, the bound says {estimate}"


def test_the_kernel_compiles_for_hopper_in_both_modes(tmp_path):
    """The first kept configuration at the tokenizers' D = 8 and at D = 256, both modes, as sm_90 code."""
    rows = compile_for_sm90(tmp_path, [[8, True, True, "fp32"], [8, False, True, "fp32"], [256, True, True, "fp32"],
                                       [256, False, True, "fp32"]])
    assert len(rows) == 4
    check_compiled(rows)


@pytest.mark.slow
def test_every_kept_configuration_compiles_for_hopper_within_its_shared_memory(tmp_path):
    cases = [[d, low, False, "fp32"] for d in (8, 64, 256) for low in (True, False)]
    cases += [[256, low, False, "bf16"] for low in (True, False)]  # operands as a bf16 model hands them over
    rows = compile_for_sm90(tmp_path, cases)
    assert len(rows) == 2 * (6 + 6 + 13) + 2 * 18
    check_compiled(rows)


def test_tuning_rows_buckets_n_by_powers_of_four():
    from vqtok.kernels.triton_kernel import tuning_rows

    assert [tuning_rows(n) for n in (0, 1, 1024, 1025, 4096, 12544, 65536, 65537, 1 << 20, 1 << 24)] == [
        1024, 1024, 1024, 4096, 4096, 16384, 65536, 262144, 1 << 20, 1 << 20]


def fake_compiler(monkeypatch, warmup, *, threads: int) -> None:
    """The kernel module as on a GPU (all 54 configurations, an H100's shared memory, no interpreter),
    with Triton's compile step replaced by `warmup`: for testing _precompile's logic on the CPU."""
    import types

    from vqtok.kernels import triton_kernel as tk

    monkeypatch.setattr(tk, "_jit_kernel", types.SimpleNamespace(warmup=warmup))
    monkeypatch.setattr(tk, "_nearest_code_kernel", types.SimpleNamespace(configs=tk.gpu_configs(),
                                                                          arg_names=tk._nearest_code_kernel.arg_names))
    monkeypatch.setattr(tk, "_interpreting", lambda: False)
    monkeypatch.setattr(tk, "_smem_per_block", lambda: H100_SMEM)
    monkeypatch.setattr(tk, "COMPILE_THREADS", threads)
    monkeypatch.setattr(tk, "_precompiled", {})


def test_first_launch_compiles_the_kept_configurations_in_threads_once(monkeypatch):
    """_precompile asks Triton to compile every configuration the autotuner will time, under
    Triton's asynchronous compile mode (a pool of threads), once per (device, dtypes, K, D, N
    bucket, mode); one that fails does not stop the others. Here Triton's compile step is a
    recorder that compiles on the pool as Triton's would (for real it needs a GPU: tests/test_gpu.py)."""
    import threading

    from triton.runtime import _async_compile

    from vqtok.kernels import triton_kernel as tk

    calls, lock = [], threading.Lock()

    def compile_on_pool(kwargs):
        with lock:
            calls.append((threading.current_thread().name, kwargs["BLOCK_D"], kwargs["num_stages"], kwargs["BLOCK_N"],
                          kwargs["BLOCK_K"], kwargs["LOW_PRECISION"]))

    def warmup(*args, grid, **kwargs):
        mode = _async_compile.active_mode.get()
        assert mode is not None, "compiles must go to Triton's asynchronous compile mode"
        if kwargs["BLOCK_N"] == 256:
            raise RuntimeError("out of resources")  # as a configuration too big for the device would
        mode.executor.submit(compile_on_pool, kwargs)

    fake_compiler(monkeypatch, warmup, threads=4)
    x, e = torch.randn(100, 256), torch.randn(512, 256)
    esq = (e * e).sum(1)
    out = [torch.empty(100, dtype=torch.int32), torch.empty(100), torch.empty(100)]
    args = (x, e, esq, *out, 100, 512, 256, 256, 1, 256, 1, 1024)
    assert tk._precompile(args, {"LOW_PRECISION": True, "TRACK_SECOND": True}) == 13
    want = {(c.kwargs["BLOCK_D"], c.num_stages, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in tk.configs_for(256, 4, H100_SMEM)}
    failing = {w for w in want if w[2] == 256}
    assert failing and {c[1:5] for c in calls} == want - failing and len(calls) == 13 - len(failing)
    assert all(c[0].startswith("vqtok-compile") for c in calls)  # on the pool's threads
    assert tk._precompile(args, {"LOW_PRECISION": True, "TRACK_SECOND": True}) == 0  # once per key
    assert len(calls) == 13 - len(failing)
    assert tk._precompile(args, {"LOW_PRECISION": False, "TRACK_SECOND": False}) == 13  # the other mode is its own
    small = (x[:, :8].contiguous(), e[:, :8].contiguous(), esq, *out, 100, 512, 8, 8, 1, 8, 1, 1024)
    assert tk._precompile(small, {"LOW_PRECISION": True, "TRACK_SECOND": True}) == 6
    assert tk._precompile(small[:-1] + (4096,), {"LOW_PRECISION": True, "TRACK_SECOND": True}) == 6  # another N bucket


def test_a_second_caller_waits_for_the_first_callers_compiles(monkeypatch):
    """Two threads launching the same new key: the second waits for the first's compiles instead of
    letting its autotuner compile them all again, one by one."""
    import threading

    from vqtok.kernels import triton_kernel as tk

    started, release = threading.Event(), threading.Event()

    def warmup(*args, grid, **kwargs):
        started.set()
        release.wait(30)

    fake_compiler(monkeypatch, warmup, threads=2)
    x, e = torch.randn(100, 64), torch.randn(512, 64)
    out = [torch.empty(100, dtype=torch.int32), torch.empty(100), torch.empty(100)]
    args = tk.kernel_args(x, e, (e * e).sum(1), *out)
    kwargs = {"LOW_PRECISION": False, "TRACK_SECOND": False}
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", tk._precompile(args, kwargs)))
    second = threading.Thread(target=lambda: results.setdefault("second", tk._precompile(args, kwargs)))
    first.start()
    assert started.wait(30)
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second caller went on while the first was still compiling"
    release.set()
    first.join(30)
    second.join(30)
    assert results == {"first": 6, "second": 0}
