import pytest
import torch

from hpc_btunet.train.losses import BceDiceLoss, dice_loss
from hpc_btunet.train.metrics import SegmentationMetrics, confusion, scores


def masks(*rows):
    return torch.tensor(rows, dtype=torch.uint8).view(len(rows), 1, 1, -1)


def test_counts_and_formulas():
    pred = masks([1, 1, 0, 0])
    true = masks([1, 0, 1, 0])
    c = confusion(pred, true)
    assert c.tolist() == [[1, 1, 1]]
    s = scores(c)
    assert (
        s["precision"].item() == 0.5
        and s["dice"].item() == 0.5
        and s["iou"].item() == pytest.approx(1 / 3)
    )


def test_empty_cases():
    c = confusion(masks([0, 0], [0, 0], [1, 0]), masks([0, 0], [1, 1], [0, 0]))
    s = scores(c)
    assert s["precision"].tolist() == [
        1.0,
        0.0,
        0.0,
    ]  # both empty / nothing predicted / false positive only
    assert s["dice"].tolist() == [1.0, 0.0, 0.0] and s["iou"].tolist() == [1.0, 0.0, 0.0]


def test_mean_versus_pooled():
    m = SegmentationMetrics()
    m.update(
        torch.tensor([[[[0.9, 0.9, 0.1, 0.1]]], [[[0.9, 0.1, 0.1, 0.1]]]]),
        masks([1, 1, 0, 0], [0, 0, 0, 1]),
    )
    r = m.compute()
    assert r["images"] == 2
    assert r["mean"]["dice"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert r["pooled"]["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_loss_terms():
    logits = torch.tensor([[[[5.0, -5.0]]]])
    target = torch.tensor([[[[1, 0]]]], dtype=torch.uint8)
    assert BceDiceLoss()(logits, target).item() < 0.02
    assert BceDiceLoss()(-logits, target).item() > 2
    # the BCE term is never identically zero on a one-channel output
    assert BceDiceLoss(bce_weight=1.0)(
        torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    ).item() == pytest.approx(0.6931, abs=1e-4)
    assert dice_loss(torch.zeros(4), torch.zeros(4)).item() == 0.0


def _exact_auroc(scores_, target) -> float:
    """Every (lesion, other) pixel pair compared: wins + ties / 2 over the pairs."""
    s, t = scores_.flatten().double(), target.flatten().bool()
    pos, neg = s[t].view(-1, 1), s[~t].view(1, -1)
    return float(((pos > neg).double() + (pos == neg).double() / 2).mean())


def test_score_separation_against_every_pixel_pair():
    from hpc_btunet.train.metrics import ScoreSeparation

    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 8, 8, generator=g) < 0.3
    # scores on the histogram's grid (multiples of 1/1000), higher on lesions on average
    raw = torch.rand(3, 1, 8, 8, generator=g) * 0.7 + target * 0.3
    grid = torch.round(raw * 1000) / 1000
    sep = ScoreSeparation()
    for i in range(3):  # streamed image by image
        sep.update(grid[i : i + 1], target[i : i + 1])
    got = sep.compute()
    assert got["auroc"] == pytest.approx(_exact_auroc(grid, target), abs=1e-12)
    assert got["lesion_mean"] == pytest.approx(float(grid[target].double().mean()))
    assert got["other_mean"] == pytest.approx(float(grid[~target].double().mean()))
    # off the grid: within half the mass that falls in a shared bin
    sep = ScoreSeparation()
    sep.update(raw, target)
    assert sep.compute()["auroc"] == pytest.approx(_exact_auroc(raw, target), abs=2e-3)


@pytest.mark.parametrize("lesion, other, want", [(0.9, 0.1, 1.0), (0.1, 0.9, 0.0), (0.4, 0.4, 0.5)])
def test_score_separation_limits(lesion, other, want):
    from hpc_btunet.train.metrics import ScoreSeparation

    target = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    scores_ = torch.where(target, torch.tensor(lesion), torch.tensor(other))
    sep = ScoreSeparation()
    sep.update(scores_, target)
    assert sep.compute()["auroc"] == want


def test_score_separation_without_a_class_has_no_auroc():
    from hpc_btunet.train.metrics import ScoreSeparation

    sep = ScoreSeparation()
    sep.update(torch.full((1, 4), 0.25), torch.zeros(1, 4, dtype=torch.bool))
    assert sep.compute() == {"lesion_mean": None, "other_mean": 0.25, "auroc": None}
