"""The ``experiment`` command: the BT-Unet study as one plan of jobs.

Per model, one pre-training job and one array of folds x {bt, scratch} fine-tuning tasks whose
``bt`` tasks start after that model's pre-training succeeded (``afterok``) while its ``scratch``
tasks do not wait; then one report job after every array (``afterany``: the report is written
even when a fold failed, and names it). SLURM cannot give the tasks of one array different
dependencies at submission, so the array is submitted with the pre-training dependency and the
``scratch`` tasks are then freed of it (``scontrol update``, which splits a pending task off its
array record); every job is submitted with ``--kill-on-invalid-dep=yes``, so that the tasks of a
failed pre-training are cancelled instead of pending for good, and the report still runs.

On SLURM the plan is submitted and the command returns (``--wait``: waits, showing progress);
with the local or debug executor the same plan runs on this machine in the foreground, one
progress line per stage. ``<out>/experiment.json`` records the plan and, per task, the job that
last ran it, so that a rerun skips what is complete or still queued and resubmits what failed,
and ``status`` works after the submitting shell is gone. A rerun never deletes or overwrites a
finished result: a run folder with its result is skipped, one started with other options is
refused before anything is submitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_btunet.atomic import write_json
from hpc_btunet.config import add_arguments, from_dict, load_yaml
from hpc_btunet.errors import UserError
from hpc_btunet.launch import (
    LaunchConfig,
    make_executor,
    run_local,
    sbatch_script,
    slurm_queue,
    slurm_submit,
    update_dependency,
)
from hpc_btunet.readers import read_json, read_yaml

EXPERIMENT_FILE = "experiment.json"
FORMAT = 1
VARIANTS = ("bt", "scratch")
# launch options a stage may set for itself (--pretrain-nodes 4, --finetune-gpus-per-node 1)
STAGE_RESOURCES = (
    "nodes",
    "tasks_per_node",
    "gpus_per_node",
    "cpus_per_task",
    "mem_gb",
    "time",
    "partition",
    "qos",
    "constraint",
    "threads",
    "array_parallelism",
)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _option_sets() -> tuple[list[str], list[str], list[str]]:
    """(options every job shares, pre-training's own, fine-tuning's own)."""
    from hpc_btunet.train.finetune import FinetuneConfig
    from hpc_btunet.train.job import JobConfig
    from hpc_btunet.train.pretrain import PretrainConfig

    common = [n for n in _names(JobConfig) if n != "model"]
    pre = [n for n in _names(PretrainConfig) if n not in common and n != "model"]
    fine = [n for n in _names(FinetuneConfig) if n not in common + ["model", "fold", "pretrained"]]
    return common, pre, fine


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    from hpc_btunet.train.finetune import FinetuneConfig
    from hpc_btunet.train.job import JobConfig
    from hpc_btunet.train.pretrain import PretrainConfig

    common, pre, fine = _option_sets()
    add_arguments(p, JobConfig, only=tuple(common))  # with --config: a YAML of these flags
    p.add_argument("--models", default="all", help="comma-separated models, or 'all'")
    p.add_argument(
        "--folds", type=int, help="folds 0..K-1 of the labelled subset (default: all of them)"
    )
    p.add_argument(
        "--variants", default="bt,scratch", help="bt, scratch or bt,scratch (Table 2: both)"
    )
    p.add_argument(
        "--paper",
        help="the report shows the paper's Table 2 for this dataset beside the results "
        "(kdsb18, busis, isic2018, brats)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="local executor: fine-tuning jobs running at once on this machine",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and the sbatch scripts it would submit; submit nothing",
    )
    g = p.add_argument_group("pre-training of every model (--pretrain-*)")
    add_arguments(g, PretrainConfig, only=tuple(pre), prefix="pretrain", with_config=False)
    g = p.add_argument_group("fine-tuning of every fold (--finetune-*)")
    add_arguments(g, FinetuneConfig, only=tuple(fine), prefix="finetune", with_config=False)
    g = p.add_argument_group("where and with what resources: every stage")
    add_arguments(g, LaunchConfig, skip=("logs",), with_config=False)
    for stage in ("pretrain", "finetune"):
        g = p.add_argument_group(f"resources of the {stage} stage alone (--{stage}-*)")
        add_arguments(g, LaunchConfig, only=STAGE_RESOURCES, prefix=stage, with_config=False)


@dataclass
class Task:
    """One job of the plan: ``label`` names it everywhere (record, status, messages)."""

    stage: str  # pretrain | finetune | report
    label: str  # pretrain/unet, finetune/unet/bt/fold-0, report
    config: Any
    model: str | None = None
    variant: str | None = None

    def result_file(self) -> Path:
        return self.config.result_file()

    def run_dir(self) -> Path:
        return self.config.run_dir()


@dataclass
class Plan:
    out: Path
    data: Path
    manifest_sha256: str
    models: list[str]
    variants: list[str]
    folds: int
    pretrain: list[Task]
    finetune: list[Task]
    report: Task
    launch: dict[str, LaunchConfig]
    parallel: int = 1
    dry_run: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[Task]:
        return self.pretrain + self.finetune + [self.report]


def _given(args: argparse.Namespace, known: set[str]) -> dict[str, Any]:
    """Values of the YAML ``--config`` (its keys: the flags' names, e.g. ``pretrain_epochs``),
    then the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"--config {args.config}: unknown key(s) {', '.join(unknown)}; the keys are the "
                "options' names, e.g. pretrain_epochs, finetune_gpus_per_node, models"
            )
    return values | {k: v for k, v in vars(args).items() if k in known and v is not None}


