"""The GPU suite (issue 24): the gpu tests and every GPU figure in one command of about 8 minutes,
Ray-free, on a machine whose python3 has its own torch and triton (benchmarks/gpu_suite.sh sets up
the imports, then calls this):

    bash benchmarks/gpu_suite.sh --out DIR [--only PART,...] [--limit PART=SECONDS] [--budget SECONDS]
    bash benchmarks/gpu_suite.sh --out DIR --cpu-smoke        # every part's code, tiny, on the CPU

Parts, in order (benchmarks/gpu/, one module each): tests, kernel, encoders, train, sample,
tokenize. Each runs in a process group of its own under its own time limit (LIMITS; --limit
changes one): a part that hangs is killed there and the next one runs; the whole run stops within
--budget. After every part DIR holds
    suite.json     the machine (device, torch, date), each part's status, seconds and tables
    suite.md       the same as Markdown (also printed at the end)
    parts.tar.gz   each part's PART.md, PART.json and full log PART.log
(three files: the device machine hands back at most eight). `python benchmarks/gpu_report.py DIR`
appends the tables to benchmarks/RESULTS.md.

Without CUDA every part is skipped, with the reason. --cpu-smoke runs each part at tiny sizes on
the CPU (the Triton kernel under its interpreter; CUDA hidden): what CI runs through
tests/test_gpu_suite.py. Its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# seconds per part on an H200 (together about 8.5 minutes); the order is the run order
LIMITS = {"tests": 140, "kernel": 140, "encoders": 70, "train": 55, "sample": 45, "tokenize": 60}
BUDGET_S = 510  # the whole run: fits a device call of timeout_s 540 with the wheels' install
MIN_PART_S = 20  # a part given less than this is not started
GRACE_S = 5  # between SIGTERM and SIGKILL of a part's process group


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for suite.json, suite.md and parts.tar.gz")
    p.add_argument("--only", default="", help=f"comma-separated parts (default all: {','.join(LIMITS)})")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help="another time limit for one part (repeatable)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    p.add_argument("--cpu-smoke", action="store_true", help="each part tiny, on the CPU: checks code paths, not speed")
    p.add_argument("--run-part", help=argparse.SUPPRESS)  # the child: run this part in this process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_part:
        return run_part(args.run_part, args.work, args.limit_s, args.cpu_smoke)
    if args.out is None:
        p.error("--out DIR is required: the folder that receives suite.json, suite.md and parts.tar.gz")
    parts = select(args.only)
    limits = dict(LIMITS) | parse_limits(args.limit)
    return Suite(args.out, smoke=args.cpu_smoke).run(parts, limits, args.budget)


def select(only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(LIMITS)
    unknown = [n for n in names if n not in LIMITS]
    if unknown:
        raise SystemExit(f"--only {only}: no part named {', '.join(unknown)}; the parts are {', '.join(LIMITS)}")
    return [n for n in LIMITS if n in names]  # always in run order


def parse_limits(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in LIMITS or seconds <= 0:
            raise SystemExit(f"--limit {item}: expected PART=SECONDS with PART one of {', '.join(LIMITS)} and SECONDS > 0")
        out[name] = seconds
    return out


# ---------------------------------------------------------------------------------------------
# The parent: one process per part, the results gathered
# ---------------------------------------------------------------------------------------------
class Suite:
    def __init__(self, out: Path, *, smoke: bool):
        import torch

        sys.path.insert(0, str(HERE))
        from _common import machine

        self.out, self.smoke = out, smoke
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="vqtok-gpu-suite-"))
        self.cuda = torch.cuda.is_available() and not smoke
        self.record = {
            "suite": "vqtok GPU suite (benchmarks/gpu_suite.py)",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
            "torch": torch.__version__, "triton": _version("triton"), "python": platform.python_version(),
            "commit": _commit(), "smoke": smoke, "parts": {},
        }

    def run(self, parts: list[str], limits: dict[str, float], budget: float) -> int:
        end = time.monotonic() + budget
        for name in parts:
            left = end - time.monotonic()
            if not self.cuda and not self.smoke:
                self._done(name, {"status": "skipped", "reason": _no_cuda()}, 0.0, limits[name])
            elif left < (0 if self.smoke else MIN_PART_S):
                self._done(name, {"status": "not run", "reason": f"the suite's --budget {budget:.0f} s was spent "
                                                                 f"({left:.0f} s left)"}, 0.0, limits[name])
            else:
                self._run_one(name, min(limits[name], left))
        print("\n" + self.markdown(), flush=True)
        bad = [n for n, r in self.record["parts"].items() if r["status"] not in ("ok", "skipped")]
        return 1 if bad else 0

    def _run_one(self, name: str, limit: float) -> None:
        print(f"gpu suite: {name} (limit {limit:.0f} s) ...", flush=True)
        log = self.work / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # each autotuning's seconds and choice, in the part's log
        # Triton keeps compiled kernels and (cache_results) the autotuner's choices on disk. The tests
        # tune under load (pytest-xdist workers share the GPU) and at test sizes: their choices must
        # not become the benchmarks'. So the tests get a cache of their own; the measuring parts share
        # one that starts empty (the kernel part's first calls are a fresh install's).
        env["TRITON_CACHE_DIR"] = str(self.work / ("triton-tests" if name == "tests" else "triton"))
        if self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--work", str(self.work),
               "--limit-s", str(limit)] + (["--cpu-smoke"] if self.smoke else [])
        t0 = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, timed_out = proc.returncode, True
        seconds = time.monotonic() - t0
        result = _read_json(self.work / f"{name}.json") or {"status": "running", "tables": [], "notes": []}
        if timed_out:
            result["status"] = "timed out"
            result["reason"] = f"killed at its time limit of {limit:.0f} s; the rows above are what it measured by then"
        elif rc != 0:
            result["status"] = "failed"
            result["reason"] = f"exit {rc}: {_last_error(log)}"
        elif result["status"] == "running":
            result["status"], result["reason"] = "failed", "exited 0 without saying it finished"
        self._done(name, result, seconds, limit)

    def _done(self, name: str, result: dict, seconds: float, limit: float) -> None:
        result = {"title": name, "tables": [], "notes": [], "reason": ""} | result
        result |= {"seconds": round(seconds, 1), "limit_s": round(limit, 1)}
        self.record["parts"][name] = result
        print(f"gpu suite: {name}: {result['status']}{': ' + result['reason'] if result['reason'] else ''} "
              f"({seconds:.0f} s)", flush=True)
        self._write()

    def _write(self) -> None:
        _atomic(self.out / "suite.json", json.dumps(self.record, indent=1))
        _atomic(self.out / "suite.md", self.markdown())
        tmp = self.out / "parts.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(self.work.iterdir()):
                if f.suffix in (".json", ".md", ".log"):
                    tar.add(f, arcname=f"parts/{f.name}")
        os.replace(tmp, self.out / "parts.tar.gz")

    def markdown(self) -> str:
        return suite_markdown(self.record)


def status_table(record: dict) -> str:
    """Each part's status, reason, seconds and limit (Markdown)."""
    from _common import table

    rows = [[n, p["status"], p["reason"], f"{p['seconds']:.0f}", f"{p['limit_s']:.0f}"] for n, p in record["parts"].items()]
    return table(["part", "status", "reason", "s", "limit s"], rows)


