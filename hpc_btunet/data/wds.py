"""A stock ``webdataset`` pipeline over a packed split or fold, for training loops of one's own.

The shards ``pack`` writes are WebDataset tars; the toolkit's own loader
(:mod:`hpc_btunet.data.loader`) reads them by plan, so that its global order is exact under
DDP and on resume. :func:`webdataset_pipeline` reads the same shards with webdataset's own
stages instead, for code that brings its own loop::

    shard list -> [shard shuffle] -> split_by_node -> split_by_worker -> tar samples
        -> checked against the manifest -> [sample shuffle] -> decoded
        -> {key, image, mask, organ, label}

It keeps what the loader guarantees about each sample: only the keys selected (a split, the
labelled subset, or a fold's training or validation part), each sample's CRC-32 over its member
payloads compared with the manifest's before anything is decoded (a damaged sample raises
:class:`~hpc_btunet.errors.ShardError` naming the shard and the key), images uint8 H x W x C and
masks uint8 H x W in {0, 1} (None for a sample packed without one), organ masks likewise (None
unless the dataset stores them: the lesion dataset), shapes checked against the manifest (from
each payload's header, before it is decoded: a small PNG may claim billions of pixels), the JSON
member parsed strictly (:func:`hpc_btunet.readers.loads_json`).
Images are decoded by webdataset's decoders where those keep the channels as packed (PNG of
1, 3 or 4 channels; ``.npy``), by the toolkit's codec otherwise (2-channel PNG).

What it does not keep is the loader's order. webdataset deals whole shards to ranks and then to
DataLoader workers, round-robin (``split_by_node``, ``split_by_worker``): ranks may get different
numbers of samples (a DDP loop must end its epochs together, e.g. with ``with_epoch``), a rank or
worker left without a shard yields nothing, and the order depends on the number of ranks and
workers. ``shuffle`` shuffles the shard list (the same on every rank, seeded by ``seed`` + the
epoch) and then samples in a buffer of that many; the epoch counts the pipeline's iterations in a
process, so DataLoader workers change order between epochs only when ``persistent_workers``.

This module imports neither torch nor webdataset until the pipeline is built.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpc_btunet.data.codec import ShapeMismatch, check_shape, decode_array, payload_crc
from hpc_btunet.data.manifest import (
    Manifest,
    ShardInfo,
    check_shard_files,
    load_manifest,
    verify_shards,
)
from hpc_btunet.errors import ShardError, UserError
from hpc_btunet.readers import loads_json

if TYPE_CHECKING:
    from collections.abc import Iterator

    import webdataset

PARTS = ("train", "val")
_FIX = "run `hpc-btunet verify`, then repack the dataset or copy the shard again"


def webdataset_pipeline(
    data: str | Path,
    split: str = "train",
    *,
    fold: int | None = None,
    part: str = "train",
    labelled: bool = False,
    shuffle: int = 0,
    seed: int = 0,
    verify: bool = False,
) -> webdataset.DataPipeline:
    """A ``webdataset.DataPipeline`` of the samples of ``split`` of the packed dataset ``data``.

    With ``fold``, the samples of that fold's ``part``: ``"train"`` (the labelled subset minus
    the fold) or ``"val"`` (the fold); with ``labelled``, the labelled subset. Samples are dicts:
    ``key``, ``image`` (uint8 H x W x C), ``mask`` (uint8 H x W in {0, 1}, or None), ``organ``
    (uint8 H x W in {0, 1} when the dataset stores organ masks, else None) and ``label`` (str or
    None). ``shuffle``: the sample buffer (0: shards and samples in stored order).
    ``verify``: check every shard's sha256 first (reads them once more); their existence and size
    are always checked, and every sample's CRC-32 as it is read. More stages can be added with
    ``.compose(...)`` (e.g. ``webdataset.batched(16)``). Raises ``UserError`` for bad input."""
    root = Path(data)
    manifest = load_manifest(root)
    keys = selected_keys(manifest, split, fold, part, labelled)
    if not isinstance(shuffle, int) or isinstance(shuffle, bool) or shuffle < 0:
        raise UserError(f"shuffle is a buffer of samples, 0 or more, got {shuffle!r}")
    shards = [s for s in manifest.shards_of(split) if keys is None or not keys.isdisjoint(s.keys)]
    if verify:
        verify_shards(root, shards)
    else:
        check_shard_files(root, shards)

    import webdataset

    urls = {str(root / s.name): s for s in shards}
    stages: list[Any] = [webdataset.SimpleShardList(list(urls))]
    if shuffle:
        stages.append(webdataset.detshuffle(len(urls), initial=len(urls), seed=seed))
    stages += [
        webdataset.split_by_node,
        webdataset.split_by_worker,
        webdataset.tarfile_to_samples(handler=_unreadable),
        CheckedSamples(manifest, urls, keys),
    ]
    if shuffle:
        stages.append(webdataset.detshuffle(shuffle, seed=seed))
    stages += [
        webdataset.decode(*_decoders(manifest), handler=_undecodable),
        webdataset.map(partial(_as_sample, manifest.image_size, manifest.channels)),
    ]
    return webdataset.DataPipeline(*stages)


def selected_keys(
    manifest: Manifest, split: str, fold: int | None, part: str, labelled: bool
) -> set[str] | None:
    """The keys a pipeline yields (None: the whole split); ``UserError`` for a bad choice."""
    manifest.shards_of(split)  # an unknown split is refused, naming the valid ones
    if part not in PARTS:
        raise UserError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if fold is None:
        if part != "train":
            raise UserError(f"part={part!r} is a fold's part: give fold as well")
        if not labelled:
            return None
    if split != "train":
        what = f"fold {fold}" if fold is not None else "the labelled subset"
        raise UserError(
            f"{what} is part of the train split, not the {split} split: use split='train'"
        )
    if not manifest.folds:
        raise UserError(
            "this dataset has no labelled subset or folds (packed without masks): pack a "
            "labelled dataset, or read the whole split (no fold, labelled=False)"
        )
    if fold is None:
        return set(manifest.labelled)
    train, val = manifest.fold_keys(fold)  # a fold out of range is refused
    keys = set(train if part == "train" else val)
    if not keys:
        raise UserError(
            f"the {part} part of fold {fold} holds no samples: repack with a larger "
            "--labelled-fraction or fewer --folds"
        )
    return keys


class CheckedSamples:
    """The pipeline stage between the tar reader and the decoder: keeps the selected samples,
    each with its members in stored order, after comparing their CRC-32 with the manifest's.
    An organ member is part of the CRC wherever it is stored, and required where the manifest
    says every sample has one."""

    def __init__(self, manifest: Manifest, urls: dict[str, ShardInfo], keys: set[str] | None):
        self.encoding = manifest.encoding
        size, channels = manifest.image_size, manifest.channels
        self.size, self.channels = size, channels
        self.image_shape = (size, size) if channels == 1 else (size, size, channels)
        self.organ = manifest.has_organ
        self.unlabelled = set(manifest.unlabelled)
        self.shards = {url: (s, {k: i for i, k in enumerate(s.keys)}) for url, s in urls.items()}
        self.keys = keys

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            url, key = sample["__url__"], sample["__key__"]
            shard, index = self.shards[url]
            pos = index.get(key)
            if pos is None:
                raise ShardError(
                    f"shard {url} holds a sample {key!r} that the manifest does not list there: "
                    f"the shard was replaced or is corrupt; {_FIX}"
                )
            if self.keys is not None and key not in self.keys:
                continue
            members = [f"image.{self.encoding}"]
            if key not in self.unlabelled:
                members.append(f"mask.{self.encoding}")
            if self.organ or f"organ.{self.encoding}" in sample:
                members.append(f"organ.{self.encoding}")
            members.append("json")
            missing = [m for m in members if m not in sample]
            if missing:
                raise ShardError(
                    f"shard {url}: sample {key!r} lacks its {' and '.join(missing)} member(s): "
                    f"the shard is corrupt; {_FIX}"
                )
            if payload_crc(sample[m] for m in members) != shard.checksums[pos]:
                raise ShardError(
                    f"shard {url}: sample {key!r} fails its checksum (its bytes changed since "
                    f"it was packed): the shard is corrupt; {_FIX}"
                )
            self._check_headers(url, key, sample)
            yield {"__key__": key, "__url__": url} | {m: sample[m] for m in members}

    def _check_headers(self, url: str, key: str, sample: dict) -> None:
        """Each payload's header (a PNG's IHDR, an npy header: a few bytes) against the
        manifest's shape, before a decoder allocates what it claims."""
        enc, size = self.encoding, self.size
        for name, shape in (("image", self.image_shape), ("mask", (size, size)),
                            ("organ", (size, size))):  # fmt: skip
            payload = sample.get(f"{name}.{enc}")
            if payload is None:
                continue
            try:
                check_shape(payload, enc, shape)
            except ShapeMismatch as e:
                raise ShardError(
                    f"shard {url}: sample {key!r}: its {name} header says "
                    f"{' x '.join(map(str, e.found[0]))} {e.found[1]}, the manifest says {size} x "
                    f"{size} pixels, {self.channels} channel(s), uint8 (nothing was decoded): the "
                    "shard does not belong to this manifest; repack the dataset"
                ) from None
            except ValueError as e:
                raise ShardError(
                    f"shard {url}: sample {key!r} does not decode ({name}.{enc}: {e}); {_FIX}"
                ) from None


