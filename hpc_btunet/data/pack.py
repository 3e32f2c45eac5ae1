"""``pack``: turn a dataset source into WebDataset tar shards plus ``manifest.json``.

Order of work, so that bad input costs nothing and a crash loses nothing:
1. list and validate the whole source (every offending file named in one error), split it;
2. write each shard under a temporary name, rename it when complete, and record it in a journal
   (with everything the manifest says of it: keys, offsets, per-sample CRC-32 checksums);
3. write the manifest last (with the image-level labels of the entries that have one, and
   ``organ`` when every sample carries an organ mask). A killed pack leaves no manifest;
   rerunning the same command keeps the shards the journal vouches for (size and sha256
   re-checked) and writes the rest, so the manifest comes out identical to that of an
   uninterrupted pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpc_btunet import __version__
from hpc_btunet.atomic import atomic_open, remove_stale_temporaries, write_json
from hpc_btunet.data.codec import ENCODINGS, add_member, payload_crc, sample_members
from hpc_btunet.data.manifest import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    MAX_IMAGE_SIZE,
    SHARD_PATTERN,
    Manifest,
    ShardInfo,
    sha256_file,
    shard_info,
)
from hpc_btunet.data.sample import Entry, Source
from hpc_btunet.data.splits import SplitConfig, Splits, make_splits
from hpc_btunet.errors import DataError, UserError
from hpc_btunet.folder_lock import LOCK_NAME, FolderLock, check_unlocked
from hpc_btunet.readers import MB, read_json

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SCRATCH_NAME = (
    ".pack-scratch"  # a source's spill (decoded volumes) while packing; removed at the end
)
MIN_IMAGE_SIZE = 16
MAX_SHARD_SIZE = 100_000  # samples per shard
MAX_WORKERS = 256  # threads reading and encoding
MAX_JOURNAL_BYTES = 1024 * MB


@dataclass(frozen=True)
class PackConfig:
    out: Path
    image_size: int = 256
    shard_size: int = 1000
    encoding: str = "png"
    overwrite: bool = False
    workers: int = min(4, os.cpu_count() or 1)
    splits: SplitConfig = SplitConfig()

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise UserError(
                f"--image-size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}"
            )
        if self.image_size > MAX_IMAGE_SIZE:
            raise UserError(
                f"--image-size must be at most {MAX_IMAGE_SIZE} (MAX_IMAGE_SIZE), got "
                f"{self.image_size}"
            )
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.shard_size > MAX_SHARD_SIZE:
            raise UserError(
                f"--shard-size must be at most {MAX_SHARD_SIZE:,} (MAX_SHARD_SIZE) samples, got "
                f"{self.shard_size:,}"
            )
        if self.encoding not in ENCODINGS:
            raise UserError(
                f"--encoding {self.encoding!r} is unknown: choose {' or '.join(ENCODINGS)}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UserError(
                f"--workers must be from 1 to {MAX_WORKERS} (MAX_WORKERS), got {self.workers}"
            )


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a complete dataset or a folder holding files that are not ours."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a folder")
    if not out.is_dir():
        return
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise UserError(
            f"--out {out} already holds a complete packed dataset: pass --overwrite to replace "
            "it, or choose another --out"
        )
    foreign = [
        p.name
        for p in out.iterdir()
        if not (
            SHARD_PATTERN.match(p.name)
            or p.name in (MANIFEST_NAME, JOURNAL_NAME, LOCK_NAME, SCRATCH_NAME)
            or ".tmp-" in p.name
        )
    ]
    if foreign and not overwrite:
        shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise UserError(
            f"--out {out} holds files that pack did not write ({shown}): choose an empty or new "
            "folder, or pass --overwrite to pack beside them"
        )


def _check_keys(entries: list[Entry]) -> None:
    bad = [e.key for e in entries if not _KEY_PATTERN.match(e.key)]
    dup = sorted(k for k, n in Counter(e.key for e in entries).items() if n > 1)
    problems = []
    if bad:
        problems.append(f"keys with characters outside [A-Za-z0-9_-]: {', '.join(bad[:20])}")
    if dup:
        problems.append(f"duplicate keys: {', '.join(dup[:20])}")
    if problems:
        raise DataError("the source produced unusable sample keys; " + "; ".join(problems))
    if not entries:
        raise DataError("the source has no samples: nothing to pack")


def _plan_shards(
    keys: list[str], split: str, shard_size: int, seed: int
) -> list[tuple[str, list[str]]]:
    """Shards of near-equal size holding the split's keys in a seeded random order, so that a
    shard is a random mixture of the split (streaming reads stay well mixed)."""
    if not keys:
        return []
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    order = [keys[i] for i in rng.permutation(len(keys))]
    n = -(-len(order) // shard_size)
    return [
        (f"{split}-{i:06d}.tar", list(chunk)) for i, chunk in enumerate(np.array_split(order, n))
    ]


def _fingerprint(source: Source, cfg: PackConfig, entries: list[Entry]) -> str:
    d = {
        "source": source.describe(),
        "content": getattr(source, "content_fingerprint", lambda: None)(),
        "pack": {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "workers")},
        "entries": [(e.key, e.group, e.has_mask, e.label) for e in entries],
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _load_journal(
    out: Path, fingerprint: str, plan: list[tuple[str, list[str]]]
) -> tuple[dict[str, ShardInfo], dict[str, bool]]:
    """Shards recorded as complete by an interrupted pack of the same inputs, still intact, as
    the manifest will describe them, and whether each holds an organ mask for every sample. A
    journal that cannot be read counts as none."""
    try:  # strict JSON from a regular file: anything else counts as no journal
        journal = read_json(out / JOURNAL_NAME, MAX_JOURNAL_BYTES, "pack journal")
    except (OSError, UserError):
        return {}, {}
    if not isinstance(journal, dict) or journal.get("fingerprint") != fingerprint:
        return {}, {}
    records, organ = journal.get("shards"), journal.get("organ")
    done, organs = {}, {}
    for name, keys in plan:
        rec = records.get(name) if isinstance(records, dict) else None
        has_organ = organ.get(name) if isinstance(organ, dict) else None
        try:
            info = shard_info(rec)
        except ValueError:  # no record, or one written by another version
            continue
        if isinstance(has_organ, bool) and _still_valid(out / name, info, keys):
            done[name], organs[name] = info, has_organ
    return done, organs


def _still_valid(path: Path, info: ShardInfo, keys: list[str]) -> bool:
    """Whether a journal record describes the planned shard and the file still matches it."""
    return (
        info.name == path.name
        and info.keys == keys
        and len(info.offsets) == len(info.checksums) == len(keys)
        and path.is_file()
        and path.stat().st_size == info.bytes
        and sha256_file(path) == info.sha256
    )


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: list, limit: int) -> Iterator:
    """``pool.map(fn, items)`` in order, with at most ``limit`` results in flight
    (``Executor.map`` submits them all: a shard's decoded samples would all sit in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= limit:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_shard(
    path: Path, entries: list[Entry], load: Callable, encoding: str, pool, pool_size: int, bar
) -> tuple[ShardInfo, bool]:
    """Write one shard; returns its manifest entry and whether every sample has an organ mask."""
    keys, offsets, checksums, organs = [], [], [], []
    with (
        atomic_open(path, "wb") as f,
        tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for sample in _bounded_map(pool, load, entries, 4 * pool_size):
            keys.append(sample.key)
            offsets.append(tar.offset)
            meta = {**(sample.extra or {}), "key": sample.key, "group": sample.group}
            meta["label"] = sample.label
            members = sample_members(
                sample.key, sample.image, sample.mask, meta, encoding, sample.organ
            )
            organs.append(sample.organ is not None)
            for name, data in members:
                add_member(tar, name, data)
            checksums.append(payload_crc(data for _, data in members))
            bar.update(1)
    split = path.name.split("-")[0]
    size, sha256 = path.stat().st_size, sha256_file(path)
    info = ShardInfo(path.name, split, len(keys), size, sha256, keys, offsets, checksums)
    return info, all(organs)


def pack(source: Source, cfg: PackConfig, log: Callable[[str], None] = print) -> Manifest:
    """Pack ``source`` into ``cfg.out``; returns the manifest written there.

    A source with a ``prepare(scratch, workers)`` step (the volume adapters: each volume decoded
    once, its slices spilled) runs it first, under the folder's lock, in ``out/.pack-scratch``;
    if the source turns out unusable the scratch goes, and ``out`` too when this pack made it.
    """
    out = Path(cfg.out)
    check_unlocked(out, "dataset folder")
    _check_out(out, cfg.overwrite)
    prepare = getattr(source, "prepare", None)
    if prepare is None:
        entries, splits, plan = _plan(source, cfg, log)
        with FolderLock(out, "dataset folder"):  # one pack at a time writes a dataset folder
            return _write(source, cfg, out, entries, splits, plan, log)
    made = not out.exists()
    try:
        with FolderLock(out, "dataset folder"):
            try:
                prepare(out / SCRATCH_NAME, cfg.workers)
                entries, splits, plan = _plan(source, cfg, log)
            except (DataError, UserError):
                shutil.rmtree(out / SCRATCH_NAME, ignore_errors=True)
                raise
            manifest = _write(source, cfg, out, entries, splits, plan, log)
    except (DataError, UserError):
        if made and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(out / SCRATCH_NAME, ignore_errors=True)
    return manifest


def _plan(source: Source, cfg: PackConfig, log: Callable[[str], None]):
    """Entries, validated, with their splits and the shard plan: everything before writing."""
    least = getattr(source, "min_image_size", MIN_IMAGE_SIZE)  # a source may need more pixels
    if cfg.image_size < least:
        what = " ".join(n for n in (source.kind, getattr(source, "task", None)) if n)
        raise UserError(
            f"--image-size must be at least {least} for {what} images, got {cfg.image_size}: "
            "raise it"
        )
    entries = source.entries()
    for warning in getattr(source, "warnings", []):
        log(f"warning: {warning}")
    _check_keys(entries)
    source.validate(entries)
    splits = make_splits(entries, cfg.splits)
    plan = _plan_shards(splits.train, "train", cfg.shard_size, cfg.splits.seed)
    plan += _plan_shards(splits.test, "test", cfg.shard_size, cfg.splits.seed)
    return entries, splits, plan


def _write(
    source: Source,
    cfg: PackConfig,
    out: Path,
    entries: list[Entry],
    splits: Splits,
    plan: list[tuple[str, list[str]]],
    log: Callable[[str], None],
) -> Manifest:
    """The writing half of :func:`pack`, under the folder's lock: shards, journal, manifest."""
    by_key = {e.key: e for e in entries}
    if (
        cfg.overwrite
    ):  # the old manifest goes first, so a crash below never pairs it with new shards
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    planned = {name for name, _ in plan}
    for p in out.iterdir():
        if SHARD_PATTERN.match(p.name) and p.name not in planned:
            p.unlink()

    fingerprint = _fingerprint(source, cfg, entries)
    done, organs = _load_journal(out, fingerprint, plan)
    if done:
        log(f"resuming an interrupted pack: {len(done)} of {len(plan)} shards already complete")

    def load(e: Entry):
        return source.load(e, cfg.image_size)

    infos: dict[str, ShardInfo] = dict(done)
    todo = sum(len(keys) for name, keys in plan if name not in done)
    with (
        ThreadPoolExecutor(cfg.workers) as pool,
        tqdm(total=todo, unit="img", desc="pack", disable=None, leave=False) as bar,
    ):
        for name, keys in plan:
            if name in done:
                continue
            infos[name], organs[name] = _write_shard(
                out / name, [by_key[k] for k in keys], load, cfg.encoding, pool, cfg.workers, bar
            )
            journal = {
                "fingerprint": fingerprint,
                "shards": {n: asdict(i) for n, i in infos.items()},
                "organ": organs,
            }
            write_json(out / JOURNAL_NAME, journal)

    manifest = Manifest(
        source=source.describe(),
        image_size=cfg.image_size,
        channels=source.channels,
        encoding=cfg.encoding,
        seed=cfg.splits.seed,
        fractions={
            "test": cfg.splits.test_fraction,
            "labelled": cfg.splits.labelled_fraction,
            "folds": cfg.splits.folds,
        },
        splits={"train": splits.train, "test": splits.test},
        labelled=splits.labelled,
        folds=splits.folds,
        groups={e.key: e.group for e in sorted(entries, key=lambda e: e.key)},
        unlabelled=sorted(e.key for e in entries if not e.has_mask),
        shards=[infos[name] for name, _ in plan],
        package_version=__version__,
        labels={
            e.key: e.label for e in sorted(entries, key=lambda e: e.key) if e.label is not None
        },
        has_organ=all(organs[name] for name, _ in plan),
    )
    write_json(out / MANIFEST_NAME, manifest.to_json())
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    return manifest
