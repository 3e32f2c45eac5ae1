"""Batch normalisation with statistics over the global batch of all ranks, on any device, and
the other scope: statistics per rank, running statistics from every rank.

``nn.SyncBatchNorm`` does the same on CUDA but raises in training mode on CPU tensors, so CPU
(gloo) runs and tests need their own layer. :class:`GlobalBatchNorm` is a drop-in for
``nn.BatchNorm1d/2d/3d``: the same parameters and buffers (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``) under the same names, so state dicts move freely between
the two. In training mode with a process group of more than one rank, the per-channel mean and the
biased variance used for normalisation come from the concatenation of every rank's batch, and
``running_var`` receives the unbiased variance of that global batch, exactly as one
``nn.BatchNorm`` would on the W*B samples. Per-rank batch sizes may differ (the counts are summed).

One collective per layer and direction (an autograd function, as ``nn.SyncBatchNorm`` has):
forward, an all-gather of every rank's per-channel count, mean and sum of squared deviations,
merged exactly in float64 in rank order (no E[x^2] - E[x]^2, which cancels catastrophically when
|mean| >> std; the same bits on every rank); backward, an all-gather of the sums of the output
gradient and of the gradient times the normalised input. Statistics are computed in float32 at
least, on ATen's BatchNorm kernels. The input gradient is that of the global batch for the sum of
the per-rank losses (each rank's upstream gradient summed over ranks); the parameter gradients
are each rank's share, which DDP averages (see :mod:`hpc_btunet.distributed`). Inside
:func:`batch_groups` an input's rows are equal blocks (the two views of one forward) normalised
apart, with one collective for all blocks.

Like ``nn.SyncBatchNorm``, the layer synchronises only in training mode: in eval mode, when not
distributed or on a single rank, it runs ``nn.BatchNorm``'s own code path unchanged and calls no
collective. So in eval mode it normalises with the running statistics, or, for a layer without
them (``track_running_stats=False``), with the statistics of the local batch, as ``nn.BatchNorm``
does; an evaluation on one rank only (validation on the main rank) cannot wait for the others.

:class:`LocalBatchNorm` is the other scope (``--bn-scope local``): each rank normalises with the
statistics of its own (micro-)batch, as plain ``nn.BatchNorm`` under DDP does, but the running
statistics do not drift apart per rank, nor are they rank 0's alone: every training forward
records its batch's mean and variance, and :func:`apply_recorded_statistics` (called by the engine
once per optimiser step) gathers the records of all ranks and applies them on every rank in the
order of their samples in the global batch: micro-batch k of rank r is slice k * W + r, so micro-
batch 0 of ranks 0, 1, ..., then micro-batch 1 of each rank, ... So W ranks end with the running
statistics that one process accumulating W micro-batches would have.

:func:`frozen_statistics` leaves every BatchNorm's running statistics untouched for a block of
forwards (the gradient cache's first pass embeds every micro-batch once without gradient; the
second pass, with gradient, is the one that counts), so each sample updates them once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from hpc_btunet.distributed import world_size

__all__ = [
    "GlobalBatchNorm",
    "LocalBatchNorm",
    "apply_recorded_statistics",
    "batch_groups",
    "convert_global_batchnorm",
    "convert_local_batchnorm",
    "frozen_statistics",
    "groups_supported",
]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _AnyBatchNorm(_BatchNorm):
    """``nn.BatchNorm`` for inputs of shape ``(N, C, *)``, also when DeepSpeed's bf16/fp16 cast
    its parameters (not its buffers) to half precision: then in fp32 with fp32 copies.

    ``groups`` (set by :func:`batch_groups`, else 1): the input's rows are that many equal
    blocks, each normalised with its own statistics, as if each were a forward of its own."""

    groups: int = 1

    def _grouped(self, forward, input: Tensor) -> Tensor:
        """``forward`` block by block when the blocks' statistics must stay apart."""
        if self.groups == 1 or (not self.training and self.running_mean is not None):
            return forward(input)
        blocks = _group_slices(input.shape[0], self.groups)
        return torch.cat([forward(input[rows]) for rows in blocks])

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {tuple(input.shape)}")

    def _plain_forward(self, input: Tensor) -> Tensor:
        half_parameters = (
            self.weight is not None
            and self.running_mean is not None
            and self.weight.dtype != self.running_mean.dtype
        )
        if half_parameters:
            return self._fp32_parameters_forward(input)
        return super().forward(input)

    def _fp32_parameters_forward(self, x: Tensor) -> Tensor:
        """``nn.BatchNorm``'s local computation when the parameters were cast to half precision
        and the buffers were not (DeepSpeed's bf16/fp16): statistics, scale and shift in fp32."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight.to(self.running_mean.dtype),
            None if self.bias is None else self.bias.to(self.running_mean.dtype),
            self.training,
            factor,
            self.eps,
        )


def _group_slices(rows: int, groups: int) -> list[slice]:
    """The ``groups`` equal blocks of ``rows`` batch rows (the views of a one-pass forward)."""
    if rows % groups:
        raise ValueError(f"a batch of {rows} rows does not split into {groups} equal groups")
    size = rows // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def _gathered(local: Tensor) -> Tensor:
    """Every rank's ``local`` (float64), stacked in rank order: one all-gather (on gloo cheaper
    than an all-reduce for a few numbers), and sums over it are the same bits on every rank."""
    local = local.double().contiguous()
    if world_size() == 1:
        return local[None]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts)


def _affine(x: Tensor, scale: Tensor, shift: Tensor | None, out: Tensor) -> None:
    """``out = x * scale + shift`` per channel (dim 1), in one pass of ATen's BatchNorm kernel
    (inference form with mean 0, variance 1, eps 0): faster on CPU than the element-wise ops."""
    zeros = torch.zeros_like(scale)
    torch.ops.aten.native_batch_norm.out(
        x, scale, shift, zeros, torch.ones_like(scale), False, 0.0, 0.0,
        out=out, save_mean=torch.empty(0), save_invstd=torch.empty(0),
    )  # fmt: skip


class _GlobalNorm(torch.autograd.Function):
    """The training forward and backward of :class:`GlobalBatchNorm` for an input whose rows are
    ``groups`` equal blocks normalised separately (``groups=1``: the plain layer). One collective
    in each direction for all groups: forward, every rank's per-group count, mean and sum of
    squared deviations (an exact merge, no E[x^2] - E[x]^2 cancellation); backward, the global
    sums of the output gradient and of the gradient times the normalised input. The per-rank
    reductions and the element-wise passes are ATen's BatchNorm kernels (a fraction of the time
    of generic reductions on CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, layer: GlobalBatchNorm, groups: int) -> Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        c = x.shape[1]
        slices = _group_slices(x.shape[0], groups)
        local = torch.zeros(groups, 3, c, dtype=torch.float64, device=x.device)
        for g, rows in enumerate(slices):
            part = xf[rows]
            if part.numel():  # a rank may hold no sample: it adds nothing
                mean, var = torch.batch_norm_update_stats(part, None, None, 0.0)
                count = part.numel() // c
                local[g, 0] = count
                local[g, 1] = mean
                local[g, 2] = var * count  # sum of squared deviations
        # ranks x groups x (count, mean, M2) x C
        counts, means, squares = _gathered(local).unbind(2)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (squares + counts * (means - mean).square()).sum(0) / total  # biased
        if layer.track_running_stats:
            for g in range(groups):  # group by group, as separate forwards would
                layer._update_running_stats(mean[g], var[g], total[g, 0])
        mean, invstd = mean.to(xf.dtype), torch.rsqrt(var + layer.eps).to(xf.dtype)
        w = torch.ones_like(mean[0]) if weight is None else weight.to(xf.dtype)
        b = None if bias is None else bias.to(xf.dtype)
        out = torch.empty_like(xf)
        for g, rows in enumerate(slices):
            scale = invstd[g] * w
            shift = -mean[g] * scale if b is None else b - mean[g] * scale
            _affine(xf[rows], scale, shift, out[rows])
        ctx.save_for_backward(x, w, mean, invstd, total[:, 0])
        ctx.slices, ctx.eps = slices, layer.eps
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, w, mean, invstd, total = ctx.saved_tensors
        xf = x if x.dtype == mean.dtype else x.to(mean.dtype)
        dy = grad.to(mean.dtype)
        local = torch.empty(len(ctx.slices), 2, x.shape[1], dtype=mean.dtype, device=x.device)
        for g, rows in enumerate(ctx.slices):
            # (sum of dy * xhat, sum of dy) per channel: what ATen's backward gives as the
            # weight's and the bias's gradient
            _, local[g, 1], local[g, 0] = torch.ops.aten.native_batch_norm_backward(
                dy[rows], xf[rows], w, None, None, mean[g], invstd[g], True, ctx.eps,
                [False, True, True],
            )  # fmt: skip
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = _gathered(local).sum(0).to(mean.dtype)  # groups x 2 x C, over all ranks
            grad_x = torch.empty_like(xf)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            for g, rows in enumerate(ctx.slices):
                # w * invstd * (dy - sum dy / N - xhat * sum(dy * xhat) / N), as
                # dy * k1 + x * k2 + k3 with per-channel k1, k2, k3
                n = total[g].to(mean.dtype)
                k1 = w * invstd[g]
                k2 = -k1 * invstd[g] * sums[g, 1] / n
                k3 = -k1 * sums[g, 0] / n - k2 * mean[g]
                _affine(xf[rows], k2, k3, grad_x[rows])
                grad_x[rows].addcmul_(dy[rows], k1.view(shape))
            grad_x = grad_x.to(x.dtype)
        # the parameters' gradients are this rank's share: DDP sums (averages) them over ranks
        grad_w = grad_b = None
        if ctx.weight_dtype is not None and ctx.needs_input_grad[1]:
            grad_w = local[:, 1].sum(0).to(ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = local[:, 0].sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


class GlobalBatchNorm(_AnyBatchNorm):
    """``nn.BatchNorm`` whose training statistics span every rank of the default process group.

    Accepts inputs of shape ``(N, C, *)`` (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...);
    the constructor arguments are those of ``nn.BatchNorm2d``. In eval mode it is exactly
    ``nn.BatchNorm`` on the local input: every rank may run it alone. Inside
    :func:`batch_groups` its input's rows are equal blocks normalised separately (the views of
    a one-pass forward), with one collective for all of them.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return self._grouped(self._plain_forward, input)
        if world_size() == 1 and self.groups == 1:
            return self._plain_forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels (dim 1), got input of shape "
                f"{tuple(input.shape)}"
            )
        return _GlobalNorm.apply(input, self.weight, self.bias, self, self.groups)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # running_var receives the unbiased (Bessel-corrected) variance; no host sync to check
        # the count: a global batch of one value per channel would give a NaN here where
        # nn.BatchNorm raises, which needs every rank but one to hold no sample
        _update_running(self, mean, var * (count / (count - 1)))


class LocalBatchNorm(_AnyBatchNorm):
    """``nn.BatchNorm`` on the local batch whose running statistics are updated from every rank's
    batches, in global order, by :func:`apply_recorded_statistics` (see the module docstring).

    Normalisation in training mode is ``nn.BatchNorm``'s on the local input (in fp32 when the
    parameters were cast to half precision); eval mode is exactly ``nn.BatchNorm``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[Tensor] = []  # per training forward: mean and unbiased variance

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not self.track_running_stats:
            return self._grouped(self._plain_forward, input)
        self._check_input_dim(input)
        return self._grouped(self._local_forward, input)

    def _local_forward(self, input: Tensor) -> Tensor:
        dtype = torch.float32 if self.running_mean is None else self.running_mean.dtype
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
        with torch.no_grad():  # F.batch_norm refused a batch of one value per channel
            dims = [0, *range(2, input.dim())]
            var, mean = torch.var_mean(input.to(dtype), dims, correction=1)
            self.records.append(torch.cat([mean, var]))
        return out


