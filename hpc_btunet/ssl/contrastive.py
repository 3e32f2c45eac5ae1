"""The contrastive UNet++ pair's pieces that do not depend on the model: the hybrid probabilistic
loss (Eq. 1 of the contrastive UNet++ paper), the distortion that makes a positive pair of one
slice, and the plan of pairs of a global batch.

Outputs and targets. Each network of the pair gives one map ``p`` = the probability that a pixel
holds the marker (the lesion); the loss sums Eq. 1 over C = 2 classes, marker (``y``, ``p``) and
background (``1 - y``, ``1 - p``). With one class only Eq. 1 cannot push anything towards an empty
output: for ``y = 0`` both of its terms vanish whatever ``p`` is.

Eq. 1 per slice, with N its pixels (inside the valid region, see ``hybrid_loss``)::

    H(Y, P) = -1/N sum_c sum_n ( y log p + y p / (y^2 + p^2) )

The log is taken from the logit (``logsigmoid``), never from a probability rounded to 0, and the
ratio is computed as ``y p / (y^2 + p^2 + eps^2)``: exactly 0 at ``y = 0`` (the limit of the ratio
along ``y = 0``, where Eq. 1 is 0/0 at ``p = 0``, NaN in autograd) and within ``eps^2`` of Eq. 1
elsewhere; the gradient with respect to the logit stays at most 1 per pixel (docs/contrastive.md).

Targets, the paper's open question (docs/contrastive.md gives the reasoning):

- ``distorted`` (a positive pair of one abnormal slice ``x`` and its distortion ``T x``): each
  network's target is the other's detached output, compared in the distorted frame: network A's
  output on ``x`` is warped by ``T``'s geometry and compared with B's output on ``T x``, and the
  other way round; pixels ``T`` pads are left out.
- ``normal`` (two normal slices): both targets empty (``--normal-target empty``), or each the
  other's detached output (``swap``, the paper's "same output" taken literally; the slices are
  different images, so the pixels do not correspond).
- ``negative`` (an abnormal slice with a normal one): the normal slice's target is empty; the
  abnormal slice's is the complement of the normal network's detached output (``complement``:
  "different outputs" taken per pixel) or all marker (``ones``). Either way the marker may be
  anywhere in the abnormal slice, which is what eta weighs.

Eta weighs the loss of every slice whose target asserts the marker without saying where (the
abnormal slice of a ``distorted`` or ``negative`` pair); slices of normal images weigh 1, since
their target (no marker) is certain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hpc_btunet.errors import UserError
from hpc_btunet.ssl.views import view_seed

__all__ = [
    "KINDS",
    "Distortion",
    "DistortionConfig",
    "PairPlan",
    "hybrid_loss",
    "plan_pairs",
]

KINDS = ("distorted", "normal", "negative")
NORMAL_TARGETS = ("empty", "swap")
NEGATIVE_TARGETS = ("complement", "ones")
EPS = 1e-3


def hybrid_loss(
    logits: Tensor, target: Tensor, valid: Tensor | None = None, eps: float = EPS
) -> Tensor:
    """Eq. 1 per slice: ``logits`` and ``target`` (probabilities in [0, 1]) are ``N x 1 x H x W``
    (or ``N x H x W``); returns ``N`` losses, each the mean over the slice's valid pixels of the
    two classes' terms (``valid``: a {0, 1} map of the same shape, default every pixel). A slice
    without a valid pixel has loss 0."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half precision: in float32
    y = target.to(dtype).clamp(0, 1)
    logits = logits.to(dtype)
    p, q = torch.sigmoid(logits), torch.sigmoid(-logits)  # marker and background probabilities
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    z = 1 - y
    e2 = eps * eps
    terms = y * log_p + y * p / (y * y + p * p + e2) + z * log_q + z * q / (z * z + q * q + e2)
    dims = tuple(range(1, terms.dim()))
    if valid is None:
        return -terms.mean(dim=dims)
    valid = valid.to(dtype)
    count = valid.sum(dim=dims)
    return -(terms * valid).sum(dim=dims) / count.clamp_min(1)


@dataclass(frozen=True)
class DistortionConfig:
    """The paper's positive-pair distortion (section 3.3): a blur that keeps ``resolution`` of
    the image's resolution, then a stretch or compression of each axis to ``scale`` of its size,
    brought back to the input size by ``back``: ``pad`` (the distorted image placed at a random
    offset on a zero canvas) or ``resize`` (scaled by one factor, so that its longer side fills
    the canvas, keeping the distortion of the aspect ratio, then padded)."""

    resolution: tuple[float, float] = (0.9, 1.0)
    scale: tuple[float, float] = (0.8, 1.0)
    back: str = "pad"

    def __post_init__(self) -> None:
        for name in ("resolution", "scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise UserError(
                    f"distortion {name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}"
                )
        if self.back not in ("pad", "resize"):
            raise UserError(f"distortion back {self.back!r}: use pad or resize")


