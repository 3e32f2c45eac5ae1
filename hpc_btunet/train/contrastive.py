"""The ``contrastive`` job: the second method, a pair of UNet++ models trained from image-level
labels (normal / abnormal) only, and the class-activation-map baseline on the same labels.

``--method pair`` (the method, docs/contrastive.md): per step, the global batch's pairs
(``plan_pairs``: an abnormal slice with its distortion, two normal slices, an abnormal slice with
a normal one), each rank computing every W-th pair of the whole global batch (the images are
gathered from all ranks; BatchNorm over every rank's inputs to a network with ``--bn-scope
global``), Eq. 1 on every head of both networks. ``--method cam``: the same encoder with global
average pooling and one linear unit, trained to tell abnormal from normal images (binary
cross-entropy); its prediction for an image called abnormal is its class activation map
(Zhou et al. 2016: the unit's weights over the last encoder features, upsampled), scaled to its
maximum and thresholded at ``--cam-threshold``; an image called normal gets an empty mask.

Both write their weights and then score the test split against the lesion masks, which no
training step ever reads (``with_masks=False``): ``predictions.npz`` (as fine-tuning's) and
``metrics.json`` last, with the same metric rules, over every test image and over the abnormal
ones, beside two baselines that need no training: the organ mask as the prediction (when the
dataset stores one) and the whole image; ``scores`` describes the map before its threshold
(``ScoreSeparation``: pixel AUROC of lesion pixels against the rest of the abnormal images, over
the image and inside the organ). ``--crop`` crops every image to its organ's bounding box
and resizes it back (the paper's section 3.2); predictions are mapped back to the full image
before scoring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpc_btunet import distributed
from hpc_btunet.atomic import write_json
from hpc_btunet.config import option, to_dict
from hpc_btunet.data import DataWait, load_manifest, make_loader
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model, check_input_size, model_signature
from hpc_btunet.ssl.contrastive import (
    KINDS,
    NEGATIVE_TARGETS,
    NORMAL_TARGETS,
    DistortionConfig,
    check_eta,
    check_kinds,
    plan_pairs,
)
from hpc_btunet.train.checkpoint import save_weights
from hpc_btunet.train.contrastive_step import ContrastivePair, PairTargets, pair_loss
from hpc_btunet.train.engine import BN_SCOPES
from hpc_btunet.train.finetune import EMPTY_RULE, PREDICTIONS_NAME, write_predictions
from hpc_btunet.train.integrity import verify_before_training
from hpc_btunet.train.job import StepJobConfig
from hpc_btunet.train.metrics import ScoreSeparation, SegmentationMetrics, confusion, scores
from hpc_btunet.train.optim import warmup_cosine
from hpc_btunet.train.session import Session, run_job

METHODS = ("pair", "cam")


@dataclass
class ContrastiveConfig(StepJobConfig):
    model: str = option(
        "unet_plus_plus", "model of both networks (the paper: unet_plus_plus), or of the CAM's"
    )
    method: str = option(
        "pair",
        "pair: the contrastive UNet++ pair; cam: the baseline, a classifier's class activation map",
        choices=METHODS,
    )
    batch_size: int = option(
        16, "images per rank; the global batch, whose pairs are formed, is this x world size", min=1
    )
    bn_scope: str = option(
        "global",
        "BatchNorm statistics over every rank's inputs to a network (global) or each rank's",
        choices=BN_SCOPES,
    )
    lr: float = option(1e-3, "learning rate (Adam, cosine decay)", above=0)
    eta: float = option(
        0.5,
        "probability that an abnormal slice holds the marker: the weight of the slices whose "
        "target asserts it (docs/contrastive.md)",
        above=0,
        max=1,
    )
    pairs: str = option(
        ",".join(KINDS), f"pair kinds, comma-separated, among {', '.join(KINDS)} (negative needed)"
    )
    normal_target: str = option(
        "empty",
        "target of a normal pair's members: empty, or swap (each the other's output)",
        choices=NORMAL_TARGETS,
    )
    negative_target: str = option(
        "complement",
        "target of a negative pair's abnormal member: complement (of the normal member's "
        "output) or ones",
        choices=NEGATIVE_TARGETS,
    )
    back: str = option(
        "pad",
        "a distortion's way back to the input size: pad, or resize (keeping the aspect change)",
        choices=("pad", "resize"),
    )
    normal_label: str = option(
        "normal", "the image-level label of normal images; every other label is abnormal"
    )
    crop: bool = option(
        False, "crop every image to its organ's bounding box and resize it back (section 3.2)"
    )
    cam_threshold: float = option(
        0.5, "--method cam: the map's fraction of its maximum that counts as lesion", above=0, max=1
    )

    result_name: ClassVar[str] = "metrics.json"
    layout_options: ClassVar[tuple[str, ...]] = ("batch_size", "bn_scope")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eta(self.eta)
        self.kinds  # noqa: B018  (refuses a --pairs policy without negative pairs)

    @property
    def kinds(self) -> tuple[str, ...]:
        return check_kinds([k.strip() for k in self.pairs.split(",") if k.strip()])

    def label(self) -> str:
        return f"{self.method}/{self.model}"

    def run_dir(self) -> Path:
        return Path(self.out) / "contrastive" / self.label()

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * world_size

    def batch_identity(self, world_size: int) -> dict:
        bn = self.batch_size * (world_size if self.bn_scope == "global" else 1)
        return {"batch": {"global": self.global_batch(world_size), "batchnorm": bn}}

    def check_inputs(self, manifest, world_size: int) -> None:
        classes = image_classes(manifest, self.normal_label, self.data)
        train = set(manifest.splits["train"])
        counts = {c: sum(1 for k, v in classes.items() if k in train and v == c) for c in (0, 1)}
        if not counts[0] or not counts[1]:
            raise UserError(
                f"the train split of {self.data} holds {counts[1]} abnormal and {counts[0]} normal "
                f"image(s) (normal: label {self.normal_label!r}): the method contrasts both "
                "classes; pack a dataset that has both, or set --normal-label"
            )
        if not manifest.splits["test"]:
            raise UserError(
                f"the test split of {self.data} is empty: there is nothing to score the method "
                "on; repack with more images or a larger --test-fraction"
            )
        test_abnormal = sum(classes.get(k, 0) for k in manifest.splits["test"])
        if not test_abnormal:
            raise UserError(
                f"the test split of {self.data} holds no abnormal image: there is no lesion to "
                "score the method on; pack it again with another --seed or --test-fraction"
            )
        missing = sorted(set(manifest.splits["test"]) & set(manifest.unlabelled))
        if missing:
            raise UserError(
                f"{len(missing)} test image(s) of {self.data} have no mask (e.g. {missing[0]}): "
                "the test split is scored against its masks; pack it with masks for the test split"
            )
        if self.crop and not manifest.has_organ:
            raise UserError(
                f"--crop needs organ masks, and {self.data} stores none: pack a source that "
                "stores them (pack --source synthetic --task lesion) or drop --crop"
            )
        global_batch = self.global_batch(world_size)
        if global_batch < 2 or manifest.counts["train"] < global_batch:
            raise UserError(
                f"a global batch of {global_batch} ({world_size} rank(s) x --batch-size "
                f"{self.batch_size}) for {manifest.counts['train']} train images: it must be "
                "at least 2 and at most the train split; change --batch-size"
            )


def image_classes(manifest, normal_label: str, data) -> dict[str, int]:
    """Every labelled sample's class: 1 abnormal, 0 normal (``normal_label``)."""
    labels = manifest.labels
    if not labels:
        raise UserError(
            f"{data} has no image-level labels: pack a source that labels its images "
            "(pack --source synthetic --task lesion, --source busi, --source brats)"
        )
    names = sorted(set(labels.values()))
    if normal_label not in names:
        raise UserError(
            f"no image of {data} is labelled {normal_label!r} (its labels: {', '.join(names)}): "
            "set --normal-label to the label of normal images"
        )
    return {k: int(v != normal_label) for k, v in labels.items()}


