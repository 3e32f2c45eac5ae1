"""Two distorted views: shape, range, seeded determinism per sample, independence, global RNG
untouched."""

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
    view_a, view_b = TwoViews()(images, seed=0, step=0)
    for v in (view_a, view_b):
        assert v.shape == images.shape and v.dtype == torch.float32
        assert v.device == images.device
        assert float(v.min()) >= 0 and float(v.max()) <= 1
    # views are distortions of the images, not noise: the mean intensity is preserved roughly
    assert abs(float(view_a.mean()) - float(images.float().mean() / 255)) < 0.1


@pytest.mark.parametrize("channels", [1, 3])
def test_same_seed_and_step_give_the_same_views(channels):
    images = _images(channels)
    first = TwoViews()(images, seed=7, step=3)
    torch.manual_seed(12345)  # the global RNG state must not matter
    torch.rand(10)
    second = TwoViews()(images, seed=7, step=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cuts", [[4, 8], [2, 4, 6, 8], [3, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
def test_views_are_seeded_by_the_samples_place_in_the_global_batch(cuts):
    """Slices of a global batch (W ranks, K micro-batches) get the rows of the whole batch's
    views, bitwise, and the draws of one step are not shared by another step."""
    images = _images(3, n=8)
    views = TwoViews()
    whole = views(images, seed=5, step=2)
    start, parts = 0, []
    for stop in cuts:
        parts.append(TwoViews()(images[start:stop], seed=5, step=2, offset=start, total=8))
        start = stop
    for i, whole_view in enumerate(whole):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole_view)
    other = views(images[:4], seed=5, step=3, offset=0, total=8)
    assert not torch.allclose(other[0], whole[0][:4])


def test_rows_outside_the_global_batch_are_refused():
    with pytest.raises(ValueError, match="outside a global batch of 8"):
        TwoViews()(_images(1, n=4), seed=0, step=0, offset=6, total=8)


def test_views_differ_across_steps_seeds_and_between_a_and_b():
    images = _images(1)
    views = TwoViews()
    base_a, base_b = views(images, seed=7, step=3)
    assert not torch.allclose(base_a, base_b)
    for i in range(len(images)):  # every image's two views are different draws
        assert not torch.allclose(base_a[i], base_b[i])
    for kw in ({"seed": 8, "step": 3}, {"seed": 7, "step": 4}):
        other_a, _ = views(images, **kw)
        assert not torch.allclose(other_a, base_a)
    for i in range(1, len(images)):  # every image of a batch gets its own draw
        assert not torch.allclose(base_a[i], base_a[0])


def test_the_global_rng_is_untouched():
    torch.manual_seed(99)
    expected = torch.rand(5)
    torch.manual_seed(99)
    TwoViews()(_images(3), seed=1, step=2)
    assert torch.equal(torch.rand(5), expected)


def test_view_seed_mixes_both_numbers():
    seeds = {view_seed(s, t) for s in range(5) for t in range(5)}
    assert len(seeds) == 25 and all(0 <= s < 2**63 for s in seeds)
    assert view_seed(1, 2) != view_seed(2, 1)


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
