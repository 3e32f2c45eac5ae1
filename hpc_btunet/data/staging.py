"""Node-local staging of a packed dataset (``--stage-to DIR``): one checked copy per node.

Cluster datasets live on a shared parallel file system; a job copies the shards it reads to the
node's own disk once, at its start, and reads them there. Every process of the job calls
:func:`stage_dataset`; the processes of a node take turns on an exclusive ``flock`` of
``<copy>/.lock`` (polled, so a waiter gives up after ``wait_s`` instead of blocking for good):

- the first one copies each shard of the splits the job reads that is missing or differs: under a
  temporary name, its sha256 computed while copying and compared with the manifest's, then renamed
  into place. ``manifest.json`` comes last (it is removed while shards are being written, so a
  partial copy never looks complete), then the stamp ``staged.json``: job id, host, time, the
  manifest's sha256, the shards verified and the copy's figures;
- the next ones find a stamp of their own job and read the copy without hashing it again.

The copy is ``DIR/hpc_btunet-<first 16 hex of the manifest's sha256>``: two datasets never
collide, and a later job on the node reuses the copy after its first process has re-hashed every
shard once (a shard whose sha256 differs is copied again, never trained on; the temporary files
of an interrupted copy are removed and the shards it did not finish are copied).

``DIR`` is expanded on the node (``$TMPDIR``, ``$SLURM_JOB_ID``, ``~``), not where the job was
submitted. When it cannot hold the copy (a variable not set, a network file system by the mounts
table, not creatable, read-only, too little room, or a write failing half-way) one message names
the path, the reason and the fix; ``on_error`` then reads ``--data`` directly (``fallback``,
logged) or stops with that message (``stop``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpc_btunet.atomic import atomic_open, remove_stale_temporaries, write_json
from hpc_btunet.data.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ShardInfo,
    load_manifest,
    sha256_file,
    shard_file_problem,
)
from hpc_btunet.errors import ShardError, UserError
from hpc_btunet.folder_lock import FolderLock, FolderLocked, holder
from hpc_btunet.readers import MB, is_regular_file, read_bytes, read_json

ON_ERROR = ("fallback", "stop")
FOLDER_PREFIX = "hpc_btunet-"
STAMP_NAME = "staged.json"
MOUNTS = Path("/proc/mounts")
WAIT_S = 3 * 3600.0  # how long a process waits for its node's copy before giving up
# file systems shared over the network: staging there copies from one shared disk to another
NETWORK_FILE_SYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "beegfs",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "cephfs",
        "panfs",
        "glusterfs",
        "orangefs",
        "pvfs2",
        "wekafs",
        "quobyte",
        "afs",
        "ocfs2",
        "gfs2",
        "sshfs",
        "s3fs",
    }
)
_FIX = (
    "choose a writable folder on the node's own disk with room for the dataset, e.g. "
    "--stage-to '$TMPDIR/hpc_btunet'"
)
_CHUNK = 8 << 20
MAX_STAMP_BYTES = 64 * MB  # the stamp lists shard names


class StageError(UserError):
    """``--stage-to`` cannot hold the copy; the message names the path, the reason and the fix."""


@dataclass(frozen=True)
class StageResult:
    """What staging did. ``data`` is where the job reads the dataset: the node's copy, or
    ``--data`` itself after a fallback (``reason`` says why). The figures are those of the
    node's first process (``by``): a process that trusted its job's stamp reports them too."""

    data: Path
    staged: bool
    seconds: float = 0.0
    bytes_copied: int = 0
    mb_per_s: float = 0.0
    copied: int = 0
    reused: int = 0
    by: str = ""
    reason: str = ""

    def record(self) -> dict:
        """The result as the run's config records it."""
        if not self.staged:
            return {"staged": False, "data": str(self.data), "reason": self.reason}
        return {"staged": True, "data": str(self.data), **self.figures(), "by": self.by}

    def figures(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "bytes_copied": self.bytes_copied,
            "mb_per_s": round(self.mb_per_s, 1),
            "copied": self.copied,
            "reused": self.reused,
        }

    def describe(self) -> str:
        copied = (
            f"{self.copied} shard(s) copied ({self.bytes_copied / 1e6:.1f} MB, "
            f"{self.mb_per_s:.1f} MB/s)"
        )
        return (
            f"reading the dataset from {self.data}, staged by {self.by} in {self.seconds:.1f} s: "
            f"{copied}, {self.reused} reused after checking"
        )


