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
B x C x H x W), ``mask`` (uint8 {0,1}, B x 1 x H x W, when the samples have masks), ``organ``
(uint8 {0,1}, B x 1 x H x W, with ``with_organ``: the organ masks of the lesion dataset) and
``pad`` (bool, B).

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
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpc_btunet.data.codec import (
    ShapeMismatch,
    TarFormatError,
    decode_array,
    iter_members,
    payload_crc,
    split_member_name,
)
from hpc_btunet.data.manifest import (
    Manifest,
    ShardInfo,
    check_shard_files,
    load_manifest,
    verify_shards,
)
from hpc_btunet.errors import ShardError, UserError
from hpc_btunet.readers import kind_of

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
    sequence (0 or 1: shard order and rotation only). ``with_organ`` adds each sample's organ
    mask to the batch (``organ``); the dataset must store them (``Manifest.has_organ``).
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
        with_organ: bool = False,
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
        if with_organ and not self.manifest.has_organ:
            raise UserError(
                f"the dataset at {self.root} stores no organ masks, and organ masks were asked for "
                "(with_organ): pack one that does (`hpc-btunet pack --source synthetic --task "
                "lesion`, or a source that stores organ masks), or load it without them"
            )
        self.with_masks = with_masks
        self.with_organ = with_organ
        self.unlabelled = unlabelled
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_window = shuffle_window
        self._check_files(verify)
        self.epoch, self.start = 0, 0
        self._slots: _BatchSlots | None = None  # use_slots
        self._sent = 0  # batches this worker has put in its slots, over all epochs
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
        else:  # cheap checks always: a missing or truncated shard fails here
            check_shard_files(self.root, self.shards)

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
        slots = self._slots if info is not None else None
        handles: dict[int, BinaryIO] = {}  # open for the epoch, per worker
        try:
            for step in range(self.start + worker, len(shard), num_workers):
                if slots is None:  # in-process, or a DataLoader that make_loader did not build
                    tensors = _batch_tensors(*self._layout(len(shard[step])), info is not None)
                    yield self._read_batch(shard[step], pos[step], pad[step], handles, tensors)
                    continue
                self._sent += 1
                slot = slots.slot(worker, self._sent)
                slots.stamps[slot] = -1  # being written
                batch = self._read_batch(
                    shard[step], pos[step], pad[step], handles, slots.tensors(slot)
                )
                slots.stamps[slot] = self._sent
                yield {"key": batch["key"], "slot": slot, "seq": self._sent}
        finally:
            for f in handles.values():
                f.close()

    def _layout(self, batch: int) -> tuple[int, int, int, bool, bool]:
        m = self.manifest
        return batch, m.channels, m.image_size, self.with_masks, self.with_organ

    def use_slots(self, workers: int, depth: int) -> None:
        """Give each of ``workers`` DataLoader workers ``depth`` batch buffers in shared memory,
        made now (before the workers start); :func:`make_loader` does this and copies each batch
        out as it arrives. ``depth`` must exceed the batches a worker can have in flight
        (the DataLoader's ``prefetch_factor``) plus the one being copied."""
        self._slots = _BatchSlots(workers, depth, self._layout(self.batch_size))

    def _read_batch(
        self,
        shard: np.ndarray,
        pos: np.ndarray,
        pad: np.ndarray,
        handles: dict[int, BinaryIO],
        tensors: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor],
    ) -> dict:
        """Read and decode one batch into ``tensors`` (images, masks or None, organ masks or
        None, pad flags: see :func:`_batch_tensors`). Samples are placed in plan order but read
        in (shard, position) order: neighbours in a shard are one read, and reads within a shard
        go forward."""
        images, masks, organs, pad_flags = tensors
        pad_flags.copy_(torch.from_numpy(pad))
        image_rows = images.numpy()
        mask_rows = None if masks is None else masks.numpy()[:, 0]
        organ_rows = None if organs is None else organs.numpy()[:, 0]
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
                organ_row = None if organ_rows is None else organ_rows[slot]
                self._decode(info, keys[slot], members, image_rows[slot], mask_row, organ_row)
            i = j
        return _as_batch(keys, images, masks, organs, pad_flags)

    def _handle(self, shard: int, handles: dict[int, BinaryIO]) -> BinaryIO:
        """An open file of shard ``shard``, kept across batches; the plan walks the shards one
        after another, so only the most recently used few stay open (a dataset of thousands
        of shards must not exhaust the process's file limit)."""
        f = handles.pop(shard, None)
        if f is None:
            f = open_shard(self.root / self.shards[shard].name)
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
                if self.with_organ:
                    wanted.add(f"organ.{enc}")
                # the JSON member is a sample's last (codec), so the CRC covers any organ member
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
        organ_slot: np.ndarray | None = None,
    ) -> None:
        """Decode sample ``key``'s image into ``image_slot`` (C x H x W) and, unless their slots
        are None, its mask and organ mask into theirs (H x W, as {0, 1}), checking the shapes
        against the manifest's."""
        enc = self.manifest.encoding
        binaries = [
            (n, slot)
            for n, slot in (("mask", mask_slot), ("organ", organ_slot))
            if slot is not None
        ]
        c, h, w = image_slot.shape
        name = "image"
        try:  # each header is compared with the manifest's shape before anything is decoded
            image = decode_array(members[f"image.{enc}"], enc, (h, w) if c == 1 else (h, w, c))
            decoded = []
            for name, slot in binaries:
                decoded.append((decode_array(members[f"{name}.{enc}"], enc, (h, w)), slot))
        except ShapeMismatch as e:
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r}: its {name} header says "
                f"{' x '.join(map(str, e.found[0]))} {e.found[1]}, the manifest says {h} x {w} "
                f"pixels, {c} channel(s), uint8 (nothing was decoded): the shard does not belong "
                "to this manifest; repack the dataset"
            ) from None
        except (ValueError, RuntimeError, OSError, SyntaxError) as e:
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r} does not decode ({e}): the shard "
                "is corrupt; run `hpc-btunet verify`, then repack or copy it again"
            ) from e
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        wrong = [a.shape for a, slot in [(image, image_slot), *decoded] if a.shape != slot.shape]
        if wrong:  # a decoder that disagrees with its own header
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r} has shape {tuple(wrong[0])}, "
                f"the manifest says {tuple(image_slot.shape)}; repack the dataset"
            )
        image_slot[...] = image
        for binary, slot in decoded:
            np.greater(binary, 0, out=slot)


