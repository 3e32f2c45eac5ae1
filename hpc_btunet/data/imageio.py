"""Reading, converting and resizing 2-D images and masks stored as ordinary image files.

Images are decoded completely (a truncated file fails here, not in the middle of training) and
returned as stored; the conversions to what a shard holds (uint8, 1 or 3 channels, square size) are
separate functions so that a source can apply them in one place.

A dataset's files are untrusted input: a file is opened only when it is a regular file (a named
pipe would block the reader for good), and its header (Pillow's ``Image.open``, tifffile's series)
is compared with :data:`MAX_IMAGE_PIXELS` and :data:`MAX_IMAGE_BYTES` before anything is decoded,
so that a small compressed file claiming billions of pixels costs nothing.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import tifffile
from PIL import Image, ImageFile, UnidentifiedImageError

from hpc_btunet.errors import DataError
from hpc_btunet.readers import UnreadableFile, kind_of, open_regular

MAX_IMAGE_PIXELS = 1 << 28  # 268,435,456 (e.g. 16384 x 16384): the most a dataset image may have
MAX_IMAGE_BYTES = 1 << 30  # what its decoded pixels may take (all channels, as stored)
# Pillow's own decompression-bomb check warns above its limit and refuses above twice that: set
# to ours, it neither warns about an image accepted here nor lets a larger one decode; the check
# of the header below holds even where some other code has switched Pillow's off (None).
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
_PILLOW_OPEN = threading.Lock()  # warnings.catch_warnings is process-wide: one opener at a time
_LIMIT_FIX = "downscale or tile it before packing, or remove it"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114])
# Pillow modes kept as decoded; every other mode is converted to RGB (or L when it holds no colour).
_NATIVE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F", "RGB", "RGBA"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"})


class ImageReadError(DataError):
    """A file that cannot be decoded as one 2-D image; ``reason`` is short and names no path."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def special_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (links
    followed), in words ("a named pipe (FIFO)"); None otherwise (a broken link is named when it
    is read). Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else kind_of(mode)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an image by its suffix (case-insensitive); hidden files never do."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode the whole file at ``path`` into HxW or HxWxC (C in 1..4), any dtype, as stored.

    TIFF goes through tifffile (first series; planar colour samples moved last), everything else
    through Pillow (palette images are expanded, CMYK and other colour spaces converted to RGB).
    Raises ``ImageReadError`` for a missing, unrecognised, truncated or multi-image file.
    """
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Set by some other code in this process; it would make truncated files decode silently.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated images would not be detected;"
            " unset it before reading a dataset"
        )
    try:
        with open_regular(path, what="image file") as f:
            tiff = path.suffix.lower() in TIFF_SUFFIXES
            array = _read_tiff(f, path) if tiff else _read_pillow(f, path)
    except ImageReadError:
        raise
    except UnreadableFile as e:  # a named pipe, socket, device or folder under an image's name
        raise ImageReadError(path, str(e).removeprefix(f"{path} ")) from None
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            path, "not a readable image (unknown format or corrupt header)"
        ) from None
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, zlib errors, ...
        raise ImageReadError(path, _reason(exc)) from exc
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4) or 0 in array.shape:
        raise ImageReadError(path, f"shape {array.shape} is not one 2-D image (HxW or HxWxC, C<=4)")
    return array


def _check_size(path: Path, hw: tuple[int, int], values: int, itemsize: int) -> None:
    """Refuse an image whose header claims more than the limits, before it is decoded:
    ``values`` per pixel (channels), each of ``itemsize`` bytes."""
    h, w = hw
    pixels, size = h * w, h * w * values * itemsize
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            path,
            f"its header claims {w} x {h} = {pixels:,} pixels, more than the {MAX_IMAGE_PIXELS:,} "
            f"(MAX_IMAGE_PIXELS) a dataset image may have; nothing was decoded: {_LIMIT_FIX}",
        )
    if size > MAX_IMAGE_BYTES:
        raise ImageReadError(
            path,
            f"its header claims {w} x {h} pixels of {values} value(s) of "
            f"{itemsize} byte(s), {size:,} bytes decoded, more than the {MAX_IMAGE_BYTES:,} "
            f"(MAX_IMAGE_BYTES) a dataset image may take; nothing was decoded: {_LIMIT_FIX}",
        )


_MODE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def _open_pillow(f: IO[bytes], path: Path) -> Image.Image:
    """``Image.open`` (the header only), Pillow's bomb warning turned into our refusal."""
    try:
        with _PILLOW_OPEN, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(f)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        claimed = re.search(r"\((\d+) pixels\)", str(e))  # Pillow: "Image size (N pixels) ..."
        what = f"{int(claimed.group(1)):,} pixels, " if claimed else ""
        raise ImageReadError(
            path,
            f"its header claims {what}more than the {MAX_IMAGE_PIXELS:,} (MAX_IMAGE_PIXELS) a "
            f"dataset image may have; nothing was decoded: {_LIMIT_FIX}",
        ) from None


def _read_pillow(f: IO[bytes], path: Path) -> np.ndarray:
    with _open_pillow(f, path) as im:
        bands = len(im.getbands())
        _check_size(path, im.size[::-1], bands, _MODE_BYTES.get(im.mode, 1))
        im.load()
        if im.mode in ("P", "PA"):
            has_alpha = im.mode == "PA" or "transparency" in im.info
            if _palette_is_gray(im):
                im = im.convert("LA" if has_alpha else "L")
            else:
                im = im.convert("RGBA" if has_alpha else "RGB")
        elif im.mode not in _NATIVE_MODES:
            im = im.convert("RGBA" if im.mode.endswith(("A", "a")) else "RGB")
        return np.array(im)


