"""Streaming loader over packed shards, exact under DDP: every rank yields the same batch count.

An epoch's global sample order is planned from the manifest alone, identically on every rank,
and depends on (seed, epoch, selection, shuffle options) only -- not on the world size, the batch
size or the number of workers:

1. the samples of the split (optionally restricted to a key set) are listed shard by shard, the
   shard order permuted and the sequence rotated by a random offset, both seeded by (seed, epoch);
2. when shuffling, a seeded *window shuffle* mixes the whole sequence: every sample moves at most
   ``shuffle_window`` positions from its place (a quarter of that on average), so the samples
   of a batch lie close together in one or two shards;
3. the sequence is cut to whole global batches of ``G = world_size * batch_size``: with
   ``drop_last`` the remainder is dropped (it differs from epoch to epoch), otherwise it is padded
   by wrapping around, and padded samples are flagged in the batch (``batch["pad"]``) so
   evaluation can ignore them.

Global batch ``s`` is samples ``[s*G, (s+1)*G)``; rank ``r`` takes the ``r``-th slice of
``batch_size`` samples of every global batch. For a fixed ``G``, the ranks' batches at step ``s``,
concatenated in rank order, are the same whatever the world size. A rank's DataLoader workers take
its batches round-robin (worker ``w`` of ``N``: batches ``w, w+N, ...``), so PyTorch's in-order
DataLoader yields them in plan order for any ``num_workers``. ``set_epoch(epoch, start=k)`` makes
iteration begin at batch ``k`` without reading the ones before (a job resumed mid-epoch); ``len``
stays the full count. Within a batch, samples are read in (shard, position) order, neighbours in
a shard as one read; the manifest's byte offsets let a reader start anywhere in a shard, so one
shard serves any number of ranks. Batches are dicts: ``key`` (list of str), ``image`` (uint8,
B x C x H x W), ``mask`` (uint8 {0,1}, B x 1 x H x W, when the samples have masks) and ``pad``
(bool, B).

What is checked, so that a damaged dataset stops training with a message naming the shard instead
of training on garbage: when the stream is built, that every shard exists with the size the
manifest gives (``verify=True``: its sha256 too); on every read, that the members are the
expected samples in order, that each sample's CRC-32 over its member payloads matches the
manifest's ``checksums`` (before it is decoded, so a corrupt sample is never yielded), and that
it decodes to the manifest's shape.
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpc_btunet.data.codec import (
    TarFormatError,
    decode_array,
    iter_members,
    payload_crc,
    split_member_name,
)
from hpc_btunet.data.manifest import Manifest, ShardInfo, load_manifest, verify_shards
from hpc_btunet.errors import ShardError, UserError

_OPEN_SHARDS = 8  # files a worker keeps open across batches


@dataclass(frozen=True)
class SampleRef:
    shard: int  # index into the loader's shard list
    pos: int  # position of the sample inside that shard
    pad: bool = False


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch's global sample order, cut to whole global batches: sample ``i`` is position
    ``pos[i]`` of shard ``shard[i]`` (indices into the loader's shard list), ``pad[i]`` when it
    repeats an earlier sample to fill the last global batch."""

    shard: np.ndarray
    pos: np.ndarray
    pad: np.ndarray
    batch_size: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps(self) -> int:
        """Global batches in the epoch (= batches per rank)."""
        return len(self.shard) // self.global_batch

    def rank_batches(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(shard, pos, pad)`` of rank ``rank``, each ``steps x batch_size``: row ``s`` is the
        rank's slice of global batch ``s``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        shape = (self.steps, self.world_size, self.batch_size)
        shard, pos, pad = (
            a.reshape(shape)[:, rank].copy() for a in (self.shard, self.pos, self.pad)
        )
        return shard, pos, pad

    def rank_refs(self, rank: int) -> list[SampleRef]:
        """The samples rank ``rank`` yields over the epoch, in order."""
        shard, pos, pad = (a.ravel().tolist() for a in self.rank_batches(rank))
        return [SampleRef(s, p, d) for s, p, d in zip(shard, pos, pad, strict=True)]


def _selected_positions(shard: ShardInfo, keys: set[str] | None) -> np.ndarray:
    if keys is None:
        return np.arange(len(shard.keys), dtype=np.int64)
    return np.array([p for p, k in enumerate(shard.keys) if k in keys], dtype=np.int64)


def plan_epoch(
    shards: list[ShardInfo],
    keys: set[str] | None,
    *,
    batch_size: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    shuffle_window: int = 256,
) -> EpochPlan:
    """The global sample order of one epoch (see the module docstring); only the cut to whole
    global batches depends on ``batch_size`` and ``world_size``."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
    picked = [_selected_positions(shards[i], keys) for i in order]
    pos = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    shard = np.repeat(order.astype(np.int64), [len(p) for p in picked])
    n, per_step = len(pos), world_size * batch_size
    if n == 0:
        raise UserError("no samples selected: the split or key set is empty")
    if shuffle:
        shift = int(rng.integers(n))
        shard, pos = np.roll(shard, -shift), np.roll(pos, -shift)
        if shuffle_window > 1:
            # jitter sort: position + U(0, w) noise, sorted; a sample can only pass the ones
            # less than w places away, so none moves farther than w
            mix = np.argsort(np.arange(n) + rng.uniform(0, shuffle_window, n), kind="stable")
            shard, pos = shard[mix], pos[mix]
    steps = n // per_step if drop_last else -(-n // per_step)
    if steps == 0:
        raise UserError(
            f"{n} samples are fewer than one global batch ({world_size} rank(s) x batch size "
            f"{batch_size} = {per_step}): lower --batch-size or use fewer ranks"
        )
    index = np.arange(steps * per_step)
    take = index % n  # wrap around, flagging the repeats
    return EpochPlan(shard[take], pos[take], index >= n, batch_size, world_size)


class ShardStream(IterableDataset):
    """Batches of one split of a packed dataset for one rank; use with ``DataLoader(batch_size=None)``.

    ``rank`` and ``world_size`` are plain numbers given by the caller (the data code knows nothing
    else of distribution). Call ``set_epoch`` before each epoch, as with ``DistributedSampler``.
    ``shuffle_window`` bounds how far the shuffle moves a sample from its place in the shard
    sequence (0 or 1: shard order and rotation only).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        batch_size: int,
        keys: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        with_masks: bool | None = None,
        shuffle_window: int = 256,
        verify: bool = False,
        manifest: Manifest | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if shuffle_window < 0:
            raise UserError(f"shuffle_window must be at least 0, got {shuffle_window}")
        self.root = Path(root)
        self.manifest = manifest or load_manifest(self.root)
        self.shards = self.manifest.shards_of(split)
        if keys is not None:
            present = {k for s in self.shards for k in s.keys}
            missing = sorted(set(keys) - present)
            if missing:
                raise UserError(
                    f"{len(missing)} requested key(s) are not in the {split} split of {self.root} "
                    f"(e.g. {', '.join(missing[:3])}): take keys from the same manifest"
                )
            self.shards = [s for s in self.shards if not set(s.keys).isdisjoint(keys)]
        self.keys = None if keys is None else set(keys)
        unlabelled = set(self.manifest.unlabelled)
        selected_unlabelled = any(
            k in unlabelled
            for s in self.shards
            for k in s.keys
            if self.keys is None or k in self.keys
        )
        if with_masks is None:
            with_masks = not selected_unlabelled
        elif with_masks and selected_unlabelled:
            raise UserError(
                f"the {split} split selection includes samples without masks: load it without "
                "masks or restrict it to labelled keys (the manifest's labelled subset)"
            )
        self.with_masks = with_masks
        self.unlabelled = unlabelled
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_window = shuffle_window
        self._check_files(verify)
        self.epoch, self.start = 0, 0
        # (epoch, start) as set_epoch left them, in shared memory: persistent DataLoader workers
        # (copies of this object, made once) read it when an epoch's iteration begins
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        # this rank's (shard, pos, pad), steps x batch_size; workers inherit it when they start
        # and plan a later epoch themselves (__iter__)
        self._batches = self._plan(0)
        self.batches_per_epoch = len(self._batches[0])

    def _check_files(self, verify: bool) -> None:
        if verify:
            verify_shards(self.root, self.shards)
            return
        problems = []
        for s in self.shards:  # cheap checks always: a missing or truncated shard fails here
            p = self.root / s.name
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif p.stat().st_size != s.bytes:
                problems.append(
                    f"{p}: {p.stat().st_size} bytes, manifest says {s.bytes} (truncated?)"
                )
        if problems:
            raise ShardError(
                "shard(s) do not match the manifest:\n  "
                + "\n  ".join(problems)
                + "\nrepack the dataset or copy the shards again (`hpc-btunet verify` checks them)"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate over epoch ``epoch`` from this rank's batch ``start`` on: a job resumed
        mid-epoch skips the batches it trained on without reading them. ``len`` stays the full
        number of batches per epoch."""
        start = operator.index(start)
        if not 0 <= start <= self.batches_per_epoch:
            raise UserError(
                f"cannot start epoch {epoch} at batch {start}: an epoch has "
                f"{self.batches_per_epoch} batches on this rank (start 0 to "
                f"{self.batches_per_epoch})"
            )
        if epoch != self.epoch:
            self._batches = self._plan(epoch)
        self.epoch, self.start = epoch, start
        self._position.copy_(torch.tensor([epoch, start]))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return plan_epoch(
            self.shards,
            self.keys,
            batch_size=self.batch_size,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            shuffle_window=self.shuffle_window,
        ).rank_batches(self.rank)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, self.start = self._position.tolist()
        if epoch != self.epoch:  # a persistent worker, at a new epoch: the same plan as the main
            self._batches, self.epoch = self._plan(epoch), epoch
        shard, pos, pad = self._batches
        handles: dict[int, BinaryIO] = {}  # open for the epoch, per worker
        try:
            for step in range(self.start + worker, len(shard), num_workers):
                yield self._read_batch(shard[step], pos[step], pad[step], handles, info is not None)
        finally:
            for f in handles.values():
                f.close()

    def _read_batch(
        self,
        shard: np.ndarray,
        pos: np.ndarray,
        pad: np.ndarray,
        handles: dict[int, BinaryIO],
        shared: bool,
    ) -> dict:
        """Read and decode one batch into its tensors (in shared memory in a worker, so that
        handing it to the main process copies nothing). Samples are placed in plan order but
        read in (shard, position) order: neighbours in a shard are one read, and reads within a
        shard go forward."""
        size, channels = self.manifest.image_size, self.manifest.channels
        images, masks, pad_flags = _batch_tensors(
            len(shard), channels, size, self.with_masks, shared
        )
        pad_flags.copy_(torch.from_numpy(pad))
        image_rows = images.numpy()
        mask_rows = None if masks is None else masks.numpy()[:, 0]
        keys: list[str] = [""] * len(shard)
        order = np.lexsort((pos, shard)).tolist()
        shard, pos = shard.tolist(), pos.tolist()
        i = 0
        while i < len(order):
            s, first = shard[order[i]], pos[order[i]]
            j = i + 1
            while j < len(order) and shard[order[j]] == s and pos[order[j]] == first + j - i:
                j += 1
            info = self.shards[s]
            f = self._handle(s, handles)
            runs = self._read_run(f, info, first, j - i)
            for k, (slot, members) in enumerate(zip(order[i:j], runs, strict=True)):
                keys[slot] = info.keys[first + k]
                mask_row = None if mask_rows is None else mask_rows[slot]
                self._decode(info, keys[slot], members, image_rows[slot], mask_row)
            i = j
        out = {"key": keys, "image": images, "pad": pad_flags}
        if masks is not None:
            out["mask"] = masks
        return out

    def _handle(self, shard: int, handles: dict[int, BinaryIO]) -> BinaryIO:
        """An open file of shard ``shard``, kept across batches; the plan walks the shards one
        after another, so only the most recently used few stay open (a dataset of thousands
        of shards must not exhaust the process's file limit)."""
        f = handles.pop(shard, None)
        if f is None:
            f = open(self.root / self.shards[shard].name, "rb")  # noqa: SIM115
            if len(handles) >= _OPEN_SHARDS:
                handles.pop(next(iter(handles))).close()
        handles[shard] = f  # dicts keep insertion order: the first is the least recently used
        return f

    def _read_run(self, f, shard: ShardInfo, start: int, count: int) -> Iterator[dict[str, bytes]]:
        """The members of samples ``start`` .. ``start + count - 1`` of ``shard``: their bytes
        (from the sample's offset to the next sample's, or to the shard's end) in one read, the
        tar headers parsed and checked by :func:`~hpc_btunet.data.codec.iter_members`."""
        expected = shard.keys[start : start + count]
        first = shard.offsets[start]
        last = shard.offsets[start + count] if start + count < shard.count else shard.bytes
        enc = self.manifest.encoding
        done, members = 0, {}
        try:
            buf = memoryview(os.pread(f.fileno(), last - first, first))
            for name, payload in iter_members(buf):
                key, ext = split_member_name(name)
                if key != expected[done]:
                    raise ShardError(
                        f"shard {self.root / shard.name} is corrupt: found member {name!r} "
                        f"where sample {expected[done]!r} should be; repack or copy it again"
                    )
                members[ext] = payload
                wanted = {f"image.{enc}", "json"}
                if key not in self.unlabelled:
                    wanted.add(f"mask.{enc}")
                if wanted <= members.keys():
                    self._check_crc(shard, start + done, members)
                    yield members
                    done, members = done + 1, {}
                    if done == count:
                        return
        except (TarFormatError, OSError) as e:
            raise ShardError(
                f"shard {self.root / shard.name} is unreadable near sample {expected[done]!r} ({e}): "
                "it is truncated or corrupt; run `hpc-btunet verify`, then repack or copy it again"
            ) from e
        raise ShardError(
            f"shard {self.root / shard.name} ended after {start + done} of {shard.count} samples: "
            "it is truncated; repack the dataset or copy the shard again"
        )

    def _check_crc(self, shard: ShardInfo, pos: int, members: dict[str, bytes]) -> None:
        """Compare the CRC-32 of the payloads as read (``members`` keeps their stored order) with
        the one ``pack`` recorded: a flipped byte may decode fine, and npy data always does."""
        if payload_crc(members.values()) != shard.checksums[pos]:
            raise ShardError(
                f"shard {self.root / shard.name}: sample {shard.keys[pos]!r} fails its checksum "
                "(its bytes changed since it was packed): the shard is corrupt; run "
                "`hpc-btunet verify`, then repack the dataset or copy the shard again"
            )

    def _decode(
        self,
        shard: ShardInfo,
        key: str,
        members: dict[str, memoryview],
        image_slot: np.ndarray,
        mask_slot: np.ndarray | None,
    ) -> None:
        """Decode sample ``key``'s image into ``image_slot`` (C x H x W) and, unless
        ``mask_slot`` is None, its mask into it (H x W, as {0, 1}), checking the shapes against
        the manifest's."""
        enc = self.manifest.encoding
        try:
            image = decode_array(members[f"image.{enc}"], enc)
            mask = None
            if mask_slot is not None:
                mask = decode_array(members[f"mask.{enc}"], enc)
        except (ValueError, RuntimeError, OSError, SyntaxError) as e:
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r} does not decode ({e}): the shard "
                "is corrupt; run `hpc-btunet verify`, then repack or copy it again"
            ) from e
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        if image.shape != image_slot.shape or (mask is not None and mask.shape != mask_slot.shape):
            found = tuple(image.shape) if image.shape != image_slot.shape else tuple(mask.shape)
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r} has shape {found}, "
                f"the manifest says {tuple(image_slot.shape)}; repack the dataset"
            )
        image_slot[...] = image
        if mask is not None:
            np.greater(mask, 0, out=mask_slot)


