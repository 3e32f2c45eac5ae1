"""The Barlow Twins loss (Zbontar et al. 2021; Eq. 1-2 of BT-Unet), exact over the global batch.

Definition. Each of the ``D`` embedding dimensions of ``z_a`` and ``z_b`` (``N x D``) is
standardised over the batch, ``a = (z_a - mean) / sqrt(var + eps)`` with the *biased* variance
(what ``BatchNorm1d(affine=False)`` does in training; a Bessel-corrected std would cap the
diagonal of ``C`` at ``(N-1)/N`` and bias small batches), then ``C = a^T b / N`` and::

    L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

Lambda. BT-Unet's text sets lambda = 0.2 "following Zbontar et al.", but Zbontar et al. use
5e-3 (0.0051 in their code) and so does BT-Unet's own code; the default is 5e-3.

Magnitude. ``L`` is a sum over ``D`` diagonal and ``D^2 - D`` off-diagonal terms, not a mean.
For unrelated views ``C_ii`` is near 0 and ``C_ij`` of order ``1/sqrt(N)``, so ``L`` starts near
``D + lambd * D^2 / N``: about 130 for ``D = 128``, ``N = 64``, and about 8400 for the official
``D = 8192``, ``N = 2048``. Log ``L / D`` or the :func:`cross_correlation_stats` to compare runs of
different widths.

Global batch. When a process group is initialised, the embeddings of all ranks are all-gathered
(autograd-aware, :func:`hpc_btunet.distributed.all_gather_cat`) before anything else, so the
means, variances and ``C`` are those of the global batch and every rank computes the same value.
The gather's backward sums the gradients over ranks (``W * dL/dz``) and DDP divides by ``W``:
the parameter gradients equal those of one process on the concatenated batch. Every rank must
hold the same number of samples (a clear ``ValueError`` on every rank otherwise).

Two forms, equal to float precision (see REFERENCE section 7):

- ``"cross"`` builds the ``D x D`` matrix ``C``: ``O(N D^2)`` time, ``D^2`` memory. Under DDP
  every rank builds the full ``C`` from the gathered embeddings.
- ``"gram"`` never builds ``C``: ``sum_ij C_ij^2 = sum((a a^T) * (b b^T)) / N^2`` and
  ``C_ii = sum_n a_ni b_ni / N``: ``O(N^2 D)`` time, ``N^2`` memory. Under DDP each rank computes
  only its own rows of the Gram products (``B x N``) and one scalar all-reduce sums them, so the
  work is split across ranks instead of repeated.
- ``"auto"`` picks ``"gram"`` when the global ``N < D``, else ``"cross"``.

Precision. The loss is computed in float32 (float64 inputs stay float64) with autocast disabled:
the N-term sums of ``a^T b`` and the ``D^2``-term sums overflow fp16 (max 65504), and bf16's
8-bit mantissa cannot resolve ``1 - C_ii`` near the optimum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hpc_btunet.distributed import all_gather_cat, all_reduce_sum, rank, world_size
from hpc_btunet.errors import UserError

__all__ = ["FORMS", "BarlowTwinsLoss", "cross_correlation_stats", "standardise"]

FORMS = ("auto", "cross", "gram")


def standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-column ``(z - mean) / sqrt(biased var + eps)`` over the batch (dim 0)."""
    centred = z - z.mean(0)
    # two passes over the centred values: stable, and faster on CPU than Tensor.var over dim 0
    return centred * torch.rsqrt(centred.square().mean(0) + eps)


def _prepare(z_a: Tensor, z_b: Tensor, gather: bool) -> tuple[Tensor, Tensor, int]:
    """Check shapes, cast to float32 (at least) and gather over ranks; return (z_a, z_b, rank)."""
    if z_a.dim() != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"expected two embeddings of the same shape (N, D), got {tuple(z_a.shape)} and "
            f"{tuple(z_b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)
    if not gather or world_size() == 1:
        return z_a, z_b, 0
    d = z_a.shape[1]
    both = all_gather_cat(torch.cat([z_a, z_b], dim=1))  # one collective for the two views
    return both[:, :d], both[:, d:], rank()


def _resolve(form: str, n: int, d: int) -> str:
    if form == "auto":
        return "gram" if n < d else "cross"
    return form


