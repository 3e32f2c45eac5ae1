"""Options every job shares, and their checks; each job's config extends ``JobConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpc_btunet.config import option
from hpc_btunet.errors import UserError
from hpc_btunet.tracking import MODES


@dataclass
class JobConfig:
    data: Path | None = option(None, "packed dataset (folder with manifest.json)")
    model: str = option(
        "unet", "model: unet, attention_unet, inception_unet, rca_iunet, unet_plus_plus"
    )
    out: Path = option(Path("experiments/default"), "experiment folder; the job writes below it")
    base_width: int = option(16, "channels of the model's first stage")
    depth: int = option(4, "encoder stages (downsamplings)")
    num_workers: int = option(0, "DataLoader worker processes per rank")
    seed: int = option(0, "seed of the weights, data order and augmentations")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    wandb: str = option(
        "offline", "Weights & Biases: offline (sync later), online or disabled", choices=MODES
    )
    project: str = option("hpc_btunet", "Weights & Biases project")

    def __post_init__(self) -> None:
        if self.data is None:
            raise UserError("--data is required: a packed dataset (see `hpc-btunet pack`)")
        if getattr(self, "lr", 1.0) <= 0:
            raise UserError("--lr must be positive")
        self.require_positive("base_width", "depth")

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )

    def model_options(self) -> dict:
        return {"base_width": self.base_width, "depth": self.depth}

    def preflight(self) -> None:
        """The checks a job would fail on at its start (dataset, model, image size), made before
        it is submitted, so that a mistake costs no queue time."""
        from hpc_btunet.data import load_manifest
        from hpc_btunet.models import build_model, check_input_size

        manifest = load_manifest(self.data)
        model = build_model(self.model, in_channels=manifest.channels, **self.model_options())
        check_input_size(model, manifest.image_size)
        fold = getattr(self, "fold", None)
        if fold is not None:
            manifest.fold_keys(fold)
