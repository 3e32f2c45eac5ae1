"""The report's statistics and Fig. 4 numbers against values derived by hand on small fixed
inputs, and the whole report (figures, missing runs, --paper, --images, wandb offline) on a
hand-made experiment with predictions."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
from conftest import pack_toy, submit_cli

from hpc_btunet.errors import UserError
from hpc_btunet.report import ReportConfig, run
from hpc_btunet.report.statistics import (
    bootstrap_mean,
    paired_folds,
    per_image_dice,
    wilcoxon_smallest_p,
)

T_975_4 = 2.7764451051977987  # the 97.5 % quantile of Student's t with 4 degrees of freedom


def test_paired_folds_against_hand_computation():
    d = np.array([0.02, 0.03, 0.05, -0.01, 0.04])
    scratch = np.array([0.5, 0.6, 0.7, 0.55, 0.65])
    out = paired_folds(scratch + d, scratch)
    mean = d.sum() / 5
    sd = math.sqrt(((d - mean) ** 2).sum() / 4)
    assert out["mean_difference"] == pytest.approx(0.026)
    assert out["ci_low"] == pytest.approx(mean - T_975_4 * sd / math.sqrt(5))
    assert out["ci_high"] == pytest.approx(mean + T_975_4 * sd / math.sqrt(5))
    # |d| ranks 1..5, the negative difference has rank 1: W- = 1; two-sided exact
    # p = 2 * #{subsets of {1..5} with sum <= 1} / 2^5 = 2 * 2 / 32
    assert out["wilcoxon_p"] == pytest.approx(0.125)
    from scipy import stats

    t = mean / (sd / math.sqrt(5))
    assert out["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    assert out["wilcoxon_smallest_p"] == 0.0625


def test_five_folds_cannot_reach_005_with_wilcoxon():
    out = paired_folds(np.array([0.9, 0.91, 0.92, 0.93, 0.94]), np.full(5, 0.5))
    assert out["wilcoxon_p"] == pytest.approx(0.0625) == wilcoxon_smallest_p(5)
    assert out["t_p"] < 0.001
    assert wilcoxon_smallest_p(10) == pytest.approx(2 / 1024)


@pytest.mark.parametrize(
    "bt, scratch, note",
    [
        ([0.7], [0.6], "fewer than 2 paired folds"),
        ([0.7, 0.7, 0.7], [0.7, 0.7, 0.7], "no fold differs"),
        ([0.8, 0.9, 0.7], [0.7, 0.8, 0.6], "same amount"),
    ],
)
def test_degenerate_cases_say_na_without_warnings(bt, scratch, note):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = paired_folds(np.array(bt), np.array(scratch))
    assert note in out["note"]
    for value in out.values():
        assert not (isinstance(value, float) and math.isnan(value))


def test_bootstrap_interval():
    assert bootstrap_mean(np.full(50, 0.03), 1000, 0) == pytest.approx((0.03, 0.03, 0.03))
    # 0/1 differences, mean 0.5 over 400 images: the interval is about 0.5 -+ 1.96 * 0.025
    d = np.array([0.0, 1.0] * 200)
    mean, low, high = bootstrap_mean(d, 20_000, 1)
    assert mean == 0.5
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    assert bootstrap_mean(d, 2000, 7) == bootstrap_mean(d, 2000, 7)


def test_per_image_dice_aligns_keys_across_folds():
    keys, dice = per_image_dice(
        {
            0: {"keys": np.array(["a", "b", "c"]), "dice": np.array([0.2, 0.4, 0.6])},
            1: {"keys": np.array(["c", "a", "b"]), "dice": np.array([1.0, 0.0, 0.8])},
        }
    )
    assert keys.tolist() == ["a", "b", "c"]
    assert dice == pytest.approx([0.1, 0.6, 0.8])


# --- the whole report on a hand-made experiment ------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pack_toy(tmp_path_factory.mktemp("report") / "data", n=30)


def _experiment(tmp_path, data, dice_by_run, folds=3, models=("unet",)):
    """Runs with the given mean Dice per (model, variant, fold); predictions: every test image
    predicted empty or full, its per-image Dice as stored."""
    from hpc_btunet.data.manifest import load_manifest

    exp = tmp_path / "exp"
    test = load_manifest(data).splits["test"]
    for (model, variant, fold), dice in dice_by_run.items():
        run_dir = exp / "finetune" / model / variant / f"fold-{fold}"
        run_dir.mkdir(parents=True)
        metrics = {"precision": dice + 0.05, "dice": dice, "iou": dice * 0.8}
        per_image = np.full(len(test), dice)
        np.savez_compressed(
            run_dir / "predictions.npz",
            keys=np.array(test),
            masks=np.ones((len(test), 16, 16), np.uint8),
            precision=per_image,
            dice=per_image,
            iou=per_image,
        )
        (run_dir / "metrics.json").write_text(
            json.dumps(
                {
                    "model": model,
                    "variant": variant,
                    "fold": fold,
                    "test": {"mean": metrics, "pooled": metrics},
                    "predictions": "predictions.npz",
                    "train_seconds": 1.5,
                }
            )
        )
    record = {
        "format": 1,
        "data": str(data),
        "manifest_sha256": "x",
        "models": list(models),
        "variants": ["bt", "scratch"],
        "folds": folds,
        "tasks": {},
    }
    (exp / "experiment.json").write_text(json.dumps(record))
    return exp


def test_fig4_numbers_missing_runs_and_figures(tmp_path, data):
    runs = {}
    for fold, (bt, scratch) in enumerate([(0.8, 0.5), (0.9, 0.6), (0.6, 0.0)]):
        runs[("unet", "bt", fold)] = bt
        runs[("unet", "scratch", fold)] = scratch
    del runs[("unet", "scratch", 2)]  # failed: the report names it
    exp = _experiment(tmp_path, data, runs)
    runs_all = dict(runs) | {("unet", "scratch", 2): 0.0}
    report = run(ReportConfig(experiment=exp, wandb="disabled"))
    text = report.read_text()
    assert "unet/scratch/fold-2" in text and "Missing runs" in text
    rows = list(csv.DictReader((exp / "report" / "change.csv").open()))
    dc = next(r for r in rows if r["metric"] == "DC")
    # folds 0 and 1 are paired: +60 % and +50 %
    assert float(dc["fold_change_mean_pct"]) == pytest.approx(55.0)
    assert float(dc["fold_change_std_pct"]) == pytest.approx(math.sqrt(50))
    assert float(dc["change_of_means_pct"]) == pytest.approx(100 * (0.85 - 0.55) / 0.55)
    for name in ("change.png", "qualitative.png"):
        png = exp / "report" / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        assert min(Image.open(png).size) > 200

    # now with the failed fold present and 0 without BT: a relative change is undefined there
    del runs_all
    run_dir = exp / "finetune" / "unet" / "scratch" / "fold-2"
    _experiment(tmp_path / "again", data, runs | {("unet", "scratch", 2): 0.0})
    exp2 = tmp_path / "again" / "exp"
    run(ReportConfig(experiment=exp2, wandb="disabled"))
    rows = list(csv.DictReader((exp2 / "report" / "change.csv").open()))
    dc = next(r for r in rows if r["metric"] == "DC")
    assert dc["folds_undefined"] == "1" and float(dc["fold_change_mean_pct"]) == pytest.approx(55)
    assert not run_dir.exists()


def test_paper_images_and_wandb(tmp_path, data, monkeypatch):
    from hpc_btunet.data.manifest import load_manifest

    runs = {
        (m, v, k): 0.5 + 0.1 * (v == "bt")
        for m in ("unet",)
        for v in ("bt", "scratch")
        for k in range(3)
    }
    exp = _experiment(tmp_path, data, runs)
    text = run(ReportConfig(experiment=exp, paper="KDSB18", wandb="disabled")).read_text()
    assert "0.891" in text and "0.911" in text and "Punn & Agarwal" in text
    with pytest.raises(UserError, match="paper's Table 2 has kdsb18, busis, isic2018, brats"):
        ReportConfig(experiment=exp, paper="lits")
    with pytest.raises(UserError, match="not-a-key not in the test split"):
        run(ReportConfig(experiment=exp, images="not-a-key", wandb="disabled"))
    key = load_manifest(data).splits["test"][0]
    assert key in run(ReportConfig(experiment=exp, images=key, wandb="disabled")).read_text()

    monkeypatch.setenv("WANDB_MODE", "offline")
    run(ReportConfig(experiment=exp, wandb="offline"))
    offline = list((exp / "report" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_report_command_line(tmp_path, data):
    runs = {("unet", v, k): 0.5 for v in ("bt", "scratch") for k in range(3)}
    exp = _experiment(tmp_path, data, runs)
    done = submit_cli("report", "--experiment", exp, "--wandb", "disabled")
    assert "| U-Net | Y | 3 |" in done.stdout and "report.md" in done.stdout
    bad = submit_cli("report", "--experiment", tmp_path / "nothing", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# --- zero and tied differences, pairing, the per-image bootstrap over paired folds ------------


def test_zero_differences_are_left_out_of_wilcoxon_and_said():
    from scipy import stats

    bt, scratch = np.array([0.5, 0.6, 0.7]), np.full(3, 0.5)
    out = paired_folds(bt, scratch)
    assert out["wilcoxon_p"] == pytest.approx(
        stats.wilcoxon((bt - scratch)[1:], method="exact").pvalue
    )
    assert out["wilcoxon_p"] == pytest.approx(0.5)  # 2 non-zero differences, both positive
    assert out["wilcoxon_smallest_p"] == 0.5
    assert "Wilcoxon over the 2 non-zero difference(s)" in out["note"]
    assert out["t_p"] == pytest.approx(stats.ttest_rel(bt, scratch).pvalue)


def test_tied_differences_are_flagged():
    from scipy import stats

    bt, scratch = np.array([0.75, 0.75, 0.25]), np.full(3, 0.5)  # d = +0.25, +0.25, -0.25
    out = paired_folds(bt, scratch)
    assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon(bt - scratch, method="exact").pvalue)
    assert "tied |differences|" in out["note"]


def test_fold_statistics_pair_the_folds_both_variants_finished():
    from hpc_btunet.report.statistics import fold_statistics

    def result(variant, fold, dice):
        metrics = {"precision": dice, "dice": dice, "iou": dice}
        return {"model": "unet", "variant": variant, "fold": fold, "test": {"mean": metrics}}

    results = [result("bt", 0, 0.8), result("bt", 1, 0.9), result("bt", 2, 0.0)]
    results += [result("scratch", 0, 0.5), result("scratch", 1, 0.7)]
    rows = fold_statistics(results, "mean")
    assert [r["metric"] for r in rows] == ["Pr", "DC", "IoU"]
    dc = rows[1]
    assert dc["folds"] == 2 and dc["mean_difference"] == pytest.approx(0.25)
    half = (
        12.706204736174698 * math.sqrt(((0.3 - 0.25) ** 2 + (0.2 - 0.25) ** 2) / 1) / math.sqrt(2)
    )
    assert (dc["ci_low"], dc["ci_high"]) == pytest.approx((0.25 - half, 0.25 + half))


def test_dice_bootstrap_averages_the_paired_folds_only():
    from hpc_btunet.report.results import Predictions
    from hpc_btunet.report.statistics import dice_bootstrap

    keys = np.array(["a", "b", "c", "d"])
    rng = np.random.default_rng(3)
    scratch = {k: rng.random(4) * 0.5 for k in (0, 1)}
    predictions = {("unet", "scratch", k): Predictions(None, keys, scratch[k]) for k in (0, 1)}
    for k in (0, 1):  # every image 0.2 better with BT on folds 0 and 1, in another order
        order = [3, 0, 2, 1]
        predictions[("unet", "bt", k)] = Predictions(None, keys[order], scratch[k][order] + 0.2)
    predictions[("unet", "bt", 2)] = Predictions(None, keys, np.zeros(4))  # no scratch fold 2
    rows, skipped = dice_bootstrap(["unet", "rca_iunet"], predictions, 1000, 0)
    (row,) = rows
    assert (row["folds"], row["images"]) == (2, 4)
    assert (row["mean"], row["low"], row["high"]) == pytest.approx((0.2, 0.2, 0.2))
    assert skipped == ["rca_iunet: no fold has predictions with and without BT"]
