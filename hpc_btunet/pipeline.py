"""The ``demo`` pipeline: pack the built-in dataset, then the ``experiment`` plan on it (pre-train,
fine-tune every fold with and without Barlow Twins, report), all on this machine through the
local executor.

The jobs are the cluster's jobs (``pretrain.run``, ``finetune.run``, ``report.run``) run as local
processes by submitit; only their sizes are small, so that the whole demo fits in minutes on 2
CPU cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from hpc_btunet.config import check_values, option
from hpc_btunet.data.manifest import MANIFEST_NAME, load_manifest
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model, check_input_size


@dataclass
class DemoConfig:
    out: Path = option(Path("experiments/demo"), "experiment folder")
    data: Path = option(
        Path("shards/demo"), "where the built-in dataset is packed (reused if complete)"
    )
    models: str = option("unet", "comma-separated model names, or 'all'")
    num_images: int = option(300, "synthetic images to pack", min=1)
    image_size: int = option(64, "image size (a size every model takes: see docs/models.md)")
    folds: int = option(5, "cross-validation folds", min=2)
    labelled_fraction: float = option(0.2, "labelled share of the train split", above=0, max=1)
    pretrain_epochs: int = option(40, "pre-training epochs", min=1)
    pretrain_batch_size: int = option(16, "pre-training batch size", min=2)
    pretrain_lr: float = option(1e-3, "pre-training learning rate", above=0)
    finetune_epochs: int = option(
        30, "most fine-tuning epochs (early stopping may end sooner)", min=1
    )
    finetune_batch_size: int = option(8, "fine-tuning batch size", min=1)
    patience: int = option(6, "early-stopping patience (epochs)", min=1)
    executor: str = option(
        "local", "local (processes) or debug (in-process)", choices=("local", "debug")
    )
    wandb: str = option(
        "offline",
        "Weights & Biases: offline (synced later with `wandb sync`), online or disabled",
        choices=("offline", "online", "disabled"),
    )
    parallel: int = option(2, "fine-tuning jobs running at once", min=1)
    threads: int = option(1, "torch threads per job", min=1)
    seed: int = option(0, "seed of data, weights and views")

    def __post_init__(self) -> None:
        check_values(self)
        for name in ("out", "data"):
            if Path(getattr(self, name)).is_file():
                raise UserError(f"--{name} {getattr(self, name)} is a file: choose a folder")

    def model_names(self) -> list[str]:
        from hpc_btunet.experiment import model_names

        return model_names(self.models)


def _pack_demo_data(cfg: DemoConfig) -> None:
    from hpc_btunet.data.pack import PackConfig, pack
    from hpc_btunet.data.synthetic import SyntheticSource

    wanted = {"num_images": cfg.num_images, "seed": cfg.seed}
    if (Path(cfg.data) / MANIFEST_NAME).exists():
        m = load_manifest(cfg.data)
        same = (
            m.image_size == cfg.image_size
            and m.source.get("kind") == "synthetic"
            and all(m.source.get(k) == v for k, v in wanted.items())
            and len(m.folds) == cfg.folds
            and m.fractions["labelled"] == cfg.labelled_fraction
        )
        if same:
            print(f"demo: reusing the packed dataset {cfg.data}")
            return
        raise UserError(
            f"{cfg.data} holds a different dataset than this demo needs: remove it or pass --data"
        )
    splits = SplitConfig(labelled_fraction=cfg.labelled_fraction, folds=cfg.folds, seed=cfg.seed)
    pack(
        SyntheticSource(num_images=cfg.num_images, seed=cfg.seed),
        PackConfig(out=cfg.data, image_size=cfg.image_size, splits=splits),
    )
    print(
        f"demo: packed {cfg.num_images} synthetic images ({cfg.image_size}x{cfg.image_size}) into {cfg.data}"
    )


def _check_sizes(cfg: DemoConfig, models: list[str]) -> None:
    """What the jobs would refuse after the dataset is packed, refused before."""
    for name in models:
        check_input_size(build_model(name, in_channels=1), cfg.image_size)
    train = cfg.num_images - round(SplitConfig().test_fraction * cfg.num_images)
    if train < cfg.pretrain_batch_size:
        raise UserError(
            f"--num-images {cfg.num_images} leaves {train} training images, fewer than one "
            f"pre-training batch (--pretrain-batch-size {cfg.pretrain_batch_size}): pack more "
            "images or lower the batch size"
        )


def demo(cfg: DemoConfig) -> str:
    """Run the whole demo (the ``experiment`` plan on the built-in dataset, on this machine);
    returns the Markdown table."""
    from hpc_btunet.experiment import build_plan, execute

    start = time.perf_counter()
    models = cfg.model_names()
    _check_sizes(cfg, models)
    _pack_demo_data(cfg)
    plan = build_plan(
        {
            "data": cfg.data,
            "out": cfg.out,
            "models": ",".join(models),
            "folds": cfg.folds,
            "seed": cfg.seed,
            "device": "cpu",
            "wandb": cfg.wandb,
            "executor": cfg.executor,
            "time": "2:00:00",
            "parallel": cfg.parallel,
            # pre-training gets the whole machine (one job at a time), fine-tuning shares it
            "pretrain_threads": cfg.parallel * cfg.threads,
            "finetune_threads": cfg.threads,
            "pretrain_epochs": cfg.pretrain_epochs,
            "pretrain_batch_size": cfg.pretrain_batch_size,
            "pretrain_lr": cfg.pretrain_lr,
            "pretrain_checkpoint_every": 100,
            "finetune_epochs": cfg.finetune_epochs,
            "finetune_batch_size": cfg.finetune_batch_size,
            "finetune_patience": cfg.patience,
        }
    )
    execute(plan)
    folder = Path(cfg.out) / "report"
    table = (folder / "table.md").read_text()
    wall = time.perf_counter() - start
    print(
        f"\n{table}\nReport: {folder}/report.md (table, figures, statistics)\n"
        f"demo: finished in {wall:.0f} s ({wall / 60:.1f} min)"
    )
    return table
