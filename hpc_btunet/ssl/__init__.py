"""Self-supervised pre-training: Barlow Twins projector, loss and view augmentations."""

from hpc_btunet.ssl.barlow_twins import BarlowTwinsLoss, cross_correlation_stats, standardise
from hpc_btunet.ssl.projector import Projector, default_projector_width
from hpc_btunet.ssl.views import TwoViews, ViewConfig, view_seed

__all__ = [
    "BarlowTwinsLoss",
    "Projector",
    "TwoViews",
    "ViewConfig",
    "cross_correlation_stats",
    "default_projector_width",
    "standardise",
    "view_seed",
]
