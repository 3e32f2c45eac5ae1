"""A job's output folder: its identity, provenance, lock and local metrics log.

Every run writes ``config.yaml`` (the resolved config, the run's identity, and the package
version, git revision and the sha256 of the dataset manifest) and appends one JSON object per
logged step to ``metrics.jsonl``, so that results never depend on an external tracking service.
A run is complete when its final artefact exists (``encoder.pt`` for pre-training,
``metrics.json`` for fine-tuning); a complete run is skipped on rerun, an incomplete one resumes
from its checkpoint, and either only when the rerun's identity (see
:meth:`hpc_btunet.train.job.JobConfig.identity`) is the recorded one.

While a job runs, its main process holds the folder's lock (:mod:`hpc_btunet.folder_lock`): a
second writer is refused, and temporary files of a killed writer are removed only by the holder.

What a job reads back from its folder is untrusted input (:mod:`hpc_btunet.readers`):
``config.yaml`` is read strictly (a regular file, bounded, no key given twice), and written so
that the strict reader reads back what was written (YAML 1.2 numbers); ``metrics.jsonl`` must be
a regular file of bounded size, and its lines that are not what :meth:`RunDir.log` writes are
dropped on resume with one warning. Both are checked before submission
(:meth:`RunDir.check_records`), so a damaged one costs no queue time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from hpc_btunet import __version__, distributed
from hpc_btunet.atomic import atomic_open, remove_stale_temporaries
from hpc_btunet.data.manifest import MANIFEST_NAME, sha256_file
from hpc_btunet.errors import UserError
from hpc_btunet.folder_lock import FolderLock
from hpc_btunet.readers import (
    MB,
    StrictLoader,
    UnreadableFile,
    loads_json,
    loads_yaml,
    open_regular,
    read_text,
)
from hpc_btunet.train.checkpoint import latest_intact_checkpoint

CONFIG_NAME = "config.yaml"
# the identity of an input that a job not yet run will write (a --pretrained awaited with
# --after): it cannot be compared before submission, only when the job starts
PENDING = "(not written yet)"
CONFIG_LIMIT = 16 * MB  # config.yaml: the config, identity and a history of resumes
LOG_LIMIT = 4096 * MB  # metrics.jsonl: a few hundred bytes per logged step
LOG_LINE_LIMIT = 1 * MB  # one logged record


class RecordDumper(yaml.SafeDumper):
    """PyYAML's safe dumper quoting what the strict reader (YAML 1.2 numbers) would read as
    another type: the string ``1e-3`` is written ``'1e-3'``, not as a bare number."""


RecordDumper.yaml_implicit_resolvers = StrictLoader.yaml_implicit_resolvers


def git_revision() -> str:
    """The git commit of the installed package's checkout, or "unknown" (installed from a wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "(not set)"), current.get(key, "(not set)")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new and new != PENDING:
            lines.append(f"{prefix.removeprefix('options.')}{key}: {old} (run) vs {new} (now)")
    return lines


