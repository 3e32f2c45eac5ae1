"""One step of the contrastive UNet++ pair (docs/contrastive.md): the pairs of a global batch, who
sees what, the targets and Eq. 1's weighted sum, for the share of pairs one rank computes.

``pair_loss(pair, images, abnormal, ...)`` takes the *global* batch (every rank holds it: the
images are uint8 and small next to the activations) and the pair indices this rank computes
(``PairPlan.of_rank``); it returns the sum of its member slices' weighted losses and the number
of member slices of the whole global batch, so that the job's loss, ``sum / count`` summed over
ranks, is the mean over every member slice of the global batch whatever the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hpc_btunet.ssl.contrastive import (
    KINDS,
    NEGATIVE_TARGETS,
    NORMAL_TARGETS,
    Distortion,
    DistortionConfig,
    PairPlan,
    hybrid_loss,
)

DISTORTED, NORMAL, NEGATIVE = (KINDS.index(k) for k in KINDS)


class ContrastivePair(nn.Module):
    """Two networks of the same architecture (independently initialised): ``a`` and ``b``.
    ``forward(x_a, x_b)`` gives each network's heads (``forward_heads`` where the model has deep
    supervision, else its one output), one module so that one DDP wrapper covers both."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    @staticmethod
    def _heads(net: nn.Module, x: Tensor) -> list[Tensor]:
        heads = getattr(net, "forward_heads", None)
        return heads(x) if heads is not None else [net(x)]

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self._heads(self.a, x_a), self._heads(self.b, x_b)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The pair's marker probability: the mean of both networks' (``N x 1 x H x W``)."""
        return (torch.sigmoid(self.a(x)) + torch.sigmoid(self.b(x))) / 2


@dataclass(frozen=True)
class PairTargets:
    """The readings of the paper's open points (docs/contrastive.md)."""

    eta: float = 0.5
    normal_target: str = "empty"
    negative_target: str = "complement"

    def __post_init__(self) -> None:
        assert self.normal_target in NORMAL_TARGETS and self.negative_target in NEGATIVE_TARGETS


def _pick(flag: Tensor, if_true: Tensor, if_false: Tensor) -> Tensor:
    """Per row of an ``N x ...`` tensor."""
    return torch.where(flag.view(-1, *([1] * (if_true.dim() - 1))), if_true, if_false)


def pair_loss(
    pair: nn.Module,
    images: Tensor,
    plan: PairPlan,
    rows: Tensor,
    *,
    distortion: DistortionConfig,
    targets: PairTargets,
    seed: int,
    step: int,
) -> tuple[Tensor, int, dict[str, float]]:
    """``images``: the global batch, float ``G x C x H x W``; ``rows``: the pairs of ``plan``
    this rank computes. Returns (sum of the weighted losses of these pairs' member slices, the
    number of member slices in the whole plan, per-kind mean losses of these pairs)."""
    count = 2 * len(plan)
    device = images.device
    if len(rows) == 0:
        # nothing to compute here this step, but the forward still runs (on no image): global
        # BatchNorm's collectives need every rank, and DDP every parameter in the graph
        heads_a, heads_b = pair(images[:0], images[:0])
        zero = sum(h.sum() for h in heads_a + heads_b) + sum(p.sum() for p in pair.parameters())
        return zero * 0.0, count, {}
    first, second = plan.first[rows].to(device), plan.second[rows].to(device)
    kind, swap = plan.kind[rows].to(device), plan.swap[rows].to(device)
    distort = plan.distort[rows].to(device)
    warp = Distortion.draw(distortion, len(plan), seed=seed, step=step, rows=rows)
    x1, x2 = images[first], images[second]
    if distort.any():  # blur and warp only the images that are distorted
        x2 = x2.clone()
        x2[distort] = warp.subset(distort).apply(x2[distort])
    heads_a, heads_b = pair(_pick(swap, x2, x1), _pick(swap, x1, x2))

    # pixels the distortion padded are left out (the whole slice elsewhere)
    valid = _pick(distort, warp.valid(x1), torch.ones_like(x1[:, :1]))
    # eta weighs abnormal members: the first unless the pair is normal, the second when distorted
    w1 = torch.full(kind.shape, targets.eta, dtype=images.dtype, device=device)
    w1[kind == NORMAL] = 1.0
    w2 = torch.ones(kind.shape, dtype=images.dtype, device=device)
    w2[kind == DISTORTED] = targets.eta
    # targets taken from the other member's output (else constants)
    swap_targets = (kind == DISTORTED) | ((kind == NORMAL) & (targets.normal_target == "swap"))
    total = images.new_zeros(())
    by_kind = torch.zeros(len(KINDS), device=device, dtype=total.dtype)
    for la, lb in zip(heads_a, heads_b, strict=True):
        l1, l2 = _pick(swap, lb, la), _pick(swap, la, lb)  # logits of the first, second member
        l1 = _pick(distort, warp.warp(l1), l1)  # into the distorted frame where there is one
        p1, p2 = torch.sigmoid(l1).detach(), torch.sigmoid(l2).detach()
        negative = 1 - p2 if targets.negative_target == "complement" else torch.ones_like(p2)
        t1 = _pick(swap_targets, p2, _pick(kind == NEGATIVE, negative, torch.zeros_like(p2)))
        t2 = _pick(swap_targets, p1, torch.zeros_like(p1))
        h1 = hybrid_loss(l1, t1, valid)
        h2 = hybrid_loss(l2, t2, valid)  # a distorted image is compared where both maps exist
        member = w1 * h1 + w2 * h2
        total = total + member.sum() / len(heads_a)
        by_kind.index_add_(0, kind, (h1 + h2).detach() / (2 * len(heads_a)))
    counts = torch.bincount(kind, minlength=len(KINDS)).clamp_min(1)
    means = (by_kind / counts).tolist()
    stats = {f"loss_{k}": means[i] for i, k in enumerate(KINDS) if (kind == i).any()}
    return total, count, stats
