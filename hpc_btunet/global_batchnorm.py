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

The reductions are autograd-aware all-reduces (sum, then sum of squared deviations: two passes
instead of E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std), computed in
float32 at least. With the collectives' summing backward, the input and parameter gradients are
exactly those of the global batch: summed over ranks for the sum of the per-rank losses, or, with
DDP's averaging, for their mean (see :mod:`hpc_btunet.distributed`).

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

from hpc_btunet.distributed import all_reduce_sum, world_size

__all__ = [
    "GlobalBatchNorm",
    "LocalBatchNorm",
    "apply_recorded_statistics",
    "convert_global_batchnorm",
    "convert_local_batchnorm",
    "frozen_statistics",
]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _AnyBatchNorm(_BatchNorm):
    """``nn.BatchNorm`` for inputs of shape ``(N, C, *)``, also when DeepSpeed's bf16/fp16 cast
    its parameters (not its buffers) to half precision: then in fp32 with fp32 copies."""

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


class GlobalBatchNorm(_AnyBatchNorm):
    """``nn.BatchNorm`` whose training statistics span every rank of the default process group.

    Accepts inputs of shape ``(N, C, *)`` (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...);
    the constructor arguments are those of ``nn.BatchNorm2d``. In eval mode it is exactly
    ``nn.BatchNorm`` on the local input: every rank may run it alone.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return self._plain_forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels (dim 1), got input of shape "
                f"{tuple(input.shape)}"
            )
        return self._global_forward(input)

    def _global_forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        dims = [0, *range(2, x.dim())]
        stat_shape = (1, -1) + (1,) * (x.dim() - 2)

        # one collective for the per-channel sums and the count; float64 keeps the count exact
        # (float32 is exact only up to 2**24 values per channel) and costs nothing at C numbers
        local = torch.cat(
            [
                xf.sum(dims).double(),
                torch.tensor(
                    [x.numel() // self.num_features], dtype=torch.float64, device=x.device
                ),
            ]
        )
        totals = all_reduce_sum(local)
        count = totals[-1].detach()
        mean = (totals[:-1] / count).to(dtype)
        centred = xf - mean.view(stat_shape)
        var = all_reduce_sum(centred.square().sum(dims)) / count.to(dtype)  # biased

        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)

        out = centred * torch.rsqrt(var + self.eps).view(stat_shape)
        if self.weight is not None:
            out = out * self.weight.view(stat_shape)
        if self.bias is not None:  # recent torch allows affine=True with bias=False
            out = out + self.bias.view(stat_shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # running_var receives the unbiased (Bessel-corrected) variance; no host sync to check
        # the count: a global batch of one value per channel would give a NaN here where
        # nn.BatchNorm raises, which needs every rank but one to hold no sample
        _update_running(self, mean, var * (count / (count - 1)).to(var.dtype))


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
            return self._plain_forward(input)
        self._check_input_dim(input)
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
