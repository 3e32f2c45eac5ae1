"""Shared fixtures: a tiny in-memory source and a packed dataset built from it; the command line
run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.sample import Entry, Sample
from hpc_btunet.data.splits import SplitConfig


class ToySource:
    """Deterministic blobs: image i is filled with value i % 256 where its mask is set.

    ``fail_at`` makes ``load`` raise on that many-th call (to simulate a crash mid-pack);
    ``loads`` counts calls. ``unlabelled`` keys have no mask.
    """

    kind = "toy"

    def __init__(self, n=40, channels=1, group_size=1, unlabelled=(), fail_at=None):
        self.n, self.channels, self.group_size = n, channels, group_size
        self.unlabelled = set(unlabelled)
        self.fail_at, self.loads = fail_at, 0

    def describe(self):
        return {
            "kind": self.kind,
            "n": self.n,
            "channels": self.channels,
            "group_size": self.group_size,
        }

    def entries(self):
        return [
            Entry(
                f"toy-{i:04d}",
                f"g{i // self.group_size:04d}",
                f"toy-{i:04d}" not in self.unlabelled,
            )
            for i in range(self.n)
        ]

    def validate(self, entries):
        pass

    def load(self, entry, image_size):
        self.loads += 1
        if self.fail_at is not None and self.loads >= self.fail_at:
            raise RuntimeError("simulated crash")
        i = int(entry.key.split("-")[1])
        rng = np.random.default_rng(i)
        mask = (rng.random((image_size, image_size)) > 0.5).astype(np.uint8)
        image = (mask * (i % 256)).astype(np.uint8)
        if self.channels == 3:
            image = np.stack([image, 255 - image, image // 2], axis=-1)
        return Sample(entry.key, image, None if not entry.has_mask else mask, entry.group)


def toy_index(key: str) -> int:
    return int(key.split("-")[1])


def flip_sample_byte(data, manifest, key: str, into: int = 40) -> None:
    """Flip one byte ``into`` bytes into the first member's payload of sample ``key`` (after its
    512-byte tar header), leaving the shard's size and every header intact."""
    shard = next(s for s in manifest.shards if key in s.keys)
    where = shard.offsets[shard.keys.index(key)] + 512 + into
    path = data / shard.name
    raw = bytearray(path.read_bytes())
    raw[where] ^= 0xFF
    path.write_bytes(bytes(raw))


def flip_torch_byte(path) -> None:
    """Flip one byte inside the largest tensor stored in the torch archive at ``path`` (not in
    zip padding, which holds no data)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(Path(path).read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0xFF
    Path(path).write_bytes(bytes(raw))


def pack_lesions(out: Path, n: int, seed: int, image_size: int = 32) -> Path:
    """``pack --source synthetic --task lesion`` (image-level labels, organ masks) into ``out``
    with 2 folds; returns ``out``."""
    submit_cli(
        "pack", "--source", "synthetic", "--task", "lesion", "--num-images", n,
        "--image-size", image_size, "--out", out, "--folds", 2, "--seed", seed,
    )  # fmt: skip
    return out


def pack_toy(out: Path, n: int, image_size: int = 16, folds: int = 3, shard_size: int = 1000):
    """Pack ``ToySource(n)`` into ``out`` quietly; returns ``out``."""
    splits = SplitConfig(folds=folds)
    cfg = PackConfig(out=out, image_size=image_size, shard_size=shard_size, splits=splits)
    pack(ToySource(n=n), cfg, log=lambda _: None)
    return out


@pytest.fixture
def toy_pack(tmp_path):
    """Pack a ToySource; returns ``(out_dir, manifest)``. Call with keyword overrides."""

    def _pack(
        n=40, shard_size=1000, encoding="png", image_size=16, folds=5, name="ds", **source_kw
    ):
        out = tmp_path / name
        cfg = PackConfig(
            out=out,
            image_size=image_size,
            shard_size=shard_size,
            encoding=encoding,
            workers=2,
            splits=SplitConfig(folds=folds),
        )
        return out, pack(ToySource(n=n, **source_kw), cfg, log=lambda _: None)

    return _pack


@pytest.fixture
def small_disk(tmp_path):
    """``make(name, size=..., read_only=...)`` mounts a tmpfs of that size at ``tmp_path/name``
    (root only; skipped where mounting is not allowed) and unmounts it afterwards."""
    mounts = []

    def make(name: str, size: str = "64k", read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small file system here (needs root): {done.stderr!r}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(autouse=True)
def _no_wandb_by_default(monkeypatch):
    """Jobs in tests log locally only, unless a test asks for wandb (it sets WANDB_MODE itself)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


def submit_cli(
    *args, check: bool = True, timeout: float | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m hpc_btunet.submit ARGS`` (in ``env``, default this environment); with
    ``check``, it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done


def logged_losses(run: Path) -> list[float]:
    """The loss of every line of a run folder's ``metrics.jsonl``."""
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
