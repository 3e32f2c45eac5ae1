"""Inception U-Net (I-Unet) and RCA-IUnet: one model over shared blocks, two registrations.

Both follow the BT-Unet modifications (depthwise-separable convolutions, BN after every
convolution, residual encoder stages, 4 halvings from 16 channels). Their encoders are the same:
residual inception blocks with hybrid-pooling downsampling, which is how the RCA-IUnet paper
describes its encoder and what the BT-Unet changes turn the I-Unet encoder into. So a Barlow
Twins encoder pre-trained for one loads into the other (as a U-Net encoder does into the
attention U-Net). They differ after the encoder:

* ``inception_unet`` (Punn & Agarwal 2020): the skips are concatenated as they are; each decoder
  stage is a (non-residual) inception block.
* ``rca_iunet`` (Punn & Agarwal 2021): every skip is weighed by ``CrossSpatialAttention`` driven
  by the encoder features of its own level and the next, coarser one (not by the decoder);
  decoder stages are residual inception blocks.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from hpc_btunet.errors import UserError
from hpc_btunet.models.blocks import UPSAMPLE_MODES, size_error
from hpc_btunet.models.inception import HybridPool2d, InceptionBlock, InceptionDecoderStage
from hpc_btunet.models.registry import register_model
from hpc_btunet.models.unet import Decoder, Encoder

#: How skips reach the decoder: as they are, or weighed by cross-spatial attention.
SKIPS = ("concat", "cross_spatial")


class CrossSpatialAttention(nn.Module):
    """Attention coefficients for an encoder feature ``x`` from ``x`` and the next level ``g``.

    With ``x`` of ``C_x`` channels at ``H x W`` and ``g`` of ``C_g`` channels at a coarser size,
    and ``F = max(1, C_x // 2)`` intermediate channels::

        theta = BN(conv1x1(x))                          # C_x -> F, at H x W
        phi   = upsample(BN(conv1x1(g)), to H x W)      # C_g -> F, bilinear
        alpha = sigmoid(BN(conv1x1(relu(theta + phi)))) # F -> 1, in [0, 1], at H x W
        out   = alpha * x

    Additive attention (as in the attention gate of Oktay et al.) but driven by two adjacent
    *encoder* levels: the coarser level says where the larger-scale context is, the finer level
    where its details are, hence "cross-spatial". ``g`` is projected before it is upsampled
    (a ``1 x 1`` convolution commutes with bilinear upsampling; this is 4 times cheaper).
    ``forward(x, g, return_alpha=True)`` also returns ``alpha`` (``N x 1 x H x W``).
    """

    def __init__(self, channels: int, gate_channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = max(1, channels // 2) if inter_channels is None else inter_channels
        self.theta = nn.Sequential(nn.Conv2d(channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.phi = nn.Sequential(
            nn.Conv2d(gate_channels, inter, 1, bias=False), nn.BatchNorm2d(inter)
        )
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1, bias=False), nn.BatchNorm2d(1))

    def forward(
        self, x: torch.Tensor, g: torch.Tensor, return_alpha: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        phi = F.interpolate(self.phi(g), size=x.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(x) + phi)))
        return (alpha * x, alpha) if return_alpha else alpha * x


def _inception_stage(
    index: int, in_channels: int, out_channels: int, kernel_size: int, separable_stem: bool
) -> nn.Module:
    separable = separable_stem or index > 0
    return InceptionBlock(in_channels, out_channels, kernel_size, separable, residual=True)


class InceptionUNet(nn.Module):
    """Inception U-Net family; registered as ``inception_unet`` and ``rca_iunet`` (see module doc).

    Encoder stages are residual inception blocks of ``base_width * 2**i`` channels for
    ``i <= depth`` (16 ... 256 by default), separated by hybrid pooling that halves the size and
    keeps the channels; the last one is the bottleneck. The decoder mirrors it with inception
    decoder stages (residual ones with ``residual_decoder=True``) and a ``1 x 1`` convolution gives
    ``out_channels`` logits at the input's size.

    Options as in ``UNet``: ``kernel_size`` (odd; the branches use ``1``, ``k`` and ``k + 2``),
    ``upsample`` (``"transpose"`` or ``"bilinear"``), ``separable_stem``. Fixed per variant:
    ``skip`` (``"concat"`` or ``"cross_spatial"``) and ``residual_decoder``.

    Attributes: ``encoder``, ``skip_attention`` (a ``ModuleList`` of ``CrossSpatialAttention``,
    one per skip, or ``None``), ``decoder``, ``head``, ``size_divisor`` (``2**depth``; input height
    and width must be multiples) and ``min_size`` (``2 * 2**depth``: the bottleneck is an inception
    block, whose spectral pooling needs a 2 x 2 map).
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
        residual_decoder: bool = False,
    ) -> None:
        super().__init__()
        for key, value in dict(
            in_channels=in_channels,
            out_channels=out_channels,
            base_width=base_width,
            depth=depth,
            kernel_size=kernel_size,
        ).items():
            if value < 1:
                raise UserError(f"inception model: {key} must be at least 1, got {value}")
        if kernel_size % 2 == 0:
            raise UserError(f"inception model: kernel_size must be odd, got {kernel_size}")
        if upsample not in UPSAMPLE_MODES:
            raise UserError(f"inception model: upsample must be one of {UPSAMPLE_MODES}")
        if skip not in SKIPS:
            raise UserError(f"inception model: skip must be one of {SKIPS}, got {skip!r}")
        widths = [base_width * 2**i for i in range(depth + 1)]
        stage = partial(_inception_stage, kernel_size=kernel_size, separable_stem=separable_stem)
        self.encoder = Encoder(in_channels, widths, stage, downsample=HybridPool2d)
        stages = self.encoder.stages
        self.skip_attention: nn.ModuleList | None = None
        if skip == "cross_spatial":
            self.skip_attention = nn.ModuleList(
                CrossSpatialAttention(fine.channels, coarse.channels)
                for fine, coarse in zip(stages[:-1], stages[1:], strict=True)
            )
        decoder_stage = partial(
            InceptionDecoderStage,
            kernel_size=kernel_size,
            upsample=upsample,
            residual=residual_decoder,
        )
        self.decoder = Decoder(stages, stage=decoder_stage)
        self.head = nn.Conv2d(self.decoder.out_channels, out_channels, 1)
        self.size_divisor = stages[-1].reduction
        bottleneck = self.encoder.get_submodule(stages[-1].name)
        self.min_size = self.size_divisor * bottleneck.min_size

    def skips(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The encoder features as the decoder receives them (skips weighed if attention is on)."""
        if self.skip_attention is None:
            return features
        gated = [
            gate(fine, coarse)
            for gate, fine, coarse in zip(
                self.skip_attention, features[:-1], features[1:], strict=True
            )
        ]
        return [*gated, features[-1]]

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The attention coefficients of every skip, finest first (empty without attention).

        Runs the encoder: call it in eval mode to leave the BatchNorm statistics alone.
        """
        if self.skip_attention is None:
            return []
        features = self.encoder(x)
        return [
            gate(fine, coarse, return_alpha=True)[1]
            for gate, fine, coarse in zip(
                self.skip_attention, features[:-1], features[1:], strict=True
            )
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for side in x.shape[-2:]:
            if message := size_error(side, self.size_divisor, self.min_size):
                raise ValueError(message)
        return self.head(self.decoder(self.skips(self.encoder(x))))


register_model("inception_unet", skip="concat", residual_decoder=False)(InceptionUNet)
register_model("rca_iunet", skip="cross_spatial", residual_decoder=True)(InceptionUNet)
