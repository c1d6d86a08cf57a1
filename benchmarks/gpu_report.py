"""Append a GPU suite run's tables (benchmarks/gpu_suite.py --out DIR) to benchmarks/RESULTS.md: one
section with the parts' statuses, then one section per part with tables. The date and the machine
(device, torch, CPU) are the run's own, read from DIR/suite.json, not this machine's.

    python benchmarks/gpu_report.py DIR [--dry-run] [--results PATH]

A CPU smoke run (--cpu-smoke) is refused for benchmarks/RESULTS.md: its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, append_results  # noqa: E402
from gpu.common import part_markdown  # noqa: E402
from gpu_suite import status_table  # noqa: E402


def sections(record: dict) -> list[tuple[str, str]]:
    """(title, body) of each section to append: the run's statuses first, then each part with rows."""
    parts = record["parts"]
    out = [(f"GPU suite on {record['device']} (benchmarks/gpu_suite.py)",
            f"{status_table(record)}\n\ntriton {record['triton']}; commit {record['commit']}; the tables follow, one section a part")]
    for name, p in parts.items():
        if p["tables"] or p["notes"]:
            late = "" if p["status"] == "ok" else f"\n\nThis part's status: {p['status']} ({p['reason']})."
            out.append((f"GPU suite, {name}: {p['title']} (benchmarks/gpu_suite.py --only {name})",
                        part_markdown(p).rstrip() + late))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="the suite's --out folder (holding suite.json)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the file to append to (default benchmarks/RESULTS.md)")
    p.add_argument("--dry-run", action="store_true", help="print what would be appended, append nothing")
    args = p.parse_args(argv)
    try:
        record = json.loads((args.dir / "suite.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"{args.dir}/suite.json does not exist: give the folder passed to gpu_suite.sh --out") from None
    if record.get("smoke") and args.results.resolve() == RESULTS.resolve() and not args.dry_run:
        raise SystemExit(f"{args.dir} holds a CPU smoke run (--cpu-smoke), whose figures mean nothing: not appended to "
                         f"{RESULTS} (use --results PATH or --dry-run to look at it)")
    for title, body in sections(record):
        if args.dry_run:
            print(f"\n## {title}\n{record['date']}; {record['machine']}\n\n{body}")
        else:
            append_results(title, body, when=record["date"], where=record["machine"], path=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
