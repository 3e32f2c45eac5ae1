"""The throughput machinery: the loader's tar reader, waiting-for-data accounting, threads."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import ToySource, submit_cli
from torch.utils.data import DataLoader

from hpc_btunet.data import DataWait, ShardStream, make_loader
from hpc_btunet.data import loader as loader_module
from hpc_btunet.data.codec import TarFormatError, decode_npy, iter_members
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import ShardError, UserError
from hpc_btunet.threads import available_cores, plan_threads

# --- the tar reader ------------------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LONG = "a-sample-key-" + "x" * 140  # over ustar's 100-byte name field


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_iter_members_reads_what_tarfile_writes(fmt):
    members = [("k1.image.png", b"abc"), ("k1.json", b"{}" * 300), ("k2.image.png", b"")]
    if fmt == tarfile.PAX_FORMAT:  # long names: a pax header before the member
        members.append((f"{LONG}.image.png", bytes(range(256)) * 3))
    if fmt == tarfile.USTAR_FORMAT:  # long names: ustar's prefix field
        members.append((f"{'d' * 90}/{'e' * 60}.json", b"x"))
    got = [(n, bytes(p)) for n, p in iter_members(memoryview(_tar(members, fmt)))]
    assert got == members


def test_iter_members_refuses_damaged_or_short_input():
    data = bytearray(_tar([("k.image.png", b"z" * 700), ("k.json", b"{}")]))
    damaged = bytearray(data)
    damaged[100] ^= 0x01  # the mode field of the first header: only its checksum sees it
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(memoryview(damaged)))
    with pytest.raises(TarFormatError, match="past the end"):
        list(iter_members(memoryview(data[:900])))  # the first payload is cut
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as tar:
        info = tarfile.TarInfo("k.image.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "elsewhere"
        tar.addfile(info)
    with pytest.raises(TarFormatError, match="not a regular file"):
        list(iter_members(memoryview(link.getvalue())))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.uint8).reshape(3, 4),
        np.asfortranarray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
        np.zeros((0, 3), np.uint8),
    ],
    ids=["2d", "fortran", "empty"],
)
def test_decode_npy_is_numpys_reading(array):
    buf = io.BytesIO()
    np.save(buf, array)
    for _ in range(2):  # parsed, then from the header cache
        assert np.array_equal(decode_npy(buf.getvalue()), array)
    with pytest.raises(ValueError, match="bytes of data"):
        decode_npy(buf.getvalue()[:-1] if array.size else buf.getvalue() + b"\0")


def test_damaged_member_header_in_a_shard_is_named(toy_pack):
    out, m = toy_pack(n=40, shard_size=10)
    shard = m.shards_of("train")[0]
    path = out / shard.name
    data = bytearray(path.read_bytes())
    data[shard.offsets[4] + 100] ^= 0x01  # sample 4's first header, its mode field
    path.write_bytes(bytes(data))
    stream = make_loader(out, "train", batch_size=1, shuffle=False).dataset
    seen = []
    with pytest.raises(ShardError) as err:
        for batch in stream:
            seen += batch["key"]
    assert seen == shard.keys[:4]
    assert shard.name in str(err.value) and "checksum" in str(err.value)


class _LongKeys(ToySource):
    """Sample keys longer than a tar header's name field."""

    PREFIX = "long" * 30 + "-"

    def entries(self):
        return [replace(e, key=self.PREFIX + e.key) for e in super().entries()]

    def load(self, entry, image_size):
        toy = replace(entry, key=entry.key.removeprefix(self.PREFIX))
        return replace(super().load(toy, image_size), key=entry.key)


def test_long_keys_load(tmp_path):
    cfg = PackConfig(out=tmp_path / "ds", image_size=16, shard_size=7, splits=SplitConfig(folds=2))
    m = pack(_LongKeys(n=20), cfg, log=lambda _: None)
    batches = list(make_loader(cfg.out, "train", batch_size=2, shuffle=False))
    keys = [k for b in batches for k in b["key"]]
    assert keys == [k for s in m.shards_of("train") for k in s.keys]
    assert all(len(k) > 100 for k in keys)


# --- batches from the workers -------------------------------------------------------------------


