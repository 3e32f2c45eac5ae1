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

Process-group setup (SLURM, submitit, torchrun, single process) belongs in this module as well; it
is added with the engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_cat", "all_reduce_sum", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


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
