"""A job's own record of how it ended: ``<job folder>/<job id>_<rank>_outcome.json``.

submitit keeps each task's result as a pickle beside its log. Unpickling runs code, so nothing
that reads a folder a user did not just write may do it: a pickle placed in a shared experiment
folder would run as whoever types ``status``. Every task therefore writes its outcome as JSON
beside submitit's files, before it returns or raises (so a sibling or a waiting command sees it
as soon as it is true): ``done``, or ``error`` with the error's type and message. ``status``,
``experiment --wait``, the local executor and the local job's watchdog read only these files and
the logs. A task that leaves no outcome was killed (a signal, out of memory) or never started.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from hpc_btunet.atomic import write_json
from hpc_btunet.errors import UserError
from hpc_btunet.readers import KB, read_json

FORMAT = 1
SUFFIX = "_outcome.json"
STATES = ("done", "error")
MAX_MESSAGE = 4000  # characters of an error message kept
_LIMIT = 64 * KB  # bytes an outcome file may have
_JOB_ID = re.compile(r"^[0-9]+(?:_[0-9]+)?$")
MAX_TASKS = 4096  # outcome files read per job (ranks)


@dataclass(frozen=True)
class Outcome:
    rank: int
    state: str  # done | error
    error: str = ""  # the exception's type name
    message: str = ""


def outcome_path(folder: str | os.PathLike, job_id: str, rank: int) -> Path:
    return Path(folder) / f"{job_id}_{rank}{SUFFIX}"


def describe(error: BaseException) -> str:
    """One error as a job's outcome says it: a toolkit error by its message alone, anything
    else (a bug) with its type."""
    text = str(error).strip()
    if isinstance(error, UserError):
        return text[:MAX_MESSAGE]
    return f"{type(error).__name__}: {text}"[:MAX_MESSAGE]


def write_outcome(
    folder: str | os.PathLike, job_id: str, rank: int, error: BaseException | None
) -> None:
    """Record this task's end (``error`` None: done). Never raises: the job's own result or
    error matters more than its record."""
    body = {"format": FORMAT, "job_id": str(job_id), "rank": int(rank), "time": time.time()}
    if error is None:
        body["state"] = "done"
    else:
        body |= {"state": "error", "error": type(error).__name__, "message": describe(error)}
    with contextlib.suppress(OSError):
        write_json(outcome_path(folder, job_id, rank), body)


def read_outcome(path: str | os.PathLike) -> Outcome | None:
    """One outcome file, or None when it is absent, unreadable or not an outcome (a reader
    then falls back on the log)."""
    try:
        body = read_json(path, limit=_LIMIT, what="job outcome")
    except (OSError, UserError):
        return None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        return None
    rank, state = body.get("rank"), body.get("state")
    error, message = body.get("error", ""), body.get("message", "")
    if (
        not isinstance(rank, int)
        or isinstance(rank, bool)
        or not 0 <= rank < MAX_TASKS
        or state not in STATES
        or not isinstance(error, str)
        or not isinstance(message, str)
    ):
        return None
    return Outcome(rank, state, error[:200], message[:MAX_MESSAGE])


def job_outcomes(folder: str | os.PathLike, job_id: str) -> dict[int, Outcome]:
    """Every task's outcome of job ``job_id`` (``123`` or an array task ``123_4``) in its
    folder, by rank."""
    if not _JOB_ID.match(str(job_id)):
        return {}
    found: dict[int, Outcome] = {}
    pattern = os.path.join(glob.escape(str(folder)), f"{job_id}_*{SUFFIX}")
    for name in sorted(glob.glob(pattern))[:MAX_TASKS]:
        rest = Path(name).name[len(str(job_id)) + 1 : -len(SUFFIX)]
        if not rest.isdigit():
            continue  # another job's file (123_4_0 beside 123_0)
        outcome = read_outcome(name)
        if outcome is not None and outcome.rank == int(rest):
            found[outcome.rank] = outcome
    return found
