"""Fig. 4's numbers against hand computation, Fig. 5's choices (fold, images, --images), and both
figures drawn as PNGs, alone and in the whole report over a packed dataset."""

from __future__ import annotations

import csv
import math
import shutil
import statistics

import numpy as np
import pytest
from PIL import Image
from report_runs import pack_data, predictions_of, split_keys, write_record, write_run

from hpc_btunet.errors import UserError
from hpc_btunet.report import ReportConfig, run
from hpc_btunet.report.figures import (
    change_figure,
    choose_images,
    fold_changes,
    plan_qualitative,
    qualitative_figure,
)
from hpc_btunet.report.results import Predictions


def _result(model, variant, fold, pr, dc, iou):
    metrics = {"precision": pr, "dice": dc, "iou": iou}
    return {
        "model": model,
        "variant": variant,
        "fold": fold,
        "test": {"mean": metrics, "pooled": metrics},
    }


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def _near(pixels: int, nominal: float) -> bool:
    """A figure's size in pixels against its nominal size (bbox "tight" trims or extends)."""
    return 0.75 * nominal < pixels < 1.15 * nominal


RESULTS = [
    # folds 0-2 with and without BT; IoU without BT is 0 on fold 2; fold 3 has no scratch run
    _result("unet", "bt", 0, 0.90, 0.80, 0.66),
    _result("unet", "bt", 1, 0.88, 0.75, 0.60),
    _result("unet", "bt", 2, 0.80, 0.70, 0.10),
    _result("unet", "bt", 3, 0.10, 0.10, 0.10),
    _result("unet", "scratch", 0, 0.80, 0.64, 0.60),
    _result("unet", "scratch", 1, 0.80, 0.60, 0.50),
    _result("unet", "scratch", 2, 0.64, 0.70, 0.00),
    _result("attention_unet", "scratch", 0, 0.5, 0.5, 0.5),  # never with BT: no bars
]


def test_fold_changes_against_hand_computation():
    rows = {r["metric"]: r for r in fold_changes(RESULTS, "mean")}
    assert [r["model"] for r in fold_changes(RESULTS, "mean")] == ["unet"] * 3
    # Pr: +12.5 %, +10 %, +25 % on the paired folds 0-2
    pr = rows["Pr"]
    assert pr["folds"] == 3 and pr["folds_undefined"] == 0
    assert pr["fold_change_mean_pct"] == pytest.approx((12.5 + 10 + 25) / 3)
    assert pr["fold_change_std_pct"] == pytest.approx(statistics.stdev([12.5, 10, 25]))
    assert pr["change_of_means_pct"] == pytest.approx(100 * (2.58 / 3 - 2.24 / 3) / (2.24 / 3))
    assert pr["per_fold_pct"] == "0:+12.50;1:+10.00;2:+25.00"
    # DC: +25 %, +25 %, 0 %
    assert rows["DC"]["fold_change_mean_pct"] == pytest.approx(50 / 3)
    assert rows["DC"]["fold_change_std_pct"] == pytest.approx(statistics.stdev([25, 25, 0]))
    # IoU: fold 2 without BT is 0: n/a there, +10 % and +20 % on the others
    iou = rows["IoU"]
    assert iou["folds_undefined"] == 1 and iou["per_fold_pct"] == "0:+10.00;1:+20.00;2:n/a"
    assert iou["fold_change_mean_pct"] == pytest.approx(15.0)
    assert iou["fold_change_std_pct"] == pytest.approx(math.sqrt(50))
    assert iou["change_of_means_pct"] == pytest.approx(100 * (1.36 / 3 - 1.1 / 3) / (1.1 / 3))


def test_change_figure_marks_undefined_bars(tmp_path):
    results = RESULTS + [
        _result("rca_iunet", "bt", 0, 0.5, 0.5, 0.5),
        _result("rca_iunet", "scratch", 0, 0.0, 0.0, 0.0),
    ]
    rows = fold_changes(results, "mean")
    assert [r["fold_change_mean_pct"] for r in rows if r["model"] == "rca_iunet"] == [None] * 3
    for name, drawn in (("some", rows), ("none", [r for r in rows if r["model"] == "rca_iunet"])):
        path = tmp_path / "figures" / f"{name}.png"
        change_figure(drawn, path)  # every bar n/a: the axis still frames the figure
        width, height = _png(path)
        assert 500 < width < 1200 and 400 < height < 700, (name, width, height)


def test_choose_images_spreads_over_the_ranks():
    dice = {f"k{i}": d for i, d in enumerate([0.9, 0.1, 0.5, 0.3, 0.7, 0.5, 0.2, 0.8, 0.0])}
    # ranked: k8 0.0, k1 0.1, k6 0.2, k3 0.3, k2 0.5, k5 0.5 (tie: by key), k4, k7, k0
    assert choose_images(dice, 5) == ["k8", "k6", "k2", "k4", "k0"]
    assert choose_images(dice, 2) == ["k8", "k0"]
    assert choose_images(dice, 1) == ["k8"]
    assert choose_images(dice, 20) == ["k8", "k1", "k6", "k3", "k2", "k5", "k4", "k7", "k0"]
    assert choose_images(dice, 3) == choose_images(dict(reversed(dice.items())), 3)


def _predictions(keys, dice):
    return Predictions(None, np.array(keys), np.array(dice, dtype=float))