def stage_dataset(
    data: str | Path,
    stage_to: str | Path,
    splits: tuple[str, ...],
    *,
    on_error: str = "fallback",
    log: Callable[[str], None] = print,
    wait_s: float = WAIT_S,
    mounts: Path = MOUNTS,
) -> StageResult:
    """Copy the shards of ``splits`` of the dataset at ``data`` to the node-local folder
    ``stage_to`` (or check the copy there) and say where to read it (module docstring).

    Raises ``StageError`` only with ``on_error="stop"``; a dataset that is itself missing or
    corrupt raises its own ``UserError`` (``ShardError``) either way.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    data = Path(data)
    manifest = load_manifest(data)  # a bad --data fails as it would without staging
    shards = [s for split in splits for s in manifest.shards_of(split)]
    raw = read_bytes(data / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest")
    try:
        check_stage_to(data, expand(stage_to), stage_to)
        result = _stage(data, raw, shards, stage_to, wait_s, mounts)
    except StageError as e:
        if on_error == "stop":
            raise StageError(f"{e} (or pass --stage-on-error fallback to read --data)") from None
        log(f"{e}; reading --data {data} directly instead (--stage-on-error fallback)")
        return StageResult(data, staged=False, reason=str(e))
    log(result.describe())
    return result


def expand(stage_to: str | Path) -> Path:
    """``stage_to`` with ``~`` and environment variables expanded here (on the node), absolute."""
    text = os.path.expandvars(os.path.expanduser(str(stage_to)))
    unset = re.search(r"\$\{?(\w+)", text)
    if unset:
        raise _refuse(
            str(stage_to),
            f"${unset.group(1)} is not set on {socket.gethostname()}",
            "set it in the job's environment (e.g. a profile's setup line) or give a path",
        )
    return Path(os.path.abspath(text))


def check_stage_to(data: str | Path, root: Path, given: str | Path | None = None) -> None:
    """Refuse a ``--stage-to`` (``root``, expanded) inside ``--data``, or ``--data`` inside it
    (the copy would nest in the dataset it copies, or replace it): a ``UserError`` naming both,
    whatever ``--stage-on-error`` says, since no node can fix it."""
    try:
        data_real, root_real = Path(data).resolve(), Path(root).resolve()
    except (OSError, RuntimeError):
        return  # a link loop: the copy fails with its own message
    if data_real == root_real or data_real in root_real.parents:
        shown = root if given is None or str(given) == str(root) else f"{given} (= {root})"
        raise UserError(
            f"--stage-to {shown} lies inside --data {data}: the copy would be made inside the "
            "dataset it copies; choose a folder outside it, e.g. --stage-to '$TMPDIR/hpc_btunet'"
        )
    if root_real in data_real.parents:
        shown = root if given is None or str(given) == str(root) else f"{given} (= {root})"
        raise UserError(
            f"--data {data} lies inside --stage-to {shown}: staging would copy the dataset into "
            "a folder that holds it; choose a --stage-to folder apart from the dataset"
        )


def file_system_type(path: Path, mounts: Path = MOUNTS) -> str | None:
    """The type of the file system holding ``path``: that of the mount point with the longest
    prefix of it in the mounts table (``/proc/mounts`` format; later lines shadow earlier ones).
    None when the table cannot be read."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())  # links followed as far as they exist: $TMPDIR may be one
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = point == "/" or target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, kind = len(point), fields[2]
    return kind


def is_network(kind: str | None) -> bool:
    """Whether a file system type is shared over the network (``fuse.<type>`` included)."""
    return kind is not None and kind.removeprefix("fuse.") in NETWORK_FILE_SYSTEMS


def job_id() -> str:
    """The id of this process's job: SLURM's, submitit's local one, or the process's own."""
    return (
        os.environ.get("SLURM_JOB_ID")
        or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        or f"pid {os.getpid()}"
    )


def _stage(
    data: Path,
    raw: bytes,
    shards: list[ShardInfo],
    stage_to: str | Path,
    wait_s: float,
    mounts: Path,
) -> StageResult:
    root = expand(stage_to)
    where = str(root) if str(root) == str(stage_to) else f"{stage_to} (= {root} on this node)"
    kind = file_system_type(root, mounts)
    if is_network(kind):
        raise _refuse(where, f"it is on a {kind} file system, shared over the network")
    sha = hashlib.sha256(raw).hexdigest()
    folder = root / f"{FOLDER_PREFIX}{sha[:16]}"
    try:
        lock = FolderLock(folder, "staged dataset").acquire(wait_s)
    except FolderLocked:
        who = holder(folder) or "another process"
        reason = f"{who} was still staging it after {wait_s:g} s of waiting"
        raise _refuse(where, reason, "wait for it to finish, or give another --stage-to") from None
    except OSError as e:
        raise _refuse(where, _os_reason(e)) from None
    try:
        stamp = _read_stamp(folder, sha)
        if stamp is not None and _covers(folder, raw, shards, stamp["shards"]):
            return _trusted(folder, stamp)
        trusted = set(stamp["shards"]) if stamp is not None else set()
        return _copy(data, folder, raw, sha, shards, trusted, where)
    except OSError as e:  # a full or failing disk half-way: the temporary file is removed
        raise _refuse(where, _os_reason(e)) from None
    finally:
        lock.release()


