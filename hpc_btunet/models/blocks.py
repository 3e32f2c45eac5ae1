"""Building blocks shared by the U-Net family: convolution units, encoder and decoder stages.

The BT-Unet paper (section 5) changes every model it compares in the same three ways: depthwise
separable convolutions instead of plain ones, BatchNorm after every convolution, and a residual
("mini-skip") connection in every encoder stage. Those choices live here, once, so that the U-Net
variants differ only in which blocks they assemble, not in copies of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hpc_btunet.models.attention import AttentionGate

UPSAMPLE_MODES = ("transpose", "bilinear")
#: How a decoder stage uses its skip: concatenated as is, or weighed by an attention gate first.
SKIP_MODES = ("concat", "attention")


@dataclass(frozen=True)
class StageInfo:
    """One feature map an encoder returns, described as data (like timm's ``feature_info``).

    ``name`` is the submodule (``encoder.get_submodule(name)``) that produces the feature,
    ``channels`` its channel count and ``reduction`` the input size divided by its size.
    """

    name: str
    channels: int
    reduction: int


class SeparableConv2d(nn.Module):
    """Depthwise ``k x k`` convolution (one filter per input channel), then a pointwise ``1 x 1``.

    Both convolutions are bias-free by default: the unit is meant to be followed by BatchNorm,
    whose shift makes a bias redundant. ``stride`` applies to the depthwise convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = False,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=in_channels,
            bias=False,
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ConvBNAct(nn.Module):
    """Convolution (separable or plain, "same" padding), BatchNorm, then ReLU unless ``act=False``.

    With ``stride=2`` the output is half the (even) input size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        separable: bool = True,
        act: bool = True,
        stride: int = 1,
    ) -> None:
        super().__init__()
        if separable:
            self.conv: nn.Module = SeparableConv2d(
                in_channels, out_channels, kernel_size, stride=stride
            )
        else:
            self.conv = nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                bias=False,
            )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResidualStage(nn.Module):
    """Encoder stage with a mini-skip: ``relu(unit2(unit1(x)) + shortcut(x))``.

    ``unit1`` is conv-BN-ReLU and ``unit2`` conv-BN; the ReLU comes after the sum, as in a ResNet
    basic block, so the residual path can also lower an activation. The shortcut is the identity
    when the channel count is kept and a ``1 x 1`` conv + BN projection when it changes.
    ``separable_first=False`` makes the first convolution a plain one: on a 1-channel image a
    depthwise convolution is a single ``k x k`` filter, so every output channel of the first unit
    would be a rescaled copy of one feature map (Xception, which the paper cites for separable
    convolutions, also keeps plain convolutions in its stem). ``separable=False`` makes both
    convolutions plain. ``stride=2`` halves the size in the second convolution (and the
    shortcut projection), as in a ResNet downsampling block, instead of a pooling before the stage.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        separable_first: bool = True,
        separable: bool = True,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.unit1 = ConvBNAct(
            in_channels, out_channels, kernel_size, separable=separable and separable_first
        )
        self.unit2 = ConvBNAct(
            out_channels, out_channels, kernel_size, separable=separable, act=False, stride=stride
        )
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.unit2(self.unit1(x)) + self.shortcut(x))


class Upsample(nn.Module):
    """Enlarge by an integer ``scale`` and change channels, followed by BN and ReLU.

    ``"transpose"`` (the default, as in the original U-Net and the BT-Unet authors' code) is a
    learned ``scale x scale`` transposed convolution with stride ``scale``: its windows do not
    overlap, so it has no checkerboard overlap pattern. ``"bilinear"`` interpolates and then
    mixes channels with a ``1 x 1`` convolution (fewer parameters, no learned interpolation).
    """

    def __init__(
        self, in_channels: int, out_channels: int, scale: int = 2, mode: str = "transpose"
    ) -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.scale, self.mode = scale, mode
        if mode == "transpose":
            self.conv: nn.Module = nn.ConvTranspose2d(
                in_channels, out_channels, scale, stride=scale, bias=False
            )
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear":
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.act(self.bn(self.conv(x)))


class DecoderStage(nn.Module):
    """Upsample ``x``, concatenate the skip feature(s), then two separable conv-BN-ReLU units.

    ``skip_channels`` may list several skips (UNet++ nodes concatenate all earlier nodes of their
    level); ``forward(x, *skips)`` takes them in that order. The upsampled ``x`` gets as many
    channels as the first skip, as in the original U-Net ("up-conv that halves the channels").
    ``skip="attention"`` (one skip only) first weighs the skip by an ``AttentionGate`` driven
    by ``x``, the coarser decoder feature (Attention U-Net). ``separable=False``: plain convs.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int | Sequence[int],
        out_channels: int,
        kernel_size: int = 3,
        scale: int = 2,
        upsample: str = "transpose",
        separable: bool = True,
        skip: str = "concat",
    ) -> None:
        super().__init__()
        skips = [skip_channels] if isinstance(skip_channels, int) else list(skip_channels)
        if skip not in SKIP_MODES:
            raise ValueError(f"skip must be one of {SKIP_MODES}, got {skip!r}")
        if skip == "attention" and len(skips) != 1:
            raise ValueError(f"an attention gate weighs one skip, got {len(skips)}")
        self.gate = (
            AttentionGate(skips[0], in_channels, scale=scale) if skip == "attention" else None
        )
        self.up = Upsample(in_channels, skips[0], scale, upsample)
        self.unit1 = ConvBNAct(skips[0] + sum(skips), out_channels, kernel_size, separable)
        self.unit2 = ConvBNAct(out_channels, out_channels, kernel_size, separable)

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            skips = (self.gate(skips[0], x),)
        x = torch.cat([self.up(x), *skips], dim=1)
        return self.unit2(self.unit1(x))


def size_error(size: int, divisor: int, min_size: int | None = None) -> str | None:
    """The message for an input side ``size`` a model cannot take, else None.

    Valid sides are the multiples of ``divisor`` (``2**depth``: one halving per stage) from
    ``min_size`` on (a multiple of ``divisor``; ``divisor`` itself when None, for a model whose
    bottleneck may be 1 x 1). The message names the nearest valid sides and, when ``min_size``
    is larger than ``divisor``, the smallest one.
    """
    min_size = divisor if min_size is None else min_size
    if min_size < divisor or min_size % divisor:
        raise ValueError(f"min_size {min_size} is not a positive multiple of {divisor}")
    if size >= min_size and size % divisor == 0:
        return None
    if size % divisor:
        power = divisor.bit_length() - 1
        why = f" (2^{power}, one halving per stage)" if divisor == 1 << power else ""
        problem = f"is not divisible by {divisor}{why}"
        if min_size > divisor:
            problem += f"; the smallest valid size is {min_size}"
    else:
        problem = f"is below {min_size}, the smallest valid size"
        if min_size > divisor:
            side = min_size // divisor
            problem += f" (the bottleneck, 1/{divisor} of it, must be at least {side} x {side})"
    below = size // divisor * divisor
    choices = f"{below} or {below + divisor}" if below >= min_size else f"{min_size}"
    return f"input size {size} {problem}: use --image-size {choices}"
