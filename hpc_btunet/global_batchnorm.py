"""Batch normalisation with statistics over the global batch of all ranks, on any device.

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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from hpc_btunet.distributed import all_reduce_sum, world_size

__all__ = ["GlobalBatchNorm", "convert_global_batchnorm"]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GlobalBatchNorm(_BatchNorm):
    """``nn.BatchNorm`` whose training statistics span every rank of the default process group.

    Accepts inputs of shape ``(N, C, *)`` (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...);
    the constructor arguments are those of ``nn.BatchNorm2d``. In eval mode it is exactly
    ``nn.BatchNorm`` on the local input: every rank may run it alone.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            half_parameters = (  # DeepSpeed's bf16/fp16 cast parameters, not buffers
                self.weight is not None
                and self.running_mean is not None
                and self.weight.dtype != self.running_mean.dtype
            )
            if half_parameters:
                return self._fp32_parameters_forward(input)
            return super().forward(input)
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

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # the same rule as nn.BatchNorm: exponential average, or a cumulative one when momentum
        # is None; running_var receives the unbiased (Bessel-corrected) variance
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        # no host sync to check the count: a global batch of one value per channel would give a
        # NaN here where nn.BatchNorm raises, which needs every rank but one to hold no sample
        unbiased = var * (count / (count - 1)).to(var.dtype)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`GlobalBatchNorm`.

    The new layers share the old ones' parameter and buffer tensors (an optimizer built before the
    conversion keeps working) and their training flag; state-dict keys and values are unchanged.
    Returns the converted module (a new object when ``module`` itself is a batch norm).
    """
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
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
        converted = convert_global_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module
