"""The ``contrastive`` job across processes and interruptions: 2 gloo ranks follow the one-process
run on the same global batch (pairs span both ranks' images, BatchNorm over every rank's inputs
to a network), under DDP and under DeepSpeed's ZeRO 2; a run cut after a checkpoint resumes on
another world size; SLURM's warning signal in the middle of a step saves, and a rerun ends as the
undisturbed run.

Tolerance as in tests/test_invariance.py: only the order of floating-point reductions differs
between world sizes (1e-4 relative on the loss, 1e-4 relative + 1e-5 absolute on weights and
running statistics); a run with another seed fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import logged_losses, pack_lesions, submit_cli

from hpc_btunet.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow
STEPS, GLOBAL = 4, 8
COMMON = ["--base-width", "4", "--depth", "2", "--steps", STEPS, "--log-every", "1"]
COMMON += ["--checkpoint-every", 2, "--wandb", "disabled", "--device", "cpu"]


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    return pack_lesions(tmp_path_factory.mktemp("lesions") / "data", n=40, seed=3)


def _contrastive(data, out, ranks: int, *flags, check: bool = True):
    where = ["--executor", "debug", "--batch-size", GLOBAL]
    if ranks > 1:
        where = ["--executor", "local", "--tasks-per-node", ranks, "--wait"]
        where += ["--batch-size", GLOBAL // ranks]
    return submit_cli(
        "contrastive", "--data", data, "--out", out, *COMMON, *where, *flags,
        check=check, timeout=400,
    )  # fmt: skip


def _run(out, method: str = "pair"):
    return out / "contrastive" / method / "unet_plus_plus"


def _assert_same_run(got, want, method: str = "pair", *, rtol: float = 1e-4, atol: float = 1e-5):
    assert logged_losses(_run(got, method)) == pytest.approx(
        logged_losses(_run(want, method)), rel=rtol, abs=atol
    )
    for name in ("a", "b") if method == "pair" else ("classifier",):
        a = torch.load(_run(got, method) / f"{name}.pt", weights_only=True)
        b = torch.load(_run(want, method) / f"{name}.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key, value in b.items():
            torch.testing.assert_close(a[key], value, rtol=rtol, atol=atol, msg=f"{name}: {key}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["pair", "cam"])
def test_two_ranks_follow_the_one_process_run(lesions, tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    _contrastive(lesions, one, 1, "--method", method)
    _contrastive(lesions, two, 2, "--method", method)
    assert len(logged_losses(_run(one, method))) == STEPS
    record = yaml.safe_load((_run(two, method) / "config.yaml").read_text())["config"]
    assert (record["world_size"], record["global_batch"]) == (2, GLOBAL)
    _assert_same_run(two, one, method)
    metrics = [json.loads((_run(o, method) / "metrics.json").read_text()) for o in (one, two)]
    assert metrics[1]["test_images"] == metrics[0]["test_images"]
    assert metrics[1]["test"]["mean"]["dice"] == pytest.approx(
        metrics[0]["test"]["mean"]["dice"], abs=0.02
    )  # a pixel at the threshold may fall either side
    if method == "pair":  # the check has teeth: another seed is another run
        other = tmp_path / "other"
        _contrastive(lesions, other, 1, "--seed", 1)
        with pytest.raises(AssertionError):
            _assert_same_run(other, one)


@pytest.mark.timeout(600)
def test_deepspeed_zero2_on_two_ranks_follows_the_one_process_ddp_run(lesions, tmp_path):
    """The pair under DeepSpeed (ZeRO 2: optimiser states and gradients partitioned over the
    ranks) computes what one DDP process does; both networks are exported whole."""
    one, zero2 = tmp_path / "one", tmp_path / "zero2"
    _contrastive(lesions, one, 1)
    _contrastive(lesions, zero2, 2, "--engine", "deepspeed", "--zero-stage", 2)
    record = yaml.safe_load((_run(zero2) / "config.yaml").read_text())["config"]
    assert (record["engine"], record["world_size"]) == ("deepspeed", 2)
    _assert_same_run(zero2, one)


@pytest.mark.timeout(600)
def test_a_run_cut_after_a_checkpoint_resumes_on_another_world_size(lesions, tmp_path):
    two = tmp_path / "two"
    _contrastive(lesions, two, 2)
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    for name in ("a.pt", "b.pt", "metrics.json", "predictions.npz"):
        (_run(cut) / name).unlink()
    first, *later = list_checkpoints(_run(cut) / "checkpoints")
    for folder in later:
        shutil.rmtree(folder)
    done = _contrastive(lesions, cut, 1)
    assert f"(step 2 of {STEPS})" in done.stdout, done.stdout
    _assert_same_run(cut, two)


# SLURM's warning signal, in the middle of the second step's loss
SIGNAL_IN_STEP = """
import os, signal, sys
import hpc_btunet.train.contrastive_step as step
real, calls = step.hybrid_loss, [0]
def hybrid_loss(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGUSR2)
    return real(*args, **kwargs)
step.hybrid_loss = hybrid_loss
from hpc_btunet.submit import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(600)
def test_the_warning_signal_mid_step_saves_and_a_rerun_ends_as_the_undisturbed_run(
    lesions, tmp_path
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _contrastive(lesions, straight, 1, "--checkpoint-every", 100)
    args = ["contrastive", "--data", lesions, "--out", stopped, *COMMON]
    args += ["--executor", "debug", "--batch-size", GLOBAL, "--checkpoint-every", 100]
    env = dict(os.environ, WANDB_MODE="disabled")
    # UNet++ of depth 2: 2 heads x 2 members per step; call 6 is inside step 2
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_STEP.format(n=6), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "SIGUSR2" in done.stderr, done.stdout + done.stderr
    assert "rerun the same command" in done.stderr
    checkpoints = list_checkpoints(_run(stopped) / "checkpoints")
    state = torch.load(checkpoints[-1] / "job.pt", weights_only=True)
    assert state["step"] == 2, "saved after the step it was in, long before --checkpoint-every"
    assert not (_run(stopped) / "metrics.json").exists()
    rerun = _contrastive(lesions, stopped, 1, "--checkpoint-every", 100)
    assert f"(step 2 of {STEPS})" in rerun.stdout
    _assert_same_run(stopped, straight, rtol=0, atol=0)
    got, want = (json.loads((_run(o) / "metrics.json").read_text()) for o in (stopped, straight))
    assert got["test"] == want["test"] and got["baselines"] == want["baselines"]
