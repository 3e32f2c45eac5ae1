"""Run job functions through submitit: on SLURM, as local processes, or in-process.

A job is a plain function of a config (``pretrain.run(cfg)``); the executor decides where it runs,
so the demo on a laptop and a cluster run share the job code. This module knows resources,
cluster profiles, arrays and dependencies; it never sees a tensor.

Resources resolve as: built-in defaults < the cluster profile (``slurm/profiles/<name>.yaml``) <
flags. Every request is checked before anything is submitted (SLURM present, partition known,
account allowed, time string valid, nodes and GPUs within the profile's limits, the dependency's
job id known), each with one message naming the fix.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from hpc_btunet.config import check_values, option
from hpc_btunet.distributed import PLACEMENT_VARIABLES
from hpc_btunet.errors import UserError, as_user_error
from hpc_btunet.outcome import job_outcomes, write_outcome
from hpc_btunet.processes import (
    STOPPED_BY_SIBLING,
    JobWatchdog,
    owner_environment,
    report_failure,
)
from hpc_btunet.readers import MB, read_yaml

EXECUTORS = ("slurm", "local", "debug")
PROFILE_DIRS = (
    Path("slurm/profiles"),
    Path(__file__).resolve().parent.parent / "slurm" / "profiles",
)
# profile keys that give a flag its default, then those that only the profile can set
PROFILE_DEFAULTS = (
    "partition",
    "account",
    "qos",
    "constraint",
    "time",
    "cpus_per_task",
    "mem_gb",
    "gpus_per_node",
    "tasks_per_node",
    "array_parallelism",
)
PROFILE_KEYS = set(PROFILE_DEFAULTS) | {
    "max_nodes",
    "max_gpus_per_node",
    "accounts",
    "sbatch",
    "setup",
}


def default_executor() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def local_gpu_count() -> int:
    """CUDA devices this machine gives its processes (torch is imported only to ask)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_slurm_time(text: str) -> int:
    """Minutes of a SLURM time string: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (seconds round up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UserError(
            f"--time {text!r} is not a SLURM time: use minutes (90), H:M:S (1:30:00) or D-H:M:S (2-00:00:00)"
        )
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        total = int(days) * 1440 + hours * 60 + minutes + (seconds > 0)
    elif c is not None:  # H:M:S
        total = int(a) * 60 + int(b) + (int(c) > 0)
    elif b is not None:  # M:S
        total = int(a) + (int(b) > 0)
    else:
        total = int(a)
    if total < 1:
        raise UserError(f"--time {text!r} is shorter than a minute: ask for at least 1")
    return total


def load_profile(name: str | None) -> dict[str, Any]:
    """The cluster profile ``name`` (a YAML path, or a name under slurm/profiles/); {} for None."""
    if not name:
        return {}
    candidates = [Path(name)] + [d / f"{name}.yaml" for d in PROFILE_DIRS]
    path = next((p for p in candidates if os.path.exists(p) and not p.is_dir()), None)
    if path is None:
        known = sorted({p.stem for d in PROFILE_DIRS if d.is_dir() for p in d.glob("*.yaml")})
        raise UserError(
            f"cluster profile {name!r} not found: pass a YAML file or one of {', '.join(known) or '(none)'}"
        )
    fix = "fix the profile (see slurm/profiles/ for examples)"
    data = read_yaml(path, limit=MB, what="cluster profile", fix=fix)
    unknown = sorted(set(data) - PROFILE_KEYS)
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(PROFILE_KEYS))}"
        )
    for key, value in data.items():
        wanted = _PROFILE_TYPES[key]
        if value is not None and not _profile_value_ok(value, wanted):
            raise UserError(f"{path}: {key} must be {wanted}, got {value!r:.80}: {fix}")
    return {k: v for k, v in data.items() if v is not None}


_PROFILE_TYPES = {
    "partition": "text",
    "account": "text",
    "qos": "text",
    "constraint": "text",
    "time": "a SLURM time (minutes, H:M:S or D-H:M:S)",
    "cpus_per_task": "a whole number",
    "mem_gb": "a number",
    "gpus_per_node": "a whole number",
    "tasks_per_node": "a whole number",
    "array_parallelism": "a whole number",
    "max_nodes": "a whole number",
    "max_gpus_per_node": "a whole number",
    "accounts": "a list of names",
    "sbatch": "a mapping of sbatch option: value",
    "setup": "a list of shell lines",
}


def _profile_value_ok(value: Any, wanted: str) -> bool:
    scalar = (str, int, float, bool)
    if wanted == "a whole number":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if wanted == "a number":
        return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if wanted.startswith("a SLURM time"):
        return isinstance(value, str | int) and not isinstance(value, bool)
    if wanted.startswith("a list"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if wanted.startswith("a mapping"):
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, scalar) for k, v in value.items()
        )
    return isinstance(value, str)


@dataclass
class LaunchConfig:
    """Where and with what resources jobs run. ``None`` means: from the profile, else the default."""

    executor: str | None = option(
        None,
        "slurm, local (processes) or debug (in-process); default: slurm where sbatch exists",
        choices=EXECUTORS,
    )
    profile: str | None = option(
        None,
        "cluster profile: a YAML file or a name under slurm/profiles/ (env HPC_BTUNET_PROFILE)",
    )
    nodes: int = option(1, "nodes per job", min=1)
    tasks_per_node: int | None = option(
        None, "processes per node (default: GPUs per node, or 1 without GPUs)", min=1
    )
    gpus_per_node: int | None = option(None, "GPUs per node", min=0)
    cpus_per_task: int | None = option(None, "CPU cores per process", min=1)
    mem_gb: float | None = option(None, "memory per node in GB", above=0)
    time: str | None = option(None, "time limit: minutes, H:M:S or D-H:M:S (default 60)")
    partition: str | None = option(None, "SLURM partition")
    account: str | None = option(None, "SLURM account")
    qos: str | None = option(None, "SLURM quality of service")
    constraint: str | None = option(None, "SLURM node constraint")
    job_name: str | None = option(None, "job name (default: the stage)")
    array_parallelism: int | None = option(None, "array tasks running at once", min=1)
    sbatch: list[str] = field(
        default_factory=list,
        metadata={"help": "any other sbatch option: KEY=VALUE, or KEY for a flag (repeatable)"},
    )
    after: str | None = option(None, "start only after this SLURM job id succeeded (afterok)")
    wait: bool = option(False, "wait for the jobs and report their results")
    logs: Path = field(
        default=Path("experiments/logs"), metadata={"help": "folder of the jobs' logs"}
    )
    threads: int | None = option(
        None,
        "compute threads per task (default: SLURM's CPUs per task, else the cores / tasks per "
        "node; recorded in the run's config.yaml under runtime.threads)",
        min=1,
    )

    def __post_init__(self) -> None:
        check_values(self)  # the flags as given, before defaults fill what is unset
        self.executor = self.executor or default_executor()
        if self.executor not in EXECUTORS:
            raise UserError(
                f"--executor {self.executor!r} is unknown: choose one of {', '.join(EXECUTORS)}"
            )
        profile = load_profile(self.profile or os.environ.get("HPC_BTUNET_PROFILE"))
        for key in PROFILE_DEFAULTS:
            if getattr(self, key) is None and key in profile:
                setattr(self, key, profile[key])
        self.extra = dict(profile.get("sbatch") or {})
        for item in self.sbatch:  # KEY=VALUE, or a bare KEY for a flag such as exclusive
            key, sep, value = item.partition("=")
            key = key.strip().lstrip("-").replace("-", "_")
            if not key:
                raise UserError(
                    f"--sbatch {item!r} must be KEY=VALUE or KEY, e.g. --sbatch mail-type=END"
                )
            self.extra[key] = value if sep else True
        self.setup = list(profile.get("setup") or [])
        self.gpus_per_node = self.gpus_per_node or 0
        self.tasks_per_node = self.tasks_per_node or max(1, self.gpus_per_node)
        self.timeout_min = parse_slurm_time(str(self.time or 60))
        check_values(self)  # and with what the profile filled in
        limits = {
            "nodes": (self.nodes, profile.get("max_nodes")),
            "gpus-per-node": (self.gpus_per_node, profile.get("max_gpus_per_node")),
        }
        for name, (asked, limit) in limits.items():
            if limit is not None and asked > limit:
                raise UserError(
                    f"--{name} {asked} is more than the cluster profile allows ({limit}): ask for at most {limit}"
                )
        allowed = profile.get("accounts")
        if self.account and allowed and self.account not in allowed:
            raise UserError(
                f"--account {self.account!r} is not one of the profile's accounts: {', '.join(allowed)}"
            )
        if self.executor != "slurm":
            if self.nodes > 1:
                raise UserError(
                    f"--nodes {self.nodes} needs --executor slurm (the {self.executor} executor runs on this machine)"
                )
            if self.after:
                raise UserError("--after needs --executor slurm (dependencies are SLURM's)")
            if self.gpus_per_node > 0:
                have = local_gpu_count()
                if self.gpus_per_node > have:
                    raise UserError(
                        f"--gpus-per-node {self.gpus_per_node}: this machine has {have} GPU(s) "
                        f"for the {self.executor} executor: ask for at most {have}, or leave "
                        "--gpus-per-node out (--tasks-per-node N runs N processes on the CPU)"
                    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def device_type(self) -> str | None:
        """Where the job's ``--device auto`` will land: SLURM nodes with GPUs asked for give
        ``cuda``, without ``cpu``; on this machine (None) it is this machine's."""
        if self.executor == "slurm":
            return "cuda" if self.gpus_per_node > 0 else "cpu"
        return None


