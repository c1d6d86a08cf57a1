"""The `gpu`-marked tests on the machine's own torch (`python -m pytest -m gpu`), from the test files
that hold them (GPU_TEST_FILES: the other test files import packages a GPU machine may lack, such
as Ray), in WORKERS processes where pytest-xdist is installed: the first call of the Triton kernel
for each shape class compiles and autotunes its configurations, one core each, which dominates.
One row per test: its outcome and seconds. A smoke run only collects them, which still imports
every module they need."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import NO_CUDA, Part

TITLE = "gpu tests (pytest -m gpu) on the machine's torch"
REPO = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_kernels.py"]  # tests/test_gpu_suite.py checks this list
TEST_TIMEOUT_S = 120  # one test, when pytest-timeout is there
WORKERS = 4  # pytest-xdist processes, when it is there (the tests' first kernel calls compile and autotune)


def run(part: Part) -> None:
    if part.smoke:
        return collect(part)
    import torch

    if not torch.cuda.is_available():
        part.skip(NO_CUDA)
    junit = part.work / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *GPU_TEST_FILES]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append(f"--timeout={TEST_TIMEOUT_S}")
    if importlib.util.find_spec("xdist"):  # Triton compiles each kernel configuration on one core: spread them
        cmd += ["-n", str(WORKERS)]
    proc = subprocess.run(cmd, cwd=REPO)  # its output goes to this part's log
    t = part.table("gpu tests", ["test", "outcome", "s", "message"])
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
    t.note(", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) + f" (pytest exit {proc.returncode})")
    if proc.returncode != 0:
        part.status, part.reason = "failed", f"pytest exit {proc.returncode}: {outcomes}"


def collect(part: Part) -> None:
    """Collect only: every gpu test's module imports, and the tests are found."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *GPU_TEST_FILES], cwd=REPO, capture_output=True, text=True)
    print(proc.stdout, proc.stderr, flush=True)
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    t = part.table("gpu tests, collected only (smoke)", ["test", "outcome"])
    for test_id in ids:
        t.add(test_id, "collected")
    t.note(f"{len(ids)} gpu tests collected (pytest exit {proc.returncode})")
    if proc.returncode != 0 or not ids:
        part.status, part.reason = "failed", f"collecting the gpu tests failed (pytest exit {proc.returncode})"
