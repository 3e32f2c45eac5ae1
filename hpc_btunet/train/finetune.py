"""The ``finetune`` job: train a whole model on the labelled subset minus fold k, validate on fold k,
test on the test split.

Every fold and both variants start from the same initial weights (seeded by ``--seed`` alone);
with ``--pretrained encoder.pt`` the encoder is then overwritten by the pre-trained one and the
decoder keeps its fresh initialisation. Adam, ReduceLROnPlateau (x0.1) on the validation loss,
early stopping with a patience, loss 0.5 * BCE + 0.5 * Dice (Eq. 4). The weights of the epoch with
the lowest validation loss are kept and tested. Output: ``<out>/finetune/<model>/<bt|scratch>/
fold-<k>/metrics.json``, written last, after ``predictions.npz`` (the test split's keys,
predicted masks and per-image metrics, for the report's figures and per-image statistics). A
checkpoint is written after every epoch, and on SLURM's warning signal after the current batch
(the signal is looked at between batches, in training, validation and testing alike); an
interrupted job resumes from the newest intact one, mid-epoch included, and evaluates the test
split from its start (a ``predictions.npz`` without ``metrics.json`` is removed first). The test
shards are verified (sha256) before training, not found damaged after it. Every
``--log-images-every`` epochs, wandb shows the first ``--log-images`` validation images with their
predicted and true masks, taken from the validation pass itself; the run's wandb summary holds
the test metrics (``test/dice``, ``test/pooled_dice``, ``test/loss``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hpc_btunet.atomic import atomic_open, write_json
from hpc_btunet.config import option, to_dict
from hpc_btunet.data import DataWait, Manifest, load_manifest, make_loader
from hpc_btunet.data.manifest import sha256_file
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model, check_input_size, load_encoder_state, model_signature
from hpc_btunet.train.checkpoint import load_weights
from hpc_btunet.train.engine import Engine
from hpc_btunet.train.integrity import verify_before_training
from hpc_btunet.train.job import JobConfig
from hpc_btunet.train.losses import BceDiceLoss
from hpc_btunet.train.metrics import SegmentationMetrics
from hpc_btunet.train.run import PENDING
from hpc_btunet.train.session import Session, run_job

PREDICTIONS_NAME = "predictions.npz"
EMPTY_RULE = (
    "per image, a metric whose denominator is zero is 1 when mask and prediction are both empty, "
    "and 0 when nothing is predicted on a non-empty mask; 'mean' averages per-image values, "
    "'pooled' sums TP/FP/FN over the test images first"
)


@dataclass
class FinetuneConfig(JobConfig):
    fold: int = option(0, "validation fold (0-based) of the labelled subset", min=0)
    pretrained: Path | None = option(
        None, "encoder.pt from pretrain (omit: train from scratch)", identity=False
    )
    epochs: int = option(50, "most epochs (early stopping usually ends sooner)", min=1)
    batch_size: int = option(8, "images per step", min=1)
    lr: float = option(1e-3, "Adam learning rate (the paper: 1e-3)", above=0)
    lr_patience: int = option(
        3, "epochs without validation improvement before the lr is cut x0.1", min=1
    )
    patience: int = option(8, "epochs without validation improvement before stopping", min=1)
    log_images_every: int = option(
        5,
        "every N epochs, show --log-images validation images with their predicted and true "
        "masks in wandb (0: never; nothing is computed for it when wandb is disabled)",
        min=0,
        identity=False,
    )
    log_images: int = option(
        4,
        "validation images shown: the first of the fold in the validation order, the same "
        "every time",
        min=1,
        identity=False,
    )

    result_name: ClassVar[str] = "metrics.json"
    max_world_size: ClassVar[int | None] = 1  # folds fan out as array tasks instead

    @property
    def variant(self) -> str:
        return "bt" if self.pretrained else "scratch"

    def label(self) -> str:
        return f"{self.model}/{self.variant}/fold-{self.fold}"

    def run_dir(self) -> Path:
        return Path(self.out) / "finetune" / self.label()

    def input_identity(self) -> dict:
        """The pre-trained encoder by content (its path may move; its weights may not change)."""
        if self.pretrained is None:
            return {"pretrained_sha256": None}
        path = Path(self.pretrained)
        return {"pretrained_sha256": sha256_file(path) if path.is_file() else PENDING}

    def check_inputs(self, manifest: Manifest, world_size: int) -> None:
        if not manifest.folds:
            raise UserError(
                f"{self.data} has no labelled subset or folds (packed without masks): pack a "
                "labelled dataset"
            )
        train_keys, val_keys = manifest.fold_keys(self.fold)
        if not train_keys:
            raise UserError(
                f"the labelled subset of {self.data} is too small for its folds: fold {self.fold} "
                "leaves nothing to train on; repack with a larger --labelled-fraction or fewer --folds"
            )
        if not val_keys:
            raise UserError(
                f"validation fold {self.fold} of {self.data} is empty: there is nothing to "
                "validate (and keep the best epoch) on; repack with more images, a larger "
                "--labelled-fraction or fewer --folds, or choose another --fold"
            )
        if not manifest.splits["test"]:
            raise UserError(
                f"the test split of {self.data} is empty: there is nothing to test the model on; "
                "repack with more images or a larger --test-fraction"
            )

    def preflight(self, world_size: int = 1, device_type: str | None = None) -> None:
        """Also: the encoder must fit this model and dataset (the job checks it again when it
        builds its model; an encoder awaited with --after is checked only then)."""
        super().preflight(world_size, device_type)
        if self.pretrained is not None and Path(self.pretrained).exists():
            build_initial_model(self, load_manifest(self.data))


def build_initial_model(cfg: FinetuneConfig, manifest: Manifest) -> nn.Module:
    """The model every fold starts from: seeded weights, then the pre-trained encoder if given."""
    options = cfg.model_options()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=manifest.channels, **options)
    check_input_size(model, manifest.image_size)
    if cfg.pretrained:
        state, signature = load_weights(cfg.pretrained, "--pretrained")
        mine = model_signature(cfg.model, in_channels=manifest.channels, **options)
        if signature is not None:
            theirs = {k: v for k, v in signature.items() if k != "image_size"}
            if theirs != mine:
                raise UserError(
                    f"--pretrained {cfg.pretrained} is an encoder of {theirs}, but this job builds {mine}: "
                    "pass the encoder.pt pre-trained for this model and options"
                )
            if signature.get("image_size", manifest.image_size) != manifest.image_size:
                raise UserError(
                    f"--pretrained {cfg.pretrained} was pre-trained on {signature['image_size']}px images "
                    f"but {cfg.data} holds {manifest.image_size}px images: use the same dataset size"
                )
        load_encoder_state(model, state, source_name=f"--pretrained {cfg.pretrained}")
    return model


class Supervised(nn.Module):
    """The model as the engine trains it: a list of logits, one per head (UNet++ with deep
    supervision trains every head; in eval mode, and for the other models, one)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.training and getattr(self.model, "deep_supervision", False):
            return self.model.forward_heads(x)
        return [self.model(x)]


