"""The distribution: `vqtok` built from the repo root, console script, bundled sample data."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_the_repo_root_to_the_vqtok_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("vqtok-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("vqtok/__init__.py", "vqtok/cli.py", "vqtok/models/vqvae.py", "vqtok/kernels/__init__.py", "vqtok/jobs/trainer.py",
                     "vqtok/pipeline/sources.py", "vqtok/jobs/train_vqvae.py",
                     "vqtok/examples/fashion-mnist/t10k-images-idx3-ubyte.gz",
                     "vqtok/examples/fashion-mnist/LICENSE"):
        assert expected in names, expected
    assert not any(n.startswith("vqtok/tests/") or "/.venv/" in n for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vqtok = vqtok.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_import_from_anywhere(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import vqtok, sys; print(vqtok.__version__, vqtok.Tokenizer)"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Tokenizer" in r.stdout
