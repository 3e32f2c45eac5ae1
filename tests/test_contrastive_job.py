"""The ``contrastive`` job on the synthetic lesion data: the pair and the CAM baseline train from
image-level labels only, write their weights, predictions and metrics.json with the organ and
whole-image baselines, skip a complete run, and refuse bad input before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import pack_lesions, pack_toy, submit_cli

TINY = ["--base-width", "4", "--depth", "2", "--batch-size", "8", "--steps", "3"]
TINY += ["--executor", "debug", "--device", "cpu", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    return pack_lesions(tmp_path_factory.mktemp("lesions") / "data", n=48, seed=1)


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    return pack_toy(tmp_path_factory.mktemp("nuclei") / "data", n=30, image_size=32)


def test_pair_trains_from_labels_and_scores_against_the_hidden_masks(lesions, tmp_path):
    from hpc_btunet.data import load_manifest
    from hpc_btunet.models import build_model

    exp = tmp_path / "exp"
    done = submit_cli("contrastive", "--data", lesions, "--out", exp, *TINY)
    run = exp / "contrastive" / "pair" / "unet_plus_plus"
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = load_manifest(lesions)
    test = manifest.splits["test"]
    abnormal = sum(manifest.labels[k] != "normal" for k in test)
    assert metrics["test_images"] == {"all": len(test), "abnormal": abnormal}
    for name in ("test", "test_abnormal"):
        assert set(metrics[name]["mean"]) == {"precision", "dice", "iou"}
        assert all(0 <= v <= 1 for v in metrics[name]["mean"].values())
    assert set(metrics["baselines"]) == {"organ", "whole_image"}
    predictions = np.load(run / "predictions.npz")
    assert sorted(predictions["keys"].tolist()) == sorted(test)
    assert predictions["masks"].shape == (len(test), 32, 32)
    assert predictions["dice"].mean() == pytest.approx(metrics["test"]["mean"]["dice"])
    scores = metrics["scores"]  # the probability map before its threshold
    assert 0 <= scores["auroc"] <= 1
    assert all(0 <= scores[k] <= 1 for k in ("lesion_mean", "other_mean", "normal_mean"))
    for name in ("a", "b"):  # each network loads into the model it was built as
        state = torch.load(run / f"{name}.pt", weights_only=True)
        model = build_model("unet_plus_plus", base_width=4, depth=2)
        model.load_state_dict(state)
    assert "test dice" in done.stdout
    again = submit_cli("contrastive", "--data", lesions, "--out", exp, *TINY)
    assert "is complete" in again.stdout and "skipped" in again.stdout


def test_whole_image_baseline_by_hand(lesions, tmp_path):
    """The whole image as the prediction: on an abnormal image precision = lesion fraction,
    Dice = 2 f / (1 + f); the job's number equals this computed from the masks directly."""
    from hpc_btunet.data import make_loader

    exp = tmp_path / "exp"
    submit_cli("contrastive", "--data", lesions, "--out", exp, *TINY, "--method", "cam")
    metrics = json.loads(
        (exp / "contrastive" / "cam" / "unet_plus_plus" / "metrics.json").read_text()
    )
    loader = make_loader(lesions, "test", batch_size=64, shuffle=False, drop_last=False)
    dice = []
    for batch in loader:
        for mask, pad in zip(batch["mask"], batch["pad"], strict=True):
            f = mask.float().mean().item()
            if not pad and f > 0:
                dice.append(2 * f / (1 + f))
    whole = metrics["baselines"]["whole_image"]["abnormal"]["mean"]["dice"]
    assert whole == pytest.approx(np.mean(dice))
    assert (exp / "contrastive" / "cam" / "unet_plus_plus" / "classifier.pt").exists()


def test_crop_to_the_organ(lesions, tmp_path):
    exp = tmp_path / "exp"
    submit_cli("contrastive", "--data", lesions, "--out", exp, *TINY, "--crop")
    metrics = json.loads(
        (exp / "contrastive" / "pair" / "unet_plus_plus" / "metrics.json").read_text()
    )
    assert 0 <= metrics["test"]["mean"]["dice"] <= 1


