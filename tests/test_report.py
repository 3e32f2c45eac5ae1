import csv
import io
import json
import re

import pytest
import yaml
from report_runs import predictions_of, write_record, write_run

from hpc_btunet.errors import UserError
from hpc_btunet.report import ReportConfig, run, summarise, write_report


def fake(tmp_path, model, variant, fold, dice):
    d = tmp_path / "finetune" / model / variant / f"fold-{fold}"
    d.mkdir(parents=True)
    m = {"precision": dice + 0.1, "dice": dice, "iou": dice / 2}
    (d / "metrics.json").write_text(
        json.dumps(
            {"model": model, "variant": variant, "fold": fold, "test": {"mean": m, "pooled": m}}
        )
    )


def test_table_layout_mean_and_std(tmp_path):
    for fold, (bt, scratch) in enumerate([(0.8, 0.6), (0.7, 0.5), (0.9, 0.7)]):
        fake(tmp_path, "unet", "bt", fold, bt)
        fake(tmp_path, "unet", "scratch", fold, scratch)
    fake(tmp_path, "attention_unet", "scratch", 0, 0.4)
    rows = summarise(
        [json.loads(p.read_text()) for p in tmp_path.glob("finetune/*/*/*/metrics.json")]
    )
    assert [(r["model"], r["bt"]) for r in rows] == [
        ("unet", "N"),
        ("unet", "Y"),
        ("attention_unet", "N"),
    ]
    assert rows[1]["dice"] == pytest.approx(0.8) and rows[1]["dice_std"] == pytest.approx(0.1)
    text, folder = write_report(tmp_path)
    assert "| U-Net | Y | 3 | 0.900 ± 0.100 | 0.800 ± 0.100 | 0.400 ± 0.050 |" in text
    assert "| A-Unet | N | 1 |" in text
    csv = (folder / "table.csv").read_text().splitlines()
    assert csv[0] == "model,bt,folds,precision,precision_std,dice,dice_std,iou,iou_std"
    assert len(csv) == 4


def test_no_results(tmp_path):
    with pytest.raises(UserError, match="no fine-tuning results"):
        write_report(tmp_path)


# --- run(): what the results lack is said in report.md, bad input is refused -----------------


def _read(folder):
    """Every text file of the report folder."""
    return {p.name: p.read_text() for p in folder.rglob("*") if p.suffix in (".md", ".csv")}


def test_missing_runs_are_named_started_or_not(tmp_path, capsys):
    exp = tmp_path / "exp"
    tasks = {"finetune/unet/scratch/fold-2": {"job_id": "4242_5", "log": "/logs/4242_5.err"}}
    write_record(exp, tmp_path / "data", ["unet", "attention_unet"], 3, tasks=tasks)
    for fold in range(3):
        write_run(exp, "unet", "bt", fold, 0.8)
    for fold in range(2):
        write_run(exp, "unet", "scratch", fold, 0.6)
    started = exp / "finetune" / "unet" / "scratch" / "fold-2"
    started.mkdir(parents=True)
    (started / "config.yaml").write_text("config: {}\n")

    text = run(ReportConfig(experiment=exp, wandb="disabled")).read_text()
    section = text.split("## Missing runs (failed or not run)")[1].split("\n## ")[0]
    assert (
        f"- unet/scratch/fold-2: started, no result (failed, stopped or still running); {started}; job 4242_5, log /logs/4242_5.err"
        in section
    )
    for variant in ("bt", "scratch"):
        for fold in range(3):
            assert f"- attention_unet/{variant}/fold-{fold}: not started;" in section
    assert section.count("\n- ") == 7
    printed = capsys.readouterr().out
    assert "7 expected run(s) missing" in printed and "unet/scratch/fold-2" in printed
    # the statistics pair the two folds that finished with and without BT
    stats = list(csv.DictReader((exp / "report" / "statistics.csv").open()))
    assert {s["folds"] for s in stats} == {"2"}


def test_without_experiment_record_the_folds_found_are_expected(tmp_path):
    write_run(tmp_path, "unet", "bt", 0, 0.7)
    write_run(tmp_path, "unet", "bt", 2, 0.7)
    write_run(tmp_path, "unet", "scratch", 0, 0.5)
    text = run(ReportConfig(experiment=tmp_path, wandb="disabled")).read_text()
    assert "- unet/scratch/fold-2: not started" in text
    assert "unet/bt/fold-1" not in text and "unet/scratch/fold-1" not in text


def test_older_runs_without_predictions_keep_the_table(tmp_path):
    for fold, (bt, scratch) in enumerate([(0.8, 0.6), (0.7, 0.5)]):
        write_run(tmp_path, "unet", "bt", fold, bt)
        write_run(tmp_path, "unet", "scratch", fold, scratch)
    report = run(ReportConfig(experiment=tmp_path, wandb="disabled"))
    text = report.read_text()
    assert "| U-Net | Y | 2 | 0.750 ± 0.071 |" in text
    fig5 = "## Fig. 5: predictions\n\nNot drawn: no fine-tuning run has usable predictions"
    assert fig5 in text
    assert "no predictions.npz (a run of an older version)" in text
    assert "unet: no fold has predictions with and without BT" in text
    figures = report.parent / "figures"
    assert (figures / "change.png").exists() and not (figures / "qualitative.png").exists()
    assert (report.parent / "bootstrap.csv").read_text() == "model,folds,images,mean,low,high\n"
    assert not (report.parent / "wandb").exists()  # --wandb disabled


