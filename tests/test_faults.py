"""Injected faults: kills in the middle of writes, stopped commands, damaged files, a dead rank.

Each fault runs the real command line in a child process (so a SIGKILL kills what a user's
command would be), then checks what the toolkit promises: nothing complete is lost, nothing
half-written is read as complete, a rerun finishes with the same result as an undisturbed run,
and no process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import flip_sample_byte, flip_torch_byte

from hpc_btunet.atomic import TMP_MARK
from hpc_btunet.data.loader import plan_epoch
from hpc_btunet.data.manifest import load_manifest
from hpc_btunet.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow
SMALL = ["--base-width", "4", "--depth", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")

# a child that runs the command line with one function replaced by a fault
INJECT = """
import os, signal, sys
{patch}
from hpc_btunet.submit import main
sys.exit(main(sys.argv[1:]))
"""
KILL_IN_TORCH_SAVE = """
import io, torch
real, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:  # half of the archive reaches the disk, then the process dies
        buf = io.BytesIO(); real(obj, buf)
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        out.write(buf.getvalue()[: len(buf.getvalue()) // 2]); out.flush(); os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
"""
KILL_IN_PACK = """
from hpc_btunet.data.synthetic import SyntheticSource
real, calls = SyntheticSource.load, [0]
def load(self, entry, size):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, entry, size)
SyntheticSource.load = load
"""


def cli(*args, patch: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    cmd += ["-c", INJECT.format(patch=patch)] if patch else ["-m", "hpc_btunet.submit"]
    done = subprocess.run(
        [*cmd, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300, **kw
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def start_command(args: list) -> subprocess.Popen:
    """The command line in the background, in its own process group (as a shell's job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "hpc_btunet.submit", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"*{TMP_MARK}*") if p.is_file()]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def result_of(metrics: Path) -> dict:
    r = json.loads(metrics.read_text())
    return {k: r[k] for k in ("test", "epoch_kept", "epochs_run", "validation_curve")}


@pytest.fixture
def data(toy_pack):
    out, _ = toy_pack(n=60, image_size=32, shard_size=15)
    return out


# the torch.save call that dies: the first file of the second checkpoint (DDP: engine.pt,
# job.pt per checkpoint) or DeepSpeed's ZeRO optimiser partition in it (model states, optimiser
# states, engine.pt, job.pt per checkpoint)
ENGINE_SAVES = {"ddp": ([], 3), "deepspeed": (["--engine", "deepspeed", "--zero-stage", 1], 6)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ENGINE_SAVES)
def test_sigkill_while_saving_a_checkpoint(data, tmp_path, engine):
    flags, n = ENGINE_SAVES[engine]
    common = ["pretrain", "--data", data, "--steps", 12, "--checkpoint-every", 4, "--batch-size", 8]
    common += [*SMALL, *flags, "--executor", "debug"]
    cli(*common, "--out", tmp_path / "straight")
    out = tmp_path / "killed"
    killed = cli(*common, "--out", out, patch=KILL_IN_TORCH_SAVE.format(n=n), check=False)
    assert killed.returncode == -signal.SIGKILL
    run = out / "pretrain" / "unet"
    partial = list((run / "checkpoints").glob(".step-*.partial"))
    assert [p.name for p in partial] == [".step-00000008.partial"], "killed while saving step 8"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004"]

    rerun = cli(*common, "--out", out)
    assert "resuming from" in rerun.stdout and "(step 4 of 12)" in rerun.stdout
    assert not temporaries(run), "the writer's leftovers are removed on its next start"
    assert not list((run / "checkpoints").glob(".step-*.partial"))
    same_weights(tmp_path / "straight/pretrain/unet/encoder.pt", run / "encoder.pt")


@pytest.mark.timeout(300)
def test_sigkill_during_pack(tmp_path):
    args = ["pack", "--num-images", 60, "--image-size", 32, "--shard-size", 10, "--folds", 3]
    cli(*args, "--out", tmp_path / "straight")
    out = tmp_path / "killed"
    killed = cli(*args, "--out", out, patch=KILL_IN_PACK.format(n=35), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "an incomplete dataset has no manifest"
    assert temporaries(out), "the kill came while a shard was being written"
    refused = cli("verify", "--data", out, check=False)
    assert refused.returncode == 2 and "incomplete" in refused.stderr

    rerun = cli(*args, "--out", out)
    assert "resuming an interrupted pack" in rerun.stdout
    assert not temporaries(out)
    assert (out / "manifest.json").read_bytes() == (
        tmp_path / "straight/manifest.json"
    ).read_bytes()


@pytest.mark.timeout(300)
def test_sigkill_during_finetuning(data, tmp_path):
    common = ["finetune", "--data", data, "--epochs", 6, "--batch-size", 2, *SMALL]
    common += ["--executor", "debug"]
    cli(*common, "--out", tmp_path / "straight")
    out = tmp_path / "killed"
    run = out / "finetune" / "unet" / "scratch" / "fold-0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc_btunet.submit", *map(str, common), "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list_checkpoints(run / "checkpoints") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(run / "checkpoints") and not (run / "metrics.json").exists()

    rerun = cli(*common, "--out", out)
    assert "resuming from" in rerun.stdout
    straight = tmp_path / "straight/finetune/unet/scratch/fold-0/metrics.json"
    assert result_of(run / "metrics.json") == result_of(straight)


SIGNAL_AT_BATCH = """
from hpc_btunet.train.losses import BceDiceLoss
real, calls = BceDiceLoss.forward, [0]
def forward(self, logits, target):
    calls[0] += 1
    if calls[0] == {n}:  # SLURM's warning signal, in the middle of a training step
        os.kill(os.getpid(), signal.SIGUSR2)
    return real(self, logits, target)
BceDiceLoss.forward = forward
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "engine",
    [[], ["--engine", "deepspeed", "--zero-stage", "2", "--precision", "bf16"]],
    ids=["ddp", "deepspeed-bf16"],
)
def test_preemption_signal_mid_epoch_then_resume(data, tmp_path, engine):
    """SLURM's warning signal reaches a fine-tuning job in the middle of an epoch: it saves after
    the current batch (not at the end of the epoch) and a rerun ends as an undisturbed run."""
    common = ["finetune", "--data", data, "--epochs", 4, "--batch-size", 1, *SMALL, *engine]
    common += ["--executor", "debug"]
    cli(*common, "--out", tmp_path / "straight")
    out = tmp_path / "preempted"
    run = out / "finetune" / "unet" / "scratch" / "fold-0"
    # the loss runs once per batch (training and validation): the 8th is mid-epoch
    stopped = cli(*common, "--out", out, patch=SIGNAL_AT_BATCH.format(n=8), check=False)
    assert stopped.returncode == 2 and "SIGUSR2" in stopped.stderr, stopped.stderr
    assert "rerun the same command" in stopped.stderr
    state = torch.load(list_checkpoints(run / "checkpoints")[-1] / "job.pt", weights_only=True)
    assert state["done"] > 0, "saved after that batch, mid-epoch (an epoch end saves done=0)"

    cli(*common, "--out", out)
    straight = tmp_path / "straight/finetune/unet/scratch/fold-0/metrics.json"
    assert result_of(run / "metrics.json") == result_of(straight)


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_stopping_the_command_stops_its_local_jobs(data, tmp_path, how):
    """``timeout``, ``kill`` and Ctrl-C (SIGINT to the foreground process group) on a command
    running local jobs leave no process behind; SIGKILL of the command (no handler can run)
    too: the jobs notice their command is gone."""
    cmd = ["finetune", "--data", data, "--out", tmp_path / "exp", "--executor", "local"]
    cmd += ["--epochs", 500, "--patience", 500, "--num-workers", 2, *SMALL]
    proc = start_command(cmd)
    seen: set[int] = set()
    deadline = time.time() + 120
    run = tmp_path / "exp" / "finetune" / "unet" / "scratch" / "fold-0"
    while not list_checkpoints(run / "checkpoints") and time.time() < deadline:
        seen |= _descendants(proc.pid)
        time.sleep(0.1)
    seen |= _descendants(proc.pid)
    assert len(seen) >= 3, "controller, task and DataLoader workers were running"
    start = time.time()
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    while any(_alive(p) for p in seen) and time.time() - start < 30:
        time.sleep(0.2)
    assert not [p for p in seen if _alive(p)], "processes outlived their command"
    if how != "SIGKILL":
        assert proc.returncode == (130 if how == "SIGINT" else 143)
        assert "Traceback" not in err and "Rerun the same command to resume" in err, err


# the file of a checkpoint that the damage hits: DDP's one state file, or a DeepSpeed ZeRO
# partition (engine options, file)
DAMAGED_FILE = {
    "ddp": ({}, "engine.pt"),
    "deepspeed": (
        {"engine": "deepspeed", "zero_stage": 1},
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", DAMAGED_FILE)
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(
    data, tmp_path, capsys, damage, engine
):
    from hpc_btunet.train import pretrain

    options, target = DAMAGED_FILE[engine]

    def cfg(out):
        return pretrain.PretrainConfig(
            data=data,
            out=out,
            steps=8,
            checkpoint_every=4,
            batch_size=8,
            base_width=4,
            depth=2,
            **options,
        )

    straight = pretrain.run(cfg(tmp_path / "straight"))
    run = cfg(tmp_path / "damaged").run_dir()
    pretrain.run(cfg(tmp_path / "damaged"))
    (run / "encoder.pt").unlink()  # as if killed after the last checkpoint
    newest = list_checkpoints(run / "checkpoints")[-1]
    if damage == "flipped byte":
        flip_torch_byte(newest / target)
    else:
        state = newest / target
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    pretrain.run(cfg(tmp_path / "damaged"))
    out = capsys.readouterr()
    assert f"checkpoint {newest} is damaged" in out.err
    assert ("CRC" if damage == "flipped byte" else "bytes") in out.err
    assert "(step 4 of 8)" in out.out, "resumed from the intact one before it"
    assert newest.with_name(newest.name + ".corrupt").exists(), "kept aside, not deleted"
    same_weights(straight, run / "encoder.pt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_flipped_byte_in_a_shard(toy_pack, tmp_path, encoding):
    data, manifest = toy_pack(n=60, image_size=32, encoding=encoding)
    key = manifest.shards_of("train")[0].keys[0]
    flip_sample_byte(data, manifest, key)
    done = cli(
        "pretrain", "--data", data, "--out", tmp_path / "exp", "--steps", 20, "--batch-size", 4,
        *SMALL, "--executor", "debug", check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert key in done.stderr and "train-000000.tar" in done.stderr, done.stderr


@pytest.mark.timeout(300)
def test_damaged_test_shard_stops_finetuning_before_training(toy_pack, tmp_path):
    data, manifest = toy_pack(n=60, image_size=32)
    flip_sample_byte(data, manifest, manifest.splits["test"][0])
    cmd = ["finetune", "--data", data, "--out", tmp_path / "exp", *SMALL, "--executor", "debug"]
    done = cli(*cmd, check=False)
    assert done.returncode == 2 and "test-000000.tar" in done.stderr and "sha256" in done.stderr
    run = tmp_path / "exp" / "finetune" / "unet" / "scratch" / "fold-0"
    assert not list_checkpoints(run / "checkpoints"), "no epoch was spent before finding it"


def _rank_one_sample(data: Path, batch_size: int) -> str:
    """A sample that rank 1 of 2 reads in epoch 0 and rank 0 does not."""
    m = load_manifest(data)
    shards = m.shards_of("train")
    plan = plan_epoch(shards, None, batch_size=batch_size, world_size=2, seed=0, epoch=0)
    ref = plan.rank_refs(1)[0]
    return shards[ref.shard].keys[ref.pos]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("death", ["error", "SIGKILL"])
def test_dead_rank_ends_a_two_rank_job_quickly(data, tmp_path, death):
    """One rank of a 2-rank local job fails (a damaged sample only it reads) or is killed: the
    other stops at once instead of waiting --dist-timeout, and the command names the rank."""
    key = _rank_one_sample(data, 4)
    if death == "error":
        flip_sample_byte(data, load_manifest(data), key)
    cmd = ["pretrain", "--data", data, "--out", tmp_path / "exp", "--steps", 500, "--batch-size"]
    cmd += [4, "--tasks-per-node", 2, "--executor", "local", "--dist-timeout", 600, *SMALL]
    start = time.time()
    proc = start_command(cmd)
    if death == "SIGKILL":
        rank1 = None
        while rank1 is None and time.time() - start < 60:
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if p.environ().get("SUBMITIT_LOCAL_GLOBALID") == "1":
                        rank1 = p
                except psutil.Error:
                    continue
            time.sleep(0.1)
        time.sleep(3)  # training
        rank1.kill()
    _, err = proc.communicate(timeout=120)
    took = time.time() - start
    assert proc.returncode == 2 and took < 60, (took, err)
    assert "failed (rank 1)" in err and "Traceback" not in err, err
    if death == "error":
        assert key in err
        log = Path(err.split("log: ")[1].split()[0])
        main_log = log.with_name(log.name.replace("_1_log", "_0_log"))
        assert "rank 1 failed: ShardError" in main_log.read_text(), "the real error, in main log"
    else:
        assert "killed" in err


@pytest.mark.timeout(300)
def test_pack_onto_a_full_disk(small_disk):
    full = small_disk("full", size="64k")
    args = ["pack", "--num-images", 60, "--image-size", 32, "--shard-size", 10, "--folds", 3]
    done = cli(*args, "--out", full / "ds", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no space left on the device" in done.stderr and "rerun" in done.stderr
    assert not temporaries(full) and not (full / "ds" / "manifest.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor", ["debug", "local"])
def test_checkpoint_onto_a_full_disk(data, small_disk, executor):
    full = small_disk("full", size="96k")
    cmd = ["pretrain", "--data", data, "--out", full / "exp", "--steps", 8, "--batch-size", 8]
    done = cli(*cmd, *SMALL, "--executor", executor, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "no space left on the device" in done.stderr, done.stderr
    assert not temporaries(full), "a failed write removes its temporary file"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["pack", "pretrain"])
def test_output_on_a_read_only_disk(data, small_disk, command):
    ro = small_disk("ro", read_only=True)
    if command == "pack":
        cmd = ["pack", "--num-images", 20, "--image-size", 32, "--folds", 2, "--out", ro / "ds"]
    else:
        cmd = ["pretrain", "--data", data, "--out", ro / "exp", "--batch-size", 8, *SMALL]
        cmd += ["--executor", "local"]
    done = cli(*cmd, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "read-only file system" in done.stderr and "writable" in done.stderr, done.stderr
