"""What an experiment folder holds for the report: its fine-tuning results (checked), the runs
it should hold, the predictions of each run, and the test images of its dataset.

The report reads, never trains or repairs, and every file it reads is untrusted input (read
through :mod:`hpc_btunet.readers`: regular files only, sizes bounded, strict JSON and YAML). A
file it cannot use is a reason written into ``report.md``, not an error: a ``metrics.json`` that
is damaged, holds values that are not metrics or lies in another run's folder is left out of
every number (named under "Results left out"); the report is refused only when no fold is
left. Only input the user chose (``--images``) is refused otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hpc_btunet.errors import UserError
from hpc_btunet.readers import MB, loads_json, read_bytes
from hpc_btunet.readers import read_yaml as _read_yaml
from hpc_btunet.report.predictions import Predictions, load_predictions

RECORD_NAME = "experiment.json"
RESULT_NAME = "metrics.json"
VARIANTS = ("bt", "scratch")
METRICS = ("precision", "dice", "iou")
MAX_RESULT_BYTES = 16 * MB  # a metrics.json with its validation curve is a few KB
MAX_CONFIG_BYTES = 1 * MB
MAX_SECONDS = 1e9  # a wall time (30 years)
Run = tuple[str, str, int]  # (model, variant, fold)
FIX = (
    "remove it and run that fold again (`hpc-btunet finetune ... --fold K` skips the folds "
    "that are complete)"
)
_FOLD = re.compile(r"^fold-(0|[1-9][0-9]{0,8})$")


def run_dir(experiment: Path, run: Run) -> Path:
    model, variant, fold = run
    return Path(experiment) / "finetune" / model / variant / f"fold-{fold}"


def run_of(result: dict) -> Run:
    return result["model"], result["variant"], int(result["fold"])


@dataclass
class LeftOut:
    """A ``metrics.json`` left out of the report: the file, why (a sentence naming it and the
    fix) and the run its folder stands for (None when the folder names none)."""

    path: Path
    reason: str
    run: Run | None


def _folder_run(experiment: Path, path: Path) -> Run | None:
    """The run ``finetune/<model>/<variant>/fold-<k>/metrics.json`` stands for, or None."""
    model, variant, fold = path.relative_to(experiment).parts[1:4]
    match = _FOLD.match(fold)
    return (model, variant, int(match[1])) if match and variant in VARIANTS else None


def number_within(value: object, low: float, high: float) -> bool:
    """Whether ``value`` is a number (not a bool) from ``low`` to ``high``: NaN and infinities
    fail the comparison, and a huge JSON integer is compared without becoming a float."""
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _shown(mapping: dict, key: str) -> str:
    return f"{mapping[key]!r:.40}" if key in mapping else "missing"


def _result_problem(result: object) -> str:
    """What makes a parsed ``metrics.json`` not a fine-tuning result (or "")."""
    if not isinstance(result, dict):
        return f"it holds {type(result).__name__}, not an object"
    for key, ok, want in (
        ("model", isinstance(result.get("model"), str), "text"),
        ("variant", result.get("variant") in VARIANTS, "bt or scratch"),
        (
            "fold",
            isinstance(result.get("fold"), int) and not isinstance(result.get("fold"), bool),
            "a whole number",
        ),
    ):
        if not ok:
            return f"{key} is {_shown(result, key)}, not {want}"
    test = result.get("test")
    for aggregate in ("mean", "pooled"):
        values = test.get(aggregate) if isinstance(test, dict) else None
        if not isinstance(values, dict):
            return f"test.{aggregate} is missing or not an object"
        for m in METRICS:
            if not number_within(values.get(m), 0, 1):
                return f"test.{aggregate}.{m} is {_shown(values, m)}, not a number in [0, 1]"
    seconds = result.get("train_seconds")
    if seconds is not None and not number_within(seconds, 0, MAX_SECONDS):
        return f"train_seconds is {seconds!r:.40}, not a duration"
    if not isinstance(result.get("predictions") or "", str):
        return "predictions is not a file name"
    return ""


def read_result(experiment: Path, path: Path) -> dict | LeftOut:
    """One fold's ``metrics.json``, checked: a regular file within the size bound, strict JSON,
    the fields of a fine-tuning result with finite metrics in [0, 1], and the model, variant
    and fold of the folder it lies in. Otherwise why it is left out."""
    run = _folder_run(experiment, path)
    try:
        result = loads_json(read_bytes(path, MAX_RESULT_BYTES, "fine-tuning result"), path, FIX)
    except UserError as e:
        return LeftOut(path, str(e), run)
    except OSError as e:
        return LeftOut(path, f"{path} cannot be read ({e.strerror}): {FIX}", run)
    problem = _result_problem(result)
    if problem:
        return LeftOut(path, f"{path} is not a fine-tuning result ({problem}): {FIX}", run)
    says = run_of(result)
    if says != run:
        folder = path.parent.relative_to(experiment)
        return LeftOut(
            path,
            f"{path} is not the result of its folder {folder} (it says "
            "{}/{}/fold-{}): move it back to its own run folder, or {}".format(*says, FIX),
            run,
        )
    return result


def read_results(experiment: Path) -> tuple[list[dict], list[LeftOut]]:
    """Every fine-tuning result of the experiment (checked by :func:`read_result`) and the
    files left out. One ``UserError`` when none is usable: it names each file and why."""
    experiment = Path(experiment)
    if not experiment.is_dir():
        raise UserError(
            f"--experiment {experiment} is not a folder: pass the --out folder of the jobs"
        )
    files = sorted(experiment.glob(f"finetune/*/*/fold-*/{RESULT_NAME}"))
    if not files:
        raise UserError(
            f"no fine-tuning results under {experiment}/finetune/: run `hpc-btunet finetune` "
            "(or `demo`) first"
        )
    results, left_out = [], []
    for path in files:
        read = read_result(experiment, path)
        (left_out if isinstance(read, LeftOut) else results).append(read)
    if not results:
        if len(left_out) == 1:
            raise UserError(left_out[0].reason)
        raise UserError(
            f"no usable fine-tuning result under {experiment}/finetune/, {len(left_out)} left "
            "out: " + " ".join(f"({i}) {x.reason}." for i, x in enumerate(left_out, 1))
        )
    return results, left_out


def read_predictions(experiment: Path, result: dict) -> Predictions | str:
    """The predictions of a checked result's run, or why there are none usable (a sentence)."""
    return load_predictions(run_dir(experiment, run_of(result)), result.get("predictions"))


