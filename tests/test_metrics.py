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
