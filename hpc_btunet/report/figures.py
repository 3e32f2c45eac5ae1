"""The paper's Fig. 4 (change with Barlow Twins per model) and Fig. 5 (predictions over test
images), drawn with matplotlib's Agg backend into files written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hpc_btunet.atomic import atomic_open
from hpc_btunet.report.table import COLUMNS, DISPLAY_NAMES, model_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def fold_changes(results: list[dict], aggregate: str) -> list[dict]:
    """Per model and metric: the percentage change with BT. ``change_of_means`` = 100 (mean BT -
    mean scratch) / mean scratch; per fold k (folds are paired), 100 (BT_k - scratch_k) /
    scratch_k, summarised as mean and sample std over folds. A zero scratch value makes a
    relative change undefined: None, never a division by zero."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        by.setdefault((r["model"], r["variant"]), {})[r["fold"]] = r["test"][aggregate]
    rows = []
    for model in model_order(m for m, _ in by):
        bt, scratch = by.get((model, "bt"), {}), by.get((model, "scratch"), {})
        folds = sorted(set(bt) & set(scratch))
        if not folds:
            continue
        for metric, short in COLUMNS:
            b = np.array([bt[k][metric] for k in folds])
            s = np.array([scratch[k][metric] for k in folds])
            per_fold = [100 * (x - y) / y for x, y in zip(b, s, strict=True) if y > 0]
            undefined = len(folds) - len(per_fold)
            rows.append(
                {
                    "model": model,
                    "metric": short,
                    "folds": len(folds),
                    "change_of_means_pct": (
                        100 * (b.mean() - s.mean()) / s.mean() if s.mean() > 0 else None
                    ),
                    "fold_change_mean_pct": float(np.mean(per_fold)) if per_fold else None,
                    "fold_change_std_pct": (
                        float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else None
                    ),
                    "folds_undefined": undefined,
                }
            )
    return rows


def change_figure(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: per model, one bar per metric (mean per-fold change), error bars = sample
    std over folds; an undefined change is marked n/a."""
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    metrics = [short for _, short in COLUMNS]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(models) + 2), 3.8))
    width = 0.8 / len(metrics)
    colours = ("#4C72B0", "#DD8452", "#55A868")
    for j, metric in enumerate(metrics):
        xs, heights, errors = [], [], []
        for i, model in enumerate(models):
            row = next(r for r in rows if r["model"] == model and r["metric"] == metric)
            x = i + (j - (len(metrics) - 1) / 2) * width
            value = row["fold_change_mean_pct"]
            if value is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8, rotation=90)
                continue
            xs.append(x)
            heights.append(value)
            errors.append(row["fold_change_std_pct"] or 0.0)
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=metric, color=colours[j])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), [DISPLAY_NAMES.get(m, m) for m in models])
    ax.set_ylabel("change with BT (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(title="metric", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def choose_images(mean_dice: dict[str, float], count: int) -> list[str]:
    """Test images spread over the difficulty range, reproducibly: the images sorted by their
    Dice averaged over every run shown (then by key), taken at ``count`` evenly spaced ranks
    from the hardest to the easiest."""
    ranked = sorted(mean_dice, key=lambda k: (mean_dice[k], k))
    if len(ranked) <= count:
        return ranked
    picks = np.linspace(0, len(ranked) - 1, count).round().astype(int)
    return [ranked[i] for i in dict.fromkeys(picks.tolist())]


def _display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """H x W x C uint8 -> what imshow shows: RGB as is, else the first channel in grey."""
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image[..., :3], None
    return (image[..., 0] if image.ndim == 3 else image), "gray"


def qualitative_figure(
    keys: list[str],
    images: dict[str, np.ndarray],
    truths: dict[str, np.ndarray],
    columns: list[tuple[str, dict[str, np.ndarray]]],
    path: Path,
    title: str,
) -> None:
    """Rows: test images; columns: the image, its ground truth, then each (title, masks by key)
    prediction, as contours over the image (ground truth green, prediction red)."""
    plt = _pyplot()
    n_cols = 2 + len(columns)
    fig, axes = plt.subplots(
        len(keys), n_cols, figsize=(1.9 * n_cols, 1.95 * len(keys) + 0.4), squeeze=False
    )
    for row, key in enumerate(keys):
        shown, cmap = _display(images[key])
        panels = [("image", None, None), ("ground truth", truths[key], "#2ca02c")]
        panels += [(name, masks[key], "#d62728") for name, masks in columns]
        for col, (name, mask, colour) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=255)
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
            if mask is not None and col >= 2 and truths[key].any():
                ax.contour(
                    truths[key].astype(float),
                    levels=[0.5],
                    colors=["#2ca02c"],
                    linewidths=0.6,
                    linestyles="dashed",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(key if len(key) <= 18 else key[:8] + "..." + key[-7:], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