class Distortion:
    """One positive pair's distortion per image, drawn from ``(seed, step, row)``.

    ``Distortion.draw(cfg, n, seed=, step=)`` draws the parameters of ``n`` images on the CPU from
    a generator of their own (the caller's RNG is untouched); ``rows`` selects a subset (a rank's
    share of a global batch) so that every process draws the same values for the same image.
    ``apply(images)`` blurs and warps float images; ``warp(maps)`` applies the geometry alone (to a
    network's output, whose target lives in the distorted frame); ``valid`` is the region the
    distorted image covers (1) rather than padding (0)."""

    def __init__(self, resolution: Tensor, scale: Tensor, offset: Tensor) -> None:
        self.resolution = resolution  # n: kept fraction of the resolution
        self.scale = scale  # n x 2: final content size / input size, (y, x)
        self.offset = offset  # n x 2: content's top-left corner / input size, (y, x)

    @classmethod
    def draw(
        cls, cfg: DistortionConfig, n: int, *, seed: int, step: int, rows: Tensor | None = None
    ) -> Distortion:
        g = torch.Generator().manual_seed(view_seed(seed, step))
        u = torch.rand(n, 5, generator=g, dtype=torch.float64)
        lo, hi = cfg.resolution
        resolution = lo + (hi - lo) * u[:, 0]
        lo, hi = cfg.scale
        scale = lo + (hi - lo) * u[:, 1:3]
        if cfg.back == "resize":  # one factor brings the longer side back to the full size
            scale = scale / scale.max(dim=1, keepdim=True).values
        offset = (1 - scale) * u[:, 3:5]
        whole = cls(resolution, scale, offset)
        return whole if rows is None else whole.subset(rows)

    def __len__(self) -> int:
        return len(self.resolution)

    def subset(self, rows: Tensor) -> Distortion:
        """The distortions of ``rows`` (indices or a boolean mask), in their order."""
        rows = rows.cpu()
        return Distortion(self.resolution[rows], self.scale[rows], self.offset[rows])

    def _grid(self, like: Tensor) -> Tensor:
        """The sampling grid: output pixel -> input pixel (``align_corners=False`` coordinates)."""
        n, _, h, w = like.shape
        s = self.scale.to(like.device, like.dtype)
        o = self.offset.to(like.device, like.dtype)
        theta = torch.zeros(n, 2, 3, device=like.device, dtype=like.dtype)
        # output x_out in [-1, 1] holds input x_in where (x_out + 1) / 2 = o + s (x_in + 1) / 2
        theta[:, 0, 0] = 1 / s[:, 1]
        theta[:, 0, 2] = (1 - s[:, 1] - 2 * o[:, 1]) / s[:, 1]
        theta[:, 1, 1] = 1 / s[:, 0]
        theta[:, 1, 2] = (1 - s[:, 0] - 2 * o[:, 0]) / s[:, 0]
        return F.affine_grid(theta, [n, 1, h, w], align_corners=False)

    def warp(self, maps: Tensor, mode: str = "bilinear") -> Tensor:
        """The geometric part on ``N x C x H x W`` float maps; padding is 0."""
        grid = self._grid(maps)
        return F.grid_sample(maps, grid, mode=mode, padding_mode="zeros", align_corners=False)

    def valid(self, like: Tensor) -> Tensor:
        """``N x 1 x H x W``: 1 where the distorted content lies, 0 on padding (pixels less than
        half covered count as padding)."""
        ones = torch.ones(like.shape[0], 1, *like.shape[2:], device=like.device, dtype=like.dtype)
        return (self.warp(ones) > 0.5).float()

    def blur(self, images: Tensor) -> Tensor:
        """Each image resampled to ``resolution`` of its size and back (antialiased bilinear)."""
        h, w = images.shape[-2:]
        out = torch.empty_like(images)
        for i, r in enumerate(self.resolution.tolist()):
            size = (max(1, round(h * r)), max(1, round(w * r)))
            one = images[i : i + 1]
            if size != (h, w):
                one = F.interpolate(one, size=size, mode="bilinear", antialias=True)
                one = F.interpolate(one, size=(h, w), mode="bilinear", align_corners=False)
            out[i : i + 1] = one
        return out

    def apply(self, images: Tensor) -> Tensor:
        """Blur, then stretch or compress and pad back: float ``N x C x H x W``."""
        return self.warp(self.blur(images if images.is_floating_point() else images.float()))


