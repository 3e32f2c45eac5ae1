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


class ScoreSeparation:
    """How a score map in [0, 1] (a probability, a scaled activation map) tells lesion pixels
    from the rest, before any threshold: streamed into two histograms of ``bins`` equal bins.

    ``compute()`` gives the mean score on lesion pixels and on the other pixels, and the pixel
    AUROC, the probability that a lesion pixel scores above another pixel (ties count 1/2):
    0.5 for a map that does not locate lesions at all, 1 for one that separates them by some
    threshold. Scores within one bin count as tied, so it is exact for scores that are multiples
    of ``1 / (bins - 1)`` and within half the tied mass of the exact value otherwise."""

    def __init__(self, bins: int = 1001) -> None:
        self.bins = bins
        self.hist = torch.zeros(2, bins, dtype=torch.float64)  # other pixels, lesion pixels
        self.sums = torch.zeros(2, dtype=torch.float64)

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        s = scores.detach().flatten().to(torch.float64).clamp(0, 1).cpu()
        t = target.flatten().bool().cpu()
        index = torch.round(s * (self.bins - 1)).long()
        for c, part in enumerate((~t, t)):
            self.hist[c] += torch.bincount(index[part], minlength=self.bins).to(torch.float64)
            self.sums[c] += s[part].sum()

    def compute(self) -> dict[str, float | None]:
        counts = self.hist.sum(dim=1)
        other, lesion = (float(self.sums[c] / counts[c]) if counts[c] else None for c in (0, 1))
        auroc = None
        if counts.all():
            below = torch.cumsum(self.hist[0], 0) - self.hist[0]  # other pixels in lower bins
            won = (self.hist[1] * (below + self.hist[0] / 2)).sum()
            auroc = float(won / (counts[0] * counts[1]))
        return {"lesion_mean": lesion, "other_mean": other, "auroc": auroc}