class FirstImages:
    """The first ``count`` images of an evaluation pass, with their predicted and true masks,
    taken from the pass's own forward (no extra one): ``(key, image, prediction, truth)``,
    the image H x W (grayscale, or the first channel of a 2- or 4-channel image) or H x W x 3,
    the masks H x W uint8 {0, 1}."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(
        self, keys: list[str], images: torch.Tensor, binary: torch.Tensor, truth: torch.Tensor
    ) -> None:
        """A batch's kept samples: ``images`` B x C x H x W uint8, masks B x 1 x H x W."""
        for i in range(min(self.count - len(self.shown), len(keys))):
            image = images[i].cpu().numpy()
            image = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
            masks = (binary[i, 0], truth[i, 0])
            self.shown.append((keys[i], image, *(m.to(torch.uint8).cpu().numpy() for m in masks)))

    @property
    def full(self) -> bool:
        return len(self.shown) >= self.count


def supervised_loss(heads: list[torch.Tensor], loss_fn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The training loss (fp32); with deep supervision, the mean of every head's loss."""
    return sum(loss_fn(logits.float(), y) for logits in heads) / len(heads)


@torch.no_grad()
def evaluate(
    engine: Engine,
    net: nn.Module,
    loader,
    loss_fn: nn.Module,
    between_batches: Callable[[], None] = lambda: None,
    predictions: dict | None = None,
    shown: FirstImages | None = None,
) -> tuple[float, dict]:
    """Mean loss per image and segmentation metrics over the non-padded samples of ``loader``;
    ``between_batches`` runs after every batch (a preemption check). With a ``predictions``
    dict, it receives the keys, the binary masks (uint8, N x H x W) and the per-image metrics,
    in the order evaluated; ``shown`` collects the first images with their masks."""
    engine.train(False)
    metrics, total, count = SegmentationMetrics(), 0.0, 0
    keys, masks = [], []
    for batch in loader:
        keep = ~batch["pad"]
        x = engine.inputs(batch["image"][keep].float() / 255)
        y = batch["mask"][keep].to(engine.device)
        with engine.autocast():
            (logits,) = net(x)
        logits = logits.float()
        total += loss_fn(logits, y).item() * len(x)
        count += len(x)
        probabilities = torch.sigmoid(logits)
        metrics.update(probabilities, y)
        kept_keys = [k for k, kept in zip(batch["key"], keep.tolist(), strict=True) if kept]
        if predictions is not None:
            keys += kept_keys
            binary = probabilities >= metrics.threshold
            masks.append(binary[:, 0].to(torch.uint8).cpu().numpy())
        if shown is not None and not shown.full:
            binary = probabilities >= metrics.threshold
            shown.add(kept_keys, batch["image"][keep], binary, y)
        between_batches()
    engine.train(True)
    if predictions is not None:
        predictions["keys"] = np.array(keys)
        predictions["masks"] = np.concatenate(masks)
        predictions |= {m: v.numpy() for m, v in metrics.per_image().items()}
    return total / count, metrics.compute()


def write_predictions(path: Path, predictions: dict) -> None:
    """``predictions.npz``: test keys, binary masks (uint8 0/1 at the dataset's size) and
    per-image precision, Dice and IoU, compressed, written atomically."""
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **predictions)


