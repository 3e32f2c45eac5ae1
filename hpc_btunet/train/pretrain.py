"""The ``pretrain`` job: Barlow Twins pre-training of a model's encoder on the train split, no labels.

``run(cfg)`` reads top to bottom: data, model, wrap for DDP, resume from the last checkpoint,
train, write ``encoder.pt``. It runs the same in-process, as local processes or as a SLURM job;
its output folder ``<out>/pretrain/<model>/`` is its identity (complete: skipped; checkpointed:
resumed).

The same run on any hardware. The global batch is G = world size W x ``--accumulate`` K x
``--batch-size`` B, made of W*K slices of B images: at micro-batch k, rank r takes slice k*W + r
(the loader's global batches of W*B, K of them per step). Which images form global batch s (the
loader's global order), their two views (seeded by their place in the global batch) and the loss
(over all G embeddings) do not depend on how G is split; BatchNorm sees slice k*W + r (local
scope) or the W slices of micro-batch k (global scope), the same images whatever W. So runs with
the same G and BatchNorm batch follow the same trajectory: W ranks x B = one process x W*B (global
scope), W ranks x B = one process x K=W micro-batches of B (local scope). The identity of a run
holds G and the BatchNorm batch instead of the world size, so a checkpoint resumes on another
number of ranks that keeps them.

``--accumulate K`` is exact (the gradient cache): every micro-batch is embedded once without
gradient, the loss and its gradient with respect to the G embeddings are computed on the whole
batch, then each micro-batch is embedded again with gradient and the cached embedding gradient is
back-propagated; memory stays that of one micro-batch, at the cost of one more forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hpc_btunet.config import option, to_dict
from hpc_btunet.data import DataWait, load_manifest, make_loader
from hpc_btunet.errors import UserError
from hpc_btunet.global_batchnorm import batch_groups, frozen_statistics, groups_supported
from hpc_btunet.models import build_model, check_input_size, model_signature
from hpc_btunet.ssl import BarlowTwinsLoss, Projector, TwoViews, ViewConfig, cross_correlation_stats
from hpc_btunet.train.checkpoint import latest_checkpoint, save_weights
from hpc_btunet.train.engine import BN_SCOPES, Engine
from hpc_btunet.train.integrity import verify_before_training
from hpc_btunet.train.job import StepJobConfig
from hpc_btunet.train.optim import OPTIMIZERS, build_optimizer, warmup_cosine
from hpc_btunet.train.session import Session, run_job

MIN_GLOBAL_BATCH = 2
# pixels per micro-batch up to which a CPU embeds both views in one forward (TwinStep.one_pass):
# on the project's 2-core machine, 2 gloo ranks, one forward was 12-25 % faster per step at
# 16 x 64 x 64 and 13 % slower at 32 x 256 x 256
ONE_PASS_CPU_PIXELS = 16 * 128 * 128


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class PretrainConfig(StepJobConfig):
    batch_size: int = option(
        32,
        "images per rank and micro-batch; the global batch is this x --accumulate x world size",
        min=1,
    )
    accumulate: int = option(
        1,
        "micro-batches per optimiser step, the loss and its gradient exact over all of them "
        "(gradient cache): a large global batch on few GPUs, at one more forward pass",
        min=1,
    )
    bn_scope: str = option(
        "global",
        "BatchNorm statistics over: global (every rank's micro-batch together) or local (each "
        "rank's micro-batch alone); running statistics always count every sample once",
        choices=BN_SCOPES,
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

    result_name: ClassVar[str] = "encoder.pt"
    splits_read: ClassVar[tuple[str, ...]] = ("train",)
    layout_options: ClassVar[tuple[str, ...]] = ("batch_size", "accumulate", "bn_scope")
    identity_hints: ClassVar[dict[str, str]] = {
        "batch": "the global batch is --batch-size x --accumulate x world size, and BatchNorm "
        "sees --batch-size (x world size with --bn-scope global): to resume on another number "
        "of ranks keep both, e.g. twice the --batch-size on half the ranks"
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer == "lars" and self.engine == "deepspeed" and self.zero_stage > 0:
            raise UserError(
                f"--optimizer lars with --zero-stage {self.zero_stage}: LARS scales each tensor's "
                "update by that tensor's norms, but ZeRO hands the optimiser flat partitions "
                "that mix tensors; use --zero-stage 0, --engine ddp, or --optimizer adam"
            )

    def label(self) -> str:
        return self.model

    def run_dir(self) -> Path:
        return Path(self.out) / "pretrain" / self.label()

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accumulate * world_size

    def bn_batch(self, world_size: int) -> int:
        """The samples each BatchNorm statistic is computed over."""
        return self.batch_size * (world_size if self.bn_scope == "global" else 1)

    def batch_identity(self, world_size: int) -> dict:
        return {
            "batch": {
                "global": self.global_batch(world_size),
                "batchnorm": self.bn_batch(world_size),
            }
        }

    def describe_batch(self, world_size: int) -> str:
        accumulate = f" x {self.accumulate} micro-batches" if self.accumulate > 1 else ""
        return (
            f"{world_size} rank(s){accumulate} x batch {self.batch_size} = global batch "
            f"{self.global_batch(world_size)}, BatchNorm over {self.bn_batch(world_size)} "
            f"({self.bn_scope})"
        )

    def check_inputs(self, manifest, world_size: int) -> None:
        global_batch = self.global_batch(world_size)
        layout = self.describe_batch(world_size)
        if global_batch < MIN_GLOBAL_BATCH:
            raise UserError(
                f"a global batch of {global_batch} ({layout}): Barlow Twins normalises over the "
                f"batch and needs at least {MIN_GLOBAL_BATCH} images; raise --batch-size"
            )
        if self.bn_batch(world_size) < 2:
            raise UserError(
                f"BatchNorm over 1 image ({layout}) cannot normalise: raise --batch-size"
                + (" or use --bn-scope global" if world_size > 1 else "")
            )
        if manifest.counts["train"] < global_batch:
            raise UserError(
                f"the train split of {self.data} holds {manifest.counts['train']} images, fewer "
                f"than one global batch ({layout}): lower --batch-size or --accumulate, or use "
                "fewer ranks"
            )


class SiameseNet(nn.Module):
    """Encoder + projector: an image batch to embeddings (one DDP module for both)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x)[-1])


