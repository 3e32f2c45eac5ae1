"""Red team: records, configs and profiles that were edited, damaged or planted.

``status`` reads an experiment folder that someone else may have written: its record, the jobs'
outcome files and logs. Configs and cluster profiles are written by hand. Each case is a real
command in a fresh process; a refusal is one error line (exit 2, no traceback, nothing changed),
anything else is the stated safe behaviour: no code from data, no hang, no path outside the
experiment followed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pack_toy
from redteam import cli, refused, snapshot

pytestmark = pytest.mark.slow


class _Planted:
    """A pickle that runs a command when loaded (what a planted result file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_toy(tmp_path_factory.mktemp("records") / "data", n=24)


def _record(data: Path, **fields) -> dict:
    return {
        "format": 1,
        "data": str(data),
        "manifest_sha256": "0" * 64,
        "models": ["unet"],
        "variants": ["scratch"],
        "folds": 1,
        "executor": "slurm",
        "tasks": {},
    } | fields


def _experiment(root: Path, record: dict | str | bytes) -> Path:
    exp = root / "exp"
    exp.mkdir(parents=True, exist_ok=True)
    path = exp / "experiment.json"
    if isinstance(record, bytes):
        path.write_bytes(record)
    else:
        path.write_text(record if isinstance(record, str) else json.dumps(record))
    return exp


# --- status: no code from data ---------------------------------------------------------------


def test_a_pickle_placed_where_status_looked_runs_no_code(data, tmp_path):
    """A failed task's folder holds a hostile ``*_result.pkl``: status says failed, from the
    job's outcome file and log, and the pickle's command never runs."""
    marker = tmp_path / "pwned"
    logs = tmp_path / "exp" / "logs" / "finetune" / "41"
    logs.mkdir(parents=True)
    (logs / "41_0_log.err").write_text("starting\nhpc-btunet: the job stopped: out of luck\n")
    with open(logs / "41_0_result.pkl", "wb") as f:
        pickle.dump(_Planted(marker), f)
    entry = {"job_id": "41", "executor": "slurm", "log": str(logs / "41_0_log.err")}
    exp = _experiment(tmp_path, _record(data, tasks={"finetune/unet/scratch/fold-0": entry}))
    done = cli(["status", "--experiment", exp], env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr  # a task failed
    assert "Traceback" not in done.stderr
    assert "failed" in done.stdout and "out of luck" in done.stdout
    assert not marker.exists(), "status unpickled a file it did not write"


def test_a_recorded_log_outside_the_experiment_is_not_read(data, tmp_path):
    outside = tmp_path / "elsewhere" / "9_0_log.err"
    outside.parent.mkdir()
    outside.write_text("hpc-btunet: a secret line\n")
    entry = {"job_id": "9", "executor": "slurm", "log": str(outside)}
    exp = _experiment(tmp_path, _record(data, tasks={"finetune/unet/scratch/fold-0": entry}))
    done = cli(["status", "--experiment", exp], env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is not inside" in done.stdout and "a secret line" not in done.stdout


def test_a_reused_pid_is_not_a_running_job(data, tmp_path):
    """A local task's recorded pid now belongs to another process: the task is not shown as
    running (its recorded start time differs), and ``--watch`` ends at once."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        entry = {
            "job_id": str(other.pid),
            "executor": "local",
            "log": str(tmp_path / "exp" / "logs" / "finetune" / f"{other.pid}_0_log.err"),
            "started": time.time() - 3600.0,  # the job's process started an hour ago
        }
        record = _record(data, executor="local", tasks={"finetune/unet/scratch/fold-0": entry})
        exp = _experiment(tmp_path, record)
        start = time.monotonic()
        done = cli(["status", "--experiment", exp, "--watch", "1"], timeout=60)
        assert time.monotonic() - start < 30
        assert "Traceback" not in done.stderr, done.stderr
        line = next(ln for ln in done.stdout.splitlines() if "unet/scratch/fold-0" in ln)
        assert "running" not in line, done.stdout
    finally:
        other.kill()
        other.wait()


def test_a_live_local_job_with_its_start_time_is_running(data, tmp_path):
    import psutil

    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        entry = {
            "job_id": str(job.pid),
            "executor": "local",
            "log": str(tmp_path / "exp" / "logs" / "x" / f"{job.pid}_0_log.err"),
            "started": psutil.Process(job.pid).create_time(),
        }
        record = _record(data, executor="local", tasks={"finetune/unet/scratch/fold-0": entry})
        done = cli(["status", "--experiment", _experiment(tmp_path, record)])
        line = next(ln for ln in done.stdout.splitlines() if "unet/scratch/fold-0" in ln)
        assert "running" in line, done.stdout
    finally:
        job.kill()
        job.wait()


# --- status: a record edited or damaged -------------------------------------------------------

RECORDS = {
    "folds-huge": (lambda d: _record(d, folds=1_000_000_000), ["'folds'", "0 to 100"]),
    "folds-text": (lambda d: _record(d, folds="3"), ["'folds'", "whole number"]),
    "log-a-number": (
        lambda d: _record(
            d,
            tasks={"finetune/unet/scratch/fold-0": {"job_id": "1", "executor": "slurm", "log": 5}},
        ),
        ["'log' must be text", "got 5"],
    ),
    "tasks-a-list": (lambda d: _record(d, tasks=[]), ["'tasks'", "mapping"]),
    "model-a-path": (lambda d: _record(d, models=["../../etc"]), ["'models'", "model's name"]),
    "variant-unknown": (lambda d: _record(d, variants=["bt", "fancy"]), ["'variants'"]),
    "not-a-mapping": (lambda d: [1, 2], ["holds list", "move it away"]),
    "duplicate-key": (
        lambda d: json.dumps(_record(d)).replace('"folds": 1', '"folds": 1, "folds": 2'),
        ["'folds' twice", "move it away"],
    ),
    "deep-nesting": (lambda d: "[" * 5000 + "]" * 5000, ["nests 5000 levels", "at most 64"]),
    "not-utf8": (lambda d: b'{"format": 1, "data": "\xff"}', ["not UTF-8"]),
    "truncated": (lambda d: json.dumps(_record(d))[:40], ["not valid JSON", "move it away"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(RECORDS))
def test_an_edited_record_is_one_error(data, tmp_path, case):
    make, words = RECORDS[case]
    exp = _experiment(tmp_path, make(data))
    refused(["status", "--experiment", exp], ["experiment.json", *words], root=tmp_path)


@pytest.mark.timeout(60)
def test_a_record_that_is_a_named_pipe_answers_at_once(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    os.mkfifo(exp / "experiment.json")
    start = time.monotonic()
    refused(["status", "--experiment", exp], ["experiment.json", "named pipe"], timeout=30)
    assert time.monotonic() - start < 30


# --- configs and profiles written by hand -----------------------------------------------------


def _pre(data: Path, root: Path) -> list:
    return ["pretrain", "--data", data, "--out", root / "exp", "--base-width", "4", "--depth", "2"]


CONFIGS = {
    "duplicate-key": ("lr: 0.1\nepochs: 2\nlr: 0.2\n", ["'lr' is given twice"]),
    "non-string-key": ("1: 0.1\n", ["key that is not text"]),
    "deep-nesting": ("a: " + "[" * 200 + "]" * 200 + "\n", ["64 levels"]),
    "many-aliases": (
        "a: &a [1]\n" + "".join(f"b{i}: *a\n" for i in range(200)),
        ["more than 100 aliases"],
    ),
    "wrong-type": ("epochs: many\n", ["c.yaml: epochs must be a whole number", "many"]),
    "float-as-text": ("lr: fast\n", ["c.yaml: lr must be a number", "fast"]),
    "a-scalar": ("just text\n", ["mapping"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_file_is_one_error(data, tmp_path, case):
    text, words = CONFIGS[case]
    (tmp_path / "c.yaml").write_text(text)
    args = [*_pre(data, tmp_path), "--config", tmp_path / "c.yaml", "--executor", "local"]
    refused(args, ["--config", *words], root=tmp_path)


@pytest.mark.timeout(60)
def test_a_config_that_is_not_utf8_or_a_pipe(data, tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"lr: \xff\n")
    args = [*_pre(data, tmp_path), "--executor", "local", "--config"]
    refused([*args, tmp_path / "c.yaml"], ["c.yaml", "not UTF-8"], root=tmp_path)
    os.mkfifo(tmp_path / "p.yaml")
    refused([*args, tmp_path / "p.yaml"], ["p.yaml", "named pipe"], root=tmp_path, timeout=30)


def test_numbers_as_people_write_them(data, tmp_path):
    """``lr: 1e-3`` is a number (YAML 1.1 reads it as text), and ``time: 1:30:00`` is a time
    (YAML 1.1 reads it as the number 5400)."""
    (tmp_path / "study.yaml").write_text(
        "pretrain_lr: 1e-3\nfinetune_lr: 5E-4\ntime: 1:30:00\nmodels: unet\nfolds: 1\n"
        "pretrain_batch_size: 4\nfinetune_batch_size: 4\nbase_width: 4\ndepth: 2\n"
    )
    done = cli(
        ["experiment", "--data", data, "--out", tmp_path / "exp", "--config"]
        + [tmp_path / "study.yaml", "--executor", "slurm", "--dry-run"],
        env={"PATH": "/usr/bin:/bin"},  # no SLURM: the dry run writes submitit's scripts
    )
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --time=90" in done.stdout
    assert not (tmp_path / "exp").exists()


PROFILES = {
    "broken": ("partition: [a\n", ["not valid YAML", "fix the profile"]),
    "max-nodes-text": ("max_nodes: lots\n", ["max_nodes must be a whole number", "lots"]),
    "sbatch-a-list": ("sbatch: [a, b]\n", ["sbatch must be a mapping"]),
    "setup-a-number": ("setup: 7\n", ["setup must be a list"]),
    "a-list": ("- partition\n", ["mapping"]),
    "duplicate-key": ("partition: a\npartition: b\n", ["'partition' is given twice"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(PROFILES))
def test_a_bad_cluster_profile_is_one_error(data, tmp_path, case):
    text, words = PROFILES[case]
    (tmp_path / "p.yaml").write_text(text)
    args = [*_pre(data, tmp_path), "--profile", tmp_path / "p.yaml", "--executor", "local"]
    refused(args, ["p.yaml", *words], root=tmp_path)


def test_gpus_asked_of_a_machine_without_them(data, tmp_path):
    args = [*_pre(data, tmp_path), "--gpus-per-node", "3", "--executor", "local"]
    refused(args, ["--gpus-per-node 3", "has 0 GPU(s)", "--tasks-per-node"], root=tmp_path)


def test_a_refused_submission_leaves_nothing_behind(data, tmp_path):
    """sbatch refuses: one error with SLURM's words, and none of submitit's files (its sbatch
    script, the pickled call) stay in ``--out``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "sbatch": "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2; exit 1",
        "srun": "exit 0",
        "squeue": "exit 0",
        "sinfo": "exit 0",
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    root = tmp_path / "work"
    root.mkdir()
    before = snapshot(root)
    args = [*_pre(data, root), "--executor", "slurm", "--batch-size", "4"]
    refused(args, ["SLURM refused", "Invalid account"], env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert snapshot(root) == before, sorted(set(snapshot(root)) - set(before))