def _stage_error(stage: str, e: UserError) -> UserError:
    """A job config's complaint names its own flag (``--epochs``); here it is the stage's."""
    hint = f" (the {stage} stage's own options are --{stage}-*)" if stage != "report" else ""
    return UserError(f"{stage} stage: {e}{hint}")


def model_names(models: str) -> list[str]:
    from hpc_btunet.models import list_models

    known = list_models()
    names = known if models == "all" else [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise UserError(
            f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(known)} or 'all'"
        )
    return list(dict.fromkeys(names))


def known_options() -> set[str]:
    """Every option of ``experiment`` by its name (the flag without dashes, ``_`` for ``-``)."""
    common, pre, fine = _option_sets()
    launch_names = [n for n in _names(LaunchConfig) if n != "logs"]
    own = ["models", "folds", "variants", "paper", "parallel", "dry_run"]
    return set(
        common
        + own
        + launch_names
        + [f"pretrain_{n}" for n in pre]
        + [f"finetune_{n}" for n in fine]
        + [f"{s}_{n}" for s in ("pretrain", "finetune") for n in STAGE_RESOURCES]
    )


def build_plan(given: dict[str, Any]) -> Plan:
    """The plan of an experiment from its options by name (``known_options``), every option
    checked; nothing is submitted."""
    from hpc_btunet.data.manifest import MANIFEST_NAME, load_manifest, sha256_file
    from hpc_btunet.report import ReportConfig
    from hpc_btunet.train.finetune import FinetuneConfig
    from hpc_btunet.train.pretrain import PretrainConfig

    common, pre, fine = _option_sets()
    launch_names = [n for n in _names(LaunchConfig) if n != "logs"]
    unknown = sorted(set(given) - known_options())
    if unknown:
        raise UserError(f"unknown experiment option(s): {', '.join(unknown)}")
    shared = {k: given[k] for k in common if k in given}
    if shared.get("data") is None:
        raise UserError("--data is required: a packed dataset (see `hpc-btunet pack`)")
    shared.setdefault("out", "experiments/" + Path(str(shared["data"])).name)
    out, data = Path(shared["out"]), Path(shared["data"])
    models = model_names(str(given.get("models", "all")))
    variants = [v.strip() for v in str(given.get("variants", "bt,scratch")).split(",")]
    if not variants or not set(variants) <= set(VARIANTS):
        raise UserError(f"--variants {given.get('variants')!r}: use bt, scratch or bt,scratch")
    variants = [v for v in VARIANTS if v in variants]
    manifest = load_manifest(data)
    n_folds = len(manifest.folds)
    if n_folds == 0:
        raise UserError(
            f"{data} has no labelled subset or folds (packed without masks): fine-tuning needs "
            "a labelled dataset"
        )
    folds = given.get("folds", n_folds)
    if not isinstance(folds, int) or not 1 <= folds <= n_folds:
        raise UserError(f"--folds {folds}: {data} has {n_folds} folds; ask for 1 to {n_folds}")
    parallel = given.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise UserError(f"--parallel {parallel}: ask for 1 or more jobs at once")

    def stage_values(stage: str, names: list[str]) -> dict[str, Any]:
        return shared | {n: given[f"{stage}_{n}"] for n in names if f"{stage}_{n}" in given}

    def launch_for(stage: str, **fixed: Any) -> LaunchConfig:
        values = {n: given[n] for n in launch_names if n in given}
        values |= {n: given[f"{stage}_{n}"] for n in STAGE_RESOURCES if f"{stage}_{n}" in given}
        try:
            return from_dict(LaunchConfig, values | fixed | {"logs": out / "logs"}, stage)
        except UserError as e:
            raise _stage_error(stage, e) from None

    launch = {
        "pretrain": launch_for("pretrain"),
        "finetune": launch_for("finetune"),
        # the report reads files and draws: one process, no GPU, an hour at most
        "report": launch_for(
            "report", nodes=1, tasks_per_node=1, gpus_per_node=0, time="1:00:00", threads=None
        ),
    }
    pretrain_tasks, finetune_tasks = [], []
    try:
        for model in models if "bt" in variants else []:
            cfg = from_dict(PretrainConfig, stage_values("pretrain", pre) | {"model": model})
            pretrain_tasks.append(Task("pretrain", f"pretrain/{model}", cfg, model))
    except UserError as e:
        raise _stage_error("pretrain", e) from None
    try:
        for model in models:
            for variant in variants:
                encoder = (
                    PretrainConfig(data=data, out=out, model=model).result_file()
                    if variant == "bt"
                    else None
                )
                for fold in range(folds):
                    values = stage_values("finetune", fine) | {
                        "model": model,
                        "fold": fold,
                        "pretrained": encoder,
                    }
                    cfg = from_dict(FinetuneConfig, values)
                    label = f"finetune/{model}/{variant}/fold-{fold}"
                    finetune_tasks.append(Task("finetune", label, cfg, model, variant))
    except UserError as e:
        raise _stage_error("finetune", e) from None
    report_cfg = ReportConfig(
        experiment=out,
        paper=given.get("paper"),
        wandb=shared.get("wandb", "offline"),
        project=shared.get("project", "hpc_btunet"),
    )
    report = Task("report", "report", report_cfg)
    return Plan(
        out=out,
        data=data,
        manifest_sha256=sha256_file(data / MANIFEST_NAME),
        models=models,
        variants=variants,
        folds=folds,
        pretrain=pretrain_tasks,
        finetune=finetune_tasks,
        report=report,
        launch=launch,
        parallel=parallel,
        dry_run=bool(given.get("dry_run", False)),
        options={k: str(v) if isinstance(v, Path) else v for k, v in given.items()},
    )


