"""Command lines and config files, generated from the config dataclasses (models/config.py).

    add_options(parser, TrainConfig)          # one flag per field: --steps, --lr, ...; nested model
                                              # fields flattened (--codebook-size); --config FILE
    cfg = config_from_args(TrainConfig, args) # the file's values, then the flags given, validated

A field's flag is `--field-name` unless its option() names another (`--class` for `classes`);
booleans get `--name` and `--no-name`; list fields are repeatable (and comma-separable);
`positional=True` fields are positional arguments. Only flags actually given override the file, so
a default is written once, on its field.

Why not tyro, jsonargparse or simple-parsing: each would generate the parser from the same
dataclasses, but every one of them changes the flags users already type (nested configs become
`--model.codebook-size`; append-and-comma lists, `--no-kmeans-init`, `--class` need per-field
overrides in each library's own annotation language), and each adds dependencies to a pinned
install. The mapping vqtok needs is the ~100 lines below, over fields that carry their help text.

The entry points: `vqtok COMMAND` and `python -m vqtok.jobs.MODULE` both build their parser with
add_command/job_main and report errors through run_command (the message, exit status 2; 130 on
Ctrl-C with a hint to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.config import Config, ConfigError, nested_config
from ..pipeline.errors import DataError

CONFIG_FLAG = "config"


def add_options(parser: argparse.ArgumentParser, cls: type[Config], *, config_file: bool = True,
                _prefix: str = "") -> None:
    """One command-line option per field of `cls` (nested configs' fields flattened)."""
    hints = cls.field_types()
    # in --help: the job's own options first (its inputs), then those it shares with other jobs
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):
        md = f.metadata
        if not md.get("cli", True) or not md.get("help"):
            sub = nested_config(hints[f.name])
            if sub is not None:
                add_options(parser, sub, config_file=False, _prefix=f"{_prefix}{f.name}.")
            continue
        dest = _prefix + f.name
        base, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" (default {default})" if default is not None and default != "" and not isinstance(default, bool) else ""
        text = md["help"] + shown
        if md.get("positional"):
            parser.add_argument(dest, nargs="+" if is_list else None, help=text, metavar=md.get("metavar") or f.name.upper())
            continue
        names = [md.get("flag") or "--" + f.name.replace("_", "-"), *md.get("aliases", ())]
        kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=text, metavar=f.name.upper())
        if md.get("metavar"):
            kwargs["metavar"] = md["metavar"]
        if base is bool:
            kwargs.pop("metavar")
            parser.add_argument(*names, action=argparse.BooleanOptionalAction,
                                **kwargs | {"help": text + (" (default: on)" if default else " (default: off)")})
        elif is_list:
            parser.add_argument(*names, action="append", type=str, **kwargs)
        else:
            parser.add_argument(*names, type=base, **kwargs)
    if config_file:
        parser.add_argument("--" + CONFIG_FLAG, dest=CONFIG_FLAG, default=None,
                            help="a JSON or YAML file of options (flags given here override it)")


def _base_type(tp) -> tuple[type, bool]:
    """(the argparse type, is it a list) for a field type: int | None -> int, list[str] -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)  # str | int | None: parsed as str
    if origin in (list, tuple):
        return str, True
    return tp, False


def config_from_args(cls: type[Config], args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> Config:
    """The config file's values (--config), the flags given on top, then the dataclass validates."""
    path = getattr(args, CONFIG_FLAG, None)
    values = dict(load_config_file(path)) if path else {}
    for dest, value in vars(args).items():
        if dest in (CONFIG_FLAG, "command", "func", *skip):
            continue
        section, _, name = dest.rpartition(".")
        if section:  # a nested config's field: model.codebook_size
            values[section] = dict(values.get(section) or {}) | {name: value}
        else:
            values[dest] = value
    return cls.from_dict(values)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config {path}: cannot parse ({e}); use JSON (.json) or YAML (.yaml)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values at the top level")
    return data


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Command:
    """A `vqtok` subcommand: its name, one-line help, config class and the function it calls."""

    name: str
    help: str
    config: type[Config]
    run: Callable[[Any], Any]
    config_file: bool = True  # does it take --config FILE

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        add_options(parser, self.config, config_file=self.config_file)
        parser.set_defaults(func=self.call)

    def call(self, args: argparse.Namespace) -> int:
        result = self.run(config_from_args(self.config, args))
        return result if isinstance(result, int) else 0


def run_command(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"vqtok {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vqtok {command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def job_main(command: Command, argv: list[str] | None = None) -> int:
    """`python -m vqtok.jobs.MODULE`: the same arguments as `vqtok COMMAND`."""
    p = argparse.ArgumentParser(prog=f"python -m vqtok.jobs.{command.name.replace('-', '_')}", description=command.help)
    command.add_to(p)
    return run_command(command.name, command.call, p.parse_args(argv))