def run(cfg: FinetuneConfig) -> Path:
    """Fine-tune one (model, fold, variant); returns the path of ``metrics.json``."""
    return run_job(cfg, "finetune", cfg.label(), lambda session: _finetune(cfg, session))


def _finetune(cfg: FinetuneConfig, session: Session) -> Path:
    engine = session.engine
    cfg.check_world_size(engine.world_size)
    manifest = load_manifest(session.data)
    cfg.check_inputs(manifest, engine.world_size)
    # an attempt cut short after its test evaluation (a preemption before metrics.json) left
    # predictions of its own; this one evaluates the test split again and writes them anew
    (cfg.run_dir() / PREDICTIONS_NAME).unlink(missing_ok=True)
    # the test split is read only after training: a damaged test shard must stop the job now
    verify_before_training(
        session.data,
        manifest.shards_of("test"),
        session.watcher,
        "before training (verifying test shards)",
    )
    train_keys, val_keys = manifest.fold_keys(cfg.fold)
    model = build_initial_model(cfg, manifest)

    def loader(split: str, keys: list[str] | None, train: bool):
        return make_loader(
            session.data,
            split,
            keys=keys,
            batch_size=cfg.batch_size,
            shuffle=train,
            drop_last=False,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            manifest=manifest,
        )

    train_loader = loader("train", train_keys, True)
    val_loader = loader("train", val_keys, False)
    test_loader = loader("test", None, False)
    per_epoch = len(train_loader)
    loss_fn = BceDiceLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=cfg.lr_patience
    )
    net = engine.prepare(Supervised(model), optimizer)

    # progress: epochs completed, batches done in the current one and their loss sums
    epoch, done, total, count = 0, 0, 0.0, 0
    curve, best = [], {"val_loss": float("inf"), "epoch": -1, "state": None}
    if (state := session.resume()) is not None:
        epoch, done, total, count = state["epoch"], state["done"], state["total"], state["count"]
        curve, best = state["curve"], state["best"]
        plateau.load_state_dict(state["plateau"])
        session.log(f"resuming from {session.last} (epoch {epoch}, batch {done} of {per_epoch})")
    tracker = session.start(to_dict(cfg), epoch * per_epoch + done)
    session.log(
        f"{cfg.model} ({cfg.variant}) fold {cfg.fold}: {len(train_keys)} train, {len(val_keys)} "
        f"validation, {manifest.counts['test']} test images"
    )
    session.watch(
        lambda: (
            epoch * per_epoch + done,
            {
                "epoch": epoch,
                "done": done,
                "total": total,
                "count": count,
                "curve": curve,
                "best": best,
                "plateau": plateau.state_dict(),
            },
        )
    )

    start, data_wait = time.perf_counter(), DataWait()
    engine.train()
    while epoch < cfg.epochs and epoch - best["epoch"] <= cfg.patience:
        # resuming mid-epoch: the epoch's order is fixed, the batches done are not read again
        train_loader.dataset.set_epoch(epoch, start=done)
        tick, seen = time.perf_counter(), 0
        for i, batch in enumerate(data_wait.timed(train_loader), start=done):
            x = engine.inputs(batch["image"].float() / 255)
            with engine.autocast():
                heads = net(x)
            loss = supervised_loss(heads, loss_fn, batch["mask"].to(engine.device))
            if not torch.isfinite(loss):
                raise UserError(f"the loss became {loss.item()} in epoch {epoch}: lower --lr")
            engine.step(loss)
            total, count, done = total + loss.item() * len(x), count + len(x), i + 1
            seen += len(x)
            session.stop_if_preempted(save=True)
        waited, batches = data_wait.take()
        speed = {
            "images_per_s": seen / (time.perf_counter() - tick),
            "data_wait_s": waited / max(batches, 1),  # per training batch, as pretrain logs it
        }
        # images for wandb come from this pass's forward, and only when a wandb run shows them
        due = cfg.log_images_every and (epoch + 1) % cfg.log_images_every == 0
        shown = FirstImages(cfg.log_images) if due and tracker.shows_media else None
        val_loss, _ = evaluate(
            engine,
            net,
            val_loader,
            loss_fn,
            lambda: session.stop_if_preempted(save=True),
            shown=shown,
        )
        plateau.step(val_loss)
        point = {
            "epoch": epoch,
            "train_loss": total / count,
            "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"],
        }
        curve.append(point)
        tracker.log(point | speed, epoch + 1)
        if shown is not None:
            tracker.images("val/predictions", shown.shown, epoch + 1)
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch, "state": engine.export()}
        epoch, done, total, count = epoch + 1, 0, 0.0, 0
        session.save(*session.progress())
        session.stop_if_preempted(save=False)

    engine.load_weights(best["state"])
    predictions: dict = {}
    test_loss, test = evaluate(
        engine,
        net,
        test_loader,
        loss_fn,
        lambda: session.stop_if_preempted(save=False),
        predictions,
    )
    write_predictions(cfg.run_dir() / PREDICTIONS_NAME, predictions)
    result = {
        "model": cfg.model,
        "variant": cfg.variant,
        "fold": cfg.fold,
        "pretrained": str(cfg.pretrained) if cfg.pretrained else None,
        "test": test | {"loss": test_loss},
        "predictions": PREDICTIONS_NAME,
        "empty_rule": EMPTY_RULE,
        "epoch_kept": best["epoch"],
        "epochs_run": epoch,
        "validation_curve": curve,
        "train_seconds": time.perf_counter() - start,
    }
    session.finish(
        {f"test_{k}": v for k, v in test["mean"].items()}
        | {f"test_pooled_{k}": v for k, v in test["pooled"].items()}
        | {"test_loss": test_loss, "epoch_kept": best["epoch"]}
        # the same under "test/", the section wandb groups them in
        | {f"test/{k}": v for k, v in test["mean"].items()}
        | {f"test/pooled_{k}": v for k, v in test["pooled"].items()}
        | {"test/loss": test_loss, "test/images": test["images"]}
    )
    write_json(cfg.result_file(), result)
    session.log(
        f"{cfg.model} ({cfg.variant}) fold {cfg.fold}: test dice {test['mean']['dice']:.3f} "
        f"iou {test['mean']['iou']:.3f} precision {test['mean']['precision']:.3f} "
        f"(epoch kept {best['epoch']})"
    )
    return cfg.result_file()
