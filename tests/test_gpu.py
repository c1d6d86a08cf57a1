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


# ---------------------------------------------------------------------------------------------
# The Triton kernel on CUDA against the fp64 reference: adversarial cases at GPU tile sizes
# (codebook tiles of 64 to 256 codes, row tiles of 64 to 256, D slices of 16 to 64). Shapes are
# chosen to reuse the kernels test_kernels.py's full-size tests compile (Triton specialises on
# sizes divisible by 16 and on 1), so that they add autotuning, not compilation.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_kernel_ties_within_and_across_codebook_tiles_go_to_the_lowest_index(precision):
    from vqtok.kernels import nearest_code

    g = torch.Generator().manual_seed(1)
    e = torch.randn(4096, 48, generator=g)
    copies = [3, 4, 63, 64, 100, 127, 128, 255, 256, 260, 1000, 4095]  # same tile, and the next tiles of 64/128/256
    e[copies] = e[100].clone()
    x = torch.cat([e[copies], e[copies] + 1e-3 * torch.randn(len(copies), 48, generator=g)])
    idx = nearest_code(x.cuda(), e.cuda(), precision=precision)
    assert idx.tolist() == [3] * (2 * len(copies))  # every copy is equally near: the lowest index wins


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("n,k,d,offset", [
    (200, 4096, 48, 0.0),  # D = 48: the last D slice is partly padding (slices of 32, 64, 128)
    (65, 4096, 144, 0.0),  # D = 144 crosses a 128 slice; N = 65 leaves a row tile of 1
    (257, 4096, 48, 1000.0),  # a large common offset: the scores cancel badly
    (200, 4096, 48, 5e4),  # beyond fp16's safe range: the fast mode falls back to exact
    (200, 1, 200, 0.0),  # K = 1
])
def test_kernel_on_cuda_matches_the_fp64_reference(precision, n, k, d, offset):
    from test_kernels import check

    g = torch.Generator().manual_seed(n + k + d)
    x, e = offset + torch.randn(n, d, generator=g), offset + torch.randn(k, d, generator=g)
    idx, ref = check(x.cuda(), e.cuda(), "triton", precision)  # every row within fp32's rounding bound
    if not offset:  # with an offset, fp32 scores cannot tell most neighbours apart: the bound is the criterion
        assert (idx == ref).float().mean() >= 0.98


FIRST_CALL = r"""
import json, os, pathlib, sys
import torch
from vqtok.kernels import nearest_code, nearest_code_reference
from vqtok.kernels import triton_kernel as tk
g = torch.Generator().manual_seed(0)
x, e = torch.randn(3000, 80, generator=g).cuda(), torch.randn(1000, 80, generator=g).cuda()  # a (K, D) no other test uses
esq = (e * e).sum(1).contiguous()
out = [torch.empty(3000, dtype=torch.int32, device="cuda"), torch.empty(3000, device="cuda"), torch.empty(1, device="cuda")]
kernels = tk._jit_kernel.device_caches[torch.cuda.current_device()][0]  # Triton's compiled kernels, this process
before = len(kernels)
asked = tk._precompile(tk.kernel_args(x, e, esq, *out), {"LOW_PRECISION": False, "TRACK_SECOND": False})
landed = len(kernels) - before  # compiled (or loaded from the disk cache) before any launch
idx = nearest_code(x, e).cpu()
agree = (idx == nearest_code_reference(x.cpu(), e.cpu())[0]).float().mean().item()
cache = pathlib.Path(os.environ["TRITON_CACHE_DIR"])
print(json.dumps({"agree": agree, "kept": len(tk.configs_for(80, 4)), "asked": asked, "landed": landed,
                  "after_call": len(kernels) - before, "tunings": len(list(cache.rglob("*.autotune.json")))}))
"""


