"""The ``pretrain`` job: Barlow Twins pre-training of a model's encoder on the train split, no labels.

``run(cfg)`` reads top to bottom: data, model, wrap for DDP, resume from the last checkpoint,
train, write ``encoder.pt``. It runs the same in-process, as local processes or as a SLURM job;
its output folder ``<out>/pretrain/<model>/`` is its identity (complete: skipped; checkpointed:
resumed). The loss uses global-batch statistics, so W ranks with per-rank batch B train exactly
like one process with batch W*B.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hpc_btunet.config import option, to_dict
from hpc_btunet.data import load_manifest, make_loader
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model, check_input_size, model_signature
from hpc_btunet.ssl import BarlowTwinsLoss, Projector, TwoViews, ViewConfig, cross_correlation_stats
from hpc_btunet.train.checkpoint import latest_checkpoint, save_weights
from hpc_btunet.train.integrity import verify_before_training
from hpc_btunet.train.job import JobConfig
from hpc_btunet.train.optim import OPTIMIZERS, build_optimizer, warmup_cosine
from hpc_btunet.train.session import Session, run_job

MIN_GLOBAL_BATCH = 2


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class PretrainConfig(JobConfig):
    epochs: int | None = option(
        20, "epochs over the train split (ignored when --steps is set)", min=1
    )
    steps: int | None = option(None, "optimiser steps in total (overrides --epochs)", min=1)
    batch_size: int = option(
        32, "images per rank and step; the global batch is this x world size", min=1
    )
    lr: float = option(1e-3, "learning rate (LARS: per 256 images of global batch)", above=0)
    optimizer: str = option("adam", "optimiser", choices=OPTIMIZERS)
    weight_decay: float = option(0.0, "weight decay", min=0)
    warmup_steps: int = option(0, "linear warm-up steps before the cosine decay", min=0)
    lambd: float = option(
        5e-3, "Barlow Twins off-diagonal weight (see docs: the paper's text says 0.2)", min=0
    )
    projector_width: int | None = option(
        None, "projector width (default: image size / 2, as in the paper)", min=1
    )
    projector_layers: int = option(3, "projector linear layers", min=1)
    crop_scale: float = option(
        0.5, "views: smallest crop area, as a fraction of the image", above=0, max=1
    )
    rotation: float = option(
        90.0, "views: rotations are drawn from [-ROTATION, ROTATION] degrees", min=0, max=180
    )
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

    result_name: ClassVar[str] = "encoder.pt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is None and self.epochs is None:
            raise UserError("set --epochs (at least 1) or --steps")
        if self.optimizer == "lars" and self.engine == "deepspeed" and self.zero_stage > 0:
            raise UserError(
                f"--optimizer lars with --zero-stage {self.zero_stage}: LARS scales each tensor's "
                "update by that tensor's norms, but ZeRO hands the optimiser flat partitions "
                "that mix tensors; use --zero-stage 0, --engine ddp, or --optimizer adam"
            )

    def run_dir(self) -> Path:
        return Path(self.out) / "pretrain" / self.model

    def check_inputs(self, manifest, world_size: int) -> None:
        global_batch = self.batch_size * world_size
        if global_batch < MIN_GLOBAL_BATCH:
            raise UserError(
                f"--batch-size {self.batch_size} x {world_size} rank(s) is a global batch of "
                f"{global_batch}: Barlow Twins normalises over the batch and needs at least "
                f"{MIN_GLOBAL_BATCH} images; raise --batch-size"
            )
        if manifest.counts["train"] < global_batch:
            raise UserError(
                f"the train split of {self.data} holds {manifest.counts['train']} images, fewer "
                f"than one global batch ({world_size} rank(s) x --batch-size {self.batch_size} = "
                f"{global_batch}): lower --batch-size or use fewer ranks"
            )


class SiameseNet(nn.Module):
    """Encoder + projector: an image batch to embeddings (one DDP module for both)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x)[-1])


def run(cfg: PretrainConfig) -> Path:
    """Pre-train; returns the path of ``encoder.pt``."""
    return run_job(cfg, "pretrain", cfg.model, lambda session: _pretrain(cfg, session))


