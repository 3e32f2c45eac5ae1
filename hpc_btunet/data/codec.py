"""How a sample is laid out in a shard: WebDataset member names and image encodings.

A sample ``KEY`` is stored as consecutive tar members ``KEY.image.EXT``, ``KEY.mask.EXT`` (when it
has a mask), ``KEY.organ.EXT`` (when it has an organ mask: the lesion dataset) and ``KEY.json``
(group and label), always in that order and with the JSON member last, which is what tells a
reader that a sample's members are complete. ``EXT`` is ``png`` (lossless, the default) or
``npy`` (raw uint8 arrays: larger, decode-free). Masks are stored as 0/255 so that they can be
viewed; readers return them as {0, 1}. A sample's checksum is the CRC-32 of its member payloads
in that order (``payload_crc``): ``pack`` records it in the manifest, the loader checks it on
every read.

A payload's header is read before it is decoded (``payload_shape``: a PNG's IHDR chunk, a
``.npy`` header), so that a reader that knows the shape to expect (the manifest's) refuses a
payload of any other shape without allocating for it: a small PNG of zeros may claim billions of
pixels.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import pyspng
from PIL import Image

ENCODINGS = ("png", "npy")
_PNG_GREY_ALPHA = b"\x04"  # the IHDR colour type (byte 25 of a PNG) of 2-channel images
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


class ShapeMismatch(ValueError):
    """A payload whose header gives another shape or type than the one expected; ``found`` is
    the header's (shape, dtype), nothing was decoded."""

    def __init__(self, found: tuple[tuple[int, ...], np.dtype], expected: tuple[int, ...]) -> None:
        shape, dtype = found
        super().__init__(
            f"its header says {' x '.join(map(str, shape))} {dtype}, expected "
            f"{' x '.join(map(str, expected))} uint8"
        )
        self.found, self.expected = found, expected


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> decoded channels
_PNG_DEPTHS = {8: np.dtype(np.uint8), 16: np.dtype(np.uint16)}


def png_shape(data: bytes | memoryview) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) a PNG decodes to, from its IHDR chunk alone (26 bytes): (H, W) for one
    channel, (H, W, C) otherwise. Raises ``ValueError`` for a payload that is no PNG."""
    head = bytes(memoryview(data)[:26])
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError("not a PNG (no PNG signature and IHDR chunk)")
    width, height = struct.unpack(">II", head[16:24])
    depth, colour = head[24], head[25]
    if colour not in _PNG_CHANNELS:
        raise ValueError(f"a PNG of unknown colour type {colour}")
    channels = _PNG_CHANNELS[colour]
    if depth in _PNG_DEPTHS:
        dtype = _PNG_DEPTHS[depth]
    elif depth in (1, 2, 4) and colour in (0, 3):  # expanded to 8 bits by the decoders
        dtype = np.dtype(np.uint8)
    else:
        raise ValueError(f"a PNG of bit depth {depth} and colour type {colour}")
    return ((height, width) if channels == 1 else (height, width, channels)), dtype


def payload_shape(data: bytes | memoryview, encoding: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a payload from its header, without decoding it."""
    if encoding == "png":
        return png_shape(data)
    shape, fortran, dtype, _ = _npy_header(memoryview(data))
    return shape, dtype


def check_shape(data: bytes | memoryview, encoding: str, expected: tuple[int, ...]) -> None:
    """Raise :class:`ShapeMismatch` unless the payload's header promises uint8 of ``expected``
    (H x W, or H x W x C): a few bytes read, nothing decoded."""
    shape, dtype = payload_shape(data, encoding)
    if tuple(shape) != tuple(expected) or dtype != np.uint8:
        raise ShapeMismatch((tuple(shape), dtype), tuple(expected))


