"""hpc_btunet: self-supervised (Barlow Twins) biomedical image segmentation at cluster scale."""

__version__ = "0.1.0"
