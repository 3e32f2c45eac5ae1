"""Models: shapes, stage data, BN after every conv, training signal, registry and transfer errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hpc_btunet.errors import UserError
from hpc_btunet.models import (
    UNet,
    build_model,
    check_input_size,
    encoder_state,
    list_models,
    load_encoder_state,
    min_input_size,
    model_options,
    model_signature,
    required_divisor,
)
from hpc_btunet.models.blocks import SeparableConv2d

MODELS = list_models()


def _seeded(name: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **options)


def _call_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Leaf modules in the order the forward pass runs them."""
    order: list[nn.Module] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in leaves]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_output_has_input_size(name, in_channels, size):
    model = _seeded(name, in_channels=in_channels, out_channels=2)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 2, size, size)


@pytest.mark.parametrize("name", MODELS)
def test_stages_describe_real_features(name):
    model = _seeded(name).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        features = model.encoder(x)
    stages = model.encoder.stages
    assert len(features) == len(stages)
    assert model.encoder.out_channels == stages[-1].channels
    assert required_divisor(model) == stages[-1].reduction
    for stage, feature in zip(stages, features, strict=True):
        assert feature.shape[1] == stage.channels
        assert feature.shape[-1] * stage.reduction == 64
        # The name is data: the named submodule produces exactly that feature.
        produced = []
        hook = model.encoder.get_submodule(stage.name).register_forward_hook(
            lambda m, i, o, produced=produced: produced.append(o)
        )
        with torch.no_grad():
            model.encoder(x)
        hook.remove()
        assert torch.equal(produced[0], feature)


@pytest.mark.parametrize("name", MODELS)
def test_encoder_state_round_trips(name):
    source = _seeded(name, seed=0)
    source(torch.randn(4, 1, 32, 32))  # moves BN running statistics away from their defaults
    state = encoder_state(source)
    target = _seeded(name, seed=1)
    x = torch.randn(2, 1, 32, 32)
    source.eval()
    target.eval()
    with torch.no_grad():
        assert not torch.equal(source.encoder(x)[-1], target.encoder(x)[-1])
        load_encoder_state(target, state)
        for a, b in zip(source.encoder(x), target.encoder(x), strict=True):
            assert torch.equal(a, b)
        next(source.encoder.parameters()).add_(1.0)  # the state is a copy, not a view
    assert not torch.equal(next(iter(state.values())), next(source.encoder.parameters()))


@pytest.mark.parametrize("name", MODELS)
def test_adam_steps_lower_the_loss(name):
    model = _seeded(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=gen)
    mask = (torch.rand(4, 1, 32, 32, generator=gen) > 0.5).float()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = F.binary_cross_entropy_with_logits(model(x), mask)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_is_followed_by_batchnorm(name):
    model = _seeded(name)
    separable = {
        id(s.depthwise): s.pointwise for s in model.modules() if isinstance(s, SeparableConv2d)
    }
    order = _call_order(model, torch.randn(2, 1, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert {id(m) for m in convs} <= {id(m) for m in order}, "a conv is never run"
    for conv, after in zip(order, [*order[1:], None], strict=True):
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or conv is model.head:
            continue
        if id(conv) in separable:
            assert after is separable[id(conv)]
        else:
            assert isinstance(after, nn.BatchNorm2d), f"{conv} is followed by {after}"
            assert after.num_features == conv.out_channels


@pytest.mark.parametrize("separable_stem, plain", [(False, 1), (True, 0)])
def test_unet_convolutions_are_separable(separable_stem, plain):
    model = build_model("unet", separable_stem=separable_stem)
    depthwise = {id(s.depthwise) for s in model.modules() if isinstance(s, SeparableConv2d)}
    spatial = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and id(m) not in depthwise
    ]
    assert len(spatial) == plain  # only the stem's first convolution, unless asked otherwise


def test_default_unet_matches_the_paper():
    model = build_model("unet")
    assert isinstance(model, UNet)
    assert [s.channels for s in model.encoder.stages] == [16, 32, 64, 128, 256]
    assert [s.reduction for s in model.encoder.stages] == [1, 2, 4, 8, 16]
    assert model.encoder.out_channels == 256
    assert model.size_divisor == 16
    print(f"default unet: {sum(p.numel() for p in model.parameters()):,} parameters")


@pytest.mark.parametrize("options", [{"kernel_size": 5}, {"upsample": "bilinear"}, {"depth": 2}])
def test_unet_options_keep_the_output_size(options):
    model = build_model("unet", base_width=4, **options)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_signature_resolves_every_option():
    assert model_signature("unet", in_channels=3, depth=3) == {
        "name": "unet",
        "in_channels": 3,
        "out_channels": 1,
        "base_width": 16,
        "depth": 3,
        "kernel_size": 3,
        "upsample": "transpose",
        "separable_stem": False,
        "skip": "concat",
    }
    assert build_model("unet", in_channels=3, depth=3).signature == model_signature(
        "unet", in_channels=3, depth=3
    )


def test_unknown_model_lists_known_ones():
    with pytest.raises(UserError, match=r"unknown model 'unte' \(did you mean 'unet'\?\).*unet"):
        build_model("unte")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(UserError, match="unknown option 'width'") as info:
        build_model("unet", width=8)
    for option in model_options("unet"):
        assert option in str(info.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"depth": 0}, "depth must be at least 1, got 0"),
        ({"base_width": 0}, "base_width must be at least 1"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"upsample": "nearest"}, "upsample must be one of"),
        ({"depth": "4"}, r"depth must be int, got '4' \(str\)"),
        ({"separable_stem": 1}, "separable_stem must be bool"),
    ],
)
def test_bad_values_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_model("unet", **options)


