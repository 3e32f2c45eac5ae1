"""``status --experiment E``: one table of an experiment's stages and tasks, and progress lines.

Everything comes from files and SLURM's queue, never from the submitting process, so status
works after the shell that submitted is gone: ``<E>/experiment.json`` (the tasks, and the job
that last ran each), the run folders (a result file means done; ``metrics.jsonl`` and
``config.yaml`` give progress), SLURM's queue (pending with its reason, running, restarts after
a preemption) and submitit's files (a failed job's error, its log). SLURM forgets finished jobs
after a few minutes; their state is then read from the files alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_btunet.errors import UserError
from hpc_btunet.readers import KB, MB, inside, open_regular, read_yaml

RESULTS = {"pretrain": "encoder.pt", "finetune": "metrics.json", "report": "report.md"}
_PREEMPTED = ("this job is preempted", "this job is timed-out")
NEVER_SATISFIED = "DependencyNeverSatisfied"


@dataclass
class Row:
    stage: str
    label: str  # without the stage: unet, unet/bt/fold-0, report
    state: str  # done, running, pending, failed, cancelled, not submitted, ...
    job_id: str = ""
    detail: str = ""


def expected_tasks(out: Path, record: dict) -> list[tuple[str, str, Path]]:
    """(stage, label, run folder) of every task the record's plan holds."""
    out = Path(out)
    tasks = []
    if "bt" in record.get("variants", []):
        tasks += [("pretrain", f"pretrain/{m}", out / "pretrain" / m) for m in record["models"]]
    for m in record.get("models", []):
        for v in record.get("variants", []):
            for k in range(int(record.get("folds", 0))):
                label = f"finetune/{m}/{v}/fold-{k}"
                tasks.append(("finetune", label, out / "finetune" / m / v / f"fold-{k}"))
    tasks.append(("report", "report", out / "report"))
    return tasks


