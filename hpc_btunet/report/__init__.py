"""The report of an experiment: the paper's Table 2, Fig. 4 and Fig. 5, the statistics the paper
lacks, and ``report.md`` with the runs' provenance.

Reads ``<experiment>/finetune/<model>/<bt|scratch>/fold-<k>/metrics.json`` (and the
``predictions.npz`` beside each), ``<experiment>/experiment.json`` when the ``experiment``
command made the folder (which runs were expected), the run folders' ``config.yaml``
(provenance) and, for Fig. 5, the test images of the packed dataset. Writes under
``<experiment>/report/``: ``table.md``, ``table.csv``, ``change.csv``, ``statistics.csv``,
``bootstrap.csv``, ``figures/change.png``, ``figures/qualitative.png`` and, last,
``report.md``.

A report is one unit: every option is checked before anything is written, the whole folder is
built beside the old one (``<experiment>/.report.tmp-XXXX``) and swapped in at the end
(:mod:`~hpc_btunet.report.folder_swap`), so ``report/`` holds one run's files or the previous
run's, never a mixture, and ``report.md`` exists only in a complete folder (what ``status``
calls done). A killed run's leftovers are put right by the next one; Weights & Biases is logged
after the swap. One report writes at a time (the experiment folder's lock).

Every file read is untrusted input: a ``metrics.json`` that is damaged, not a regular file, holds
values that are not metrics or lies in another run's folder is left out and named in report.md
("Results left out"); the report is refused only when no fold is left. Runs that are expected
but have no result are named (failed or not run); runs without usable predictions (older
versions, a damaged file) leave Fig. 5 and the bootstrap out with the reason in report.md.

Modules: ``table`` (Table 2), ``figures`` (Fig. 4 and Fig. 5: numbers, choices, drawings),
``statistics`` (paired fold tests, the per-image bootstrap), ``paper`` (the paper's Table 2),
``results`` (what an experiment folder holds, checked), ``predictions`` (predictions.npz, read
within bounds), ``provenance``, ``document`` (report.md's text), ``folder_swap`` (the swap).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpc_btunet.atomic import atomic_open
from hpc_btunet.config import check_values, option
from hpc_btunet.errors import UserError
from hpc_btunet.folder_lock import FolderLock
from hpc_btunet.report import document
from hpc_btunet.report.figures import (
    QualitativePlan,
    change_figure,
    check_images,
    display_name,
    fold_changes,
    plan_qualitative,
    qualitative_figure,
)
from hpc_btunet.report.folder_swap import replaced
from hpc_btunet.report.paper import paper_dataset
from hpc_btunet.report.predictions import READ_ERRORS
from hpc_btunet.report.provenance import provenance
from hpc_btunet.report.results import (
    TestSplit,
    dataset_of,
    missing_runs,
    read_predictions,
    read_record,
    read_results,
    read_test_images,
    read_test_split,
    run_of,
)
from hpc_btunet.report.statistics import dice_bootstrap, fold_statistics
from hpc_btunet.report.table import (
    COLUMNS,
    DISPLAY_NAMES,
    collect,
    markdown,
    summarise,
    to_csv,
)

__all__ = [
    "COLUMNS",
    "DISPLAY_NAMES",
    "ReportConfig",
    "collect",
    "markdown",
    "run",
    "summarise",
    "to_csv",
    "write_report",
]
REPORT_NAME = "report.md"
MODES = ("offline", "online", "disabled")
MAX_IMAGES = 16  # rows of Fig. 5
MAX_BOOTSTRAP = 100_000  # resamples: seconds per model on a large test split


@dataclass
class ReportConfig:
    experiment: Path | None = option(None, "experiment folder (the jobs' --out)")
    aggregate: str = option(
        "mean",
        "per fold: mean of per-image metrics, or pooled (micro) metrics",
        choices=("mean", "pooled"),
    )
    images: str | None = option(
        None,
        "Fig. 5: comma-separated test keys (default: NUM_IMAGES spread over the difficulty range)",
    )
    num_images: int = option(4, "Fig. 5: how many test images", min=1, max=MAX_IMAGES)
    paper: str | None = option(
        None, "show the paper's Table 2 for this dataset: kdsb18, busis, isic2018, brats"
    )
    bootstrap: int = option(
        10_000, "resamples of the per-image bootstrap interval", min=100, max=MAX_BOOTSTRAP
    )
    seed: int = option(0, "seed of the bootstrap", min=0)
    wandb: str = option(
        "offline", "Weights & Biases: offline (sync later), online or disabled", choices=MODES
    )
    project: str = option("hpc_btunet", "Weights & Biases project")

    def __post_init__(self) -> None:
        if self.experiment is None:
            raise UserError("--experiment is required: the experiment folder (the jobs' --out)")
        self.experiment = Path(self.experiment)
        check_values(self)
        self.paper = paper_dataset(self.paper)
        self.image_keys()

    def image_keys(self) -> list[str] | None:
        """``--images`` as a list of keys (each once), None when not given."""
        if self.images is None:
            return None
        keys = list(dict.fromkeys(k.strip() for k in self.images.split(",") if k.strip()))
        if not keys:
            raise UserError(f"--images {self.images!r}: give comma-separated test keys")
        if len(keys) > MAX_IMAGES:
            raise UserError(
                f"--images gives {len(keys)} keys: Fig. 5 shows at most {MAX_IMAGES} (one row "
                "each); choose fewer"
            )
        return keys

    def run_dir(self) -> Path:
        return Path(self.experiment) / "report"

    def result_file(self) -> Path:
        return self.run_dir() / REPORT_NAME


def write_report(experiment: Path, aggregate: str = "mean") -> tuple[str, Path]:
    """The whole report with default options and without wandb; returns the Markdown table
    and the report folder."""
    report = run(ReportConfig(experiment=Path(experiment), aggregate=aggregate, wandb="disabled"))
    return markdown(summarise(collect(experiment), aggregate)), report.parent


def _wandb_mode(cfg: ReportConfig) -> str:
    """``--wandb``, where ``WANDB_MODE`` overrides offline/online (as for the jobs)."""
    if cfg.wandb == "disabled":
        return "disabled"
    mode = os.environ.get("WANDB_MODE", cfg.wandb)
    if mode not in MODES:
        raise UserError(f"WANDB_MODE={mode!r}: use one of {', '.join(MODES)}")
    return mode


def run(cfg: ReportConfig) -> Path:
    """Write the report as one unit (see the module); returns the path of ``report.md``.

    Everything the user chose is checked before the first file is written: a folder without a
    usable fold, an unknown ``--images`` key or ``WANDB_MODE`` raise one ``UserError``. What
    the results lack (missing runs, results left out, predictions, a dataset not readable here)
    is said in report.md instead. A failure while building leaves the previous report as it
    was."""
    experiment = Path(cfg.experiment)
    mode = _wandb_mode(cfg)
    results, left_out = read_results(experiment)  # refuses a folder without a usable fold
    record, record_problem = read_record(experiment)
    left_runs = tuple(x.run for x in left_out if x.run is not None)
    missing = missing_runs(experiment, results, record, left_runs)
    data = dataset_of(experiment, results, record)
    split = read_test_split(data)
    wanted = cfg.image_keys()
    if wanted and isinstance(split, TestSplit):
        check_images(wanted, split.keys, str(data))
    predictions, unusable = {}, []
    for result in results:
        p = read_predictions(experiment, result)
        if isinstance(p, str):
            unusable.append(p)
        else:
            predictions[run_of(result)] = p
    plan = (
        plan_qualitative(predictions, wanted, cfg.num_images)
        if predictions
        else "no fine-tuning run has usable predictions (predictions.npz)"
    )
    inputs = _Inputs(
        results, left_out, record, record_problem, missing, data, split, predictions, unusable
    )
    with (
        FolderLock(experiment, "report of the experiment folder"),
        replaced(cfg.run_dir()) as folder,
    ):
        rows, figures, warnings = _build(cfg, inputs, plan, folder)
    report = cfg.run_dir() / REPORT_NAME
    _log_to_wandb(cfg, mode, rows, {k: cfg.run_dir() / p for k, p in figures.items()})
    for w in warnings:
        print(f"report: warning: {w}")
    if left_out:
        print(
            f"report: {len(left_out)} result(s) left out (named in {report}): "
            + ", ".join(str(x.path) for x in left_out)
        )
    if missing:
        print(
            f"report: {len(missing)} expected run(s) missing (failed or not run): "
            + ", ".join("{}/{}/fold-{}".format(*m["run"]) for m in missing)
        )
    return report


@dataclass
class _Inputs:
    """What ``run`` read and checked, for ``_build``."""

    results: list[dict]
    left_out: list
    record: dict | None
    record_problem: str
    missing: list[dict]
    data: Path | None
    split: TestSplit | str
    predictions: dict
    unusable: list[str]


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _build(
    cfg: ReportConfig, inputs: _Inputs, plan: QualitativePlan | str, folder: Path
) -> tuple[list[dict], dict[str, Path], list[str]]:
    """Every file of the report into ``folder`` (empty: the new report being built); returns
    Table 2's rows, the figures drawn (paths relative to the folder) and the warnings."""
    experiment, results = Path(cfg.experiment), inputs.results
    rows = summarise(results, cfg.aggregate)
    table = markdown(rows)
    paper = document.paper_table(cfg.paper, rows) if cfg.paper else ""
    note = document.table_note(cfg.aggregate)
    _write_text(folder / "table.md", table + "\n" + note + ("\n" + paper if paper else ""))
    _write_text(folder / "table.csv", to_csv(rows))
    changes = fold_changes(results, cfg.aggregate)
    _write_text(folder / "change.csv", document.csv_text(changes, document.CHANGE_FIELDS))
    stats = fold_statistics(results, cfg.aggregate)
    _write_text(folder / "statistics.csv", document.csv_text(stats, document.STATISTICS_FIELDS))
    paired = list(dict.fromkeys(s["model"] for s in stats))
    boot, skipped = dice_bootstrap(paired, inputs.predictions, cfg.bootstrap, cfg.seed)
    skipped += [f"runs without usable predictions: {u}" for u in inputs.unusable]
    _write_text(folder / "bootstrap.csv", document.csv_text(boot, document.BOOTSTRAP_FIELDS))

    figures = {}
    if changes:
        change_figure(changes, folder / "figures" / "change.png")
        figures["change"] = Path("figures") / "change.png"
    qualitative_png = folder / "figures" / "qualitative.png"
    drawn, fig5 = _qualitative(plan, inputs.predictions, inputs.data, inputs.split, qualitative_png)
    if drawn:
        figures["qualitative"] = Path("figures") / "qualitative.png"
    if inputs.unusable:
        fig5 += (
            f"\n\n{len(inputs.unusable)} run(s) without usable predictions are left out here and "
            "in the bootstrap (listed under Statistics)."
        )

    split = inputs.split
    lines, warnings = provenance(
        experiment,
        results,
        inputs.record,
        inputs.data,
        split.sha256 if isinstance(split, TestSplit) else None,
    )
    parts = [f"# Report: {experiment.name}", ""]
    parts += [f"**Warning: {w}.**" for w in warnings] + ([""] if warnings else [])
    parts += ["## Table 2", "", table, note]
    parts += [paper] if paper else []
    parts += document.left_out_section(inputs.left_out)
    parts += document.missing_section(inputs.missing, inputs.record_problem)
    parts += document.change_section(changes)
    parts += ["## Fig. 5: predictions", "", fig5, ""]
    parts += document.statistics_section(stats, boot, skipped, cfg.bootstrap, cfg.seed)
    parts += ["## Provenance", "", *lines, ""]
    _write_text(folder / REPORT_NAME, "\n".join(parts))  # last: the folder is complete
    return rows, figures, warnings


