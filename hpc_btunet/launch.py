"""Run job functions through submitit: as local processes (``local``) or in-process (``debug``).

A job is a plain function of a config (``pretrain.run(cfg)``); the executor decides where it runs,
so the demo on a laptop and a cluster run share the job code. The SLURM executor, resource
flags, cluster profiles, arrays and dependencies plug in here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from hpc_btunet.errors import UserError

EXECUTORS = ("local", "debug")


@dataclass(frozen=True)
class LaunchConfig:
    executor: str = "local"
    logs: Path = Path("experiments/logs")
    timeout_min: int = 60
    tasks_per_node: int = 1
    threads: int | None = None  # torch/OpenMP threads per task (None: the library default)
    parallel: int = 1  # local executor: jobs running at once

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise UserError(
                f"--executor {self.executor!r} is not available: choose one of {', '.join(EXECUTORS)}"
            )


def make_executor(cfg: LaunchConfig, name: str) -> submitit.Executor:
    folder = Path(cfg.logs) / name / "%j"
    if cfg.executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    executor = submitit.LocalExecutor(folder=folder)
    setup = (
        [f"export OMP_NUM_THREADS={cfg.threads} MKL_NUM_THREADS={cfg.threads}"]
        if cfg.threads
        else []
    )
    executor.update_parameters(
        timeout_min=cfg.timeout_min, tasks_per_node=cfg.tasks_per_node, setup=setup
    )
    return executor


def _result(job: submitit.Job, label: str) -> Any:
    if isinstance(job, submitit.DebugJob):
        return job.result()  # in-process: the job's own exception propagates
    try:
        return job.result()
    except submitit.core.utils.FailedJobError as e:
        log = job.paths.stderr
        # the job's own message (a UserError's one line) is the last line of its traceback
        tail = [line for line in str(e).splitlines() if line.strip()]
        reason = next(
            (line for line in reversed(tail) if "Error" in line or "error" in line),
            tail[-1] if tail else "",
        )
        raise UserError(f"{label} failed: {reason.strip()}\n  log: {log}") from None


def run_jobs(
    cfg: LaunchConfig, name: str, fn: Callable, configs: Sequence, labels: Sequence[str]
) -> list:
    """Run ``fn(c)`` for every config, at most ``cfg.parallel`` at a time; print ids and log paths;
    wait for all and return their results in order. A failed job names its log."""
    executor = make_executor(cfg, name)
    results: list = [None] * len(configs)
    running: list[tuple[int, submitit.Job]] = []
    pending = list(range(len(configs)))
    while pending or running:
        while pending and len(running) < max(1, cfg.parallel):
            i = pending.pop(0)
            job = executor.submit(fn, configs[i])
            print(
                f"{name}: submitted {labels[i]} as job {job.job_id} ({cfg.executor}); log: {job.paths.stdout}"
            )
            running.append((i, job))
        # a debug job runs in-process when its result is asked for, so it counts as done at once
        done = [(i, j) for i, j in running if isinstance(j, submitit.DebugJob) or j.done()]
        for i, job in done:
            running.remove((i, job))
            results[i] = _result(job, f"{name} job {job.job_id} ({labels[i]})")
        if running and not done:
            time.sleep(0.5)
    return results
