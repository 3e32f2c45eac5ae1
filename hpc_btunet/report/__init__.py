"""The report of an experiment: the paper's Table 2, Fig. 4 and Fig. 5, the statistics the paper
lacks, and ``report.md`` with the run's provenance.

Reads ``<experiment>/finetune/<model>/<bt|scratch>/fold-<k>/metrics.json`` (and the
``predictions.npz`` beside each), ``<experiment>/experiment.json`` when the ``experiment``
command made the folder (which runs were expected), the run folders' ``config.yaml``
(provenance) and, for Fig. 5, the test images of the packed dataset. Writes under
``<experiment>/report/``: ``table.md``, ``table.csv``, ``change.csv``, ``statistics.csv``,
``figures/change.png``, ``figures/qualitative.png`` and ``report.md``; every file atomically.
Runs that are expected but have no result are named (failed or not run), never fatal, as long
as one fold finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_btunet.atomic import atomic_open
from hpc_btunet.config import check_values, option
from hpc_btunet.errors import UserError
from hpc_btunet.report.paper import CITATION, TABLE2, paper_dataset, paper_row
from hpc_btunet.report.statistics import bootstrap_mean, paired_folds, per_image_dice
from hpc_btunet.report.table import (
    COLUMNS,
    DISPLAY_NAMES,
    collect,
    markdown,
    model_order,
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
    num_images: int = option(4, "Fig. 5: how many test images", min=1, max=16)
    paper: str | None = option(
        None, "show the paper's Table 2 for this dataset: kdsb18, busis, isic2018, brats"
    )
    bootstrap: int = option(10_000, "resamples of the per-image bootstrap interval", min=100)
    seed: int = option(0, "seed of the bootstrap")
    wandb: str = option(
        "offline", "Weights & Biases: offline (sync later), online or disabled", choices=MODES
    )
    project: str = option("hpc_btunet", "Weights & Biases project")

    def __post_init__(self) -> None:
        if self.experiment is None:
            raise UserError("--experiment is required: the experiment folder (the jobs' --out)")
        check_values(self)
        self.paper = paper_dataset(self.paper)

    def run_dir(self) -> Path:
        return Path(self.experiment) / "report"

    def result_file(self) -> Path:
        return self.run_dir() / REPORT_NAME


def _record(experiment: Path) -> dict | None:
    path = Path(experiment) / "experiment.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # `status` and `experiment` name a damaged record; the report goes on


def expected_runs(experiment: Path, results: list[dict]) -> list[tuple[str, str, int]]:
    """(model, variant, fold) the experiment should hold: its record's plan, else what was
    found (each pair found x every fold found)."""
    record = _record(experiment)
    if record and record.get("models"):
        return [
            (m, v, k)
            for m in record["models"]
            for v in record.get("variants", ["bt", "scratch"])
            for k in range(int(record.get("folds", 0)))
        ]
    pairs = dict.fromkeys((r["model"], r["variant"]) for r in results)
    folds = sorted({r["fold"] for r in results})
    return [(m, v, k) for m, v in pairs for k in folds]


def _run_dir(experiment: Path, model: str, variant: str, fold: int) -> Path:
    return Path(experiment) / "finetune" / model / variant / f"fold-{fold}"


def _predictions(experiment: Path, result: dict) -> dict | None:
    name = result.get("predictions")
    if not name:
        return None
    path = _run_dir(experiment, result["model"], result["variant"], result["fold"]) / name
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("keys", "masks", "dice")}
    except (OSError, ValueError, KeyError):
        return None


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _paper_table(dataset: str, rows: list[dict]) -> str:
    title, _ = TABLE2[dataset]
    lines = [
        f"The paper's values for {title} ({CITATION}) beside ours (mean over folds):",
        "",
        "| Model | BT | Pr | DC | IoU | paper Pr | paper DC | paper IoU |",
        "| --- | :-: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        theirs = paper_row(dataset, r["model"], r["bt"])
        cells = [f"{r[m]:.3f}" for m, _ in COLUMNS]
        cells += [f"{v:.3f}" for v in theirs] if theirs else ["-", "-", "-"]
        lines.append(
            f"| {DISPLAY_NAMES.get(r['model'], r['model'])} | {r['bt']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _statistics(results: list[dict], aggregate: str) -> list[dict]:
    by = {(r["model"], r["variant"], r["fold"]): r["test"][aggregate] for r in results}
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


def _bootstrap(experiment: Path, results: list[dict], cfg: ReportConfig) -> list[dict]:
    rows = []
    for model in model_order(r["model"] for r in results):
        per_variant = {}
        for variant in ("bt", "scratch"):
            preds = {
                r["fold"]: p
                for r in results
                if r["model"] == model and r["variant"] == variant
                if (p := _predictions(experiment, r)) is not None
            }
            if preds:
                per_variant[variant] = per_image_dice(preds)
        if len(per_variant) < 2:
            continue
        (kb, db), (ks, ds) = per_variant["bt"], per_variant["scratch"]
        common = sorted(set(kb.tolist()) & set(ks.tolist()))
        if not common:
            continue
        ib = {k: i for i, k in enumerate(kb.tolist())}
        isc = {k: i for i, k in enumerate(ks.tolist())}
        diff = np.array([db[ib[k]] - ds[isc[k]] for k in common])
        mean, low, high = bootstrap_mean(diff, cfg.bootstrap, cfg.seed)
        rows.append({"model": model, "images": len(common), "mean": mean, "low": low, "high": high})
    return rows


def _test_samples(data: Path, keys: list[str]) -> tuple[dict, dict]:
    """Images (H x W x C uint8) and masks (H x W bool) of ``keys`` from the test split."""
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


def _qualitative(experiment: Path, results: list[dict], cfg: ReportConfig, path: Path) -> str:
    """Draw Fig. 5; returns what report.md says about it (or why it was not drawn)."""
    from hpc_btunet.report.figures import choose_images, qualitative_figure

    record = _record(experiment) or {}
    data = record.get("data")
    runs = {(r["model"], r["variant"], r["fold"]): r for r in results}
    if data is None:
        for r in results:
            config = _run_dir(experiment, r["model"], r["variant"], r["fold"]) / "config.yaml"
            data = _yaml(config).get("config", {}).get("data")
            if data:
                break
    models = model_order(m for m, _, _ in runs)
    pairs = sorted(
        dict.fromkeys((m, v) for m, v, _ in runs), key=lambda p: (models.index(p[0]), p[1] == "bt")
    )
    folds = sorted({k for _, _, k in runs})
    fold = next((k for k in folds if all((m, v, k) in runs for m, v in pairs)), None)
    if fold is None:
        return "Fig. 5 not drawn: no fold is complete for every model and variant."
    preds = {(m, v): _predictions(experiment, runs[(m, v, fold)]) for m, v in pairs}
    if any(p is None for p in preds.values()):
        return "Fig. 5 not drawn: fine-tuning runs without predictions.npz (older runs)."
    columns = []
    for (m, v), p in preds.items():
        name = DISPLAY_NAMES.get(m, m) + (" + BT" if v == "bt" else "")
        columns.append((name, {k: p["masks"][i] for i, k in enumerate(p["keys"].tolist())}))
    known = set.intersection(*(set(masks) for _, masks in columns))
    if cfg.images:
        keys = [k.strip() for k in cfg.images.split(",") if k.strip()]
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise UserError(
                f"--images: {', '.join(unknown)} not in the test split of this experiment; "
                f"test keys are e.g. {', '.join(sorted(known)[:5])}"
            )
    else:
        dice = {}
        for p in preds.values():
            for i, k in enumerate(p["keys"].tolist()):
                dice[k] = dice.get(k, 0.0) + float(p["dice"][i]) / len(preds)
        keys = choose_images({k: dice[k] for k in known}, cfg.num_images)
    if data is None or not (Path(data) / "manifest.json").exists():
        return f"Fig. 5 not drawn: the dataset {data} is not readable here."
    images, truths = _test_samples(Path(data), keys)
    qualitative_figure(
        keys,
        images,
        truths,
        columns,
        path,
        f"Test images, fold {fold}: ground truth green, prediction red",
    )
    how = (
        "chosen by --images"
        if cfg.images
        else (
            "spread over the difficulty range (ranked by Dice averaged over the runs shown, at evenly "
            "spaced ranks from hardest to easiest)"
        )
    )
    return f"![Fig. 5](figures/{path.name})\n\nFold {fold}'s predictions; images {how}: {', '.join(keys)}."


def _yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _provenance(experiment: Path, results: list[dict]) -> list[str]:
    configs = sorted(Path(experiment).glob("pretrain/*/config.yaml")) + sorted(
        Path(experiment).glob("finetune/*/*/fold-*/config.yaml")
    )
    seen: dict[str, set] = {
        k: set() for k in ("manifest", "version", "revision", "engine", "world")
    }
    for path in configs:
        record = _yaml(path)
        prov, config = record.get("provenance") or {}, record.get("config") or {}
        seen["manifest"].add(str(prov.get("manifest_sha256")))
        seen["version"].add(str(prov.get("package_version")))
        seen["revision"].add(str(prov.get("git_revision")))
        seen["engine"].add(f"{config.get('engine', 'ddp')} ({config.get('precision', 'fp32')})")
        if "world_size" in config:
            seen["world"].add(f"pre-training {config['world_size']} rank(s)")
    record = _record(experiment) or {}
    data = record.get("data") or next(
        (str(_yaml(p).get("config", {}).get("data")) for p in configs), "unknown"
    )
    lines = [
        f"- dataset: {data}, manifest sha256 {', '.join(sorted(seen['manifest'])) or 'unknown'}",
        f"- package version: {', '.join(sorted(seen['version'])) or 'unknown'}; git revision: "
        f"{', '.join(sorted(seen['revision'])) or 'unknown'}",
        f"- engines: {', '.join(sorted(seen['engine'])) or 'unknown'}; world sizes: "
        f"{', '.join(sorted(seen['world'])) or 'fine-tuning 1 rank per task'}",
    ]
    if len(seen["manifest"]) > 1:
        lines.append("- **warning: the runs were made from different datasets (manifests)**")
    pre = []
    for encoder in sorted(Path(experiment).glob("pretrain/*/encoder.pt")):
        started = (_yaml(encoder.parent / "config.yaml").get("provenance") or {}).get("written")
        if started:
            try:
                t0 = time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S%z"))
                pre.append(f"{encoder.parent.name} {encoder.stat().st_mtime - t0:.0f} s")
            except ValueError:
                continue
    fine = sum(float(r.get("train_seconds", 0.0)) for r in results)
    lines.append(
        "- wall times: pre-training (from its last start to encoder.pt) "
        f"{', '.join(pre) or 'n/a'}; fine-tuning {fine:.0f} s summed over {len(results)} run(s)"
    )
    return lines


def _statistics_md(stats: list[dict], boot: list[dict]) -> str:
    lines = [
        "Paired over folds (fold k with BT vs fold k without): mean difference BT - scratch, "
        "its 95 % t interval, paired t-test and exact Wilcoxon signed-rank p-values.",
        "",
        "| Model | metric | folds | BT - scratch | 95 % CI | t-test p | Wilcoxon p | note |",
        "| --- | --- | :-: | ---: | :-: | ---: | ---: | --- |",
    ]
    for s in stats:
        ci = "n/a" if s["ci_low"] is None else f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
        lines.append(
            f"| {DISPLAY_NAMES.get(s['model'], s['model'])} | {s['metric']} | {s['folds']} | "
            f"{s['mean_difference']:+.3f} | {ci} | {_fmt(s['t_p'])} | {_fmt(s['wilcoxon_p'])} | "
            f"{s['note']} |"
        )
    folds = sorted({s["folds"] for s in stats})
    if folds:
        smallest = ", ".join(f"{n} folds: {2 / 2**n:.4g}" for n in folds)
        lines += [
            "",
            f"With n folds the smallest two-sided Wilcoxon p-value is 2/2^n ({smallest}): "
            "5 folds cannot reach p < 0.05 with it, whatever the effect; the t-test assumes "
            "normally distributed fold differences.",
        ]
    if boot:
        lines += [
            "",
            "Per test image: Dice averaged over folds for each variant, the mean per-image "
            "difference and its 95 % percentile bootstrap interval (images resampled; it "
            "describes this test set):",
            "",
            "| Model | images | Dice BT - scratch | 95 % bootstrap interval |",
            "| --- | :-: | ---: | :-: |",
        ]
        for b in boot:
            lines.append(
                f"| {DISPLAY_NAMES.get(b['model'], b['model'])} | {b['images']} | {b['mean']:+.4f} | "
                f"[{b['low']:+.4f}, {b['high']:+.4f}] |"
            )
    return "\n".join(lines) + "\n"


def write_report(experiment: Path, aggregate: str = "mean") -> tuple[str, Path]:
    """The whole report with default options; returns the Markdown table and the folder."""
    run(ReportConfig(experiment=Path(experiment), aggregate=aggregate, wandb="disabled"))
    folder = Path(experiment) / "report"
    return markdown(summarise(collect(experiment), aggregate)), folder


def run(cfg: ReportConfig) -> Path:
    """Write every part of the report; returns the path of ``report.md``."""
    from hpc_btunet.report.figures import change_figure, fold_changes

    experiment = Path(cfg.experiment)
    results = collect(experiment)  # refuses a folder without a single finished fold
    rows = summarise(results, cfg.aggregate)
    folder = cfg.run_dir()
    found = {(r["model"], r["variant"], r["fold"]) for r in results}
    missing = [run for run in expected_runs(experiment, results) if run not in found]
    table = markdown(rows)
    how = "per-image mean" if cfg.aggregate == "mean" else "pooled (micro) value"
    note = f"\nTest split; each fold contributes its {how}; mean ± sample std over folds.\n"
    paper = _paper_table(cfg.paper, rows) if cfg.paper else ""
    with atomic_open(folder / "table.md", "w") as f:
        f.write(table + note + ("\n" + paper if paper else ""))
    with atomic_open(folder / "table.csv", "w") as f:
        f.write(to_csv(rows))

    changes = fold_changes(results, cfg.aggregate)
    fields = list(changes[0]) if changes else ["model", "metric"]
    with atomic_open(folder / "change.csv", "w") as f:
        f.write(_csv(changes, fields))
    figures = {}
    if changes:
        figures["change"] = folder / "figures" / "change.png"
        change_figure(
            changes,
            figures["change"],
            "Change with BT pre-training (mean over folds of the per-fold change, ± std)",
        )
    qualitative = folder / "figures" / "qualitative.png"
    fig5 = _qualitative(experiment, results, cfg, qualitative)
    if fig5.startswith("!["):
        figures["qualitative"] = qualitative

    stats = _statistics(results, cfg.aggregate)
    stat_fields = ["model", "metric", "folds", "mean_difference", "ci_low", "ci_high", "t_p"]
    stat_fields += ["wilcoxon_p", "wilcoxon_smallest_p", "note"]
    with atomic_open(folder / "statistics.csv", "w") as f:
        f.write(_csv(stats, stat_fields))
    boot = _bootstrap(experiment, results, cfg)
    with atomic_open(folder / "bootstrap.csv", "w") as f:
        f.write(_csv(boot, ["model", "images", "mean", "low", "high"]))

    parts = [f"# Report: {experiment.name}", "", "## Table 2", "", table + note]
    if paper:
        parts += [paper]
    if missing:
        parts += [
            "## Missing runs (failed or not run)",
            "",
            *[f"- {m}/{v}/fold-{k}: {_run_dir(experiment, m, v, k)}" for m, v, k in missing],
            "",
            "The table and statistics use the folds that finished.",
            "",
        ]
    parts += ["## Fig. 4: change with Barlow Twins", ""]
    if changes:
        parts += [
            "![Fig. 4](figures/change.png)",
            "",
            "Per fold k (folds are paired), change = 100 (BT_k - scratch_k) / scratch_k; bars: "
            "mean over folds, error bars: sample std; `change_of_means_pct` in change.csv is "
            "100 (mean BT - mean scratch) / mean scratch. A scratch value of 0 leaves the "
            "change undefined (n/a).",
            "",
            "| Model | metric | change of means (%) | per-fold change (%) |",
            "| --- | --- | ---: | ---: |",
        ]
        for c in changes:
            spread = (
                "" if c["fold_change_std_pct"] is None else f" ± {c['fold_change_std_pct']:.1f}"
            )
            per_fold = _fmt(c["fold_change_mean_pct"], 1) + (
                spread if c["fold_change_mean_pct"] is not None else ""
            )
            parts.append(
                f"| {DISPLAY_NAMES.get(c['model'], c['model'])} | {c['metric']} | "
                f"{_fmt(c['change_of_means_pct'], 1)} | {per_fold} |"
            )
        parts.append("")
    else:
        parts += ["Not drawn: no model has folds with and without BT.", ""]
    parts += ["## Fig. 5: predictions", "", fig5, "", "## Statistics", ""]
    parts += [_statistics_md(stats, boot) if stats else "No model has paired folds.\n"]
    parts += ["## Provenance", "", *_provenance(experiment, results), ""]
    report = folder / REPORT_NAME
    with atomic_open(report, "w") as f:
        f.write("\n".join(parts))
    _log_to_wandb(cfg, rows, figures)
    if missing:
        print(
            f"report: {len(missing)} expected run(s) missing (failed or not run): "
            + ", ".join(f"{m}/{v}/fold-{k}" for m, v, k in missing)
        )
    return report


def _log_to_wandb(cfg: ReportConfig, rows: list[dict], figures: dict[str, Path]) -> None:
    """Table 2 as a ``wandb.Table`` and the figures, in a ``report`` run of the experiment's
    group (offline by default: ``wandb sync`` uploads it later)."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb) if cfg.wandb != "disabled" else "disabled"
    if mode == "disabled":
        return
    import wandb

    folder = cfg.run_dir()
    run = wandb.init(
        project=cfg.project,
        group=Path(cfg.experiment).name,
        job_type="report",
        name="report",
        dir=str(folder),
        mode=mode,
        config={"aggregate": cfg.aggregate, "paper": cfg.paper},
        settings=wandb.Settings(console="off", silent=True),
    )
    columns = ["model", "bt", "folds"] + [f"{m}{s}" for m, _ in COLUMNS for s in ("", "_std")]
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    run.log({"table2": table} | {f"figures/{k}": wandb.Image(str(p)) for k, p in figures.items()})
    run.finish()
