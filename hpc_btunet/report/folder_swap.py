"""A report folder replaced as one unit: built beside it under a temporary name, swapped in.

``with replaced(folder) as tmp:`` yields an empty folder ``.<name>.tmp-XXXX`` beside ``folder``;
when the block succeeds, the swap is two renames (``folder`` to ``.<name>.old-XXXX``, then the
new folder to ``folder``) and the old folder is removed; when it fails, the new folder is
removed and ``folder`` is as it was. A reader therefore sees a whole report or none (for a
moment, between the renames), never new tables beside old figures. What ``keep`` names in the
old folder (the Weights & Biases runs, not synchronised yet) moves into the new one.

A process killed at any point leaves a state :func:`repair` puts right, and ``replaced`` calls
it first: temporary folders (complete or not) are removed; killed between the two renames, the
old folder (a complete report) is renamed back; killed after them, the old folder's kept
entries move over and it is removed. Call it only as the one writer (the report's lock).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hpc_btunet.atomic import current_umask

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
KEEP = ("wandb",)


def _siblings(folder: Path, mark: str) -> list[Path]:
    return sorted(folder.parent.glob(f".{folder.name}{mark}*"))


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_kept(old: Path, new: Path, keep: tuple[str, ...]) -> None:
    """Move ``keep`` entries of ``old`` into ``new`` (merging folders entry by entry)."""
    if old.is_symlink() or not old.is_dir():
        return
    for name in keep:
        source, target = old / name, new / name
        if not source.is_dir() or source.is_symlink():
            continue
        if not target.exists():
            os.rename(source, target)
            continue
        for entry in source.iterdir():
            if not (target / entry.name).exists():
                os.rename(entry, target / entry.name)


def repair(folder: Path, keep: tuple[str, ...] = KEEP) -> list[Path]:
    """Put right what a killed swap of ``folder`` left (see the module); returns what it
    removed or restored."""
    folder = Path(folder)
    done = []
    olds = _siblings(folder, OLD_MARK)
    if olds and not (folder.exists() or folder.is_symlink()):
        newest = max(olds, key=lambda p: p.lstat().st_mtime_ns)
        os.rename(newest, folder)  # killed between the renames: the old report is whole
        olds.remove(newest)
        done.append(folder)
    for old in olds:  # killed after the renames
        _move_kept(old, folder, keep)
        _remove(old)
        done.append(old)
    for tmp in _siblings(folder, TMP_MARK):
        _remove(tmp)
        done.append(tmp)
    if done:
        _fsync_dir(folder.parent)
    return done


def swap(new: Path, folder: Path, keep: tuple[str, ...] = KEEP) -> None:
    """Put the complete folder ``new`` in the place of ``folder`` (see the module)."""
    old = None
    if folder.exists() or folder.is_symlink():
        old = folder.with_name(f".{folder.name}{OLD_MARK}{secrets.token_hex(4)}")
        os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        if old is not None:
            os.rename(old, folder)
        raise
    _fsync_dir(folder.parent)
    if old is not None:
        _move_kept(old, folder, keep)
        _remove(old)


@contextlib.contextmanager
def replaced(folder: Path, keep: tuple[str, ...] = KEEP) -> Iterator[Path]:
    """Build the new ``folder`` in the yielded temporary folder; swapped in on success."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    repair(folder, keep)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the report
        yield tmp
        swap(tmp, folder, keep)
    except BaseException:
        _remove(tmp)
        raise
