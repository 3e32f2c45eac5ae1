"""A fine-tuning run's ``predictions.npz``, read as untrusted input.

The file is a zip of ``.npy`` members (``keys``, ``dice``, ``masks``, ...). Before a member is
read, its header (dtype and shape) is checked against bounds, so that a hostile header cannot
size an allocation (numpy allocates what the header declares before reading a byte): keys are
text, at most :data:`MAX_IMAGES` of them in at most :data:`MAX_KEY_BYTES`; Dice one float
per key; masks one H x W plane per key of at most :data:`MAX_MASK_PIXELS` pixels. Nothing is
unpickled (``allow_pickle=False``), and only a regular file is opened (a named pipe does not
hang the report). The masks are never read whole: Fig. 5 reads the few planes it draws.

A file that fails a check is a sentence for ``report.md`` (:func:`load_predictions` returns it),
never an error of the report.
"""

from __future__ import annotations

import contextlib
import lzma
import math
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy

from hpc_btunet.errors import UserError
from hpc_btunet.readers import inside, open_regular

MAX_FILE_BYTES = 8 << 30  # the whole predictions.npz (masks of a large test split, compressed)
MAX_MEMBERS = 64
MAX_IMAGES = 1_000_000
MAX_KEY_BYTES = 64 << 20  # all keys together (numpy stores 4 bytes per character)
MAX_MASK_PIXELS = 1 << 24  # one mask plane: 4096 x 4096
MASK_KINDS = "biu"  # bool or integer 0/1 (the job writes uint8)

# what goes wrong reading a damaged or odd archive: a UserError from the readers, the zip's and
# the decompressors' own errors (an encrypted member is a RuntimeError, an unknown compression
# NotImplementedError), numpy's ValueError, a short member (EOFError)
READ_ERRORS = (
    UserError,
    OSError,
    ValueError,
    KeyError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
)


