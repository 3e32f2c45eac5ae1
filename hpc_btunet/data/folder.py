"""A dataset stored as two folders, ``images/`` and ``masks/``, whose files match by stem.

Every problem a user can cause in such a folder becomes one line of one ``DataError``, never a
traceback: that includes symbolic links that loop or point nowhere (an image-named link in
``images/`` or ``masks/``, or either folder itself), files or folders that cannot be read, and
named pipes, sockets or devices under an image's name (named when listed, never opened).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from hpc_btunet.data.imageio import (
    IMAGE_SUFFIXES,
    ImageReadError,
    is_colour,
    is_image_file,
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

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_LISTED = 50  # offenders listed per kind of problem; the rest are counted
PROGRESS_MIN = 200  # files to validate before a progress bar is worth showing

# Kinds of problem in the order they are reported, each with how to fix it. The "{...}" fields are
# filled from the source's options.
_FIXES = {
    "missing folder": "create it: images go in <root>/images/, masks in <root>/masks/"
    " (pass --unlabelled when there are no masks)",
    "unusable folder": "images/ and masks/ must be folders (or links to folders) that can be"
    " listed: fix or remove the link, or give read and execute permission",
    "no images": "put the images directly in images/ (sub-folders are not searched) with one of the"
    " suffixes " + " ".join(sorted(IMAGE_SUFFIXES)),
    "duplicate name": "rename or remove all but one file of each set: a sample is named by its file"
    " stem, with every character outside A-Z a-z 0-9 _ - replaced by _, so names must differ by"
    " more than their extension or punctuation",
    "several masks for one image": "keep one mask per image in masks/",
    "missing mask": "add masks/<image stem>{mask_suffix}.png (any image suffix) for each image,"
    " or pass --unlabelled to pack images without masks{orphan_note}",
    "name does not match group_regex": "rename the files or change --group-regex '{group_regex}'"
    " so that it matches every image stem (its first group names the patient or slide)",
    "not a regular file": "replace it with the image file it stands for, or remove it (a named"
    " pipe, socket or device is never opened: reading one would block or never end)",
    "inaccessible file": "fix or remove the link when it loops or points nowhere, give read"
    " permission to a file that lacks it (chmod a+r), or remove the file",
    "unreadable image": "re-export or remove the file",
    "unreadable mask": "re-export or remove the file",
    "mask size differs from image": "resize the mask to its image's size (height x width)",
}


def sanitise_key(stem: str) -> str:
    """The sample key for a file stem: every character outside ``[A-Za-z0-9_-]`` becomes ``_``."""
    return _KEY_UNSAFE.sub("_", stem)


@dataclass(frozen=True)
class _Files:
    image: Path
    mask: Path | None


class _Read(NamedTuple):
    """What reading one file found: its (height, width), or the kind of problem and why."""

    hw: tuple[int, ...] | None
    kind: str | None = None  # a key of _FIXES
    reason: str | None = None


class _Problems:
    """Problems of a dataset by kind, raised together as one ``DataError``."""

    def __init__(self, root: Path, **fields: object) -> None:
        self.root = root
        self.fields = fields
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, line: str) -> None:
        self.by_kind[kind].append(line)

    def rel(self, path: Path) -> str:
        """``path`` relative to the dataset root, so that lines stay short."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def raise_if_any(self) -> None:
        if not self.by_kind:
            return
        total = sum(len(lines) for lines in self.by_kind.values())
        out = [f"dataset {self.root.resolve()} is not usable ({total} problems):"]
        for kind in [k for k in _FIXES if k in self.by_kind]:
            lines = self.by_kind[kind]
            fix = _FIXES[kind].format(**self.fields)
            out.append(f"- {kind} ({len(lines)}). Fix: {fix}")
            out += [f"    {line}" for line in lines[:MAX_LISTED]]
            if len(lines) > MAX_LISTED:
                out.append(f"    ... and {len(lines) - MAX_LISTED} more")
        raise DataError("\n".join(out))


