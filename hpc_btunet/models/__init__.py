"""Segmentation models: shared blocks, the registry, and encoder weight transfer.

``build_model(name, in_channels, out_channels, **options)`` builds any registered model; every
model has ``encoder`` (returning one feature per ``encoder.stages`` entry, bottleneck last, with
``encoder.out_channels`` channels), ``decoder``, ``head``, ``size_divisor`` and ``min_size`` (input
height and width must be multiples of ``size_divisor``, ``2**depth``, and at least ``min_size``;
``check_input_size`` says so before a job starts). Models with ``deep_supervision`` true (UNet++)
also have ``forward_heads(x)``, every head's logits.
"""

from hpc_btunet.models.blocks import StageInfo
from hpc_btunet.models.rca_iunet import InceptionUNet  # noqa: F401  (registers inception_unet, rca_iunet)
from hpc_btunet.models.registry import (
    build_model,
    check_input_size,
    describe,
    encoder_state,
    list_models,
    load_encoder_state,
    min_input_size,
    model_options,
    model_signature,
    register_model,
    required_divisor,
)
from hpc_btunet.models.unet import UNet  # importing it registers the U-Net models
from hpc_btunet.models.unet_plus_plus import UNetPlusPlus  # registers unet_plus_plus

__all__ = [
    "StageInfo",
    "UNet",
    "UNetPlusPlus",
    "build_model",
    "check_input_size",
    "describe",
    "encoder_state",
    "list_models",
    "load_encoder_state",
    "min_input_size",
    "model_options",
    "model_signature",
    "register_model",
    "required_divisor",
]
