"""Inception blocks and hybrid pooling (Punn & Agarwal: Inception U-Net 2020, RCA-IUnet 2021).

An inception block runs, in parallel on the same input, a ``1 x 1`` convolution, a ``k x k`` and a
``(k+2) x (k+2)`` depthwise-separable convolution (3 x 3 and 5 x 5 by default) and a hybrid-pooling
branch; it concatenates the four and mixes them with a ``1 x 1`` convolution. With
``residual=True`` it is a residual inception block: ``relu(block(x) + shortcut(x))``, the
BT-Unet "mini-skip". Every convolution is followed by BatchNorm.

Hybrid pooling is a learned ``1 x 1`` convolution (+ BN) over the concatenation of max pooling and
spectral pooling. Between encoder stages it halves the size (2 x 2 max pooling, spectral pooling
to half the size). Inside an inception block it must keep the size, so there it is the stride-1
counterpart of both: 3 x 3 max pooling with stride 1 (the GoogLeNet pooling branch) and the ideal
low-pass filter that keeps exactly the band spectral pooling by 2 keeps (``SpectralLowPass2d``).
This is preferred over pooling then upsampling because it needs no interpolation choice.

Both kinds of hybrid pooling need at least 2 x 2 pixels (``min_size``): pooling to half the size
leaves nothing of a 1-pixel side, and the low-pass keeps exactly that band. So every inception
block, the bottleneck included, needs a 2 x 2 map, and an inception U-Net an input side of at
least ``2 * 2**depth``.
"""

from __future__ import annotations

import torch
from torch import nn

from hpc_btunet.models.blocks import ConvBNAct, Upsample
from hpc_btunet.models.spectral_pool import SpectralLowPass2d, SpectralPool2d


class HybridPool2d(nn.Module):
    """``BN(conv1x1(concat(maxpool(x), spectralpool(x))))``: ``in_channels -> out_channels``.

    ``stride=2`` halves height and width (floor, as max pooling does); ``stride=1`` keeps them
    (3 x 3 max pooling with stride 1 and a spectral low-pass filter). ``out_channels`` defaults to
    ``in_channels``. No activation: the caller decides (a downsampling between encoder stages
    feeds a block that starts with convolutions). Height and width must be at least ``min_size``.
    """

    #: The smallest height and width it takes, with either stride (see the module docstring).
    min_size = 2

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 2) -> None:
        super().__init__()
        if stride == 2:
            self.max_pool: nn.Module = nn.MaxPool2d(2)
            self.spectral_pool: nn.Module = SpectralPool2d(factor=2)
        elif stride == 1:
            self.max_pool = nn.MaxPool2d(3, stride=1, padding=1)
            self.spectral_pool = SpectralLowPass2d(factor=2)
        else:
            raise ValueError(f"HybridPool2d stride must be 1 or 2, got {stride}")
        out_channels = in_channels if out_channels is None else out_channels
        self.conv = nn.Conv2d(2 * in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.max_pool(x), self.spectral_pool(x)], dim=1)
        return self.bn(self.conv(pooled))


class InceptionBlock(nn.Module):
    """Four parallel branches, each with ``out_channels`` channels, concatenated, then ``1 x 1``.

    Branches: ``1 x 1`` conv; ``k x k`` conv; ``(k+2) x (k+2)`` conv (separable unless
    ``separable=False``, which the stem uses on a 1-channel image for the reason given in
    ``ResidualStage``); stride-1 ``HybridPool2d``. Each is followed by BN and ReLU. The ``1 x 1``
    fusion conv maps ``4 * out_channels`` to ``out_channels`` (conv-BN-ReLU). With
    ``residual=True`` the fusion has no ReLU of its own: the output is
    ``relu(fusion + shortcut(x))`` with the identity or a ``1 x 1`` conv + BN projection.
    Height and width must be at least ``min_size`` (that of its hybrid-pooling branch).
    """

    min_size = HybridPool2d.min_size

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        separable: bool = True,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [
                ConvBNAct(in_channels, out_channels, 1, separable=False),
                ConvBNAct(in_channels, out_channels, kernel_size, separable=separable),
                ConvBNAct(in_channels, out_channels, kernel_size + 2, separable=separable),
                nn.Sequential(
                    HybridPool2d(in_channels, out_channels, stride=1), nn.ReLU(inplace=True)
                ),
            ]
        )
        self.fuse = ConvBNAct(4 * out_channels, out_channels, 1, separable=False, act=not residual)
        self.shortcut: nn.Module | None = None
        if residual:
            if in_channels == out_channels:
                self.shortcut = nn.Identity()
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
            self.act = nn.ReLU(inplace=True)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
        if self.shortcut is None:
            return y
        return self.act(y + self.shortcut(x))


class InceptionDecoderStage(nn.Module):
    """Upsample ``x`` to the skip's size and channels, concatenate the skip, one inception block.

    The factory signature ``(in_channels, skip_channels, out_channels, scale=...)`` is the one
    ``Decoder(stage=...)`` calls; ``kernel_size``, ``upsample`` (see ``Upsample``) and
    ``residual`` are bound with ``functools.partial``.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        scale: int = 2,
        kernel_size: int = 3,
        upsample: str = "transpose",
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.up = Upsample(in_channels, skip_channels, scale, upsample)
        self.block = InceptionBlock(
            2 * skip_channels, out_channels, kernel_size, separable=True, residual=residual
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))
