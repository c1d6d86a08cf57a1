"""What every part of the GPU suite shares: its output (tables saved as they fill, so a part stopped
at its time limit still leaves what it measured), its clock, and timing on the device.

    part = Part("kernel", TITLE, work_dir, smoke=False, limit_s=140)
    t = part.table("Per shape", ["N x K x D", "ms"])
    t.add("65536x8192x256", f"{seconds(part, fn) * 1e3:.2f}")   # written to WORK/kernel.{json,md} at once
    part.note("...")

A smoke run (--cpu-smoke) runs the same code on the CPU at tiny sizes, each timed call once: its
figures mean nothing and are labelled so; it exists so that CI catches a part that broke.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from _common import table as markdown_table

NO_CUDA = ("no CUDA device here (torch.cuda.is_available() is False): this part measures a GPU; run the suite on "
           "one, or with --cpu-smoke to check its code path on the CPU")


class Skipped(Exception):
    """Raised by Part.skip: the part cannot run here, for the reason given."""


@dataclass
class Table:
    title: str
    headers: list[str]
    part: Part
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"table {self.title!r}: {len(cells)} cells for {len(self.headers)} columns "
                             f"({', '.join(self.headers)})")
        self.rows.append([str(c) for c in cells])
        self.part.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.part.save()

    def to_dict(self) -> dict:
        return {"title": self.title, "headers": self.headers, "rows": self.rows, "notes": self.notes}


class Part:
    def __init__(self, name: str, title: str, work: Path, *, smoke: bool, limit_s: float):
        self.name, self.title, self.work, self.smoke = name, title, Path(work), smoke
        self.device = "cpu" if smoke else "cuda"
        self.deadline = time.monotonic() + limit_s
        self.status, self.reason = "running", ""
        self.tables: list[Table] = []
        self.notes: list[str] = []

    # --- the clock ----------------------------------------------------------------------------
    def left(self) -> float:
        """Seconds until the suite kills this part."""
        return self.deadline - time.monotonic()

    def has_time(self, seconds: float, what: str) -> bool:
        """Whether `seconds` more fit; if not, says what was left out (smoke runs always go on)."""
        if self.smoke or self.left() > seconds:
            return True
        self.note(f"{what}: not measured, {self.left():.0f} s of this part's time limit left (needs about {seconds:.0f})")
        return False

    # --- output -------------------------------------------------------------------------------
    def table(self, title: str, headers: list[str]) -> Table:
        t = Table(title, headers, self)
        self.tables.append(t)
        self.save()
        return t

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.save()

    def skip(self, reason: str):
        raise Skipped(reason)

    def to_dict(self) -> dict:
        return {"part": self.name, "title": self.title, "status": self.status, "reason": self.reason,
                "smoke": self.smoke, "tables": [t.to_dict() for t in self.tables], "notes": self.notes}

    def save(self) -> None:
        """WORK/NAME.json and WORK/NAME.md, replaced whole (never half written)."""
        for suffix, text in ((".json", json.dumps(self.to_dict(), indent=1)), (".md", part_markdown(self.to_dict()))):
            path = self.work / f"{self.name}{suffix}"
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def part_markdown(d: dict) -> str:
    """A part's tables and notes (Part.to_dict) as Markdown."""
    out = []
    for t in d["tables"]:
        out += [f"**{t['title']}**", "", markdown_table(t["headers"], t["rows"]) if t["rows"] else "(no rows)", ""]
        out += [f"- {n}" for n in t["notes"]] + ([""] if t["notes"] else [])
    out += [f"- {n}" for n in d["notes"]]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def seconds(part: Part, fn, *, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() after `warmup` calls, on CUDA between events once the device is idle.
    A smoke run calls fn once and returns that call's wall time (not a measurement)."""
    if part.smoke:
        t0 = time.perf_counter()
        fn()
        return max(time.perf_counter() - t0, 1e-9)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall(part: Part, fn) -> tuple[float, object]:
    """(seconds, result) of one call, the device synchronized before and after: for first calls
    (compilation, autotuning) and whole runs."""
    sync = torch.cuda.synchronize if part.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


def rate(x: float) -> str:
    """12,345 / 123 / 4.6 / 0.35"""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
