"""Two distorted views: shape, range, seeded determinism, independence, global RNG untouched."""

from __future__ import annotations

import pytest
import torch

from hpc_btunet.errors import UserError
from hpc_btunet.ssl import TwoViews, ViewConfig, view_seed


def _images(channels: int, n: int = 6, size: int = 24) -> torch.Tensor:
    # smooth gradients plus noise: every crop, rotation and flip changes the pixels
    g = torch.Generator().manual_seed(channels)
    ramp = torch.linspace(0, 200, size)
    base = ramp[None, :] + ramp[:, None] / 4
    noise = torch.randint(0, 50, (n, channels, size, size), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_range(channels):
    images = _images(channels)
    view_a, view_b = TwoViews()(images, seed=0, step=0, rank=0)
    for v in (view_a, view_b):
        assert v.shape == images.shape and v.dtype == torch.float32
        assert v.device == images.device
        assert float(v.min()) >= 0 and float(v.max()) <= 1
    # views are distortions of the images, not noise: the mean intensity is preserved roughly
    assert abs(float(view_a.mean()) - float(images.float().mean() / 255)) < 0.1


@pytest.mark.parametrize("channels", [1, 3])
def test_same_seed_step_rank_gives_the_same_views(channels):
    images = _images(channels)
    first = TwoViews()(images, seed=7, step=3, rank=1)
    torch.manual_seed(12345)  # the global RNG state must not matter
    torch.rand(10)
    second = TwoViews()(images, seed=7, step=3, rank=1)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_views_differ_across_steps_ranks_seeds_and_between_a_and_b():
    images = _images(1)
    views = TwoViews()
    base_a, base_b = views(images, seed=7, step=3, rank=1)
    assert not torch.allclose(base_a, base_b)
    for i in range(len(images)):  # every image's two views are different draws
        assert not torch.allclose(base_a[i], base_b[i])
    for kw in ({"seed": 8, "step": 3, "rank": 1}, {"seed": 7, "step": 4, "rank": 1}):
        other_a, _ = views(images, **kw)
        assert not torch.allclose(other_a, base_a)
    other_a, _ = views(images, seed=7, step=3, rank=0)
    assert not torch.allclose(other_a, base_a)


def test_the_global_rng_is_untouched():
    torch.manual_seed(99)
    expected = torch.rand(5)
    torch.manual_seed(99)
    TwoViews()(_images(3), seed=1, step=2, rank=0)
    assert torch.equal(torch.rand(5), expected)


def test_view_seed_mixes_all_three_numbers():
    seeds = {view_seed(s, t, r) for s in range(3) for t in range(3) for r in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert view_seed(1, 2, 0) != view_seed(2, 1, 0)


IDENTITY = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "rotation_degrees": 0.0}


def test_without_distortions_the_views_are_the_images():
    cfg = ViewConfig(**IDENTITY, hflip_p=0.0, vflip_p=0.0)
    images = _images(3)
    for view in TwoViews(cfg)(images, seed=0, step=0):
        torch.testing.assert_close(view, images.float() / 255, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hflip,vflip,dims", [(1.0, 0.0, [3]), (0.0, 1.0, [2]), (1.0, 1.0, [2, 3])])
def test_flips(hflip, vflip, dims):
    images = _images(1)
    view, _ = TwoViews(ViewConfig(**IDENTITY, hflip_p=hflip, vflip_p=vflip))(images, seed=0, step=0)
    torch.testing.assert_close(view, images.flip(dims).float() / 255, atol=1e-5, rtol=0)


def test_intensity_jitter_and_normalisation():
    images = _images(3)
    plain = TwoViews()(images, seed=0, step=0)[0]
    jittered = TwoViews(ViewConfig(brightness=0.3, contrast=0.3))(images, seed=0, step=0)[0]
    assert (
        jittered.shape == plain.shape and 0 <= float(jittered.min()) <= float(jittered.max()) <= 1
    )
    assert not torch.allclose(jittered, plain)
    cfg = ViewConfig(mean=(0.5,), std=(0.25,))
    normalised = TwoViews(cfg)(images, seed=0, step=0)[0]
    torch.testing.assert_close(normalised, (plain - 0.5) / 0.25)


def test_bad_input_and_options_fail_clearly():
    with pytest.raises(ValueError, match="uint8"):
        TwoViews()(torch.rand(2, 1, 8, 8), seed=0, step=0)
    with pytest.raises(UserError, match="crop_scale"):
        ViewConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(UserError, match="pair"):
        ViewConfig(crop_ratio=(1.0,))
    with pytest.raises(UserError, match="choose one of"):
        ViewConfig(padding_mode="wrap")
    with pytest.raises(UserError, match="together"):
        ViewConfig(mean=(0.5,))
    with pytest.raises(UserError, match="3-channel"):
        TwoViews(ViewConfig(mean=(0.5, 0.5), std=(1.0, 1.0)))(_images(3), seed=0, step=0)
