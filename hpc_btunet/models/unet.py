"""The U-Net of the BT-Unet paper: a residual separable-convolution encoder, a mirrored decoder.

``Encoder`` and ``Decoder`` are generic over the stage and downsampling modules they assemble and
size themselves from ``StageInfo`` data, so the other models of the paper (attention, inception,
RCA-IUnet, UNet++) are built from the same parts with different blocks, not copied classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from hpc_btunet.errors import UserError
from hpc_btunet.models.blocks import (
    SKIP_MODES,
    UPSAMPLE_MODES,
    DecoderStage,
    ResidualStage,
    StageInfo,
    size_error,
)
from hpc_btunet.models.registry import register_model

#: ``(index, in_channels, out_channels) -> module`` keeping the spatial size.
StageFactory = Callable[[int, int, int], nn.Module]
#: ``channels -> module`` halving height and width.
DownFactory = Callable[[int], nn.Module]
#: ``(in_channels, skip_channels, out_channels, scale=...) -> module`` with ``forward(x, skip)``.
DecoderFactory = Callable[..., nn.Module]


def max_pool(channels: int) -> nn.Module:
    """2 x 2 max pooling with stride 2 (the channel count is unused; it is part of the factory API)."""
    return nn.MaxPool2d(2)


class Encoder(nn.Module):
    """``blocks[0]`` at full size, then for each next block: downsample by 2, block.

    ``forward(x)`` returns one feature map per entry of ``stages`` (skips first, the bottleneck
    last). ``out_channels`` is the bottleneck's channel count. Barlow Twins pre-trains all of it.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        stage: StageFactory,
        downsample: DownFactory = max_pool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.stages: list[StageInfo] = []
        prev = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                self.downs.append(downsample(prev))
            self.blocks.append(stage(i, prev, width))
            self.stages.append(StageInfo(f"blocks.{i}", width, 2**i))
            prev = width
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.downs[i - 1](x)
            x = block(x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """One ``DecoderStage`` per skip feature, deepest first, sized from the encoder's stages.

    ``forward(features)`` takes the encoder's list and returns a map with ``out_channels``
    channels at the resolution of the first stage (``reduction``). ``skip`` is passed to every
    ``DecoderStage`` (``"attention"`` gates each skip). ``stage`` builds the stages instead of
    ``DecoderStage`` (``kernel_size``, ``upsample`` and ``skip`` then only reach the default).
    """

    def __init__(
        self,
        stages: Sequence[StageInfo],
        kernel_size: int = 3,
        upsample: str = "transpose",
        skip: str = "concat",
        stage: DecoderFactory | None = None,
    ) -> None:
        super().__init__()
        if stage is None:
            stage = partial(DecoderStage, kernel_size=kernel_size, upsample=upsample, skip=skip)
        self.blocks = nn.ModuleList()
        below = stages[-1]
        for level in reversed(stages[:-1]):
            scale = below.reduction // level.reduction
            self.blocks.append(stage(below.channels, level.channels, level.channels, scale=scale))
            below = level
        self.out_channels, self.reduction = stages[0].channels, stages[0].reduction

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1]), strict=True):
            x = block(x, skip)
        return x


def _residual_stage(
    index: int, in_channels: int, out_channels: int, kernel_size: int, separable_stem: bool
) -> nn.Module:
    separable_first = separable_stem or index > 0
    return ResidualStage(in_channels, out_channels, kernel_size, separable_first)


def _check_options(**options: int) -> None:
    for key, value in options.items():
        if value < 1:
            raise UserError(f"unet: {key} must be at least 1, got {value}")


@register_model("unet")
class UNet(nn.Module):
    """U-Net with the BT-Unet modifications: separable convolutions, BN after each, mini-skips.

    Encoder stages have ``base_width * 2**i`` channels for ``i < depth`` (16, 32, 64, 128 by
    default), each followed by 2 x 2 max pooling; the bottleneck has ``base_width * 2**depth``
    channels at ``1 / 2**depth`` of the input size. The decoder mirrors the encoder and a
    ``1 x 1`` convolution gives ``out_channels`` logits (no sigmoid) at the input's size.

    Options: ``kernel_size`` (odd) of every ``k x k`` convolution; ``upsample`` is ``"transpose"``
    (learned 2 x 2 transposed convolution, default) or ``"bilinear"`` (interpolation + 1 x 1
    convolution); ``separable_stem=True`` makes the very first convolution separable too, as the
    paper literally says (by default it is plain, see ``ResidualStage``); ``skip="attention"``
    weighs every skip by an ``AttentionGate`` driven by the coarser decoder feature (Oktay et al.
    2018), registered as the variant ``attention_unet``.

    Attributes: ``encoder`` (what Barlow Twins pre-trains, bottleneck included), ``decoder``,
    ``head``, ``size_divisor`` (``2**depth``; input height and width must be multiples) and
    ``min_size`` (the smallest input side, ``2**depth`` too: a 1 x 1 bottleneck works).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_width: int = 16,
        depth: int = 4,
        kernel_size: int = 3,
        upsample: str = "transpose",
        separable_stem: bool = False,
        skip: str = "concat",
    ) -> None:
        super().__init__()
        _check_options(
            in_channels=in_channels,
            out_channels=out_channels,
            base_width=base_width,
            depth=depth,
            kernel_size=kernel_size,
        )
        if kernel_size % 2 == 0:
            raise UserError(f"unet: kernel_size must be odd (same-size padding), got {kernel_size}")
        if upsample not in UPSAMPLE_MODES:
            raise UserError(f"unet: upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if skip not in SKIP_MODES:
            raise UserError(f"unet: skip must be one of {SKIP_MODES}, got {skip!r}")
        widths = [base_width * 2**i for i in range(depth + 1)]
        stage = partial(_residual_stage, kernel_size=kernel_size, separable_stem=separable_stem)
        self.encoder = Encoder(in_channels, widths, stage)
        self.decoder = Decoder(self.encoder.stages, kernel_size, upsample, skip)
        self.head = nn.Conv2d(self.decoder.out_channels, out_channels, 1)
        self.size_divisor = self.encoder.stages[-1].reduction
        # every convolution pads and the up-convolutions and gates take a 1 x 1 bottleneck
        self.min_size = self.size_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for side in x.shape[-2:]:
            if message := size_error(side, self.size_divisor, self.min_size):
                raise ValueError(message)
        return self.head(self.decoder(self.encoder(x)))


# The Attention U-Net of the paper (A-Unet) is the same model with gated skips.
register_model("attention_unet", skip="attention")(UNet)
