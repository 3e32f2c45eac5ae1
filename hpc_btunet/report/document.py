"""The text of the report: ``report.md``'s sections and the CSV files beside it. Values that
cannot be computed are written "n/a" (with the reason in a note), never NaN or inf."""

from __future__ import annotations

import csv
import io

from hpc_btunet.report.figures import display_name
from hpc_btunet.report.paper import CITATION, TABLE2, paper_row
from hpc_btunet.report.statistics import wilcoxon_smallest_p
from hpc_btunet.report.table import COLUMNS

CHANGE_FIELDS = [
    "model",
    "metric",
    "folds",
    "folds_undefined",
    "mean_scratch",
    "mean_bt",
    "change_of_means_pct",
    "fold_change_mean_pct",
    "fold_change_std_pct",
    "per_fold_pct",
]
STATISTICS_FIELDS = [
    "model",
    "metric",
    "folds",
    "mean_difference",
    "ci_low",
    "ci_high",
    "t_p",
    "wilcoxon_p",
    "wilcoxon_smallest_p",
    "note",
]
BOOTSTRAP_FIELDS = ["model", "folds", "images", "mean", "low", "high"]
CHANGE_DEFINITION = (
    "Per fold k (folds are paired: fold k with and without BT trains on the same images and is "
    "tested on the same test split), change_k = 100 (BT_k - scratch_k) / scratch_k. Bars: mean "
    "over folds; error bars: sample std over folds (ddof 1); dots: the folds. "
    "`change_of_means_pct` = 100 (mean BT - mean scratch) / mean scratch. A scratch value of 0 "
    "leaves the relative change undefined: that fold is n/a (counted in `folds_undefined`, left "
    "out of the bar), and a bar without any defined fold reads n/a."
)


