"""How many compute threads each rank starts: its share of the node's cores, not all of them.

PyTorch starts as many intra-op threads as the machine has cores, in every process. W ranks on
one node then run W times that many threads on the same cores, and the threads that lose their
core stall the others at every parallel region: on 2 cores, 2 ranks reached a quarter of what one
rank did. So each rank takes, in order of precedence:

1. ``OMP_NUM_THREADS`` when it is set: ``--threads N`` exports it into the job, and a user or
   a launcher that sets it (torchrun sets 1) means it;
2. SLURM's CPUs per task (``SLURM_CPUS_PER_TASK``, from ``--cpus-per-task``), the cores SLURM
   gave the task;
3. the cores this process may run on (its CPU affinity, which SLURM's binding or ``taskset``
   narrows) divided by the ranks on the node, at least one.

DataLoader workers run one thread each (PyTorch sets it in every worker); decoding a sample is
single-threaded anyway. The choice is recorded in the run's config (``threads``) and printed,
so a slow run can be told from a misplaced one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

__all__ = ["ThreadPlan", "place_threads", "plan_threads"]


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # intra-op threads of this rank
    source: str  # where the number came from, for the config and the log

    def as_dict(self) -> dict:
        return asdict(self)


def available_cores() -> int:
    """Cores this process may run on (its affinity), or the machine's where that is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_threads(
    local_ranks: int, env: Mapping[str, str] | None = None, cores: int | None = None
) -> ThreadPlan:
    """The compute threads of one of ``local_ranks`` ranks on a node (see the module docstring);
    ``env`` and ``cores`` default to this process's environment and affinity."""
    env = os.environ if env is None else env
    if _positive(env.get("OMP_NUM_THREADS")):
        return ThreadPlan(int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS (--threads)")
    if _positive(env.get("SLURM_CPUS_PER_TASK")):
        return ThreadPlan(int(env["SLURM_CPUS_PER_TASK"]), "SLURM cpus per task")
    cores = available_cores() if cores is None else cores
    share = max(1, cores // max(1, local_ranks))
    return ThreadPlan(share, f"{cores} cores / {local_ranks} rank(s) on the node")


def place_threads(launcher: str, local_ranks: int) -> ThreadPlan:
    """Set this rank's compute threads. A job run in the submitting process (``--executor
    debug``, a plain ``python`` call: launcher ``single``) keeps the process's setting, which is
    its caller's."""
    if launcher == "single":
        return ThreadPlan(torch.get_num_threads(), "the calling process's setting")
    plan = plan_threads(local_ranks)
    torch.set_num_threads(plan.threads)
    return plan


def _positive(value: str | None) -> bool:
    return value is not None and value.strip().isdigit() and int(value) > 0
