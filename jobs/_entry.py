"""Running a job from a command line: `vqtok COMMAND` and `python -m vqtok.jobs.MODULE` report
errors the same way (the message, exit status 2; 130 on Ctrl-C with a hint to resume)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..pipeline.errors import ConfigError, DataError


def run_command(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"vqtok {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vqtok {command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def job_main(command: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """`python -m vqtok.jobs.MODULE`: the same arguments as `vqtok COMMAND`."""
    p = argparse.ArgumentParser(prog=f"python -m vqtok.jobs.{command.replace('-', '_')}", description=description)
    add_arguments(p)
    return run_command(command, run, p.parse_args(argv))