def _batch_tensors(
    batch: int, channels: int, size: int, with_masks: bool, shared: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Uninitialised images (uint8, B x C x H x W), masks (uint8, B x 1 x H x W, or None) and pad
    flags (bool, B) of one batch, as views of one storage: in shared memory when ``shared`` (a
    worker's batch then reaches the main process as one file descriptor, with no copy)."""
    pixels = size * size
    lengths = [batch * channels * pixels, batch * pixels if with_masks else 0, batch]
    storage = torch.empty(sum(lengths), dtype=torch.uint8)
    if shared:
        storage.share_memory_()
    images, masks, pad = storage.split(lengths)
    return (
        images.view(batch, channels, size, size),
        masks.view(batch, 1, size, size) if with_masks else None,
        pad.view(torch.bool),
    )


class DataWait:
    """The seconds a training loop spends waiting for its batches: iterate ``wait.timed(loader)``
    instead of the loader, and ``take()`` the seconds and batches since the last ``take()``.
    Near zero means the loader keeps up and the step is the bottleneck; a large share of the
    wall time means the loader is (more workers, ``--stage-to``, a faster encoding)."""

    def __init__(self) -> None:
        self.seconds, self.batches = 0.0, 0

    def timed(self, iterable) -> Iterator:
        tick = time.perf_counter()
        it = iter(iterable)  # a DataLoader starts (or resumes) its workers here
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - tick
            self.batches += 1
            yield batch
            tick = time.perf_counter()

    def take(self) -> tuple[float, int]:
        taken = self.seconds, self.batches
        self.seconds, self.batches = 0.0, 0
        return taken


def make_loader(
    root: str | Path,
    split: str = "train",
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    **stream_options,
) -> DataLoader:
    """A ``DataLoader`` over ``ShardStream(root, split, batch_size=..., **stream_options)``.

    ``len(loader)`` is the number of batches per epoch on this rank, equal on every rank. Call
    ``loader.dataset.set_epoch(epoch)`` before each epoch (``start=k`` to begin at batch ``k``).
    Batches come in plan order for any ``num_workers``: workers take batches round-robin and the
    DataLoader returns them in order.
    """
    stream = ShardStream(root, split, batch_size=batch_size, **stream_options)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # workers live across epochs (no start-up per epoch) and read set_epoch's position
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