# --- the record ----------------------------------------------------------------------------


# bounds of what a record may claim, checked before it sizes a plan or a table
MAX_FOLDS = 100
MAX_MODELS = 64
MAX_TASKS = 20_000
_RECORD_LIMIT = 16 * 1024 * 1024  # bytes
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a model's name: one path component
_TASK_TEXT = ("job_id", "executor", "log", "output", "submitted")


def _record_problem(record: Any) -> str | None:
    """What is wrong with a parsed record (its first problem, naming the field), or None."""
    if not isinstance(record, dict):
        return f"holds {type(record).__name__}, not an experiment record"
    if record.get("format") != FORMAT:
        return f"is not an experiment record of this version (format {FORMAT})"
    for key in ("data", "manifest_sha256", "executor"):
        if key in record and not isinstance(record[key], str):
            return f"field {key!r} must be text, got {record[key]!r:.60}"
    models = record.get("models", [])
    if not isinstance(models, list) or len(models) > MAX_MODELS:
        return f"field 'models' must be a list of at most {MAX_MODELS} names"
    bad = [m for m in models if not isinstance(m, str) or not _NAME.match(m) or m in (".", "..")]
    if bad:
        return f"field 'models' holds {bad[0]!r:.60}, not a model's name"
    variants = record.get("variants", [])
    if not isinstance(variants, list) or not all(v in VARIANTS for v in variants):
        return f"field 'variants' must be a list of {' and '.join(VARIANTS)}, got {variants!r:.60}"
    folds = record.get("folds", 0)
    if not isinstance(folds, int) or isinstance(folds, bool) or not 0 <= folds <= MAX_FOLDS:
        return f"field 'folds' must be a whole number from 0 to {MAX_FOLDS}, got {folds!r:.60}"
    tasks = record.get("tasks", {})
    if not isinstance(tasks, dict) or len(tasks) > MAX_TASKS:
        return f"field 'tasks' must be a mapping of at most {MAX_TASKS} tasks"
    for label, entry in tasks.items():
        if not isinstance(entry, dict):
            return f"task {label!r:.80} must be a mapping, got {entry!r:.60}"
        for key in _TASK_TEXT:
            if key in entry and not isinstance(entry[key], str):
                return f"task {label!r:.80}: field {key!r} must be text, got {entry[key]!r:.60}"
        dependency, started = entry.get("dependency"), entry.get("started")
        if dependency is not None and not isinstance(dependency, str):
            return f"task {label!r:.80}: field 'dependency' must be text, got {dependency!r:.60}"
        if started is not None and (
            not isinstance(started, int | float) or isinstance(started, bool)
        ):
            return f"task {label!r:.80}: field 'started' must be a number, got {started!r:.60}"
    if not isinstance(record.get("submissions", []), list):
        return "field 'submissions' must be a list"
    return None