def test_undefined_values_are_na_never_nan_or_inf(tmp_path):
    write_run(tmp_path, "unet", "bt", 0, 0.4)
    write_run(tmp_path, "unet", "scratch", 0, 0.0)  # the paper's U-Net on BUSIS
    report = run(ReportConfig(experiment=tmp_path, wandb="disabled"))
    files = _read(report.parent)
    for name, text in files.items():
        assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE), name
    stats = next(csv.DictReader(io.StringIO(files["statistics.csv"])))
    assert stats["ci_low"] == stats["t_p"] == stats["wilcoxon_p"] == "n/a"
    assert "fewer than 2 paired folds" in stats["note"]
    change = next(csv.DictReader(io.StringIO(files["change.csv"])))
    assert change["change_of_means_pct"] == change["fold_change_mean_pct"] == "n/a"
    assert change["per_fold_pct"] == "0:n/a" and change["folds_undefined"] == "1"
    assert "| U-Net | Pr | 1 | n/a | n/a (1 fold(s) n/a: scratch 0) |" in files["report.md"]


def test_bad_input_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    write_run(tmp_path, "unet", "bt", 0, 0.4)
    with pytest.raises(UserError, match="--images ' , ': give comma-separated test keys"):
        ReportConfig(experiment=tmp_path, images=" , ")
    with pytest.raises(UserError, match="--experiment is required"):
        ReportConfig()
    with pytest.raises(UserError, match="--paper 'lits'.*kdsb18, busis, isic2018, brats"):
        ReportConfig(experiment=tmp_path, paper="lits")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE='sometimes'"):
        run(ReportConfig(experiment=tmp_path, wandb="offline"))
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("name", ["KDSB18", "busis", "ISIC2018", "brats", "isic18"])
def test_paper_names_match_the_pack_sources(name):
    from hpc_btunet.data.sources import SOURCES
    from hpc_btunet.report.paper import TABLE2, paper_dataset

    assert paper_dataset(name) in TABLE2
    assert set(TABLE2) <= set(SOURCES)


def test_paper_table_beside_ours(tmp_path):
    write_run(tmp_path, "inception_unet", "bt", 0, {"precision": 0.5, "dice": 0.25, "iou": 0.125})
    write_run(tmp_path, "unet_plus_plus", "bt", 0, 0.3)  # not in the paper
    run(ReportConfig(experiment=tmp_path, paper="ISIC2018", wandb="disabled"))
    table = (tmp_path / "report" / "table.md").read_text()
    assert "ISIC18 (10%)" in table and "Punn & Agarwal" in table
    assert "| I-Unet | Y | 0.500 | 0.250 | 0.125 | 0.903 | 0.830 | 0.819 |" in table
    assert "| UNet++ | Y | 0.300 | 0.300 | 0.300 | - | - | - |" in table
    assert table in (tmp_path / "report" / "report.md").read_text().replace("## Table 2\n\n", "")


def test_provenance_engines_wall_times_and_a_second_manifest(tmp_path):
    def config(sha, **extra):
        provenance = {"package_version": "9.9", "git_revision": "cafe", "manifest_sha256": sha}
        return {
            "config": {"data": "/d", "engine": "ddp", "precision": "fp32"} | extra,
            "provenance": provenance | {"python": "3.11.2"},
        }

    write_run(tmp_path, "unet", "bt", 0, 0.5, train_seconds=100.0, config=config("a" * 64))
    write_run(tmp_path, "unet", "scratch", 0, 0.5, train_seconds=50.0, config=config("b" * 64))
    pre = tmp_path / "pretrain" / "unet"
    pre.mkdir(parents=True)
    (pre / "encoder.pt").write_bytes(b"")
    (pre / "config.yaml").write_text(
        yaml.safe_dump(config("a" * 64, engine="deepspeed", precision="bf16", world_size=8))
    )
    lines = [
        {"step": 1, "loss": 3.0, "train_seconds": 60.0},
        {"step": 2, "loss": 2.0, "train_seconds": 150.0},
    ]
    (pre / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = run(ReportConfig(experiment=tmp_path, wandb="disabled")).read_text()
    assert "**Warning: 2 different manifests (datasets)" in text
    provenance = text.split("## Provenance")[1]
    assert f"manifest sha256: {'a' * 64} (2 run(s)); {'b' * 64} (1 run(s))" in provenance
    assert "package version: 9.9; git revision: cafe; python 3.11.2" in provenance
    assert "- pre-training: engine deepspeed (bf16); world size 8" in provenance
    assert "- fine-tuning: engine ddp (fp32); world size 1" in provenance
    assert "summed over requeues): unet 150 s (2.5 min)" in provenance
    assert "150 s (2.5 min) over 2 run(s), longest 100 s" in provenance


def test_damaged_predictions_are_named_and_left_out(tmp_path):
    keys = ["a", "b", "c"]
    for fold in range(2):
        write_run(tmp_path, "unet", "bt", fold, 0.7, predictions=predictions_of(keys, 0.7))
        write_run(tmp_path, "unet", "scratch", fold, 0.5, predictions=predictions_of(keys, 0.5))
    damaged = tmp_path / "finetune" / "unet" / "scratch" / "fold-1" / "predictions.npz"
    damaged.write_bytes(b"not a zip archive")
    text = run(ReportConfig(experiment=tmp_path, wandb="disabled")).read_text()
    assert f"runs without usable predictions: {damaged}: unreadable" in text
    assert "1 run(s) without usable predictions are left out here and in the bootstrap" in text
    # fold 0 alone is paired: every image 0.2 better with BT
    boot = next(csv.DictReader((tmp_path / "report" / "bootstrap.csv").open()))
    assert (boot["folds"], boot["images"]) == ("1", "3")
    assert float(boot["low"]) == pytest.approx(0.2) == float(boot["high"])
    # the dataset is not recorded anywhere: Fig. 5 says so
    assert "Not drawn: the dataset is not recorded (no experiment.json, no run config)." in text