def test_the_first_call_compiles_every_kept_configuration_and_keeps_the_tuning(tmp_path):
    """_precompile compiles every configuration the autotuner will time before it times them (the
    call that follows compiles nothing more), and the autotuner's choice is kept on disk
    (cache_results, where Triton has it): a second process finds it and only loads kernels."""
    import inspect
    import json
    import os
    import subprocess
    import sys

    import triton

    env = os.environ | {"TRITON_CACHE_DIR": str(tmp_path / "triton"), "VQTOK_COMPILE_THREADS": "8"}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for run in runs:
        assert run["agree"] >= 0.99
        assert run["asked"] == run["kept"] >= 2 and run["landed"] == run["kept"]  # all of them, before any launch
        assert run["after_call"] == run["landed"]  # the autotuner found them all compiled
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        assert runs[0]["tunings"] >= 1


@pytest.mark.parametrize("k,d", [(4096, 8), (4096, 64), (8192, 256)])
def test_every_configuration_returns_the_same_codes(k, d):
    """The autotuner may choose any kept configuration (per machine, per bucket of rows), so the
    codes must not depend on which: exact mode's codes and scores bitwise equal across all of
    them, on rows full of near-ties (midpoints of two codes, the codes themselves); fast mode's
    codes equal on the rows its rounding bound certifies (the rest are re-searched in exact mode)."""
    import triton

    from vqtok.kernels import triton_kernel as tk

    g = torch.Generator(device="cuda").manual_seed(k + d)
    e = torch.randn(k, d, device="cuda", generator=g)
    i, j = torch.randint(0, k, (2, 4000), device="cuda", generator=g)
    x = torch.cat([(e[i] + e[j]) / 2 + 1e-6 * torch.randn(4000, d, device="cuda", generator=g), e[i],
                   torch.randn(4000, d, device="cuda", generator=g)])
    n = x.shape[0]
    for low in (False, True):
        e_fed = e.half().float() if low else e
        esq = (e_fed * e_fed).sum(1).contiguous()
        runs, configs = {}, tk.configs_for(d, 4)
        scratch = [torch.empty(n, dtype=torch.int32, device="cuda"), torch.empty(n, device="cuda"), torch.empty(n, device="cuda")]
        tk._compile_all(tk.kernel_args(x, e, esq, *scratch), {"LOW_PRECISION": low, "TRACK_SECOND": low}, configs)
        for c in configs:  # compiled above, in parallel: the launches below find them
            idx = torch.full((n,), -1, dtype=torch.int32, device="cuda")
            best, second = torch.full((n,), float("nan"), device="cuda"), torch.full((n,), float("nan"), device="cuda")
            tk._jit_kernel[(triton.cdiv(n, c.kwargs["BLOCK_N"]),)](
                *tk.kernel_args(x, e, esq, idx, best, second), LOW_PRECISION=low, TRACK_SECOND=low, **c.all_kwargs())
            assert (idx >= 0).all() and not best.isnan().any(), f"{c}: rows left unwritten"
            runs[str(c)] = (idx.long(), best, second)
        (name0, (idx0, best0, second0)), *others = runs.items()
        certified = (second0 - best0) > tk.fast_dot_bound(x, e) if low else torch.ones(n, dtype=torch.bool, device="cuda")
        for name, (idx, best, _) in others:
            assert torch.equal(idx[certified], idx0[certified]), f"{'fast' if low else 'exact'}: {name} vs {name0}"
            if not low:
                assert torch.equal(best, best0), f"exact: {name}'s scores differ from {name0}'s"


def test_the_autotuner_chooses_per_bucket_of_rows():
    """A small first batch does not choose the tiles for every later large one: N's bucket
    (tuning_rows) is in the autotuner's key, so 500 rows and 70,000 rows are tuned apart."""
    from vqtok.kernels import nearest_code
    from vqtok.kernels.triton_kernel import _nearest_code_kernel, tuning_rows

    e = torch.randn(2000, 40, device="cuda")  # a (K, D) no other test uses
    before = set(_nearest_code_kernel.cache)
    for n in (500, 70_000):
        nearest_code(torch.randn(n, 40, device="cuda"), e)
    new = set(_nearest_code_kernel.cache) - before
    assert {key[2] for key in new} == {tuning_rows(500), tuning_rows(70_000)}  # (K, D, N_TUNE, mode, dtypes...)


