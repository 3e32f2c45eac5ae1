"""Adapters for the public 2-D datasets, read in the layouts they are downloaded in.

``kdsb18`` (Data Science Bowl 2018), ``isic2018`` (ISIC 2018 Task 1), ``busi`` (Breast Ultrasound
Images) and ``busis`` (the 562-image breast ultrasound benchmark). Each adapter only *lists* its
layout (``scan``): which image goes with which mask files, the sample's key, group and image-level
label. What they share lives in :class:`PairedSource`: the layout check with a message that says
what was expected and what was found (and which ``--source`` the folder looks like), reading
every file before anything is written, the union of several mask files, the channels, and the
resize policy (``squash`` to S x S as the paper does, or ``pad`` to a square first, keeping the
aspect ratio; the padding is recorded in the sample's JSON member).

No adapter downloads anything: the README says where each dataset comes from and its licence.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpc_btunet.data.folder import sanitise_key
from hpc_btunet.data.imageio import (
    RESIZE_POLICIES,
    ImageReadError,
    is_colour,
    is_image_file,
    pad_to_square,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    special_file,
    to_channels,
    to_uint8,
)
from hpc_btunet.data.sample import Entry, Sample
from hpc_btunet.errors import DataError, UserError
from hpc_btunet.readers import MB, UnreadableFile, read_text

MAX_LISTED = 20  # offending files listed per kind of problem; the rest are counted
PROGRESS_MIN = 200  # files to validate before a progress bar is worth showing
MAX_SOLUTION_BYTES = 256 * MB  # KDSB18's stage1_solution.csv is a few MB


@dataclass(frozen=True)
class Item:
    """One sample of a layout: its image, the mask files whose union is its mask (none and
    ``labelled``: an empty mask), or run-length encoded masks (``rle``, KDSB18's solution file)."""

    key: str
    image: Path
    masks: tuple[Path, ...] = ()
    group: str = ""
    label: str | None = None
    labelled: bool = True
    rle: tuple[str, ...] = ()


def printable(name: str) -> str:
    """``name`` as it may appear in a message: quoted with escapes (``'a\\nb'``) when it holds
    a line break or another control character, so that one problem stays one line."""
    return name if name.isprintable() else ascii(name)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


class Problems:
    """Problems of a dataset by kind, each kind with its fix, raised together as one DataError."""

    def __init__(self, root: Path, source: str) -> None:
        self.root, self.source = root, source
        self.lines: dict[str, list[str]] = defaultdict(list)
        self.fixes: dict[str, str] = {}

    def add(self, kind: str, line: str, fix: str) -> None:
        self.lines[kind].append(line)
        self.fixes[kind] = fix

    def rel(self, path: Path) -> str:
        return printable(_relative(path, self.root))

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        total = sum(len(v) for v in self.lines.values())
        out = [f"--source {self.source}: {self.root} is not usable ({total} problem(s)):"]
        for kind, lines in self.lines.items():
            out.append(f"- {kind} ({len(lines)}). Fix: {self.fixes[kind]}")
            out += [f"    {line}" for line in lines[:MAX_LISTED]]
            if len(lines) > MAX_LISTED:
                out.append(f"    ... and {len(lines) - MAX_LISTED} more")
        raise DataError("\n".join(out))


class PairedSource:
    """Base of the 2-D adapters: subclasses set ``kind`` and ``layout`` (the expected layout in
    words) and implement ``scan`` and ``looks_like``."""

    kind = ""
    layout = ""

    def __init__(
        self, root: str | os.PathLike, channels: int | str = "auto", resize: str = "squash"
    ) -> None:
        if isinstance(channels, bool) or channels not in (1, 3, "auto"):
            raise UserError(f"--channels must be 1, 3 or auto, got {channels!r}")
        if resize not in RESIZE_POLICIES:
            raise UserError(
                f"--resize {resize!r} is unknown: choose {' or '.join(RESIZE_POLICIES)}"
            )
        self.root = Path(root)
        self.resize = resize
        self.warnings: list[str] = []
        self._skipped: list[tuple[Path, str]] = []  # (file, why) the last scan did not use
        self._channels: int | None = None if channels == "auto" else int(channels)
        self._items: dict[str, Item] = {}

    # -- what a subclass provides ----------------------------------------------------------------

    def scan(self, problems: Problems) -> list[Item]:
        """Every sample of the layout under ``self.root`` (file names only, nothing decoded);
        layout problems go to ``problems``, files inside the layout that it does not use to
        :meth:`skip`."""
        raise NotImplementedError

    def skip(self, path: Path, why: str) -> None:
        """Record a file (or folder) of the layout that no sample uses: ``entries`` names them
        all in one warning, so that nothing is left out silently."""
        self._skipped.append((path, why))

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """Whether ``root`` has this adapter's layout, by a cheap look at its top folders."""
        raise NotImplementedError

    # -- the Source protocol ---------------------------------------------------------------------

    @property
    def channels(self) -> int:
        if self._channels is None:
            self.entries()
        assert self._channels is not None
        return self._channels

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "channels": self.channels,
            "resize": self.resize,
        }

    def content_fingerprint(self) -> list:
        """(path, size, mtime) of every file, so that a resumed pack never reuses shards made
        from files that changed since."""
        if not self._items:
            self.entries()
        out = []
        for key, item in sorted(self._items.items()):
            for path in (item.image, *item.masks):
                st = path.stat()
                out.append((key, self._rel(path), st.st_size, st.st_mtime_ns))
        return out

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DataError(f"--source {self.kind}: --root {self.root} {what}")
        problems = Problems(self.root, self.kind)
        self._skipped, self.warnings = [], []
        items = self.scan(problems)
        for item in items:  # named before any of them is opened: a named pipe would block
            for path in (item.image, *item.masks):
                what = special_file(path)
                if what is not None:
                    problems.add(
                        "not a regular file",
                        f"{problems.rel(path)}: {what}",
                        "replace it with the image file it stands for, or remove the sample (a "
                        "named pipe, socket or device is never opened)",
                    )
        problems.raise_if_any()
        if self._skipped:
            self.warnings.append(skipped_warning(self._skipped, self.root, self.kind))
        if not items:
            raise DataError(self._layout_message())
        by_key: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            by_key[item.key].append(item)
        for key, same in by_key.items():
            if len(same) > 1:
                names = ", ".join(problems.rel(i.image) for i in same)
                problems.add(
                    "duplicate sample name",
                    f"{names} (all named {key!r})",
                    "remove the copies: each image may appear once",
                )
        problems.raise_if_any()
        self._items = {i.key: i for i in items}
        if self._channels is None:
            with ThreadPoolExecutor() as pool:
                colour = list(pool.map(_header_is_colour, [i.image for i in items]))
            self._channels = 3 if any(colour) else 1
        return [
            Entry(key=i.key, group=i.group or i.key, has_mask=i.labelled, label=i.label)
            for i in items
        ]

    def validate(self, entries: list[Entry]) -> None:
        """Decode every image and mask file; one DataError names every unreadable file and every
        mask whose height x width differs from its image's."""
        problems = Problems(self.root, self.kind)
        items = [self._item(e) for e in entries]
        with ThreadPoolExecutor() as pool:
            checked = tqdm(
                pool.map(_check_item, items),
                total=len(items),
                desc="validating",
                unit="sample",
                file=sys.stderr,
                disable=len(items) <= PROGRESS_MIN,
            )
            for found in checked:
                for kind, path, reason in found:
                    problems.add(kind, f"{problems.rel(path)}: {reason}", _FIXES[kind])
        problems.raise_if_any()

    def load(self, entry: Entry, image_size: int) -> Sample:
        item = self._item(entry)
        image = to_uint8(to_channels(read_image(item.image), self.channels))
        mask = _mask_of(item, image.shape[:2]) if item.labelled else None
        extra = None
        if self.resize == "pad":
            h, w = image.shape[:2]
            image, pad = pad_to_square(image)
            if mask is not None:
                mask, _ = pad_to_square(mask)
            extra = {"size": [h, w], "pad": list(pad)}  # top, bottom, left, right
        image = resize_image(image, image_size)
        mask = None if mask is None else resize_mask(mask, image_size)
        return Sample(entry.key, image, mask, entry.group, entry.label, extra)

    # -- helpers ---------------------------------------------------------------------------------

    def _item(self, entry: Entry) -> Item:
        if not self._items:
            self.entries()
        return self._items[entry.key]

    def _rel(self, path: Path) -> str:
        return _relative(path, self.root)

    def _layout_message(self) -> str:
        return layout_message(self.root, self.kind, self.layout)