def _tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of a regular file as text; "" when it cannot be read (absent,
    not a regular file: a named pipe is never opened for reading)."""
    try:
        with open_regular(path, what="log") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read(size).decode(errors="replace")
    except (OSError, UserError):
        return ""


def _tail_record(path: Path) -> dict | None:
    """The last complete JSON line of a ``metrics.jsonl`` (read from its end)."""
    for line in reversed(_tail(path, 8 * KB).splitlines()):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            return record
    return None


def _config(run_dir: Path) -> dict:
    try:
        config = read_yaml(run_dir / "config.yaml", limit=MB).get("config")
    except (OSError, UserError):
        return {}
    return config if isinstance(config, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def task_progress(stage: str, run_dir: Path) -> str:
    """Where a running task is: pre-training's step and loss, fine-tuning's epoch (a field of
    the wrong type in a hand-edited file is left out, never a crash)."""
    last = _tail_record(run_dir / "metrics.jsonl")
    config = _config(run_dir)
    if stage == "pretrain":
        total = _count(config.get("total_steps"))
        if last is None:
            return "starting" + (f" ({total} steps)" if total else "")
        of = f"/{total}" if total else ""
        loss = _number(last.get("loss"))
        step = _count(last.get("step"))
        return f"step {step if step is not None else '?'}{of}" + (
            f" loss {loss:.4g}" if loss is not None else ""
        )
    if stage == "finetune":
        if last is None:
            return "starting"
        epochs = _count(config.get("epochs"))
        of = f"/{epochs}" if epochs else ""
        epoch = _count(last.get("epoch"))
        val = _number(last.get("val_loss"))
        return f"epoch {epoch + 1 if epoch is not None else '?'}{of}" + (
            f" val loss {val:.3f}" if val is not None else ""
        )
    return ""


def _requeues(log: Path) -> int:
    text = _tail(log, 4 * MB)
    return sum(text.count(marker) for marker in _PREEMPTED)


def _failure(out: Path, entry: dict) -> tuple[str, str]:
    """(state, detail) of a job that left the queue without its result, from its outcome
    files and log (never submitit's pickles); a log path outside the experiment is not read."""
    from hpc_btunet.launch import root_cause, task_failures

    log = inside(entry.get("log") or "", out)
    if log is None or not entry.get("log"):
        return "failed", f"its log {entry.get('log')!r} is not inside {out}: not read"
    job_id = str(entry.get("job_id", ""))
    rank_logs = sorted(log.parent.glob(f"{glob.escape(job_id)}_*_log.err"))
    num_tasks = max(1, sum(p.name[len(job_id) + 1 : -len("_log.err")].isdigit() for p in rank_logs))
    logs = [log.parent / f"{job_id}_{k}_log.err" for k in range(num_tasks)]
    failures = task_failures(log.parent, job_id, num_tasks, logs)
    if not failures:  # every task said done, yet the result file is not there
        return "failed", f"it ended without writing its result (log {log})"
    if not any(f.raised for f in failures) and not os.path.lexists(log):
        dependency = entry.get("dependency")
        why = f"its dependency ({dependency}) failed, or scancel" if dependency else "scancel?"
        return "cancelled", f"never started ({why})"
    cause = root_cause(failures)
    reason = [line for line in cause.reason.splitlines() if line.strip()] or [""]
    return "failed", f"{reason[-1]} (log {cause.log})"


def _pid_alive(entry: dict) -> bool:
    """Whether a local job's process still runs: its pid and, since a pid is reused once its
    process is gone, its start time as recorded (an older record without it: a submitit job's
    command line)."""
    import psutil

    try:
        process = psutil.Process(int(entry.get("job_id", "")))
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = entry.get("started")
        if isinstance(started, int | float) and not isinstance(started, bool):
            return abs(process.create_time() - started) < 0.01
        return any("submitit" in part for part in process.cmdline())
    except (ValueError, psutil.Error):
        return False


def collect(out: Path) -> tuple[dict, list[Row]]:
    from hpc_btunet.experiment import load_record
    from hpc_btunet.launch import slurm_queue

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"--experiment {out} is not a folder: pass the --out of `experiment`")
    record = load_record(out)
    if record is None:
        raise UserError(
            f"{out} holds no {out.name}/experiment.json: it was not made by `hpc-btunet experiment` "
            "(`report --experiment` still reads its results)"
        )
    entries = record.get("tasks", {})
    queue = slurm_queue(
        [e["job_id"] for e in entries.values() if e.get("executor") == "slurm" and "job_id" in e]
    )
    rows = []
    for stage, label, run_dir in expected_tasks(out, record):
        entry = entries.get(label) or {}
        job_id = str(entry.get("job_id", ""))
        log = inside(entry["log"], out) if entry.get("log") else None
        requeued = _requeues(log) if log else 0
        short = label.removeprefix(f"{stage}/")
        slurm = entry.get("executor") == "slurm"
        result = run_dir / RESULTS[stage]
        # a job still queued comes first: a report being rewritten is not done yet
        live = job_id in queue if slurm else (not result.exists() and _pid_alive(entry))
        if entry and live:
            q = queue.get(job_id, {"state": "RUNNING", "reason": "None", "restarts": "0"})
            restarts = max(int(q.get("restarts") or 0), requeued)
            state = q["state"].lower()
            if restarts:
                state = f"{state}, preempted and requeued ({restarts}x)"
            detail = task_progress(stage, run_dir) if q["state"] == "RUNNING" else ""
            if q["state"] == "PENDING" and q.get("reason") not in (None, "", "None"):
                detail = f"waiting: {q['reason']}"
            if q["state"] == "PENDING" and q.get("reason") == NEVER_SATISFIED:
                state = "cancelled"  # what SLURM makes of it (--kill-on-invalid-dep)
                detail = (
                    f"its dependency ({entry.get('dependency') or 'a job before it'}) ended "
                    "without success, so it can never start: SLURM cancels it"
                )
            rows.append(Row(stage, short, state, job_id, detail))
            continue
        if result.exists():
            note = f" after {requeued} requeue(s)" if requeued else ""
            rows.append(Row(stage, short, "done", job_id, f"{result}{note}"))
            continue
        if not entry:
            rows.append(Row(stage, short, "not submitted", "", str(run_dir)))
            continue
        state, detail = _failure(out, entry)
        rows.append(Row(stage, short, state, job_id, detail))
    return record, rows


