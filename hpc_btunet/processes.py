"""Process supervision: nothing a command starts outlives it, and one failed rank ends its job.

On SLURM the scheduler owns the processes: ``scancel`` stops a job, and ``srun
--kill-on-bad-exit`` (asked for by the launcher) ends every task of a job step as soon as one
exits with an error. On this machine the local executor's jobs are child processes of the
command (submitit's controller, its tasks, their DataLoader workers), so the command and the jobs
supervise each other here:

- the command stops its whole process tree when it is interrupted or terminated
  (:func:`stop_descendants`, used by the command line's signal handlers);
- a local job watches the command that started it and its sibling tasks
  (:class:`JobWatchdog`): when the command is gone, or a sibling rank ended without a
  successful result, the job stops at once instead of waiting for a collective's time-out;
- a failing rank writes one line with its error into the main log (rank 0's), so the real
  error is where the user looks first (:func:`report_failure`).

Killing is safe by design: every file is written under a temporary name and renamed when
complete, and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

from hpc_btunet.outcome import outcome_path, read_outcome

OWNER_PID = "HPC_BTUNET_OWNER_PID"
OWNER_STARTED = "HPC_BTUNET_OWNER_STARTED"
STOPPED_BY_SIBLING = "of this job ended without success"


def _started(proc: psutil.Process) -> float:
    return round(proc.create_time(), 2)


def _running(proc: psutil.Process) -> bool:
    """Alive, and not a zombie that only waits for its parent to read its exit status."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def owner_environment() -> dict[str, str]:
    """Variables that let a local job recognise the command that started it (pid and start time,
    so that a recycled pid is not mistaken for it)."""
    me = psutil.Process()
    return {OWNER_PID: str(me.pid), OWNER_STARTED: str(_started(me))}


def stop_descendants(grace_s: float = 2.0) -> list[int]:
    """Stop every descendant of this process; returns their pids.

    The tree is frozen first (SIGSTOP, repeated until no new process appears, so that nothing
    forks away while it is being collected), then asked to terminate (SIGTERM), and whatever is
    still there after ``grace_s`` is killed. Processes that submitit's job handler keeps alive on
    SIGTERM are among those killed."""
    seen: dict[int, psutil.Process] = {}
    for _ in range(50):
        new = [p for p in psutil.Process().children(recursive=True) if p.pid not in seen]
        if not new:
            break
        for p in new:
            seen[p.pid] = p
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGSTOP)
    procs = list(seen.values())
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return sorted(seen)


class Interrupted(BaseException):
    """The command received a terminating signal (SIGTERM, SIGHUP); like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def terminating_signals_interrupt():
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread (as
    SIGINT raises KeyboardInterrupt), so the command can stop its children and say so."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _outcome(folder: Path, job_id: str, rank: int) -> str | None:
    """``"done"``, ``"error"`` or None (none yet) of a sibling task, from its outcome file."""
    outcome = read_outcome(outcome_path(folder, job_id, rank))
    return outcome.state if outcome is not None else None


def _exit_now(message: str) -> None:
    print(f"hpc-btunet: {message}", file=sys.stderr, flush=True)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(1)


class JobWatchdog:
    """A daemon thread inside a local job: stops the job when its command is gone, or when a
    sibling task ended without success (the local stand-in for ``srun --kill-on-bad-exit``).

    A sibling ended without success when its outcome file says "error", or when its process
    (recorded by pid and start time in ``<job>_<rank>.pid`` beside the logs) is gone without a
    result: killed outright."""

    def __init__(self, folder: Path, job_id: str, rank: int, num_tasks: int, poll_s: float = 0.5):
        self.folder, self.job_id, self.rank, self.num_tasks = folder, job_id, rank, num_tasks
        self.poll_s = poll_s
        self.owner = self._owner()
        if num_tasks > 1:
            me = psutil.Process()
            self._pid_file(rank).write_text(f"{me.pid} {_started(me)}\n")
        threading.Thread(target=self._watch, name="hpc-btunet-watchdog", daemon=True).start()

    def _pid_file(self, rank: int) -> Path:
        return self.folder / f"{self.job_id}_{rank}.pid"

    @staticmethod
    def _owner() -> psutil.Process | None:
        with contextlib.suppress(KeyError, ValueError, psutil.Error):
            proc = psutil.Process(int(os.environ[OWNER_PID]))
            if _started(proc) == float(os.environ[OWNER_STARTED]):
                return proc
        return None

    def _alive(self, rank: int) -> bool | None:
        """Whether rank's process runs; None when it has not recorded itself yet."""
        try:
            pid, started = self._pid_file(rank).read_text().split()
            proc = psutil.Process(int(pid))
            return _started(proc) == float(started) and _running(proc)
        except (OSError, ValueError):
            return None
        except psutil.Error:
            return False

    def failed_sibling(self) -> int | None:
        for rank in range(self.num_tasks):
            if rank == self.rank:
                continue
            outcome = _outcome(self.folder, self.job_id, rank)
            # an outcome written just before the process ended is read again to be sure
            if (outcome == "error" or (outcome is None and self._alive(rank) is False)) and (
                _outcome(self.folder, self.job_id, rank) != "done"
            ):
                return rank
        return None

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            if self.owner is not None and not _running(self.owner):
                _exit_now("the command that started this local job is gone: stopping")
            failed = self.failed_sibling() if self.num_tasks > 1 else None
            if failed is not None:
                _exit_now(
                    f"rank {failed} {STOPPED_BY_SIBLING} (its error is in "
                    f"{self.folder / f'{self.job_id}_{failed}_log.err'}): stopping rank {self.rank}"
                )


def report_failure(main_log: Path, rank: int, error: BaseException, own_log: Path) -> None:
    """Append one line naming this rank's error to the job's main log (rank 0's stderr), so a
    user reading that log sees the real cause, not the collective error it causes elsewhere."""
    line = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {line[0] if line else ''}"
    with contextlib.suppress(OSError), open(main_log, "a") as f:
        f.write(f"hpc-btunet: rank {rank} failed: {text} (its log: {own_log})\n")