def layout_message(root: Path, kind: str, layout: str) -> str:
    """The wrong-layout error: what was expected, what was found, and which source it looks like."""
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
    return (
        f"--source {kind}: {root} does not hold the {kind} layout. Expected {layout}; found "
        f"{shown or 'an empty folder'}{layout_hint(root, kind)}"
    )


def layout_hint(root: Path, kind: str) -> str:
    """ "; it looks like --source X" for the other adapters whose layout ``root`` has, or ""."""
    from hpc_btunet.data.volume import ADAPTERS as VOLUME_ADAPTERS

    guess = []
    for name, cls in {**ADAPTERS, **VOLUME_ADAPTERS}.items():
        if name != kind:
            with contextlib.suppress(OSError):
                if cls.looks_like(root):
                    guess.append(name)
    return f"; it looks like --source {' or '.join(guess)}" if guess else ""


SKIPPED_LISTED = 10  # skipped files named in the warning; the rest are counted


def skipped_warning(skipped: list[tuple[Path, str]], root: Path, kind: str) -> str:
    """One line naming the files of a layout that no sample uses, and why."""
    shown = ", ".join(
        f"{printable(_relative(p, root))} ({why})" for p, why in skipped[:SKIPPED_LISTED]
    )
    more = f" (+{len(skipped) - SKIPPED_LISTED} more)" if len(skipped) > SKIPPED_LISTED else ""
    return (
        f"skipped {len(skipped)} file(s) of {root} that --source {kind} does not use: {shown}{more}"
    )


