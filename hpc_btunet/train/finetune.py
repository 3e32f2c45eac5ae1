"""The ``finetune`` job: train a whole model on the labelled subset minus fold k, validate on fold k,
test on the test split.

Every fold and both variants start from the same initial weights (seeded by ``--seed`` alone);
with ``--pretrained encoder.pt`` the encoder is then overwritten by the pre-trained one and the
decoder keeps its fresh initialisation. Adam, ReduceLROnPlateau (x0.1) on the validation loss,
early stopping with a patience, loss 0.5 * BCE + 0.5 * Dice (Eq. 4). The weights of the epoch with
the lowest validation loss are kept and tested. Output: ``<out>/finetune/<model>/<bt|scratch>/
fold-<k>/metrics.json``, written last; an interrupted job resumes from its per-epoch checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hpc_btunet.atomic import write_json
from hpc_btunet.config import option, to_dict
from hpc_btunet.data import Manifest, load_manifest, make_loader
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model, check_input_size, load_encoder_state, model_signature
from hpc_btunet.tracking import Tracker
from hpc_btunet.train.checkpoint import latest_checkpoint, load_file, load_weights, save_checkpoint
from hpc_btunet.train.engine import Engine
from hpc_btunet.train.job import JobConfig
from hpc_btunet.train.losses import BceDiceLoss
from hpc_btunet.train.metrics import SegmentationMetrics
from hpc_btunet.train.preemption import PreemptionWatcher
from hpc_btunet.train.run import RunDir

EMPTY_RULE = (
    "per image, a metric whose denominator is zero is 1 when mask and prediction are both empty, "
    "and 0 when nothing is predicted on a non-empty mask; 'mean' averages per-image values, "
    "'pooled' sums TP/FP/FN over the test images first"
)


@dataclass
class FinetuneConfig(JobConfig):
    fold: int = option(0, "validation fold (0-based) of the labelled subset")
    pretrained: Path | None = option(None, "encoder.pt from pretrain (omit: train from scratch)")
    epochs: int = option(50, "most epochs (early stopping usually ends sooner)")
    batch_size: int = option(8, "images per step")
    lr: float = option(1e-3, "Adam learning rate (the paper: 1e-3)")
    lr_patience: int = option(3, "epochs without validation improvement before the lr is cut x0.1")
    patience: int = option(8, "epochs without validation improvement before stopping")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("epochs", "batch_size", "patience", "lr_patience")

    @property
    def variant(self) -> str:
        return "bt" if self.pretrained else "scratch"

    def run_dir(self) -> Path:
        return Path(self.out) / "finetune" / self.model / self.variant / f"fold-{self.fold}"


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


def supervised_loss(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The training loss; with deep supervision (UNet++), the mean of the loss of every head."""
    if getattr(model, "deep_supervision", False):
        heads = model.forward_heads(x)
        return sum(loss_fn(logits, y) for logits in heads) / len(heads)
    return loss_fn(model(x), y)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, loss_fn: nn.Module, device: torch.device
) -> tuple[float, dict]:
    """Mean loss per image and segmentation metrics over the non-padded samples of ``loader``."""
    model.eval()
    metrics, total, count = SegmentationMetrics(), 0.0, 0
    for batch in loader:
        keep = ~batch["pad"]
        x = batch["image"][keep].to(device).float() / 255
        y = batch["mask"][keep].to(device)
        logits = model(x)
        total += loss_fn(logits, y).item() * len(x)
        count += len(x)
        metrics.update(torch.sigmoid(logits), y)
    model.train()
    return total / count, metrics.compute()


