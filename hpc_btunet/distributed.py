"""Rank helpers and autograd-aware collectives.

Everything here degrades to the single-process case: when no process group is initialised the
rank is 0, the world size 1 and every collective is the identity, so the same code runs in a
test, on one GPU and on many nodes. Model code never imports this module; losses and
normalisation layers use the collectives only behind :func:`is_distributed`.

Gradient convention: the backward of an all-gather or an all-reduce *sums* the incoming gradients
over ranks. When every rank computes the same global loss, each rank's parameter gradient is
therefore ``world_size`` times its share, and DDP's averaging over ranks turns the sum of the
shares into the exact gradient of the global loss. This is the convention of
``torch.distributed.nn.functional``, which recent torch deprecates (FutureWarning on every call)
in favour of private ``_functional_collectives``; the two autograd functions here are built on the
stable list-based ``dist.all_gather`` and ``dist.all_reduce`` instead.

Process-group setup: :func:`init_process_group` reads where this process stands from, in order,
torchrun's variables (``RANK``, ``WORLD_SIZE``, ...), a submitit job (SLURM or local processes),
or plain ``srun`` variables, and otherwise runs as a single process. It exports ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (what
DeepSpeed's ``init_distributed`` reads), picks NCCL on GPU and gloo on CPU, and sets a timeout
so that a lost rank ends the job with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "Placement",
    "main_decides",
    "all_gather_cat",
    "all_reduce_sum",
    "detect_placement",
    "init_process_group",
    "is_distributed",
    "rank",
    "teardown",
    "wait_for_all",
    "world_size",
]


@dataclass(frozen=True)
class Placement:
    """Where this process stands in its job, and who told us (``launcher``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    def export(self) -> None:
        """Set the variables torch's ``env://`` rendezvous and DeepSpeed read."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


# The rendezvous port range: below Linux's default ephemeral range (32768-60999), from which the
# kernel picks the local ports of outgoing connections; a port there may be taken by any client
# connection on rank 0's node (gloo's own among them), and the rendezvous then fails with
# EADDRINUSE. Fixed, not read from the node, so that every task derives the same port.
PORT_RANGE = (20000, 32767)


def _port_for(job_id: str) -> int:
    """A port every task of a job derives alike from the job id (as submitit does)."""
    return random.Random(job_id).randint(*PORT_RANGE)


PLACEMENT_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def detect_placement() -> Placement:
    """Read this process's rank and rendezvous from its environment (see the module docstring).

    Inside a submitit job, submitit's view wins over stray torchrun variables (a job inherits the
    environment of the shell that submitted it)."""
    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        import submitit

        job = submitit.JobEnvironment()
        tasks_per_node = job.num_tasks // max(job.num_nodes, 1)
        return Placement(
            job.global_rank,
            job.num_tasks,
            job.local_rank,
            tasks_per_node,
            job.hostnames[0],
            _port_for(str(job.job_id)),
            f"submitit-{env['SUBMITIT_EXECUTOR']}",
        )
    if "RANK" in env and "WORLD_SIZE" in env:
        return Placement(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return Placement(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
            nodes[0],
            _port_for(env["SLURM_JOB_ID"]),
            "srun",
        )
    return Placement()


def init_process_group(use_cuda: bool, timeout_s: float = 600.0) -> Placement:
    """Join this job's process group (if it has more than one process) and return the placement.

    Idempotent: a process group already initialised is kept.
    """
    placement = detect_placement()
    if placement.world_size > 1:  # a single process leaves its environment alone
        placement.export()
    if placement.world_size > 1 and not is_distributed():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=placement.rank,
            world_size=placement.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return placement


def wait_for_all(timeout_s: float) -> None:
    """A barrier of every rank that waits up to ``timeout_s`` (which may exceed the process
    group's timeout): for work some ranks do and others skip, such as one node copying its
    dataset while the others reuse theirs. On a gloo group of its own, so it also serves NCCL
    jobs; a rank still missing at the end is named in the error every rank raises."""
    if world_size() == 1:
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout_s))
    finally:
        dist.destroy_process_group(group)


def teardown() -> None:
    """Leave the process group cleanly (safe to call when none is initialised)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def main_decides(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; if it raises a ``UserError``
    every rank raises one with the same message (any other exception: a ``RuntimeError`` naming
    it), so all ranks stop together with the real cause instead of some waiting at the next
    collective. Single process: just ``fn()``."""
    from hpc_btunet.errors import UserError

    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            box[0] = ("error" if isinstance(e, UserError) else "bug", f"{e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "error":
        raise UserError(value)
    if outcome == "bug":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


_MAX_DIMS = 15


def _check_same_shape(x: Tensor) -> None:
    """Raise on every rank (never hang on one rank) if the shapes differ; one tiny all-gather."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather_cat supports up to {_MAX_DIMS} dimensions, got {x.dim()}")
    # a fixed-length record (ndim, sizes padded with -1) so that every rank sends the same length
    record = torch.full((1 + _MAX_DIMS,), -1, dtype=torch.int64)
    record[0] = x.dim()
    record[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    record = record.to(x.device)
    records = [torch.empty_like(record) for _ in range(world_size())]
    dist.all_gather(records, record)
    shapes = [tuple(r[1 : 1 + int(r[0])].tolist()) for r in records]
    if len(set(shapes)) != 1:
        raise ValueError(
            "all_gather_cat needs tensors of the same shape on every rank, got "
            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            + ". Give every rank the same batch size (equal batches per rank, drop_last)."
        )


class _AllGatherCat(torch.autograd.Function):
    """Forward: concatenate the ranks' tensors (dim 0). Backward: sum the gradient over ranks and
    return this rank's rows (an all-reduce of the gradient, then a slice)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        ctx.start, ctx.rows = rank() * x.shape[0], x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.start, ctx.rows)


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: sum the gradient over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order, keeping the autograd graph.

    The gradient that reaches each rank's ``x`` is the sum over ranks of the gradients of the
    gathered tensor's rows that came from it. Identity when not distributed or on one process.

    Raises ``ValueError`` on every rank when the per-rank shapes differ (checked with one small
    all-gather of the shapes), instead of hanging or producing garbage.
    """
    if world_size() == 1:
        return x
    if x.dim() == 0:
        raise ValueError("all_gather_cat needs a tensor with at least one dimension")
    _check_same_shape(x)
    return _AllGatherCat.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks, keeping the autograd graph (backward sums the gradients over ranks).

    Identity when not distributed or on one process. Shapes must agree across ranks.
    """
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x)