_FIXES = {
    "unreadable image": "download the file again, or remove the sample",
    "unreadable mask": "download the file again, or remove the sample",
    "mask size differs from image": "the mask must have its image's height x width; "
    "download both again",
    "bad run-length mask": "the solution file's run-length encoding must fit its image; "
    "download it again, or remove the file to pack the images without masks",
}


def _header_is_colour(path: Path) -> bool:
    try:
        return is_colour(path)
    except ImageReadError:
        return False  # validate() names the file


def _check_item(item: Item) -> list[tuple[str, Path, str]]:
    """(kind, file, reason) of every problem of one sample."""
    out = []
    try:
        hw = read_image(item.image).shape[:2]
    except ImageReadError as e:
        return [("unreadable image", item.image, e.reason)]
    for path in item.masks:
        try:
            mhw = read_image(path).shape[:2]
        except ImageReadError as e:
            out.append(("unreadable mask", path, e.reason))
            continue
        if mhw != hw:
            out.append(
                (
                    "mask size differs from image",
                    path,
                    f"{mhw[0]}x{mhw[1]}, its image {item.image.name} is {hw[0]}x{hw[1]}",
                )
            )
    for code in item.rle:
        try:
            decode_rle(code, hw)
        except ValueError as e:
            out.append(("bad run-length mask", item.image, str(e)))
            break
    return out


def _mask_of(item: Item, hw: tuple[int, int]) -> np.ndarray:
    """The union of a sample's mask files (or run-length masks), uint8 {0, 1}, HxW."""
    mask = np.zeros(hw, np.uint8)
    for path in item.masks:
        one = read_mask(path)
        if one.shape != hw:
            raise DataError(f"{path}: mask is {one.shape}, its image {item.image} is {hw}")
        mask |= one
    for code in item.rle:
        mask |= decode_rle(code, hw)
    return mask