def _pretrain(cfg: PretrainConfig, session: Session) -> Path:
    engine = session.engine
    manifest = load_manifest(cfg.data)
    cfg.check_world_size(engine.world_size)
    cfg.check_inputs(manifest, engine.world_size)
    if cfg.verify:
        verify_before_training(
            cfg.data,
            manifest.shards_of("train"),
            session.watcher,
            "before training (verifying shards)",
        )

    model_options = cfg.model_options()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=manifest.channels, **model_options)
    check_input_size(model, manifest.image_size)
    projector = Projector(
        model.encoder.out_channels,
        hidden_dim=cfg.projector_width or manifest.image_size // 2,
        num_layers=cfg.projector_layers,
    )
    siamese = SiameseNet(model.encoder, projector)

    loader = make_loader(
        cfg.data,
        "train",
        batch_size=cfg.batch_size,
        rank=engine.rank,
        world_size=engine.world_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        with_masks=False,
        manifest=manifest,
        pin_memory=engine.device.type == "cuda",
    )
    per_epoch = len(loader)
    total = cfg.steps or cfg.epochs * per_epoch
    global_batch = cfg.batch_size * engine.world_size
    optimizer = build_optimizer(cfg.optimizer, siamese, cfg.lr, cfg.weight_decay, global_batch)
    scheduler = warmup_cosine(optimizer, total, cfg.warmup_steps)
    net = engine.prepare(siamese, optimizer, scheduler)
    loss_fn = BarlowTwinsLoss(lambd=cfg.lambd)
    make_views = TwoViews(
        ViewConfig(crop_scale=(cfg.crop_scale, 1.0), rotation_degrees=cfg.rotation)
    )

    step, last_loss = 0, float("nan")
    if (state := session.resume()) is not None:
        step, last_loss = state["step"], state["loss"]
        session.log(f"resuming from {session.last} (step {step} of {total})")
    config = to_dict(cfg) | {"global_batch": global_batch}
    tracker = session.start(
        config | {"total_steps": total}, step, config | {"world_size": engine.world_size}
    )
    session.log(
        f"{cfg.model} on {manifest.counts['train']} images, {engine.world_size} rank(s) x "
        f"batch {cfg.batch_size} = global batch {global_batch}, {per_epoch} steps/epoch, "
        f"{total} steps, device {engine.device}, engine {engine.kind} ({cfg.precision})"
    )
    session.watch(lambda: (step, {"step": step, "epoch": step // per_epoch, "loss": last_loss}))

    engine.train()
    tick, images = time.perf_counter(), 0
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        loader.dataset.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < skip:  # resuming mid-epoch: the epoch's order is deterministic
                session.stop_if_preempted(save=False)
                continue
            x = batch["image"].to(engine.device, non_blocking=True)
            view_a, view_b = make_views(x, seed=cfg.seed, step=step, rank=engine.rank)
            with engine.autocast():
                z_a, z_b = net(engine.inputs(view_a)), net(engine.inputs(view_b))
            loss = loss_fn(z_a, z_b)
            if not engine.all_finite(loss.detach()):
                good = latest_checkpoint(session.rundir.checkpoints)
                raise TrainingDiverged(
                    f"the loss became {loss.item()} at step {step}: training stopped; the last good "
                    f"checkpoint is {good or 'none (no checkpoint was written yet)'}; lower --lr or "
                    "check the data"
                )
            engine.step(loss)
            step, last_loss = step + 1, loss.item()
            images += global_batch
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - tick
                stats = cross_correlation_stats(
                    z_a.detach(), z_b.detach(), gather=engine.world_size > 1
                )
                record = {
                    "epoch": epoch,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": images / elapsed,
                    **stats,
                }
                tracker.log(record, step)
                session.log(
                    f"step {step}/{total} loss {record['loss']:.4g} "
                    f"on-diag {stats['on_diag_mean']:.3f} off-diag rms {stats['off_diag_rms']:.3f} "
                    f"{record['images_per_s']:.1f} img/s"
                )
                tick, images = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == total:
                session.save(*session.progress())
            if step >= total:
                break
            session.stop_if_preempted(save=True)

    encoder_file = cfg.result_file()
    weights = engine.export()  # every rank: gathered from ZeRO partitions
    if engine.is_main:
        signature = model_signature(cfg.model, in_channels=manifest.channels, **model_options)
        encoder = {
            k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")
        }
        save_weights(encoder_file, encoder, signature | {"image_size": manifest.image_size})
        session.log(f"wrote {encoder_file}")
    session.finish({"final_loss": last_loss, "steps": step})
    return encoder_file
