"""How a sample is laid out in a shard: WebDataset member names and image encodings.

A sample ``KEY`` is stored as consecutive tar members ``KEY.image.EXT``, ``KEY.mask.EXT`` (when it
has a mask) and ``KEY.json`` (group and label). ``EXT`` is ``png`` (lossless, the default) or
``npy`` (raw uint8 arrays: larger, decode-free). Masks are stored as 0/255 so that they can be
viewed; readers return them as {0, 1}. A sample's checksum is the CRC-32 of its member payloads
in that order (``payload_crc``): ``pack`` records it in the manifest, the loader checks it on
every read.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np
from PIL import Image

ENCODINGS = ("png", "npy")
_TAR_MTIME = 0  # fixed, so that packing the same data twice gives byte-identical shards


def encode_array(array: np.ndarray, encoding: str) -> bytes:
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(array).save(buf, format="PNG")
    elif encoding == "npy":
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    else:
        raise ValueError(f"unknown encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    return buf.getvalue()


def decode_array(data: bytes, encoding: str) -> np.ndarray:
    """Decode to a uint8 array (HxW or HxWxC). Raises on corrupt data."""
    if encoding == "png":
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im)
    else:
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, found {array.dtype}")
    return array


def sample_members(
    key: str, image: np.ndarray, mask: np.ndarray | None, meta: dict, encoding: str
) -> list[tuple[str, bytes]]:
    members = [(f"{key}.image.{encoding}", encode_array(image, encoding))]
    if mask is not None:
        members.append(
            (f"{key}.mask.{encoding}", encode_array(mask.astype(np.uint8) * 255, encoding))
        )
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def payload_crc(payloads: Iterable[bytes]) -> int:
    """CRC-32 of a sample's member payloads in stored order (tar headers excluded): cheap next to
    decoding, and it catches the flipped bits a decoder may not (npy has no check of its own)."""
    crc = 0
    for data in payloads:
        crc = zlib.crc32(data, crc)
    return crc


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def split_member_name(name: str) -> tuple[str, str]:
    """``"k.image.png"`` -> ``("k", "image.png")``: WebDataset's rule, key up to the first dot."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext


def read_members(f: BinaryIO, offset: int) -> tarfile.TarFile:
    """A streaming tar reader starting at byte ``offset`` of an open shard file."""
    f.seek(offset)
    return tarfile.open(fileobj=f, mode="r|")