# ---------------------------------------------------------------------------------------------
# The tokenization stages without Ray (read_units -> BatchEncoder -> UnitCollector), CUDA vs CPU
# ---------------------------------------------------------------------------------------------
def stage_tokens(bundle: tuple[bytes, bytes], tables, device: str) -> tuple[dict, object]:
    """unit -> (keys, token grids) from the stages, with the encoder on `device`; and its tokenizer."""
    import numpy as np

    from vqtok.pipeline.stages import BatchEncoder, UnitCollector

    encoder, collector, out = BatchEncoder(bundle, device=device, threads=2), UnitCollector(), {}
    for table in tables:
        for unit in collector.add(encoder(table)):
            rows = unit.rows
            grids = np.asarray(rows.column("tokens").to_pylist(), dtype=np.int64).reshape(-1, *encoder.tok.grid)
            out[unit.part_index] = (rows.column("key").to_pylist(), grids)
    assert collector.in_flight == 0
    return out, encoder.tok


@pytest.mark.parametrize("arch", ["conv", "vqgan"])
def test_tokenization_stages_on_cuda_equal_cpu_but_for_measured_near_ties(tmp_path, shards, arch):
    """Where CUDA picks another code than the CPU, the CPU's own squared distances to the two codes
    must differ by no more than the encoders' outputs differ between the devices can move them:
    |d(z, e_j) - d(z, e_i)| changes by at most 2 |z_cuda - z_cpu| |e_i - e_j| (a measured near-tie)."""
    import numpy as np
    import pyarrow as pa

    from vqtok import Preprocess, VQVAEConfig
    from vqtok.models import VQVAE
    from vqtok.models.bundle import read_bundle
    from vqtok.pipeline.sources import list_units
    from vqtok.pipeline.stages import UnitRows, read_units, unit_items

    if arch == "conv":
        from conftest import make_bundle

        make_bundle(tmp_path / "tok", seed=0)
    else:
        torch.manual_seed(0)
        cfg = VQVAEConfig(arch="vqgan", image_size=32, channels=1, width=32, channel_mult=[1, 2, 2], res_blocks=1,
                          codebook_size=64, code_dim=8)
        model = VQVAE(cfg)
        with torch.no_grad():
            model.quantizer.codebook.normal_()
        Tokenizer(model).save(tmp_path / "tok")
    bundle = read_bundle(str(tmp_path / "tok"))
    units = list_units(str(shards))
    items = pa.Table.from_pylist(unit_items([(u, i) for i, u in enumerate(units)]))
    tok_cpu = Tokenizer.from_bytes(*bundle)
    tables = list(read_units(items, preprocess=tok_cpu.preprocess, batch_size=64, max_pixels=1 << 26))
    on_cpu, _ = stage_tokens(bundle, tables, "cpu")
    on_cuda, tok_cuda = stage_tokens(bundle, tables, "cuda")
    assert sorted(on_cuda) == sorted(on_cpu) == list(range(len(units)))
    for i in on_cpu:
        assert on_cuda[i][0] == on_cpu[i][0]  # the same keys, in the same order

    # the encoders' outputs on both devices, for every image in unit order
    codec = UnitRows(tok_cpu.preprocess.shape)
    pixels = torch.from_numpy(np.concatenate([codec.pixels(t)[np.asarray(t.column("batch").is_valid())]
                                              for t in sorted(tables, key=lambda t: t.column("part_index")[0].as_py())]))

    def code_space(tok):  # (N * h * w, d): what the quantizer compares with the codes
        with torch.no_grad():
            z = tok.model.encoder(Preprocess.to_model(pixels.to(tok.device)))
            return tok.model.quantizer._code_space(z).double().cpu()

    z_cpu, z_cuda = code_space(tok_cpu), code_space(tok_cuda)
    a = torch.from_numpy(np.concatenate([on_cpu[i][1] for i in sorted(on_cpu)]).reshape(-1))
    b = torch.from_numpy(np.concatenate([on_cuda[i][1] for i in sorted(on_cuda)]).reshape(-1))
    codes = tok_cpu.model.quantizer.codebook.double()
    differ = (a != b).nonzero().flatten()
    gap = ((z_cpu[differ] - codes[b[differ]]) ** 2).sum(1) - ((z_cpu[differ] - codes[a[differ]]) ** 2).sum(1)
    reach = 2 * (z_cuda[differ] - z_cpu[differ]).norm(dim=1) * (codes[a[differ]] - codes[b[differ]]).norm(dim=1)
    print(f"{arch}: {len(differ)} of {len(a)} tokens differ between CUDA and CPU, all within measured near-ties")
    assert torch.all(gap <= reach + 1e-9), "CUDA chose a code that the encoders' difference cannot explain"
    assert len(differ) <= 0.01 * len(a)


