"""What an experiment folder holds for the report: the runs it should hold, the predictions of
each fine-tuning run, and the test images of its dataset.

The report reads, never trains or repairs: a file it cannot use is a reason written into
``report.md`` (the figure or interval it would have fed is skipped), not an error. Only input the
user chose (``--images``) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_btunet.errors import UserError

RECORD_NAME = "experiment.json"
VARIANTS = ("bt", "scratch")
Run = tuple[str, str, int]  # (model, variant, fold)


def run_dir(experiment: Path, run: Run) -> Path:
    model, variant, fold = run
    return Path(experiment) / "finetune" / model / variant / f"fold-{fold}"


def run_of(result: dict) -> Run:
    return result["model"], result["variant"], int(result["fold"])


def read_record(experiment: Path) -> tuple[dict | None, str]:
    """``experiment.json`` (None when there is none) and what is wrong with it (or "")."""
    path = Path(experiment) / RECORD_NAME
    if not path.exists():
        return None, ""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{path} is unreadable ({e}); the expected runs are those found"
    if not isinstance(record, dict):
        return None, f"{path} is not an experiment record; the expected runs are those found"
    return record, ""


def expected_runs(results: list[dict], record: dict | None) -> list[Run]:
    """The runs the experiment should hold: models x variants x folds of its record, else each
    (model, variant) found x every fold found."""
    if record and record.get("models"):
        variants = [v for v in VARIANTS if v in record.get("variants", VARIANTS)]
        folds = range(int(record.get("folds", 0)))
        return [(m, v, k) for m in record["models"] for v in variants for k in folds]
    pairs = dict.fromkeys((r["model"], r["variant"]) for r in results)
    folds = sorted({int(r["fold"]) for r in results})
    return [(m, v, k) for m, v in pairs for k in folds]


def missing_runs(experiment: Path, results: list[dict], record: dict | None) -> list[dict]:
    """Expected runs without a result: the run, its folder, whether it started (``config.yaml``
    present: failed, stopped or still running) and the job that last ran it, when recorded."""
    found = {run_of(r) for r in results}
    tasks = (record or {}).get("tasks") or {}
    missing = []
    for run in expected_runs(results, record):
        if run in found:
            continue
        folder = run_dir(experiment, run)
        task = tasks.get("finetune/{}/{}/fold-{}".format(*run)) or {}
        missing.append(
            {
                "run": run,
                "folder": folder,
                "started": (folder / "config.yaml").exists(),
                "job": task.get("job_id"),
                "log": task.get("log"),
            }
        )
    return missing


@dataclass
class Predictions:
    """One run's ``predictions.npz``: test keys in evaluation order and per-image Dice; the
    masks (N x H x W, 0/1) are read only when a figure needs them."""

    path: Path
    keys: np.ndarray
    dice: np.ndarray
    _masks: np.ndarray | None = field(default=None, repr=False)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys.tolist())}

    def masks(self) -> np.ndarray:
        if self._masks is None:
            with np.load(self.path) as z:
                masks = z["masks"]
            if masks.ndim != 3 or len(masks) != len(self.keys):
                raise ValueError(f"masks of shape {masks.shape} for {len(self.keys)} keys")
            self._masks = masks
        return self._masks


def read_predictions(experiment: Path, result: dict) -> Predictions | str:
    """The run's predictions, or why there are none usable (a sentence for report.md)."""
    name = result.get("predictions")
    folder = run_dir(experiment, run_of(result))
    if not name:
        return f"{folder}: no predictions.npz (a run of an older version)"
    path = folder / name
    try:
        with np.load(path) as z:
            keys, dice = z["keys"], z["dice"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        return f"{path}: unreadable ({e})"
    if keys.dtype.kind != "U" or keys.ndim != 1 or dice.shape != keys.shape:
        return f"{path}: keys {keys.dtype} {keys.shape} and dice {dice.shape} do not match"
    if not np.isfinite(dice).all():
        return f"{path}: per-image Dice holds NaN or infinite values"
    return Predictions(path, keys, dice.astype(float))


def dataset_of(experiment: Path, results: list[dict], record: dict | None) -> Path | None:
    """The packed dataset of the experiment: its record's, else the first run's config."""
    if record and record.get("data"):
        return Path(record["data"])
    for result in results:
        data = read_yaml(run_dir(experiment, run_of(result)) / "config.yaml").get("config") or {}
        if data.get("data"):
            return Path(data["data"])
    return None


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


@dataclass
class TestSplit:
    """The dataset's test keys and how Fig. 5 shows its images."""

    keys: list[str]
    sha256: str
    rgb: bool  # 3 or 4 channels of one colour image (not volume modalities): shown in colour
    shown: str  # what the image column shows, for the caption


def read_test_split(data: Path | None) -> TestSplit | str:
    """The dataset's test split, or why it cannot be read here."""
    from hpc_btunet.data.manifest import MANIFEST_NAME, load_manifest, sha256_file

    if data is None:
        return "the dataset is not recorded (no experiment.json, no run config)"
    try:
        manifest = load_manifest(data)
        sha256 = sha256_file(Path(data) / MANIFEST_NAME)
    except (UserError, OSError) as e:
        return f"the dataset {data} is not readable here ({e})"
    modality = manifest.source.get("modality")
    rgb = manifest.channels >= 3 and not modality
    if rgb:
        shown = "the image in colour"
    elif manifest.channels > 1:
        first = str(modality).split(",")[0] if modality else "0"
        shown = f"channel {first} in grey, contrast stretched per image (1st-99th percentile)"
    else:
        shown = "the image in grey, contrast stretched per image (1st-99th percentile)"
    return TestSplit(list(manifest.splits.get("test", [])), sha256, rgb, shown)


def read_test_images(data: Path, keys: list[str]) -> tuple[dict, dict]:
    """Images (H x W x C uint8) and ground-truth masks (H x W bool) of ``keys`` from the test
    split, read through the loader (the one place the report imports torch)."""
    from hpc_btunet.data import make_loader

    images, truths = {}, {}
    loader = make_loader(data, "test", keys=keys, batch_size=len(keys), shuffle=False)
    for batch in loader:
        for key, image, mask, pad in zip(
            batch["key"], batch["image"], batch["mask"], batch["pad"], strict=True
        ):
            if not pad:
                images[key] = image.permute(1, 2, 0).numpy()
                truths[key] = mask[0].numpy().astype(bool)
    return images, truths