def _terms(a: Tensor, b: Tensor, form: str, local_rows: slice | None) -> tuple[Tensor, Tensor]:
    """``(C_ii for every i, sum_ij C_ij^2)`` from standardised ``a``, ``b`` (``N x D``).

    ``local_rows``: in the Gram form, compute only these rows of the Gram products and all-reduce
    the partial sums (every rank passes its own block of the gathered batch); ``None`` = all rows.
    """
    n = a.shape[0]
    if form == "cross":
        c = a.T @ b / n
        return c.diagonal(), c.square().sum()
    on_diag = (a * b).sum(0) / n
    if local_rows is None:
        sq_sum = ((a @ a.T) * (b @ b.T)).sum() / n**2
    else:
        partial = ((a[local_rows] @ a.T) * (b[local_rows] @ b.T)).sum() / n**2
        sq_sum = all_reduce_sum(partial)
    return on_diag, sq_sum


def _diag_and_redundancy(
    z_a: Tensor, z_b: Tensor, eps: float, form: str, gather: bool
) -> tuple[Tensor, Tensor]:
    """``(C_ii for every i, sum_{i != j} C_ij^2)`` of the (global) batch."""
    local_n = z_a.shape[0]
    z_a, z_b, this_rank = _prepare(z_a, z_b, gather)
    n, d = z_a.shape
    if n < 2:
        raise ValueError(f"the Barlow Twins loss needs at least 2 samples in the batch, got {n}")
    form = _resolve(form, n, d)
    a, b = standardise(z_a, eps), standardise(z_b, eps)
    local_rows = None
    if n != local_n:  # gathered from several ranks: split the Gram work by rows
        local_rows = slice(this_rank * local_n, (this_rank + 1) * local_n)
    on_diag, sq_sum = _terms(a, b, form, local_rows)
    return on_diag, sq_sum - on_diag.square().sum()


class BarlowTwinsLoss(nn.Module):
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` over the global batch.

    Args:
        lambd: weight of the redundancy-reduction (off-diagonal) term; 5e-3 as in Zbontar et al.
            and BT-Unet's code (the BT-Unet paper's text says 0.2, see the module docstring).
        eps: added to the per-dimension batch variance before standardising.
        form: ``"auto"``, ``"cross"`` or ``"gram"`` (same value; different cost).

    ``forward(z_a, z_b)`` takes the two views' embeddings, each ``N x D`` (the local batch under
    DDP) and returns a float32 scalar, identical on every rank.
    """

    def __init__(self, lambd: float = 5e-3, eps: float = 1e-5, form: str = "auto") -> None:
        super().__init__()
        if not lambd >= 0:
            raise UserError(f"Barlow Twins lambd must be >= 0, got {lambd!r}")
        if not eps > 0:
            raise UserError(f"Barlow Twins eps must be > 0, got {eps!r}")
        if form not in FORMS:
            raise UserError(f"Barlow Twins form {form!r} is unknown: choose one of {FORMS}")
        self.lambd, self.eps, self.form = float(lambd), float(eps), form

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, eps={self.eps}, form={self.form!r}"

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            on_diag, redundancy = _diag_and_redundancy(z_a, z_b, self.eps, self.form, gather=True)
            return (1 - on_diag).square().sum() + self.lambd * redundancy


@torch.no_grad()
def cross_correlation_stats(
    z_a: Tensor, z_b: Tensor, *, eps: float = 1e-5, gather: bool = False
) -> dict[str, float]:
    """Summary of the cross-correlation matrix ``C`` of two embeddings, for logging.

    Returns ``on_diag_mean`` (mean ``C_ii``, 1 at the optimum), ``off_diag_mean_sq`` (mean
    ``C_ij^2`` over ``i != j``: the redundancy term divided by ``D(D-1)``, 0 at the optimum),
    ``off_diag_rms`` (its square root), ``invariance`` and ``redundancy`` (the two sums of the loss,
    unweighted). Computed without building ``C`` when ``N < D``.

    ``gather=False`` (default) uses the local batch and no collective, so it is safe to call on
    one rank only; ``gather=True`` uses the global batch and must be called by every rank.
    """
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        on_diag, redundancy = _diag_and_redundancy(z_a, z_b, eps, "auto", gather=gather)
    d = on_diag.numel()
    off_mean_sq = float(redundancy) / max(d * (d - 1), 1)
    return {
        "on_diag_mean": float(on_diag.mean()),
        "off_diag_mean_sq": off_mean_sq,
        "off_diag_rms": max(off_mean_sq, 0.0) ** 0.5,
        "invariance": float((1 - on_diag).square().sum()),
        "redundancy": float(redundancy),
    }
