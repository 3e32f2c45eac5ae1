"""Barlow Twins loss (value, gradients, forms), projector, and DDP exactness on W ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from multiproc import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpc_btunet.distributed import all_gather_cat
from hpc_btunet.errors import UserError
from hpc_btunet.global_batchnorm import GlobalBatchNorm, convert_global_batchnorm
from hpc_btunet.ssl import (
    BarlowTwinsLoss,
    Projector,
    TwoViews,
    cross_correlation_stats,
    default_projector_width,
)

SHAPES = [(8, 32), (5, 64), (32, 8), (100, 20), (16, 16)]  # N < D, N > D and N == D


def textbook_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, eps: float = 1e-5):
    """Eq. 1-2 written out: standardise each column, C_ij = sum_n a_ni b_nj / N, the two sums."""
    n, d = z_a.shape

    def standardise(z):
        centred = z - z.sum(0) / n
        return centred / torch.sqrt((centred**2).sum(0) / n + eps)

    a, b = standardise(z_a), standardise(z_b)
    c = torch.einsum("ni,nj->ij", a, b) / n
    invariance = sum((1 - c[i, i]) ** 2 for i in range(d))
    off_diagonal = ~torch.eye(d, dtype=torch.bool)
    redundancy = (c[off_diagonal] ** 2).sum()
    return invariance + lambd * redundancy


def _embeddings(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=g) * 2 + 1
    # correlated with z_a so that C has a visible diagonal, plus noise
    z_b = 0.7 * z_a + torch.randn(n, d, generator=g)
    return z_a, z_b


def _value_and_grads(fn, z_a, z_b):
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = fn(z_a, z_b)
    loss.backward()
    return loss.detach(), z_a.grad, z_b.grad


def _close(got, want, rtol=1e-4):
    # absolute tolerance relative to the largest entry: gradients span orders of magnitude
    atol = 1e-6 * float(want.abs().max()) + 1e-12
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("form", ["cross", "gram", "auto"])
def test_matches_the_textbook_formula_value_and_gradients(n, d, form):
    z_a, z_b = _embeddings(n, d)
    want = _value_and_grads(
        lambda a, b: textbook_loss(a, b, lambd=5e-3), z_a.double(), z_b.double()
    )
    got = _value_and_grads(BarlowTwinsLoss(form=form), z_a, z_b)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("n,d", SHAPES)
def test_cross_and_gram_forms_agree(n, d):
    z_a, z_b = _embeddings(n, d, seed=1)
    cross = _value_and_grads(BarlowTwinsLoss(lambd=0.2, form="cross"), z_a, z_b)
    gram = _value_and_grads(BarlowTwinsLoss(lambd=0.2, form="gram"), z_a, z_b)
    for g, c in zip(gram, cross, strict=True):
        _close(g, c)


def _decorrelated(n: int, d: int) -> torch.Tensor:
    """Columns with mean 0, variance 1 and zero correlation with each other."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    return (q * n**0.5).float()


def test_identical_decorrelated_embeddings_give_a_loss_near_zero():
    z = _decorrelated(64, 16)
    assert BarlowTwinsLoss()(z, z).item() < 1e-6
    stats = cross_correlation_stats(z, z)
    assert stats["on_diag_mean"] == pytest.approx(1, abs=1e-4)
    assert stats["invariance"] < 1e-6 and stats["off_diag_mean_sq"] < 1e-10
    # Bessel's correction would cap the diagonal at (N-1)/N, a loss of D/N^2 = 4e-3 here
    assert 1 - stats["on_diag_mean"] < 1 / 64 / 10


