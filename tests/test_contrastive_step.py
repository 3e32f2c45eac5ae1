"""One step of the contrastive pair (hpc_btunet/train/contrastive_step.py): the vectorised loss
equals a plain per-pair computation from the readings in docs/contrastive.md, the ranks' shares
add up to the whole global batch, gradients reach both networks, and a few steps lower it."""

from __future__ import annotations

import pytest
import torch

from hpc_btunet.models import build_model
from hpc_btunet.ssl.contrastive import (
    KINDS,
    Distortion,
    DistortionConfig,
    hybrid_loss,
    pair_targets,
    plan_pairs,
)
from hpc_btunet.train.contrastive_step import ContrastivePair, PairTargets, pair_loss

SIZE = 16
ABNORMAL = torch.tensor([1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)


def make_pair(seed: int = 0) -> ContrastivePair:
    torch.manual_seed(seed)
    nets = [build_model("unet_plus_plus", base_width=4, depth=2) for _ in range(2)]
    return ContrastivePair(*nets)


def images(n: int = len(ABNORMAL)) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def reference(pair, x, plan, targets: PairTargets, cfg: DistortionConfig, seed, step) -> float:
    """Pair by pair, written out: who sees what, the warp into the distorted frame, the targets
    of ``pair_targets``, Eq. 1 per head, eta on the abnormal members; mean over member slices."""
    warp_all = Distortion.draw(cfg, len(plan), seed=seed, step=step)
    total = 0.0
    for k in range(len(plan)):
        f, s, kind = int(plan.first[k]), int(plan.second[k]), KINDS[int(plan.kind[k])]
        one = Distortion.draw(cfg, len(plan), seed=seed, step=step, rows=torch.tensor([k]))
        x1, x2 = x[f : f + 1], x[s : s + 1]
        if f == s:
            x2 = one.apply(x2)
        if plan.swap[k]:  # network A sees the second member, B the first
            heads_2, heads_1 = pair(x2, x1)
        else:
            heads_1, heads_2 = pair(x1, x2)
        valid = one.valid(x1) if f == s else torch.ones_like(x1)
        for l1, l2 in zip(heads_1, heads_2, strict=True):
            if f == s:
                l1 = one.warp(l1)
            t1, t2 = pair_targets(
                kind,
                torch.sigmoid(l1),
                torch.sigmoid(l2),
                normal_target=targets.normal_target,
                negative_target=targets.negative_target,
            )
            w1 = 1.0 if kind == "normal" else targets.eta
            w2 = targets.eta if kind == "distorted" else 1.0
            h = w1 * hybrid_loss(l1, t1, valid) + w2 * hybrid_loss(l2, t2, valid)
            total += h.item() / len(heads_1)
    assert torch.equal(warp_all.scale, Distortion.draw(cfg, len(plan), seed=seed, step=step).scale)
    return total / (2 * len(plan))


@pytest.mark.parametrize(
    "targets",
    [
        PairTargets(),
        PairTargets(eta=0.2, normal_target="swap", negative_target="ones"),
    ],
)
@pytest.mark.parametrize("back", ["pad", "resize"])
def test_vectorised_loss_equals_the_plain_per_pair_computation(targets, back):
    # BatchNorm's running statistics (a slice does not see the others), in float64 so that the
    # batch sizes' different float32 roundings do not hide a real difference
    pair = make_pair().eval().double()
    x = images().double()
    cfg = DistortionConfig(back=back)
    plan = plan_pairs(ABNORMAL, seed=4, step=2)
    assert {KINDS[k] for k in plan.kind.tolist()} == set(KINDS) and plan.swap.any()
    with torch.no_grad():
        total, count, stats = pair_loss(
            pair, x, plan, torch.arange(len(plan)), distortion=cfg, targets=targets, seed=4, step=2
        )
        expected = reference(pair, x, plan, targets, cfg, seed=4, step=2)
    assert count == 2 * len(plan)
    assert (total / count).item() == pytest.approx(expected, rel=1e-9)
    assert set(stats) == {f"loss_{k}" for k in KINDS}


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_shares_add_up_to_the_global_batch(world_size):
    """Rank r computes pairs r, r + W, ...; the sum over ranks of sum / count is the loss of one
    process over the whole global batch, and so is its gradient (DDP sums, then divides by W)."""
    x = images()
    plan = plan_pairs(ABNORMAL, seed=0, step=5)
    args = dict(distortion=DistortionConfig(), targets=PairTargets(), seed=0, step=5)

    def loss_and_grad(rows_per_rank):
        pair = make_pair().eval()
        loss = 0.0
        for rows in rows_per_rank:
            total, count, _ = pair_loss(pair, x, plan, rows, **args)
            (total / count).backward()
            loss += (total / count).item()
        return loss, torch.cat([p.grad.flatten() for p in pair.parameters() if p.grad is not None])

    whole, grad = loss_and_grad([torch.arange(len(plan))])
    split, grad_split = loss_and_grad([plan.of_rank(r, world_size) for r in range(world_size)])
    assert split == pytest.approx(whole, rel=1e-5)
    torch.testing.assert_close(grad_split, grad, rtol=1e-4, atol=1e-6)


def test_a_rank_without_pairs_keeps_every_parameter_in_the_graph():
    pair = make_pair()
    plan = plan_pairs(ABNORMAL, seed=0, step=0)
    total, count, stats = pair_loss(
        pair, images(), plan, torch.arange(0), distortion=DistortionConfig(),
        targets=PairTargets(), seed=0, step=0,
    )  # fmt: skip
    total.backward()
    assert total.item() == 0 and count == 2 * len(plan) and stats == {}
    assert all(p.grad is not None and not p.grad.any() for p in pair.parameters())


def test_training_steps_reach_both_networks_and_lower_the_loss():
    pair = make_pair().train()
    x = images()
    plan = plan_pairs(ABNORMAL, seed=0, step=0)
    rows = torch.arange(len(plan))
    args = dict(distortion=DistortionConfig(), targets=PairTargets(), seed=0, step=0)
    optimizer = torch.optim.Adam(pair.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        total, count, _ = pair_loss(pair, x, plan, rows, **args)
        loss = total / count
        optimizer.zero_grad()
        loss.backward()
        for net in (pair.a, pair.b):
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    probabilities = pair.eval().predict(x)
    assert probabilities.shape == (len(x), 1, SIZE, SIZE)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def _bright_discs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Smooth noise; every other image (abnormal) holds one bright disc of radius 2-4 px."""
    size = 24
    noise = torch.rand(n, 1, size // 4, size // 4, generator=generator)
    x = 0.3 + 0.2 * torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear")
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    abnormal, masks = torch.arange(n) % 2 == 0, torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in torch.nonzero(abnormal).flatten().tolist():
        r = 2 + 2 * torch.rand(1, generator=generator).item()
        cy, cx = (r + (size - 2 * r) * torch.rand(2, generator=generator)).tolist()
        masks[i, 0] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return x + 0.4 * masks, abnormal, masks


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_pair_learns_where_obvious_lesions_are():
    """A positive control (bench/contrastive_control.py, smaller): with lesions nobody could miss
    the pair's probability ranks lesion pixels above the rest of abnormal images, from the
    image-level labels alone, and stays low on normal images. At initialisation it does not,
    so the check measures what training did."""
    from hpc_btunet.train.metrics import ScoreSeparation

    torch.manual_seed(0)
    pair = ContrastivePair(*(build_model("unet_plus_plus", base_width=4, depth=3) for _ in "ab"))
    optimizer = torch.optim.Adam(pair.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    test = _bright_discs(64, torch.Generator().manual_seed(1))

    def auroc() -> float:
        x, abnormal, masks = test
        separation = ScoreSeparation()
        separation.update(pair.eval().predict(x)[abnormal], masks[abnormal])
        pair.train()
        return separation.compute()["auroc"]

    before = auroc()
    for step in range(150):
        x, abnormal, _ = _bright_discs(16, g)
        plan = plan_pairs(abnormal, seed=0, step=step)
        total, count, _ = pair_loss(
            pair, x, plan, torch.arange(len(plan)), distortion=DistortionConfig(),
            targets=PairTargets(), seed=0, step=step,
        )  # fmt: skip
        optimizer.zero_grad()
        (total / count).backward()
        optimizer.step()
    after = auroc()
    assert after > 0.7 and after > before + 0.2, (before, after)  # here 0.41 -> 0.90
    x, abnormal, _ = test
    p = pair.eval().predict(x)
    assert p[~abnormal].mean() < 0.5 * p[abnormal].mean()
