"""Against a real Ray cluster started with `ray start --head` on 127.0.0.1: `--address`, and the
job module submitted with `ray job submit` (what users run on a cluster)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from conftest import PER_SHARD, part_hashes

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # a cluster start/stop and three jobs: about half a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node on loopback; yields (GCS address, dashboard URL, env for clients)."""
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_tokenize_on_an_existing_cluster_with_address(tmp_path, cluster, bundle, shards):
    address, _, env = cluster
    out = tmp_path / "tokens"
    r = subprocess.run([str(BIN / "vqtok"), "tokenize", "--tokenizer", str(bundle), "--data", str(shards),
                        "--out", str(out), "--batch-size", "64", "--address", address, "--workers", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    local = tmp_path / "local"
    assert run_cli("tokenize", "--tokenizer", str(bundle), "--data", str(shards), "--out", str(local),
                   "--batch-size", "64").returncode == 0
    assert part_hashes(out) == part_hashes(local)


def test_ray_job_submit_runs_the_job_module(tmp_path, cluster, bundle, shards):
    _, dashboard, env = cluster
    out = tmp_path / "tokens"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
         sys.executable, "-m", "vqtok.jobs.tokenize", "--tokenizer", str(bundle), "--data", str(shards),
         "--out", str(out), "--batch-size", "64"],
        capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout and f"{4 * PER_SHARD:,} rows in 4 parts" in r.stdout, r.stdout
    assert "RuntimeWarning" not in r.stdout + r.stderr


SUBMIT = """
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
dashboard, work, python, tokenizer, data, out = sys.argv[1:]
client = JobSubmissionClient(dashboard)
job = client.submit_job(
    entrypoint=f"{python} tokenize_corpus.py",
    runtime_env={"working_dir": work,
                 "env_vars": {"TOKENIZER": tokenizer, "DATA": data, "OUT": out, "OMP_NUM_THREADS": "1"}})
deadline = time.time() + 300
while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    if time.time() > deadline:
        sys.exit("job did not finish in 5 minutes")
    time.sleep(1)
print(client.get_job_logs(job))
print("STATUS", client.get_job_status(job))
"""


def test_job_submitted_with_the_sdk_and_a_runtime_env(tmp_path, cluster, bundle, shards):
    """The Ray Jobs SDK (JobSubmissionClient) with a runtime_env: a working_dir holding the user's
    script (it uses the Python API) and env_vars carrying its arguments. The client runs in its own
    process with the cluster's token-auth setting, as a user's would."""
    _, dashboard, env = cluster
    work = tmp_path / "job"
    work.mkdir()
    (work / "tokenize_corpus.py").write_text(
        "import os, vqtok\n"
        "r = vqtok.tokenize(os.environ['TOKENIZER'], os.environ['DATA'], os.environ['OUT'], batch_size=64)\n"
        "print(f'job wrote {r.rows} rows in {r.parts} parts')\n")
    out = tmp_path / "tokens"
    r = subprocess.run([sys.executable, "-c", SUBMIT, dashboard, str(work), sys.executable, str(bundle), str(shards),
                        str(out)], capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0 and "STATUS SUCCEEDED" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"job wrote {4 * PER_SHARD} rows in 4 parts" in r.stdout
    from vqtok import TokenDataset

    assert TokenDataset(str(out)).num_rows == 4 * PER_SHARD