def decode_rle(code: str, hw: tuple[int, int]) -> np.ndarray:
    """A Kaggle run-length mask ("start length ..." pairs, 1-based, pixels numbered down the
    columns) as uint8 {0, 1} of shape ``hw``."""
    h, w = hw
    values = code.split()
    if len(values) % 2:
        raise ValueError("an odd number of run-length values")
    try:
        runs = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        raise ValueError("run-length values that are not integers") from None
    flat = np.zeros(h * w, np.uint8)
    for start, length in runs:
        if start < 1 or length < 0 or start - 1 + length > h * w:
            raise ValueError(f"run {start} {length} falls outside a {h}x{w} image")
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(w, h).T


# --- KDSB18 ----------------------------------------------------------------------------------------


class Kdsb18Source(PairedSource):
    """Data Science Bowl 2018: ``<id>/images/<id>.png`` with ``<id>/masks/*.png`` (one nucleus per
    file; the mask is their union). ``--root`` is a ``stage1_train`` (or ``stage1_test``) folder,
    or the folder holding them; ``stage1_test`` images are labelled from ``stage1_solution.csv``
    beside them when it is there, else packed unlabelled (pre-training data)."""

    kind = "kdsb18"
    layout = (
        "stage1_train/<id>/images/<id>.png and stage1_train/<id>/masks/*.png (or --root pointing at "
        "stage1_train itself)"
    )

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        if (root / "stage1_train").is_dir():
            return True
        return any((sub / "images" / f"{sub.name}.png").exists() for sub in _subfolders(root)[:5])

    def scan(self, problems: Problems) -> list[Item]:
        parts = [
            root for name in ("stage1_train", "stage1_test") if (root := self.root / name).is_dir()
        ]
        solution = self._solution(problems)
        items = []
        for part in parts or [self.root]:
            items += self._scan_part(part, solution, problems)
        return items

    def _solution(self, problems: Problems) -> dict[str, list[str]]:
        """ImageId -> run-length masks of ``stage1_solution.csv`` (beside the folders), if any."""
        for where in (self.root, self.root.parent):
            path = where / "stage1_solution.csv"
            if path.exists() and not path.is_dir():  # a named pipe too: refused by name below
                break
        else:
            return {}
        out: dict[str, list[str]] = defaultdict(list)
        try:
            text = read_text(path, MAX_SOLUTION_BYTES, "solution file")
            with io.StringIO(text, newline="") as f:
                reader = csv.DictReader(f)
                if not {"ImageId", "EncodedPixels"} <= set(reader.fieldnames or ()):
                    raise ValueError(f"columns {reader.fieldnames}, need ImageId and EncodedPixels")
                for row in reader:
                    out[row["ImageId"]].append(row["EncodedPixels"])
        except (OSError, ValueError, csv.Error, UnreadableFile) as e:
            problems.add(
                "unreadable solution file",
                f"{problems.rel(path)}: {str(e).removeprefix(f'{path} ')}",
                "download stage1_solution.csv again, or remove it to pack stage1_test unlabelled",
            )
        return out

    def _scan_part(self, part: Path, solution: dict, problems: Problems) -> list[Item]:
        items, unlabelled = [], []
        subs = _subfolders(part)
        for other in _entries(part):
            if other not in subs:
                self.skip(other, "not a sample folder")
        for sub in subs:
            image = sub / "images" / f"{sub.name}.png"
            if not image.exists():
                if (sub / "images").is_dir() or (sub / "masks").is_dir():
                    problems.add(
                        "missing image",
                        f"{problems.rel(image)}",
                        "each <id>/images/ holds <id>.png: download the sample again",
                    )
                else:
                    self.skip(sub, "no images/ or masks/ inside")
                continue
            for other in _entries(sub / "images"):
                if other != image:
                    self.skip(other, f"not {sub.name}.png")
            found = _entries(sub / "masks")
            masks = tuple(p for p in found if is_image_file(p) and not p.is_dir())
            for other in found:
                if other not in masks:
                    self.skip(other, "not an image file")
            rle = tuple(solution.get(sub.name, ()))
            item = Item(sanitise_key(sub.name), image, masks, rle=rle)
            if not masks and not rle:
                unlabelled.append(item)
            items.append(item)
        if unlabelled and len(unlabelled) < len(items):  # some have masks: the others lack them
            for item in unlabelled:
                problems.add(
                    "missing masks",
                    f"{problems.rel(item.image.parent.parent)}/masks/",
                    "every sample of a labelled folder needs its masks/*.png: download it again",
                )
        if unlabelled and len(unlabelled) == len(items):  # stage1_test without a solution
            items = [Item(i.key, i.image, labelled=False) for i in items]
            self.warnings.append(
                f"{problems.rel(part) or part.name}: {len(items)} images without masks, packed "
                "unlabelled (for pre-training)"
            )
        return items


