"""Optimisers and learning-rate schedules for the jobs.

Adam is the default (the BT-Unet paper). LARS is there for large global batches, as the official
Barlow Twins uses: its learning rate is scaled linearly with the global batch (``lr * B / 256``),
and biases and normalisation parameters are excluded from weight decay and from the layer-wise
adaptation. Adam's learning rate is used as given.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adam", "lars")


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For each parameter with ``adapt=True`` in its group the update is scaled by
    ``eta * ||w|| / ||g + wd * w||`` (1 when either norm is zero).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 1e-3,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=True)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["adapt"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0
                    )
                    d = d.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float, global_batch: int
) -> Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "lars":
        weights = [p for p in model.parameters() if p.ndim > 1]
        others = [p for p in model.parameters() if p.ndim <= 1]  # biases, norm scales and shifts
        groups = [{"params": weights}, {"params": others, "weight_decay": 0.0, "adapt": False}]
        return LARS(groups, lr=lr * global_batch / 256, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, final_ratio: float = 0.01
) -> LambdaLR:
    """Linear warm-up, then cosine decay reaching ``final_ratio`` of the base rate at ``total_steps``
    (the schedule is defined on the real number of optimiser steps, so it never ends early)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