class _Member:
    """A webdataset decoding handler for one member name only (``image.png``, ``mask.png``, ...)."""

    def __init__(self, name: str, handler) -> None:
        self.name, self.handler = "." + name, handler

    def __call__(self, key: str, data: bytes):
        return self.handler(key, data) if key == self.name else None


def _codec_png(key: str, data: bytes) -> np.ndarray:
    return decode_array(data, "png")


def _json_member(key: str, data: bytes) -> Any:
    """A sample's JSON member, parsed strictly (no key twice, bounded nesting, UTF-8)."""
    return loads_json(data, "its JSON member", "repack the dataset")


def _decoders(manifest: Manifest) -> list:
    """Handlers for the image members and the JSON member (strict); ``.npy`` is webdataset's
    default."""
    json_member = _Member("json", _json_member)
    if manifest.encoding != "png":
        return [json_member]
    from webdataset.autodecode import ImageHandler

    # webdataset converts every PNG to one mode; these keep the channels as packed
    spec = {1: "l8", 3: "rgb8", 4: "rgba8"}.get(manifest.channels)
    image = ImageHandler(spec) if spec else _codec_png
    binary = ImageHandler("l8")
    return [
        _Member("mask.png", binary),
        _Member("organ.png", binary),
        _Member("image.png", image),
        json_member,
    ]