def test_plan_takes_the_first_fold_every_run_finished():
    keys = ["a", "b", "c"]
    runs = {
        ("unet", "bt", 0): _predictions(keys, [0.1, 0.2, 0.3]),
        ("unet", "bt", 1): _predictions(keys, [0.9, 0.5, 0.1]),
        ("unet", "scratch", 1): _predictions(keys, [0.7, 0.5, 0.3]),
        ("unet", "scratch", 2): _predictions(keys, [0.1, 0.1, 0.1]),
    }
    plan = plan_qualitative(runs, None, 2)
    assert plan.fold == 1 and plan.runs == [("unet", "scratch"), ("unet", "bt")]
    assert plan.keys == ["c", "a"]  # mean Dice over the runs: a 0.8, b 0.5, c 0.2
    assert plan_qualitative(runs, ["b"], 4).keys == ["b"]
    with pytest.raises(UserError, match="--images: zz, yy not in the test split.*e.g. a, b, c"):
        plan_qualitative(runs, ["zz", "a", "yy"], 4)
    del runs[("unet", "scratch", 1)]
    assert "no fold has predictions from every model and variant" in plan_qualitative(runs, None, 2)


def test_qualitative_figure_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((16, 16), bool)
    truth[4:9, 3:12] = True
    empty, full = np.zeros((16, 16), np.uint8), np.ones((16, 16), np.uint8)
    columns = [
        ("U-Net", {"a": empty, "b": truth.astype(np.uint8)}, {"a": 0.0, "b": 1.0}),
        ("U-Net + BT", {"a": full, "b": truth.astype(np.uint8)}, {"a": 0.3, "b": 1.0}),
    ]
    for channels, rgb in ((1, False), (3, True)):
        images = {k: rng.integers(0, 256, (16, 16, channels), dtype=np.uint8) for k in "ab"}
        path = tmp_path / f"fig5-{channels}.png"
        qualitative_figure(["a", "b"], images, {"a": truth, "b": truth}, columns, path, "t", rgb)
        width, height = _png(path)
        # 4 columns of 1.9 in, 2 rows of 1.95 in and the legend at 120 dpi, margins trimmed
        assert _near(width, 4 * 1.9 * 120) and _near(height, (2 * 1.95 + 0.7) * 120)


# --- the whole report over a packed dataset ----------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pack_data(tmp_path_factory.mktemp("report-figures") / "data")


def _study(exp, data, folds=2, per_image=None):
    """unet with and without BT on every fold; per-image Dice ``per_image(variant, fold, i)``."""
    keys = split_keys(data)
    write_record(exp, data, ["unet"], folds)
    for variant in ("bt", "scratch"):
        for fold in range(folds):
            dice = [per_image(variant, fold, i) for i in range(len(keys))]
            predictions = predictions_of(keys, dice)
            write_run(exp, "unet", variant, fold, float(np.mean(dice)), predictions=predictions)
    return keys


def test_fig5_in_the_report_shows_the_documented_images(tmp_path, data):
    # per-image Dice rising with the image's index: the ranks are the indices
    keys = _study(tmp_path, data, per_image=lambda v, k, i: i / 100 + (0.01 if v == "bt" else 0))
    report = run(ReportConfig(experiment=tmp_path, wandb="disabled", num_images=3))
    n = len(keys)
    expected = [keys[0], keys[round((n - 1) / 2)], keys[n - 1]]
    text = report.read_text()
    assert "Fold 0's predictions" in text
    assert f"to the easiest: {', '.join(expected)}." in text
    assert "![Fig. 5](figures/qualitative.png)" in text and "![Fig. 4](figures/change.png)" in text
    width, height = _png(report.parent / "figures" / "qualitative.png")
    assert _near(width, 4 * 1.9 * 120) and _near(height, (3 * 1.95 + 0.7) * 120)
    _png(report.parent / "figures" / "change.png")
    # the bootstrap of constant per-image differences: the interval is the difference itself
    boot = next(csv.DictReader((report.parent / "bootstrap.csv").open()))
    assert boot["images"] == str(n) and boot["folds"] == "2"
    for field in ("mean", "low", "high"):
        assert float(boot[field]) == pytest.approx(0.01)

    chosen = keys[5]
    text = run(ReportConfig(experiment=tmp_path, images=chosen, wandb="disabled")).read_text()
    assert f"Images chosen by --images: {chosen}." in text


def test_unknown_images_are_refused_before_writing(tmp_path, data):
    keys = _study(tmp_path, data, per_image=lambda v, k, i: 0.5)
    with pytest.raises(UserError) as refused:
        run(ReportConfig(experiment=tmp_path, images=f"{keys[0]},train-key,nope", wandb="disabled"))
    message = str(refused.value)
    assert message.startswith("--images: train-key, nope not in the test split of")
    assert f"e.g. {', '.join(sorted(keys)[:5])}" in message
    assert not (tmp_path / "report").exists()


def test_fig5_is_skipped_with_its_reason_when_the_dataset_is_gone(tmp_path, data):
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    _study(tmp_path / "exp", moved, per_image=lambda v, k, i: 0.5)
    run(ReportConfig(experiment=tmp_path / "exp", wandb="disabled"))
    figure = tmp_path / "exp" / "report" / "figures" / "qualitative.png"
    assert figure.exists()
    shutil.rmtree(moved)
    text = run(ReportConfig(experiment=tmp_path / "exp", wandb="disabled")).read_text()
    assert f"Not drawn: the dataset {moved} is not readable here" in text
    assert not figure.exists()  # the earlier report's figure does not stay beside the text
    assert "| U-Net | Y | 2 | 0.500 ± 0.000 |" in text


def test_wandb_offline_run_holds_the_report(tmp_path, data, monkeypatch):
    _study(tmp_path, data, per_image=lambda v, k, i: 0.5 + 0.1 * (v == "bt"))
    monkeypatch.delenv("WANDB_MODE")
    run(ReportConfig(experiment=tmp_path, wandb="offline"))
    (offline,) = (tmp_path / "report" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))
    media = {p.name.split("_")[0] for p in offline.rglob("*") if p.suffix in (".png", ".json")}
    assert {"table2", "change", "qualitative"} <= media, media
