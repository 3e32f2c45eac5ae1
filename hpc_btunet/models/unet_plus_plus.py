"""UNet++ (Zhou et al. 2018): a U-Net encoder, nested dense skip pathways, deep supervision.

Nodes are ``X(i, j)``: level ``i`` (``1 / 2**i`` of the input size, ``base_width * 2**i``
channels), column ``j``. The encoder is the column ``X(i, 0)``, ``i = 0 .. depth`` (the last one
is the bottleneck): the same ``Encoder`` as the U-Net, so by default a U-Net encoder's weights
load into it unchanged. Every other node is

    X(i, j) = block(concat[up(X(i + 1, j - 1)), X(i, 0), ..., X(i, j - 1)])

(a ``DecoderStage`` with ``j`` skips). ``depth`` counts downsamplings, so ``depth=4`` is the
"5 levels" of Zhou et al. and of the contrastive UNet++ paper, with 4 heads on ``X(0, 1..4)``.

The contrastive UNet++ paper's variant is a set of options, not a copy: ``stride_downsample``
(each level after the first halves the size with stride 2 in its second convolution instead of a
max pooling before it), ``kernel_size`` per level (larger kernels deeper, ``"grow"``), channels
x2 per level (always), and ``separable=False`` for the plain convolutions of a classical UNet++.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from hpc_btunet.errors import UserError
from hpc_btunet.models.blocks import (
    UPSAMPLE_MODES,
    DecoderStage,
    ResidualStage,
    StageInfo,
    size_error,
)
from hpc_btunet.models.registry import register_model
from hpc_btunet.models.unet import Encoder, max_pool

INFERENCE_MODES = ("mean", "last")


def level_kernel_sizes(kernel_size: int | str | Sequence[int], levels: int) -> tuple[int, ...]:
    """One odd kernel size per level from an int (all levels), ``"grow"`` or a per-level list.

    ``"grow"`` is 3, 3, 5, 5, 7, ... (+2 every second level): the paper asks for larger kernels
    in deeper levels without giving sizes; this keeps the deepest (16 x 16 at 256 px) at 7 x 7.
    """
    if kernel_size == "grow":
        sizes: tuple = tuple(3 + 2 * (i // 2) for i in range(levels))
    elif isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        sizes = (kernel_size,) * levels
    elif isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
        sizes = tuple(kernel_size)
    else:
        raise UserError(
            f"unet_plus_plus: kernel_size must be an odd int, 'grow' or one odd int per level, "
            f"got {kernel_size!r}"
        )
    if len(sizes) != levels:
        raise UserError(
            f"unet_plus_plus: kernel_size lists {len(sizes)} sizes, but depth + 1 = {levels} "
            "levels need one each"
        )
    bad = [k for k in sizes if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0]
    if bad:
        raise UserError(f"unet_plus_plus: kernel sizes must be odd positive ints, got {bad}")
    return sizes


def _level(
    index: int,
    in_channels: int,
    out_channels: int,
    kernel_sizes: Sequence[int],
    separable: bool,
    separable_stem: bool,
    stride_downsample: bool,
) -> nn.Module:
    stride = 2 if stride_downsample and index > 0 else 1
    return ResidualStage(
        in_channels,
        out_channels,
        kernel_sizes[index],
        separable_first=separable_stem or index > 0,
        separable=separable,
        stride=stride,
    )


def _no_downsample(channels: int) -> nn.Module:
    """The level's own stride-2 convolution downsamples (``stride_downsample=True``)."""
    return nn.Identity()


class NestedDecoder(nn.Module):
    """The nodes ``X(i, j)``, ``j >= 1``, of UNet++, sized from the encoder's stages.

    ``forward(features)`` takes the encoder's list (``X(i, 0)``) and returns the top row
    ``[X(0, 1), ..., X(0, depth)]``, each with ``out_channels`` channels at ``reduction``.
    Node ``X(i, j)`` is ``nodes[f"x{i}_{j}"]``.
    """

    def __init__(
        self,
        stages: Sequence[StageInfo],
        kernel_sizes: Sequence[int],
        upsample: str = "transpose",
        separable: bool = True,
    ) -> None:
        super().__init__()
        self.depth = len(stages) - 1
        self.nodes = nn.ModuleDict()
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                level, below = stages[i], stages[i + 1]
                self.nodes[f"x{i}_{j}"] = DecoderStage(
                    below.channels,
                    [level.channels] * j,
                    level.channels,
                    kernel_sizes[i],
                    below.reduction // level.reduction,
                    upsample,
                    separable,
                )
        self.out_channels, self.reduction = stages[0].channels, stages[0].reduction

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        grid = [[feature] for feature in features]  # grid[i][j] is X(i, j)
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                grid[i].append(self.nodes[f"x{i}_{j}"](grid[i + 1][j - 1], *grid[i][:j]))
        return grid[0][1:]