def test_input_size_error_names_the_divisor():
    model = build_model("unet", base_width=4)
    check_input_size(model, 96)
    with pytest.raises(UserError, match=r"100 is not divisible by 16 \(2\^4.*96 or 112"):
        check_input_size(model, 100)
    with pytest.raises(UserError, match="use --image-size 16$"):
        check_input_size(model, (32, 8))
    with pytest.raises(ValueError, match="not divisible by 16"):
        model(torch.randn(1, 1, 40, 48))


# every registered model, and the options that change how a size shrinks and grows back
SIZE_CASES = [(name, {}) for name in MODELS] + [
    ("unet", {"upsample": "bilinear"}),
    ("unet_plus_plus", {"stride_downsample": True}),
]


def _sides_around_the_rules(divisor: int) -> list[int]:
    """1 to 3, and each multiple of ``divisor`` up to 4 times it with its neighbours."""
    sides = {1, 2, 3} | {k * divisor + d for k in range(1, 5) for d in (-1, 0, 1)}
    return sorted(s for s in sides if s <= 4 * divisor)


def _runs(model: nn.Module, size: tuple[int, int]) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(1, 1, *size))
    except (RuntimeError, ValueError):  # pooling to nothing, skips of other sizes, ...
        return False
    return True


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize(
    "name, options",
    SIZE_CASES,
    ids=[name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in SIZE_CASES],
)
def test_check_input_size_accepts_exactly_the_sizes_that_run(name, options, depth):
    model = _seeded(name, base_width=4, depth=depth, **options).eval()
    divisor = 2**depth
    assert required_divisor(model) == divisor and min_input_size(model) % divisor == 0
    sizes = [(s, s) for s in _sides_around_the_rules(divisor)]
    sizes += [(2 * divisor, divisor), (divisor, 3 * divisor), (4 * divisor, 2 * divisor)]
    accepted, suggested = [], set()
    for size in sizes:
        try:
            check_input_size(model, size)
        except UserError as error:
            # the model's own guard refuses it with the same message
            with pytest.raises(ValueError, match=re.escape(str(error))):
                model(torch.randn(1, 1, *size))
            choices = re.search(r"use --image-size (\d+)(?: or (\d+))?$", str(error))
            suggested |= {int(c) for c in choices.groups() if c}
        else:
            accepted.append(size)
    # what the math can take, with the guard relaxed
    model.size_divisor = model.min_size = 1
    assert accepted == [size for size in sizes if _runs(model, size)]
    assert suggested <= {side for side, other in accepted if side == other}


def test_loading_a_wider_encoder_names_the_mismatch():
    narrow = model_signature("unet", base_width=8)
    state = encoder_state(build_model("unet", base_width=8))
    model = build_model("unet")
    with pytest.raises(UserError) as info:
        load_encoder_state(model, state, "encoder.pt", source_signature=narrow)
    message = str(info.value)
    assert message.startswith("encoder.pt is not an encoder of unet(in_channels=1,")
    assert (
        "shape mismatches (e.g. blocks.0.unit1.conv.weight: saved (8, 1, 3, 3) vs model" in message
    )
    assert "which differs in base_width (8 vs 16)" in message


def test_loading_a_shallower_encoder_or_a_whole_model_names_the_keys():
    model = build_model("unet")
    with pytest.raises(UserError, match=r"missing keys \(e\.g\. blocks\.4\."):
        load_encoder_state(model, encoder_state(build_model("unet", depth=3)))
    with pytest.raises(UserError, match="whole-model state dict"):
        load_encoder_state(model, model.state_dict())


def test_transfer_sees_through_wrappers():
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's ``.module``
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = _seeded("unet")
    wrapped = Wrapper(_seeded("unet", seed=1))
    load_encoder_state(wrapped, encoder_state(model))
    assert all(
        torch.equal(a, b)
        for a, b in zip(encoder_state(wrapped).values(), encoder_state(model).values(), strict=True)
    )
    assert required_divisor(wrapped) == 16


def test_variants_are_registrations_with_fixed_options(monkeypatch):
    from hpc_btunet.models import registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # keep the registry clean
    registry.register_model("unet_k5", kernel_size=5)(UNet)
    assert "unet_k5" in list_models()
    assert "kernel_size" not in model_options("unet_k5")
    model = build_model("unet_k5", base_width=4)
    assert model.signature["kernel_size"] == 5
    assert model.encoder.blocks[1].unit1.conv.depthwise.kernel_size == (5, 5)
    with pytest.raises(UserError, match="'unet_k5' fixes option kernel_size=5"):
        build_model("unet_k5", kernel_size=3)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model("unet")(UNet)