def _slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def check_slurm_request(cfg: LaunchConfig) -> None:
    """What only SLURM can tell, asked before submitting: is it there, the partition, the account,
    the dependency."""
    if not shutil.which("sbatch"):
        raise UserError(
            "--executor slurm needs SLURM (sbatch is not on PATH): use --executor local, or run on a cluster"
        )
    if cfg.partition:
        known = {p.rstrip("*") for p in _slurm("sinfo", "-h", "-o", "%P").stdout.split()}
        if known and cfg.partition not in known:
            raise UserError(
                f"--partition {cfg.partition!r} is unknown to this cluster: choose one of {', '.join(sorted(known))}"
            )
    if cfg.account:
        accounts = _slurm("sacctmgr", "-nP", "show", "account", "format=account")
        known = set(accounts.stdout.split())
        if accounts.returncode == 0 and known and cfg.account not in known:
            raise UserError(
                f"--account {cfg.account!r} is unknown to this cluster: choose one of {', '.join(sorted(known))}"
            )
    if cfg.after:
        for job_id in cfg.after.replace(":", ",").split(","):
            check_after(job_id.strip())


# States after which ``afterok`` can never be satisfied: SLURM accepts such a dependency and the
# job then pends for good (``DependencyNeverSatisfied``), so it is refused before submission.
ENDED_BADLY = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}  # fmt: skip