@register_model("unet_plus_plus")
class UNetPlusPlus(nn.Module):
    """UNet++ with the BT-Unet modifications (separable convs, BN after each, residual levels).

    Options shared with ``unet``: ``base_width`` (level ``i`` has ``base_width * 2**i``
    channels), ``depth`` (downsamplings; ``depth + 1`` levels), ``kernel_size`` (also ``"grow"``
    or one odd size per level), ``upsample``, ``separable_stem``. Own options:

    - ``separable=False``: plain convolutions everywhere (the classical UNet++);
    - ``stride_downsample=True``: downsample by stride 2 in each level's second convolution
      (contrastive UNet++ paper) instead of 2 x 2 max pooling;
    - ``deep_supervision=True`` (default, as in Zhou et al.'s main model): one ``1 x 1`` head on
      each of ``X(0, 1..depth)``; the trainer averages the loss over ``forward_heads(x)``.
      ``False``: one head on ``X(0, depth)``;
    - ``inference``: what ``forward`` returns from the heads, ``"mean"`` (default; the mean of
      their logits, Zhou et al.'s "accurate mode") or ``"last"`` (the head on ``X(0, depth)``).

    All heads are one grouped ``1 x 1`` convolution ``head`` (group ``k`` is head ``k``) over the
    concatenated top row, so each runs in every forward and none is left without a gradient.
    Attributes: ``encoder``, ``decoder``, ``head``, ``num_heads``, ``deep_supervision``,
    ``inference``, ``size_divisor`` and ``min_size`` (both ``2**depth``, as in ``UNet``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_width: int = 16,
        depth: int = 4,
        kernel_size: int | str | tuple[int, ...] = 3,
        upsample: str = "transpose",
        separable: bool = True,
        separable_stem: bool = False,
        stride_downsample: bool = False,
        deep_supervision: bool = True,
        inference: str = "mean",
    ) -> None:
        super().__init__()
        sizes = {"in_channels": in_channels, "out_channels": out_channels}
        for key, value in {**sizes, "base_width": base_width, "depth": depth}.items():
            if value < 1:
                raise UserError(f"unet_plus_plus: {key} must be at least 1, got {value}")
        if upsample not in UPSAMPLE_MODES:
            raise UserError(
                f"unet_plus_plus: upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}"
            )
        if inference not in INFERENCE_MODES:
            raise UserError(
                f"unet_plus_plus: inference must be one of {INFERENCE_MODES}, got {inference!r}"
            )
        kernel_sizes = level_kernel_sizes(kernel_size, depth + 1)
        widths = [base_width * 2**i for i in range(depth + 1)]
        level = partial(
            _level,
            kernel_sizes=kernel_sizes,
            separable=separable,
            separable_stem=separable_stem,
            stride_downsample=stride_downsample,
        )
        downsample = _no_downsample if stride_downsample else max_pool
        self.encoder = Encoder(in_channels, widths, level, downsample)
        self.decoder = NestedDecoder(self.encoder.stages, kernel_sizes, upsample, separable)
        self.deep_supervision, self.inference = deep_supervision, inference
        self.num_heads = depth if deep_supervision else 1
        self.head = nn.Conv2d(
            self.decoder.out_channels * self.num_heads,
            out_channels * self.num_heads,
            1,
            groups=self.num_heads,
        )
        self.size_divisor = self.encoder.stages[-1].reduction
        self.min_size = self.size_divisor  # a 1 x 1 bottleneck works, as in the U-Net

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits, ``X(0, 1)``'s first (one tensor without deep supervision)."""
        for side in x.shape[-2:]:
            if message := size_error(side, self.size_divisor, self.min_size):
                raise ValueError(message)
        top = self.decoder(self.encoder(x))[-self.num_heads :]
        logits = self.head(top[0] if len(top) == 1 else torch.cat(top, dim=1))
        return list(logits.chunk(self.num_heads, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logits map N x out_channels x H x W: the heads combined as ``inference`` says."""
        heads = self.forward_heads(x)
        if self.inference == "last" or len(heads) == 1:
            return heads[-1]
        return torch.stack(heads).mean(dim=0)
