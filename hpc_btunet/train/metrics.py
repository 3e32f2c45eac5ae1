"""Segmentation metrics of the BT-Unet paper (Eq. 7-9), with the empty cases decided once.

Precision = TP / (TP + FP), Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), on binary
masks (probability >= 0.5). Two aggregates are reported:

- ``mean``: the metric of each test image, averaged over images;
- ``pooled``: TP, FP and FN summed over all test images, then the metric (micro average).

Empty cases (a zero denominator) follow one rule: when the mask and the prediction are both empty
the image is segmented perfectly and every metric is 1; when nothing is predicted but the mask is
not empty, precision is 0 (as are Dice and IoU). This is MONAI's ``ignore_empty=False``
convention, and it gives the 0.000 precision the paper reports for a model that predicts no
foreground at all (rather than NaN, which ``nanmean`` would silently drop).
"""

from __future__ import annotations

import torch

METRICS = ("precision", "dice", "iou")


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image (TP, FP, FN) counts, shape N x 3, of binary N x 1 x H x W tensors."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    return torch.stack([tp, fp, fn], 1).to(torch.float64)


def scores(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, Dice and IoU from (TP, FP, FN) counts (... x 3), with the empty-case rule."""
    tp, fp, fn = counts.unbind(-1)
    both_empty = (tp + fp + fn) == 0

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        value = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
        return torch.where(both_empty, torch.ones_like(value), value)

    return {
        "precision": ratio(tp, tp + fp),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
    }


class SegmentationMetrics:
    """Accumulates per-image counts over batches; ``compute()`` gives mean and pooled metrics."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.counts: list[torch.Tensor] = []

    def update(self, probabilities: torch.Tensor, target: torch.Tensor) -> None:
        self.counts.append(confusion(probabilities >= self.threshold, target).cpu())

    def per_image(self) -> dict[str, torch.Tensor]:
        """Each image's precision, Dice and IoU (float64, in the order evaluated)."""
        if not self.counts:
            raise ValueError("no images were evaluated")
        return scores(torch.cat(self.counts))

    def compute(self) -> dict[str, dict[str, float]]:
        if not self.counts:
            raise ValueError("no images were evaluated")
        counts = torch.cat(self.counts)
        per_image = scores(counts)
        pooled = scores(counts.sum(0))
        return {
            "mean": {m: float(per_image[m].mean()) for m in METRICS},
            "pooled": {m: float(pooled[m]) for m in METRICS},
            "images": int(counts.shape[0]),
        }
