"""The pretrain job: resume after SIGKILL reproduces an uninterrupted run; a NaN stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hpc_btunet.ssl import BarlowTwinsLoss
from hpc_btunet.train import pretrain
from hpc_btunet.train.checkpoint import list_checkpoints

TINY = ["--base-width", "4", "--depth", "2", "--batch-size", "8", "--log-every", "1"]


@pytest.fixture
def data(toy_pack):
    out, _ = toy_pack(n=60, image_size=32, shard_size=15)
    return out


def cli(*args):
    return [
        sys.executable,
        "-m",
        "hpc_btunet.submit",
        "pretrain",
        "--executor",
        "debug",
        *map(str, args),
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "engine",
    [["--engine", "ddp"], ["--engine", "deepspeed", "--zero-stage", "1"]],
    ids=["ddp", "deepspeed"],
)
def test_sigkill_then_rerun_equals_uninterrupted_run(data, tmp_path, engine):
    common = ["--data", data, "--steps", 24, "--checkpoint-every", 4, *TINY, *engine]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        cli(*common, "--out", tmp_path / "straight"), check=True, env=env, capture_output=True
    )

    out = tmp_path / "killed"
    ckpts = out / "pretrain" / "unet" / "checkpoints"
    proc = subprocess.Popen(
        cli(*common, "--out", out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list_checkpoints(ckpts) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = list_checkpoints(ckpts)
    assert saved, "the run was killed before its first checkpoint"
    killed_at = int(saved[-1].name.split("-")[1])
    assert not (out / "pretrain" / "unet" / "encoder.pt").exists(), (
        "killed too late to test resuming"
    )

    rerun = subprocess.run(
        cli(*common, "--out", out), check=True, env=env, capture_output=True, text=True
    )
    assert f"resuming from {saved[-1]} (step {killed_at} of 24)" in rerun.stdout
    log = [
        json.loads(line)
        for line in (out / "pretrain" / "unet" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == list(range(1, 25)), (
        "the step counter continues, no step twice"
    )

    a = torch.load(tmp_path / "straight" / "pretrain" / "unet" / "encoder.pt", weights_only=True)
    b = torch.load(out / "pretrain" / "unet" / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    straight = [
        json.loads(line)["loss"]
        for line in (tmp_path / "straight" / "pretrain" / "unet" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert straight == [r["loss"] for r in log]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = BarlowTwinsLoss.forward

    def poisoned(self, z_a, z_b):
        calls["n"] += 1
        loss = real(self, z_a, z_b)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(BarlowTwinsLoss, "forward", poisoned)
    cfg = pretrain.PretrainConfig(
        data=data,
        out=tmp_path,
        steps=10,
        checkpoint_every=2,
        base_width=4,
        depth=2,
        batch_size=8,
        device="cpu",
    )
    with pytest.raises(pretrain.TrainingDiverged, match="at step 5") as err:
        pretrain.run(cfg)
    ckpts = list_checkpoints(cfg.run_dir() / "checkpoints")
    assert ckpts[-1].name == "step-00000004" and str(ckpts[-1]) in str(err.value)
    assert not (cfg.run_dir() / "encoder.pt").exists()
    state = torch.load(ckpts[-1] / "engine.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_complete_run_is_skipped_and_encoder_loads_safely(data, tmp_path, capsys):
    cfg = pretrain.PretrainConfig(
        data=data, out=tmp_path, steps=3, base_width=4, depth=2, batch_size=8, device="cpu"
    )
    path = pretrain.run(cfg)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads(path.with_suffix(".json").read_text())["name"] == "unet"
    assert pretrain.run(cfg) == path
    assert "nothing to do" in capsys.readouterr().out
    config = (cfg.run_dir() / "config.yaml").read_text()
    assert "manifest_sha256" in config and "git_revision" in config and "global_batch: 8" in config


def test_lr_schedule_runs_to_the_last_step(data, tmp_path):
    cfg = pretrain.PretrainConfig(
        data=data,
        out=tmp_path,
        epochs=2,
        base_width=4,
        depth=2,
        batch_size=8,
        device="cpu",
        log_every=1,
        warmup_steps=2,
    )
    pretrain.run(cfg)
    log = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log]
    assert len(lrs) == 2 * (42 // 8)
    assert lrs[-1] == pytest.approx(1e-3 * 0.01) and min(lrs[:-1]) > lrs[-1]
    assert all(r["images_per_s"] > 0 and 0 < r["on_diag_mean"] <= 1.0 + 1e-6 for r in log)
    seconds = [r["train_seconds"] for r in log]  # the report's wall time of pre-training
    assert seconds[0] > 0 and all(a < b for a, b in zip(seconds, seconds[1:], strict=False))


def test_wrong_image_size_for_model(toy_pack, tmp_path):
    out, _ = toy_pack(n=60, image_size=36)
    cfg = pretrain.PretrainConfig(
        data=out, out=tmp_path, steps=1, depth=3, base_width=4, batch_size=8, device="cpu"
    )
    with pytest.raises(Exception, match="36") as err:
        pretrain.run(cfg)
    assert "8" in str(err.value)
