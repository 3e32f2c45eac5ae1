"""Atomic file writes: write under a temporary name in the same folder, fsync, rename.

Files get the permissions an ordinary ``open`` would give them (``0o666`` less the umask), so a
dataset or a result written with the usual umask 022 or 002 is readable by the group, as ``cp``
would leave it; ``tempfile.mkstemp`` alone would make every file private (0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def current_umask() -> int:
    """This process's umask, read without changing it where the kernel tells (Linux >= 4.7)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or exception leaves ``path`` untouched (the old content, or nothing) and removes the
    temporary file, so a reader never sees a half-written file under the final name. A process
    killed outright leaves its temporary file behind: the next writer of the folder removes it
    (:func:`remove_stale_temporaries`) while holding the folder's lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}{TMP_MARK}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (and below it when
    ``recursive``); returns what was removed. Call it only as the folder's one writer."""
    folder = Path(folder)
    pattern = f"**/*{TMP_MARK}*" if recursive else f"*{TMP_MARK}*"
    removed = []
    for p in folder.glob(pattern):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