def render(out: Path, record: dict, rows: list[Row]) -> str:
    head = (
        f"experiment {out}: dataset {record.get('data')} (manifest "
        f"{str(record.get('manifest_sha256'))[:12]}), models {', '.join(record.get('models', []))}, "
        f"{record.get('folds')} fold(s), executor {record.get('executor')}"
    )
    widths = [
        max([len(getattr(r, name)) for r in rows] + [len(title)])
        for name, title in (("stage", "stage"), ("label", "task"), ("state", "state"))
    ]
    id_width = max([len(r.job_id) for r in rows] + [3])
    lines = [
        head,
        f"{'stage':<{widths[0]}}  {'task':<{widths[1]}}  {'state':<{widths[2]}}  "
        f"{'job':<{id_width}}  detail",
    ]
    for r in rows:
        lines.append(
            f"{r.stage:<{widths[0]}}  {r.label:<{widths[1]}}  {r.state:<{widths[2]}}  "
            f"{r.job_id:<{id_width}}  {r.detail}".rstrip()
        )
    lines.append(summary(rows))
    return "\n".join(lines)


def _kind(state: str) -> str:
    return state.split(",")[0].split(" (")[0]


def summary(rows: list[Row]) -> str:
    parts = []
    for stage in ("pretrain", "finetune", "report"):
        mine = [r for r in rows if r.stage == stage]
        if not mine:
            continue
        counts: dict[str, int] = {}
        for r in mine:
            counts[_kind(r.state)] = counts.get(_kind(r.state), 0) + 1
        others = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k != "done")
        parts.append(
            f"{stage} {counts.get('done', 0)}/{len(mine)} done" + (f" ({others})" if others else "")
        )
    return "summary: " + "; ".join(parts)


def _live(rows: list[Row]) -> bool:
    return any(_kind(r.state) in ("pending", "running", "configuring", "completing") for r in rows)


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experiment", type=Path, required=True, help="experiment folder (the --out of experiment)"
    )
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=10.0,
        help="refresh every SECONDS (default 10) until no task is pending or running",
    )


def run_status(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        raise UserError(f"--watch {args.watch}: give a refresh period in seconds, above 0")
    while True:
        record, rows = collect(args.experiment)
        text = render(args.experiment, record, rows)
        if args.watch is not None and sys.stdout.isatty():
            print("\x1b[H\x1b[2J" + text, flush=True)  # the table in place of the last one
        else:
            print(text, flush=True)
        if args.watch is None or not _live(rows):
            return 1 if any(_kind(r.state) in ("failed", "cancelled") for r in rows) else 0
        time.sleep(args.watch)
        if not sys.stdout.isatty():
            print()


def wait_for_experiment(out: Path, period: float = 5.0) -> int:
    """``experiment --wait`` on SLURM: one progress line until nothing is queued, then the
    table; fails naming the tasks that failed."""
    progress = Progress()
    while True:
        record, rows = collect(out)
        if not _live(rows):
            break
        progress.show(summary(rows).removeprefix("summary: "))
        time.sleep(period)
    progress.done(summary(rows).removeprefix("summary: "))
    print(render(out, record, rows))
    bad = [r for r in rows if _kind(r.state) in ("failed", "cancelled")]
    if bad:
        raise UserError(
            f"{len(bad)} task(s) did not finish: "
            + ", ".join(f"{r.stage}/{r.label} ({r.state})" for r in bad)
        )
    return 0


class Progress:
    """One progress line: rewritten in place on a terminal, else printed when it changed and at
    most every ``every`` seconds (a log file gets a line now and then, not one per poll)."""

    def __init__(self, stream=None, every: float = 30.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every
        self.last = ""
        self.when = -math.inf  # never printed: the first line goes out at once

    def show(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        elif text != self.last and now - self.when >= self.every:
            print(text, file=self.stream, flush=True)
            self.when = now
        self.last = text

    def done(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)
        self.last, self.when = "", -math.inf


def stage_line(stage: str, tasks: list, jobs: dict[str, Any]) -> str:
    """A stage on this machine in one line: pre-training's step and loss, fine-tuning's folds."""
    finished = {t.label for t in tasks if t.result_file().exists()}
    done = len(finished)
    running = [  # a job whose result is written but whose process is still exiting is done
        t for t in tasks if t.label in jobs and not jobs[t.label].done() and t.label not in finished
    ]
    ended = [t for t in tasks if t.label in jobs and jobs[t.label].done()]
    failed = sum(not t.result_file().exists() for t in ended)
    where = "; ".join(
        f"{t.label.removeprefix(stage + '/')} {task_progress(stage, t.run_dir())}" for t in running
    )
    text = f"{stage}: {done}/{len(tasks)} done"
    text += f", {failed} failed" if failed else ""
    return text + (f"; {where}" if where else "")
