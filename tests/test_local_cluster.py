"""The local SLURM cluster (slurm/local-cluster/start.sh) runs what the toolkit needs from SLURM:
steps on every node, a 2-node submitit job with a gloo process group, and requeued batch jobs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

NODES = 2
START_HINT = "run `sudo slurm/local-cluster/start.sh` to start the local SLURM cluster"


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def _usable_nodes() -> list[str]:
    """Names of nodes in partition ``debug`` that answer and can take jobs; [] without SLURM."""
    if shutil.which("sinfo") is None:
        return []
    try:
        # ping answers at once; sinfo retries for seconds when slurmctld is down
        if "is UP" not in _run("scontrol", "ping"):
            return []
        out = _run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t")
    except (subprocess.SubprocessError, OSError):
        return []
    states = dict(line.split() for line in out.splitlines() if line.strip())
    # a trailing '*' means the node does not answer; drained or down nodes take no jobs
    return sorted(n for n, s in states.items() if s in {"idle", "mix", "alloc", "comp"})


@pytest.fixture(scope="module", autouse=True)
def local_cluster() -> list[str]:
    nodes = _usable_nodes()
    if len(nodes) < NODES:
        message = (
            f"needs {NODES} usable SLURM nodes in partition 'debug', found {nodes}: {START_HINT}"
        )
        if os.environ.get("HPC_BTUNET_REQUIRE_SLURM") == "1":  # CI's run with the cluster
            pytest.fail(message)
        pytest.skip(message)
    return nodes


def _job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, Reason, ...)."""
    out = _run("scontrol", "-o", "show", "job", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.timeout(30)
def test_srun_runs_a_step_on_every_node(local_cluster):
    out = _run("srun", f"-N{NODES}", "-p", "debug", "printenv", "SLURMD_NODENAME")
    assert sorted(out.split()) == local_cluster[:NODES]


def _all_reduce_rank() -> dict[str, int]:
    """Runs in the job: one task per node, gloo, all_reduce of rank + 1."""
    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo")
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
        return {
            "rank": env.rank,
            "world_size": dist.get_world_size(),
            "sum": int(value.item()),
            "node": os.environ["SLURMD_NODENAME"],
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_submitit_two_node_gloo_all_reduce(tmp_path: Path):
    import cloudpickle
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        name="local-cluster-gloo",
        slurm_partition="debug",
        nodes=NODES,
        tasks_per_node=1,
        cpus_per_task=1,
        mem_gb=1,
        timeout_min=5,
    )
    # the job imports no test module: send the function itself, not a reference to this file
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        job = executor.submit(_all_reduce_rank)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    try:
        # without accounting, submitit cannot ask sacct; finishing means a result file or
        # the job leaving the queue
        _wait_for(
            lambda: job.done() or not _run("squeue", "-h", "-j", job.job_id).strip(),
            timeout=90,
            what=f"submitit job {job.job_id}",
            poll=0.5,
        )
        results = job.results()
    finally:
        subprocess.run(["scancel", job.job_id], check=False, capture_output=True)
    expected_sum = sum(range(1, NODES + 1))
    assert sorted(r["rank"] for r in results) == list(range(NODES))
    assert all(r["world_size"] == NODES for r in results)
    assert all(r["sum"] == expected_sum for r in results)
    assert sorted(r["node"] for r in results) == [f"node{k}" for k in range(1, NODES + 1)]


REQUEUE_SCRIPT = """#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then sleep 60; fi
echo "done ${SLURM_RESTART_COUNT:-0}"
"""


@pytest.mark.timeout(60)
def test_requeued_batch_job_runs_again_and_completes(tmp_path: Path):
    script = tmp_path / "job.sh"
    script.write_text(REQUEUE_SCRIPT)
    out = tmp_path / "job.out"
    # append: the output of the first run must survive the requeue
    sbatch = ["sbatch", "--parsable", "-p", "debug", "-t", "2", "--signal=USR2@90"]
    sbatch += ["--open-mode=append", "-o", str(out), str(script)]
    job_id = _run(*sbatch).strip().split(";")[0]
    try:
        _wait_for(lambda: out.exists() and "run 0" in out.read_text(), 20, "the first run")
        _run("scontrol", "requeue", job_id)
        _wait_for(lambda: _job_state(job_id).get("JobState") == "PENDING", 20, "the requeue")
        # SLURM holds a requeued job back for 2 minutes (Reason=BeginTime); release it sooner,
        # but not within the second of the requeue: slurmd revokes the first run's credential
        # with a timestamp in seconds and would reject a restart in that same second
        time.sleep(2)
        _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        state = _wait_for(
            lambda: (s := _job_state(job_id))["JobState"] in {"COMPLETED", "FAILED"} and s,
            20,
            "the second run to finish",
        )
    finally:
        subprocess.run(["scancel", job_id], check=False, capture_output=True)
    text = out.read_text()
    assert state["JobState"] == "COMPLETED", text
    assert state["Restarts"] == "1"
    assert "run 0" in text and "run 1" in text and "done 1" in text, text
    assert "done 0" not in text, text
