"""The contrastive UNet++ pair's loss, distortion and pair plan (hpc_btunet/ssl/contrastive.py):
Eq. 1 against hand computations, its unsafe points (log 0, 0/0) finite with finite gradients,
every pair's labels, distortions within the paper's ranges and their geometry, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpc_btunet.errors import UserError
from hpc_btunet.ssl.contrastive import (
    KINDS,
    Distortion,
    DistortionConfig,
    check_eta,
    check_kinds,
    hybrid_loss,
    pair_targets,
    plan_pairs,
)


def eq1(y: np.ndarray, p: np.ndarray) -> float:
    """Eq. 1 for one slice written out literally with two classes (marker, background), in
    float64, where it is defined (no pixel with y = p = 0 in either class)."""
    total = 0.0
    for yc, pc in ((y, p), (1 - y, 1 - p)):
        total += np.sum(yc * np.log(pc) + yc * pc / (yc**2 + pc**2))
    return -total / y.size


def logit(p) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


def test_hand_computed_values():
    # y = 1, p = 1/2: -(log 1/2 + (1/2) / (1 + 1/4)) = log 2 - 2/5 (background: y = 0, no term)
    loss = hybrid_loss(logit([[0.5]]).view(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert loss.item() == pytest.approx(math.log(2) - 0.4, abs=1e-5)
    # y = p = 1/2: each class gives 1/2 log 1/2 + 1/2, so -(2 (1/2 log 1/2 + 1/2)) = log 2 - 1
    loss = hybrid_loss(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5))
    assert loss.item() == pytest.approx(math.log(2) - 1, abs=1e-5)
    # y = 1/4, p = 3/4, by hand: marker 1/4 log 3/4 + (3/16) / (10/16) = 1/4 log 3/4 + 3/10,
    # background 3/4 log 1/4 + (3/16) / (10/16) = 3/4 log 1/4 + 3/10
    expected = -(0.25 * math.log(0.75) + 0.3 + 0.75 * math.log(0.25) + 0.3)
    loss = hybrid_loss(logit([[0.75]]).view(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.25))
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_matches_eq1_on_random_slices():
    rng = np.random.default_rng(0)
    y = rng.uniform(0.01, 0.99, (3, 1, 8, 8))
    p = rng.uniform(0.01, 0.99, (3, 1, 8, 8))
    loss = hybrid_loss(logit(p).float(), torch.tensor(y, dtype=torch.float32))
    expected = [eq1(y[i], p[i]) for i in range(3)]
    # the eps^2 in the ratio's denominator and float32 stay far below 1e-4 here
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_loss_is_smallest_at_the_target():
    """For a binary target the loss falls as p approaches it (Eq. 1 is a proper loss there)."""
    for y in (0.0, 1.0):
        values = [
            hybrid_loss(logit([[p]]).view(1, 1, 1, 1).float(), torch.full((1, 1, 1, 1), y)).item()
            for p in (0.1, 0.3, 0.5, 0.7, 0.9)
        ]
        assert values == sorted(values, reverse=(y == 1.0)), (y, values)


def test_y_and_p_zero_is_finite_with_finite_gradients():
    """y = p = 0 (0/0 in Eq. 1's ratio; log 0 where p underflows): the marker class adds exactly
    0 (the ratio's limit along y = 0), the background class y = p = 1 gives log 1 + 1/2."""
    logits = torch.full((2, 1, 4, 4), -200.0, requires_grad=True)  # sigmoid underflows to 0
    target = torch.zeros(2, 1, 4, 4)
    loss = hybrid_loss(logits, target)
    assert torch.isfinite(loss).all()
    assert loss.tolist() == pytest.approx([-0.5, -0.5], abs=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("y", [0.0, 1e-9, 1e-4, 0.5, 1 - 1e-9, 1.0])
@pytest.mark.parametrize("z", [-1e4, -50.0, -5.0, 0.0, 5.0, 50.0, 1e4])
def test_gradients_finite_and_bounded_everywhere(y, z):
    """Extreme logits and targets near 0 and 1: a finite loss, and a gradient with respect to
    the logit of at most 1 per pixel (the sigmoid's p (1 - p) cancels the growth of the ratio's
    derivative near y = p = 0; a scan over logits and targets finds 1.0 as the largest)."""
    logits = torch.full((1, 1, 1, 1), z, requires_grad=True)
    loss = hybrid_loss(logits, torch.full((1, 1, 1, 1), y))
    loss.backward()
    assert torch.isfinite(loss).all()
    grad = logits.grad.abs().item()
    assert math.isfinite(grad) and grad <= 1.0 + 1e-6


def test_valid_pixels_only_and_an_empty_region():
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    valid = torch.zeros(2, 1, 2, 2)
    valid[0, 0, 0, 0] = 1.0  # slice 0: the one pixel with y = 1; slice 1: nothing valid
    loss = hybrid_loss(logits, target, valid)
    assert loss[0].item() == pytest.approx(math.log(2) - 0.4, abs=1e-5)
    assert loss[1].item() == 0.0
    with pytest.raises(ValueError):
        hybrid_loss(logits, target[:, :, :1])


# ---------------------------------------------------------------------------- pairs


LABELS = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)  # 4 abnormal, 5 normal


def test_every_pair_has_the_right_labels():
    plan = plan_pairs(LABELS, seed=0, step=0)
    assert plan.count("distorted") == 4 and plan.count("negative") == 4
    assert plan.count("normal") == 3  # two pairs of two normal images, the fifth with itself
    for first, second, kind in zip(plan.first, plan.second, plan.kind, strict=True):
        a, b = bool(LABELS[first]), bool(LABELS[second])
        if KINDS[kind] == "distorted":
            assert a and b and first == second
        elif KINDS[kind] == "normal":
            assert not a and not b
        else:
            assert a and not b
    normal = plan.kind == KINDS.index("normal")
    assert sorted(plan.first[normal].tolist() + plan.second[normal].tolist()) == [1, 4, 5, 6, 8, 8]
    # every abnormal image appears in one negative pair, the normal ones taken in turn
    negative = plan.kind == KINDS.index("negative")
    assert plan.first[negative].tolist() == [0, 2, 3, 7]
    assert plan.second[negative].tolist() == [1, 4, 5, 6]
    assert plan.distort.tolist() == (plan.first == plan.second).tolist()


def test_pairs_are_deterministic_and_split_over_ranks():
    a = plan_pairs(LABELS, seed=3, step=7)
    b = plan_pairs(LABELS, seed=3, step=7)
    assert torch.equal(a.swap, b.swap) and torch.equal(a.first, b.first)
    others = [plan_pairs(LABELS, seed=s, step=7).swap for s in range(4, 12)]
    assert any(not torch.equal(a.swap, o) for o in others)
    assert 0 < int(a.swap.sum()) < len(a)  # both networks see both roles
    shares = [a.of_rank(r, 3) for r in range(3)]
    assert sorted(torch.cat(shares).tolist()) == list(range(len(a)))


def test_a_batch_of_one_class_and_the_policy():
    only_abnormal = plan_pairs(torch.ones(4, dtype=torch.bool), seed=0, step=0)
    assert only_abnormal.count("negative") == 0 and only_abnormal.count("distorted") == 4
    only = plan_pairs(LABELS, seed=0, step=0, kinds=("negative",))
    assert len(only) == only.count("negative") == 4
    assert check_kinds(["negative", "distorted", "negative"]) == ("negative", "distorted")
    with pytest.raises(UserError, match="yields no negative pairs"):
        check_kinds(["distorted", "normal"])
    with pytest.raises(UserError, match="unknown kind\\(s\\) swapped; choose among"):
        check_kinds(["swapped", "negative"])
    with pytest.raises(UserError, match="names no pair kind"):
        check_kinds([])


@pytest.mark.parametrize("eta", [0, -0.1, 1.5, float("nan"), float("inf")])
def test_eta_outside_the_unit_interval(eta):
    with pytest.raises(UserError, match="must be in \\(0, 1\\]"):
        check_eta(eta)
    assert check_eta(1) == 1.0 and check_eta(0.25) == 0.25


def test_targets_of_each_kind():
    a = torch.tensor([[0.2, 0.9]])
    b = torch.tensor([[0.6, 0.1]])
    t1, t2 = pair_targets("distorted", a, b)
    assert torch.equal(t1, b) and torch.equal(t2, a)
    t1, t2 = pair_targets("normal", a, b)
    assert not t1.any() and not t2.any()
    t1, t2 = pair_targets("normal", a, b, normal_target="swap")
    assert torch.equal(t1, b) and torch.equal(t2, a)
    t1, t2 = pair_targets("negative", a, b)
    assert torch.allclose(t1, 1 - b) and not t2.any()
    t1, _ = pair_targets("negative", a, b, negative_target="ones")
    assert torch.equal(t1, torch.ones_like(a))
    out = torch.tensor([0.3], requires_grad=True)
    assert not pair_targets("distorted", out, out)[0].requires_grad


# ---------------------------------------------------------------------------- distortion


@pytest.mark.parametrize("back", ["pad", "resize"])
def test_distortions_within_the_papers_ranges(back):
    d = Distortion.draw(DistortionConfig(back=back), 2000, seed=1, step=2)
    assert ((d.resolution >= 0.9) & (d.resolution <= 1.0)).all()
    assert d.resolution.min() < 0.91 and d.resolution.max() > 0.99  # the whole range is used
    assert ((d.scale >= 0.8 - 1e-12) & (d.scale <= 1.0)).all()
    assert ((d.offset >= 0) & (d.offset <= 1 - d.scale + 1e-12)).all()
    if back == "resize":  # the longer side fills the canvas again; the aspect stays distorted
        assert torch.allclose(d.scale.max(dim=1).values, torch.ones(2000, dtype=torch.float64))
        assert d.scale.min() < 0.81
    else:
        assert d.scale.min() < 0.81 and d.scale.max() > 0.99


def test_distortion_is_deterministic_and_sliceable():
    cfg = DistortionConfig()
    whole = Distortion.draw(cfg, 8, seed=5, step=9)
    again = Distortion.draw(cfg, 8, seed=5, step=9)
    rows = torch.tensor([2, 5, 7])
    part = Distortion.draw(cfg, 8, seed=5, step=9, rows=rows)
    assert torch.equal(whole.scale, again.scale) and torch.equal(whole.offset, again.offset)
    assert torch.equal(part.scale, whole.scale[rows]) and torch.equal(
        part.offset, whole.offset[rows]
    )
    images = torch.rand(8, 1, 32, 32)
    assert torch.equal(whole.apply(images)[rows], part.apply(images[rows]))
    other = Distortion.draw(cfg, 8, seed=6, step=9)
    assert not torch.equal(whole.scale, other.scale)
    state = torch.random.get_rng_state()
    Distortion.draw(cfg, 8, seed=5, step=9)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched


def test_warp_moves_content_where_the_parameters_say():
    """A bright square of an image of 64 lands at offset + scale x its place, scaled; the valid
    region covers scale_y x scale_x of the canvas."""
    d = Distortion(
        resolution=torch.tensor([1.0], dtype=torch.float64),
        scale=torch.tensor([[0.8, 0.9]], dtype=torch.float64),
        offset=torch.tensor([[0.1, 0.05]], dtype=torch.float64),
    )
    image = torch.zeros(1, 1, 64, 64)
    image[..., 16:48, 16:48] = 1.0
    out = d.apply(image)
    ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
    # edges of the bright region (first pixel, last pixel + 1) in pixels of the canvas:
    # rows 64 (0.1 + 0.8 * 16 / 64) = 19.2 to 64 (0.1 + 0.8 * 48 / 64) = 44.8,
    # columns 64 (0.05 + 0.9 * 16 / 64) = 17.6 to 64 (0.05 + 0.9 * 48 / 64) = 46.4
    edges = [ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1]
    assert edges == pytest.approx([19.2, 44.8, 17.6, 46.4], abs=0.6)
    valid = d.valid(image)
    assert valid.sum().item() == pytest.approx(0.8 * 0.9 * 64 * 64, rel=0.03)
    assert valid[0, 0, :6].sum() == 0 and valid[0, 0, :, :3].sum() == 0  # the padded margins
    # the geometry alone carries a network's output into the distorted frame: same as the image
    assert torch.allclose(d.warp(image), out, atol=1e-6)


def test_blur_keeps_a_fraction_of_the_resolution():
    """Resampled to 90 % and back: a constant image is unchanged, a checkerboard at the pixel
    frequency (above the new Nyquist limit) loses most of its contrast."""
    d = Distortion(
        resolution=torch.tensor([0.9, 1.0], dtype=torch.float64),
        scale=torch.ones(2, 2, dtype=torch.float64),
        offset=torch.zeros(2, 2, dtype=torch.float64),
    )
    flat = torch.full((2, 1, 40, 40), 0.7)
    assert torch.allclose(d.blur(flat), flat, atol=1e-6)
    checker = ((torch.arange(40)[:, None] + torch.arange(40)[None, :]) % 2).float()
    images = checker.expand(2, 1, 40, 40).contiguous()
    blurred = d.blur(images)
    assert torch.equal(blurred[1], images[1])  # resolution 1: untouched
    assert blurred[0].std() < 0.5 * images[0].std()


def test_bad_distortion_options():
    with pytest.raises(UserError, match="scale"):
        DistortionConfig(scale=(0.0, 1.0))
    with pytest.raises(UserError, match="resolution"):
        DistortionConfig(resolution=(0.95, 0.9))
    with pytest.raises(UserError, match="pad or resize"):
        DistortionConfig(back="crop")