def _batches(loader, epochs) -> list[dict]:
    held = []
    for epoch in epochs:
        loader.dataset.set_epoch(epoch)
        held += list(loader)  # every batch kept while later ones arrive
    return held


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if k == "key" else torch.equal(a[k], b[k]) for k in a
    )


@pytest.mark.timeout(120)
def test_worker_batches_stay_intact_while_their_slots_are_reused(toy_pack):
    """Workers hand batches over through shared slots that are rewritten every few batches:
    each batch kept by the training loop keeps its pixels (copied out, not a view of a slot),
    equal to the batch read in-process; a user's own DataLoader over the stream (no slots)
    gives the same batches."""
    out, _ = toy_pack(n=80, shard_size=9)  # 56 train samples: 14 batches, 7 per worker
    plain = _batches(make_loader(out, "train", batch_size=4, num_workers=0, seed=3), (0, 1))
    loader = make_loader(out, "train", batch_size=4, num_workers=2, seed=3)
    slots = loader.dataset._slots
    assert slots is not None and slots.depth < 7, "each slot is used more than once per epoch"
    held = _batches(loader, (0, 1))
    assert len(held) == len(plain) == 28
    assert all(_same(a, b) for a, b in zip(held, plain, strict=True))
    assert all(b["image"].untyped_storage().data_ptr() != slots.storage.data_ptr() for b in held)
    own = DataLoader(ShardStream(out, batch_size=4, seed=3), batch_size=None, num_workers=2)
    assert all(_same(a, b) for a, b in zip(_batches(own, (0, 1)), plain, strict=True))


def test_a_batch_overwritten_in_its_slot_is_an_error_not_a_mix(toy_pack):
    out, _ = toy_pack(n=40, shard_size=9)
    stream = ShardStream(out, batch_size=4)
    stream.use_slots(workers=1, depth=2)
    slots = stream._slots
    slots.stamps[1] = 5  # slot 1 holds the worker's 5th batch
    assert slots.take({"key": ["a"] * 4, "slot": 1, "seq": 5}, pin=False)["image"].shape == (
        4, 1, 16, 16,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="rewritten before batch 3"):
        slots.take({"key": ["a"] * 4, "slot": 1, "seq": 3}, pin=False)


