"""Streaming loader over packed shards, exact under DDP: every rank yields the same batch count.

An epoch is planned from the manifest alone, identically on every rank:

1. the samples of the split (optionally restricted to a key set) are listed shard by shard, the
   shard order permuted and the sequence rotated by a random offset, both seeded by (seed, epoch);
2. the sequence is cut to ``world_size * batches * batch_size`` samples: with ``drop_last`` the
   remainder is dropped (it differs from epoch to epoch), otherwise it is padded by wrapping
   around, and padded samples are flagged in the batch (``batch["pad"]``) so evaluation can
   ignore them;
3. rank ``r`` takes the ``r``-th contiguous block, and its DataLoader workers take contiguous runs
   of whole batches. Contiguous blocks keep reads sequential; the manifest's byte offsets let a
   reader start in the middle of a shard, so one shard serves any number of ranks.

Within a worker a seeded shuffle buffer mixes the samples before batching. Batches are dicts:
``key`` (list of str), ``image`` (uint8, B x C x H x W), ``mask`` (uint8 {0,1}, B x 1 x H x W,
when the samples have masks) and ``pad`` (bool, B).

What is checked, so that a damaged dataset stops training with a message naming the shard instead
of training on garbage: when the stream is built, that every shard exists with the size the
manifest gives (``verify=True``: its sha256 too); on every read, that the members are the
expected samples in order, that each sample's CRC-32 over its member payloads matches the
manifest's ``checksums`` (before it is decoded, so a corrupt sample is never yielded), and that
it decodes to the manifest's shape.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpc_btunet.data.codec import decode_array, payload_crc, read_members, split_member_name
from hpc_btunet.data.manifest import Manifest, ShardInfo, load_manifest, verify_shards
from hpc_btunet.errors import ShardError, UserError


@dataclass(frozen=True)
class SampleRef:
    shard: int  # index into the loader's shard list
    pos: int  # position of the sample inside that shard
    pad: bool = False


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
) -> list[list[SampleRef]]:
    """The samples of each rank for one epoch, in reading order; all ranks get the same count."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
    seq = [
        SampleRef(int(i), pos)
        for i in order
        for pos, key in enumerate(shards[i].keys)
        if keys is None or key in keys
    ]
    n, per_step = len(seq), world_size * batch_size
    if n == 0:
        raise UserError("no samples selected: the split or key set is empty")
    if shuffle:
        shift = int(rng.integers(n))
        seq = seq[shift:] + seq[:shift]
    steps = n // per_step if drop_last else -(-n // per_step)
    if steps == 0:
        raise UserError(
            f"{n} samples are fewer than one global batch ({world_size} rank(s) x batch size "
            f"{batch_size} = {per_step}): lower --batch-size or use fewer ranks"
        )
    total = steps * per_step
    while len(seq) < total:  # wrap around, flagging the repeats
        seq += [SampleRef(r.shard, r.pos, pad=True) for r in seq[: total - len(seq)]]
    per_rank = steps * batch_size
    return [seq[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]


def worker_slice(
    refs: list[SampleRef], batch_size: int, worker: int, num_workers: int
) -> list[SampleRef]:
    """Contiguous runs of whole batches per worker (earlier workers take one extra if uneven)."""
    batches = len(refs) // batch_size
    base, extra = divmod(batches, num_workers)
    start = worker * base + min(worker, extra)
    stop = start + base + (1 if worker < extra else 0)
    return refs[start * batch_size : stop * batch_size]


class ShardStream(IterableDataset):
    """Batches of one split of a packed dataset for one rank; use with ``DataLoader(batch_size=None)``.

    ``rank`` and ``world_size`` are plain numbers given by the caller (the data code knows nothing
    else of distribution). Call ``set_epoch`` before each epoch, as with ``DistributedSampler``.
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
        shuffle_buffer: int = 256,
        verify: bool = False,
        manifest: Manifest | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
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
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self._check_files(verify)
        self.batches_per_epoch = len(self._plan()) // batch_size

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _plan(self) -> list[SampleRef]:
        return plan_epoch(
            self.shards,
            self.keys,
            batch_size=self.batch_size,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
        )[self.rank]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        refs = worker_slice(self._plan(), self.batch_size, worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 7])
        samples = self._read(refs)
        if self.shuffle:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        batch: list[tuple] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []

    def _collate(self, batch: list[tuple]) -> dict:
        out = {
            "key": [b[0] for b in batch],
            "image": torch.from_numpy(np.stack([b[1] for b in batch])),
            "pad": torch.tensor([b[3] for b in batch], dtype=torch.bool),
        }
        if self.with_masks:
            out["mask"] = torch.from_numpy(np.stack([b[2] for b in batch]))
        return out

    def _read(self, refs: list[SampleRef]) -> Iterator[tuple]:
        """Decode the samples of ``refs`` in order, reading consecutive ones as one tar stream."""
        handles: dict[int, object] = {}
        try:
            i = 0
            while i < len(refs):
                j = i + 1
                while (
                    j < len(refs)
                    and refs[j].shard == refs[i].shard
                    and refs[j].pos == refs[j - 1].pos + 1
                ):
                    j += 1
                shard = self.shards[refs[i].shard]
                if refs[i].shard not in handles:
                    handles[refs[i].shard] = open(self.root / shard.name, "rb")  # noqa: SIM115
                for k, raw in enumerate(
                    self._read_run(handles[refs[i].shard], shard, refs[i].pos, j - i)
                ):
                    yield self._decode(shard, raw, refs[i + k].pad)
                i = j
        finally:
            for f in handles.values():
                f.close()

    def _read_run(self, f, shard: ShardInfo, start: int, count: int) -> Iterator[dict[str, bytes]]:
        expected = shard.keys[start : start + count]
        enc = self.manifest.encoding
        done, members = 0, {}
        try:
            tar = read_members(f, shard.offsets[start])
            for info in tar:
                key, ext = split_member_name(info.name)
                if key != expected[done]:
                    raise ShardError(
                        f"shard {self.root / shard.name} is corrupt: found member {info.name!r} "
                        f"where sample {expected[done]!r} should be; repack or copy it again"
                    )
                members[ext] = tar.extractfile(info).read()
                wanted = {f"image.{enc}", "json"}
                if key not in self.unlabelled:
                    wanted.add(f"mask.{enc}")
                if wanted <= members.keys():
                    self._check_crc(shard, start + done, members)
                    yield members
                    done, members = done + 1, {}
                    if done == count:
                        return
        except (tarfile.TarError, EOFError, OSError) as e:
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

    def _decode(self, shard: ShardInfo, members: dict[str, bytes], pad: bool) -> tuple:
        enc, size, channels = (
            self.manifest.encoding,
            self.manifest.image_size,
            self.manifest.channels,
        )
        key = json.loads(members["json"])["key"]
        try:
            image = decode_array(members[f"image.{enc}"], enc)
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
            mask = None
            if self.with_masks:
                mask = (decode_array(members[f"mask.{enc}"], enc) > 0).astype(np.uint8)[None]
        except (ValueError, OSError, SyntaxError) as e:
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r} does not decode ({e}): the shard "
                "is corrupt; run `hpc-btunet verify`, then repack or copy it again"
            ) from e
        if image.shape != (channels, size, size):
            raise ShardError(
                f"shard {self.root / shard.name}: sample {key!r} has shape {tuple(image.shape)}, "
                f"the manifest says {(channels, size, size)}; repack the dataset"
            )
        return key, np.ascontiguousarray(image), mask, pad


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Emit items in a random order using a buffer of ``size``: each emission is a uniform pick
    from the buffer, so items travel at most a buffer's length from their reading position."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    for i in rng.permutation(len(buf)):
        yield buf[i]


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
    ``loader.dataset.set_epoch(epoch)`` before each epoch.
    """
    stream = ShardStream(root, split, batch_size=batch_size, **stream_options)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers must see the epoch set by set_epoch
        prefetch_factor=2 if num_workers > 0 else None,
    )