def _as_sample(size: int, channels: int, sample: dict) -> dict:
    """The decoded members as the pipeline's sample, shapes checked against the manifest."""
    key, url = sample["__key__"], sample["__url__"]
    image = next(v for k, v in sample.items() if k.startswith("image."))
    mask = next((v for k, v in sample.items() if k.startswith("mask.")), None)
    organ = next((v for k, v in sample.items() if k.startswith("organ.")), None)
    if not image.flags.writeable:  # Pillow's arrays are read-only; torch warns about those
        image = image.copy()
    if image.ndim == 2:
        image = image[:, :, None]
    found = [
        (name, a.shape, a.dtype)
        for name, a, shape in (
            ("image", image, (size, size, channels)),
            ("mask", mask, (size, size)),
            ("organ mask", organ, (size, size)),
        )
        if a is not None and (a.shape != shape or a.dtype != np.uint8)
    ]
    if found:
        name, shape, dtype = found[0]
        raise ShardError(
            f"shard {url}: sample {key!r} has a {name} of {shape} {dtype}, the manifest says "
            f"{size} x {size} pixels, {channels} channel(s), uint8; repack the dataset"
        )
    meta = sample["json"]
    return {
        "key": key,
        "image": image,
        "mask": None if mask is None else (mask > 0).astype(np.uint8),
        "organ": None if organ is None else (organ > 0).astype(np.uint8),
        "label": meta.get("label") if isinstance(meta, dict) else None,
    }


def _unreadable(exn: Exception) -> bool:
    """webdataset's handler for the tar reader: one ``ShardError`` naming the shard."""
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
    raise ShardError(
        f"shard {url or '(unknown)'} is unreadable ({exn.args[0] if exn.args else exn!r}): it "
        f"is truncated or corrupt; {_FIX}"
    ) from exn


def _undecodable(exn: Exception) -> bool:
    """webdataset's handler for the decoder: one ``ShardError`` naming the shard and key."""
    url, key, member = (getattr(exn, a, None) for a in ("url", "key", "k"))
    raise ShardError(
        f"shard {url}: sample {key!r} does not decode ({member}: {exn.__cause__ or exn}); "
        "repack the dataset"
    ) from exn
