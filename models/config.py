"""Configs: one dataclass per job and per model, each field with its default and its help text.

    @dataclass(kw_only=True)
    class SampleConfig(Config):
        WHAT = "sample config"
        n: int = option(64, "samples")
        classes: str | None = option(None, "class C, a list C1,C2, 'all' or 'none'", flag="--class")

    cfg = SampleConfig.from_dict({"n": 16})      # nested configs from nested dicts
    cfg.to_dict()                                # plain JSON-able values, saved next to outputs

Everything about an option is written once, on its field: the default, the help text, the flag
name when it is not `--field-name`. jobs/options.py turns these fields into command-line flags and
reads YAML/JSON files into the same dataclasses; validation lives in each config's
`__post_init__`, so a config is valid whichever way it was built (flags, file, Python).

One policy for unknown keys everywhere: ConfigError naming the unknown and the known ones.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the option, the value and the fix."""


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, flag: str | None = None,
           aliases: tuple[str, ...] = (), metavar: str | None = None, cli: bool = True, positional: bool = False):
    """A config field: its default (or `factory` for lists), its help text and, when they differ
    from `--field-name`, its flag and aliases. cli=False keeps a field out of the command line;
    positional=True makes it a positional argument."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "metavar": metavar, "cli": cli,
            "positional": positional}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


class Config:
    """Base of every config dataclass: from_dict (strict), to_dict, field types."""

    WHAT = "config"  # how error messages name this config

    @classmethod
    def known_keys(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_keys(cls, d: dict, where: str | None = None) -> None:
        unknown = sorted(set(d) - set(cls.known_keys()))
        if unknown:
            raise ConfigError(f"{where or cls.WHAT}: unknown option(s) {unknown}; known: {cls.known_keys()}")

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """Build from a mapping (a config file, a pipeline section); nested configs from nested
        mappings. Unknown keys and wrong shapes are ConfigErrors that name them."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where or cls.WHAT}: expected a mapping of option names to values, got {d!r}")
        cls.check_keys(d, where)
        values = dict(d)
        types = cls.field_types()
        for name, value in d.items():
            sub = nested_config(types[name])
            if sub is not None and isinstance(value, dict):
                values[name] = sub.from_dict(value, where=name)
        try:
            return cls(**values)
        except TypeError as e:  # a required option left out
            raise ConfigError(f"{where or cls.WHAT}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def nested_config(tp) -> type[Config] | None:
    """The Config class a field holds (TrainConfig.model -> VQVAEConfig), else None."""
    return tp if isinstance(tp, type) and issubclass(tp, Config) else None
