"""The additive attention gate of the Attention U-Net (Oktay et al. 2018) and a way to read it.

The gate weighs a skip feature ``x`` by coefficients ``alpha`` in [0, 1] computed from ``x`` and
a gating signal ``g``, the coarser decoder feature about to be upsampled and joined with ``x``.
Formulation (the original "grid attention", with the BT-Unet rule of BN after every conv)::

    theta = BN(conv_{s x s, stride s}(x))         x brought onto g's grid (s = 2 in a U-Net)
    phi   = BN(conv_{1 x 1}(g))                    (interpolated to theta's size if they differ)
    f     = ReLU(theta + phi)
    alpha = up(sigmoid(BN(conv_{1 x 1}(f))))       one coefficient per pixel, bilinear to x's size
    out   = BN(conv_{1 x 1}(alpha * x))            W of the paper

with ``in / 2`` intermediate channels. The original has biases on phi and psi and no BN there;
here every conv is bias-free and followed by BN (as MONAI's ``AttentionBlock`` also does), so
the model keeps the "BN after every convolution" property the paper states for all its models.
Because theta works on the skip's grid with stride ``s``, the gate never needs the upsampled
decoder feature (the common simplification that gates ``up(g)`` and drops W is not used). theta
is a plain conv: like the transposed up-conv, its ``s x s`` windows do not overlap, so it is a
per-patch projection rather than a spatial filter to make separable.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AttentionGate(nn.Module):
    """Additive attention gate: ``forward(x, g)`` returns ``W(alpha * x)``, shaped like ``x``.

    ``channels`` is the skip's channel count, ``gating_channels`` that of ``g``; ``g`` is
    ``scale`` times smaller than ``x``. ``coefficients(x, g)`` gives ``alpha`` (N x 1 x H x W
    at ``x``'s size); ``forward(..., return_attention=True)`` returns ``(out, alpha)``.
    """

    def __init__(
        self,
        channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        scale: int = 2,
    ) -> None:
        super().__init__()
        inter = inter_channels or max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inter, scale, stride=scale, bias=False)
        self.theta_bn = nn.BatchNorm2d(inter)
        self.phi = nn.Conv2d(gating_channels, inter, 1, bias=False)
        self.phi_bn = nn.BatchNorm2d(inter)
        self.act = nn.ReLU(inplace=True)
        self.psi = nn.Conv2d(inter, 1, 1, bias=False)
        self.psi_bn = nn.BatchNorm2d(1)
        self.sigmoid = nn.Sigmoid()
        self.out = nn.Conv2d(channels, channels, 1, bias=False)
        self.out_bn = nn.BatchNorm2d(channels)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention coefficients ``alpha`` in [0, 1], N x 1 x H x W at ``x``'s size."""
        theta = self.theta_bn(self.theta(x))
        phi = self.phi_bn(self.phi(g))
        if phi.shape[-2:] != theta.shape[-2:]:
            phi = F.interpolate(phi, size=theta.shape[-2:], mode="bilinear", align_corners=False)
        alpha = self.sigmoid(self.psi_bn(self.psi(self.act(theta + phi))))
        if alpha.shape[-2:] != x.shape[-2:]:
            # Bilinear weights are convex, so the upsampled coefficients stay in [0, 1].
            alpha = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return alpha

    def forward(
        self, x: torch.Tensor, g: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        alpha = self.coefficients(x, g)
        out = self.out_bn(self.out(alpha * x))
        return (out, alpha) if return_attention else out


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The coefficients of every ``AttentionGate`` of ``model`` on input ``x``, in call order.

    Runs ``model(x)`` once without gradients and recomputes each gate's ``alpha`` from the
    inputs it received; for figures and reports. Call it in eval mode: in train mode the gates'
    BatchNorm statistics would be updated twice.
    """
    maps: list[torch.Tensor] = []

    def capture(gate: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        maps.append(gate.coefficients(*args[:2]))

    hooks = [
        m.register_forward_pre_hook(capture)
        for m in model.modules()
        if isinstance(m, AttentionGate)
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return maps
