"""The `gpu`-marked tests on the machine's own torch (`python -m pytest -m gpu`), from the test files
that hold them (GPU_TEST_FILES: the other test files import packages a GPU machine may lack, such
as Ray), in WORKERS processes where pytest-xdist is installed: the first call of the Triton kernel
for each shape class compiles and autotunes its configurations, one core each, which dominates.
One row per test: its outcome and seconds. In a smoke run (CUDA hidden) every test is skipped,
after its module imported everything it needs."""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import NO_CUDA, Part

TITLE = "gpu tests (pytest -m gpu) on the machine's torch"
REPO = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_kernels.py"]  # tests/test_gpu_suite.py checks this list
TEST_TIMEOUT_S = 120  # one test, when pytest-timeout is there
INTERRUPT_S = 20  # pytest is stopped this long before the part's limit, so that its report is written
WORKERS = 4  # pytest-xdist processes, when it is there (the tests' first kernel calls compile and autotune)


def run(part: Part) -> None:
    import torch

    if not part.smoke and not torch.cuda.is_available():
        part.skip(NO_CUDA)
    junit = part.work / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *GPU_TEST_FILES]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append(f"--timeout={TEST_TIMEOUT_S}")
    if importlib.util.find_spec("xdist"):  # Triton compiles each kernel configuration on one core: spread them
        cmd += ["-n", str(WORKERS)]
    rc, interrupted = pytest(cmd, part)
    t = part.table("gpu tests", ["test", "outcome", "s", "message"])
    if not junit.exists():
        part.status, part.reason = "failed", f"pytest (exit {rc}) wrote no report: see tests.log in parts.tar.gz"
        return
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                message = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        t.add(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", outcome,
              f"{float(case.get('time', 0)):.1f}", message.replace("|", "/"))
    t.note(", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) + f" (pytest exit {rc})"
           + ("; interrupted at the part's time limit: the tests not listed did not run" if interrupted else ""))
    if rc != 0:
        part.status, part.reason = "failed", f"pytest exit {rc}: {outcomes}" + (" (interrupted)" if interrupted else "")


def pytest(cmd: list[str], part: Part) -> tuple[int, bool]:
    """(exit status, interrupted): pytest is interrupted (SIGINT, as Ctrl-C: it still writes its
    report) INTERRUPT_S before the part's time limit, and killed if it has not stopped 10 s later."""
    proc = subprocess.Popen(cmd, cwd=REPO)  # its output goes to this part's log
    try:
        return proc.wait(timeout=max(5.0, part.left() - INTERRUPT_S)), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=10), True
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(), True