@dataclass(frozen=True)
class PairPlan:
    """Pairs of a global batch: pair k is ``first[k]`` seen by network A (or B when
    ``swap[k]``) and ``second[k]`` by the other, of kind ``KINDS[kind[k]]``. A pair of an image
    with itself (``distorted``, and the odd normal image out) takes the distortion as its second
    member (``distort``)."""

    first: Tensor  # long P
    second: Tensor  # long P
    kind: Tensor  # long P, index into KINDS
    swap: Tensor  # bool P

    def __len__(self) -> int:
        return len(self.first)

    @property
    def distort(self) -> Tensor:
        """bool P: the second member is the first one distorted."""
        return self.first == self.second

    def count(self, kind: str) -> int:
        return int((self.kind == KINDS.index(kind)).sum())

    def of_rank(self, rank: int, world_size: int) -> Tensor:
        """The pairs rank ``rank`` computes: every ``world_size``-th, from ``rank``."""
        return torch.arange(rank, len(self), world_size)


def check_kinds(kinds: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``--pairs``: known kinds, and negatives among them (the method contrasts classes)."""
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds:
        raise UserError(f"--pairs names no pair kind: choose among {', '.join(KINDS)}")
    if unknown:
        raise UserError(
            f"--pairs: unknown kind(s) {', '.join(unknown)}; choose among {', '.join(KINDS)}"
        )
    if "negative" not in kinds:
        raise UserError(
            f"--pairs {','.join(kinds)} yields no negative pairs: the pair is trained by "
            "contrasting abnormal with normal slices; add negative"
        )
    return tuple(dict.fromkeys(kinds))


def plan_pairs(
    abnormal: Tensor, *, seed: int, step: int, kinds: tuple[str, ...] = KINDS
) -> PairPlan:
    """The pairs of a global batch whose images are abnormal where ``abnormal`` (bool, G) is
    true: per abnormal image one ``distorted`` pair with itself; normal images two by two in
    batch order (an odd last one with itself, distorted) as ``normal`` pairs; per abnormal image
    one ``negative`` pair with a normal image, taken in turn in batch order. Which network sees
    which member is a fair coin per pair, drawn from ``(seed, step)``, so that both networks see
    both classes in both roles. Depends on nothing else: every rank plans the same pairs."""
    abnormal = abnormal.bool().cpu()
    idx_a = torch.nonzero(abnormal).flatten()
    idx_n = torch.nonzero(~abnormal).flatten()
    first, second, kind = [], [], []

    def add(a: Tensor, b: Tensor, k: str) -> None:
        first.append(a)
        second.append(b)
        kind.append(torch.full_like(a, KINDS.index(k)))

    if "distorted" in kinds:
        add(idx_a, idx_a, "distorted")
    if "normal" in kinds and len(idx_n):
        pairs = len(idx_n) // 2
        add(idx_n[0 : 2 * pairs : 2], idx_n[1 : 2 * pairs : 2], "normal")
        if len(idx_n) % 2:  # the odd one out is paired with its own distortion
            add(idx_n[-1:], idx_n[-1:], "normal")
    if "negative" in kinds and len(idx_n):
        add(idx_a, idx_n[torch.arange(len(idx_a)) % len(idx_n)], "negative")
    empty = torch.zeros(0, dtype=torch.long)
    first_t = torch.cat(first) if first else empty
    g = torch.Generator().manual_seed(view_seed(seed, step) ^ 0x5EED)
    return PairPlan(
        first=first_t,
        second=torch.cat(second) if second else empty,
        kind=torch.cat(kind) if kind else empty,
        swap=torch.rand(len(first_t), generator=g) < 0.5,
    )


def pair_targets(
    kind: str,
    prob_first: Tensor,
    prob_second: Tensor,
    *,
    normal_target: str = "empty",
    negative_target: str = "complement",
) -> tuple[Tensor, Tensor]:
    """Targets (detached) of the first and second member of pairs of one kind from both
    members' output probabilities, in the frame each member was seen in (a ``distorted`` pair's
    first output already warped into the distorted frame, see ``Distortion.warp``)."""
    a, b = prob_first.detach(), prob_second.detach()
    if kind == "distorted" or (kind == "normal" and normal_target == "swap"):
        return b, a
    if kind == "normal":
        return torch.zeros_like(a), torch.zeros_like(b)
    if kind == "negative":  # first: abnormal; second: normal
        first = 1 - b if negative_target == "complement" else torch.ones_like(a)
        return first, torch.zeros_like(b)
    raise ValueError(f"unknown pair kind {kind!r}")


def check_eta(eta: float) -> float:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 < eta <= 1):
        raise UserError(
            f"--eta {eta}: the probability that an abnormal slice holds the marker must be in (0, 1]"
        )
    return float(eta)