@contextlib.contextmanager
def batch_groups(module: nn.Module, groups: int) -> Iterator[None]:
    """Forwards of ``module`` inside this block take inputs made of ``groups`` equal blocks of
    rows (two views of one batch, concatenated) that every BatchNorm normalises separately, as
    if each block were a forward of its own. Raises ``ValueError`` when ``module`` has a
    BatchNorm that cannot (``nn.BatchNorm``, ``nn.SyncBatchNorm``): see :func:`groups_supported`."""
    if not groups_supported(module):
        raise ValueError("batch_groups needs every BatchNorm of the module to be one of ours")
    layers = [m for m in module.modules() if isinstance(m, _AnyBatchNorm)]
    for m in layers:
        m.groups = groups
    try:
        yield
    finally:
        for m in layers:
            m.groups = 1


def groups_supported(module: nn.Module) -> bool:
    """Whether every BatchNorm in ``module`` can normalise blocks of rows separately
    (:func:`batch_groups`): true for ours, and for a module without BatchNorm."""
    return all(isinstance(m, _AnyBatchNorm) for m in module.modules() if isinstance(m, _BatchNorm))


@contextlib.contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[None]:
    """Forwards inside this block leave every BatchNorm's running statistics (and
    :class:`LocalBatchNorm`'s records) as they were."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [
        (
            m,
            [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)],
            len(getattr(m, "records", ())),
        )
        for m in layers
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers, records in saved:
                for live, old in zip(
                    (m.running_mean, m.running_var, m.num_batches_tracked), buffers, strict=True
                ):
                    live.copy_(old)
                if isinstance(m, LocalBatchNorm):
                    del m.records[records:]


@torch.no_grad()
def apply_recorded_statistics(module: nn.Module, micro_batches: int = 1) -> None:
    """Apply the statistics every :class:`LocalBatchNorm` of ``module`` recorded since the last
    call, of all ranks (one all-gather), to the running statistics in global order: the
    records of each rank are ``micro_batches`` equal runs, taken micro-batch by micro-batch and,
    within one, rank by rank. Every rank ends with the same buffers; every rank must call it
    after the same forwards."""
    layers = [m for m in module.modules() if isinstance(m, LocalBatchNorm) and m.records]
    if not layers:
        return
    local = torch.cat([torch.cat(m.records) for m in layers])
    gathered = [local]
    if world_size() > 1:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
    offset = 0
    for m in layers:
        width, count = 2 * m.num_features, len(m.records)
        if count % micro_batches:
            raise ValueError(f"{count} BatchNorm records do not split into {micro_batches} runs")
        per_micro = count // micro_batches
        for k in range(micro_batches):
            for rank_records in gathered:
                for i in range(k * per_micro, (k + 1) * per_micro):
                    record = rank_records[offset + i * width : offset + (i + 1) * width]
                    _update_running(m, record[: m.num_features], record[m.num_features :])
        offset += count * width
        m.records.clear()


def _update_running(m: _BatchNorm, mean: Tensor, unbiased_var: Tensor) -> None:
    """``nn.BatchNorm``'s update of the running statistics by one batch's: an exponential
    average, or a cumulative one when momentum is None."""
    m.num_batches_tracked.add_(1)
    factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    m.running_mean.lerp_(mean.to(m.running_mean.dtype), factor)
    m.running_var.lerp_(unbiased_var.to(m.running_var.dtype), factor)


def _convert(module: nn.Module, cls: type[_BatchNorm]) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a ``cls``, sharing its parameter
    and buffer tensors (an optimizer built before the conversion keeps working) and its training
    flag; state-dict keys and values are unchanged."""
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, cls):
        out = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out
    for name, child in module.named_children():
        converted = _convert(child, cls)
        if converted is not child:
            module.add_module(name, converted)
    return module


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`GlobalBatchNorm` (see
    ``_convert``). Returns the converted module (a new object when ``module`` itself is one)."""
    return _convert(module, GlobalBatchNorm)


def convert_local_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`LocalBatchNorm`."""
    return _convert(module, LocalBatchNorm)
