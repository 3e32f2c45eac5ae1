"""Tables from fine-tuning results: the layout of Table 2 of the BT-Unet paper.

From the results in ``<experiment>/finetune/<model>/<bt|scratch>/fold-<k>/metrics.json`` (read
and checked by :mod:`hpc_btunet.report.results`), gives per model and with/without Barlow Twins
precision, Dice and IoU on the test split as mean +- standard deviation over folds (sample std,
ddof=1). Each fold contributes its per-image mean by default (``pooled``
is the other choice); the empty-mask rule is the one stated in each metrics file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from hpc_btunet.errors import UserError
from hpc_btunet.report.results import read_results

DISPLAY_NAMES = {
    "unet": "U-Net",
    "attention_unet": "A-Unet",
    "inception_unet": "I-Unet",
    "rca_iunet": "RCA-IUnet",
    "unet_plus_plus": "UNet++",
}
COLUMNS = (("precision", "Pr"), ("dice", "DC"), ("iou", "IoU"))


def model_order(models) -> list[str]:
    """Models in the paper's order (then any other by name), each once."""
    order = list(DISPLAY_NAMES)
    unique = list(dict.fromkeys(models))
    return sorted(unique, key=lambda m: (order.index(m) if m in order else len(order), m))


def collect(experiment: Path) -> list[dict]:
    """The experiment's usable fine-tuning results (:func:`hpc_btunet.report.results.read_results`;
    the files it leaves out are dropped here, ``run`` names them in report.md)."""
    return read_results(experiment)[0]


def summarise(results: list[dict], aggregate: str = "mean") -> list[dict]:
    """One row per (model, variant): fold count and mean/std of each metric over folds."""
    if aggregate not in ("mean", "pooled"):
        raise UserError(f"aggregate must be 'mean' or 'pooled', got {aggregate!r}")
    order = list(DISPLAY_NAMES)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["variant"]), []).append(r)
    rows = []
    for (model, variant), rs in sorted(
        groups.items(),
        key=lambda kv: (
            order.index(kv[0][0]) if kv[0][0] in order else 99,
            kv[0][0],
            kv[0][1] != "scratch",
        ),
    ):
        row = {"model": model, "bt": "Y" if variant == "bt" else "N", "folds": len(rs)}
        for metric, _ in COLUMNS:
            values = np.array([r["test"][aggregate][metric] for r in rs])
            row[metric] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| Model | BT | folds | " + " | ".join(short for _, short in COLUMNS) + " |",
        "| --- | :-: | :-: | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for r in rows:
        cells = [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m, _ in COLUMNS]
        lines.append(
            f"| {DISPLAY_NAMES.get(r['model'], r['model'])} | {r['bt']} | {r['folds']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["model", "bt", "folds"] + [f"{m}{s}" for m, _ in COLUMNS for s in ("", "_std")]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
