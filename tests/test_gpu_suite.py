"""The GPU suite's CPU path (benchmarks/gpu_suite.sh --cpu-smoke): the suite runs on a lent GPU once
in a while, with no time to fix it there, so CI runs every part's code at tiny sizes on the CPU, as
the GPU machine would run it: vqtok imported from the checkout (not the installed package), the
carried wheels installed by the script, and the packages that machine lacks (Ray, ...) made
unimportable. Also: CUDA parts skip with the reason, --only and --limit, a part killed at its time
limit while the next one still runs, what travels is small, and the report's appending."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO

SUITE_SH = REPO / "benchmarks" / "gpu_suite.sh"
WHEELS = REPO / "benchmarks" / "gpu_wheels"
PARTS = ["tests", "kernel", "encoders", "train", "sample", "tokenize"]
# not on the GPU machine; braceexpand arrives as a carried wheel
ABSENT = ("ray", "webdataset", "braceexpand", "moto", "s3fs", "datasets", "faiss", "vector_quantize_pytorch")


@pytest.fixture(scope="module")
def absent(tmp_path_factory) -> Path:
    """A PYTHONPATH folder in which the packages the GPU machine lacks fail to import."""
    folder = tmp_path_factory.mktemp("absent")
    for name in ABSENT:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    return folder


def suite(out: Path, *args: str, absent: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(absent))
    return subprocess.run(["bash", str(SUITE_SH), "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, absent) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke") / "gpu"
    return out, suite(out, "--cpu-smoke", absent=absent)


def test_the_cpu_smoke_run_goes_through_every_part_and_writes_its_tables(smoke):
    out, r = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((out / "suite.json").read_text())
    assert record["smoke"] and list(record["parts"]) == PARTS
    for name, part in record["parts"].items():
        assert part["status"] == "ok", (name, part["reason"])
        assert part["tables"] and all(t["rows"] for t in part["tables"]), name
    md = (out / "suite.md").read_text()
    assert all(f"## {name}: {part['title']}" in md for name, part in record["parts"].items())
    assert "CPU smoke run" in md and md.strip() in r.stdout  # printed at the end too
    with tarfile.open(out / "parts.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"parts/{p}{s}" for p in PARTS for s in (".md", ".json", ".log")} <= names
    assert sorted(f.name for f in out.iterdir()) == ["parts.tar.gz", "suite.json", "suite.md"]  # the device returns 8 files
    tests = record["parts"]["tests"]["tables"][0]
    assert len(tests["rows"]) >= 11 and all(row[1] == "skipped" for row in tests["rows"])  # no CUDA in a smoke run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_every_part_is_skipped_with_the_reason(tmp_path, absent):
    r = suite(tmp_path / "gpu", "--only", "kernel,tokenize", absent=absent)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu" / "suite.json").read_text())["parts"]
    assert list(parts) == ["kernel", "tokenize"]
    for part in parts.values():
        assert part["status"] == "skipped" and "no CUDA device" in part["reason"] and "--cpu-smoke" in part["reason"]
    assert "no CUDA device" in r.stdout


def test_a_part_past_its_time_limit_is_killed_and_the_next_part_still_runs(tmp_path, absent):
    r = suite(tmp_path / "gpu", "--cpu-smoke", "--only", "sample,train", "--limit", "train=1", absent=absent)
    assert r.returncode == 1  # a part did not finish
    parts = json.loads((tmp_path / "gpu" / "suite.json").read_text())["parts"]
    assert list(parts) == ["train", "sample"]  # --only, in the suite's order
    assert parts["train"]["status"] == "timed out" and "time limit of 1 s" in parts["train"]["reason"]
    assert parts["train"]["seconds"] < 15
    assert parts["sample"]["status"] == "ok" and parts["sample"]["tables"][0]["rows"]


def test_bad_arguments_name_the_problem(tmp_path, absent):
    r = suite(tmp_path / "gpu", "--only", "kernal", absent=absent)
    assert r.returncode != 0 and "no part named kernal" in r.stderr and "tokenize" in r.stderr
    r = suite(tmp_path / "gpu", "--limit", "kernel=soon", absent=absent)
    assert r.returncode != 0 and "--limit kernel=soon" in r.stderr


def test_what_travels_is_small_and_pinned():
    """The wheels carried to the GPU machine: pure Python, the lock file's versions, under 1 MiB."""
    wheels = sorted(WHEELS.glob("*.whl"))
    assert wheels and sum(w.stat().st_size for w in wheels) < 1 << 20
    lock = (REPO / "requirements-lock.txt").read_text().lower()
    for w in wheels:
        name, version = w.name.split("-")[:2]
        assert w.name.endswith("-none-any.whl"), f"{w.name}: not pure Python, it would not install on another machine"
        assert f"\n{name.lower()}=={version}\n" in f"\n{lock}", f"{w.name}: not the version requirements-lock.txt pins"


def test_every_test_file_with_gpu_tests_is_in_the_suite():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu.tests import GPU_TEST_FILES

    marked = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                    if re.search(r"pytest\.mark\.gpu\b", p.read_text()) and p.name != "test_gpu_suite.py")
    assert sorted(GPU_TEST_FILES) == marked


def test_the_report_appends_the_runs_tables_with_its_own_date_and_machine(smoke, tmp_path):
    out, _ = smoke
    record = json.loads((out / "suite.json").read_text())
    results = tmp_path / "RESULTS.md"
    report = [sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), str(out)]
    r = subprocess.run(report + ["--results", str(results)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = results.read_text()
    assert text.count(f"{record['date']}; {record['machine']}") == 1 + len(PARTS)  # the statuses, then each part
    for name, part in record["parts"].items():
        assert f"## GPU suite, {name}: {part['title']}" in text
        assert part["tables"][0]["rows"][0][0] in text
    before = (REPO / "benchmarks" / "RESULTS.md").read_bytes()
    r = subprocess.run(report, capture_output=True, text=True, timeout=120)  # a smoke run into RESULTS.md: refused
    assert r.returncode != 0 and "smoke run" in r.stderr
    assert (REPO / "benchmarks" / "RESULTS.md").read_bytes() == before