def test_crop_and_uncrop_boxes():
    from hpc_btunet.train.contrastive import crop_to_boxes, organ_boxes, uncrop

    organ = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    organ[0, 0, 2:6, 1:5] = 1  # rows 2..5, columns 1..4; image 1: no organ, the whole image
    boxes = organ_boxes(organ)
    assert boxes.tolist() == [[2, 1, 6, 5], [0, 0, 8, 8]]
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 2:6, 1:5] = 1.0
    cropped = crop_to_boxes(maps, boxes)
    assert torch.allclose(cropped[0], torch.ones(1, 8, 8))  # the box fills the image
    back = uncrop(cropped, boxes)
    assert torch.allclose(back, maps)


def test_cam_masks_follow_the_classification():
    from hpc_btunet.train.contrastive import cam_masks, cam_scores

    maps = torch.zeros(3, 1, 4, 4)
    maps[:, 0, 0, 0], maps[:, 0, 1, 1] = 1.0, 0.4
    masks = cam_masks(maps, torch.tensor([2.0, -1.0, 0.5]), threshold=0.5)
    assert masks[0].sum() == 1 and masks[0, 0, 0, 0]  # 0.4 < half of the peak
    scores = cam_scores(maps, torch.tensor([2.0, -1.0, 0.5]))
    assert scores[0, 0, 1, 1] == pytest.approx(0.4) and scores[1].sum() == 0
    assert not masks[1].any()  # classified normal: nothing
    assert cam_masks(torch.zeros(1, 1, 4, 4), torch.tensor([3.0]), 0.5).sum() == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eta", "0"], "--eta"),
        (["--eta", "1.5"], "--eta"),
        (["--pairs", "distorted,normal"], "yields no negative pairs"),
        (["--pairs", "negative,mixed"], "choose among"),
        (["--normal-label", "healthy"], "labelled 'healthy'"),
        (["--batch-size", "1"], "global batch of 1"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(lesions, tmp_path, extra, message):
    exp = tmp_path / "exp"
    done = submit_cli("contrastive", "--data", lesions, "--out", exp, *TINY, *extra, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (exp / "contrastive").exists()


def test_a_dataset_without_labels_or_organ_masks(nuclei, tmp_path):
    exp = tmp_path / "exp"
    done = submit_cli("contrastive", "--data", nuclei, "--out", exp, *TINY, check=False)
    assert done.returncode == 2 and "has no image-level labels" in done.stderr
    assert "Traceback" not in done.stderr and not (exp / "contrastive").exists()


def test_crop_without_organ_masks_is_refused_naming_the_way_out(tmp_path):
    """A labelled dataset that stores no organ masks (as BUSI): ``--crop`` is refused by the
    input check, which runs before anything is written or submitted."""
    from types import SimpleNamespace

    from hpc_btunet.errors import UserError
    from hpc_btunet.train.contrastive import ContrastiveConfig

    keys = [f"k{i}" for i in range(8)]
    manifest = SimpleNamespace(
        labels={k: "normal" if i % 2 else "benign" for i, k in enumerate(keys)},
        splits={"train": keys[:6], "test": keys[6:]},
        counts={"train": 6, "test": 2},
        unlabelled=[],
        has_organ=False,
    )
    cfg = ContrastiveConfig(data=str(tmp_path), out=str(tmp_path / "exp"), batch_size=4)
    cfg.check_inputs(manifest, world_size=1)  # without --crop: accepted
    cfg = ContrastiveConfig(data=str(tmp_path), out=str(tmp_path / "exp"), batch_size=4, crop=True)
    with pytest.raises(UserError, match="--crop needs organ masks.*drop --crop"):
        cfg.check_inputs(manifest, world_size=1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wandb_offline_run_holds_the_losses_per_pair_kind_and_the_config(
    lesions, tmp_path, monkeypatch
):
    from test_tracking import history_and_config

    from hpc_btunet.train.contrastive import ContrastiveConfig, run

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = ContrastiveConfig(
        data=lesions, out=tmp_path / "exp", steps=3, log_every=1, base_width=4, depth=2,
        batch_size=8, device="cpu", eta=0.25,
    )  # fmt: skip
    run(cfg)
    (offline,) = (cfg.run_dir() / "wandb").glob("offline-run-*")
    run_id = (cfg.run_dir() / "wandb-id").read_text().strip()
    history, config = history_and_config(offline / f"run-{run_id}.wandb")
    steps = [h for h in history if "loss" in h]
    local = [
        json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
    ]
    assert [h["loss"] for h in steps] == pytest.approx([r["loss"] for r in local])
    assert all("loss_negative" in h and "loss_distorted" in h for h in steps)
    assert config["method"] == "pair" and config["eta"] == 0.25 and config["global_batch"] == 8