def _read_tiff(f: IO[bytes], path: Path) -> np.ndarray:
    with tifffile.TiffFile(f, name=path.name) as tif:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        dims = dict(zip(axes, shape, strict=True))
        if any(ax not in "YXS" and n > 1 for ax, n in dims.items()):
            raise ImageReadError(path, f"holds a stack of images (axes {axes}, shape {shape})")
        if 0 in shape:
            raise ImageReadError(path, f"shape {shape} has an axis of length 0")
        hw = (dims.get("Y", 1), dims.get("X", 1))
        _check_size(path, hw, int(np.prod(shape)) // (hw[0] * hw[1]), series.dtype.itemsize)
        array = series.asarray()
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    # Length-1 axes (one plane of a Z/T/C stack) are harmless; a longer one means several images.
    dims = list(zip(axes, array.shape, strict=True))
    if any(ax not in "YXS" and n > 1 for ax, n in dims):
        raise ImageReadError(path, f"holds a stack of images (axes {axes}, shape {array.shape})")
    return array.reshape([n for ax, n in dims if ax in "YXS"])


def _palette_is_gray(im: Image.Image) -> bool:
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    return bool(np.all(palette == palette[:, :1]))


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or type(exc).__name__


def is_colour(image: str | os.PathLike | np.ndarray) -> bool:
    """Whether an image has (at least) three colour channels, as stored.

    For a path only the header is read (Pillow mode; tifffile series axes), so an RGB file whose
    channels happen to be equal still counts as colour. Palette images count as colour unless the
    palette is gray. An array is colour when it is HxWxC with C >= 3. Raises ``ImageReadError``
    when the header cannot be read.
    """
    if isinstance(image, np.ndarray):
        return image.ndim == 3 and image.shape[2] >= 3
    path = Path(image)
    try:
        with open_regular(path, what="image file") as f:
            if path.suffix.lower() in TIFF_SUFFIXES:
                with tifffile.TiffFile(f, name=path.name) as tif:
                    series = tif.series[0]
                    return "S" in series.axes and series.shape[series.axes.index("S")] >= 3
            with _open_pillow(f, path) as im:
                if im.mode in ("P", "PA"):
                    return not _palette_is_gray(im)
                return im.mode in _COLOUR_MODES
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, _reason(exc)) from exc


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert any image to uint8.

    uint8 is returned unchanged; bool becomes 0/255. Every other integer or float type is rescaled
    per image, linearly from [min, max] of its finite values (over all channels together, so the
    colour balance is kept) to [0, 255]; NaN and infinities become 0, a constant image all zeros.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    scaled = np.where(finite, (values - lo) * (255.0 / (hi - lo)), 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Return HxW (``channels=1``) or HxWx3 (``channels=3``), keeping the dtype.

    For 1: colour becomes ITU-R 601-2 luminance (what Pillow's RGB -> L uses). For 3: gray is
    replicated into three channels. An alpha channel (the 2nd of two, the 4th of four) is dropped,
    not composited.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[:, :, :-1]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return array if channels == 1 else np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected HxW or HxWxC with C in 1..4, got shape {array.shape}")
    if channels == 3:
        return array
    gray = array.astype(np.float64) @ _LUMA
    if array.dtype == np.bool_:
        return gray >= 0.5
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(array.dtype)
    return gray.astype(array.dtype)


LOSSY_SUFFIXES = frozenset({".jpg", ".jpeg"})


def binarise_mask(array: np.ndarray, lossy: bool = False) -> np.ndarray:
    """Foreground where any channel is > 0 (an alpha channel, as in LA or RGBA, is ignored), or
    with ``lossy`` (a JPEG mask, whose compression rings around edges) >= half the range."""
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[:, :, :-1]
    if lossy:
        top = np.iinfo(array.dtype).max if array.dtype.kind in "ui" else float(array.max() or 1)
        fg = array >= (top + 1) / 2
    else:
        fg = array > 0
    return np.any(fg, axis=2) if fg.ndim == 3 else fg


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as booleans (``binarise_mask``; JPEG masks thresholded at half the range)."""
    return binarise_mask(read_image(path), lossy=Path(path).suffix.lower() in LOSSY_SUFFIXES)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 HxW or HxWx3 image to ``size`` x ``size`` (bilinear, antialiased).

    The aspect ratio is not kept. Pillow widens the bilinear kernel when shrinking, so downscaling
    averages over the source pixels instead of skipping them. Returned unchanged when already square
    of that size.
    """
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ValueError(f"expected uint8 HxW or HxWx3, got {image.dtype} {image.shape}")
    if image.shape[:2] == (size, size):
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a mask to ``size`` x ``size`` uint8 in {0, 1}.

    The mask is binarised first (``binarise_mask``), resized as float (bilinear, antialiased) and
    thresholded at 0.5: a target pixel is foreground when roughly half the area it covers is.
    """
    binary = binarise_mask(mask)
    if binary.shape == (size, size):
        return binary.astype(np.uint8)
    resized = Image.fromarray(binary.astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return (np.asarray(resized) >= 0.5).astype(np.uint8)


RESIZE_POLICIES = ("squash", "pad")


def pad_to_square(array: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``array`` (HxW or HxWxC) centred on a square of zeros of side max(H, W), and the padding
    added as (top, bottom, left, right); resizing the result keeps the aspect ratio."""
    h, w = array.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = (top, side - h - top, left, side - w - left)
    if side == h == w:
        return array, pad
    widths = [(pad[0], pad[1]), (pad[2], pad[3])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths), pad
