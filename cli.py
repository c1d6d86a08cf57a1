"""The `vqtok` command: argument parsing only; every subcommand calls the Python API.

Each job module (jobs/*.py) declares its COMMAND: name, help, config dataclass and function. The
flags come from the config's fields (jobs/options.py), so they are written nowhere else.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .jobs import caption, decode_sequence, demo, eval_vqvae, export_lm, import_tokenizer, run, sample, tokenize
from .jobs import train_prior, train_text_tokenizer, train_vqvae
from .jobs.options import Command, run_command
from .models.bundle import vqtok_version
from .models.config import Config, option


@dataclass(kw_only=True)
class InspectOptions(Config):
    WHAT = "inspect"
    path: str = option(help="token dataset directory or URL (the --out of vqtok tokenize)", positional=True)
    rows: int = option(5, "rows to show")
    verify: bool = option(False, "re-hash every part against the manifest")
    files: bool = option(False, "print only the committed parts' URLs, one per line: what readers outside vqtok "
                                "(pyarrow, Ray Data, Hugging Face datasets) should read")


def inspect(opts: InspectOptions) -> int:
    from .pipeline.token_dataset import TokenDataset

    ds = TokenDataset(opts.path)
    if opts.files:
        print("\n".join(ds.urls()))
        return 0
    print(ds.describe(rows=opts.rows))
    if opts.verify:
        problems = ds.verify()
        print("verify: " + ("all parts match the manifest" if not problems else "; ".join(problems)))
        return 1 if problems else 0
    return 0


@dataclass(kw_only=True)
class ConvertOptions(Config):
    WHAT = "convert"
    src: list[str] = option(help="IDX images file, image folder, tar shards, or URL patterns", positional=True, factory=list)
    out: str = option(help="output directory (local or any fsspec URL)", positional=True)
    shard_size: int = option(10_000, "images per shard")
    prefix: str = option("shard", "shard file name prefix")


def convert(opts: ConvertOptions) -> int:
    from .pipeline.convert import convert

    convert(opts.src, opts.out, shard_size=opts.shard_size, prefix=opts.prefix)
    return 0


COMMANDS = [
    demo.COMMAND, run.COMMAND, train_vqvae.COMMAND, import_tokenizer.COMMAND, eval_vqvae.COMMAND, tokenize.COMMAND,
    train_prior.COMMAND, sample.COMMAND, caption.COMMAND,
    train_text_tokenizer.COMMAND, decode_sequence.COMMAND,
    export_lm.COMMAND,
    Command("inspect", "summary, schema metadata and a few rows of a token dataset", InspectOptions, inspect,
            config_file=False),
    Command("convert", "write WebDataset shards (KEY.png, KEY.cls) from IDX files or an image folder", ConvertOptions,
            convert, config_file=False),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqtok", description="Image tokenization at corpus scale.")
    p.add_argument("--version", action="version", version=f"vqtok {vqtok_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(sub.add_parser(command.name, help=command.help, description=command.help))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
