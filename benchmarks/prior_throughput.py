"""Prior training throughput: the Parquet reader vs the same tokens already in memory.

Side by side in one process, alternating rounds (A B A B ...) so drift hits both:
  in memory:  every token grid in one tensor, batches drawn by a random permutation
  Parquet:    what `vqtok train-prior` does: TokenStream (streaming parts, shuffle buffer) behind
              the prefetch thread
Both run the job's training step (Prior.loss, backward, clip, AdamW) at the same batch size, and
the reader alone is timed too (rows/s with no model), to show how far it is from being the
bottleneck. Bar (from the prior issue): Parquet tokens/s within 10% of in memory.

    python benchmarks/prior_throughput.py [--tokens benchmarks/out/prior/tokens-train] [--steps 150]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table  # noqa: E402

from vqtok import Prior, PriorConfig, TokenDataset  # noqa: E402
from vqtok.jobs.trainer import prefetch  # noqa: E402
from vqtok.pipeline.sharded_stream import TokenStream  # noqa: E402
from vqtok.pipeline.token_dataset import TokenCorpus  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="benchmarks/out/prior/tokens-train",
                   help="a token dataset (benchmarks/prior_quality.py writes this one)")
    p.add_argument("--steps", type=int, default=150, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    if not Path(args.tokens, "_manifest.json").is_file():
        print(f"no token dataset at {args.tokens}: run benchmarks/prior_quality.py first, or pass --tokens")
        return 2
    corpus = TokenCorpus([args.tokens])
    h, w = corpus.grid
    num_classes = corpus.stats(max_rows=100_000).max_label + 1
    torch.manual_seed(0)
    prior = Prior(PriorConfig(codebook_size=corpus.codebook_size, grid_h=h, grid_w=w, num_classes=num_classes,
                              n_layer=args.n_layer, n_embd=args.n_embd)).to(args.device)
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    bf16 = args.device.startswith("cuda")

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = prior.loss(tokens.to(args.device, non_blocking=True), labels.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()

    t0 = time.time()
    all_tokens, all_labels = TokenDataset(args.tokens).to_torch()
    load_s = time.time() - t0
    mem_mib = all_tokens.numel() * all_tokens.element_size() / 2**20

    def in_memory():
        g = torch.Generator().manual_seed(0)
        while True:
            perm = torch.randperm(len(all_labels), generator=g)
            for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
                idx = perm[i:i + args.batch_size]
                yield all_tokens[idx], all_labels[idx]

    def parquet():
        stream = TokenStream(corpus.parts, corpus.grid, seed=0)
        return ((b.tokens, b.labels) for b in prefetch(stream.batches(args.batch_size)))

    def timed(source) -> float:
        it = source()
        for _ in range(10):  # warm-up: first batches, allocator, thread start
            step(*next(it))
        if bf16:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step(*next(it))
        if bf16:
            torch.cuda.synchronize()
        it.close()
        return args.steps * args.batch_size * h * w / (time.perf_counter() - t)

    rates = {"in memory": [], "Parquet (TokenStream)": []}
    for r in range(args.rounds):
        for name, src in (("in memory", in_memory), ("Parquet (TokenStream)", parquet)):
            rates[name].append(timed(src))
            print(f"round {r + 1}: {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    # the reader alone
    stream = TokenStream(corpus.parts, corpus.grid, seed=0)
    it = stream.batches(args.batch_size)
    t = time.perf_counter()
    n = 0
    while n < 200_000:
        n += len(next(it).labels)
    reader_tok_s = n * h * w / (time.perf_counter() - t)

    mem, pq = (sorted(v)[len(v) // 2] for v in rates.values())
    rows = [
        ["in memory (all tokens in one tensor)", f"{mem:,.0f}", "1.00x"],
        ["Parquet reader (TokenStream + prefetch)", f"{pq:,.0f}", f"{pq / mem:.2f}x"],
        ["reader alone, no model", f"{reader_tok_s:,.0f}", f"{reader_tok_s / mem:.0f}x"],
    ]
    body = table(["training data path", "tokens/s (median of rounds)", "vs in memory"], rows)
    body += (f"\n\n{corpus.num_rows:,} grids ({h}x{w}, K={corpus.codebook_size}) from {args.tokens}; prior "
             f"{args.n_layer} layers x {args.n_embd}, batch {args.batch_size}, {args.rounds} alternating rounds of "
             f"{args.steps} steps on {args.device}. Loading the whole dataset into memory took {load_s:.1f}s "
             f"({mem_mib:.0f} MiB); the reader holds one record batch and its shuffle buffer.\n")
    ok = pq >= 0.9 * mem
    body += f"Bar: Parquet within 10% of in memory {'PASS' if ok else 'FAIL'} ({pq / mem:.3f})"
    print(body)
    if not args.no_append:
        append_results("Prior training throughput (benchmarks/prior_throughput.py)", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
