"""Two randomly distorted views of a uint8 image batch, on the batch's device, seeded.

BT-Unet distorts each image by random crop and rotation (its code also flips). For every image,
each of the two views is an independent draw of, in this order:

1. a random crop of ``crop_scale`` of the area (aspect ratio in ``crop_ratio``) resized back to
   the input size (bilinear);
2. a rotation by an angle uniform in ``[-rotation_degrees, rotation_degrees]`` (default 90:
   together with the flips every orientation is reachable, and microscopy, dermoscopy and
   ultrasound images have no canonical "up"); the corners are filled by reflection
   (``padding_mode``) rather than with black, which would be an artificial edge;
3. a horizontal and a vertical flip, each with probability 0.5;
4. optionally (off by default) a brightness shift and a contrast factor, clipped to [0, 1].

Output: float32 in [0, 1], or ``(x - mean) / std`` when ``mean``/``std`` are given. The geometry
runs on the images' device with kornia (batched warps; kornia needs no torchvision).

Determinism, per sample: the random parameters of a step are drawn for the whole *global* batch
(``total`` images) on the CPU from torch's default generator seeded from ``(seed, step)`` inside
``torch.random.fork_rng``, then each caller takes the rows of its own images (``offset``: the
position of its first image in the global batch). So the two views of an image depend only on
``(seed, step, its position in the global batch, total)``: one process with the whole batch, W
ranks with a slice each, or K accumulated micro-batches produce the same views (bitwise on the
CPU), whatever the global RNG state, and the caller's RNG state is left untouched. The parameter
streams depend on kornia's sampling code: views are reproducible for a given kornia version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import Tensor

from hpc_btunet.errors import UserError

__all__ = ["PADDING_MODES", "TwoViews", "ViewConfig", "view_seed"]

Params = list  # kornia ParamItems, one per stage

PADDING_MODES = ("reflection", "zeros", "border")


@dataclass(frozen=True)
class ViewConfig:
    """Distortions of the two Barlow Twins views; validated on construction."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_degrees: float = 90.0
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    padding_mode: str = "reflection"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio"):
            if len(getattr(self, name)) != 2:
                raise UserError(f"view {name} must be a (min, max) pair, got {getattr(self, name)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"view crop_scale must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise UserError(f"view crop_ratio must satisfy 0 < min <= max, got {(lo, hi)}")
        if not 0 <= self.rotation_degrees <= 180:
            raise UserError(
                f"view rotation_degrees must be in [0, 180], got {self.rotation_degrees}"
            )
        for name in ("hflip_p", "vflip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"view {name} must be a probability, got {getattr(self, name)}")
        for name in ("brightness", "contrast"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"view {name} must be in [0, 1), got {getattr(self, name)}")
        if self.padding_mode not in PADDING_MODES:
            raise UserError(
                f"view padding_mode {self.padding_mode!r} is unknown: choose one of {PADDING_MODES}"
            )
        if (self.mean is None) != (self.std is None):
            raise UserError("view mean and std must be given together (or neither)")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise UserError(f"view std must be positive, got {self.std}")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise UserError(f"view mean {self.mean} and std {self.std} differ in length")


def view_seed(seed: int, step: int) -> int:
    """A 63-bit seed that depends on every bit of ``(seed, step)`` (no collisions like
    ``seed + step`` would give between neighbouring runs)."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TwoViews:
    """``TwoViews(cfg)(images, seed=, step=, offset=, total=) -> (view_a, view_b)``.

    ``images``: uint8 ``N x C x H x W`` on any device, rows ``offset .. offset + N`` of a global
    batch of ``total`` images (default: the whole batch). The views have the same shape, float32,
    on the same device. Not an ``nn.Module`` on purpose: moving it to a device would move kornia's
    samplers there and make the draws device-dependent.
    """

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else ViewConfig()
        self._pipelines: dict[tuple[int, int], K.AugmentationSequential] = {}
        self._drawn: tuple[tuple, tuple[Params, Params]] | None = None  # the last step's draws

    def _pipeline(self, size: tuple[int, int]) -> K.AugmentationSequential:
        if size not in self._pipelines:
            c = self.cfg
            stages: list = [
                K.RandomResizedCrop(
                    size, scale=c.crop_scale, ratio=c.crop_ratio, cropping_mode="resample"
                ),
                K.RandomAffine(degrees=c.rotation_degrees, padding_mode=c.padding_mode, p=1.0),
                K.RandomHorizontalFlip(p=c.hflip_p),
                K.RandomVerticalFlip(p=c.vflip_p),
            ]
            if c.brightness > 0:
                stages.append(K.RandomBrightness((1 - c.brightness, 1 + c.brightness), p=1.0))
            if c.contrast > 0:
                stages.append(K.RandomContrast((1 - c.contrast, 1 + c.contrast), p=1.0))
            self._pipelines[size] = K.AugmentationSequential(*stages)
        return self._pipelines[size]

    def _draw(self, shape: tuple[int, ...], seed: int, step: int) -> tuple[Params, Params]:
        """Both views' parameters for a global batch of ``shape`` (drawn once per step)."""
        key = (shape, seed, step)
        if self._drawn is None or self._drawn[0] != key:
            pipeline = self._pipeline(shape[2:])
            with torch.random.fork_rng(devices=[]):
                # only the CPU generator: kornia samples its parameters there
                torch.default_generator.manual_seed(view_seed(seed, step))
                draws = (
                    pipeline.forward_parameters(torch.Size(shape)),
                    pipeline.forward_parameters(torch.Size(shape)),
                )
            self._drawn = (key, draws)
        return self._drawn[1]

    def _normalise(self, x: Tensor) -> Tensor:
        if self.cfg.mean is None:
            return x
        channels = x.shape[1]
        if len(self.cfg.mean) not in (1, channels):
            raise UserError(
                f"view mean/std have {len(self.cfg.mean)} values for {channels}-channel images"
            )
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.cfg.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.cfg.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def __call__(
        self,
        images: Tensor,
        *,
        seed: int,
        step: int,
        offset: int = 0,
        total: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected a uint8 batch N x C x H x W, got {images.dtype} of shape "
                f"{tuple(images.shape)}"
            )
        n = images.shape[0]
        total = n if total is None else total
        if not 0 <= offset <= total - n:
            raise ValueError(f"rows {offset}..{offset + n} lie outside a global batch of {total}")
        x = images.to(torch.float32) / 255
        pipeline = self._pipeline((images.shape[2], images.shape[3]))
        draws = self._draw((total, *images.shape[1:]), seed, step)
        with torch.no_grad():
            view_a, view_b = (
                pipeline(x, params=_rows(params, offset, n, x.device)) for params in draws
            )
        return self._normalise(view_a), self._normalise(view_b)


def _rows(params: Params, offset: int, n: int, device: torch.device) -> Params:
    """The parameters of rows ``offset .. offset + n`` of a batch's draw, on ``device``."""
    out = []
    for item in params:
        data = {}
        for name, value in item.data.items():
            if name == "forward_input_shape":  # the batch's shape, not a per-row value
                value = value.clone()
                value[0] = n
            else:
                value = value[offset : offset + n].to(device)
            data[name] = value
        out.append(type(item)(item.name, data))
    return out