def decode_array(
    data: bytes | memoryview, encoding: str, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Decode to a uint8 array (HxW or HxWxC; npy: a read-only view of ``data``). With
    ``shape``, the header is compared with it first (:func:`check_shape`), so a payload that
    claims another size is refused before anything is allocated. Raises ``ValueError``
    (:class:`ShapeMismatch` for the shape), ``RuntimeError`` or ``OSError`` on data that does
    not decode (a flipped bit may decode: the loader's checksum catches those)."""
    if encoding != "png":
        array = decode_npy(data, shape)
    else:
        if shape is not None:  # the IHDR chunk first: 26 bytes, before libspng allocates
            check_shape(data, encoding, shape)
        array = _decode_png(data)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, found {array.dtype}")
    return array


def _decode_png(data: bytes | memoryview) -> np.ndarray:
    if bytes(data[25:26]) == _PNG_GREY_ALPHA:  # 2 channels: libspng does not decode them
        return np.asarray(Image.open(io.BytesIO(data)))
    return pyspng.load(bytes(data))  # libspng: faster than Pillow (bench/loader.py)


def sample_members(
    key: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    meta: dict,
    encoding: str,
    organ: np.ndarray | None = None,
) -> list[tuple[str, bytes]]:
    """``(member name, payload)`` of one sample, in stored order (see the module docstring)."""
    members = [(f"{key}.image.{encoding}", encode_array(image, encoding))]
    for name, binary in (("mask", mask), ("organ", organ)):
        if binary is not None:
            payload = encode_array(binary.astype(np.uint8) * 255, encoding)
            members.append((f"{key}.{name}.{encoding}", payload))
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


class TarFormatError(ValueError):
    """A tar member header that is not what ``pack`` writes, or is damaged."""


_BLOCK = 512


def iter_members(buf: memoryview) -> Iterator[tuple[str, memoryview]]:
    """``(name, payload)`` of the tar members in ``buf``, which starts at a member header; the
    payloads are views into ``buf`` (no copy). Stops at the end of ``buf`` or of the archive.

    The reader's fast path: it parses the headers itself (POSIX ustar, with the pax extended
    headers ``tarfile`` writes for long names) instead of going through ``tarfile`` for every
    member, and checks each header's checksum, so a damaged header is reported, not
    misread. Raises :class:`TarFormatError` on a bad or truncated header or payload."""
    pos, end, long_name = 0, len(buf), None
    while pos + _BLOCK <= end:
        header = buf[pos : pos + _BLOCK]
        if header[0] == 0 and not any(header):  # end-of-archive block
            return
        kind = header[156:157].tobytes()
        size = _octal(header[124:136], "size")
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header) - sum(header[148:156]) + 8 * 0x20:
            raise TarFormatError("a member header fails its checksum")
        start, pos = pos + _BLOCK, pos + _BLOCK + -(-size // _BLOCK) * _BLOCK
        if start + size > end:
            raise TarFormatError("a member's data runs past the end of what was read")
        payload = buf[start : start + size]
        if kind in (b"x", b"g"):  # pax headers: 'x' names the next member (long names)
            if kind == b"x":
                long_name = _pax_path(payload)
            continue
        if kind not in (b"0", b"\0"):
            raise TarFormatError(f"a member of type {kind!r}, not a regular file")
        name = long_name or _ustar_name(header)
        long_name = None
        yield name, payload


def _octal(field: memoryview, what: str) -> int:
    text = field.tobytes().rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"a member header has an unreadable {what} field") from None


def _ustar_name(header: memoryview) -> str:
    name = header[0:100].tobytes().split(b"\0", 1)[0]
    if header[257:262].tobytes() == b"ustar":
        prefix = header[345:500].tobytes().split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(payload: memoryview) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<name>\\n"`` records)."""
    data, pos, path = payload.tobytes(), 0, None
    while pos < len(data):
        length, _, rest = data[pos:].partition(b" ")
        try:
            n = int(length)
        except ValueError:
            raise TarFormatError("a pax header record is unreadable") from None
        key, _, value = rest[: n - len(length) - 1].rstrip(b"\n").partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += n
    return path


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


_NPY_MAX_HEADER = 1 << 16  # numpy writes headers of a few hundred bytes


def _npy_header(view: memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header length) of a ``.npy`` payload, parsed once per
    distinct header (the samples of a dataset share one). Raises ``ValueError``."""
    if view[:6].tobytes() != b"\x93NUMPY" or len(view) < 10 or view[6] not in (1, 2):
        raise ValueError("not an npy payload (no \\x93NUMPY header)")
    width = 2 if view[6] == 1 else 4
    length = 8 + width + int.from_bytes(view[8 : 8 + width], "little")
    if length > min(len(view), _NPY_MAX_HEADER):
        raise ValueError(f"an npy header of {length} bytes in a payload of {len(view)}")
    header = view[:length].tobytes()
    known = _NPY_HEADERS.get(header)
    if known is None:
        fp = io.BytesIO(header)
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        if dtype.hasobject:
            raise ValueError("npy payload holds Python objects")
        known = (tuple(shape), fortran, dtype, len(header))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = known
    return known


def decode_npy(data: bytes | memoryview, expected: tuple[int, ...] | None = None) -> np.ndarray:
    """A ``.npy`` payload as an array (a view of ``data``, no copy): the header parsed
    (:func:`_npy_header`, cached) and, with ``expected``, compared with it (uint8 of that shape,
    else :class:`ShapeMismatch`), then a slice."""
    view = memoryview(data)
    shape, fortran, dtype, skip = _npy_header(view)
    if expected is not None and (shape != tuple(expected) or dtype != np.uint8):
        raise ShapeMismatch((shape, dtype), tuple(expected))
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - skip != count * dtype.itemsize:
        raise ValueError(
            f"npy payload holds {len(view) - skip} bytes of data, its header says {shape} {dtype}"
        )
    array = np.frombuffer(view, dtype=dtype, count=count, offset=skip)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
