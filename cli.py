"""The `vqtok` command: argument parsing only; every subcommand calls the Python API."""
from __future__ import annotations

import argparse
import sys

from .jobs import demo, eval_vqvae, sample, tokenize, train_prior, train_vqvae
from .jobs._entry import run_command


def _run_pipeline(args) -> int:
    from .jobs.workflow import Pipeline, PipelineConfig

    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    Pipeline(PipelineConfig.load(args.config)).run(stages, force=args.force)
    return 0


def _convert(args) -> int:
    from .pipeline.convert import convert

    convert(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix)
    return 0


def _inspect(args) -> int:
    from .pipeline.tokens import TokenDataset

    ds = TokenDataset(args.path)
    print(ds.describe(rows=args.rows))
    if args.verify:
        problems = ds.verify()
        print("verify: " + ("all parts match the manifest" if not problems else "; ".join(problems)))
        return 1 if problems else 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="vqtok", description="Image tokenization at corpus scale.")
    p.add_argument("--version", action="version", version=f"vqtok {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole path on the bundled sample: tokenizer, tokens, prior, samples")
    demo.add_arguments(d)
    d.set_defaults(func=demo.run_from_args)

    r = sub.add_parser("run", help="run a pipeline config (YAML/JSON): train, tokenize, train-prior, sample")
    r.add_argument("config", help="a pipeline config file (see examples/)")
    r.add_argument("--stages", help="comma-separated stages to run (default: all; done ones are skipped)")
    r.add_argument("--force", action="store_true", help="re-run stages whose output exists")
    r.set_defaults(func=_run_pipeline)

    t = sub.add_parser("train-vqvae", help="train a VQ-VAE tokenizer")
    train_vqvae.add_arguments(t)
    t.set_defaults(func=train_vqvae.run_from_args)

    e = sub.add_parser("eval-vqvae", help="held-out metrics and reconstructions for a tokenizer")
    eval_vqvae.add_arguments(e)
    e.set_defaults(func=eval_vqvae.run_from_args)

    k = sub.add_parser("tokenize", help="tokenize images into a Parquet token dataset (Ray Data)")
    tokenize.add_arguments(k)
    k.set_defaults(func=tokenize.run_from_args)

    tp = sub.add_parser("train-prior", help="train an autoregressive prior (GPT) on a token dataset")
    train_prior.add_arguments(tp)
    tp.set_defaults(func=train_prior.run_from_args)

    sp = sub.add_parser("sample", help="sample images from a trained prior")
    sample.add_arguments(sp)
    sp.set_defaults(func=sample.run_from_args)

    i = sub.add_parser("inspect", help="summary, schema metadata and a few rows of a token dataset")
    i.add_argument("path", help="token dataset directory or URL (the --out of vqtok tokenize)")
    i.add_argument("--rows", type=int, default=5, help="rows to show (default 5)")
    i.add_argument("--verify", action="store_true", help="re-hash every part against the manifest")
    i.set_defaults(func=_inspect)

    c = sub.add_parser("convert", help="write WebDataset shards (KEY.png, KEY.cls) from IDX files or an image folder")
    c.add_argument("src", nargs="+", help="IDX images file, image folder, tar shards, or URL patterns")
    c.add_argument("out", help="output directory (local or any fsspec URL)")
    c.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    c.add_argument("--prefix", default="shard", help="shard file name prefix")
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
