"""Losing a worker node mid-job on a real multi-node Ray cluster: ray.cluster_utils.Cluster runs a
head node and a worker node as separate raylets (each with its own object store) on this machine;
`vqtok tokenize --address` drives a job on it from its own process, and the worker node is taken
away, all its processes SIGKILLed (allow_graceful=False: a crash or a preemption, not a drain),
after the first commit.

What Ray does then (Ray 2.60, seen in the driver's log): the read tasks that were running on the
lost node fail with "the node it was running on is dead" and are retried (Ray Data's tasks retry
without limit on system failures); token blocks that lived only in the lost node's object store
are rebuilt from lineage ("Attempting to recover N lost objects by resubmitting their tasks");
the encoder actors that were on it are restarted elsewhere, and the batch each was working on is
resubmitted ("The actor is temporarily unavailable: ... The actor was restarted": Ray Data starts
its actor pools with max_restarts=-1 and max_task_retries=-1). Should a retried task deliver a
batch twice, the driver's UnitCollector drops the copy (rows are keyed by (part_index, pos)), and
a unit is committed once, whole.

With a 1-CPU head the survivors cannot run the job: the two restarted encoders (0.5 CPU each)
fill the head and the read tasks (1 CPU) wait for a CPU, so the job stalls - it does not fail -
until a node joins, as an autoscaler would add one; this test adds it. With a 2-CPU head the job
goes on with the head alone.
"""
import os
import time
from pathlib import Path

import pytest

from conftest import committed, kill_group, part_hashes, start_tokenize, wait_for
from vqtok import TokenDataset

pytestmark = pytest.mark.slow  # a cluster of two raylets and a 10,000-image job: about a minute each


def children_named(parent: int, text: str) -> list[int]:
    """PIDs of `parent`'s children whose command line contains `text` (a raylet starts its node's workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and text in (d / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.parametrize("head_cpus", [1, 2], ids=["replacement-node-joins", "head-carries-on"])
def test_worker_node_lost_mid_job_the_job_finishes_with_the_clean_dataset(tmp_path, bundle, many_shards, clean_run,
                                                                         head_cpus):
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": head_cpus})
    p = None
    try:
        worker = cluster.add_node(num_cpus=2)
        raylet = worker.all_processes["raylet"][0].process.pid
        out = tmp_path / "tokens"
        p = start_tokenize(bundle, many_shards, out, "--address", cluster.address, "--workers", "2")
        wait_for(lambda: committed(out) >= 1 or p.poll() is not None, timeout=240)
        assert p.poll() is None, p.stdout.read()
        lost = {kind: children_named(raylet, kind) for kind in ("BatchEncoder", "read_units")}
        print("on the lost node:", lost)
        cluster.remove_node(worker, allow_graceful=False)
        at_loss = committed(out)
        if head_cpus == 1:
            # the job cannot go on without a node: let it sit a while, then a replacement joins
            time.sleep(10)
            cluster.add_node(num_cpus=2)
        log, _ = p.communicate(timeout=400)
    finally:
        if p is not None:
            kill_group(p)
        cluster.shutdown()
    assert p.returncode == 0, log[-5000:]
    assert any(lost.values()), f"nothing of the job ran on the lost node; nothing was tested: {lost}"
    assert at_loss < 20, "the job ended before the node was lost; nothing was tested"
    assert "10,000 rows in 20 parts" in log, log[-3000:]
    assert part_hashes(out) == part_hashes(clean_run)
    a, b = TokenDataset(out).to_table(), TokenDataset(clean_run).to_table()
    assert a.equals(b) and len(set(a.column("key").to_pylist())) == a.num_rows == 10_000