# --- organ crop -------------------------------------------------------------------------------


def organ_boxes(organ: torch.Tensor) -> torch.Tensor:
    """``N x 4`` (top, left, bottom, right), exclusive ends, of each organ mask's bounding box
    (``N x 1 x H x W``); an empty mask gives the whole image."""
    n, _, h, w = organ.shape
    rows, cols = organ[:, 0].any(dim=2), organ[:, 0].any(dim=1)
    boxes = torch.tensor([[0, 0, h, w]] * n)
    for i in range(n):
        r, c = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        if len(r) and len(c):
            boxes[i] = torch.tensor([r[0], c[0], r[-1] + 1, c[-1] + 1])
    return boxes


def crop_to_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box, resized back to the image size (bilinear)."""
    h, w = images.shape[-2:]
    out = torch.empty_like(images)
    for i, (top, left, bottom, right) in enumerate(boxes.tolist()):
        out[i] = F.interpolate(
            images[i : i + 1, :, top:bottom, left:right],
            size=(h, w),
            mode="bilinear",
            align_corners=False,
        )[0]
    return out


def uncrop(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The inverse of ``crop_to_boxes`` for maps: each resized to its box and placed in a zero
    image (outside the organ's box nothing is predicted)."""
    out = torch.zeros_like(maps)
    for i, (top, left, bottom, right) in enumerate(boxes.tolist()):
        out[i, :, top:bottom, left:right] = F.interpolate(
            maps[i : i + 1], size=(bottom - top, right - left), mode="bilinear", align_corners=False
        )[0]
    return out


