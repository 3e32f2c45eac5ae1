"""Statistics the BT-Unet paper does not give: is the change with Barlow Twins larger than the
spread between folds, and between test images?

- Over folds (paired: fold k of ``bt`` and fold k of ``scratch`` train on the same images): the
  mean difference BT - scratch, its 95 % confidence interval from the t distribution with n - 1
  degrees of freedom, the paired t-test and the Wilcoxon signed-rank test (scipy's exact
  distribution, two-sided). With n non-zero differences the smallest two-sided Wilcoxon p-value
  is 2 / 2^n: 0.0625 for 5 folds, so 5 folds can never reach p < 0.05 with it, however large
  the effect. The folds' training sets overlap and share the test split, so fold differences
  are not independent: both tests and the interval are optimistic.
- Over test images: per image, its Dice averaged over the paired folds of each variant; the
  mean of the per-image differences with a percentile bootstrap interval (images resampled
  with replacement, a fixed seed). It describes this test set, not a new one.

Values that cannot be computed are None, with the reason in the row's ``note``: never NaN, inf
or a warning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from hpc_btunet.report.table import COLUMNS, model_order

LEVEL = 0.95


def wilcoxon_smallest_p(n: int) -> float:
    """The smallest two-sided p-value of the exact signed-rank test with n non-zero differences."""
    return 2.0 / 2**n if n > 0 else 1.0


def paired_folds(bt: np.ndarray, scratch: np.ndarray) -> dict:
    """The paired comparison of one metric over folds (``bt[k]`` with ``scratch[k]``)."""
    bt, scratch = np.asarray(bt, dtype=float), np.asarray(scratch, dtype=float)
    d = bt - scratch
    n = len(d)
    nonzero = d[d != 0]
    out: dict = {
        "folds": n,
        "mean_difference": float(d.mean()) if n else None,
        "ci_low": None,
        "ci_high": None,
        "t_p": None,
        "wilcoxon_p": None,
        "wilcoxon_smallest_p": wilcoxon_smallest_p(len(nonzero)),
        "note": "",
    }
    if n < 2:
        out["note"] = "n/a: fewer than 2 paired folds (the interval and the tests need 2)"
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    out["ci_low"], out["ci_high"] = out["mean_difference"] - half, out["mean_difference"] + half
    if len(nonzero) == 0:
        out["note"] = "n/a: no fold differs (every difference is 0)"
        return out
    notes = []
    if sd <= 1e-12 * max(1.0, abs(out["mean_difference"])):  # equal up to rounding
        notes.append("t-test n/a: every fold differs by the same amount (no spread)")
    else:
        out["t_p"] = float(stats.ttest_rel(bt, scratch).pvalue)
    out["wilcoxon_p"] = float(stats.wilcoxon(nonzero, method="exact").pvalue)
    if len(nonzero) < n:
        notes.append(f"Wilcoxon over the {len(nonzero)} non-zero difference(s)")
    if len(np.unique(np.abs(nonzero))) < len(nonzero):
        notes.append("tied |differences|: the exact Wilcoxon p assumes none (approximate)")
    out["note"] = "; ".join(notes)
    return out


def fold_statistics(results: list[dict], aggregate: str) -> list[dict]:
    """Per model with paired folds and per metric: :func:`paired_folds` over the folds that
    finished with and without BT."""
    by = {(r["model"], r["variant"], int(r["fold"])): r["test"][aggregate] for r in results}
    rows = []
    for model in model_order(r["model"] for r in results):
        folds = sorted(
            k for (m, v, k) in by if m == model and v == "bt" and (m, "scratch", k) in by
        )
        if not folds:
            continue
        for metric, short in COLUMNS:
            bt = np.array([by[(model, "bt", k)][metric] for k in folds])
            scratch = np.array([by[(model, "scratch", k)][metric] for k in folds])
            rows.append({"model": model, "metric": short} | paired_folds(bt, scratch))
    return rows


def bootstrap_mean(
    differences: np.ndarray, resamples: int = 10_000, seed: int = 0, chunk: int = 500
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``differences`` and its percentile bootstrap interval at
    ``LEVEL`` (numpy's linear quantiles of the resampled means), resampling in chunks so that
    memory stays at ``chunk`` x n indices."""
    d = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        means[start : start + size] = d[rng.integers(0, len(d), size=(size, len(d)))].mean(1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(d.mean()), float(low), float(high)


def per_image_dice(predictions: dict) -> tuple[np.ndarray, np.ndarray]:
    """(keys, Dice averaged over folds) from ``{fold: predictions}`` (each with ``keys`` and
    ``dice``), over the test images every fold evaluated, keys sorted."""
    folds = sorted(predictions)
    common = set(predictions[folds[0]]["keys"].tolist())
    for k in folds[1:]:
        common &= set(predictions[k]["keys"].tolist())
    keys = np.array(sorted(common))
    total = np.zeros(len(keys))
    for k in folds:
        index = {key: i for i, key in enumerate(predictions[k]["keys"].tolist())}
        total += np.asarray(predictions[k]["dice"], dtype=float)[[index[key] for key in keys]]
    return keys, total / len(folds)


def dice_bootstrap(
    models: list[str], predictions: dict, resamples: int, seed: int
) -> tuple[list[dict], list[str]]:
    """Per model of ``models``: the per-image paired bootstrap of Dice BT - scratch over the
    folds where both variants have predictions (``predictions``: ``{(model, variant, fold):
    Predictions}``). Returns the rows and, for each model left out, why."""
    rows, skipped = [], []
    for model in models:
        have = {
            v: {k for m, vv, k in predictions if m == model and vv == v} for v in ("bt", "scratch")
        }
        folds = sorted(have["bt"] & have["scratch"])
        if not folds:
            skipped.append(f"{model}: no fold has predictions with and without BT")
            continue
        averaged = {}
        for v in ("bt", "scratch"):
            runs = {k: predictions[(model, v, k)] for k in folds}
            averaged[v] = per_image_dice(
                {k: {"keys": p.keys, "dice": p.dice} for k, p in runs.items()}
            )
        (keys_bt, bt), (keys_sc, scratch) = averaged["bt"], averaged["scratch"]
        common, in_bt, in_sc = np.intersect1d(keys_bt, keys_sc, return_indices=True)
        if len(common) == 0:
            skipped.append(f"{model}: the runs with and without BT share no test image")
            continue
        mean, low, high = bootstrap_mean(bt[in_bt] - scratch[in_sc], resamples, seed)
        rows.append(
            {
                "model": model,
                "folds": len(folds),
                "images": len(common),
                "mean": mean,
                "low": low,
                "high": high,
            }
        )
    return rows, skipped
