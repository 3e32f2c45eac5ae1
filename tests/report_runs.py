"""Hand-made experiment folders for the report's tests: fine-tuning results, predictions.npz in
the fine-tuning job's format, run configs and the experiment record; no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from conftest import ToySource

from hpc_btunet.data.manifest import load_manifest, sha256_file
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.splits import SplitConfig


def pack_data(out: Path, n: int = 30, image_size: int = 16, channels: int = 1) -> Path:
    cfg = PackConfig(out=out, image_size=image_size, splits=SplitConfig(folds=3))
    pack(ToySource(n=n, channels=channels), cfg, log=lambda _: None)
    return out


def split_keys(data: Path) -> list[str]:
    """The dataset's test keys."""
    return load_manifest(data).splits["test"]


def write_run(
    exp: Path,
    model: str,
    variant: str,
    fold: int,
    value: float | dict,
    *,
    predictions: dict | None = None,
    train_seconds: float = 2.0,
    config: dict | None = None,
) -> Path:
    """``metrics.json`` with test metrics ``value`` (one number for Pr, DC and IoU, or a dict);
    ``predictions``: arrays of ``predictions.npz`` (keys, masks, precision, dice, iou)."""
    folder = exp / "finetune" / model / variant / f"fold-{fold}"
    folder.mkdir(parents=True)
    metrics = value if isinstance(value, dict) else {m: value for m in ("precision", "dice", "iou")}
    result = {
        "model": model,
        "variant": variant,
        "fold": fold,
        "test": {"mean": metrics, "pooled": metrics},
        "train_seconds": train_seconds,
    }
    if predictions is not None:
        np.savez_compressed(folder / "predictions.npz", **predictions)
        result["predictions"] = "predictions.npz"
    (folder / "metrics.json").write_text(json.dumps(result))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def predictions_of(keys: list[str], dice, size: int = 16, masks=None) -> dict:
    """A predictions.npz's arrays: ``dice`` per key (a number: the same for every key), masks
    all ones unless given."""
    n = len(keys)
    dice = np.broadcast_to(np.asarray(dice, dtype=np.float64), (n,)).copy()
    return {
        "keys": np.array(keys),
        "masks": np.ones((n, size, size), np.uint8) if masks is None else masks,
        "precision": dice.copy(),
        "dice": dice,
        "iou": dice / (2 - dice),
    }


def write_record(exp: Path, data: Path | str, models: list[str], folds: int, **extra) -> None:
    manifest = Path(data) / "manifest.json"
    record = {
        "format": 1,
        "data": str(data),
        "manifest_sha256": sha256_file(manifest) if manifest.exists() else "0" * 64,
        "models": models,
        "variants": ["bt", "scratch"],
        "folds": folds,
        "tasks": {},
    } | extra
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "experiment.json").write_text(json.dumps(record))
