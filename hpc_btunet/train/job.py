"""Options every job shares, their checks, and a job's identity; each job's config extends
``JobConfig``.

A job's output folder is its identity on disk: a complete folder is skipped, an interrupted one
resumes. What makes that safe is :meth:`JobConfig.identity`: the options that change the result
(every option not marked ``identity=False``), the dataset by the sha256 of its manifest and the
pre-trained encoder by the sha256 of its file, recorded in ``config.yaml`` when the run starts.
A rerun whose identity differs is refused, before submission and again when the job starts,
with the differing options listed; ``--force-resume`` continues such a run on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from hpc_btunet.config import check_values, option, to_dict
from hpc_btunet.data.manifest import MANIFEST_NAME, SPLITS, sha256_file
from hpc_btunet.data.staging import ON_ERROR as STAGE_ON_ERROR
from hpc_btunet.errors import UserError
from hpc_btunet.tracking import MODES, resolve_mode
from hpc_btunet.train.engine import (
    ENGINES,
    PRECISIONS,
    EngineSpec,
    check_device_name,
    check_precision,
    pick_device,
)


@dataclass
class JobConfig:
    data: Path | None = option(None, "packed dataset (folder with manifest.json)", identity=False)
    model: str = option(
        "unet", "model: unet, attention_unet, inception_unet, rca_iunet, unet_plus_plus"
    )
    out: Path = option(
        Path("experiments/default"),
        "experiment folder; the job writes below it",
        identity=False,
    )
    base_width: int = option(16, "channels of the model's first stage", min=1)
    depth: int = option(4, "encoder stages (downsamplings)", min=1)
    num_workers: int = option(
        0,
        "DataLoader worker processes per rank (the data order does not depend on it)",
        min=0,
        identity=False,
    )
    seed: int = option(0, "seed of the weights, data order and augmentations")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", identity=False)
    wandb: str = option(
        "offline",
        "Weights & Biases: offline (sync later), online or disabled",
        choices=MODES,
        identity=False,
    )
    project: str = option("hpc_btunet", "Weights & Biases project", identity=False)
    engine: str = option(
        "ddp", "training engine: ddp, or deepspeed (ZeRO partitioning)", choices=ENGINES
    )
    precision: str = option(
        "fp32",
        "fp32, bf16, or fp16 (CUDA only, with loss scaling); the loss and BatchNorm statistics "
        "stay fp32",
        choices=PRECISIONS,
    )
    zero_stage: int = option(
        0,
        "DeepSpeed ZeRO stage: 0, 1 (optimiser state partitioned over ranks), 2 (and gradients)",
        choices=(0, 1, 2),
    )
    grad_clip: float = option(0.0, "clip the global gradient norm to this (0: off)", min=0)
    channels_last: bool = option(
        False, "channels-last memory format (faster convolutions on recent GPUs)", identity=False
    )
    deepspeed_config: Path | None = option(
        None,
        "a DeepSpeed JSON file merged over the config the flags generate (--engine deepspeed)",
        identity=False,
    )
    force_resume: bool = option(
        False,
        "resume or complete a run folder written with other options (the differences are "
        "listed and recorded in its config.yaml)",
        identity=False,
    )
    stage_to: Path | None = option(
        None,
        "copy the dataset once per node to this node-local folder and read it there, e.g. "
        "'$TMPDIR/hpc_btunet' in single quotes: variables and ~ are expanded on the node when "
        "the job starts (default: read --data directly)",
        identity=False,
    )
    stage_on_error: str = option(
        "fallback",
        "when --stage-to cannot hold the copy (not node-local, read-only, full): fallback "
        "(read --data directly, logged) or stop",
        choices=STAGE_ON_ERROR,
        identity=False,
    )

    # the file whose existence makes the run complete, and the largest world size the job takes
    result_name: ClassVar[str] = ""
    max_world_size: ClassVar[int | None] = None
    # options that only say how the batch is laid out over ranks; the identity holds what they
    # amount to instead (:meth:`batch_identity`), so a run resumes on another world size
    layout_options: ClassVar[tuple[str, ...]] = ()
    # a sentence added to the refusal when this top-level identity key differs
    identity_hints: ClassVar[dict[str, str]] = {}
    # the splits the job reads: what --stage-to copies
    splits_read: ClassVar[tuple[str, ...]] = SPLITS

    def __post_init__(self) -> None:
        if self.data is None:
            raise UserError("--data is required: a packed dataset (see `hpc-btunet pack`)")
        check_values(self)
        check_device_name(self.device)
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file: choose a folder (new or existing)")
        if self.engine != "deepspeed":
            if self.zero_stage:
                raise UserError(
                    f"--zero-stage {self.zero_stage} is DeepSpeed's: add --engine deepspeed"
                )
            if self.deepspeed_config is not None:
                raise UserError("--deepspeed-config needs --engine deepspeed")

    def engine_spec(self) -> EngineSpec:
        """What this job asks of its engine."""
        return EngineSpec(
            kind=self.engine,
            precision=self.precision,
            zero_stage=self.zero_stage,
            grad_clip=self.grad_clip,
            channels_last=self.channels_last,
            batch_size=self.batch_size,
            accumulate=getattr(self, "accumulate", 1),
            bn_scope=getattr(self, "bn_scope", "global"),
            deepspeed_config=self.deepspeed_config,
            device=self.device,
            timeout_s=getattr(self, "dist_timeout", 600.0),
        )

    def label(self) -> str:
        """The run's name within its stage, as log and submission lines show it: its folder
        below ``<out>/<stage>/`` (a job overrides)."""
        raise NotImplementedError

    def run_dir(self) -> Path:
        raise NotImplementedError

    def result_file(self) -> Path:
        return self.run_dir() / self.result_name

    def model_options(self) -> dict:
        return {"base_width": self.base_width, "depth": self.depth}

    def identity(self, world_size: int) -> dict:
        """What the result depends on: options, dataset and inputs by content, and how the
        batch is laid out (:meth:`batch_identity`)."""
        values = to_dict(self)
        options = {
            f.name: values[f.name]
            for f in fields(self)
            if f.metadata.get("identity", True) and f.name not in self.layout_options
        }
        engine_files = {}
        if self.deepspeed_config is not None:
            path = Path(self.deepspeed_config)
            engine_files["deepspeed_config_sha256"] = sha256_file(path) if path.is_file() else None
        return {
            "options": options,
            "dataset_manifest_sha256": self._manifest_sha256(),
            **self.input_identity(),
            **engine_files,
            **self.batch_identity(world_size),
        }

    def batch_identity(self, world_size: int) -> dict:
        """What the batch layout amounts to (a job whose result depends on it overrides)."""
        return {"world_size": world_size}

    def check_run_folder(self, world_size: int) -> bool:
        """Before submission: is the run complete (to skip it)? Refuses a run folder that a live
        job is writing, or that was started (or completed) with another identity."""
        from hpc_btunet.folder_lock import check_unlocked
        from hpc_btunet.train.checkpoint import latest_checkpoint
        from hpc_btunet.train.run import RunDir
        from hpc_btunet.train.session import check_resumable

        check_unlocked(self.run_dir(), "run folder")
        complete = self.result_file().exists()
        identity = self.identity(world_size)
        rundir = RunDir(self.run_dir())
        rundir.check_records()  # what the job reads back at its start, damaged or not
        rundir.check(identity, complete, self.force_resume, "run folder", self.identity_hints)
        last = None if complete else latest_checkpoint(rundir.checkpoints)
        if last is not None:  # what even --force-resume cannot continue
            check_resumable(last, self.engine, world_size, self.zero_stage)
        return complete

    def input_identity(self) -> dict:
        """Input files other than the dataset, by content (a job with such inputs overrides)."""
        return {}

    def _manifest_sha256(self) -> str:
        return sha256_file(Path(self.data) / MANIFEST_NAME)

    def check_world_size(self, world_size: int) -> None:
        if self.max_world_size is not None and world_size > self.max_world_size:
            raise UserError(
                f"{type(self).__name__.removesuffix('Config').lower()} runs one process per "
                f"task, but {world_size} were asked for: use --nodes 1 --tasks-per-node 1 "
                "(folds and models fan out as array tasks instead)"
            )

    def preflight(self, world_size: int = 1, device_type: str | None = None) -> None:
        """The checks a job would fail on at its start (dataset, model, image size, batch,
        world size, engine and precision), made before it is submitted, so that a mistake costs
        no queue time. ``device_type`` is where the job will run (``cuda`` or ``cpu``; None:
        this machine's)."""
        from hpc_btunet.data import load_manifest
        from hpc_btunet.models import build_model, check_input_size

        self.check_world_size(world_size)
        self.check_engine(world_size, device_type)
        resolve_mode(self.wandb)  # WANDB_MODE, which the job reads, as the flag is checked
        if self.stage_to is not None and "$" not in str(self.stage_to):
            # a path without variables is the same here and on the node: a copy inside the
            # dataset it copies is refused now (with variables, when the job stages)
            from hpc_btunet.data.staging import check_stage_to, expand

            check_stage_to(self.data, expand(self.stage_to), self.stage_to)
        manifest = load_manifest(self.data)
        model = build_model(self.model, in_channels=manifest.channels, **self.model_options())
        check_input_size(model, manifest.image_size)
        self.check_inputs(manifest, world_size)

    def check_engine(self, world_size: int, device_type: str | None = None) -> None:
        """The engine and precision on the job's device; DeepSpeed's merged config."""
        import torch

        device_type = self.job_device_type(device_type)
        check_precision(self.precision, torch.device(device_type))
        if self.engine == "deepspeed":
            from hpc_btunet.train.deepspeed_engine import build_config, import_deepspeed

            import_deepspeed(torch.device(device_type))
            build_config(self.engine_spec(), world_size)

    def job_device_type(self, device_type: str | None = None) -> str:
        """``cuda`` or ``cpu``: where the job runs, given where ``--device auto`` lands
        (``device_type``; None: this machine, where ``--device cuda:N`` must exist too)."""
        if self.device == "auto":
            return device_type or pick_device("auto").type
        if self.device == "cpu":
            return "cpu"
        if device_type is None:
            pick_device(self.device)
        elif device_type == "cpu":
            raise UserError(
                f"--device {self.device} needs a GPU, but the job asks for none: add "
                "--gpus-per-node N, or use --device cpu (or auto)"
            )
        return "cuda"

    def check_inputs(self, manifest, world_size: int) -> None:
        """Job-specific checks against the dataset (a job overrides)."""


@dataclass
class StepJobConfig(JobConfig):
    """Options of the jobs that count optimiser steps (pre-training, the contrastive pair):
    their length, checkpoints, log lines, shard verification and collective timeout."""

    epochs: int | None = option(
        20, "epochs over the train split (ignored when --steps is set)", min=1
    )
    steps: int | None = option(None, "optimiser steps in total (overrides --epochs)", min=1)
    checkpoint_every: int = option(
        50, "steps between checkpoints (and one at the end)", min=1, identity=False
    )
    log_every: int = option(10, "steps between log lines", min=1, identity=False)
    verify: bool = option(False, "check every shard's sha256 before training", identity=False)
    dist_timeout: float = option(
        600.0,
        "seconds a collective may wait for a lost rank before the job fails",
        above=0,
        identity=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is None and self.epochs is None:
            raise UserError("set --epochs (at least 1) or --steps")