@dataclass
class Header:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # where the data start in the member
    stored: int  # the member's size (the zip's record of it, checked by its CRC as it is read)

    def size(self) -> int:
        """The member's size as the header describes it."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def _header(archive: zipfile.ZipFile, name: str) -> Header:
    """The ``.npy`` header of member ``name`` (``keys`` for ``keys.npy``), read alone."""
    with archive.open(f"{name}.npy") as member:
        version = npy.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(member)
        else:
            raise ValueError(
                f"{name}: .npy format {version[0]}.{version[1]} is not read here (1.0 and 2.0 are)"
            )
        offset = member.tell()
    return Header(
        tuple(shape), bool(fortran), dtype, offset, archive.getinfo(f"{name}.npy").file_size
    )


@contextlib.contextmanager
def _archive(path: Path) -> Iterator[zipfile.ZipFile]:
    with open_regular(path, MAX_FILE_BYTES, "predictions file") as f, zipfile.ZipFile(f) as z:
        if len(z.infolist()) > MAX_MEMBERS:
            raise ValueError(f"{len(z.infolist())} members, more than predictions hold")
        yield z


def _check(headers: dict[str, Header]) -> str:
    """What is wrong with the headers of ``keys``, ``dice`` and ``masks`` (or "")."""
    keys, dice, masks = headers["keys"], headers["dice"], headers["masks"]
    if keys.dtype.kind != "U" or len(keys.shape) != 1:
        return f"keys are {keys.dtype} {keys.shape}, not one text key per image"
    n = keys.shape[0]
    if n > MAX_IMAGES or keys.dtype.itemsize * n > MAX_KEY_BYTES:
        return (
            f"keys are {keys.dtype} {keys.shape}: more than {MAX_IMAGES:,} images or "
            f"{MAX_KEY_BYTES >> 20} MiB of keys"
        )
    if dice.dtype.kind != "f" or dice.dtype.itemsize > 8 or dice.shape != (n,):
        return f"keys {keys.shape} and dice {dice.dtype} {dice.shape} do not match"
    if (
        len(masks.shape) != 3
        or masks.shape[0] != n
        or masks.dtype.kind not in MASK_KINDS
        or masks.dtype.itemsize > 8
    ):
        return f"masks are {masks.dtype} {masks.shape}, not one 0/1 plane per key ({n})"
    if masks.shape[1] * masks.shape[2] > MAX_MASK_PIXELS:
        return f"masks of {masks.shape[1]} x {masks.shape[2]} pixels: larger than any dataset's"
    if masks.fortran:
        return "masks stored in Fortran order (the fine-tuning job writes C order)"
    for name, header in headers.items():
        if header.stored != header.size():  # truncated, or a header that does not describe it
            return (
                f"{name}.npy holds {header.stored:,} bytes, its header describes {header.size():,}"
            )
    return ""


def _array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as member:
        return npy.read_array(member, allow_pickle=False)


@dataclass
class Predictions:
    """One run's ``predictions.npz``: test keys in evaluation order and per-image Dice (each
    checked); the masks' header, their planes read only when a figure needs them."""

    path: Path
    keys: np.ndarray
    dice: np.ndarray
    masks_header: Header | None = None

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys.tolist())}

    def masks_of(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The mask planes (H x W) of ``keys``, read one by one from the archive: memory for
        those planes only, whatever the file holds."""
        index = self.index()
        planes: dict[int, np.ndarray] = {}
        with _archive(self.path) as archive:
            header = _header(archive, "masks")
            if self.masks_header is None or header != self.masks_header:
                raise ValueError(f"{self.path}: the masks are not those checked when it was read")
            plane = header.shape[1] * header.shape[2] * header.dtype.itemsize
            with archive.open("masks.npy") as member:
                for i in sorted({index[k] for k in keys}):
                    _seek(member, header.offset + i * plane)
                    data = member.read(plane)
                    if len(data) != plane:
                        raise EOFError(f"{self.path}: the masks end before image {i}")
                    planes[i] = np.frombuffer(data, header.dtype).reshape(header.shape[1:])
        return {k: planes[index[k]] for k in keys}


def _seek(member: IO[bytes], position: int) -> None:
    """Forward to ``position`` in a zip member (seeking decompresses and discards: memory stays
    bounded)."""
    member.seek(position)
    if member.tell() != position:
        raise EOFError("the masks end early")


def load_predictions(folder: Path, name: object) -> Predictions | str:
    """A run's predictions (``name``: the file its ``metrics.json`` names, within the run's
    ``folder``), or why there are none usable (a sentence for report.md)."""
    if not name:
        return f"{folder}: no predictions.npz (a run of an older version)"
    path = inside(name, folder) if isinstance(name, str) else None
    if path is None:
        return f"{folder}/metrics.json names predictions {name!r:.80} outside its run folder"
    try:
        with _archive(path) as archive:
            headers = {m: _header(archive, m) for m in ("keys", "dice", "masks")}
            problem = _check(headers)
            if problem:
                return f"{path}: {problem}"
            keys, dice = _array(archive, "keys"), _array(archive, "dice")
    except FileNotFoundError:
        return f"{path}: missing (metrics.json names it)"
    except READ_ERRORS as e:
        return f"{path}: unreadable ({type(e).__name__}: {_one_line(e)})"
    if keys.shape != headers["keys"].shape or dice.shape != keys.shape:
        return f"{path}: keys {keys.shape} and dice {dice.shape} do not match"
    if len(np.unique(keys)) != len(keys):
        return f"{path}: a test key appears twice"
    dice = dice.astype(float)
    if not np.isfinite(dice).all():
        return f"{path}: per-image Dice holds NaN or infinite values"
    if len(dice) and (dice.min() < 0 or dice.max() > 1):
        return f"{path}: per-image Dice outside [0, 1] ({dice.min():.4g} to {dice.max():.4g})"
    return Predictions(path, keys, dice, headers["masks"])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