# --- ISIC 2018 -------------------------------------------------------------------------------------

_ISIC_INPUT = re.compile(r"^ISIC2018_Task1-2_(Training|Validation|Test)_Input$")
_ISIC_TRUTH = "ISIC2018_Task1_{}_GroundTruth"
_ISIC_IMAGE = re.compile(r"^(ISIC_\d{7})\.jpe?g$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d{7})_segmentation\.png$", re.IGNORECASE)


class Isic2018Source(PairedSource):
    """ISIC 2018 Task 1: ``ISIC2018_Task1-2_<Part>_Input/ISIC_<7 digits>.jpg`` with
    ``ISIC2018_Task1_<Part>_GroundTruth/ISIC_<id>_segmentation.png``, for the parts Training,
    Validation and Test that are present; a part without its ground-truth folder is packed
    unlabelled. Other files (licence, attribution, superpixel PNGs) are ignored."""

    kind = "isic2018"
    layout = (
        "ISIC2018_Task1-2_Training_Input/ISIC_<7 digits>.jpg and "
        "ISIC2018_Task1_Training_GroundTruth/ISIC_<7 digits>_segmentation.png (Validation and "
        "Test parts optional)"
    )

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        return any(_ISIC_INPUT.match(p.name) for p in _subfolders(root))

    def scan(self, problems: Problems) -> list[Item]:
        items = []
        for folder in _subfolders(self.root):
            match = _ISIC_INPUT.match(folder.name)
            if not match:
                continue
            truth = self.root / _ISIC_TRUTH.format(match.group(1))
            images = {}
            for p in _entries(folder):
                m = _ISIC_IMAGE.fullmatch(p.name)
                (images.__setitem__(m.group(1), p) if m else self.skip(p, "not ISIC_<id>.jpg"))
            if not truth.is_dir():
                items += [Item(k, p, labelled=False) for k, p in images.items()]
                if images:
                    self.warnings.append(
                        f"{folder.name}: no {truth.name} beside it, {len(images)} images packed "
                        "unlabelled"
                    )
                continue
            masks = {}
            for p in _entries(truth):
                m = _ISIC_MASK.fullmatch(p.name)
                (masks.__setitem__(m.group(1), p) if m else self.skip(p, "not a mask name"))
            for key, path in images.items():
                if key not in masks:
                    problems.add(
                        "missing mask",
                        f"{problems.rel(path)}: no {truth.name}/{key}_segmentation.png",
                        "download the ground-truth archive of that part again",
                    )
                    continue
                items.append(Item(key, path, (masks[key],)))
            for key in sorted(set(masks) - set(images)):
                self.skip(masks[key], "a mask without its image")
        return items


# --- BUSI --------------------------------------------------------------------------------------------

BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_FILE = re.compile(r"(?P<stem>.+?)(?P<mask>_mask(?:_(?P<n>\d+))?)?", re.DOTALL)


