"""Adapters for 3-D NIfTI datasets, packed as 2-D axial slices: ``brats`` and ``decathlon``.

``brats`` reads BraTS 2018 (``{HGG,LGG}/<subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii.gz``) and
the flat layout of later years (``BraTS20XX_<n>/BraTS20XX_<n>_<mod>.nii.gz``); ``decathlon`` the
Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``; 4-D images
with one channel per modality, or nnU-Net's ``<case>_<4 digits>`` file per channel).

How a subject becomes slices, in order:

1. **Check the tree cheaply** (nothing decoded): every subject has each chosen modality and its
   label file; every file's header reads; the label grid (shape and affine) is the image's; a
   gzip file's trailer records the size its header promises (a truncated download does not).
   All problems of all subjects are raised together, in seconds.
2. **Decode each subject once** (``prepare``, in ``--workers`` threads, each holding one subject
   at a time: gzip inflation and numpy release the GIL, 2 threads run 1.6-1.7x one): reorient to RAS+ (``nibabel.as_closest_canonical``: axis flips and swaps only, no
   resampling), normalise each modality per volume (clip to the ``clip`` percentiles of its
   non-zero voxels, the brain in skull-stripped MRI, then scale to 0-255), pick the slices
   (``slices`` policy) and spill them, with their masks, to one ``.npy`` pair per subject in a
   scratch folder inside ``--out``. A subject already spilled with the same files and options is
   not decoded again, so a killed pack resumes. Problems found while decoding (a corrupt stream,
   label values that are not the dataset's) are collected over all subjects and raised together.
3. ``entries`` lists the spilled slices (key ``<subject>_<slice>``, group = subject, so slices of
   a subject never straddle train/test or folds; label ``abnormal`` when the slice holds the target,
   else ``normal``); ``load`` reads one slice from the spill (a memory map) and resizes it.

Pixel spacing is not resampled: slices are resized in pixels, as the paper does.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpc_btunet.atomic import atomic_open, remove_stale_temporaries, write_json
from hpc_btunet.data.folder import sanitise_key
from hpc_btunet.data.imageio import (
    RESIZE_POLICIES,
    pad_to_square,
    resize_image,
    resize_mask,
    special_file,
)
from hpc_btunet.data.public import Problems, layout_message, skipped_warning
from hpc_btunet.data.sample import Entry, Sample
from hpc_btunet.errors import DataError, UserError
from hpc_btunet.readers import MB, UnreadableFile, is_regular_file, open_regular, read_json

MAX_CHANNELS = 4  # PNG holds 1 to 4 channels (L, LA, RGB, RGBA)
MAX_VOXELS = 1 << 28  # 268,435,456 per 3-D volume (BraTS: 8.9 M): decoded as float32 per thread
MAX_RECORD_BYTES = 64 * MB  # dataset.json, a spill record
NIFTI_SUFFIXES = (".nii.gz", ".nii")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
# BraTS labels: 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour (3 from 2023 on).
BRATS_TARGETS = {"wt": (1, 2, 3, 4), "tc": (1, 3, 4), "et": (3, 4)}
BRATS_LABELS = frozenset({0, 1, 2, 3, 4})
_SLICES_HELP = "'lesion', 'lesion:F' (F in [0, 1]), 'all' or a positive integer N"


# --- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicePolicy:
    """Which axial slices of a subject become samples.

    ``lesion:F``: every slice holding the target, plus the fraction F of the other slices that hold
    any image content (drawn with the pack's seed); ``lesion`` is ``lesion:0``. ``all``: every slice
    with image content. ``N``: N slices per subject evenly spaced over those holding the target
    (all of them when fewer).
    """

    mode: str  # "lesion", "all" or "count"
    fraction: float = 0.0
    count: int = 0

    @classmethod
    def parse(cls, text: str) -> SlicePolicy:
        text = str(text).strip()
        if text == "all":
            return cls("all")
        if text.isdigit() and int(text) > 0:
            return cls("count", count=int(text))
        m = re.fullmatch(r"lesion(?::([0-9.]+))?", text)
        if m:
            try:
                fraction = float(m.group(1) or 0)
            except ValueError:
                fraction = -1.0
            if 0 <= fraction <= 1:
                return cls("lesion", fraction=fraction)
        raise UserError(f"--slices {text!r} is not a slice policy: use {_SLICES_HELP}")

    def __str__(self) -> str:
        if self.mode == "count":
            return str(self.count)
        if self.mode == "lesion" and self.fraction:
            return f"lesion:{self.fraction:g}"
        return self.mode

    def choose(self, target: np.ndarray, content: np.ndarray, rng: np.random.Generator):
        """Indices (ascending) of the chosen slices, from per-slice booleans: holds the target,
        holds image content."""
        lesion = np.flatnonzero(target)
        if self.mode == "all":
            return np.flatnonzero(content | target)
        if self.mode == "count":
            if len(lesion) <= self.count:
                return lesion
            return lesion[
                np.unique(np.linspace(0, len(lesion) - 1, self.count).round().astype(int))
            ]
        others = np.flatnonzero(content & ~target)
        extra = rng.choice(others, int(round(self.fraction * len(others))), replace=False)
        return np.sort(np.concatenate([lesion, extra]).astype(int))


def parse_clip(text: str | tuple) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        lo = hi = -1.0
    if not 0 <= lo < hi <= 100:
        raise UserError(
            f"--clip {text!r} must be two percentiles LO,HI with 0 <= LO < HI <= 100 (e.g. 0.5,99.5)"
        )
    return lo, hi


def _parse_values(
    text: str, what: str, names: dict[str, int] | None = None, allowed: frozenset | None = None
) -> tuple[int, ...]:
    """``"1,4"`` (or label names of ``names``) as a sorted tuple of label values, each one of
    ``allowed`` when given."""
    values = set()
    for part in str(text).split(","):
        part = part.strip()
        if part.isdigit():
            values.add(int(part))
        elif names and part.lower() in names:
            values.add(names[part.lower()])
        else:
            known = f"; the dataset's labels: {', '.join(names)}" if names else ""
            raise UserError(f"--target {text!r}: {part!r} is not {what}{known}")
    if not values or 0 in values:
        raise UserError(f"--target {text!r} must name label values other than 0 (background)")
    if allowed is not None and not values <= allowed:
        unknown = ", ".join(map(str, sorted(values - allowed)))
        raise UserError(
            f"--target {text!r}: the dataset has no label {unknown}; its labels are "
            f"{', '.join(map(str, sorted(allowed - {0})))}"
        )
    return tuple(sorted(values))


# --- one subject ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Channel:
    path: Path
    index: int | None = None  # the channel of a 4-D image; None for a 3-D one


@dataclass(frozen=True)
class Subject:
    name: str
    channels: tuple[Channel, ...]
    label: Path
    grade: str | None = None  # BraTS 2018's HGG / LGG folder

    def files(self) -> list[Path]:
        return list(dict.fromkeys([c.path for c in self.channels] + [self.label]))


@dataclass(frozen=True)
class Spill:
    """What ``prepare`` records of a subject: where its slices are, and which they are."""

    subject: str
    digest: str
    slices: list[int]
    abnormal: list[bool]
    shape: list[int]  # H, W of a slice
    grade: str | None = None

    @property
    def stem(self) -> str:
        return f"{self.subject}-{self.digest[:16]}"


@dataclass
class _Options:
    """What a worker needs to turn a subject into slices (picklable)."""

    target: tuple[int, ...] | None  # None: every non-zero label
    allowed: frozenset[int] | None  # label values the dataset may hold; None: any integer
    slices: SlicePolicy
    clip: tuple[float, float]
    seed: int
    scratch: str = ""


def _nib():
    import nibabel

    return nibabel


def _subject_digest(subject: Subject, opts: _Options) -> str:
    files = []
    for path in subject.files():
        st = path.stat()
        files.append((str(path.resolve()), st.st_size, st.st_mtime_ns))
    d = {
        "files": files,
        "channels": [c.index for c in subject.channels],
        "target": opts.target,
        "slices": str(opts.slices),
        "clip": opts.clip,
        "seed": opts.seed,
        "grade": subject.grade,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def check_header(subject: Subject) -> list[tuple[str, Path, str]]:
    """(kind, file, reason) of every problem of a subject that its headers show."""
    nib = _nib()
    out, grids = [], {}
    for path in subject.files():
        what = special_file(path)
        if what is not None:  # named, never opened: a named pipe would block the reader
            out.append(("not a regular file", path, what))
            continue
        if not path.is_file():
            out.append(("missing file", path, "not found"))
            continue
        truncated = _gzip_truncated(path)
        if truncated:
            out.append(("truncated or corrupt file", path, truncated))
            continue
        try:
            img = nib.load(path)
            grids[path] = (tuple(img.shape), img.affine)
        except Exception as e:  # nibabel raises many kinds on a damaged header
            out.append(("unreadable volume", path, _reason(e)))
    for path, (shape, _) in grids.items():
        text = "x".join(map(str, shape))
        voxels = int(np.prod(shape[:3], dtype=np.int64))
        if 0 in shape:
            out.append(("volume of the wrong shape", path, f"an axis of length 0 (shape {text})"))
        elif voxels > MAX_VOXELS:
            out.append(
                (
                    "volume too large",
                    path,
                    f"its header claims {text} = {voxels:,} voxels per volume, more than the "
                    f"{MAX_VOXELS:,} (MAX_VOXELS) a subject may have; nothing was decoded",
                )
            )
    if out:
        return out
    lshape, laffine = grids[subject.label]
    if len(lshape) != 3:
        shape = "x".join(map(str, lshape))
        out.append(("volume of the wrong shape", subject.label, f"a label map is 3-D, not {shape}"))
    for ch in subject.channels:
        shape, affine = grids[ch.path]
        want = 4 if ch.index is not None else 3
        if len(shape) != want or (ch.index is not None and ch.index >= shape[3]):
            what = f"channel {ch.index} of a 4-D image" if ch.index is not None else "a 3-D volume"
            out.append(
                ("volume of the wrong shape", ch.path, f"expected {what}, found shape {shape}")
            )
            continue
        if shape[:3] != lshape[:3]:
            grid = f"{'x'.join(map(str, lshape[:3]))}, {ch.path.name} is {'x'.join(map(str, shape[:3]))}"
        elif not np.allclose(affine, laffine, rtol=1e-4, atol=1e-3):
            grid = f"its affine differs from {ch.path.name}'s"
        else:
            continue
        out.append(("label grid differs from image", subject.label, grid))
    return list(dict.fromkeys(out))


def _gzip_truncated(path: Path) -> str | None:
    """Why a ``.gz`` file cannot be whole. Its trailer records the uncompressed size mod 2^32,
    which the NIfTI header fixes: a whole file is confirmed without inflating it; a mismatch (a
    cut file ends inside the data) is confirmed by inflating."""
    if not path.name.endswith(".gz"):
        return None
    try:
        with open_regular(path, what="volume") as f:
            head = f.read(2)
            if head != b"\x1f\x8b":
                return "not a gzip file (the name ends in .gz)"
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
            f.seek(0)
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                header = g.read(352)
    except (OSError, EOFError, zlib.error, struct.error, UnreadableFile) as e:
        return _reason(e)
    expected = _nifti_bytes(header)
    if expected is None or isize == expected % 2**32:
        return None
    try:  # a file of several gzip members has its last member's size there: inflate to be sure
        with open_regular(path, what="volume") as f, gzip.GzipFile(fileobj=f, mode="rb") as g:
            while g.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error, UnreadableFile) as e:
        return f"ends early (cut download?): {_reason(e)}"
    return None


def _nifti_bytes(header: bytes) -> int | None:
    """Bytes of a NIfTI-1 file (header, extensions and voxels) from its first 352 bytes."""
    if len(header) < 352:
        return None
    for order in "<>":
        (sizeof_hdr,) = struct.unpack(order + "i", header[:4])
        if sizeof_hdr == 348:
            dim = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            vox_offset = struct.unpack(order + "f", header[108:112])[0]
            n = int(np.prod([max(d, 1) for d in dim[1 : 1 + max(dim[0], 0)]], dtype=np.int64))
            return int(vox_offset) + n * bitpix // 8
    return None  # NIfTI-2 or not NIfTI: nibabel's reading decides


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _normalise(volume: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
    """uint8 of a float32 volume clipped to the percentiles ``clip`` of its non-zero voxels (all
    voxels when none is zero) and scaled to 0-255; ``volume`` is overwritten."""
    inside = volume[volume != 0]
    if inside.size == 0:
        return np.zeros(volume.shape, np.uint8)
    lo, hi = np.percentile(inside, clip)
    del inside
    if hi <= lo:
        hi = lo + 1
    np.clip(volume, lo, hi, out=volume)  # in place: one float32 volume per thread, no more
    volume -= lo
    volume *= 255.0 / (hi - lo)
    np.rint(volume, out=volume)
    return volume.astype(np.uint8)


def _axial(volume: np.ndarray) -> np.ndarray:
    """(Z, H, W) slices of a RAS+ volume (X, Y, Z): rows run anterior to posterior, columns
    right to left of the patient, as radiology displays an axial slice."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0))[:, ::-1, ::-1])


def spill_subject(subject: Subject, opts: _Options) -> tuple[Spill | None, list]:
    """Decode a subject once and spill its chosen slices; returns (spill, problems). A spill made
    earlier from the same files and options is returned without decoding."""
    scratch = Path(opts.scratch)
    digest = _subject_digest(subject, opts)
    done = scratch / f"{subject.name}-{digest[:16]}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, UserError):
        spill = Spill(**read_json(done, MAX_RECORD_BYTES, "spill record"))
        if spill.digest == digest and all(
            _spilled(scratch / f"{spill.stem}.{part}.npy", spill) for part in ("image", "mask")
        ):
            return spill, []
    nib = _nib()
    problems = []
    try:
        seg_img = nib.as_closest_canonical(nib.load(subject.label))
        seg = np.asarray(seg_img.dataobj)
    except Exception as e:
        return None, [("unreadable volume", subject.label, _reason(e))]
    labels = seg
    if seg.dtype.kind == "f":
        labels = np.rint(seg).astype(np.int32)
        if not np.array_equal(labels, seg):
            problems.append(("unexpected label values", subject.label, "non-integer values"))
    values = set(np.unique(labels).tolist())
    if opts.allowed is not None and not values <= opts.allowed:
        bad = sorted(values - opts.allowed)
        problems.append(
            (
                "unexpected label values",
                subject.label,
                f"values {bad}; the dataset's labels are {sorted(opts.allowed)}",
            )
        )
    del seg
    target = labels > 0 if opts.target is None else np.isin(labels, opts.target)
    del labels
    volumes = []
    for ch in subject.channels:
        try:
            img = nib.as_closest_canonical(nib.load(ch.path))
            data = img.dataobj if ch.index is None else img.dataobj[..., ch.index]
            volume = np.array(data, dtype=np.float32)  # a private copy: normalised in place
        except Exception as e:
            problems.append(("unreadable volume", ch.path, _reason(e)))
            continue
        if not np.isfinite(volume).all():
            problems.append(("volume holds NaN or infinity", ch.path, "non-finite voxels"))
            continue
        volumes.append(_axial(_normalise(volume, opts.clip)))
        del volume
    if problems:
        return None, problems
    target_slices = _axial(target)
    del target
    images = np.stack(volumes, axis=-1)  # Z, H, W, C
    del volumes
    content = images.reshape(images.shape[0], -1).any(axis=1)
    holds = target_slices.reshape(target_slices.shape[0], -1).any(axis=1)
    name_seed = zlib.crc32(subject.name.encode())
    chosen = opts.slices.choose(holds, content, np.random.default_rng([opts.seed, name_seed]))
    spill = Spill(
        subject=subject.name,
        digest=digest,
        slices=[int(k) for k in chosen],
        abnormal=[bool(holds[k]) for k in chosen],
        shape=list(images.shape[1:3]),
        grade=subject.grade,
    )
    for part, array in (("image", images[chosen]), ("mask", target_slices[chosen])):
        with atomic_open(scratch / f"{spill.stem}.{part}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.uint8), allow_pickle=False)
    write_json(done, asdict(spill))  # last: the spill is complete
    return spill, []


def _spilled(path: Path, spill: Spill) -> bool:
    """Whether ``path`` is a regular ``.npy`` file holding the slices ``spill`` records (its
    header read, not its data): a damaged or foreign spill is decoded again."""
    if not is_regular_file(path):
        return False
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array.dtype == np.uint8 and array.shape[:3] == (len(spill.slices), *spill.shape)


# --- the adapters ---------------------------------------------------------------------------------


class VolumeSource:
    """Base of the NIfTI adapters: subclasses set ``kind`` and ``layout`` and implement ``scan``,
    ``looks_like`` and ``channel_names``."""

    kind = ""
    layout = ""
    allowed: frozenset[int] | None = None
    fixes = {
        "missing file": "download the subject again, or remove its folder",
        "truncated or corrupt file": "download the file again (it is incomplete)",
        "unreadable volume": "download the file again, or remove the subject",
        "volume of the wrong shape": "use the dataset's own files; check --modality",
        "label grid differs from image": "the label map must lie on its image's voxel grid "
        "(same shape and affine); download both again",
        "unexpected label values": "use the dataset's own label maps",
        "volume holds NaN or infinity": "download the file again, or remove the subject",
        "not a regular file": "replace it with the volume it stands for, or remove the subject "
        "(a named pipe, socket or device is never opened)",
        "volume too large": f"crop or resample it below {MAX_VOXELS:,} voxels, or remove the "
        "subject",
    }

    def __init__(
        self,
        root: str | os.PathLike,
        modality: str | None = None,
        target: str | None = None,
        slices: str = "lesion",
        clip: str | tuple = (0.5, 99.5),
        channels: int | str = "auto",
        resize: str = "squash",
        seed: int = 0,
    ) -> None:
        if resize not in RESIZE_POLICIES:
            raise UserError(
                f"--resize {resize!r} is unknown: choose {' or '.join(RESIZE_POLICIES)}"
            )
        self.root = Path(root)
        self.resize = resize
        self.slices = SlicePolicy.parse(slices)
        self.clip = parse_clip(clip)
        self.seed = int(seed)
        self.warnings: list[str] = []
        self._modality_arg = modality
        self._target_arg = target
        self._channels_arg = channels
        self._subjects: list[Subject] | None = None
        self._scan_problems = Problems(self.root, self.kind)
        self._spills: dict[str, Spill] = {}
        self._scratch: Path | None = None
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._skipped: list[tuple[Path, str]] = []

    # -- what a subclass provides ----------------------------------------------------------------

    def scan(self, problems: Problems) -> list[Subject]:
        """Every subject of the layout (file names only); layout problems go to ``problems``,
        files of the layout that no subject uses to :meth:`skip`."""
        raise NotImplementedError

    def skip(self, path: Path, why: str) -> None:
        """Record a file of the layout that no subject uses (named in one warning)."""
        self._skipped.append((path, why))

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        raise NotImplementedError

    def target_values(self) -> tuple[int, ...] | None:
        raise NotImplementedError

    # -- the Source protocol ---------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return len(self._modalities())

    def describe(self) -> dict:
        values = self.target_values()
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "modality": ",".join(self._modalities()),
            "target": self._target_arg or "default",
            "target_values": None if values is None else list(values),
            "slices": str(self.slices),
            "clip": list(self.clip),
            "channels": self.channels,
            "resize": self.resize,
            "orientation": "RAS+ axial, rows anterior to posterior",
        }

    def content_fingerprint(self) -> list:
        return [(s.name, _subject_digest(s, self._options())) for s in self.subjects()]

    def prepare(self, scratch: Path, workers: int = 1) -> None:
        """Check every subject's files, then decode each subject once into ``scratch`` (see the
        module's docstring). Raises one DataError naming every problem."""
        subjects = self.subjects()
        problems = self._scan_problems  # a partial layout and damaged files: one message
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for found in pool.map(check_header, subjects):
                for kind, path, reason in found:
                    problems.add(kind, f"{problems.rel(path)}: {reason}", self.fixes[kind])
        problems.raise_if_any()
        scratch.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(scratch)
        opts = self._options(scratch)
        spills: dict[str, Spill] = {}
        bar = tqdm(total=len(subjects), desc="reading volumes", unit="subject", file=sys.stderr,
                   disable=None, leave=False)  # fmt: skip
        with bar, ThreadPoolExecutor(max(1, workers)) as pool:
            for spill, found in pool.map(spill_subject, subjects, [opts] * len(subjects)):
                for kind, path, reason in found:
                    problems.add(kind, f"{problems.rel(path)}: {reason}", self.fixes[kind])
                if spill is not None:
                    spills[spill.subject] = spill
                bar.update(1)
        problems.raise_if_any()
        keep = {
            f"{s.stem}.{part}"
            for s in spills.values()
            for part in ("json", "image.npy", "mask.npy")
        }
        for p in scratch.iterdir():
            if p.name not in keep:  # spills of files or options no longer asked for
                p.unlink()
        self._spills, self._scratch, self._maps = spills, scratch, {}
        empty = [s.subject for s in spills.values() if not s.slices]
        if empty:
            self.warnings.append(
                f"{len(empty)} subject(s) gave no slice under --slices {self.slices} (no target "
                f"in their label map): {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}"
            )

    def entries(self) -> list[Entry]:
        if self._scratch is None:  # used outside ``pack``: spill to a private temporary folder
            scratch = Path(tempfile.mkdtemp(prefix=f"hpc_btunet-{self.kind}-"))
            weakref.finalize(self, shutil.rmtree, scratch, ignore_errors=True)
            self.prepare(scratch, workers=1)
        out = []
        for s in self.subjects():
            spill = self._spills[s.name]
            for k, abnormal in zip(spill.slices, spill.abnormal, strict=True):
                key = f"{sanitise_key(s.name)}_{k:03d}"
                out.append(Entry(key, s.name, True, "abnormal" if abnormal else "normal"))
        if not out:
            raise DataError(
                f"--source {self.kind}: no slice of {len(self._spills)} subject(s) holds the "
                f"target (--target {self._target_arg or 'default'}): check --target, or use "
                "--slices all"
            )
        return out

    def validate(self, entries: list[Entry]) -> None:
        """Nothing left to check: ``prepare`` read every file."""

    def load(self, entry: Entry, image_size: int) -> Sample:
        subject, k = entry.group, int(entry.key.rsplit("_", 1)[1])  # the group is the subject
        spill = self._spills[subject]
        j = spill.slices.index(k)
        image = np.array(self._map(spill, "image")[j])  # H, W, C
        mask = np.array(self._map(spill, "mask")[j])
        extra = {"subject": subject, "slice": k}
        if spill.grade:
            extra["grade"] = spill.grade
        if self.resize == "pad":
            h, w = mask.shape
            image, pad = pad_to_square(image)
            mask, _ = pad_to_square(mask)
            extra.update(size=[h, w], pad=list(pad))
        channels = [resize_image(np.ascontiguousarray(image[..., c]), image_size)
                    for c in range(image.shape[-1])]  # fmt: skip
        image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
        return Sample(entry.key, image, resize_mask(mask, image_size), entry.group, entry.label,
                      extra)  # fmt: skip

    # -- helpers ---------------------------------------------------------------------------------

    def subjects(self) -> list[Subject]:
        if self._subjects is None:
            if not self.root.is_dir():
                what = "is not a folder" if self.root.exists() else "does not exist"
                raise DataError(f"--source {self.kind}: --root {self.root} {what}")
            problems = Problems(self.root, self.kind)
            self._skipped = []
            subjects = self.scan(problems)
            if self._skipped:
                self.warnings.append(skipped_warning(self._skipped, self.root, self.kind))
            if not subjects:
                problems.raise_if_any()
                raise DataError(self._layout_message())
            self._scan_problems = problems  # raised by ``prepare`` with those of the files
            self._subjects = sorted(subjects, key=lambda s: s.name)
            self._modalities()  # checks --channels against --modality early
        return self._subjects

    def _modalities(self) -> list[str]:
        raise NotImplementedError

    def _check_channels(self, names: list[str]) -> None:
        wanted = self._channels_arg
        if len(names) > MAX_CHANNELS:
            raise UserError(
                f"--modality selects {len(names)} channels ({', '.join(names)}); at most "
                f"{MAX_CHANNELS} fit a sample: name the ones to keep, e.g. --modality {names[0]}"
            )
        if wanted != "auto" and int(wanted) != len(names):
            raise UserError(
                f"--channels {wanted} does not match --modality {','.join(names)} "
                f"({len(names)} channel(s)): leave --channels auto for volume sources"
            )

    def _options(self, scratch: Path | None = None) -> _Options:
        return _Options(self.target_values(), self.allowed, self.slices, self.clip, self.seed,
                        str(scratch or ""))  # fmt: skip

    def _map(self, spill: Spill, part: str) -> np.ndarray:
        key = (spill.subject, part)
        if key not in self._maps:
            assert self._scratch is not None
            self._maps[key] = np.load(self._scratch / f"{spill.stem}.{part}.npy", mmap_mode="r")
        return self._maps[key]

    def _layout_message(self) -> str:
        return layout_message(self.root, self.kind, self.layout)


def _nifti_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``.nii`` when there is such a name that is not a folder (a
    named pipe too: ``check_header`` names it as not a regular file)."""
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.exists() and not p.is_dir():
            return p
    return None


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith("._")


class BratsSource(VolumeSource):
    """BraTS: one folder per subject holding ``<subject>_<modality>.nii.gz`` and
    ``<subject>_seg.nii.gz``, below ``HGG/`` and ``LGG/`` (2018: the folder is the subject's
    grade, kept in its samples' JSON) or directly under the root (later years)."""

    kind = "brats"
    layout = (
        "one folder per subject holding <subject>_{t1,t1ce,t2,flair,seg}.nii.gz, under HGG/ and "
        "LGG/ (BraTS 2018) or directly under the root (BraTS20XX_<n>/ of later years)"
    )
    allowed = BRATS_LABELS

    def _modalities(self) -> list[str]:
        names = [m.strip().lower() for m in (self._modality_arg or "flair").split(",")]
        unknown = [m for m in names if m not in BRATS_MODALITIES]
        if unknown or len(set(names)) != len(names):
            raise UserError(
                f"--modality {self._modality_arg!r}: choose one or more (comma-separated, no "
                f"repeats) of {', '.join(BRATS_MODALITIES)}"
            )
        self._check_channels(names)
        return names

    def target_values(self) -> tuple[int, ...] | None:
        target = (self._target_arg or "wt").lower()
        if target in BRATS_TARGETS:
            return BRATS_TARGETS[target]
        return _parse_values(target, "wt, tc, et or a label value (1, 2, 4)", None, BRATS_LABELS)

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        return bool(_brats_folders(root, depth=3, limit=1))

    def scan(self, problems: Problems) -> list[Subject]:
        mods = self._modalities()
        subjects = []
        for folder, grade in _brats_folders(self.root, depth=3):
            missing, channels = [], []
            for mod in mods:
                path = _nifti_file(folder, f"{folder.name}_{mod}")
                (channels.append(Channel(path)) if path else missing.append(mod))
            label = _nifti_file(folder, f"{folder.name}_seg")
            if label is None:
                missing.append("seg")
            if missing:
                problems.add(
                    "subject missing a modality",
                    f"{problems.rel(folder)}/: no {', '.join(f'{folder.name}_{m}.nii.gz' for m in missing)}",
                    "download the subject again, or remove its folder (validation and test sets "
                    "have no seg files: pack the training data)",
                )
                continue
            subjects.append(Subject(folder.name, tuple(channels), label, grade))
            known = {f"{folder.name}_{m}{x}" for m in (*BRATS_MODALITIES, "seg")
                     for x in NIFTI_SUFFIXES}  # fmt: skip
            for path in sorted(folder.iterdir()):
                if path.name not in known:
                    self.skip(path, f"not {folder.name}_<modality or seg>.nii.gz")
        return subjects


def _brats_folders(
    root: Path, depth: int, limit: int | None = None
) -> list[tuple[Path, str | None]]:
    """(folder, grade) of every subject folder within ``depth`` levels of ``root``: a folder
    holding a ``<folder>_<modality or seg>.nii[.gz]`` file."""
    found: list[tuple[Path, str | None]] = []

    def walk(folder: Path, level: int, grade: str | None) -> None:
        try:
            children = sorted(
                p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        except OSError:
            return
        for child in children:
            if limit is not None and len(found) >= limit:
                return
            if any(_nifti_file(child, f"{child.name}_{m}") for m in (*BRATS_MODALITIES, "seg")):
                found.append((child, grade))
            elif level < depth:
                walk(child, level + 1, child.name if child.name in ("HGG", "LGG") else grade)

    walk(root, 1, None)
    return found


class DecathlonSource(VolumeSource):
    """The Medical Segmentation Decathlon layout: ``dataset.json`` with ``modality`` (or nnU-Net
    v2's ``channel_names``) and ``labels``; ``imagesTr/<case>.nii.gz`` (3-D, or 4-D with one
    channel per modality) or ``imagesTr/<case>_<4 digits>.nii.gz`` (one file per channel); and
    ``labelsTr/<case>.nii.gz``. ``imagesTs`` has no labels and is not packed."""

    kind = "decathlon"
    layout = "dataset.json, imagesTr/ and labelsTr/ (the Medical Segmentation Decathlon layout)"

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        return (root / "dataset.json").is_file() or (root / "imagesTr").is_dir()

    def _meta(self) -> dict:
        if not hasattr(self, "_meta_cache"):
            path = self.root / "dataset.json"
            if not path.exists():
                raise DataError(self._layout_message())
            fix = "download the dataset again"
            try:
                meta = read_json(path, MAX_RECORD_BYTES, "dataset.json", fix)
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except UnreadableFile as e:
                why = str(e).removeprefix(f"{path} ").removesuffix(f": {fix}")
                raise DataError(
                    f"--source decathlon: {path} is not readable JSON (it {why}): {fix}"
                ) from None
            except (OSError, ValueError) as e:
                raise DataError(
                    f"--source decathlon: {path} is not readable JSON ({_reason(e)}): {fix}"
                ) from None
            self._meta_cache = meta
        return self._meta_cache

    def _channel_names(self) -> list[str]:
        meta = self._meta()
        names = meta.get("channel_names") or meta.get("modality") or {"0": "image"}
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (ValueError, TypeError, AttributeError):
            raise DataError(
                f"--source decathlon: {self.root / 'dataset.json'}: 'modality' must map channel "
                "numbers to names"
            ) from None

    def _label_names(self) -> dict[str, int]:
        labels = self._meta().get("labels") or {}
        out = {}
        with contextlib.suppress(AttributeError, ValueError, TypeError):
            for k, v in labels.items():
                if str(k).isdigit():  # MSD: {"0": "background", "1": "edema"}
                    out[str(v).lower()] = int(k)
                elif isinstance(v, int):  # nnU-Net v2: {"background": 0, "tumor": 1}
                    out[str(k).lower()] = v
        return out

    def _modalities(self) -> list[str]:
        names = self._channel_names()
        if not self._modality_arg:
            chosen = names
        else:
            chosen = []
            for part in self._modality_arg.split(","):
                part = part.strip()
                match = [n for i, n in enumerate(names) if part.lower() in (n.lower(), str(i))]
                if not match:
                    raise UserError(
                        f"--modality {part!r} is not a channel of this dataset: choose among "
                        f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}"
                    )
                chosen.append(match[0])
        self._check_channels(chosen)
        return chosen

    def target_values(self) -> tuple[int, ...] | None:
        if not self._target_arg:
            return None
        return _parse_values(
            self._target_arg, "a label value or name", self._label_names(), self.allowed
        )

    @property
    def allowed(self) -> frozenset[int] | None:  # type: ignore[override]
        values = set(self._label_names().values())
        return frozenset(values | {0}) if values else None

    def scan(self, problems: Problems) -> list[Subject]:
        meta = self._meta()
        images, labels = self.root / "imagesTr", self.root / "labelsTr"
        if not images.is_dir() or not labels.is_dir():
            raise DataError(self._layout_message())
        names = self._channel_names()
        indices = [names.index(m) for m in self._modalities()]
        cases = sorted(
            p.name[: -len(suffix)]
            for p in labels.iterdir()
            if _is_nifti(p)
            for suffix in NIFTI_SUFFIXES
            if p.name.endswith(suffix)
        )
        listed = {Path(str(t.get("label", ""))).name for t in meta.get("training") or []
                  if isinstance(t, dict)}  # fmt: skip
        subjects = []
        for case in cases:
            label = _nifti_file(labels, case)
            assert label is not None
            whole = _nifti_file(images, case)
            if whole is not None:
                channels = tuple(Channel(whole, i if len(names) > 1 else None) for i in indices)
            else:
                per = [_nifti_file(images, f"{case}_{i:04d}") for i in indices]
                if None in per:
                    absent = [f"{case}_{i:04d}" for i, p in zip(indices, per, strict=True) if not p]
                    expected = case if len(names) == 1 and not any(per) else ", ".join(absent)
                    problems.add(
                        "image missing for a label",
                        f"labelsTr/{label.name}: no imagesTr/{expected} (.nii.gz)",
                        "download the dataset again, or remove the label file",
                    )
                    continue
                channels = tuple(Channel(p) for p in per if p is not None)
            subjects.append(Subject(case, channels, label))
        used = {c.path for subject in subjects for c in subject.channels}
        used |= {subject.label for subject in subjects}
        for folder in (images, labels):
            for path in sorted(folder.iterdir()):
                if path in used:
                    continue
                if path.name.startswith("._"):
                    self.skip(path, "a macOS resource fork")
                elif folder == images and _is_nifti(path):
                    self.skip(path, "an image without its label in labelsTr/")
                else:
                    self.skip(path, "not a case's volume")
        label_files = {_nifti_name(c) for c in cases} | {p.name for p in labels.iterdir()}
        for name in sorted(listed - label_files):
            problems.add(
                "listed in dataset.json but absent",
                f"labelsTr/{name}",
                "download the dataset again (a partial download)",
            )
        ignored = [p.name for p in (self.root / "imagesTs").glob("*") if _is_nifti(p)] if (
            self.root / "imagesTs").is_dir() else []  # fmt: skip
        if ignored:
            self.warnings.append(f"imagesTs/ ({len(ignored)} volumes) has no labels: not packed")
        return subjects


def _nifti_name(case: str) -> str:
    return f"{case}.nii.gz"


ADAPTERS: dict[str, type[VolumeSource]] = {"brats": BratsSource, "decathlon": DecathlonSource}
