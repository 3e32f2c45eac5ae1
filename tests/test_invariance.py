"""The same run on any hardware: the real ``pretrain`` job follows one trajectory whatever the
number of ranks and micro-batches that make up its global batch, and resumes on another world
size.

Tolerance. Between these runs only the order of floating-point reductions differs: the loss's
sums over the gathered batch (concatenated by rank, so in another row order), BatchNorm's sums
(one tensor, or per-rank partial sums all-reduced), DDP's gradient all-reduce. Each is a sum of
at most a few thousand fp32 terms, exact to ~1e-6 relative, and Adam's division by the root of
the second moment amplifies differences in tiny gradients. Measured here over 5 steps: losses
agree to 1.4e-6 relative, weights to 2.6e-6 absolute. The tolerances below (1e-4 relative on the
loss; 1e-4 relative + 1e-5 absolute on weights and running statistics) leave a margin above that
and are far below what another composition of the batch, another view or BatchNorm grouping
does: two checks below show that a run with another seed, and global against local BatchNorm,
fail them.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import logged_losses, submit_cli

GLOBAL = 8
STEPS = 5
COMMON = ["--base-width", "4", "--depth", "2", "--log-every", "1", "--wandb", "disabled"]
COMMON += ["--warmup-steps", "2", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("invariance") / "data"
    submit_cli("pack", "--num-images", 60, "--image-size", 32, "--shard-size", 15, "--out", out)
    return out


def _pretrain(data, out, ranks: int, *flags, check: bool = True, steps: int = STEPS):
    where = ["--executor", "debug"]
    if ranks > 1:
        where = ["--executor", "local", "--tasks-per-node", ranks, "--wait"]
    return submit_cli(
        "pretrain",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        steps,
        *COMMON,
        *where,
        *flags,
        check=check,
        timeout=400,
    )


def _run(out):
    return out / "pretrain" / "unet"


def _losses(out) -> list[float]:
    return logged_losses(_run(out))


def _assert_same_run(got, want, *, buffers: bool = True):
    assert _losses(got) == pytest.approx(_losses(want), rel=1e-4)
    a = torch.load(_run(got) / "encoder.pt", weights_only=True)
    b = torch.load(_run(want) / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name, value in b.items():
        if not buffers and ("running_" in name or "num_batches" in name):
            continue
        torch.testing.assert_close(a[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_world_sizes_1_2_4_follow_one_trajectory_with_global_batchnorm(data, tmp_path):
    """1 x 8, 2 x 4 and 4 x 2 gloo processes: equal loss histories and encoders (BatchNorm
    running statistics included)."""
    runs = {}
    for ranks in (1, 2, 4):
        runs[ranks] = tmp_path / f"w{ranks}"
        _pretrain(data, runs[ranks], ranks, "--batch-size", GLOBAL // ranks)
    assert len(_losses(runs[1])) == STEPS
    for ranks in (2, 4):
        _assert_same_run(runs[ranks], runs[1])
    record = yaml.safe_load((_run(runs[4]) / "config.yaml").read_text())["config"]
    assert (record["world_size"], record["global_batch"], record["batchnorm_batch"]) == (4, 8, 8)
    # the check has teeth: another composition of the global batch (another seed) is caught
    other = tmp_path / "other-seed"
    _pretrain(data, other, 1, "--batch-size", GLOBAL, "--seed", 1)
    with pytest.raises(AssertionError):
        _assert_same_run(other, runs[1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ranks_with_local_batchnorm_equal_accumulated_micro_batches(data, tmp_path):
    """(2 ranks x 4, local BatchNorm) = (1 rank, 2 micro-batches of 4); (4 ranks x 2, local) =
    (2 ranks x 2 micro-batches of 2, local) = (1 rank x 4 micro-batches of 2): losses, weights
    and the running statistics, which every rank applies in global order."""
    local = ["--bn-scope", "local"]
    two_ranks, accumulated = tmp_path / "w2", tmp_path / "k2"
    _pretrain(data, two_ranks, 2, "--batch-size", 4, *local)
    _pretrain(data, accumulated, 1, "--batch-size", 4, "--accumulate", 2, *local)
    _assert_same_run(two_ranks, accumulated)
    runs = {}
    for ranks, k in ((4, 1), (2, 2), (1, 4)):
        runs[ranks] = tmp_path / f"w{ranks}k{k}"
        _pretrain(data, runs[ranks], ranks, "--batch-size", 2, "--accumulate", k, *local)
    _assert_same_run(runs[2], runs[4])
    _assert_same_run(runs[1], runs[4])
    # the BatchNorm batch is part of the trajectory: global statistics over 8 images differ
    with pytest.raises(AssertionError):
        _assert_same_run(two_ranks, _global_run(data, tmp_path))


def _global_run(data, tmp_path):
    out = tmp_path / "global"
    _pretrain(data, out, 1, "--batch-size", GLOBAL)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_accumulation_with_global_batchnorm_equals_the_wider_micro_batch(data, tmp_path):
    """(2 ranks x 2 micro-batches of 2, global BatchNorm over 4) = (1 rank x 2 micro-batches
    of 4): micro-batch k of every rank together is slice k of the global batch."""
    ranks, one = tmp_path / "w2k2", tmp_path / "w1k2"
    _pretrain(data, ranks, 2, "--batch-size", 2, "--accumulate", 2)
    _pretrain(data, one, 1, "--batch-size", 4, "--accumulate", 2)
    _assert_same_run(ranks, one)


def _cut_after_first_checkpoint(src, dst):
    """A copy of a complete run as if it had stopped right after its first checkpoint."""
    import shutil

    shutil.copytree(src, dst)
    (_run(dst) / "encoder.pt").unlink()
    first, *later = sorted((_run(dst) / "checkpoints").glob("step-*"))
    for folder in later:
        shutil.rmtree(folder)
    return first.name


EVERY_3 = ["--checkpoint-every", 3]  # with steps=6: checkpoints at steps 3 and 6


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "engine",
    [["--engine", "ddp"], ["--engine", "deepspeed", "--zero-stage", "0"]],
    ids=["ddp", "deepspeed-zero0"],
)
def test_elastic_resume_on_another_world_size_continues_the_same_run(data, tmp_path, engine):
    """2 ranks x 4 checkpoint at step 3, resumed on 1 rank x 8 (and 1 -> 2): the final encoder
    and the losses after the resume equal the uninterrupted run's."""
    two = tmp_path / "two"
    _pretrain(data, two, 2, "--batch-size", 4, *engine, *EVERY_3, steps=6)
    cut = tmp_path / "two-then-one"
    assert _cut_after_first_checkpoint(two, cut) == "step-00000003"
    done = _pretrain(data, cut, 1, "--batch-size", 8, *engine, *EVERY_3, steps=6)
    assert "resuming from" in done.stdout and "(step 3 of 6)" in done.stdout, done.stdout
    _assert_same_run(cut, two)
    record = yaml.safe_load((_run(cut) / "config.yaml").read_text())
    assert record["config"]["world_size"] == 1
    assert record["history"][-1]["config"]["world_size"] == 2  # the earlier layout, recorded
    assert record["history"][-1]["until_step"] == 3

    one = tmp_path / "one"
    _pretrain(data, one, 1, "--batch-size", 8, *engine, *EVERY_3, steps=6)
    cut = tmp_path / "one-then-two"
    _cut_after_first_checkpoint(one, cut)
    _pretrain(data, cut, 2, "--batch-size", 4, *engine, *EVERY_3, steps=6)
    _assert_same_run(cut, one)
    _assert_same_run(one, two)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_resume_that_would_change_the_trajectory_is_refused_before_submission(data, tmp_path):
    two = tmp_path / "two"
    _pretrain(data, two, 2, "--batch-size", 4, *EVERY_3, steps=6)
    _cut_after_first_checkpoint(two, tmp_path / "cut")
    cut = tmp_path / "cut"
    # 1 rank x 4 would halve the global batch: refused, naming the batch and the way out
    done = _pretrain(data, cut, 1, "--batch-size", 4, *EVERY_3, steps=6, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "batch.global: 8 (run) vs 4 (now)" in done.stderr, done.stderr
    assert "--accumulate" in done.stderr and "--force-resume" in done.stderr
    # local BatchNorm over 4 is another trajectory than global over 8, even with G kept
    done = _pretrain(
        data, cut, 2, "--batch-size", 4, "--bn-scope", "local", *EVERY_3, steps=6, check=False
    )
    assert done.returncode == 2 and "batch.batchnorm: 8 (run) vs 4 (now)" in done.stderr
    # ZeRO 1/2 partitions cannot be re-split: refused even with --force-resume
    zero1 = tmp_path / "zero1"
    flags = ["--engine", "deepspeed", "--zero-stage", 1, *EVERY_3]
    _pretrain(data, zero1, 2, "--batch-size", 4, *flags, steps=6)
    _cut_after_first_checkpoint(zero1, tmp_path / "zero1-cut")
    for force in ([], ["--force-resume"]):
        done = _pretrain(
            data, tmp_path / "zero1-cut", 1, "--batch-size", 8, *flags, *force, steps=6, check=False
        )
        assert done.returncode == 2 and "cannot re-split" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    # the explicit way: --force-resume with the smaller batch, recorded and logged
    done = _pretrain(data, cut, 1, "--batch-size", 4, "--force-resume", *EVERY_3, steps=6)
    assert "global batch changes from 8 to 4 (--force-resume)" in done.stdout, done.stdout
    record = yaml.safe_load((_run(cut) / "config.yaml").read_text())
    assert record["identity"]["batch"]["global"] == 4
    assert record["history"][0]["identity"]["batch"]["global"] == 8


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_accumulation_under_deepspeed_follows_ddp(data, tmp_path):
    """DeepSpeed accumulates the micro-batches' exact gradients as DDP does (its own division
    by the accumulation steps is switched off): ZeRO 1 on 1 rank, ZeRO 2 on 2 ranks."""
    ddp = tmp_path / "ddp"
    _pretrain(data, ddp, 1, "--batch-size", 4, "--accumulate", 2)
    zero1, zero2 = tmp_path / "zero1", tmp_path / "zero2"
    deepspeed = ["--engine", "deepspeed", "--accumulate", 2]
    _pretrain(data, zero1, 1, "--batch-size", 4, *deepspeed, "--zero-stage", 1)
    _pretrain(data, zero2, 2, "--batch-size", 2, *deepspeed, "--zero-stage", 2)
    _assert_same_run(zero1, ddp)
    _assert_same_run(zero2, ddp)
    generated = json.loads((_run(zero2) / "deepspeed.json").read_text())
    assert generated["gradient_accumulation_steps"] == 2 and generated["train_batch_size"] == 8