def load_record(out: Path) -> dict[str, Any] | None:
    """``<out>/experiment.json``, checked (types, bounds, model names that are one path
    component), or None when the folder holds no experiment. A damaged or edited record is one
    ``UserError`` naming the file, the field and the fix."""
    path = Path(out) / EXPERIMENT_FILE
    if not os.path.lexists(path):
        return None
    fix = (
        "move it away; a rerun of `experiment` writes it anew (finished results are kept and "
        "skipped)"
    )
    try:
        record = read_json(path, limit=_RECORD_LIMIT, what="experiment record", fix=fix)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): {fix}") from None
    problem = _record_problem(record)
    if problem:
        raise UserError(f"{path} {problem}: {fix}")
    record.setdefault("tasks", {})
    return record


def _recorded_datasets(plan: Plan) -> set[tuple[str, str]]:
    """(dataset, manifest sha256) of what the experiment folder already holds: the record, and
    the run folders' config.yaml (runs started by `pretrain`/`finetune` by hand)."""
    found = set()
    record = load_record(plan.out)
    if record is not None:
        found.add((str(record.get("data")), str(record.get("manifest_sha256"))))
    for config in sorted(Path(plan.out).glob("pretrain/*/config.yaml")) + sorted(
        Path(plan.out).glob("finetune/*/*/fold-*/config.yaml")
    ):
        try:
            recorded = read_yaml(config)
            sha = recorded["provenance"]["manifest_sha256"]
            data = recorded["config"]["data"]
        except (UserError, KeyError, TypeError, OSError):
            continue  # the job's own identity check names a damaged run folder
        found.add((str(data), str(sha)))
    return found


def check_same_dataset(plan: Plan) -> None:
    other = [(d, s) for d, s in _recorded_datasets(plan) if s != plan.manifest_sha256]
    if other:
        data, sha = other[0]
        raise UserError(
            f"--out {plan.out} holds results of another dataset ({data}, manifest sha256 "
            f"{sha[:12]}...), not of {plan.data} ({plan.manifest_sha256[:12]}...): choose another "
            f"--out for this dataset, or pass --data {data} to continue that experiment"
        )


def _merged_record(plan: Plan, executor: str) -> dict[str, Any]:
    record = load_record(plan.out) or {"format": FORMAT, "tasks": {}, "submissions": []}
    models = list(dict.fromkeys(list(record.get("models", [])) + plan.models))
    variants = [v for v in VARIANTS if v in set(record.get("variants", [])) | set(plan.variants)]
    return record | {
        "format": FORMAT,
        "data": str(plan.data),
        "manifest_sha256": plan.manifest_sha256,
        "models": models,
        "variants": variants,
        "folds": max(int(record.get("folds", 0)), plan.folds),
        "executor": executor,
    }


def save_record(out: Path, record: dict[str, Any]) -> None:
    write_json(Path(out) / EXPERIMENT_FILE, record)


def _process_start(job_id: str) -> float | None:
    """The start time of a local job's process, recorded with its pid: a pid is reused once
    its process is gone, the pair is not."""
    import psutil

    try:
        return psutil.Process(int(job_id)).create_time()
    except (ValueError, psutil.Error):
        return None


