"""Spectral and hybrid pooling, inception blocks, cross-spatial attention, I-Unet and RCA-IUnet."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_btunet.errors import UserError
from hpc_btunet.models import (
    build_model,
    check_input_size,
    encoder_state,
    load_encoder_state,
    min_input_size,
    model_options,
    model_signature,
)
from hpc_btunet.models.inception import HybridPool2d, InceptionBlock
from hpc_btunet.models.rca_iunet import CrossSpatialAttention
from hpc_btunet.models.spectral_pool import (
    SpectralLowPass2d,
    SpectralPool2d,
    resize_spectrum,
    spectral_resize,
)

SIZES = [((8, 8), (4, 4)), ((9, 9), (4, 4)), ((7, 10), (3, 5)), ((12, 20), (6, 10))]


def _waves(size: tuple[int, int], waves) -> torch.Tensor:
    """Sum of ``amplitude * cos(2 pi (u i / H + v j / W) + phase)`` on an ``H x W`` grid."""
    height, width = size
    i = torch.arange(size[0], dtype=torch.float64)[:, None]
    j = torch.arange(size[1], dtype=torch.float64)[None, :]
    out = torch.zeros(size, dtype=torch.float64)
    for amplitude, u, v, phase in waves:
        out += amplitude * torch.cos(2 * math.pi * (u * i / height + v * j / width) + phase)
    return out[None, None]


@pytest.mark.parametrize("size, pooled", SIZES)
def test_constant_image_stays_the_same_constant(size, pooled):
    x = torch.full((2, 3, *size), 2.5)
    out = SpectralPool2d(factor=2)(x)
    assert out.shape == (2, 3, *pooled)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
    torch.testing.assert_close(SpectralLowPass2d(2)(x), x)


@pytest.mark.parametrize("size, pooled", SIZES)
def test_image_inside_the_band_passes_exactly(size, pooled):
    # Any image of the output grid, upsampled by zero-padding its spectrum, comes back exactly:
    # random values include the Nyquist row and column of even output sides.
    small = torch.randn(2, 3, *pooled, dtype=torch.float64)
    torch.testing.assert_close(SpectralPool2d(pooled)(spectral_resize(small, size)), small)


def test_low_frequency_waves_are_sampled_exactly():
    # Waves below the output Nyquist frequency at any phase, and the Nyquist wave itself: pooling
    # 16 x 12 by 2 samples them exactly on every second pixel.
    waves = [(1.0, 0, 0, 0.0), (0.7, 1, 2, 0.3), (-0.4, 3, -1, 1.1), (0.5, 0, 2, -0.8)]
    nyquist = [(0.9, 4, 0, 0.6), (0.3, 2, 3, 0.2), (0.25, 4, 3, 0.4)]
    x = _waves((16, 12), waves + nyquist)
    torch.testing.assert_close(SpectralPool2d(factor=2)(x), x[..., ::2, ::2])
    # A wave above the band is removed, not aliased.
    high = _waves((16, 12), [(1.0, 5, 0, 0.0)])
    torch.testing.assert_close(SpectralPool2d(factor=2)(high), torch.zeros(1, 1, 8, 6).double())


@pytest.mark.parametrize("size, pooled", SIZES)
def test_real_input_has_a_real_pooled_spectrum(size, pooled):
    spectrum = torch.fft.fft2(torch.randn(2, *size, dtype=torch.float64), norm="forward")
    for target in (pooled, (pooled[0] + 1, pooled[1] + 1)):
        out = torch.fft.ifft2(resize_spectrum(spectrum, target), norm="forward")
        assert out.imag.abs().max() < 1e-12


def test_pooling_acts_on_height_and_width_of_each_channel_alone():
    # The authors' code transformed W and C of an NHWC tensor; here channels never mix.
    x = torch.randn(2, 5, 12, 8)
    pool = SpectralPool2d(factor=2)
    out = pool(x)
    for c in range(5):
        torch.testing.assert_close(out[:, c : c + 1], pool(x[:, c : c + 1]))


@pytest.mark.parametrize(
    "size, pool, expected",
    [
        ((8, 8), SpectralPool2d(factor=2), (4, 4)),
        ((9, 7), SpectralPool2d(factor=2), (4, 3)),
        ((12, 20), SpectralPool2d((5, 7)), (5, 7)),
        ((16, 9), SpectralPool2d((16, 3)), (16, 3)),
        ((6, 6), SpectralPool2d(3), (3, 3)),
        ((11, 13), SpectralPool2d(factor=3), (3, 4)),
    ],
)
def test_output_size_is_exact(size, pool, expected):
    assert pool(torch.randn(1, 2, *size)).shape == (1, 2, *expected)


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="cannot pool 8x8 to 9x4"):
        SpectralPool2d((9, 4))(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="cannot pool 1x1 to 0x0"):
        SpectralPool2d(factor=2)(torch.randn(1, 1, 1, 1))
    with pytest.raises(ValueError, match="exactly one of"):
        SpectralPool2d((4, 4), factor=2)
    with pytest.raises(ValueError, match="exactly one of"):
        SpectralPool2d()


def test_low_pass_is_a_projection_and_keeps_the_dtype():
    x = torch.randn(2, 3, 10, 7, dtype=torch.float64)
    low = SpectralLowPass2d(2)(x)
    torch.testing.assert_close(SpectralLowPass2d(2)(low), low)
    for dtype in (torch.float16, torch.bfloat16):
        assert SpectralPool2d(factor=2)(x.to(dtype)).dtype == dtype


@pytest.mark.parametrize("module", [SpectralPool2d(factor=2), SpectralLowPass2d(2)])
def test_gradients_are_exact(module):
    for size in ((6, 5), (4, 7)):
        x = torch.randn(1, 1, *size, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(module, (x,))


def test_hybrid_pooling_shapes():
    x = torch.randn(2, 6, 8, 10)
    assert HybridPool2d(6)(x).shape == (2, 6, 4, 5)
    assert HybridPool2d(6, 4, stride=1)(x).shape == (2, 4, 8, 10)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        HybridPool2d(6, stride=3)


@pytest.mark.parametrize(
    "module",
    [HybridPool2d(2), HybridPool2d(2, stride=1), InceptionBlock(2, 2)],
    ids=["hybrid-pool", "hybrid-pool-stride-1", "inception-block"],
)
def test_min_size_is_the_smallest_side_that_runs(module):
    module.eval()
    side = module.min_size
    assert side == 2
    with torch.no_grad():
        module(torch.randn(1, 2, side, side + 1))
        for size in ((side - 1, side), (side, side - 1)):
            with pytest.raises((RuntimeError, ValueError)):  # max pooling or spectral pooling
                module(torch.randn(1, 2, *size))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("in_channels, out_channels", [(1, 8), (8, 8), (6, 4)])
def test_inception_block_output(in_channels, out_channels, residual):
    block = InceptionBlock(in_channels, out_channels, separable=in_channels > 1, residual=residual)
    out = block(torch.randn(2, in_channels, 12, 10))
    assert out.shape == (2, out_channels, 12, 10)
    if in_channels > 1:
        assert block.branches[2].conv.depthwise.kernel_size == (5, 5)
    if residual:
        assert (out >= 0).all()  # the ReLU comes after the sum


def test_cross_spatial_attention_coefficients():
    gate = CrossSpatialAttention(8, 16)
    x, g = torch.randn(2, 8, 12, 10), torch.randn(2, 16, 6, 5)
    out, alpha = gate(x, g, return_alpha=True)
    assert alpha.shape == (2, 1, 12, 10)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    torch.testing.assert_close(out, alpha * x)
    torch.testing.assert_close(gate(x, g), out)


def test_rca_iunet_attention_is_driven_by_the_encoder_alone():
    model = build_model("rca_iunet", base_width=4, depth=3).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.encoder(x)
        maps = model.attention_maps(x)
    assert len(maps) == 3
    for alpha, skip in zip(maps, features[:-1], strict=True):
        assert alpha.shape == (2, 1, *skip.shape[-2:])
        assert ((alpha >= 0) & (alpha <= 1)).all()
    assert build_model("inception_unet", base_width=4, depth=3).attention_maps(x) == []
    # Changing the decoder changes nothing in the coefficients.
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(1.0)
        for a, b in zip(maps, model.attention_maps(x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["inception_unet", "rca_iunet"])
def test_defaults_match_the_paper_and_variants_are_fixed(name):
    model = build_model(name)
    assert [s.channels for s in model.encoder.stages] == [16, 32, 64, 128, 256]
    assert [s.reduction for s in model.encoder.stages] == [1, 2, 4, 8, 16]
    assert all(isinstance(d, HybridPool2d) for d in model.encoder.downs)
    assert {"skip", "residual_decoder"}.isdisjoint(model_options(name))
    with pytest.raises(UserError, match=f"'{name}' fixes option skip="):
        build_model(name, skip="concat")
    with pytest.raises(UserError, match="kernel_size must be odd"):
        build_model(name, kernel_size=4)
    with pytest.raises(UserError, match="unknown option 'widht'"):
        build_model(name, widht=8)
    with pytest.raises(UserError, match=r"100 is not divisible by 16"):
        check_input_size(model, 100)


@pytest.mark.parametrize("name", ["inception_unet", "rca_iunet"])
def test_input_size_error_names_the_smallest_size(name):
    model = build_model(name, base_width=4)
    assert min_input_size(model) == 32
    check_input_size(model, 32)
    with pytest.raises(
        UserError,
        match=r"^input size 16 is below 32, the smallest valid size \(the bottleneck, 1/16 of it, "
        r"must be at least 2 x 2\): use --image-size 32$",
    ):
        check_input_size(model, 16)
    with pytest.raises(
        UserError, match=r"20 is not divisible by 16 .*; the smallest valid size is 32: .* 32$"
    ):
        check_input_size(model, (32, 20))
    with pytest.raises(
        UserError, match=r"the smallest valid size is 32: use --image-size 96 or 112$"
    ):
        check_input_size(model, 100)
    with pytest.raises(ValueError, match="16 is below 32"):
        model(torch.randn(1, 1, 32, 16))


def test_inception_encoder_into_unet_names_both_models():
    source = model_signature("inception_unet", base_width=4, depth=2)
    state = encoder_state(build_model("inception_unet", base_width=4, depth=2))
    with pytest.raises(UserError) as info:
        load_encoder_state(
            build_model("unet", base_width=4, depth=2), state, "enc.pt", source_signature=source
        )
    message = str(info.value)
    assert message.startswith("enc.pt is not an encoder of unet(in_channels=1,")
    assert "it was saved from inception_unet(in_channels=1," in message
    with pytest.raises(UserError, match=r"not an encoder of rca_iunet\(.*saved from unet\("):
        load_encoder_state(
            build_model("rca_iunet", base_width=4, depth=2),
            encoder_state(build_model("unet", base_width=4, depth=2)),
            source_signature=model_signature("unet", base_width=4, depth=2),
        )


def test_inception_encoder_loads_into_rca_iunet():
    # Same encoder by design (see rca_iunet's module docstring), like unet -> attention_unet.
    torch.manual_seed(0)
    source = build_model("inception_unet", base_width=4, depth=2).eval()
    target = build_model("rca_iunet", base_width=4, depth=2).eval()
    load_encoder_state(target, encoder_state(source))
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(source.encoder(x), target.encoder(x), rtol=0, atol=0)
