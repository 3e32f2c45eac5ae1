"""`experiment` and `status` on the local 2-node SLURM cluster: per model a pre-training job and
an array of folds x {bt, scratch} whose bt tasks wait for it (afterok) and scratch tasks do not,
a report job after every array (afterany); a fold forced to fail is named by the report and by
status, a preempted job is shown requeued, and a rerun resubmits only what failed."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from test_local_cluster import _job_state, local_cluster  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

OPTIONS = [
    "--models", "unet,attention_unet", "--folds", 3, "--executor", "slurm", "--profile", "local",
    "--pretrain-nodes", 2, "--base-width", 4, "--depth", 2, "--device", "cpu",
    "--pretrain-steps", 300, "--pretrain-batch-size", 4, "--pretrain-log-every", 5,
    "--pretrain-checkpoint-every", 25, "--finetune-epochs", 1, "--finetune-batch-size", 4,
]  # fmt: skip


def hpc(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import pack_toy

    return pack_toy(
        tmp_path_factory.mktemp("slurm-exp") / "data", n=60, image_size=32, shard_size=20
    )


def _ids(out: str) -> tuple[dict, dict, dict, str]:
    pre = dict(re.findall(r"pretrain/(\w+)\s+job (\d+)", out))
    arrays = dict(re.findall(r"finetune/(\w+)\s+array (\d+) of 6 task\(s\)", out))
    tasks = {label: job for job, label in re.findall(r"^\s+(\d+_\d+)\s+(\S+)", out, re.M)}
    report = re.search(r"report\s+job (\d+)", out).group(1)
    return pre, arrays, tasks, report


def _rows(status: str) -> dict[str, str]:
    rows = {}
    for line in status.splitlines()[2:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] in ("pretrain", "finetune", "report"):
            rows[parts[1]] = parts[2]
    return rows


@pytest.mark.timeout(900)
def test_experiment_on_two_nodes_with_a_failed_fold_a_requeue_and_a_rerun(data, tmp_path):
    exp = tmp_path / "exp"
    try:
        _experiment_on_two_nodes(data, exp)
    finally:  # nothing of this test stays queued when it fails
        for name in ("hpc-btunet-pretrain", "hpc-btunet-finetune", "hpc-btunet-report"):
            subprocess.run(["scancel", "--name", name], timeout=30)  # one name per call


def _experiment_on_two_nodes(data, exp):
    submitted = hpc("experiment", "--data", data, "--out", exp, *OPTIONS).stdout
    pre, arrays, tasks, report = _ids(submitted)
    assert set(pre) == set(arrays) == {"unet", "attention_unet"}, submitted
    assert len(tasks) == 12 and "submitted 15 job(s)" in submitted

    # force one fold to fail: a file where its run folder goes, before its task can start
    sabotaged = exp / "finetune" / "unet" / "bt" / "fold-1"
    sabotaged.parent.mkdir(parents=True, exist_ok=True)
    sabotaged.write_text("not a folder")
    assert _job_state(tasks["unet/bt/fold-1"])["JobState"] == "PENDING"

    # dependencies as SLURM holds them
    for model in ("unet", "attention_unet"):
        for label, job in tasks.items():
            if not label.startswith(model + "/"):
                continue
            dependency = _job_state(job).get("Dependency", "")
            if "/bt/" in label:
                assert dependency.startswith(f"afterok:{pre[model]}"), (label, dependency)
            else:
                assert dependency in ("(null)", ""), (label, dependency)
    report_dependency = _job_state(report)["Dependency"]
    for array in arrays.values():
        assert re.search(rf"afterany:{array}(_\*)?\(", report_dependency), report_dependency
    assert _job_state(report)["KillOInInvalidDependent"] == "Yes"

    seen: dict[str, set] = {}
    statuses = []

    def look() -> dict[str, str]:
        text = hpc("status", "--experiment", exp, check=False).stdout
        statuses.append(text)
        rows = _rows(text)
        for label, rest in rows.items():
            seen.setdefault(rest.split("  ")[0].strip(), set()).add(label)
        return rows

    # preempt attention_unet's pre-training while it runs: SLURM requeues it, it resumes
    run = exp / "pretrain" / "attention_unet" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (run.exists() and run.read_text().strip()):
        look()
        assert time.monotonic() < deadline, "pre-training never started"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", pre["attention_unet"]], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while not any("requeued" in s for s in seen):
        look()
        assert time.monotonic() < deadline, statuses[-1]
        time.sleep(0.5)
    # a requeued job waits for its begin time (2 minutes on the local cluster): release it now
    release = ["scontrol", "update", f"JobId={pre['attention_unet']}", "StartTime=now"]
    subprocess.run(release, check=True, timeout=30)

    deadline = time.monotonic() + 600
    while True:
        rows = look()
        if not any(r.startswith(("pending", "running")) for r in rows.values()):
            break
        assert time.monotonic() < deadline, statuses[-1]
        time.sleep(2)

    final = statuses[-1]
    rows = _rows(final)
    assert rows["unet/bt/fold-1"].startswith("failed"), final
    assert "log " in rows["unet/bt/fold-1"], final
    done = [label for label, rest in rows.items() if rest.startswith("done")]
    assert len(done) == 2 + 11 + 1, final
    for state in ("pending", "running", "done", "failed"):
        assert any(s.startswith(state) for s in seen), (state, seen)
    assert any("preempted and requeued" in s for s in seen), seen

    folder = exp / "report"
    text = (folder / "report.md").read_text()
    assert "fold-1" in text and "unet" in text
    for name in ("table.md", "table.csv", "change.csv", "statistics.csv"):
        assert (folder / name).exists(), name
    for name in ("change.png", "qualitative.png"):
        assert (folder / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # afterok on the failed task can never be satisfied (SLURM would accept it and pend for good):
    # refused before submission, in one message
    refused = hpc(
        "finetune", "--data", data, "--out", exp.parent / "refused", "--executor", "slurm",
        "--profile", "local", "--folds", 1, "--variants", "scratch", "--base-width", 4,
        "--depth", 2, "--after", tasks["unet/bt/fold-1"], check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"--after {tasks['unet/bt/fold-1']}: that job ended FAILED" in refused.stderr
    assert "Traceback" not in refused.stderr and not (exp.parent / "refused").exists()

    # rerun: only the failed fold (and the report) are submitted again; --wait follows them
    sabotaged.unlink()
    again = hpc("experiment", "--data", data, "--out", exp, *OPTIONS, "--wait").stdout
    assert "submitted 2 job(s)" in again, again
    retried = re.findall(r"^\s+\d+(?:_\d+)?\s+(\S+/fold-\d+)\s", again, re.M)
    assert retried == ["unet/bt/fold-1"], again
    assert "finetune 12/12 done; report 1/1 done" in again, again
    status = hpc("status", "--experiment", exp, "--watch", 1)  # nothing queued: one table, exit 0
    assert status.stdout.count("summary:") == 1, status.stdout