class TwinStep:
    """One optimiser step of Barlow Twins on this rank's share of a global batch:
    ``twin_step(micro_batches, step) -> (loss, z_a, z_b)`` (``micro_batches``: the rank's K
    uint8 batches of step ``step``; the embeddings are detached).

    With one micro-batch: views, forward, the loss over the global batch, ``engine.step``. With
    K > 1, the gradient cache (module docstring): BatchNorm running statistics are frozen during
    the first pass, so each sample updates them once.
    """

    def __init__(
        self,
        engine: Engine,
        net: nn.Module,
        loss_fn: BarlowTwinsLoss,
        views: TwoViews,
        *,
        seed: int,
        global_batch: int,
        checkpoints: Path | None = None,
    ) -> None:
        self.engine, self.net, self.loss_fn, self.views = engine, net, loss_fn, views
        self.seed, self.global_batch = seed, global_batch
        self.checkpoints = checkpoints
        # both views in one forward is possible where every BatchNorm keeps their statistics
        # apart (ours: several ranks on CPU, --bn-scope local, DeepSpeed half precision)
        self.groups = groups_supported(engine.module)

    def one_pass(self, images: torch.Tensor) -> bool:
        """Whether to embed both views in one forward: one collective per BatchNorm layer for
        both instead of one each, but convolutions over twice the batch, which on a CPU are
        slower per image once they leave the caches (measured in docs/architecture.md). So:
        on a GPU always, on a CPU up to ``ONE_PASS_CPU_PIXELS`` pixels per micro-batch."""
        if not self.groups:
            return False
        pixels = images.shape[0] * images.shape[-1] * images.shape[-2]
        return self.engine.device.type == "cuda" or pixels <= ONE_PASS_CPU_PIXELS

    def _embed(self, images: torch.Tensor, step: int, k: int) -> tuple:
        """Both views of this rank's micro-batch ``k`` (``B`` images), embedded. Micro-batch
        ``k`` of rank ``r`` is slice ``k * W + r`` of the global batch (module docstring)."""
        e = self.engine
        x = images.to(e.device, non_blocking=True)
        offset = (k * e.world_size + e.rank) * x.shape[0]  # its place in the global batch
        view_a, view_b = self.views(
            x, seed=self.seed, step=step, offset=offset, total=self.global_batch
        )
        with e.autocast():
            if not self.one_pass(images):
                return self.net(e.inputs(view_a)), self.net(e.inputs(view_b))
            with batch_groups(e.module, 2):
                return self.net(e.inputs(torch.cat([view_a, view_b]))).chunk(2)

    def _check(self, loss: torch.Tensor, step: int) -> None:
        if not self.engine.all_finite(loss.detach()):
            good = None if self.checkpoints is None else latest_checkpoint(self.checkpoints)
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {step}: training stopped; the last good "
                f"checkpoint is {good or 'none (no checkpoint was written yet)'}; lower --lr or "
                "check the data"
            )

    def __call__(self, micro_batches: list[torch.Tensor], step: int) -> tuple:
        if len(micro_batches) == 1:
            z_a, z_b = self._embed(micro_batches[0], step, 0)
            loss = self.loss_fn(z_a, z_b)
            self._check(loss, step)
            self.engine.step(loss)
            return loss.detach(), z_a.detach(), z_b.detach()
        with torch.no_grad(), frozen_statistics(self.engine.module):
            parts = [self._embed(x, step, k) for k, x in enumerate(micro_batches)]
        z_a = torch.cat([a for a, _ in parts]).float().requires_grad_()
        z_b = torch.cat([b for _, b in parts]).float().requires_grad_()
        loss = self.loss_fn(z_a, z_b)  # row order does not matter to the loss
        self._check(loss, step)
        grad_a, grad_b = torch.autograd.grad(loss, [z_a, z_b])
        start = 0
        for k, x in enumerate(micro_batches):
            rows = slice(start, start + x.shape[0])
            start = rows.stop
            part_a, part_b = self._embed(x, step, k)
            # d(surrogate)/d(parameters) = sum over the micro-batch's embeddings of
            # dL/dz * dz/d(parameters): the exact gradient of the whole batch's loss
            surrogate = (part_a.float() * grad_a[rows]).sum()
            self.engine.step(surrogate + (part_b.float() * grad_b[rows]).sum())
        return loss.detach(), z_a.detach(), z_b.detach()


