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
from hpc_btunet.data.manifest import MANIFEST_NAME, sha256_file
from hpc_btunet.errors import UserError
from hpc_btunet.tracking import MODES


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
    num_workers: int = option(0, "DataLoader worker processes per rank", min=0)
    seed: int = option(0, "seed of the weights, data order and augmentations")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", identity=False)
    wandb: str = option(
        "offline",
        "Weights & Biases: offline (sync later), online or disabled",
        choices=MODES,
        identity=False,
    )
    project: str = option("hpc_btunet", "Weights & Biases project", identity=False)
    force_resume: bool = option(
        False,
        "resume or complete a run folder written with other options (the differences are "
        "listed and recorded in its config.yaml)",
        identity=False,
    )

    # the file whose existence makes the run complete, and the largest world size the job takes
    result_name: ClassVar[str] = ""
    max_world_size: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if self.data is None:
            raise UserError("--data is required: a packed dataset (see `hpc-btunet pack`)")
        check_values(self)
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file: choose a folder (new or existing)")

    def run_dir(self) -> Path:
        raise NotImplementedError

    def result_file(self) -> Path:
        return self.run_dir() / self.result_name

    def model_options(self) -> dict:
        return {"base_width": self.base_width, "depth": self.depth}

    def identity(self, world_size: int) -> dict:
        """What the result depends on: options, dataset and inputs by content, world size."""
        values = to_dict(self)
        options = {f.name: values[f.name] for f in fields(self) if f.metadata.get("identity", True)}
        return {
            "options": options,
            "dataset_manifest_sha256": self._manifest_sha256(),
            **self.input_identity(),
            "world_size": world_size,
        }

    def check_run_folder(self, world_size: int) -> bool:
        """Before submission: is the run complete (to skip it)? Refuses a run folder that a live
        job is writing, or that was started (or completed) with another identity."""
        from hpc_btunet.folder_lock import check_unlocked
        from hpc_btunet.train.run import RunDir

        check_unlocked(self.run_dir(), "run folder")
        complete = self.result_file().exists()
        identity = self.identity(world_size)
        RunDir(self.run_dir()).check(identity, complete, self.force_resume, "run folder")
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

    def preflight(self, world_size: int = 1) -> None:
        """The checks a job would fail on at its start (dataset, model, image size, batch,
        world size), made before it is submitted, so that a mistake costs no queue time."""
        from hpc_btunet.data import load_manifest
        from hpc_btunet.models import build_model, check_input_size

        self.check_world_size(world_size)
        manifest = load_manifest(self.data)
        model = build_model(self.model, in_channels=manifest.channels, **self.model_options())
        check_input_size(model, manifest.image_size)
        self.check_inputs(manifest, world_size)

    def check_inputs(self, manifest, world_size: int) -> None:
        """Job-specific checks against the dataset (a job overrides)."""
