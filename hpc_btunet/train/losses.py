"""Fine-tuning loss of the BT-Unet paper, Eq. 4: 0.5 * BCE + 0.5 * Dice loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dice_loss(probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Eq. 6: 1 - 2 sum(y p) / (sum(y^2) + sum(p^2)), over the whole batch; ``eps`` keeps an empty
    batch (no foreground anywhere) finite and its loss at 0."""
    p, y = probabilities.flatten(), target.flatten()
    return 1 - (2 * (p * y).sum() + eps) / ((y * y).sum() + (p * p).sum() + eps)


class BceDiceLoss(nn.Module):
    """``bce_weight * BCE + (1 - bce_weight) * Dice`` on logits of a one-channel sigmoid output.

    BCE is the mean over pixels (Eq. 5 writes a sum, which would outweigh the Dice term in [0, 1]
    by the pixel count). It is computed from logits, so it is never identically zero; a known
    defect of the authors' code was a cross-entropy term that vanished on a one-channel output.
    """

    def __init__(self, bce_weight: float = 0.5) -> None:
        super().__init__()
        self.bce_weight = bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        dice = dice_loss(torch.sigmoid(logits.float()), target.float())
        return self.bce_weight * bce + (1 - self.bce_weight) * dice