def run(cfg: FinetuneConfig) -> Path:
    """Fine-tune one (model, fold, variant); returns the path of ``metrics.json``."""
    rundir = RunDir(cfg.run_dir())
    result_file = rundir.path / "metrics.json"
    if result_file.exists():
        print(f"finetune: {result_file} exists, nothing to do")
        return result_file
    engine = Engine.setup(cfg.device)
    watcher = PreemptionWatcher()
    if engine.world_size > 1:
        raise UserError("finetune runs one process per (model, fold): launch it with one task")
    manifest = load_manifest(cfg.data)
    if not manifest.folds:
        raise UserError(
            f"{cfg.data} has no labelled subset or folds (packed without masks): pack a labelled dataset"
        )
    train_keys, val_keys = manifest.fold_keys(cfg.fold)
    if not train_keys:
        raise UserError(
            f"the labelled subset of {cfg.data} is too small for its folds: fold {cfg.fold} leaves "
            "nothing to train on; repack with a larger --labelled-fraction or fewer --folds"
        )
    model = build_initial_model(cfg, manifest).to(engine.device)

    def loader(split: str, keys: list[str] | None, train: bool):
        return make_loader(
            cfg.data,
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
    loss_fn = BceDiceLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=cfg.lr_patience
    )

    epoch, curve, best = 0, [], {"val_loss": float("inf"), "epoch": -1, "state": None}
    last = latest_checkpoint(rundir.checkpoints)
    if last is not None:
        state = load_file(last, "checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        plateau.load_state_dict(state["plateau"])
        epoch, curve = state["epoch"], state["curve"]
        best = {
            "val_loss": state["best_val_loss"],
            "epoch": state["best_epoch"],
            "state": state["best_model"],
        }
        print(f"finetune: resuming from {last} (epoch {epoch})")
    else:
        rundir.write_config(to_dict(cfg), cfg.data)
    tracker = Tracker(
        rundir,
        to_dict(cfg),
        stage="finetune",
        name=f"{cfg.model}/{cfg.variant}/fold-{cfg.fold}",
        group=Path(cfg.out).name,
        mode=cfg.wandb,
        project=cfg.project,
    )
    print(
        f"finetune: {cfg.model} ({cfg.variant}) fold {cfg.fold}: {len(train_keys)} train, {len(val_keys)} "
        f"validation, {manifest.counts['test']} test images"
    )

    start = time.perf_counter()
    model.train()
    while epoch < cfg.epochs and epoch - best["epoch"] <= cfg.patience:
        train_loader.dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in train_loader:
            x = batch["image"].to(engine.device).float() / 255
            loss = supervised_loss(model, loss_fn, x, batch["mask"].to(engine.device))
            if not torch.isfinite(loss):
                raise UserError(f"the loss became {loss.item()} in epoch {epoch}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(x), count + len(x)
        val_loss, _ = evaluate(model, val_loader, loss_fn, engine.device)
        plateau.step(val_loss)
        point = {
            "epoch": epoch,
            "train_loss": total / count,
            "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"],
        }
        curve.append(point)
        tracker.log(point, epoch + 1)
        if val_loss < best["val_loss"]:
            best = {
                "val_loss": val_loss,
                "epoch": epoch,
                "state": copy.deepcopy(model.state_dict()),
            }
        epoch += 1
        save_checkpoint(
            rundir.checkpoints,
            epoch,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "plateau": plateau.state_dict(),
                "epoch": epoch,
                "curve": curve,
                "best_val_loss": best["val_loss"],
                "best_epoch": best["epoch"],
                "best_model": best["state"],
            },
            keep=1,
        )
        if watcher.should_stop():  # this epoch's checkpoint is saved: requeue, resume from it
            tracker.finish()
            watcher.requeue(f"epoch {epoch}")

    model.load_state_dict(best["state"])
    test_loss, test = evaluate(model, test_loader, loss_fn, engine.device)
    result = {
        "model": cfg.model,
        "variant": cfg.variant,
        "fold": cfg.fold,
        "pretrained": str(cfg.pretrained) if cfg.pretrained else None,
        "test": test | {"loss": test_loss},
        "empty_rule": EMPTY_RULE,
        "epoch_kept": best["epoch"],
        "epochs_run": epoch,
        "validation_curve": curve,
        "train_seconds": time.perf_counter() - start,
    }
    tracker.summary(
        {f"test_{k}": v for k, v in test["mean"].items()} | {"epoch_kept": best["epoch"]}
    )
    tracker.finish()
    watcher.close()
    write_json(result_file, result)
    print(
        f"finetune: {cfg.model} ({cfg.variant}) fold {cfg.fold}: test dice {test['mean']['dice']:.3f} "
        f"iou {test['mean']['iou']:.3f} precision {test['mean']['precision']:.3f} (epoch kept {best['epoch']})"
    )
    return result_file
