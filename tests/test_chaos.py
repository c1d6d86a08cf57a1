"""benchmarks/chaos.py --quick: SIGKILLs of the driver, an encoder actor, a read task and a worker
node of a local two-node cluster during `vqtok tokenize`; every completed dataset must equal the
clean run's."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chaos_quick_leaves_no_differing_rows():
    """Six kills, one of each kind first; about 2.5 minutes on 2 cores."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--quick", "--no-append"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "\n0 differing rows" in r.stdout, r.stdout[-5000:]
    assert re.search(r"^\| all +\| 6 +\|", r.stdout, re.M), r.stdout[-3000:]  # six kills happened