def run(cfg: PretrainConfig) -> Path:
    """Pre-train; returns the path of ``encoder.pt``."""
    return run_job(cfg, "pretrain", cfg.label(), lambda session: _pretrain(cfg, session))


def _pretrain(cfg: PretrainConfig, session: Session) -> Path:
    engine = session.engine
    manifest = load_manifest(session.data)
    cfg.check_world_size(engine.world_size)
    cfg.check_inputs(manifest, engine.world_size)
    if cfg.verify:
        verify_before_training(
            session.data,
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

    # the loader's global batches are micro-batch steps: K of them make an optimiser step
    loader = make_loader(
        session.data,
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
    per_epoch = len(loader) // cfg.accumulate
    total = cfg.steps or cfg.epochs * per_epoch
    global_batch = cfg.global_batch(engine.world_size)
    optimizer = build_optimizer(cfg.optimizer, siamese, cfg.lr, cfg.weight_decay, global_batch)
    scheduler = warmup_cosine(optimizer, total, cfg.warmup_steps)
    net = engine.prepare(siamese, optimizer, scheduler)
    twin_step = TwinStep(
        engine,
        net,
        BarlowTwinsLoss(lambd=cfg.lambd),
        TwoViews(ViewConfig(crop_scale=(cfg.crop_scale, 1.0), rotation_degrees=cfg.rotation)),
        seed=cfg.seed,
        global_batch=global_batch,
        checkpoints=session.rundir.checkpoints,
    )

    step, last_loss, seconds_before = 0, float("nan"), 0.0
    if (state := session.resume()) is not None:
        step, last_loss = state["step"], state["loss"]
        seconds_before = state.get("train_seconds", 0.0)  # the earlier starts' training time
        session.log(f"resuming from {session.last} (step {step} of {total})")
        if state.get("global_batch", global_batch) != global_batch:  # only with --force-resume
            session.log(
                f"the global batch changes from {state['global_batch']} to {global_batch} "
                "(--force-resume): the run no longer follows its uninterrupted trajectory"
            )
    layout = {
        "world_size": engine.world_size,
        "global_batch": global_batch,
        "batchnorm_batch": cfg.bn_batch(engine.world_size),
    }
    config = to_dict(cfg) | layout
    tracker = session.start(config | {"total_steps": total}, step, config)
    session.log(
        f"{cfg.model} on {manifest.counts['train']} images, {cfg.describe_batch(engine.world_size)}"
        f", {per_epoch} steps/epoch, {total} steps, device {engine.device}, engine {engine.kind} "
        f"({cfg.precision}), {engine.threads.threads} thread(s) per rank "
        f"({engine.threads.source})"
    )

    started = time.perf_counter()

    def train_seconds() -> float:
        """Wall time of the training loop, summed over requeues (the report's wall time)."""
        return seconds_before + time.perf_counter() - started

    def progress() -> tuple[int, dict]:
        state = {"step": step, "epoch": step // per_epoch, "loss": last_loss}
        return step, state | {"global_batch": global_batch, "train_seconds": train_seconds()}

    session.watch(progress)

    engine.train()
    tick, images, data_wait = time.perf_counter(), 0, DataWait()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        # resuming mid-epoch: the order is fixed
        loader.dataset.set_epoch(epoch, start=skip * cfg.accumulate)
        micro_batches = []
        for batch in data_wait.timed(loader):
            micro_batches.append(batch["image"])
            if len(micro_batches) < cfg.accumulate:
                continue
            loss, z_a, z_b = twin_step(micro_batches, step)
            micro_batches = []
            step, last_loss = step + 1, loss.item()
            images += global_batch
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - tick
                waited, _ = data_wait.take()
                steps_done = images // global_batch
                stats = cross_correlation_stats(z_a, z_b, gather=engine.world_size > 1)
                record = {
                    "epoch": epoch,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": images / elapsed,
                    # seconds per step this rank waited for its batches: near 0, the step is
                    # the bottleneck; near the step time, the loader is
                    "data_wait_s": waited / steps_done,
                    "train_seconds": train_seconds(),
                    **stats,
                }
                tracker.log(record, step)
                session.log(
                    f"step {step}/{total} loss {record['loss']:.4g} "
                    f"on-diag {stats['on_diag_mean']:.3f} off-diag rms {stats['off_diag_rms']:.3f} "
                    f"{record['images_per_s']:.1f} img/s, waiting for data "
                    f"{1000 * record['data_wait_s']:.0f} ms/step ({waited / elapsed:.0%})"
                )
                tick, images = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == total:
                session.save(*session.progress())
            if step >= total:
                break
            session.stop_if_preempted(save=True)
            if step % per_epoch == 0:  # the epoch's last loader batches do not make a whole step
                break

    encoder_file = cfg.result_file()
    weights = engine.export()  # every rank: gathered from ZeRO partitions
    if engine.is_main:
        signature = model_signature(cfg.model, in_channels=manifest.channels, **model_options)
        encoder = {
            k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")
        }
        save_weights(encoder_file, encoder, signature | {"image_size": manifest.image_size})
        session.log(f"wrote {encoder_file}")
    session.finish({"final_loss": last_loss, "steps": step, "train_seconds": train_seconds()})
    return encoder_file