def check_after(job_id: str) -> None:
    """``--after JOB``: SLURM must know the job (or array, or array task), and none of its
    tasks may have ended without success."""
    shown = _slurm("scontrol", "-o", "show", "job", job_id).stdout
    states = re.findall(r"\bJobState=(\S+)", shown)
    if not states:
        raise UserError(
            f"--after {job_id}: SLURM knows no job with this id (check `squeue` or the id printed at submission)"
        )
    bad = sorted(ENDED_BADLY.intersection(states))
    if bad:
        raise UserError(
            f"--after {job_id}: that job ended {'/'.join(bad)}, so a job after it (afterok) would "
            "never start: run it again first (its log says why it ended), or drop --after"
        )


def make_executor(
    cfg: LaunchConfig,
    stage: str,
    dependency: str | None = None,
    check: bool = True,
) -> submitit.Executor | None:
    """The submitit executor of ``cfg``; None for ``debug``, which runs jobs in this process.
    On SLURM, ``dependency`` (an sbatch ``--dependency`` value) replaces the one ``--after``
    gives, every job is cancelled by SLURM when its dependency can no longer be satisfied
    (instead of pending for good), and ``check=False`` skips asking SLURM (a dry run)."""
    folder = Path(cfg.logs) / stage / "%j"  # submitit writes array tasks as <array id>_<task>
    if cfg.executor == "debug":
        return None
    # jobs take their placement from SLURM/submitit, never from the submitting shell's variables
    unset = f"unset {' '.join(PLACEMENT_VARIABLES)}"
    threads = [f"export OMP_NUM_THREADS={cfg.threads} MKL_NUM_THREADS={cfg.threads}"]
    if cfg.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        owner = " ".join(f"{k}={v}" for k, v in owner_environment().items())
        setup = [
            unset,
            # Ctrl-C reaches the whole foreground process group: the command alone handles it
            # and stops its process tree, so that no job prints a traceback into the terminal
            "trap '' INT",
            f"export {owner}",
        ] + (threads if cfg.threads else [])
        executor.update_parameters(
            timeout_min=cfg.timeout_min, tasks_per_node=cfg.tasks_per_node, setup=setup
        )
        return executor
    if check:
        check_slurm_request(cfg)
    if check or shutil.which("srun"):
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:  # a dry run where SLURM is absent: submitit's executor refuses to exist without srun
        executor = submitit.AutoExecutor(folder=folder, cluster="debug")
        executor._executor = _ScriptOnlySlurmExecutor(folder)
        executor.cluster = "slurm"
    if dependency is None and cfg.after:
        dependency = f"afterok:{cfg.after.replace(',', ':')}"
    # a job whose dependency can no longer be satisfied (the job before it failed) is cancelled
    # by SLURM instead of pending for good (DependencyNeverSatisfied)
    extra = {"kill-on-invalid-dep": "yes"} | dict(cfg.extra)
    params: dict[str, Any] = {
        "name": cfg.job_name or f"hpc-btunet-{stage}",
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.tasks_per_node,
        "timeout_min": cfg.timeout_min,
        "slurm_setup": [unset] + cfg.setup + (threads[:1] if cfg.threads else []),
        # one rank that exits with an error (or is killed) ends the whole step at once, instead
        # of leaving the others waiting in a collective for --dist-timeout
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    optional = {
        "gpus_per_node": cfg.gpus_per_node or None,
        "cpus_per_task": cfg.cpus_per_task,
        "mem_gb": cfg.mem_gb,
        "slurm_partition": cfg.partition,
        "slurm_account": cfg.account,
        "slurm_qos": cfg.qos,
        "slurm_constraint": cfg.constraint,
        "slurm_array_parallelism": cfg.array_parallelism,
        "slurm_dependency": dependency or None,
        "slurm_additional_parameters": extra or None,
    }
    params |= {k: v for k, v in optional.items() if v is not None}
    executor.update_parameters(**params)
    return executor


class _ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor for writing sbatch scripts only (``--dry-run`` without SLURM);
    it never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _submit_command(self, command: str):
        raise UserError("a dry run submits nothing")


def sbatch_script(executor: submitit.Executor, tasks: int) -> str:
    """The sbatch script ``executor`` would submit for ``tasks`` calls (an array when more than
    one), without submitting it: what a dry run shows. Built by submitit's own template."""
    from submitit.slurm.slurm import _make_sbatch_string  # the template sbatch is given

    inner = executor._executor  # AutoExecutor wraps the SlurmExecutor
    params = dict(inner.parameters)
    if tasks > 1:
        params["map_count"] = tasks
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **params)