class FolderSource:
    """Images in ``root/images/`` with masks of the same stem in ``root/masks/``.

    A mask is ``masks/<image stem><mask_suffix>.<any image suffix>``, so ``images/a.jpg`` may go
    with ``masks/a.png`` (or ``masks/a_mask.png`` with ``mask_suffix="_mask"``). Files with other
    suffixes, hidden files and sub-folders are ignored. The sample key is the image stem with every
    character outside ``[A-Za-z0-9_-]`` replaced by ``_``.

    Each sample is its own group unless ``group_regex`` is given: then the group is the first
    capture group of ``re.search(group_regex, stem)``, e.g. ``r"^(.*)_slice\\d+$"``.

    ``channels`` is 1, 3 or ``"auto"`` (3 when any image is colour by its header, else 1). An
    ``"auto"`` value is resolved by the first ``entries()`` call; reading ``channels`` before that
    runs the listing. With ``unlabelled=True`` the ``masks/`` folder and any mask may be missing;
    masks that exist are still used.

    ``entries()`` raises ``DataError`` for problems of the layout (missing folders, no images,
    names that collide); ``validate()`` for problems of single samples (missing or unreadable
    files, mask sizes, names the group_regex does not match). ``warnings`` lists what the last
    ``entries()`` ignored (masks that match no image, files with other suffixes).
    """

    kind = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        channels: int | str = "auto",
        unlabelled: bool = False,
        mask_suffix: str = "",
        group_regex: str | None = None,
    ) -> None:
        if isinstance(channels, bool) or channels not in (1, 3, "auto"):
            raise UserError(f"channels must be 1, 3 or 'auto', got {channels!r}")
        if "/" in mask_suffix or os.sep in mask_suffix:
            raise UserError(f"mask_suffix {mask_suffix!r} must not contain a path separator")
        self._group_pattern: re.Pattern[str] | None = None
        if group_regex is not None:
            try:
                self._group_pattern = re.compile(group_regex)
            except re.error as exc:
                raise UserError(
                    f"group_regex {group_regex!r} is not a valid regex: {exc}"
                ) from None
            if self._group_pattern.groups < 1:
                raise UserError(
                    f"group_regex {group_regex!r} has no capture group; put the part of the file"
                    r" stem that names the group in parentheses, e.g. '^(.*)_slice\d+$'"
                )
        self.root = Path(root)
        self.unlabelled = unlabelled
        self.mask_suffix = mask_suffix
        self.group_regex = group_regex
        self.warnings: list[str] = []
        self._channels: int | None = None if channels == "auto" else int(channels)
        self._files: dict[str, _Files] = {}
        self._orphans = 0  # masks matching no image, as found by the last entries()

    @property
    def channels(self) -> int:
        """1 or 3; an ``"auto"`` setting is resolved by listing the dataset if not done yet."""
        if self._channels is None:
            self.entries()
        assert self._channels is not None
        return self._channels

    def describe(self) -> dict:
        """Kind and options, with ``channels`` resolved, for the manifest."""
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "channels": self.channels,
            "unlabelled": self.unlabelled,
            "mask_suffix": self.mask_suffix,
            "group_regex": self.group_regex,
        }

    def content_fingerprint(self) -> list:
        """(path, size, mtime) of every file, so that resuming an interrupted pack never reuses
        shards made from files that have changed since."""
        if not self._files:
            self.entries()
        stats = []
        for key, files in sorted(self._files.items()):
            for path in (files.image, files.mask):
                if path is not None:
                    st = path.stat()
                    stats.append(
                        (key, str(path.relative_to(self.root)), st.st_size, st.st_mtime_ns)
                    )
        return stats

    def entries(self) -> list[Entry]:
        """List the samples by key from file names alone (only headers are read, for ``"auto"``).

        Raises one ``DataError`` naming every layout problem. A sample whose mask is missing gets
        ``has_mask=False``, and one whose stem ``group_regex`` does not match is its own group;
        ``validate()`` reports both (a missing mask only without ``unlabelled``).
        """
        if not self.root.is_dir():
            if self.root.exists():
                what = "is not a folder"
            elif os.path.lexists(self.root):
                what = "is a symbolic link that loops or points nowhere"
            else:
                what = "does not exist"
            raise DataError(
                f"dataset folder {self.root} {what}; pass the folder that holds images/ and masks/"
            )
        problems = self._problems()
        listed = _list_folder(self.root, "images", problems, required=True)
        listed_masks = _list_folder(self.root, "masks", problems, required=not self.unlabelled)
        images, ignored = listed or ([], [])
        masks, ignored_masks = listed_masks or ([], [])
        ignored += ignored_masks
        for path in images + masks:  # named here, before any of them is opened
            what = special_file(path)
            if what is not None:
                problems.add("not a regular file", f"{problems.rel(path)}: {what}")
        if listed is not None and not images:
            found = f"; ignored {', '.join(p.name for p in ignored[:5])}" if ignored else ""
            problems.add("no images", f"images/ holds no image files{found}")

        by_key: dict[str, list[Path]] = defaultdict(list)
        for path in images:
            by_key[sanitise_key(path.stem)].append(path)
        masks_by_stem: dict[str, list[Path]] = defaultdict(list)
        for path in masks:
            masks_by_stem[path.stem].append(path)

        files: dict[str, _Files] = {}
        for key, paths in sorted(by_key.items()):
            if len(paths) > 1:
                names = ", ".join(problems.rel(p) for p in paths)
                problems.add("duplicate name", f"{names} (all named {key!r})")
                continue
            image = paths[0]
            candidates = masks_by_stem.get(image.stem + self.mask_suffix, [])
            if len(candidates) > 1:
                names = ", ".join(problems.rel(p) for p in candidates)
                problems.add("several masks for one image", f"{problems.rel(image)}: {names}")
            files[key] = _Files(image, candidates[0] if candidates else None)
        problems.raise_if_any()

        used = {f.mask for f in files.values()}
        orphans = [p for p in masks if p not in used]
        self.warnings = []
        self._orphans = len(orphans)
        if orphans:
            names = ", ".join(p.name for p in orphans[:10]) + (", ..." if len(orphans) > 10 else "")
            self.warnings.append(
                f"{len(orphans)} files in masks/ match no image and are ignored ({names}); the mask"
                f" of images/<stem>.<ext> is masks/<stem>{self.mask_suffix}.<ext>"
            )
        if ignored:
            names = ", ".join(problems.rel(p) for p in ignored[:10])
            self.warnings.append(
                f"{len(ignored)} files with suffixes other than {' '.join(sorted(IMAGE_SUFFIXES))}"
                f" are ignored ({names}{', ...' if len(ignored) > 10 else ''})"
            )
        self._files = files
        if self._channels is None:
            with ThreadPoolExecutor() as pool:
                colour = pool.map(_header_is_colour, [f.image for f in files.values()])
                self._channels = 3 if any(colour) else 1
        return [
            Entry(key=key, group=self._group_of(f.image.stem) or key, has_mask=f.mask is not None)
            for key, f in files.items()
        ]

    def validate(self, entries: list[Entry]) -> None:
        """Decode every image and mask of ``entries``; raise one ``DataError`` naming every problem.

        Reports missing masks (unless ``unlabelled``), stems the ``group_regex`` does not match,
        files that cannot be opened (looping or broken links, no read permission), unreadable or
        truncated files, and masks whose height x width differs from their image's.
        """
        problems = self._problems()
        files = [self._files_of(entry) for entry in entries]
        for f in files:
            if f.mask is None and not self.unlabelled:
                problems.add("missing mask", problems.rel(f.image))
            if self._group_pattern is not None and self._group_of(f.image.stem) is None:
                problems.add("name does not match group_regex", problems.rel(f.image))
        with ThreadPoolExecutor() as pool:
            checked = pool.map(_check_files, files)
            bar = tqdm(
                checked,
                total=len(files),
                desc="validating",
                unit="sample",
                file=sys.stderr,
                disable=len(files) <= PROGRESS_MIN,
            )
            for f, (image, mask) in zip(files, bar, strict=True):
                for path, read in ((f.image, image), (f.mask, mask)):
                    if path is not None and read is not None and read.kind is not None:
                        problems.add(read.kind, f"{problems.rel(path)}: {read.reason}")
                if mask is not None and mask.hw and image.hw and mask.hw != image.hw:
                    problems.add(
                        "mask size differs from image",
                        f"{problems.rel(f.mask)} is {mask.hw[0]}x{mask.hw[1]} but"
                        f" {problems.rel(f.image)} is {image.hw[0]}x{image.hw[1]}",
                    )
        problems.raise_if_any()

    def load(self, entry: Entry, image_size: int) -> Sample:
        """Decode one sample: image uint8 with ``channels`` channels, mask uint8 {0, 1} or None."""
        if image_size < 1:
            raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
        f = self._files_of(entry)
        image = resize_image(to_uint8(to_channels(read_image(f.image), self.channels)), image_size)
        mask = None
        if f.mask is not None:
            mask = resize_mask(read_mask(f.mask), image_size)
        elif not self.unlabelled:
            fix = _FIXES["missing mask"].format(mask_suffix=self.mask_suffix, orphan_note="")
            raise DataError(f"{f.image} has no mask; {fix}")
        return Sample(key=entry.key, image=image, mask=mask, group=entry.group, label=entry.label)

    def _problems(self) -> _Problems:
        orphan_note = (
            f" ({self._orphans} files in masks/ match no image: is the mask suffix"
            f" '{self.mask_suffix}' right?)"
            if self._orphans
            else ""
        )
        return _Problems(
            self.root,
            mask_suffix=self.mask_suffix,
            group_regex=self.group_regex,
            orphan_note=orphan_note,
        )

    def _group_of(self, stem: str) -> str | None:
        """The first group of group_regex in ``stem``; None without a regex or a (non-empty) match."""
        if self._group_pattern is None:
            return None
        match = self._group_pattern.search(stem)
        return (match.group(1) or None) if match else None

    def _files_of(self, entry: Entry) -> _Files:
        if not self._files:
            self.entries()
        try:
            return self._files[entry.key]
        except KeyError:
            raise KeyError(f"{entry.key!r} is not a sample of {self.root}") from None


