"""The paper's Fig. 4 (change with Barlow Twins per model) and Fig. 5 (predictions over test
images): their numbers, their choices, and the drawings (matplotlib's Agg backend, into files
written atomically).

Fig. 4, per model and metric, with folds paired (fold k with and without BT trains on the same
images and is tested on the same test split): change_k = 100 (BT_k - scratch_k) / scratch_k;
the bar is the mean over folds, the error bar the sample std over folds, dots are the folds.
``change_of_means`` = 100 (mean BT - mean scratch) / mean scratch is given beside it. A scratch
value of 0 leaves the relative change undefined: that fold is left out and counted (n/a), and a
bar without any defined fold reads n/a; nothing is divided by zero.

Fig. 5: rows are test images, columns the image, its ground truth and each model's prediction
without and with BT (contours over the image), from one fold: the first fold that every
(model, variant) shown finished with predictions. Images are ``--images`` when given, else
``count`` of them spread over the difficulty range: the test images ranked by their Dice
averaged over the runs shown (ties by key), taken at evenly spaced ranks from the hardest to the
easiest. The same results give the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_btunet.atomic import atomic_open
from hpc_btunet.errors import UserError
from hpc_btunet.report.table import COLUMNS, DISPLAY_NAMES, model_order

METRIC_COLOURS = ("#0072B2", "#E69F00", "#009E73")  # Okabe-Ito: blue, orange, bluish green
TRUTH_COLOUR = "#FFE119"  # yellow
PREDICTION_COLOUR = "#00E5FF"  # cyan: apart from yellow for the common colour-vision types


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def display_name(model: str, variant: str | None = None) -> str:
    return DISPLAY_NAMES.get(model, model) + (" + BT" if variant == "bt" else "")


# --- Fig. 4 ------------------------------------------------------------------------------------


def fold_changes(results: list[dict], aggregate: str) -> list[dict]:
    """Per model with paired folds and per metric: the percentage change with BT (see the
    module's definition). Undefined values are None."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        by.setdefault((r["model"], r["variant"]), {})[int(r["fold"])] = r["test"][aggregate]
    rows = []
    for model in model_order(m for m, _ in by):
        bt, scratch = by.get((model, "bt"), {}), by.get((model, "scratch"), {})
        folds = sorted(set(bt) & set(scratch))
        if not folds:
            continue
        for metric, short in COLUMNS:
            b = np.array([bt[k][metric] for k in folds], dtype=float)
            s = np.array([scratch[k][metric] for k in folds], dtype=float)
            per_fold = [
                (k, 100 * (x - y) / y if y > 0 else None)
                for k, x, y in zip(folds, b, s, strict=True)
            ]
            defined = [c for _, c in per_fold if c is not None]
            rows.append(
                {
                    "model": model,
                    "metric": short,
                    "folds": len(folds),
                    "folds_undefined": len(folds) - len(defined),
                    "mean_scratch": float(s.mean()),
                    "mean_bt": float(b.mean()),
                    "change_of_means_pct": (
                        float(100 * (b.mean() - s.mean()) / s.mean()) if s.mean() > 0 else None
                    ),
                    "fold_change_mean_pct": float(np.mean(defined)) if defined else None,
                    "fold_change_std_pct": (
                        float(np.std(defined, ddof=1)) if len(defined) > 1 else None
                    ),
                    "per_fold_pct": ";".join(
                        f"{k}:{'n/a' if c is None else f'{c:+.2f}'}" for k, c in per_fold
                    ),
                    "per_fold": per_fold,
                }
            )
    return rows


def change_figure(rows: list[dict], path: Path) -> None:
    """Fig. 4: grouped bars, one group per model, one bar per metric (the mean per-fold change),
    error bars = sample std over folds, dots = folds; an undefined change is marked n/a."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    models = list(dict.fromkeys(r["model"] for r in rows))
    metrics = [short for _, short in COLUMNS]
    folds = {r["model"]: r["folds"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(5.5, 1.7 * len(models) + 2.5), 4.2))
    width = 0.8 / len(metrics)
    extent = [0.0]  # every value drawn, so that the axis shows them all (and 0)
    for j, metric in enumerate(metrics):
        colour = METRIC_COLOURS[j % len(METRIC_COLOURS)]
        for i, model in enumerate(models):
            row = next(r for r in rows if r["model"] == model and r["metric"] == metric)
            x = i + (j - (len(metrics) - 1) / 2) * width
            value, error = row["fold_change_mean_pct"], row["fold_change_std_pct"] or 0.0
            if value is None:
                ax.text(x, 0, " n/a (scratch 0)", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            dots = [c for _, c in row["per_fold"] if c is not None]
            ax.bar(
                x,
                value,
                width,
                yerr=error,
                capsize=3,
                color=colour,
                error_kw={"elinewidth": 1, "ecolor": "#333333"},
            )
            ax.plot([x] * len(dots), dots, "o", color="black", markersize=2.5, zorder=3)
            extent += [value - error, value + error, *dots]
            if row["folds_undefined"]:
                n = row["folds_undefined"]
                ax.annotate(
                    f"{n} fold{'s' if n > 1 else ''} n/a",
                    (x, max(value + error, *dots)),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    low, high = min(extent), max(extent)
    pad = 0.15 * max(high - low, 10.0)  # at least +-1.5 points: an all-n/a figure stays legible
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(-0.6, len(models) - 0.4)  # a model whose bars are all n/a keeps its place
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(
        range(len(models)),
        [f"{display_name(m)}\n({folds[m]} fold{'s' if folds[m] != 1 else ''})" for m in models],
    )
    ax.set_xlabel("model (paired folds with and without BT)")
    ax.set_ylabel("change with BT (%)")
    ax.set_title(
        "Fig. 4: change of Pr, DC and IoU with Barlow Twins pre-training\n"
        "bar: mean over folds of 100 (BT - scratch) / scratch; error bar: sample std",
        fontsize=9,
    )
    handles = [
        Patch(color=METRIC_COLOURS[j % len(METRIC_COLOURS)], label=m) for j, m in enumerate(metrics)
    ]
    handles.append(
        Line2D([], [], marker="o", linestyle="", color="black", markersize=2.5, label="one fold")
    )
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


# --- Fig. 5 ------------------------------------------------------------------------------------


@dataclass
class QualitativePlan:
    """What Fig. 5 shows: the fold, the test keys (rows) and the runs (columns)."""

    fold: int
    keys: list[str]
    runs: list[tuple[str, str]]  # (model, variant), in the table's order
    chosen: str  # how the keys were chosen, for the caption


def choose_images(mean_dice: dict[str, float], count: int) -> list[str]:
    """``count`` test images spread over the difficulty range, reproducibly: ranked by Dice
    averaged over the runs shown (then by key), taken at evenly spaced ranks from the hardest
    to the easiest."""
    ranked = sorted(mean_dice, key=lambda k: (mean_dice[k], k))
    if len(ranked) <= count:
        return ranked
    picks = np.linspace(0, len(ranked) - 1, count).round().astype(int)
    return [ranked[i] for i in dict.fromkeys(picks.tolist())]


def check_images(wanted: list[str], test_keys: list[str], where: str) -> None:
    """One ``UserError`` naming every key of ``--images`` that is not a test key."""
    known = set(test_keys)
    unknown = [k for k in wanted if k not in known]
    if unknown:
        example = ", ".join(sorted(known)[:5]) or "none"
        raise UserError(
            f"--images: {', '.join(unknown)} not in the test split of {where}; its "
            f"{len(known)} test keys are e.g. {example}"
        )


def plan_qualitative(
    predictions: dict, wanted: list[str] | None, count: int
) -> QualitativePlan | str:
    """Fig. 5's fold, rows and columns from ``{(model, variant, fold): Predictions}`` (runs with
    usable predictions only), or why it cannot be drawn. ``wanted`` keys must have been checked
    against the test split; a key the chosen fold did not evaluate is refused here."""
    pairs = dict.fromkeys((m, v) for m, v, _ in predictions)
    order = model_order(m for m, _ in pairs)
    runs = sorted(pairs, key=lambda p: (order.index(p[0]), p[1] == "bt"))
    folds = sorted({k for _, _, k in predictions})
    fold = next((k for k in folds if all((m, v, k) in predictions for m, v in runs)), None)
    if fold is None:
        return "no fold has predictions from every model and variant"
    shown = [predictions[(m, v, fold)] for m, v in runs]
    common = set.intersection(*(set(p.keys.tolist()) for p in shown))
    if wanted:
        check_images(wanted, sorted(common), f"fold {fold}'s predictions")
        return QualitativePlan(fold, wanted, runs, "chosen by --images")
    mean = {key: 0.0 for key in common}
    for p in shown:
        for i, key in enumerate(p.keys.tolist()):
            if key in mean:
                mean[key] += float(p.dice[i]) / len(shown)
    chosen = (
        "spread over the difficulty range: test images ranked by Dice averaged over the runs "
        "shown, taken at evenly spaced ranks from the hardest to the easiest"
    )
    return QualitativePlan(fold, choose_images(mean, count), runs, chosen)


def _display(image: np.ndarray, rgb: bool) -> dict:
    """imshow's arguments for an H x W x C uint8 image: RGB as is; otherwise the first channel
    in grey, its contrast stretched to its 1st-99th percentile (display only)."""
    if rgb and image.ndim == 3 and image.shape[-1] >= 3:
        return {"X": image[..., :3]}
    grey = image[..., 0] if image.ndim == 3 else image
    low, high = np.percentile(grey, [1, 99])
    if high <= low:
        low, high = 0, 255
    return {"X": grey, "cmap": "gray", "vmin": low, "vmax": high}


def _outline(ax, mask: np.ndarray, colour: str, width: float, dashed: bool = False) -> None:
    """The mask's outline over an image shown with imshow. The mask is padded with a ring of
    zeros, so that regions touching the border (or filling the image) get closed outlines."""
    if not mask.any():
        return
    h, w = mask.shape
    ax.contour(
        np.arange(-1, w + 1),
        np.arange(-1, h + 1),
        np.pad(mask.astype(float), 1),
        levels=[0.5],
        colors=[colour],
        linewidths=width,
        linestyles="dashed" if dashed else "solid",
    )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def qualitative_figure(
    keys: list[str],
    images: dict[str, np.ndarray],
    truths: dict[str, np.ndarray],
    columns: list[tuple[str, dict[str, np.ndarray], dict[str, float]]],
    path: Path,
    title: str,
    rgb: bool,
) -> None:
    """Fig. 5. Rows: test images; columns: the image, its ground truth, then each (title, masks
    by key, Dice by key) prediction as a contour over the image, the ground truth dashed beside
    it and the image's Dice in the corner."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    n_cols = 2 + len(columns)
    fig, axes = plt.subplots(
        len(keys), n_cols, figsize=(1.9 * n_cols, 1.95 * len(keys) + 0.7), squeeze=False
    )
    for row, key in enumerate(keys):
        shown, truth = _display(images[key], rgb), truths[key]
        panels = [("image", None, None), ("ground truth", None, None)]
        panels += [(name, masks[key], dice[key]) for name, masks, dice in columns]
        for col, (name, mask, dice) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(**shown, interpolation="nearest")
            if col == 1:
                _outline(ax, truth, TRUTH_COLOUR, 1.4)
                if not truth.any():
                    ax.text(
                        0.5,
                        0.5,
                        "empty",
                        transform=ax.transAxes,
                        ha="center",
                        color=TRUTH_COLOUR,
                        fontsize=7,
                    )
            if mask is not None:
                _outline(ax, truth, TRUTH_COLOUR, 0.8, dashed=True)
                _outline(ax, mask.astype(bool), PREDICTION_COLOUR, 1.4)
                label = f"DC {dice:.2f}" + ("" if mask.any() else " (empty)")
                ax.text(
                    0.03,
                    0.97,
                    label,
                    transform=ax.transAxes,
                    ha="left",
                    va="top",
                    fontsize=6.5,
                    color="white",
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "linewidth": 0},
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(key if len(key) <= 18 else key[:8] + "..." + key[-7:], fontsize=7)
    handles = [
        Line2D([], [], color=TRUTH_COLOUR, linewidth=1.4, label="ground truth"),
        Line2D(
            [],
            [],
            color=TRUTH_COLOUR,
            linewidth=0.8,
            linestyle="dashed",
            label="ground truth (beside a prediction)",
        ),
        Line2D([], [], color=PREDICTION_COLOUR, linewidth=1.4, label="prediction (threshold 0.5)"),
    ]
    fig.suptitle(title, fontsize=9)
    legend_height = 0.3 / fig.get_figheight()  # inches -> figure fraction
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    # on grey, the light contour colours read as they do over the images
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=3,
        fontsize=7,
        facecolor="#555555",
        edgecolor="none",
        framealpha=1,
        labelcolor="white",
    )
    _save(fig, path)
    plt.close(fig)
