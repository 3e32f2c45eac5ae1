"""One writer per output folder: an exclusive lock that a dead holder does not keep.

A job's run folder (and a dataset being packed) has one writer at a time. The writer holds an
exclusive ``flock`` on ``<folder>/.lock`` for as long as it runs; the kernel (or, on NFSv4, the
server's lease) drops the lock when the process ends in any way, SIGKILL and node loss included,
so a crashed job never blocks its rerun. The lock file holds a line naming the holder (host,
pid, SLURM or local job id, start time) for the message a second writer gets.

On file systems without ``flock`` (Lustre mounted ``noflock``) the lock cannot be taken; the
writer goes on with a warning instead of failing, since refusing to run there would be worse.

A writer that expects to take turns (the processes of a node staging one dataset) asks to wait:
``acquire(wait_s=...)`` polls for the lock, so it never blocks for good, and gives up as a
second writer does once ``wait_s`` has passed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from hpc_btunet.errors import UserError

LOCK_NAME = ".lock"
_POLL_S = 0.2  # how often a waiting writer asks again
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLocked(UserError):
    """Another live process is writing the folder."""


def _holder_line() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    where = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{where}{f' (job {job})' if job else ''} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


class FolderLock:
    """``with FolderLock(folder, what):`` holds the folder's lock, or raises :class:`FolderLocked`."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self, wait_s: float = 0.0) -> FolderLock:
        """Take the lock; while another process holds it, poll for up to ``wait_s`` seconds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait_s
        try:
            while not _try_flock(fd):
                if time.monotonic() >= deadline:
                    raise FolderLocked(self._busy_message(holder(self.folder)))
                time.sleep(_POLL_S)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            print(
                f"warning: {self.path.parent} is on a file system without file locks; nothing "
                f"stops a second writer of this {self.what}",
                file=sys.stderr,
            )
        except BaseException:  # refused, or interrupted while waiting
            os.close(fd)
            raise
        self._fd = fd
        with contextlib.suppress(OSError):  # the line is for messages only (a full disk: none)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
        return self

    def _busy_message(self, who: str | None) -> str:
        return (
            f"{self.what} {self.folder} is being written by another process "
            f"({who or 'holder unknown'}): wait for it to finish or stop it, or choose another --out"
        )

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_flock(fd: int) -> bool:
    """Take ``fd``'s exclusive lock if free: True when taken, False while another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock now, or None when nobody does (checked without taking it
    for longer than an instant)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_unlocked(folder: str | os.PathLike, what: str) -> None:
    """Raise :class:`FolderLocked` when a live process holds ``folder``'s lock."""
    who = holder(folder)
    if who is not None:
        raise FolderLocked(FolderLock(folder, what)._busy_message(who))