def open_shard(path: Path) -> BinaryIO:
    """``path`` opened for reading, as a ``ShardError`` naming it when it is gone (deleted or
    moved while a job reads it) or is no longer a regular file; the open cannot block (a named
    pipe put in its place opens at once and is refused)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ShardError(
            f"shard {path} is missing: it was deleted or moved after the job started; restore it "
            "(copy the shard again) or repack the dataset, then rerun to resume"
        ) from None
    except OSError as e:
        raise ShardError(
            f"shard {path} cannot be opened ({e.strerror}): restore it (copy the shard again, "
            "fix its permissions) or repack the dataset"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ShardError(
            f"shard {path} is {kind_of(st.st_mode)}, not a regular file: restore the shard "
            "(copy it again) or repack the dataset"
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _batch_bytes(
    batch: int, channels: int, size: int, with_masks: bool, with_organ: bool = False
) -> list[int]:
    """Bytes of a batch's images, masks, organ masks and pad flags, in the order one storage
    holds them."""
    pixels = size * size
    binary = batch * pixels
    return [
        batch * channels * pixels,
        binary if with_masks else 0,
        binary if with_organ else 0,
        batch,
    ]


def _batch_tensors(
    batch: int,
    channels: int,
    size: int,
    with_masks: bool,
    with_organ: bool = False,
    shared: bool = False,
    storage: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Images (uint8, B x C x H x W), masks and organ masks (uint8, B x 1 x H x W, or None) and
    pad flags (bool, B) of one batch, as views of one storage: ``storage`` (uint8, 1-D, of the
    batch's size), or a new uninitialised one, in shared memory when ``shared`` (a worker's batch
    then reaches the main process as one file descriptor, with no copy)."""
    lengths = _batch_bytes(batch, channels, size, with_masks, with_organ)
    if storage is None:
        storage = torch.empty(sum(lengths), dtype=torch.uint8)
        if shared:
            storage.share_memory_()
    images, masks, organs, pad = storage.split(lengths)
    return (
        images.view(batch, channels, size, size),
        masks.view(batch, 1, size, size) if with_masks else None,
        organs.view(batch, 1, size, size) if with_organ else None,
        pad.view(torch.bool),
    )


def _as_batch(
    keys: list[str],
    images: torch.Tensor,
    masks: torch.Tensor | None,
    organs: torch.Tensor | None,
    pad: torch.Tensor,
) -> dict:
    """A batch as the loader yields it: ``mask`` and ``organ`` only when they were read."""
    batch = {"key": keys, "image": images, "pad": pad}
    if masks is not None:
        batch["mask"] = masks
    if organs is not None:
        batch["organ"] = organs
    return batch