class BusiSource(PairedSource):
    """BUSI: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/<class> (<n>).png`` with masks
    ``<class> (<n>)_mask.png`` and ``_mask_1.png``, ``_mask_2.png``, ... (their union). A
    ``normal`` image's mask is empty. The class folder is the sample's image-level label."""

    kind = "busi"
    layout = (
        "Dataset_BUSI_with_GT/{benign,malignant,normal}/<class> (<n>).png with "
        "<class> (<n>)_mask.png (or --root pointing at Dataset_BUSI_with_GT)"
    )

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        base = root / "Dataset_BUSI_with_GT"
        base = base if base.is_dir() else root
        return any((base / c).is_dir() for c in BUSI_CLASSES)

    def scan(self, problems: Problems) -> list[Item]:
        base = self.root / "Dataset_BUSI_with_GT"
        base = base if base.is_dir() else self.root
        for other in _entries(base):
            if other.name not in BUSI_CLASSES:
                why = "not a class folder" if other.is_dir() else "not in a class folder"
                self.skip(other, f"{why} ({', '.join(BUSI_CLASSES)})")
        items = []
        for label in BUSI_CLASSES:
            folder = base / label
            if not folder.is_dir():
                continue
            images: dict[str, Path] = {}
            masks: dict[str, list[Path]] = defaultdict(list)
            for path in _entries(folder):
                m = _BUSI_FILE.fullmatch(path.stem)
                if not is_image_file(path) or path.is_dir() or m is None:
                    self.skip(path, "not an image file")
                    continue
                (
                    masks[m["stem"]].append(path)
                    if m["mask"]
                    else images.__setitem__(m["stem"], path)
                )
            for stem, path in images.items():
                found = tuple(masks.get(stem, ()))
                if not found and label != "normal":
                    problems.add(
                        "missing mask",
                        f"{problems.rel(path)}: no {stem}_mask.png",
                        "download the dataset again (benign and malignant images all have masks)",
                    )
                    continue
                key = sanitise_key(stem).strip("_")
                items.append(Item(re.sub("_+", "_", key), path, found, label=label))
            for stem in sorted(set(masks) - set(images)):
                for path in masks[stem]:
                    self.skip(path, "a mask without its image")
        return items


# --- BUSIS ---------------------------------------------------------------------------------------

_BUSIS_IMAGES = ("org", "original", "images", "img")
_BUSIS_MASKS = ("gt", "ground_truth", "groundtruth", "masks")


class BusisSource(PairedSource):
    """BUSIS (562 images): ``org/<id>.<ext>`` with ``gt/<id>_GT.<ext>`` (any image suffix;
    folder names matched case-insensitively, also ``original/`` and ``GT/``), or both kinds of file
    in one folder."""

    kind = "busis"
    layout = "org/<id>.<ext> with gt/<id>_GT.<ext> (or <id>.<ext> beside <id>_GT.<ext>)"

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        folders = {p.name.lower() for p in _subfolders(root)}
        if folders & set(_BUSIS_IMAGES) and folders & set(_BUSIS_MASKS):
            return True
        return any(p.stem.endswith("_GT") for p in root.iterdir() if is_image_file(p))

    def scan(self, problems: Problems) -> list[Item]:
        folders = {p.name.lower(): p for p in _subfolders(self.root)}
        image_dir = next((folders[n] for n in _BUSIS_IMAGES if n in folders), self.root)
        mask_dir = next((folders[n] for n in _BUSIS_MASKS if n in folders), self.root)
        masks = {
            p.stem[: -len("_GT")]: p
            for p in _entries(mask_dir)
            if is_image_file(p) and p.stem.endswith("_GT") and not p.is_dir()
        }
        used = set(masks.values())
        items = []
        for path in _entries(image_dir):
            if path.stem.endswith("_GT") and path in used:
                continue
            if not is_image_file(path) or path.is_dir() or path.stem.endswith("_GT"):
                if path.parent != self.root or not path.is_dir():
                    self.skip(path, "not an image file")
                continue
            if path.stem not in masks:
                problems.add(
                    "missing mask",
                    f"{problems.rel(path)}: no {problems.rel(mask_dir / path.stem)}_GT.<ext>",
                    "download the dataset again, or remove the image",
                )
                continue
            items.append(Item(sanitise_key(path.stem), path, (masks[path.stem],)))
        images = {i.image.stem for i in items}
        for stem in sorted(set(masks) - images):
            self.skip(masks[stem], "a mask without its image")
        if mask_dir != image_dir:
            for path in _entries(mask_dir):
                if path not in used:
                    self.skip(path, "not a mask name (<id>_GT.<ext>)")
        return items


def _entries(folder: Path) -> list[Path]:
    """Everything directly in ``folder``, sorted ([] when it cannot be listed)."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _subfolders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


ADAPTERS: dict[str, type[PairedSource]] = {
    "kdsb18": Kdsb18Source,
    "isic2018": Isic2018Source,
    "busi": BusiSource,
    "busis": BusisSource,
}