def slurm_submit(executor: submitit.Executor, fn: Callable, configs: Sequence) -> list:
    """Submit ``Job(fn)(c)`` for each config, as one array when several; SLURM's refusal (a
    dependency it rejects, a request it cannot satisfy) becomes one ``UserError`` with its
    words."""
    job_fn = Job(fn)
    inner = getattr(executor, "_executor", executor)
    folder = submitit.core.utils.JobPaths.get_first_id_independent_folder(
        getattr(inner, "folder", Path("."))
    )
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    try:
        # submitit prints sbatch's complaint as well as raising it: said once, in the error
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            jobs = [executor.submit(job_fn, c) for c in configs]
    except submitit.core.utils.FailedJobError as e:  # sbatch's stderr is its message
        _remove_new_files(folder, before, made)
        raise UserError(f"SLURM refused the submission: {str(e).strip()}") from None
    return jobs


def _remove_new_files(folder: Path, before: set[str], made: list[Path]) -> None:
    """After a refused submission: the files submitit wrote for it (its sbatch script, the
    pickled calls) and the folders made for them go, so ``--out`` is as it was."""
    if folder.is_dir():
        for name in set(os.listdir(folder)) - before:
            path = folder / name
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
    for path in made:  # the deepest first
        with contextlib.suppress(OSError):
            path.rmdir()