class RunDir:
    """Paths and logs of one job's output folder; only the main process writes (``is_main``)."""

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.checkpoints = self.path / "checkpoints"
        self.metrics_log = self.path / "metrics.jsonl"
        self.config_file = self.path / CONFIG_NAME
        self._lock: FolderLock | None = None

    # --- identity -------------------------------------------------------------------------------

    def recorded(self) -> dict | None:
        """The ``config.yaml`` of an earlier start of this run, or None; one that is not what
        :meth:`write_config` writes is refused, naming it."""
        fix = f"remove the run folder {self.path} to start it again, or choose another --out"
        try:
            text = read_text(self.config_file, CONFIG_LIMIT, "run record")
        except FileNotFoundError:
            return None
        except UnreadableFile as e:
            raise UnreadableFile(self.config_file, f"{e}; or {fix}") from None
        except OSError as e:  # unreadable: a permission, an I/O error
            raise UserError(
                f"{self.config_file} cannot be read ({e.strerror or e}): fix its permissions, or "
                f"remove the run folder {self.path} to start it again"
            ) from None
        return loads_yaml(text, self.config_file, fix, mapping=True)

    def check_records(self) -> None:
        """Before submission: refuse the records a job reads back at its start when damaged
        (``config.yaml``; ``metrics.jsonl`` not a regular file, or too large to be one)."""
        self.recorded()
        try:
            with open_regular(self.metrics_log, LOG_LIMIT, "metrics log (metrics.jsonl)"):
                pass
        except FileNotFoundError:
            pass

    def check(
        self,
        identity: dict,
        complete: bool,
        force: bool,
        what: str,
        hints: dict[str, str] | None = None,
    ) -> None:
        """Refuse to skip or resume this folder when ``identity`` differs from the recorded one.

        Raises ``UserError`` listing the differing options and the way out; ``hints`` add a
        sentence when a given top-level identity key differs."""
        started = complete or any(self.checkpoints.glob("step-*"))
        if not started:
            return
        recorded = (self.recorded() or {}).get("identity")
        diff = (
            _differences(recorded, identity)
            if isinstance(recorded, dict)
            else ["no identity recorded (written by an older version)"]
        )
        if not diff:
            return
        listed = "; ".join(diff)
        recorded_keys = recorded if isinstance(recorded, dict) else {}
        notes = "".join(
            f". {hint[0].upper()}{hint[1:]}"
            for key, hint in (hints or {}).items()
            if recorded_keys.get(key) != identity.get(key)
        )
        if complete:
            raise UserError(
                f"{what} {self.path} is complete but was run with other options ({listed}): "
                f"choose another --out, or remove that folder to run it again{notes}"
            )
        if not force:
            raise UserError(
                f"{what} {self.path} was started with other options ({listed}): choose another "
                f"--out, or pass --force-resume to continue it with the new ones{notes}"
            )

    # --- the writer's session -------------------------------------------------------------------

    def acquire(self, what: str) -> None:
        """Become the folder's one writer (main process only); remove what a killed writer left."""
        if not self.is_main:
            return
        self._lock = FolderLock(self.path, what).acquire()
        remove_stale_temporaries(self.path, recursive=True)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_config(
        self,
        config: dict[str, Any],
        identity: dict,
        manifest_sha256: str,
        step: int = 0,
        runtime: dict | None = None,
    ) -> None:
        """Record the resolved config and identity. A resume with another identity (forced) or
        another config (another world size, more workers, ...) keeps what changed in
        ``history``, with the step it held until."""
        if not self.is_main:
            return
        earlier = self.recorded() or {}
        history = list(earlier.get("history") or [])
        until = {"until_step": step, "until": time.strftime("%FT%T%z")}
        if earlier.get("identity") not in (None, identity):
            history.append({"identity": earlier["identity"], **until})
        old_config = earlier.get("config")
        if isinstance(old_config, dict) and old_config != config:
            changed = {k: old_config.get(k) for k in old_config.keys() | config.keys()}
            changed = {k: v for k, v in changed.items() if v != config.get(k)}
            history.append({"config": dict(sorted(changed.items())), **until})
        provenance = {
            "package_version": __version__,
            "git_revision": git_revision(),
            "manifest_sha256": manifest_sha256,
            "python": sys.version.split()[0],
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        record = {"config": config, "identity": identity, "provenance": provenance}
        if runtime:
            record["runtime"] = runtime
        if history:
            record["history"] = history
        with atomic_open(self.config_file, "w") as f:
            yaml.dump(record, f, Dumper=RecordDumper, sort_keys=False)

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop log lines past the checkpoint's step: they will be logged again
        (``after_step=0`` for a run that starts over). A last line cut short by a kill is
        dropped silently; other lines that are not records :meth:`log` writes (damaged, edited)
        are dropped with one warning naming the file."""
        if not self.is_main:
            return
        kept, damaged = [], []
        try:
            with open_regular(self.metrics_log, LOG_LIMIT, "metrics log (metrics.jsonl)") as f:
                for number, raw in enumerate(_lines(f, LOG_LINE_LIMIT), start=1):
                    if raw is None:
                        damaged.append((number, f"longer than {LOG_LINE_LIMIT:,} bytes"))
                        continue
                    try:
                        line, step = _record(raw, self.metrics_log)
                    except ValueError as e:
                        if raw.endswith(b"\n"):  # not the last line, which a kill cuts short
                            damaged.append((number, str(e)))
                        continue
                    if step <= after_step:
                        kept.append(line)
        except FileNotFoundError:
            return
        if damaged:
            number, problem = damaged[0]
            print(
                f"warning: {self.metrics_log}: {len(damaged)} damaged line(s) dropped (line "
                f"{number}: {problem}); the steps they held before step {after_step} are missing "
                "from the local log",
                file=sys.stderr,
                flush=True,
            )
        with atomic_open(self.metrics_log, "w") as f:
            f.write("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_log, "a") as f:
            f.write(json.dumps(record) + "\n")


def _lines(f: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of ``f`` with their newline (the last may lack one); None for a line longer
    than ``limit`` bytes, which is skipped without being held in memory."""
    while raw := f.readline(limit + 2):  # a line of ``limit`` bytes and its newline fit
        if len(raw.removesuffix(b"\n")) <= limit:
            yield raw
            continue
        while not raw.endswith(b"\n") and (raw := f.readline(limit + 1)):
            pass
        yield None


def _record(raw: bytes, where: Path) -> tuple[str, float]:
    """A log line as :meth:`RunDir.log` writes it (a JSON object with a numeric ``step``):
    the line without its newline, and its step. Raises ``ValueError`` saying why it is not."""
    try:
        line = raw.removesuffix(b"\n").decode("utf-8")
        record = loads_json(line, where)
    except (UnicodeDecodeError, UnreadableFile):
        raise ValueError("not a JSON record") from None
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, int | float):
        raise ValueError("no step number")
    return line, step


def open_run(
    rundir: RunDir,
    identity: dict,
    result: Path,
    force: bool,
    hints: dict[str, str] | None = None,
) -> tuple[bool, Path | None]:
    """A job's start, on every rank: rank 0 becomes the folder's writer, checks the identity and
    finds the newest intact checkpoint; every rank gets (complete, checkpoint) or the error."""

    def decide() -> tuple[bool, str | None]:
        rundir.acquire("run folder")
        complete = result.exists()
        rundir.check(identity, complete, force, "run folder", hints)
        last = None if complete else latest_intact_checkpoint(rundir.checkpoints)
        return complete, None if last is None else str(last)

    complete, last = distributed.main_decides(decide)
    return complete, Path(last) if last else None


def record_start(
    rundir: RunDir,
    config: dict,
    identity: dict,
    data: Path,
    step: int,
    runtime: dict | None = None,
) -> None:
    """After :func:`open_run`: a new run records its config and starts an empty log; a resumed
    one drops log lines past its checkpoint, and records its config again when it changed (on
    another world size, say) or it was forced to continue with another identity (what was
    recorded before goes to ``history``). ``runtime`` (threads, staging: how this start ran, not
    what the run is) is recorded as the latest start's, without history."""
    recorded = rundir.recorded() or {}
    if (
        step == 0
        or recorded.get("identity") != identity
        or recorded.get("config") != config
        or recorded.get("runtime") != runtime
    ):
        rundir.write_config(
            config, identity, sha256_file(Path(data) / MANIFEST_NAME), step, runtime
        )
    rundir.truncate_log(step)