# --- the CAM baseline ---------------------------------------------------------------------------


class CamClassifier(nn.Module):
    """A model's encoder, global average pooling and one linear unit (abnormal vs normal).
    ``forward`` gives the logit per image; ``cam`` the class activation map at the input size
    and the logit."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x)[-1].mean(dim=(2, 3)))[:, 0]

    @torch.no_grad()
    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)[-1]
        logit = self.fc(features.mean(dim=(2, 3)))[:, 0]
        maps = torch.einsum("nchw,c->nhw", features, self.fc.weight[0]).unsqueeze(1)
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return maps.clamp_min(0), logit


def cam_scores(maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each class activation map over its maximum (0 for a map of zeros), and 0 for an image
    classified normal (logit <= 0): the score map the CAM baseline thresholds."""
    peak = maps.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    scaled = torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))
    return scaled * (logits > 0).view(-1, 1, 1, 1)


def cam_masks(maps: torch.Tensor, logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Binary masks: for an image classified abnormal, the map at or above ``threshold`` (> 0)
    of its maximum; empty for one classified normal or with a map of zeros."""
    return cam_scores(maps, logits) >= threshold


# --- the job --------------------------------------------------------------------------------------


def run(cfg: ContrastiveConfig) -> Path:
    """Train the pair (or the CAM classifier) and score the test split; returns ``metrics.json``."""
    return run_job(cfg, "contrastive", cfg.label(), lambda s: _train(cfg, s))


def _train(cfg: ContrastiveConfig, session: Session) -> Path:
    engine = session.engine
    manifest = load_manifest(session.data)
    cfg.check_inputs(manifest, engine.world_size)
    (cfg.run_dir() / PREDICTIONS_NAME).unlink(missing_ok=True)  # an earlier attempt's
    verify_before_training(
        session.data,
        manifest.shards if cfg.verify else manifest.shards_of("test"),
        session.watcher,
        "before training (verifying shards)",
    )
    classes = image_classes(manifest, cfg.normal_label, cfg.data)
    options = cfg.model_options()

    def network(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = build_model(cfg.model, in_channels=manifest.channels, **options)
        check_input_size(model, manifest.image_size)
        return model

    if cfg.method == "pair":  # two networks, independently initialised
        module: nn.Module = ContrastivePair(network(cfg.seed), network(cfg.seed + 1))
    else:
        module = CamClassifier(network(cfg.seed).encoder)
    loader = make_loader(
        session.data,
        "train",
        batch_size=cfg.batch_size,
        rank=engine.rank,
        world_size=engine.world_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        with_masks=False,  # the lesion masks never reach training
        with_organ=cfg.crop,
        manifest=manifest,
        pin_memory=engine.device.type == "cuda",
    )
    per_epoch = len(loader)
    total = cfg.steps or cfg.epochs * per_epoch
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    scheduler = warmup_cosine(optimizer, total, 0)
    net = engine.prepare(module, optimizer, scheduler)
    world, rank = engine.world_size, engine.rank
    distortion = DistortionConfig(back=cfg.back)
    kinds = cfg.kinds  # parsed once, not per step
    targets = PairTargets(cfg.eta, cfg.normal_target, cfg.negative_target)

    step, last_loss, seconds_before = 0, float("nan"), 0.0
    if (state := session.resume()) is not None:
        step, last_loss = state["step"], state["loss"]
        seconds_before = state.get("train_seconds", 0.0)
        session.log(f"resuming from {session.last} (step {step} of {total})")
    config = to_dict(cfg) | {"world_size": world, "global_batch": cfg.global_batch(world)}
    tracker = session.start(config | {"total_steps": total}, step, config)
    abnormal_train = sum(classes.get(k, 0) for k in manifest.splits["train"])
    session.log(
        f"{cfg.method} of {cfg.model} on {manifest.counts['train']} images ({abnormal_train} "
        f"abnormal), global batch {cfg.global_batch(world)} over {world} rank(s), "
        f"{per_epoch} steps/epoch, {total} steps, device {engine.device}"
    )
    started = time.perf_counter()

    def train_seconds() -> float:
        return seconds_before + time.perf_counter() - started

    session.watch(
        lambda: (step, {"step": step, "loss": last_loss, "train_seconds": train_seconds()})
    )
    engine.train()
    tick, data_wait = time.perf_counter(), DataWait()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        loader.dataset.set_epoch(epoch, start=skip)
        for batch in data_wait.timed(loader):
            # the global batch on every rank, in rank order: pairs may join images of two ranks
            labels = torch.tensor([classes[k] for k in batch["key"]], dtype=torch.uint8)
            images = distributed.all_gather_cat(batch["image"].to(engine.device))
            abnormal = distributed.all_gather_cat(labels.to(engine.device)).bool()
            x = images.float() / 255
            if cfg.crop:
                organ = distributed.all_gather_cat(batch["organ"].to(engine.device))
                x = crop_to_boxes(x, organ_boxes(organ))
            with engine.autocast():
                if cfg.method == "pair":
                    plan = plan_pairs(abnormal.cpu(), seed=cfg.seed, step=step, kinds=kinds)
                    part, count, stats = pair_loss(
                        net, x, plan, plan.of_rank(rank, world), distortion=distortion,
                        targets=targets, seed=cfg.seed, step=step,
                    )  # fmt: skip
                    # DDP averages the ranks' gradients: W x each share = the global mean's
                    loss = part * world / count
                else:
                    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
                    logits = net(x[mine])
                    target = abnormal[mine].float()
                    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
                    stats = {}
            global_loss = distributed.all_reduce_sum(loss.detach().float().view(1)) / world
            if not torch.isfinite(global_loss).all():
                raise UserError(f"the loss became {global_loss.item()} at step {step}: lower --lr")
            engine.step(loss)
            step, last_loss = step + 1, global_loss.item()
            if step % cfg.log_every == 0 or step == total:
                waited, batches = data_wait.take()
                record = {
                    "epoch": epoch,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": batches
                    * cfg.global_batch(world)
                    / (time.perf_counter() - tick),
                    "data_wait_s": waited / max(batches, 1),
                    "train_seconds": train_seconds(),
                    **stats,
                }
                tracker.log(record, step)
                session.log(f"step {step}/{total} loss {last_loss:.4g}")
                tick = time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == total:
                session.save(*session.progress())
            if step >= total:
                break
            session.stop_if_preempted(save=True)

    weights = engine.export()
    signature = model_signature(cfg.model, in_channels=manifest.channels, **options)
    if engine.is_main:
        for name in ("a", "b") if cfg.method == "pair" else ("classifier",):
            part = {
                k.removeprefix(f"{name}."): v
                for k, v in weights.items()
                if cfg.method != "pair" or k.startswith(f"{name}.")
            }
            save_weights(cfg.run_dir() / f"{name}.pt", part, signature | {"method": cfg.method})
    result = evaluate(cfg, engine, engine.module, manifest, session, classes)  # as trained
    result |= {"train_seconds": train_seconds(), "steps": step, "final_loss": last_loss}
    session.finish(
        {f"test/{k}": v for k, v in result["test"]["mean"].items()}
        | {f"test_abnormal/{k}": v for k, v in result["test_abnormal"]["mean"].items()}
    )
    if engine.is_main:
        write_json(cfg.result_file(), result)
    d = result["test_abnormal"]["mean"]["dice"]
    session.log(
        f"{cfg.method} of {cfg.model}: test dice {result['test']['mean']['dice']:.3f} (abnormal "
        f"images {d:.3f}); organ mask {_dice(result, 'organ')}, whole image "
        f"{_dice(result, 'whole_image')}"
    )
    return cfg.result_file()


def _dice(result: dict, baseline: str) -> str:
    scored = result["baselines"].get(baseline)
    return "n/a" if scored is None else f"{scored['abnormal']['mean']['dice']:.3f}"


@torch.no_grad()
def evaluate(cfg, engine, module, manifest, session, classes) -> dict:
    """Every rank scores the whole test split (in eval mode: no collective); the main one writes
    ``predictions.npz``. Returns what ``metrics.json`` holds."""
    loader = make_loader(
        session.data,
        "test",
        batch_size=cfg.batch_size,
        shuffle=False,
        drop_last=False,
        seed=cfg.seed,
        with_organ=manifest.has_organ,
        manifest=manifest,
    )
    module.eval()
    names = ["method", "whole_image"] + (["organ"] if manifest.has_organ else [])
    counts: dict[str, list] = {n: [] for n in names}
    keys, masks, flags = [], [], []
    # the score map on abnormal images: every pixel, and inside the organ (where lesions are)
    separation, in_organ, organ_as_map = ScoreSeparation(), ScoreSeparation(), ScoreSeparation()
    normal_score = [0.0, 0]
    for batch in loader:
        keep = ~batch["pad"]
        x = batch["image"][keep].to(engine.device).float() / 255
        y = batch["mask"][keep].to(engine.device)
        organ = batch["organ"][keep].to(engine.device) if manifest.has_organ else None
        boxes = organ_boxes(organ) if cfg.crop else None
        seen = crop_to_boxes(x, boxes) if cfg.crop else x
        if cfg.method == "pair":
            score = module.predict(seen)
            predicted = score >= 0.5
        else:
            maps, logits = module.cam(seen)
            predicted = cam_masks(maps, logits, cfg.cam_threshold)
            score = cam_scores(maps, logits)
        if cfg.crop:
            predicted = uncrop(predicted.float(), boxes) >= 0.5
            score = uncrop(score, boxes)
        batch_keys = [k for k, kept in zip(batch["key"], keep.tolist(), strict=True) if kept]
        is_abnormal = torch.tensor([bool(classes.get(k, 1)) for k in batch_keys], device=y.device)
        separation.update(score[is_abnormal], y[is_abnormal])
        if organ is not None:
            inside = organ[is_abnormal].bool()
            in_organ.update(score[is_abnormal][inside], y[is_abnormal][inside])
            organ_as_map.update(organ[is_abnormal].float(), y[is_abnormal])
        normal_score[0] += float(score[~is_abnormal].double().sum())
        normal_score[1] += score[~is_abnormal].numel()
        counts["method"].append(confusion(predicted, y).cpu())
        counts["whole_image"].append(confusion(torch.ones_like(y), y).cpu())
        if organ is not None:
            counts["organ"].append(confusion(organ, y).cpu())
        keys += batch_keys
        flags.append(is_abnormal.cpu())
        masks.append(predicted[:, 0].to(torch.uint8).cpu().numpy())
        session.stop_if_preempted(save=False)
    abnormal = torch.cat(flags)
    scored = {n: _aggregate(torch.cat(c), abnormal) for n, c in counts.items()}
    if engine.is_main:
        per_image = scores(torch.cat(counts["method"]))
        write_predictions(
            cfg.run_dir() / PREDICTIONS_NAME,
            {"keys": np.array(keys), "masks": np.concatenate(masks)}
            | {m: v.numpy() for m, v in per_image.items()},
        )
    method = scored.pop("method")
    scores_ = separation.compute()
    scores_["normal_mean"] = normal_score[0] / normal_score[1] if normal_score[1] else None
    if manifest.has_organ:
        scores_["organ"] = in_organ.compute()
        scored["organ"]["auroc"] = organ_as_map.compute()["auroc"]
    return {
        "method": cfg.method,
        "model": cfg.model,
        "test": method["all"],
        "test_abnormal": method["abnormal"],
        "baselines": scored,
        "predictions": PREDICTIONS_NAME,
        "empty_rule": EMPTY_RULE,
        "test_images": {"all": len(keys), "abnormal": int(abnormal.sum())},
        # the map before its threshold: lesion pixels against the rest of the abnormal images
        "scores": scores_,
    }


def _aggregate(counts: torch.Tensor, abnormal: torch.Tensor) -> dict:
    """Mean and pooled metrics over every test image and over the abnormal ones."""

    def both(c: torch.Tensor) -> dict:
        metrics = SegmentationMetrics()
        metrics.counts = [c]
        return metrics.compute()

    return {"all": both(counts), "abnormal": both(counts[abnormal])}
