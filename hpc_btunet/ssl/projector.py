"""The Barlow Twins projection head of BT-Unet: pooled encoder features to the embedding.

BT-Unet (Punn & Agarwal) pools the encoder's last feature map globally, then applies blocks of a
fully connected layer, ReLU and batch normalisation, and a final fully connected layer, every layer
with ``s/2`` units for an ``s x s`` input (128 for 256 x 256 images; see
:func:`default_projector_width`). The paper writes the block as FC + ReLU + BN; the default here is
FC + BN + ReLU, the order the project's specification asks for and that of Zbontar et al.'s
official projector.
``block_order="relu-bn"`` gives the paper's order.

The hidden linear layers have no bias in the default order (the batch norm after them would cancel
it; with ``"relu-bn"`` they have one), and the last one has none: the Barlow Twins loss
standardises every embedding dimension over the batch, so a bias there would receive no gradient.
This is also the official Barlow Twins projector's choice.

Model code only: no ranks. To normalise over the global batch of all ranks, convert the module
with :func:`hpc_btunet.global_batchnorm.convert_global_batchnorm` (or ``nn.SyncBatchNorm`` on CUDA).
"""

from __future__ import annotations

from torch import Tensor, nn

from hpc_btunet.errors import UserError

__all__ = ["BLOCK_ORDERS", "Projector", "default_projector_width"]

BLOCK_ORDERS = ("bn-relu", "relu-bn")


def default_projector_width(image_size: int) -> int:
    """The paper's width of every projector layer for an ``image_size x image_size`` input."""
    if image_size < 2:
        raise UserError(f"image_size must be at least 2 pixels, got {image_size}")
    return image_size // 2


class Projector(nn.Module):
    """Global average pooling, ``num_layers - 1`` blocks of Linear + BatchNorm1d + ReLU, a Linear.

    Args:
        in_dim: channels of the encoder feature map (``encoder.out_channels[-1]``).
        hidden_dim: units of every hidden layer (the paper: ``image_size // 2``).
        out_dim: embedding size; ``None`` means ``hidden_dim``.
        num_layers: number of linear layers (>= 1); 3 in the paper and the authors' code.
        block_order: ``"bn-relu"`` (Linear, BN, ReLU) or ``"relu-bn"`` (the paper's text).

    ``forward`` takes ``N x C x H x W`` (any number of spatial dims, averaged) or an already
    pooled ``N x C`` and returns ``N x out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        out_dim: int | None = None,
        num_layers: int = 3,
        block_order: str = "bn-relu",
    ) -> None:
        super().__init__()
        out_dim = hidden_dim if out_dim is None else out_dim
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"projector {name} must be a positive integer, got {value!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise UserError(f"projector num_layers must be at least 1, got {num_layers!r}")
        if block_order not in BLOCK_ORDERS:
            raise UserError(
                f"projector block_order {block_order!r} is unknown: choose one of {BLOCK_ORDERS}"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            norm_act = [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            if block_order == "relu-bn":
                norm_act.reverse()
            # a bias before BN is cancelled by it; before ReLU it matters
            layers += [nn.Linear(width, hidden_dim, bias=block_order == "relu-bn"), *norm_act]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() < 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"expected features of shape (N, {self.in_dim}, ...), got {tuple(features.shape)}"
            )
        pooled = features.flatten(2).mean(2) if features.dim() > 2 else features
        return self.mlp(pooled)