def _qualitative(
    plan: QualitativePlan | str,
    predictions: dict,
    data: Path | None,
    split: TestSplit | str,
    path: Path,
) -> tuple[bool, str]:
    """Draw Fig. 5; returns (drawn, what report.md says about it or why it was not drawn)."""
    if isinstance(plan, str):
        return False, f"Not drawn: {plan}."
    if isinstance(split, str):
        return False, f"Not drawn: {split}."
    try:
        images, truths = read_test_images(data, plan.keys)
    except (UserError, OSError, ValueError, KeyError) as e:
        return False, f"Not drawn: the test images could not be read ({e})."
    try:
        columns = []
        for model, variant in plan.runs:
            p = predictions[(model, variant, plan.fold)]
            index = p.index()
            columns.append(
                (
                    display_name(model, variant),
                    p.masks_of(plan.keys),
                    {k: float(p.dice[index[k]]) for k in plan.keys},
                )
            )
    except READ_ERRORS as e:
        return False, f"Not drawn: the predictions could not be read ({e})."
    absent = [k for k in plan.keys if k not in images or k not in truths]
    if absent:
        return False, f"Not drawn: the dataset gave no test image {', '.join(absent)}."
    sizes = {truths[k].shape for k in plan.keys} | {m[k].shape for _, m, _ in columns for k in m}
    if len(sizes) != 1:
        return False, f"Not drawn: predictions and test images differ in size ({sorted(sizes)})."
    qualitative_figure(
        plan.keys,
        images,
        truths,
        columns,
        path,
        f"Fig. 5: test images and predictions of fold {plan.fold}",
        split.rgb,
    )
    return True, (
        f"![Fig. 5](figures/{path.name})\n\n"
        f"Fold {plan.fold}'s predictions: the first fold that every model and variant shown "
        f"finished with predictions. Images {plan.chosen}: {', '.join(plan.keys)}. The image "
        f"column shows {split.shown}. Contours: ground truth yellow (dashed beside a "
        "prediction), prediction cyan (threshold 0.5); DC: the image's Dice."
    )


def _log_to_wandb(cfg: ReportConfig, mode: str, rows: list[dict], figures: dict[str, Path]) -> None:
    """Table 2 as a ``wandb.Table`` and the figures, in a ``report`` run of the experiment's
    group (offline by default: ``wandb sync`` uploads it later). The files are written
    already: a failure here is printed, not raised."""
    if mode == "disabled":
        return
    import wandb

    try:
        run = wandb.init(
            project=cfg.project,
            group=Path(cfg.experiment).name,
            job_type="report",
            name="report",
            dir=str(cfg.run_dir()),
            mode=mode,
            config={"aggregate": cfg.aggregate, "paper": cfg.paper, "bootstrap": cfg.bootstrap},
            settings=wandb.Settings(console="off", silent=True),
        )
        columns = ["model", "bt", "folds"] + [f"{m}{s}" for m, _ in COLUMNS for s in ("", "_std")]
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        images = {f"figures/{k}": wandb.Image(str(p)) for k, p in figures.items()}
        run.log({"table2": table} | images)
        run.finish()
    except Exception as e:  # noqa: BLE001 - wandb's own errors vary; the report is written
        print(f"report: not logged to wandb ({type(e).__name__}: {e})")
