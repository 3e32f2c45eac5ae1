"""Attention gate and attention U-Net, UNet++ heads, its paper variant, and encoder transfer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpc_btunet.errors import UserError
from hpc_btunet.models import (
    UNet,
    UNetPlusPlus,
    build_model,
    check_input_size,
    encoder_state,
    load_encoder_state,
    model_options,
    model_signature,
)
from hpc_btunet.models.attention import AttentionGate, attention_maps
from hpc_btunet.models.blocks import SeparableConv2d
from hpc_btunet.models.unet_plus_plus import level_kernel_sizes

SMALL = {"base_width": 4}


def _seeded(name: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **{**SMALL, **options})


@pytest.mark.parametrize(
    "scale, skip_size", [(1, (8, 8)), (2, (16, 16)), (2, (16, 24)), (4, (32, 16))]
)
def test_gate_coefficients_have_the_skip_size_and_lie_in_0_1(scale, skip_size):
    torch.manual_seed(0)
    gate = AttentionGate(channels=6, gating_channels=12, scale=scale)
    x = torch.randn(3, 6, *skip_size)
    g = torch.randn(3, 12, skip_size[0] // scale, skip_size[1] // scale) * 10  # saturates some
    out, alpha = gate(x, g, return_attention=True)
    assert out.shape == x.shape
    assert alpha.shape == (3, 1, *skip_size)
    assert alpha.min() >= 0 and alpha.max() <= 1
    assert alpha.std() > 0  # depends on the position, not a constant
    assert torch.equal(gate.coefficients(x, g), alpha)
    assert torch.equal(gate(x, g), out)
    assert gate.theta.out_channels == 3  # intermediate channels = in / 2


def test_attention_unet_is_the_unet_with_gated_skips():
    model = _seeded("attention_unet").eval()
    assert type(model) is UNet and model.signature["skip"] == "attention"
    assert "skip" not in model_options("attention_unet")
    assert all(isinstance(block.gate, AttentionGate) for block in model.decoder.blocks)
    assert all(block.gate is None for block in _seeded("unet").decoder.blocks)
    x = torch.randn(2, 1, 32, 32)
    maps = attention_maps(model, x)
    # One gate per skip, deepest first: skips at 1/8, 1/4, 1/2 and 1/1 of the input.
    assert [m.shape for m in maps] == [(2, 1, s, s) for s in (4, 8, 16, 32)]
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    with pytest.raises(UserError, match="skip must be one of"):
        build_model("unet", skip="gated")


@pytest.mark.parametrize("deep_supervision, heads", [(True, 4), (False, 1)])
def test_unetpp_forward_heads(deep_supervision, heads):
    model = _seeded("unet_plus_plus", out_channels=2, deep_supervision=deep_supervision)
    assert model.deep_supervision is deep_supervision and model.num_heads == heads
    outputs = model.forward_heads(torch.randn(2, 1, 32, 48))
    assert [o.shape for o in outputs] == [(2, 2, 32, 48)] * heads


@pytest.mark.parametrize("inference", ["mean", "last"])
def test_unetpp_inference_combines_the_heads(inference):
    model = _seeded("unet_plus_plus", out_channels=2, inference=inference).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        heads = model.forward_heads(x)
        out = model(x)
    expected = torch.stack(heads).mean(0) if inference == "mean" else heads[-1]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(heads[0], heads[-1])  # the heads are distinct predictors


def test_unetpp_heads_are_the_grouped_head_on_the_top_row():
    model = _seeded("unet_plus_plus", out_channels=2, depth=3).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        top = model.decoder(model.encoder(x))
        heads = model.forward_heads(x)
    w, b = model.head.weight, model.head.bias
    for k, (node, logits) in enumerate(zip(top, heads, strict=True)):
        own = torch.nn.functional.conv2d(node, w[2 * k : 2 * k + 2], b[2 * k : 2 * k + 2])
        torch.testing.assert_close(logits, own)


def test_unetpp_nodes_follow_the_nested_pattern():
    model = _seeded("unet_plus_plus", depth=3)
    nodes = model.decoder.nodes
    assert sorted(nodes) == sorted(f"x{i}_{j}" for j in range(1, 4) for i in range(4 - j))
    for name, node in nodes.items():
        i, j = map(int, name[1:].split("_"))
        width = 4 * 2**i
        # concat[up(X(i+1, j-1)), X(i, 0..j-1)]: j + 1 inputs of level i's width.
        assert node.unit1.conv.depthwise.in_channels == (j + 1) * width
        assert node.up.conv.in_channels == 2 * width


def test_paper_variant_builds_runs_and_describes_its_stages():
    model = _seeded("unet_plus_plus", stride_downsample=True, kernel_size="grow", separable=False)
    encoder = model.encoder
    assert not any(isinstance(m, (nn.MaxPool2d, SeparableConv2d)) for m in model.modules())
    kernels = [encoder.get_submodule(s.name).unit1.conv.kernel_size[0] for s in encoder.stages]
    assert kernels == [3, 3, 5, 5, 7]
    strides = [encoder.get_submodule(s.name).unit2.conv.stride[0] for s in encoder.stages]
    assert strides == [1, 2, 2, 2, 2]
    x = torch.randn(2, 1, 64, 64)
    features = encoder(x)
    for stage, feature in zip(encoder.stages, features, strict=True):
        assert feature.shape[1:] == (stage.channels, 64 // stage.reduction, 64 // stage.reduction)
    assert [s.channels for s in encoder.stages] == [4, 8, 16, 32, 64]
    assert model(x).shape == (2, 1, 64, 64)
    assert [h.shape for h in model.forward_heads(x)] == [(2, 1, 64, 64)] * 4


def test_default_unetpp_takes_a_unet_encoder():
    # Same Encoder, stages and pooling as the U-Net: pre-trained U-Net encoders transfer.
    unet = _seeded("unet", seed=0)
    model = _seeded("unet_plus_plus", seed=1)
    load_encoder_state(model, encoder_state(unet))
    for a, b in zip(encoder_state(unet).values(), encoder_state(model).values(), strict=True):
        assert torch.equal(a, b)


def test_loading_a_unet_encoder_into_the_paper_variant_names_both_models():
    source = model_signature("unet", **SMALL)
    state = encoder_state(build_model("unet", **SMALL))
    model = build_model("unet_plus_plus", kernel_size="grow", stride_downsample=True, **SMALL)
    with pytest.raises(UserError) as info:
        load_encoder_state(model, state, "encoder.pt", source_signature=source)
    message = str(info.value)
    assert message.startswith("encoder.pt is not an encoder of unet_plus_plus(in_channels=1,")
    assert "shape mismatches" in message and "blocks.2.unit1.conv.depthwise.weight" in message
    assert "it was saved from unet(in_channels=1," in message
    assert (
        "which differs in name ('unet' vs 'unet_plus_plus'), kernel_size (3 vs 'grow')" in message
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inference": "max"}, r"inference must be one of \('mean', 'last'\)"),
        ({"kernel_size": 4}, "kernel sizes must be odd positive ints, got \\[4, 4"),
        ({"kernel_size": (3, 5)}, r"lists 2 sizes, but depth \+ 1 = 5 levels"),
        ({"kernel_size": "big"}, "kernel_size must be an odd int, 'grow' or one odd int per level"),
        ({"depth": 0}, "depth must be at least 1"),
        ({"upsample": "nearest"}, "upsample must be one of"),
        ({"deep_supervision": 1}, "deep_supervision must be bool"),
    ],
)
def test_unetpp_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_model("unet_plus_plus", **options)


def test_unetpp_size_rules_and_kernel_presets():
    model = build_model("unet_plus_plus", depth=3, **SMALL)
    assert isinstance(model, UNetPlusPlus) and model.size_divisor == 8
    check_input_size(model, 24)
    with pytest.raises(UserError, match=r"20 is not divisible by 8 \(2\^3"):
        check_input_size(model, 20)
    with pytest.raises(ValueError, match="not divisible by 8"):
        model(torch.randn(1, 1, 20, 24))
    assert level_kernel_sizes("grow", 6) == (3, 3, 5, 5, 7, 7)
    assert level_kernel_sizes([3, 5, 7], 3) == (3, 5, 7)