def _copy(
    data: Path,
    folder: Path,
    raw: bytes,
    sha: str,
    shards: list[ShardInfo],
    trusted: set[str],
    where: str,
) -> StageResult:
    """As the node's first process: hash what is there, copy what is missing or differs, then
    the manifest and the stamp. ``trusted``: shards this job has verified already."""
    start = time.monotonic()
    (folder / STAMP_NAME).unlink(missing_ok=True)  # what follows may change the copy
    remove_stale_temporaries(folder)
    todo = [s for s in shards if not _intact(folder / s.name, s, s.name in trusted)]
    need = sum(s.bytes for s in todo) + len(raw)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise _refuse(
            where, f"{len(todo)} shard(s) need {need / 1e6:.1f} MB there, {free / 1e6:.1f} MB free"
        )
    if todo:
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
    copy_start = time.monotonic()
    for s in todo:
        _copy_shard(data / s.name, folder / s.name, s, data)
    copy_seconds = time.monotonic() - copy_start
    target = folder / MANIFEST_NAME
    if not _holds(target, raw):
        with atomic_open(target, "wb") as f:
            f.write(raw)
    copied = sum(s.bytes for s in todo)
    result = StageResult(
        folder,
        staged=True,
        seconds=time.monotonic() - start,
        bytes_copied=copied,
        mb_per_s=copied / 1e6 / copy_seconds if copied and copy_seconds > 0 else 0.0,
        copied=len(todo),
        reused=len(shards) - len(todo),
        by=_who(),
    )
    stamp = {
        "job": job_id(),
        "host": socket.gethostname(),
        "by": result.by,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "manifest_sha256": sha,
        "shards": sorted(trusted | {s.name for s in shards}),
        "staging": result.figures(),
    }
    write_json(folder / STAMP_NAME, stamp)
    return result


def _intact(path: Path, shard: ShardInfo, trusted: bool) -> bool:
    """Whether the copy of ``shard`` at ``path`` is whole: a regular file of its size, and its
    sha256 unless this job verified it already."""
    if shard_file_problem(path, shard) is not None:
        return False
    return trusted or sha256_file(path) == shard.sha256


def _copy_shard(source: Path, target: Path, shard: ShardInfo, data: Path) -> None:
    """Copy one shard under a temporary name, hashing as it goes; renamed only when its sha256
    is the manifest's."""
    problem = shard_file_problem(source, shard)
    if problem is not None:
        raise ShardError(
            f"{problem} (the manifest lists it): repack the dataset "
            "(`hpc-btunet pack ... --overwrite`) or copy the shard again"
        )
    digest = hashlib.sha256()
    with open(source, "rb") as src, atomic_open(target, "wb") as dst:
        while block := src.read(_CHUNK):
            digest.update(block)
            dst.write(block)
        if digest.hexdigest() != shard.sha256:  # raised inside: the temporary file is removed
            raise ShardError(
                f"{source}: sha256 differs from the manifest (found while staging it): check "
                f"the dataset with `hpc-btunet verify --data {data}`; repack it or copy the "
                "shard again"
            )


def _read_stamp(folder: Path, sha: str) -> dict | None:
    """The stamp when this job on this host wrote it for this manifest, else None."""
    try:
        stamp = read_json(folder / STAMP_NAME, MAX_STAMP_BYTES, "staging stamp")
    except (OSError, UserError):  # none, cut short, edited or not a file: not trusted
        return None
    mine = (
        isinstance(stamp, dict)
        and stamp.get("job") == job_id()
        and stamp.get("host") == socket.gethostname()
        and stamp.get("manifest_sha256") == sha
        and isinstance(stamp.get("shards"), list)
        and isinstance(stamp.get("staging"), dict)
    )
    return stamp if mine else None


def _covers(folder: Path, raw: bytes, shards: list[ShardInfo], verified: list[str]) -> bool:
    """Whether the copy holds every shard (verified by this job, of the right size) and the
    manifest: then it is read without hashing it again."""
    if not _holds(folder / MANIFEST_NAME, raw):
        return False
    done = set(verified)
    return all(s.name in done and _intact(folder / s.name, s, True) for s in shards)


def _holds(path: Path, raw: bytes) -> bool:
    """Whether ``path`` is a regular file holding ``raw`` (never blocks on a named pipe)."""
    if not is_regular_file(path) or path.stat().st_size != len(raw):
        return False
    try:
        return read_bytes(path, len(raw), "manifest") == raw
    except (OSError, UserError):
        return False


def _trusted(folder: Path, stamp: dict) -> StageResult:
    figures = stamp["staging"]
    try:
        return StageResult(
            folder,
            staged=True,
            seconds=float(figures.get("seconds", 0.0)),
            bytes_copied=int(figures.get("bytes_copied", 0)),
            mb_per_s=float(figures.get("mb_per_s", 0.0)),
            copied=int(figures.get("copied", 0)),
            reused=int(figures.get("reused", 0)),
            by=str(stamp.get("by", "this job")),
        )
    except (TypeError, ValueError):  # edited figures: the copy stands, the figures do not
        return StageResult(folder, staged=True, by=str(stamp.get("by", "this job")))


def _who() -> str:
    job = job_id()
    mine = f"pid {os.getpid()} on {socket.gethostname()}"
    return mine if job.startswith("pid ") else f"{mine} (job {job})"


def _refuse(where: str, reason: str, fix: str = _FIX) -> StageError:
    return StageError(f"cannot stage the dataset to --stage-to {where}: {reason}; {fix}")


def _os_reason(e: OSError) -> str:
    return f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))


def _unescape(field: str) -> str:
    """A mounts-table field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
