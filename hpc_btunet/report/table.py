"""Tables from fine-tuning results: the layout of Table 2 of the BT-Unet paper.

Reads ``<experiment>/finetune/<model>/<bt|scratch>/fold-<k>/metrics.json`` and gives, per model and
with/without Barlow Twins, precision, Dice and IoU on the test split as mean +- standard deviation
over folds (sample std, ddof=1). Each fold contributes its per-image mean by default (``pooled``
is the other choice); the empty-mask rule is the one stated in each metrics file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from hpc_btunet.errors import UserError

DISPLAY_NAMES = {
    "unet": "U-Net",
    "attention_unet": "A-Unet",
    "inception_unet": "I-Unet",
    "rca_iunet": "RCA-IUnet",
    "unet_plus_plus": "UNet++",
}
COLUMNS = (("precision", "Pr"), ("dice", "DC"), ("iou", "IoU"))


def _read_result(path: Path) -> dict:
    """One fold's ``metrics.json``, refused with the file's name when it is not one."""
    fix = (
        "remove it and run that fold again (`hpc-btunet finetune ... --fold K` skips the "
        "folds that are complete)"
    )
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): {fix}") from None
    try:
        ok = isinstance(result["model"], str) and result["variant"] in ("bt", "scratch")
        for aggregate in ("mean", "pooled"):
            ok = ok and all(isinstance(result["test"][aggregate][m], float) for m, _ in COLUMNS)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is not a fine-tuning result (fields missing or mistyped): {fix}")
    return result


def model_order(models) -> list[str]:
    """Models in the paper's order (then any other by name), each once."""
    order = list(DISPLAY_NAMES)
    unique = list(dict.fromkeys(models))
    return sorted(unique, key=lambda m: (order.index(m) if m in order else len(order), m))


def collect(experiment: Path) -> list[dict]:
    if not Path(experiment).is_dir():
        raise UserError(
            f"--experiment {experiment} is not a folder: pass the --out folder of the jobs"
        )
    files = sorted(Path(experiment).glob("finetune/*/*/fold-*/metrics.json"))
    if not files:
        raise UserError(
            f"no fine-tuning results under {experiment}/finetune/: run `hpc-btunet finetune` (or `demo`) first"
        )
    return [_read_result(f) for f in files]


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