def suite_markdown(record: dict) -> str:
    """A run's record (suite.json) as Markdown: the statuses, then each part's tables."""
    from gpu.common import part_markdown

    r = record
    head = [f"# {r['suite']}{' (CPU smoke run: no figure here means anything)' if r['smoke'] else ''}", "",
            f"{r['date']}; {r['machine']}; triton {r['triton']}; commit {r['commit']}", ""]
    out = head + [status_table(r), ""]
    for name, p in r["parts"].items():
        if p["tables"] or p["notes"]:
            out += [f"## {name}: {p['title']}", "", part_markdown(p)]
    return "\n".join(out)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (pytest, decode workers, compile workers), SIGKILL to what
    is left of it GRACE_S later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, timeout=10)
        return r.stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def _no_cuda() -> str:
    from gpu.common import NO_CUDA

    return NO_CUDA


# ---------------------------------------------------------------------------------------------
# The child: one part in this process
# ---------------------------------------------------------------------------------------------
def run_part(name: str, work: Path, limit_s: float, smoke: bool) -> int:
    from gpu.common import Part, Skipped

    module = importlib.import_module(f"gpu.{name}")
    part = Part(name, module.TITLE, work, smoke=smoke, limit_s=limit_s)
    part.save()
    try:
        module.run(part)
    except Skipped as e:
        part.status, part.reason = "skipped", str(e)
        part.save()
        return 0
    except BaseException:
        traceback.print_exc()
        part.save()
        return 1
    if part.status == "running":
        part.status = "ok"
    part.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