def _note_job(record: dict, task: Task, job: Any, executor: str, **extra: Any) -> None:
    if executor == "local":
        extra.setdefault("started", _process_start(str(job.job_id)))
    record["tasks"][task.label] = {
        "job_id": str(job.job_id),
        "executor": executor,
        "log": str(job.paths.stderr),
        "output": str(task.run_dir()),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


# --- what is left to do ----------------------------------------------------------------------


def classify(plan: Plan, record: dict | None) -> dict[str, str]:
    """Per task label: ``complete`` (its result exists), ``queued`` (its recorded SLURM job is
    still in the queue: not submitted again) or ``todo``. A run folder that a live job writes,
    or that holds a run with other options, is refused here, before anything is submitted."""
    tasks = plan.pretrain + plan.finetune
    entries = (record or {}).get("tasks", {})
    slurm_ids = [
        e["job_id"] for e in entries.values() if e.get("executor") == "slurm" and e.get("job_id")
    ]
    queue = slurm_queue(slurm_ids)
    states = {}
    for task in tasks:
        entry = entries.get(task.label) or {}
        if task.result_file().exists():
            states[task.label] = "complete"
        elif entry.get("executor") == "slurm" and entry.get("job_id") in queue:
            states[task.label] = "queued"
        else:
            states[task.label] = "todo"
    for task in tasks:
        if states[task.label] == "queued":
            continue
        world = plan.launch[task.stage].world_size
        if task.config.check_run_folder(world):
            states[task.label] = "complete"
    return states


def _preflight(plan: Plan, states: dict[str, str]) -> None:
    for task in plan.pretrain + plan.finetune:
        if states[task.label] == "todo":
            launch = plan.launch[task.stage]
            try:
                task.config.preflight(launch.world_size, launch.device_type)
            except UserError as e:
                raise _stage_error(task.stage, e) from None


# --- the command ------------------------------------------------------------------------------


def run_experiment(args: argparse.Namespace) -> int:
    return execute(build_plan(_given(args, known_options())))


def execute(plan: Plan) -> int:
    """Submit (SLURM) or run (this machine) what the plan has left to do."""
    check_same_dataset(plan)
    record = load_record(plan.out)
    states = classify(plan, record)
    _preflight(plan, states)
    executor = plan.launch["pretrain"].executor
    done = [t for t in plan.pretrain + plan.finetune if states[t.label] == "complete"]
    queued = [t for t in plan.pretrain + plan.finetune if states[t.label] == "queued"]
    print(
        f"experiment: {plan.out} - dataset {plan.data} (manifest {plan.manifest_sha256[:12]}), "
        f"models {', '.join(plan.models)}, variants {', '.join(plan.variants)}, "
        f"{plan.folds} fold(s), executor {executor}"
    )
    if done:
        print(f"  complete, skipped: {', '.join(t.label for t in done)}")
    if queued:
        print(f"  still queued, not submitted again: {', '.join(t.label for t in queued)}")
    if plan.dry_run:
        if executor != "slurm":
            _print_local_plan(plan, states)
        else:
            _submit_slurm(plan, states, record, dry_run=True)
        return 0
    record = _merged_record(plan, executor)
    record.setdefault("submissions", []).append(
        {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "executor": executor} | plan.options
    )
    Path(plan.out).mkdir(parents=True, exist_ok=True)
    save_record(plan.out, record)
    if executor == "slurm":
        _submit_slurm(plan, states, record, dry_run=False)
        if plan.launch["pretrain"].wait:
            from hpc_btunet.status import wait_for_experiment

            return wait_for_experiment(plan.out)
        return 0
    return _run_on_this_machine(plan, states, record)


# --- SLURM -----------------------------------------------------------------------------------


def _and(*parts: str | None) -> str:
    return ",".join(p for p in parts if p)


def _submit_slurm(plan: Plan, states: dict[str, str], record: dict | None, dry_run: bool) -> None:
    """Submit the tasks left to do (or, with ``dry_run``, print what would be submitted)."""
    from hpc_btunet.train import finetune, pretrain

    entries = (record or {}).get("tasks", {})
    after = plan.launch["pretrain"].after
    external = f"afterok:{after.replace(',', ':')}" if after else ""
    waits: list[str] = []  # jobs the report waits for (queued before, or submitted now)
    submitted = 0
    scripts: list[tuple[str, str]] = []

    def submit(stage: str, fn, tasks: list[Task], dependency: str, what: str) -> list[str]:
        nonlocal submitted
        launch = plan.launch[stage]
        executor = make_executor(
            launch,
            stage,
            dependency=dependency,
            check=not dry_run,
        )
        if dry_run:
            scripts.append((what, sbatch_script(executor, len(tasks))))
            placeholder = f"<{what}>"
            return [
                placeholder if len(tasks) == 1 else f"{placeholder}_{k}" for k in range(len(tasks))
            ]
        jobs = slurm_submit(executor, fn, [t.config for t in tasks])
        for task, job in zip(tasks, jobs, strict=True):
            _note_job(record, task, job, "slurm", dependency=dependency or None)
        save_record(plan.out, record)
        submitted += len(jobs)
        return [str(job.job_id) for job in jobs]

    pre_ids: dict[str, str] = {}
    for task in plan.pretrain:
        launch = plan.launch["pretrain"]
        if states[task.label] == "queued":
            pre_ids[task.model] = entries[task.label]["job_id"]
            waits.append(pre_ids[task.model])
        elif states[task.label] == "todo":
            (job_id,) = submit("pretrain", pretrain.run, [task], external, task.label)
            pre_ids[task.model] = job_id
            waits.append(job_id)
            print(
                f"  {task.label:<34} job {job_id} ({launch.nodes} node(s) x "
                f"{launch.tasks_per_node} task(s){', after ' + after if after else ''})\n"
                f"  {'':<34} output {task.run_dir()}"
            )
    for model in plan.models:
        tasks = [t for t in plan.finetune if t.model == model]
        waits += [entries[t.label]["job_id"] for t in tasks if states[t.label] == "queued"]
        todo = [t for t in tasks if states[t.label] == "todo"]
        if not todo:
            continue
        todo.sort(key=lambda t: t.variant != "scratch")  # scratch tasks first: they start now
        pre = pre_ids.get(model)
        waiting = pre is not None and any(t.variant == "bt" for t in todo)
        dependency = _and(external, f"afterok:{pre}" if waiting else "")
        ids = submit("finetune", finetune.run, todo, dependency, f"finetune/{model}")
        array = ids[0].rsplit("_", 1)[0] if len(ids) > 1 else ids[0]
        waits.append(array)
        freed, kept = [], []
        if waiting:
            for task, job_id in zip(todo, ids, strict=True):
                if task.variant != "scratch":
                    continue
                complaint = None if dry_run else update_dependency(job_id, external)
                if complaint is None:
                    freed.append(job_id)
                else:
                    kept.append(f"{job_id} ({complaint})")
        kind = f"array {array} of {len(ids)} task(s)" if len(ids) > 1 else f"job {array}"
        rule = (
            f"bt tasks after {pre} (afterok), scratch tasks at once"
            if waiting
            else "no task waits for pre-training"
        )
        print(f"  {'finetune/' + model:<34} {kind}: {rule}")
        for task, job_id in zip(todo, ids, strict=True):
            print(f"    {job_id:<14} {task.label.removeprefix('finetune/'):<32} {task.run_dir()}")
        if dry_run and freed:
            print(
                f"    then `scontrol update JobId=<task> Dependency={external}` frees each scratch task"
            )
        if kept:
            print(
                "    warning: SLURM kept the pre-training dependency of scratch task(s) "
                f"{'; '.join(kept)}: they start after pre-training instead"
            )
    report_queued = (entries.get("report") or {}).get("job_id") in slurm_queue(
        [entries["report"]["job_id"]] if entries.get("report") else []
    )
    report_missing = not plan.report.result_file().exists()
    if submitted or dry_run and waits or (report_missing and not report_queued):
        dependency = _and(external, "afterany:" + ":".join(dict.fromkeys(waits)) if waits else "")
        (job_id,) = submit("report", _run_report_job, [plan.report], dependency, "report")
        print(
            f"  {'report':<34} job {job_id}"
            + (" after every array (afterany)" if waits else "")
            + f"\n  {'':<34} output {plan.report.run_dir()}"
        )
    elif report_queued:
        print(f"  report: job {entries['report']['job_id']} is still queued")
    print(f"  logs: {Path(plan.out) / 'logs'}")
    if dry_run:
        for what, script in scripts:
            print(f"\n# --- sbatch script: {what} " + "-" * max(0, 60 - len(what)))
            print(script.rstrip())
        print("\nexperiment: dry run, nothing submitted")
    elif submitted:
        print(
            f"experiment: submitted {submitted} job(s); follow them with "
            f"`hpc-btunet status --experiment {plan.out}` (add --watch to refresh)"
        )
    else:
        print("experiment: nothing to submit")


def _run_report_job(cfg) -> Path:
    from hpc_btunet.report import run

    return run(cfg)


# --- this machine ----------------------------------------------------------------------------


def _print_local_plan(plan: Plan, states: dict[str, str]) -> None:
    for stage in ("pretrain", "finetune"):
        todo = [t.label for t in getattr(plan, stage) if states[t.label] == "todo"]
        if todo:
            print(f"  {stage}: {len(todo)} job(s): {', '.join(todo)}")
    print("  report: after the fine-tuning jobs")
    print("experiment: dry run, nothing run")


def _run_on_this_machine(plan: Plan, states: dict[str, str], record: dict) -> int:
    """The plan in the foreground: pre-training one model at a time, then the fine-tuning jobs
    (``--parallel`` at once), then the report, whatever failed; the bt tasks of a model whose
    pre-training failed are not run. Fails at the end, naming every task that failed."""
    from hpc_btunet.status import Progress, stage_line
    from hpc_btunet.train import finetune, pretrain

    start = time.perf_counter()
    failed: dict[str, str] = {}
    progress = Progress()
    stage_times: dict[str, float] = {}

    def run_stage(stage: str, fn, tasks: list[Task], parallel: int) -> None:
        if not tasks:
            return
        tick = time.perf_counter()
        launch = plan.launch[stage]
        executor = make_executor(launch, stage)
        labels = [t.label for t in tasks]
        jobs: dict[str, Any] = {}
        if executor is None:  # debug: in this process, one after the other
            from hpc_btunet.launch import Job

            outcomes = []
            for task in tasks:
                print(f"{stage}: running {task.label} in this process (debug executor)")
                try:
                    Job(fn)(task.config)
                    outcomes.append((None, None))
                except UserError as e:
                    outcomes.append((None, str(e)))
        else:

            def started(i: int, job) -> None:
                jobs[tasks[i].label] = job
                _note_job(record, tasks[i], job, "local")
                save_record(plan.out, record)

            outcomes = run_local(
                executor,
                stage,
                fn,
                [t.config for t in tasks],
                labels,
                parallel,
                started=started,
                poll=lambda: progress.show(stage_line(stage, tasks, jobs)),
            )
        for task, (_, error) in zip(tasks, outcomes, strict=True):
            if error is not None:
                failed[task.label] = error
        stage_times[stage] = time.perf_counter() - tick
        progress.done(stage_line(stage, tasks, jobs) + f" in {stage_times[stage]:.0f} s")

    todo = [t for t in plan.pretrain if states[t.label] == "todo"]
    run_stage("pretrain", pretrain.run, todo, 1)
    blocked = {t.model for t in plan.pretrain if t.label in failed}
    todo = []
    for task in plan.finetune:
        if states[task.label] != "todo":
            continue
        if task.variant == "bt" and task.model in blocked:
            failed[task.label] = f"not run: pre-training of {task.model} failed"
            continue
        todo.append(task)
    run_stage("finetune", finetune.run, todo, plan.parallel)
    report_error = None
    try:
        report_md = _run_report_job(plan.report.config)
        print(f"report: {report_md}")
    except UserError as e:
        report_error = str(e)
    wall = time.perf_counter() - start
    if failed or report_error:
        lines = [f"{label}: {why}" for label, why in failed.items()]
        if report_error:
            lines.append(f"report: {report_error}")
        raise UserError(
            f"experiment finished in {wall:.0f} s with {len(lines)} failure(s):\n  "
            + "\n  ".join(lines)
            + f"\n  (`hpc-btunet status --experiment {plan.out}` lists every task; rerun the "
            "same command to run what failed again: finished results are kept)"
        )
    print(f"experiment: finished in {wall:.0f} s ({wall / 60:.1f} min)")
    return 0