def _list_folder(
    root: Path, name: str, problems: _Problems, required: bool
) -> tuple[list[Path], list[Path]] | None:
    """``_list_images(root / name)``, or None with the reason added to ``problems`` when the folder
    is missing (only if ``required``), loops, points nowhere, is a file or cannot be listed."""
    folder = root / name
    try:
        return _list_images(folder)
    except OSError as exc:
        if os.path.lexists(folder):
            problems.add("unusable folder", f"{name}/: {_os_reason(folder, exc)}")
        elif required:
            problems.add("missing folder", f"{name}/")
        return None


def _list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files directly in ``folder`` (sorted), and the visible non-image files ignored.

    An image-named entry that may be a file counts as one: a link that loops or points nowhere
    is listed, so that ``validate()`` names it instead of the listing tripping on it or dropping
    it silently. Raises ``OSError`` when ``folder`` itself cannot be listed.
    """
    images, ignored = [], []
    with os.scandir(folder) as it:
        for item in it:
            if item.name.startswith(".") or not _may_be_file(item):
                continue
            (images if is_image_file(item.name) else ignored).append(Path(item.path))
    return sorted(images), sorted(ignored)


def _may_be_file(item: os.DirEntry) -> bool:
    """Anything but a folder: a file, a link whose target cannot be reached (looping or broken),
    or a named pipe, socket or device (named by ``entries`` as not a regular file)."""
    try:
        return not item.is_dir()
    except OSError:  # ELOOP from following the link, or no permission to look
        return True


def _os_reason(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be opened, in a few words naming no path."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loops"
    if os.path.islink(path) and not os.path.exists(path):
        return "symbolic link points to nothing"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOTDIR:
        return "not a folder"
    return exc.strerror or type(exc).__name__


def _header_is_colour(path: Path) -> bool:
    try:
        return is_colour(path)
    except ImageReadError:
        return False  # validate() reports the file


def _read_size(path: Path, unreadable: str) -> _Read:
    """Open ``path`` (problem kind "inaccessible file"), then decode it completely (problem kind
    ``unreadable``), so that a link or permission problem is not reported as a bad image."""
    try:  # O_NONBLOCK: a named pipe swapped in after the listing opens at once (and is refused)
        with open(path, "rb", opener=_nonblocking):
            pass
    except OSError as exc:
        return _Read(None, "inaccessible file", _os_reason(path, exc))
    try:
        return _Read(read_image(path).shape[:2])
    except ImageReadError as exc:
        return _Read(None, unreadable, exc.reason)


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _check_files(f: _Files) -> tuple[_Read, _Read | None]:
    """Read both files of a sample (the mask's is None without a mask)."""
    image = _read_size(f.image, "unreadable image")
    mask = None if f.mask is None else _read_size(f.mask, "unreadable mask")
    return image, mask