def read_record(experiment: Path) -> tuple[dict | None, str]:
    """``experiment.json`` as :func:`hpc_btunet.experiment.load_record` checks it (None when
    there is none or it is unusable) and what is wrong with it (or "")."""
    from hpc_btunet.experiment import load_record

    try:
        return load_record(Path(experiment)), ""
    except (UserError, OSError) as e:
        return None, f"{e}; the expected runs are those found"


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


def missing_runs(
    experiment: Path, results: list[dict], record: dict | None, left_out: tuple[Run, ...] = ()
) -> list[dict]:
    """Expected runs without a result (those whose result was left out are named there): the
    run, its folder, whether it started (``config.yaml`` present: failed, stopped or still
    running) and the job that last ran it, when recorded."""
    found = {run_of(r) for r in results} | set(left_out)
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


def dataset_of(experiment: Path, results: list[dict], record: dict | None) -> Path | None:
    """The packed dataset of the experiment: its record's, else the first run's config."""
    if record and record.get("data"):
        return Path(record["data"])
    for result in results:
        config = mapping(read_yaml(run_dir(experiment, run_of(result)) / "config.yaml"), "config")
        if isinstance(config.get("data"), str) and config["data"]:
            return Path(config["data"])
    return None


def read_yaml(path: Path) -> dict:
    """A run folder's ``config.yaml`` (strict, bounded, a regular file), or {} when it is
    missing or not one: it only feeds the provenance."""
    try:
        return _read_yaml(path, MAX_CONFIG_BYTES, "run config")
    except (UserError, OSError):
        return {}


def mapping(recorded: dict, key: str) -> dict:
    """``recorded[key]`` when it is a mapping, else {} (a hand-edited config.yaml)."""
    value = recorded.get(key)
    return value if isinstance(value, dict) else {}


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