def csv_text(rows: list[dict], fields: list[str]) -> str:
    """CSV of ``rows`` restricted to ``fields``; None is written n/a."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "n/a" if row.get(k) is None else row[k] for k in fields})
    return buf.getvalue()


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def p_value(p: float | None) -> str:
    """4 decimals, or 2 significant digits below 0.0001 (never a bare 0.0000)."""
    return "n/a" if p is None else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def table_note(aggregate: str) -> str:
    how = "per-image mean" if aggregate == "mean" else "pooled (micro) value"
    return f"Test split; each fold contributes its {how}; mean ± sample std over folds.\n"


def paper_table(dataset: str, rows: list[dict]) -> str:
    """Our Table 2 rows beside the paper's values for ``dataset``."""
    title, _ = TABLE2[dataset]
    lines = [
        f"The paper's values for {title} ({CITATION}; one value per cell, no spread) beside "
        "ours (mean over folds):",
        "",
        "| Model | BT | Pr | DC | IoU | paper Pr | paper DC | paper IoU |",
        "| --- | :-: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        theirs = paper_row(dataset, r["model"], r["bt"])
        cells = [f"{r[m]:.3f}" for m, _ in COLUMNS]
        cells += [f"{v:.3f}" for v in theirs] if theirs else ["-", "-", "-"]
        lines.append(f"| {display_name(r['model'])} | {r['bt']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def left_out_section(left_out: list) -> list[str]:
    """The ``metrics.json`` files left out (``LeftOut``: a sentence each, naming the file)."""
    if not left_out:
        return []
    lines = ["## Results left out", ""]
    lines += [f"- {x.reason}" for x in left_out]
    return lines + [
        "",
        f"{len(left_out)} result file(s) left out: not in Table 2, Fig. 4, Fig. 5 or the "
        "statistics.",
        "",
    ]


def missing_section(missing: list[dict], problem: str) -> list[str]:
    if not missing and not problem:
        return []
    lines = ["## Missing runs (failed or not run)", ""]
    if problem:
        lines += [f"Note: {problem}.", ""]
    for m in missing:
        model, variant, fold = m["run"]
        state = (
            "started, no result (failed, stopped or still running)"
            if m["started"]
            else "not started"
        )
        job = f"; job {m['job']}, log {m['log']}" if m["job"] else ""
        lines.append(f"- {model}/{variant}/fold-{fold}: {state}; {m['folder']}{job}")
    if missing:
        lines += ["", "The table, Fig. 4 and the statistics use the folds that finished."]
    return lines + [""]


def change_section(changes: list[dict]) -> list[str]:
    lines = ["## Fig. 4: change with Barlow Twins", ""]
    if not changes:
        return lines + ["Not drawn: no model has a fold that finished with and without BT.", ""]
    lines += [
        "![Fig. 4](figures/change.png)",
        "",
        CHANGE_DEFINITION,
        "",
        "| Model | metric | folds | change of means (%) | per-fold change (%), mean ± std |",
        "| --- | --- | :-: | ---: | ---: |",
    ]
    for c in changes:
        per_fold = fmt(c["fold_change_mean_pct"], "+.1f")
        if c["fold_change_std_pct"] is not None:
            per_fold += f" ± {c['fold_change_std_pct']:.1f}"
        if c["folds_undefined"]:
            per_fold += f" ({c['folds_undefined']} fold(s) n/a: scratch 0)"
        lines.append(
            f"| {display_name(c['model'])} | {c['metric']} | {c['folds']} | "
            f"{fmt(c['change_of_means_pct'], '+.1f')} | {per_fold} |"
        )
    return lines + ["", "The numbers are in change.csv.", ""]


def statistics_section(
    stats: list[dict], boot: list[dict], skipped: list[str], resamples: int, seed: int
) -> list[str]:
    lines = ["## Statistics", ""]
    if not stats:
        lines += ["No model has a fold that finished with and without BT.", ""]
    else:
        lines += [
            "Paired over folds (fold k with BT against fold k without): the mean difference "
            "BT - scratch, its 95 % confidence interval (t distribution, n - 1 degrees of "
            "freedom), the paired t-test and the exact two-sided Wilcoxon signed-rank test "
            "(scipy.stats). In statistics.csv.",
            "",
            "| Model | metric | folds | BT - scratch | 95 % CI | t-test p | Wilcoxon p | note |",
            "| --- | --- | :-: | ---: | :-: | ---: | ---: | --- |",
        ]
        for s in stats:
            ci = "n/a" if s["ci_low"] is None else f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
            lines.append(
                f"| {display_name(s['model'])} | {s['metric']} | {s['folds']} | "
                f"{fmt(s['mean_difference'], '+.3f')} | {ci} | {p_value(s['t_p'])} | "
                f"{p_value(s['wilcoxon_p'])} | {s['note']} |"
            )
        floors = ", ".join(
            f"n = {n}: {wilcoxon_smallest_p(n):.4g}" for n in sorted({s["folds"] for s in stats})
        )
        lines += [
            "",
            "With n non-zero fold differences the smallest two-sided exact Wilcoxon p-value is "
            f"2/2^n (here {floors}). It is 0.0625 for n = 5 and first falls below 0.05 at "
            "n = 6 (0.03125): 5 folds can never reach p < 0.05 with it, whatever the effect. "
            "The t-test assumes normally distributed fold differences. Folds share most of "
            "their training images and the whole test split, so their differences are not "
            "independent: the interval and both p-values are optimistic. n/a: see the note.",
            "",
        ]
    lines += ["### Per-image bootstrap of the Dice difference", ""]
    if boot:
        lines += [
            "Per test image: its Dice averaged over the paired folds (those with predictions "
            "with and without BT) for each variant, then the difference BT - scratch; the mean "
            "difference over images and its 95 % percentile bootstrap interval (images "
            f"resampled with replacement, {resamples} resamples, seed {seed}). It describes "
            "this test set, not a new one. In bootstrap.csv.",
            "",
            "| Model | folds | images | Dice BT - scratch | 95 % bootstrap interval |",
            "| --- | :-: | :-: | ---: | :-: |",
        ]
        for b in boot:
            lines.append(
                f"| {display_name(b['model'])} | {b['folds']} | {b['images']} | "
                f"{b['mean']:+.4f} | [{b['low']:+.4f}, {b['high']:+.4f}] |"
            )
        lines.append("")
    lines += [f"- not computed for {s}" for s in skipped]
    return lines + ([""] if skipped else [])
