"""Errors a user can cause: each carries one message that names the thing and the fix.

The command line prints a ``UserError`` as one ``error:`` line and exits with status 2; any
other exception is a bug and keeps its traceback. Failures of the machine a user can act on
(a full or read-only disk, a path without permission, a file where a folder must be) arrive as
``OSError``; :func:`as_user_error` turns those into ``UserError`` in the one place each process
has for it (the command line, and the wrapper every submitted job runs in).
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input (paths, data, options). The CLI prints the message alone, without a traceback."""


class DataError(UserError):
    """A dataset to pack is unusable; the message lists every offending file."""


class ShardError(UserError):
    """A packed shard is missing, corrupt or truncated; the message names the shard."""


_NOTHING_LOST = (
    "what was complete is kept (files are renamed into place only when whole); rerun the "
    "same command afterwards to continue"
)
# errno -> (what happened, how to fix it); "{path}" is the file the system named
_OS_FIXES = {
    errno.ENOSPC: (
        "no space left on the device holding {path}",
        "free space there or choose a folder on another device; " + _NOTHING_LOST,
    ),
    errno.EDQUOT: (
        "disk quota exceeded writing {path}",
        "free space within your quota or choose another folder; " + _NOTHING_LOST,
    ),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable folder (e.g. --out)"),
    errno.EACCES: (
        "permission denied: {path}",
        "choose a folder you may write (or a file you may read), or fix its permissions",
    ),
    errno.EPERM: (
        "operation not permitted: {path}",
        "choose a folder you may write, or fix its permissions",
    ),
    errno.ENOTDIR: (
        "a file stands where a folder is needed in {path}",
        "remove or rename that file, or choose another path",
    ),
    errno.EEXIST: (
        "{path} exists and is not a folder",
        "remove or rename it, or choose another path",
    ),
    errno.EISDIR: ("{path} is a folder where a file is needed", "choose a file path"),
    errno.ELOOP: (
        "too many levels of symbolic links at {path} (a link loop)",
        "fix or remove the link",
    ),
    errno.ENAMETOOLONG: ("the path {path} is too long", "choose a shorter path"),
}


def as_user_error(exc: BaseException) -> UserError | None:
    """The ``UserError`` a user-caused exception stands for, or None for anything else (a bug)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
        what, fix = _OS_FIXES[exc.errno]
        path = exc.filename if exc.filename is not None else "a file"
        return UserError(f"{what.format(path=path)}: {fix}")
    return None