_SHM = "/dev/shm"  # where torch's shared memory lives (both sharing strategies)


class _BatchSlots:
    """Batch buffers in shared memory, ``depth`` per DataLoader worker, made once before the
    workers start. A worker decodes its n-th batch into slot ``n mod depth`` of its own and sends
    the main process the slot's number and the batch's keys only; the main process copies the
    batch out at once (``take``). Against a new shared-memory block per batch this saves creating,
    faulting in and mapping a block and passing its file descriptor, on both sides, every batch
    (bench/loader.py); and the memory is claimed, and checked, before training starts (a full
    ``/dev/shm`` otherwise stops a worker mid-epoch with torch's "unable to allocate shared
    memory" traceback).

    A slot is rewritten only after the main process has copied it: a worker has at most
    ``prefetch_factor`` batches requested ahead of the one being copied, and ``depth`` exceeds
    that. Each slot's stamp (the batch's sequence number, -1 while written) is checked before and
    after the copy, so a batch overwritten while it was read would be an error, never a silent
    mix of two batches."""

    def __init__(self, workers: int, depth: int, layout: tuple[int, int, int, bool, bool]) -> None:
        self.depth, self.layout = depth, layout
        self.slot_bytes = sum(_batch_bytes(*layout))
        need = workers * depth * self.slot_bytes
        try:
            stat = os.statvfs(_SHM)
            free = stat.f_bavail * stat.f_frsize
        except OSError:  # no /dev/shm to measure: torch reports what it cannot map
            free = need
        if need > free:
            mib = 2**20
            raise UserError(
                f"the loader needs {need / mib:,.0f} MiB of shared memory ({workers} worker(s) x "
                f"{depth} batches of {self.slot_bytes / mib:,.1f} MiB) and {_SHM} has "
                f"{free / mib:,.0f} MiB free: use fewer --num-workers or a smaller --batch-size, or "
                f"give the machine more shared memory (a container: docker run --shm-size)"
            )
        self.storage = torch.empty(need, dtype=torch.uint8).share_memory_()
        self.stamps = torch.full((workers * depth,), -1, dtype=torch.int64).share_memory_()

    def slot(self, worker: int, n: int) -> int:
        return worker * self.depth + n % self.depth

    def tensors(
        self, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        start = slot * self.slot_bytes
        return _batch_tensors(*self.layout, storage=self.storage[start : start + self.slot_bytes])

    def take(self, message: dict, pin: bool) -> dict:
        """The batch a worker's ``message`` announces, copied out of its slot (into pinned
        memory when ``pin``), as the dict a batch is."""
        slot, seq = message["slot"], message["seq"]
        start = slot * self.slot_bytes
        storage = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pin)
        before = int(self.stamps[slot])
        # numpy's copy, on this thread: torch's would start intra-op threads, whose spinning
        # after the copy takes CPU from the workers (measured: 7 ms of CPU per batch, not 0.1)
        np.copyto(storage.numpy(), self.storage[start : start + self.slot_bytes].numpy())
        if before != seq or int(self.stamps[slot]) != seq:
            raise RuntimeError(
                f"loader slot {slot} was rewritten before batch {seq} was copied out of it "
                f"(stamps {before}, {int(self.stamps[slot])}): a bug in hpc_btunet, please report it"
            )
        return _as_batch(message["key"], *_batch_tensors(*self.layout, storage=storage))


class _SlotLoader(DataLoader):
    """:func:`make_loader`'s ``DataLoader``: its workers put batches in the stream's slots and
    iteration copies each out as it arrives (:class:`_BatchSlots`)."""

    pin_slots = False

    def __iter__(self):
        messages = super().__iter__()
        slots = self.dataset._slots
        if slots is None or self.num_workers == 0:
            return messages
        return (slots.take(m, self.pin_slots) for m in messages)


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
    DataLoader returns them in order. With workers, batches reach this process through slots in
    shared memory (:class:`_BatchSlots`; ``UserError`` here if ``/dev/shm`` lacks the room) and
    are copied out, into pinned memory with ``pin_memory``.
    """
    stream = ShardStream(root, split, batch_size=batch_size, **stream_options)
    prefetch = 2
    if num_workers > 0:
        stream.use_slots(num_workers, depth=prefetch + 1)
    loader = _SlotLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory and num_workers == 0,  # with workers: pinned when copied out
        # workers live across epochs (no start-up per epoch) and read set_epoch's position
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch if num_workers > 0 else None,
    )
    loader.pin_slots = pin_memory
    return loader