def update_dependency(job_id: str, dependency: str) -> str | None:
    """Give one pending job (or array task) another dependency (``""``: none); SLURM splits an
    array task off its array record for it. Returns SLURM's complaint, or None."""
    done = _slurm("scontrol", "update", f"JobId={job_id}", f"Dependency={dependency}")
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip() or f"scontrol exited with {done.returncode}"


def slurm_queue(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """SLURM's view of the given jobs still in its queue, one entry per job or array task
    (``"123"``, ``"124_3"``): state, reason and restart count. Jobs SLURM has forgotten are
    absent; {} without SLURM."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    arrays = sorted({str(j).split("_")[0] for j in job_ids})
    fields = "ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,RestartCnt:|"
    done = _slurm("squeue", "-h", "-r", "-j", ",".join(arrays), "-O", fields)
    if done.returncode != 0:  # one id SLURM no longer knows fails the whole call: ask one by one
        lines = []
        for array in arrays:
            one = _slurm("squeue", "-h", "-r", "-j", array, "-O", fields)
            lines += one.stdout.splitlines() if one.returncode == 0 else []
    else:
        lines = done.stdout.splitlines()
    queue = {}
    for line in lines:
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 5:
            continue
        array, task, state, reason, restarts = parts[:5]
        key = array if task in ("N/A", "") else f"{array}_{task}"
        queue[key] = {"state": state, "reason": reason, "restarts": restarts}
    return queue


class Job:
    """A submitit callable: runs ``fn(cfg)``; on SLURM's warning signal submitit calls
    ``checkpoint``, which resubmits the same call. The job then resumes from its own checkpoint,
    since its output folder is its identity.

    Inside a job it also supervises: a local job watches its command and sibling ranks
    (:class:`~hpc_btunet.processes.JobWatchdog`), a failing rank names its error in the main
    log, and a user-caused ``OSError`` (full disk, no permission) becomes one clear message."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, cfg: Any) -> Any:
        env = submitit.JobEnvironment() if os.environ.get("SUBMITIT_EXECUTOR") else None
        if env is not None and os.environ["SUBMITIT_EXECUTOR"] == "local":
            JobWatchdog(env.paths.folder, str(env.job_id), env.global_rank, env.num_tasks)
        try:
            result = self.fn(cfg)
        except Exception as e:
            if env is not None and env.num_tasks > 1 and env.global_rank != 0:
                main_log = submitit.core.utils.JobPaths(env.paths.folder, env.job_id, 0).stderr
                report_failure(main_log, env.global_rank, e, env.paths.stderr)
            user = as_user_error(e)
            if env is not None:
                write_outcome(env.paths.folder, env.job_id, env.global_rank, user or e)
            if user is not None and user is not e:
                raise user from e
            raise
        if env is not None:
            write_outcome(env.paths.folder, env.job_id, env.global_rank, None)
        return result

    def checkpoint(self, cfg: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(Job(self.fn), cfg)


_DASHES = re.compile(r"^-{10,}$", re.MULTILINE)
# what a rank reports when another rank died under it: an effect, never the cause
PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "DistStoreError",
    "DistNetworkError",
    "NCCL communicator was aborted",
)


def failure_reason(error: Exception | str) -> str:
    """For a task that produced no outcome (killed, or a log's text): the line it wrote on
    stopping, else the log's last line."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip() and "----" not in line]
    ours = [line for line in lines if line.startswith("hpc-btunet: ")]
    if ours:
        return ours[-1].removeprefix("hpc-btunet: ")
    return "it ended without a result (killed by a signal or out of memory?)" + (
        f"; its log ends with: {lines[-1]}" if lines else ""
    )


@dataclass(frozen=True)
class TaskFailure:
    """Why one task of a job did not succeed: its own error (``raised``), or no outcome at all
    (killed: ``reason`` from its log)."""

    rank: int
    reason: str
    raised: bool
    log: Path

    def order(self) -> tuple[int, int]:
        """Root cause first: a task's own error, then a task killed outright, and only then the
        tasks that failed because of them (a lost peer in a collective, a stop by the
        watchdog)."""
        if self.raised:
            return (2 if any(m in self.reason for m in PEER_LOST) else 0, self.rank)
        return (3 if STOPPED_BY_SIBLING in self.reason else 1, self.rank)


def _read_log(path: Path, limit: int = 1 << 20) -> str:
    """The end of a log (at most ``limit`` bytes), "" when it cannot be read."""
    from hpc_btunet.readers import open_regular

    try:
        with open_regular(path, what="log") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read(limit).decode(errors="replace")
    except (OSError, UserError):
        return ""


def task_failures(folder: Path, job_id: str, num_tasks: int, logs: Sequence[Path]) -> list:
    """The tasks of an ended job that did not succeed, from their outcome files and logs only
    (never submitit's result pickles)."""
    outcomes = job_outcomes(folder, job_id)
    failures = []
    for k in range(num_tasks):
        outcome = outcomes.get(k)
        if outcome is not None and outcome.state == "done":
            continue
        if outcome is not None:
            failures.append(TaskFailure(k, outcome.message, True, logs[k]))
        else:
            failures.append(TaskFailure(k, failure_reason(_read_log(logs[k])), False, logs[k]))
    return failures


def root_cause(failures: Sequence[TaskFailure]) -> TaskFailure:
    return min(failures, key=TaskFailure.order)


# on a shared file system a finished task's outcome may show up a little after SLURM says done
_OUTCOME_GRACE_S = 30.0


def _result(job: submitit.Job, label: str) -> None:
    """Wait for every task of ``job``; on failure raise one ``UserError`` with the root cause
    (:meth:`TaskFailure.order`)."""
    tasks = [job] if job.num_tasks == 1 else [job.task(k) for k in range(job.num_tasks)]
    for task in tasks:
        task.wait()
    folder, job_id = job.paths.folder, str(job.job_id)
    grace = 0.0 if isinstance(job, submitit.LocalJob) else _OUTCOME_GRACE_S
    deadline = time.monotonic() + grace
    while True:
        failures = task_failures(folder, job_id, len(tasks), [t.paths.stderr for t in tasks])
        if not failures or any(f.raised for f in failures) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not failures:
        return
    cause = root_cause(failures)
    where = f" (rank {cause.rank})" if len(tasks) > 1 else ""
    raise UserError(f"{label} failed{where}: {cause.reason}\n  log: {cause.log}") from None


def _check_run_folders(
    cfg: LaunchConfig, configs: Sequence, labels: Sequence[str], stage: str
) -> list[int]:
    """Indices of the configs still to run; complete ones are announced and skipped. A folder
    being written, or started with other options, stops the submission (``UserError``)."""
    todo = []
    for i, c in enumerate(configs):
        if c.check_run_folder(cfg.world_size):
            print(f"{stage}: {labels[i]} is complete ({c.result_file()}), skipped")
        else:
            todo.append(i)
    return todo


def submit(
    cfg: LaunchConfig,
    stage: str,
    fn: Callable,
    configs: Sequence,
    labels: Sequence[str],
    parallel: int = 1,
) -> list:
    """Submit ``fn(c)`` for each job config (one SLURM array when several), print what was
    submitted, and with ``--wait`` wait and return. Configs whose run is complete are skipped;
    see :meth:`hpc_btunet.train.job.JobConfig.check_run_folder` for what stops a submission."""
    todo = _check_run_folders(cfg, configs, labels, stage)
    if not todo:
        return []
    if cfg.executor == "debug":
        results = []
        for i in todo:
            print(f"{stage}: running {labels[i]} in this process (debug executor)")
            results.append(Job(fn)(configs[i]))
        return results
    array = len(todo) > 1 and cfg.executor == "slurm"
    executor = make_executor(cfg, stage)
    if cfg.executor == "slurm":
        jobs = slurm_submit(executor, fn, [configs[i] for i in todo])
        first = jobs[0].job_id.split("_")[0]
        what = f"array job {first} of {len(jobs)} task(s)" if array else f"job {first}"
        print(
            f"{stage}: submitted {what} to SLURM ({cfg.nodes} node(s) x {cfg.tasks_per_node} task(s)"
            f"{', after ' + cfg.after if cfg.after else ''})"
        )
        for i, job in zip(todo, jobs, strict=True):
            print(
                f"  {job.job_id}  {labels[i]}  log {job.paths.stdout}  output {configs[i].run_dir()}"
            )
        if cfg.wait:
            for i, job in zip(todo, jobs, strict=True):
                _result(job, f"{stage} job {job.job_id} ({labels[i]})")
            print(f"{stage}: {len(jobs)} job(s) completed")
        else:
            print(f"{stage}: watch with `squeue -j {first}`; outputs appear as listed")
        return jobs
    return _run_here(
        executor,
        stage,
        Job(fn),
        [configs[i] for i in todo],
        [labels[i] for i in todo],
        parallel,
    )


def _run_here(
    executor, stage: str, fn: Callable, configs: list, labels: list[str], parallel: int
) -> list:
    """The local executor: run at most ``parallel`` jobs at once on this machine and wait; the
    first failure stops the command (which stops the other jobs)."""
    outcomes = run_local(executor, stage, fn, configs, labels, parallel, stop_on_failure=True)
    return [job for job, _ in outcomes]


def run_local(
    executor,
    stage: str,
    fn: Callable,
    configs: list,
    labels: list[str],
    parallel: int,
    stop_on_failure: bool = False,
    started: Callable[[int, Any], None] = lambda i, job: None,
    poll: Callable[[], None] = lambda: None,
) -> list[tuple[Any, str | None]]:
    """Run ``fn(c)`` for each config as local jobs, at most ``parallel`` at once (the jobs are
    child processes of this command; the command line stops them if it is stopped). Returns per
    config (job, None) or (job, the failure's message); with ``stop_on_failure`` the first
    failure is raised instead. ``started(i, job)`` is called as each job starts and ``poll()``
    about twice a second while jobs run (progress lines)."""
    fn = fn if isinstance(fn, Job) else Job(fn)  # its outcome file, the watchdog
    jobs: list = [None] * len(configs)
    outcomes: list = [None] * len(configs)
    running: list[int] = []
    pending = list(range(len(configs)))
    quiet = not stop_on_failure  # a caller that collects outcomes prints its own lines
    while pending or running:
        while pending and len(running) < max(1, parallel):
            i = pending.pop(0)
            jobs[i] = executor.submit(fn, configs[i])
            started(i, jobs[i])
            if not quiet:
                print(
                    f"{stage}: started {labels[i]} as local job {jobs[i].job_id}; "
                    f"log: {jobs[i].paths.stdout}"
                )
            running.append(i)
        done = [i for i in running if jobs[i].done()]
        for i in done:
            running.remove(i)
            try:
                _result(jobs[i], f"{stage} job {jobs[i].job_id} ({labels[i]})")
                outcomes[i] = (jobs[i], None)
            except UserError as e:
                if stop_on_failure:
                    raise
                outcomes[i] = (jobs[i], str(e))
        if running and not done:
            poll()
            time.sleep(0.5)
    return outcomes