# ---------------------------------------------------------------------------------------------
# Prior sampling on CUDA: class and text prompts
# ---------------------------------------------------------------------------------------------
def tiny_tokenizer(k: int) -> Tokenizer:
    """A 16 px tokenizer with 4x4 grids of k codes, on CUDA."""
    from vqtok import VQVAEConfig
    from vqtok.models import VQVAE

    return Tokenizer(VQVAE(VQVAEConfig(image_size=16, width=32, code_dim=16, codebook_size=k, res_blocks=1))).to("cuda")


def test_class_prior_samples_on_cuda_with_the_kv_cache_and_guidance():
    from vqtok import Prior, PriorConfig

    torch.manual_seed(0)
    prior = Prior(PriorConfig(codebook_size=64, grid_h=4, grid_w=4, num_classes=3, n_layer=2, n_head=2, n_embd=64))
    prior = prior.cuda().eval()
    tok = tiny_tokenizer(64)
    a = prior.sample(6, classes=[0, 1, 2, 0, 1, 2], cfg_scale=2.0, seed=0, tokenizer=tok)
    b = prior.sample(6, classes=[0, 1, 2, 0, 1, 2], cfg_scale=2.0, seed=0, tokenizer=tok)
    assert a.tokens.shape == (6, 4, 4) and 0 <= int(a.tokens.min()) and int(a.tokens.max()) < 64
    assert torch.equal(a.tokens, b.tokens)  # a seed fixes CUDA's draws too
    assert a.images.shape == (6, 16, 16) and a.images.dtype == torch.uint8
    # the KV cache's logits are the full recomputation's, on CUDA's attention kernels
    seq = torch.cat([prior.prefix(3, torch.tensor([0, 1, 2]), "cuda"), torch.randint(0, 64, (3, 15), device="cuda")], 1)
    with torch.no_grad():
        full = prior(seq)
        caches = [{} for _ in prior.blocks]
        steps = [prior(seq[:, t:t + 1], start=t, caches=caches)[:, 0] for t in range(seq.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-3)


def test_text_prior_samples_prompts_on_cuda():
    from vqtok import TextTokenizer, Vocabulary
    from vqtok.models.text_prior import TextPrior, TextPriorConfig

    torch.manual_seed(0)
    text = TextTokenizer.load("bytes")
    vocab = Vocabulary(text_vocab_size=text.vocab_size, text_tokenizer_id=text.id, codebook_size=64, grid=(4, 4),
                       image_tokenizer_id="", max_text_tokens=16)
    prior = TextPrior(TextPriorConfig(vocabulary=vocab.to_dict(), n_layer=2, n_head=2, n_embd=64), text).cuda().eval()
    tok = tiny_tokenizer(64)
    prompts = ["a dark t-shirt", "light trousers"]
    a = prior.sample(prompts, n=3, cfg_scale=3.0, seed=0, tokenizer=tok)
    b = prior.sample(prompts, n=3, cfg_scale=3.0, seed=0, tokenizer=tok)
    assert a.tokens.shape == (6, 4, 4) and 0 <= int(a.tokens.min()) and int(a.tokens.max()) < 64
    assert torch.equal(a.tokens, b.tokens) and a.prompts == [p for p in prompts for _ in range(3)]
    assert a.images.shape == (6, 16, 16) and a.images.dtype == torch.uint8
