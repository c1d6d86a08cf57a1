"""What the 1.5x-faiss bar of the nearest-code issue would take on this CPU: the measurements.

On the three CPU shapes of benchmarks/nearest_code.py (N = 65536; K x D = 512 x 64, 8192 x 64,
1024 x 256; Gaussian data with the same seeds), one run measures:
  1. the fp32 GEMM rate on the search's own shape (x @ e^T in 4096-row chunks, no argmin), and on
     a 2048^3 square matmul;
  2. faiss-cpu IndexFlatL2 k=1 (when faiss is installed) as a fraction of that fp32 rate, and the
     rate 1.5x faiss would need as a fraction of it (over 100%: no fp32 method can reach it);
  3. torch's bf16 matmul (bf16 in, bf16 out, same chunks) against the fp32 one;
  4. whether torch has a bf16-in, fp32-out matmul on CPU (aten::mm.dtype);
  5. the rows a certified bf16 search would have to re-search exactly: scores from bf16-rounded
     operands with exact products and fp32 accumulation (the best a bf16 GEMM with fp32 output
     could give); a row is flagged when its bf16 argmin cannot be certified, under the per-row
     Cauchy-Schwarz bound vqtok's fast GPU mode uses (with bf16's unit roundoff 2^-8 for fp16's
     2^-11) and under a tighter per-pair bound; and the speed-up bf16 + exact re-search of the
     flagged rows would have over fp32 at best: t_fp32 / (t_bf16 + flagged x t_fp32).

    python benchmarks/nearest_code_bf16.py [--n 65536] [--flag-rows 16384] [--repeat 10] [--no-append]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, interleaved, table  # noqa: E402

SHAPES = ((512, 64), (8192, 64), (1024, 256))
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
FP32_UNIT = 2.0**-24
CHUNK = 4096


def best_time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def chunked_mm(x: torch.Tensor, et: torch.Tensor, out: torch.Tensor) -> None:
    for i in range(0, x.shape[0], CHUNK):
        torch.mm(x[i:i + CHUNK], et, out=out[: min(CHUNK, x.shape[0] - i)])


def certified_fraction(x: torch.Tensor, e: torch.Tensor) -> tuple[float, float, float]:
    """For scores from bf16-rounded operands (exact products, fp32 accumulation): the fraction of
    rows flagged under the Cauchy-Schwarz bound, under the tighter per-pair bound, and the fraction
    whose bf16 argmin differs from the exact one."""
    d = x.shape[1]
    xb, eb = x.bfloat16().float(), e.bfloat16().float()  # bf16 values; their products are exact in fp32
    esq_b, esq = (eb * eb).sum(1), (e * e).sum(1)
    u = 2 * BF16_UNIT + BF16_UNIT**2  # relative error of a product of two bf16-rounded numbers
    acc = d * FP32_UNIT  # fp32 accumulation over d terms (first order)
    e_norm = e.norm(dim=1)
    # error of ||e~||^2 against ||e||^2, per code
    esq_err = u * (e * e).sum(1) + acc * esq_b
    cs = per_pair = wrong = 0
    for i in range(0, x.shape[0], 2048):
        xc, xbc = x[i:i + 2048], xb[i:i + 2048]
        s = esq_b - 2 * xbc @ eb.t()
        two = s.topk(2, dim=1, largest=False)
        best = two.indices[:, 0]
        # 1. Cauchy-Schwarz, as vqtok's fast GPU mode: one bound per row, against the gap to the second
        x_norm = xc.norm(dim=1)
        bound = 2 * (u * e_norm.max() ** 2 + 2 * (u + acc) * x_norm * e_norm.max())
        cs += int((two.values[:, 1] - two.values[:, 0] <= bound).sum())
        # 2. per pair: |s~_k - s_k| <= err_k; a row is certified when s~_j - s~_b > err_b + err_j for every j != b
        err = esq_err + 2 * ((u * xc.abs()) @ e.abs().t() + acc * (xbc.abs() @ eb.abs().t()))
        margin = s - s.gather(1, best[:, None]) - err - err.gather(1, best[:, None])
        margin.scatter_(1, best[:, None], float("inf"))
        per_pair += int((margin <= 0).any(dim=1).sum())
        exact = (esq - 2 * xc @ e.t()).argmin(1)
        wrong += int((best != exact).sum())
    n = x.shape[0]
    return cs / n, per_pair / n, wrong / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--flag-rows", type=int, default=16384, help="rows scored for the certified fraction")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        faiss_version = faiss.__version__
    except ImportError:
        faiss, faiss_version = None, None

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    square = 2 * 2048**3 / best_time(lambda: a @ b, 3)
    try:
        torch.mm(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.bfloat16),
                 out_dtype=torch.float32)
        fp32_out = "available"
    except (NotImplementedError, RuntimeError, TypeError) as err:
        fp32_out = f"not available ({type(err).__name__}: {str(err).splitlines()[0][:70]}...)"

    rows, faiss_share, need_share, bf16_speed, flagged_all, projected, vs_faiss = [], [], [], [], [], [], []
    faiss_time = []
    for k, d in SHAPES:
        g = torch.Generator().manual_seed(k + d)  # the same data as benchmarks/nearest_code.py
        x, e = torch.randn(args.n, d, generator=g), torch.randn(k, d, generator=g)
        flops = 2 * args.n * k * d
        et = e.t().contiguous()
        out32 = torch.empty(min(CHUNK, args.n), k)
        xb, etb = x.bfloat16(), et.bfloat16()
        out16 = torch.empty(min(CHUNK, args.n), k, dtype=torch.bfloat16)
        fns = {"fp32": lambda: chunked_mm(x, et, out32), "bf16": lambda: chunked_mm(xb, etb, out16)}
        if faiss is not None:
            index = faiss.IndexFlatL2(d)
            index.add(e.numpy())
            xn = x.numpy()
            fns["faiss"] = lambda: index.search(xn, 1)
        t = interleaved(fns, args.repeat)
        t32, t16 = t["fp32"], t["bf16"]
        # after the timings: this allocates large score blocks, which slowed faiss when timed right after it
        flagged_cs, flagged, wrong = certified_fraction(x[: args.flag_rows], e)
        row = [f"{args.n}x{k}x{d}", f"{flops / t32 / 1e9:.1f}", f"{flops / t16 / 1e9:.1f}", f"{t32 / t16:.2f}x"]
        if faiss is not None:
            tf = t["faiss"]
            faiss_time.append(tf)
            faiss_share.append(t32 / tf)
            need_share.append(1.5 * t32 / tf)
            row += [f"{100 * t32 / tf:.0f}%", f"{150 * t32 / tf:.0f}%"]
        proj = t32 / (t16 + flagged * t32)
        row += [f"{100 * flagged_cs:.1f}%", f"{100 * flagged:.1f}%", f"{100 * wrong:.2f}%", f"{proj:.2f}x"]
        if faiss is not None:
            vs_faiss.append(proj / faiss_share[-1])  # t_faiss / (t_bf16 + flagged x t_fp32)
            row.append(f"{vs_faiss[-1]:.2f}x")
        bf16_speed.append(t32 / t16)
        flagged_all.append(flagged)
        projected.append(proj)
        rows.append(row)
        print(" | ".join(row), flush=True)

    headers = ["N x K x D", "fp32 mm GFLOP/s", "bf16 mm GFLOP/s", "bf16 vs fp32"]
    if faiss is not None:
        headers += ["faiss k=1 of fp32 mm rate", "1.5x faiss needs"]
    headers += ["flagged (C-S bound)", "flagged (per pair)", "bf16 argmin wrong", "bf16 + fix-up vs fp32 (at best)"]
    if faiss is not None:
        headers += ["bf16 + fix-up vs faiss (at best)"]
    body = table(headers, rows)
    span = lambda v, f: f"{f(min(v))}-{f(max(v))}"  # noqa: E731
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    body += (f"\n\nfp32 square matmul (2048^3): {square / 1e9:.1f} GFLOP/s; {torch.get_num_threads()} threads; "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}; faiss-cpu {faiss_version or 'not installed'}. "
             f"mm rates are x @ e^T in {CHUNK}-row chunks (no argmin); bf16 mm is bf16 in and out; fp32 mm, bf16 mm "
             f"and faiss timed in turns, best of {args.repeat} rounds. Flagged rows "
             f"(first {min(args.flag_rows, args.n):,} rows per shape): scores from bf16-rounded operands with exact "
             f"products and fp32 accumulation (what a bf16 GEMM with fp32 output would give) cannot certify the "
             f"row's argmin, so the row needs an exact re-search over all K. C-S bound: the best/second gap within "
             f"twice a per-row Cauchy-Schwarz error bound (vqtok's fast GPU mode's test, with bf16's unit roundoff "
             f"2^-8). Per pair: some code j has s~_j - s~_best <= err_best + err_j, with err_k from sum_i |x_i e_ki| "
             f"(the tightest test these error terms allow). bf16 + fix-up at best = t_fp32 / (t_bf16 + flagged per "
             f"pair x t_fp32): optimistic, as it pairs the bf16-out mm's time with fp32-out scores. bf16 mm with "
             f"fp32 output on CPU (torch.mm(..., out_dtype=torch.float32)): {fp32_out}.\n")
    summary = []
    if faiss is not None:
        need_square = [1.5 * 2 * args.n * k * d / tf_ / square for (k, d), tf_ in zip(SHAPES, faiss_time)]
        summary.append(f"faiss k=1 runs at {span(faiss_share, pct)} of torch's fp32 mm rate on these shapes, so 1.5x "
                       f"faiss needs {span(need_share, pct)} of that rate"
                       + (" (more than torch's own fp32 matmul reaches on these shapes)" if min(need_share) > 1 else "")
                       + f", or {span(need_square, pct)} of the square-matmul rate")
    summary.append(f"bf16 mm is {span(bf16_speed, lambda v: f'{v:.2f}x')} the fp32 mm, but a certified bf16 search "
                   f"flags {' / '.join(pct(f) for f in flagged_all)} of the rows even under the per-pair bound "
                   f"({' / '.join(f'{k}x{d}' for k, d in SHAPES)}), and re-searching them exactly leaves at best "
                   f"{span(projected, lambda v: f'{v:.2f}x')} of the fp32 mm's speed"
                   + (f", {span(vs_faiss, lambda v: f'{v:.2f}x')} of faiss's (bar: 1.5x)" if vs_faiss else ""))
    body += "Summary: " + "; ".join(summary) + "."
    print(body)
    if not args.no_append:
        append_results("Nearest-code search on cpu: what 1.5x faiss would take, fp32 and bf16 "
                       "(benchmarks/nearest_code_bf16.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
