"""Statistics the BT-Unet paper does not give: is the change with Barlow Twins larger than the
spread between folds, and between test images?

- Over folds (paired: fold k of ``bt`` and fold k of ``scratch`` train on the same images): the
  mean difference BT - scratch, its 95 % confidence interval from the t distribution with n - 1
  degrees of freedom, the paired t-test and the Wilcoxon signed-rank test (exact, two-sided).
  With n folds the smallest two-sided Wilcoxon p-value is 2 / 2^n: 0.0625 for 5 folds, so 5
  folds can never reach p < 0.05 with it, however large the effect.
- Over test images: per image, its Dice averaged over the folds of each variant; the mean of
  the per-image differences with a percentile bootstrap interval (images resampled with
  replacement, a fixed seed). It describes this test set, not a new one.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95


def wilcoxon_smallest_p(n: int) -> float:
    """The smallest two-sided p-value of the exact signed-rank test with n non-zero differences."""
    return 2.0 / 2**n if n > 0 else 1.0


def paired_folds(bt: np.ndarray, scratch: np.ndarray) -> dict:
    """The paired comparison of one metric over folds; values that cannot be computed are None,
    with the reason in ``note``."""
    bt, scratch = np.asarray(bt, dtype=float), np.asarray(scratch, dtype=float)
    d = bt - scratch
    n = len(d)
    out: dict = {
        "folds": n,
        "mean_difference": float(d.mean()) if n else None,
        "ci_low": None,
        "ci_high": None,
        "t_p": None,
        "wilcoxon_p": None,
        "wilcoxon_smallest_p": wilcoxon_smallest_p(int(np.count_nonzero(d))),
        "note": "",
    }
    if n < 2:
        out["note"] = "n/a: fewer than 2 paired folds"
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    out["ci_low"], out["ci_high"] = out["mean_difference"] - half, out["mean_difference"] + half
    if np.count_nonzero(d) == 0:
        out["note"] = "n/a: no fold differs"
        return out
    if sd <= 1e-12 * max(1.0, abs(out["mean_difference"])):  # equal up to rounding
        out["note"] = "t-test n/a: every fold differs by the same amount"
    else:
        out["t_p"] = float(stats.ttest_rel(bt, scratch).pvalue)
    out["wilcoxon_p"] = float(stats.wilcoxon(d[d != 0], method="exact").pvalue)
    return out


def bootstrap_mean(
    differences: np.ndarray, resamples: int = 10_000, seed: int = 0, chunk: int = 500
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``differences`` and its percentile bootstrap interval at
    ``LEVEL``, resampling in chunks so that memory stays at ``chunk`` x n indices."""
    d = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        means[start : start + size] = d[rng.integers(0, len(d), size=(size, len(d)))].mean(1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(d.mean()), float(low), float(high)


def per_image_dice(predictions: dict[int, dict]) -> tuple[np.ndarray, np.ndarray]:
    """(keys, Dice averaged over folds) from ``{fold: {"keys": ..., "dice": ...}}``, over the
    test images every fold evaluated."""
    folds = sorted(predictions)
    common = set(predictions[folds[0]]["keys"].tolist())
    for k in folds[1:]:
        common &= set(predictions[k]["keys"].tolist())
    keys = np.array(sorted(common))
    total = np.zeros(len(keys))
    for k in folds:
        index = {key: i for i, key in enumerate(predictions[k]["keys"].tolist())}
        total += predictions[k]["dice"][[index[key] for key in keys.tolist()]]
    return keys, total / len(folds)