def test_too_little_shared_memory_is_named_before_training(toy_pack, monkeypatch):
    out, _ = toy_pack(n=40, shard_size=9)
    monkeypatch.setattr(loader_module, "_SHM", "/no/such/dir")  # nothing to measure: no check
    assert make_loader(out, "train", batch_size=4, num_workers=2).dataset._slots is not None
    monkeypatch.setattr(
        loader_module.os,
        "statvfs",
        lambda _: os.statvfs_result((4096, 4096, 100, 0, 0, 0, 0, 0, 0, 255)),
    )
    monkeypatch.setattr(loader_module, "_SHM", "/dev/shm")
    with pytest.raises(UserError, match=r"needs .* MiB of shared memory .*/dev/shm has 0 MiB free"):
        make_loader(out, "train", batch_size=4, num_workers=2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_on_a_small_dev_shm_says_so(tmp_path):
    """A container's default /dev/shm (64 MiB in docker) is too small for large batches: the
    job stops at start with the fix named, not with a worker's traceback ("unable to allocate
    shared memory") some batches into the epoch."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here (needs root): {probe.stderr!r}")
    data = tmp_path / "data"
    submit_cli("pack", "--num-images", 100, "--image-size", 96, "--out", data)  # 1.7 MiB of slots
    pretrain = [sys.executable, "-m", "hpc_btunet.submit", "pretrain", "--data", data, "--out",
                tmp_path, "--steps", 2, "--batch-size", 32, "--base-width", 4, "--depth", 2,
                "--num-workers", 2, "--executor", "debug", "--wandb", "disabled"]  # fmt: skip
    command = " ".join(shlex.quote(str(a)) for a in pretrain)
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs /dev/shm && {command}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    assert "shared memory" in done.stderr and "--num-workers" in done.stderr
    assert "Traceback" not in done.stderr


# --- waiting for data ----------------------------------------------------------------------------


def _slow(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)
        yield i


def test_data_wait_counts_the_loaders_time_not_the_steps():
    wait = DataWait()
    for _ in wait.timed(_slow(4, 0.05)):
        time.sleep(0.1)  # the step: not waiting
    seconds, batches = wait.take()
    assert batches == 4 and 0.2 <= seconds < 0.2 + 0.1
    assert wait.take() == (0.0, 0), "take() resets"


def test_pretrain_and_finetune_log_data_wait(tmp_path):
    data = tmp_path / "data"
    submit_cli("pack", "--num-images", 60, "--image-size", 32, "--out", data)
    small = ["--base-width", 4, "--depth", 2, "--executor", "debug", "--wandb", "disabled"]
    submit_cli("pretrain", "--data", data, "--out", tmp_path, "--steps", 4, "--log-every", 2,
               "--batch-size", 8, *small)  # fmt: skip
    log = [
        json.loads(line)
        for line in (tmp_path / "pretrain" / "unet" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(log) == 2 and all(0 <= r["data_wait_s"] < 60 for r in log)
    submit_cli("finetune", "--data", data, "--out", tmp_path, "--fold", 0, "--epochs", 2, *small)
    run = tmp_path / "finetune" / "unet" / "scratch" / "fold-0"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "val_loss" in r]
    assert len(epochs) == 2
    assert all(0 <= r["data_wait_s"] < 60 and r["images_per_s"] > 0 for r in epochs)


# --- threads -------------------------------------------------------------------------------------


def test_threads_come_from_the_flag_then_slurm_then_the_cores():
    assert plan_threads(2, {"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}, 16).threads == 3
    plan = plan_threads(2, {"SLURM_CPUS_PER_TASK": "8"}, 16)
    assert (plan.threads, plan.source) == (8, "SLURM cpus per task")
    plan = plan_threads(4, {}, 16)
    assert (plan.threads, plan.source) == (4, "16 cores / 4 rank(s) on the node")
    assert plan_threads(4, {}, 2).threads == 1, "at least one"
    assert plan_threads(2, {"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "x"}, 6).threads == 3


def _runtime_threads(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["runtime"]["threads"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_take_their_share_of_the_cores_and_the_flag_overrides(tmp_path):
    data = tmp_path / "data"
    submit_cli("pack", "--num-images", 40, "--image-size", 32, "--out", data)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    common = ["pretrain", "--data", data, "--steps", 2, "--batch-size", 4, "--base-width", 4,
              "--depth", 2, "--executor", "local", "--wandb", "disabled", "--wait"]  # fmt: skip
    submit_cli(*common, "--tasks-per-node", 2, "--out", tmp_path / "a", env=env)
    share = max(1, available_cores() // 2)
    assert _runtime_threads(tmp_path / "a" / "pretrain" / "unet") == {
        "threads": share,
        "source": f"{available_cores()} cores / 2 rank(s) on the node",
    }
    submit_cli(*common, "--threads", 1, "--out", tmp_path / "b", env=env)
    assert _runtime_threads(tmp_path / "b" / "pretrain" / "unet")["threads"] == 1
    assert torch.get_num_threads() >= 1


# --- both views in one forward -------------------------------------------------------------------


@pytest.mark.parametrize(
    "device,batch,size,ours,want",
    [
        ("cpu", 16, 64, True, True),
        ("cpu", 16, 128, True, True),  # the limit itself
        ("cpu", 32, 256, True, False),  # convolutions over 2 x 32 x 256 x 256 leave the caches
        ("cuda", 32, 256, True, True),
        ("cpu", 16, 64, False, False),  # nn.BatchNorm would mix the views' statistics
    ],
)
def test_views_share_a_forward_where_it_pays_and_is_exact(device, batch, size, ours, want):
    from types import SimpleNamespace

    from torch import nn

    from hpc_btunet.global_batchnorm import convert_global_batchnorm
    from hpc_btunet.train.pretrain import TwinStep

    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    if ours:
        module = convert_global_batchnorm(module)
    engine = SimpleNamespace(module=module, device=torch.device(device))
    step = TwinStep(engine, module, None, None, seed=0, global_batch=batch)
    assert step.one_pass(torch.zeros(batch, 1, size, size, dtype=torch.uint8)) is want
