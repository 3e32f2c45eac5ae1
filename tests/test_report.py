import json

import pytest

from hpc_btunet.errors import UserError
from hpc_btunet.report import summarise, write_report


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