def test_stats_are_the_two_terms_of_the_loss():
    z_a, z_b = _embeddings(12, 40)
    s = cross_correlation_stats(z_a, z_b)
    loss = BarlowTwinsLoss(lambd=0.1)(z_a, z_b).item()
    assert loss == pytest.approx(s["invariance"] + 0.1 * s["redundancy"], rel=1e-5)
    assert s["off_diag_mean_sq"] == pytest.approx(s["redundancy"] / (40 * 39))
    assert s["off_diag_rms"] == pytest.approx(s["off_diag_mean_sq"] ** 0.5)
    a = (z_a - z_a.mean(0)) / z_a.std(0, correction=0)
    b = (z_b - z_b.mean(0)) / z_b.std(0, correction=0)
    assert s["on_diag_mean"] == pytest.approx(float((a * b).mean()), abs=1e-4)


def test_lambda_zero_leaves_only_the_invariance_term():
    z_a, z_b = _embeddings(10, 6)
    s = cross_correlation_stats(z_a, z_b)
    assert BarlowTwinsLoss(lambd=0.0)(z_a, z_b).item() == pytest.approx(s["invariance"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    z_a, z_b = (z.to(dtype) for z in _embeddings(16, 64))
    loss = BarlowTwinsLoss()(z_a, z_b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(BarlowTwinsLoss()(z_a.float(), z_b.float()).item())


def test_autocast_does_not_lower_the_loss_precision():
    z_a, z_b = _embeddings(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BarlowTwinsLoss(form="cross")(z_a, z_b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(BarlowTwinsLoss(form="cross")(z_a, z_b).item())


def test_bad_arguments_fail_clearly():
    with pytest.raises(UserError, match="choose one of"):
        BarlowTwinsLoss(form="fast")
    with pytest.raises(UserError, match="lambd"):
        BarlowTwinsLoss(lambd=-1)
    with pytest.raises(ValueError, match="same shape"):
        BarlowTwinsLoss()(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="at least 2 samples"):
        BarlowTwinsLoss()(torch.randn(1, 8), torch.randn(1, 8))


# ---------------------------------------------------------------- projector


def test_projector_pools_and_maps_to_the_embedding():
    p = Projector(8, hidden_dim=16, out_dim=24)
    assert p(torch.randn(4, 8, 5, 7)).shape == (4, 24)
    assert p(torch.randn(4, 8)).shape == (4, 24)
    linears = [m for m in p.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 24)]
    kinds = [type(m).__name__ for m in p.mlp]
    assert kinds[:3] == ["Linear", "BatchNorm1d", "ReLU"]
    # global average pooling: a constant map equals its pooled vector
    x = torch.randn(4, 8)
    p.eval()
    torch.testing.assert_close(p(x[:, :, None, None].expand(4, 8, 3, 3)), p(x))


def test_projector_options():
    assert Projector(8).out_dim == 128
    assert default_projector_width(256) == 128
    paper = Projector(8, hidden_dim=4, num_layers=2, block_order="relu-bn")
    assert [type(m).__name__ for m in paper.mlp] == ["Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert len(Projector(8, 4, num_layers=1).mlp) == 1
    with pytest.raises(UserError, match="choose one of"):
        Projector(8, block_order="bn-gelu")
    with pytest.raises(UserError, match="num_layers"):
        Projector(8, num_layers=0)
    with pytest.raises(ValueError, match=r"\(N, 8, \.\.\.\)"):
        Projector(8)(torch.randn(2, 3, 4, 4))


# ---------------------------------------------------------------- DDP exactness

GLOBAL_BATCH = 12  # divisible by 2 and 3
FORMS = ("cross", "gram")


class _StandInEncoder(nn.Module):
    """The U-Net encoder contract: a list of feature maps, bottleneck last."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.down = nn.Sequential(
            nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        )
        self.out_channels = (4, 8)

    def forward(self, x):
        f1 = self.stem(x)
        return [f1, torch.relu(self.down(f1))]


class _Siamese(nn.Module):
    """Both views through the same encoder and projector, separately (as official BT does)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _StandInEncoder()
        self.projector = Projector(self.encoder.out_channels[-1], hidden_dim=16, out_dim=24)

    def forward(self, view_a, view_b):
        return (
            self.projector(self.encoder(view_a)[-1]),
            self.projector(self.encoder(view_b)[-1]),
        )


def _model() -> _Siamese:
    torch.manual_seed(0)
    return _Siamese()


def _views() -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 1, 16, 16), dtype=torch.uint8, generator=g)
    view_a, view_b = TwoViews()(images, seed=0, step=0)
    return view_a.numpy(), view_b.numpy()


def _train_step(model: nn.Module, view_a, view_b, form: str) -> tuple[float, nn.Module]:
    z_a, z_b = model(torch.as_tensor(view_a), torch.as_tensor(view_b))
    loss = BarlowTwinsLoss(form=form)(z_a, z_b)
    loss.backward()
    return loss.item(), model.module if isinstance(model, DistributedDataParallel) else model


def _state(loss: float, model: nn.Module) -> dict:
    return {
        "loss": loss,
        "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters()},
        "buffers": {n: b.numpy().copy() for n, b in model.named_buffers()},
    }


def _ddp_rank(rank: int, world: int, view_a: np.ndarray, view_b: np.ndarray) -> dict:
    torch.set_num_threads(1)  # W processes share a few cores
    out = {}
    b = len(view_a) // world
    rows = slice(rank * b, (rank + 1) * b)
    for form in FORMS:
        model = convert_global_batchnorm(_model())
        assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 4
        ddp = DistributedDataParallel(model)
        out[form] = _state(*_train_step(ddp, view_a[rows], view_b[rows], form))

    # unequal per-rank batches are refused on every rank (no hang, no silent mismatch)
    try:
        BarlowTwinsLoss()(torch.randn(3 + rank, 8), torch.randn(3 + rank, 8))
        out["unequal"] = None
    except ValueError as e:
        out["unequal"] = str(e)

    # all_gather_cat: rank order, and the gradient summed over the ranks' losses
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = all_gather_cat(x)
    weights = torch.arange(2 * world * 3, dtype=torch.float32).view(2 * world, 3) * (rank + 1)
    (gathered * weights).sum().backward()
    out["gathered"], out["gather_grad"] = gathered.detach().numpy(), x.grad.numpy()
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ddp_run(request):
    world = request.param
    view_a, view_b = _views()
    return world, run_ranks(_ddp_rank, world, view_a, view_b, timeout=90)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", FORMS)
def test_ddp_loss_and_every_gradient_equal_one_process_on_the_global_batch(ddp_run, form):
    world, results = ddp_run
    view_a, view_b = _views()
    want = _state(*_train_step(_model(), view_a, view_b, form))
    for rank, got in enumerate(r[form] for r in results):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"rank {rank}"
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            g = torch.as_tensor(grad)
            # float32 noise of the conv backward is ~3e-6 of the largest entry; a wrong rank
            # scaling or per-rank statistics would be off by O(1)
            atol = 1e-5 * float(g.abs().max())
            torch.testing.assert_close(
                torch.as_tensor(got["grads"][name]), g, rtol=1e-4, atol=atol, msg=name
            )
        for name, buf in want["buffers"].items():
            torch.testing.assert_close(
                torch.as_tensor(got["buffers"][name]), torch.as_tensor(buf), rtol=1e-4, atol=1e-6
            )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unequal_per_rank_batches_are_refused_on_every_rank(ddp_run):
    world, results = ddp_run
    for r in results:
        assert "same shape on every rank" in r["unequal"]
        assert (
            "rank 0: (3, 16)" in r["unequal"]
            and f"rank {world - 1}: ({3 + world - 1}, 16)" in r["unequal"]
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_all_gather_cat_order_and_gradient(ddp_run):
    world, results = ddp_run
    expected = np.repeat(np.arange(world, dtype=np.float32), 2)[:, None].repeat(3, 1)
    weights = np.arange(2 * world * 3, dtype=np.float32).reshape(2 * world, 3)
    total = weights * sum(r + 1 for r in range(world))  # the sum of every rank's loss weights
    for rank, r in enumerate(results):
        np.testing.assert_array_equal(r["gathered"], expected)
        np.testing.assert_allclose(r["gather_grad"], total[2 * rank : 2 * rank + 2])
