"""GlobalBatchNorm on W ranks equals one nn.BatchNorm on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from torch import nn

from hpc_btunet.distributed import all_reduce_sum, is_distributed, rank, world_size
from hpc_btunet.global_batchnorm import GlobalBatchNorm, convert_global_batchnorm

TOL = {"rtol": 1e-4, "atol": 1e-5}

# name -> (global input shape, per-rank batch sizes, momentum); 2 ranks
CASES = {
    "2d": ((10, 3, 4, 4), (5, 5), 0.1),
    "2d-unequal-batches": ((10, 3, 4, 4), (3, 7), None),
    "1d": ((12, 6), (6, 6), 0.3),
    "1d-with-length": ((8, 4, 5), (4, 4), 0.1),
}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    shape, _, _ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    c = shape[1]
    return {
        # a large offset: the variance must not come from E[x^2] - E[x]^2
        "x": torch.randn(shape, generator=g, dtype=torch.float32) * 3 + 50,
        "x2": torch.randn(shape, generator=g) * 2 - 1,
        "upstream": torch.randn(shape, generator=g),
        "weight": torch.rand(c, generator=g) + 0.5,
        "bias": torch.randn(c, generator=g),
    }


def _bn(cls, name: str, inputs: dict) -> nn.Module:
    _, _, momentum = CASES[name]
    bn = cls(inputs["x"].shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(inputs["weight"])
        bn.bias.copy_(inputs["bias"])
    return bn


def _run(bn: nn.Module, x: torch.Tensor, x2: torch.Tensor, upstream: torch.Tensor) -> dict:
    """Train-mode forward + backward, a second forward (running stats), then eval forward."""
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * upstream).sum().backward()
    with torch.no_grad():
        bn(x2)
    bn.eval()
    with torch.no_grad():
        y_eval = bn(x)
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "weight_grad": bn.weight.grad,
        "bias_grad": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
        "num_batches_tracked": int(bn.num_batches_tracked),
        "y_eval": y_eval,
    }


def _reference(name: str) -> dict:
    inputs = _inputs(name)
    bn = _bn(nn.BatchNorm2d if len(inputs["x"].shape) == 4 else nn.BatchNorm1d, name, inputs)
    return _run(bn, inputs["x"], inputs["x2"], inputs["upstream"])


def _rank_fn(rank_: int, world: int) -> dict:
    assert is_distributed() and rank() == rank_ and world_size() == world
    torch.set_num_threads(1)  # W processes share a few cores
    out = {}
    for name, (_, sizes, _) in CASES.items():
        inputs = _inputs(name)
        start = sum(sizes[:rank_])
        local = {k: v[start : start + sizes[rank_]] for k, v in inputs.items() if k != "weight"}
        bn = _bn(GlobalBatchNorm, name, inputs)
        got = _run(bn, local["x"], local["x2"], local["upstream"])
        # tensors cross the process boundary as numpy arrays (torch would share memory with a
        # process that is about to exit)
        out[name] = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in got.items()}
    # the collective itself: value and gradient (backward sums over ranks)
    x = torch.tensor([float(rank_ + 1)], requires_grad=True)
    y = all_reduce_sum(3 * x)
    y.backward()
    out["all_reduce"] = (y.item(), x.grad.item())
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_rank_fn, 2, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_batchnorm_on_the_global_batch(two_ranks, name):
    ref = _reference(name)
    sizes = CASES[name][1]
    bounds = [(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(2)]
    for r, (lo, hi) in enumerate(bounds):
        got = {k: torch.as_tensor(v) for k, v in two_ranks[r][name].items()}
        torch.testing.assert_close(got["y"], ref["y"][lo:hi], **TOL)
        torch.testing.assert_close(got["x_grad"], ref["x_grad"][lo:hi], **TOL)
        torch.testing.assert_close(got["y_eval"], ref["y_eval"][lo:hi], **TOL)
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(got[key], ref[key], **TOL)
        assert int(got["num_batches_tracked"]) == ref["num_batches_tracked"] == 2
    # no DDP here: the objective is the sum of the per-rank losses, so parameter gradients add up
    for key in ("weight_grad", "bias_grad"):
        total = sum(torch.as_tensor(two_ranks[r][name][key]) for r in range(2))
        torch.testing.assert_close(total, ref[key], **TOL)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_all_reduce_sum_value_and_gradient(two_ranks):
    # y = 3 * (1 + 2) on both ranks; dy/dx summed over the 2 ranks' (identical) losses = 2 * 3
    assert [r["all_reduce"] for r in two_ranks] == [(9.0, 6.0), (9.0, 6.0)]


@pytest.mark.parametrize("name", list(CASES))
def test_not_distributed_is_exactly_batchnorm(name):
    inputs = _inputs(name)
    ref = _reference(name)
    got = _run(_bn(GlobalBatchNorm, name, inputs), inputs["x"], inputs["x2"], inputs["upstream"])
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8, momentum=None)),
        nn.BatchNorm1d(8, affine=False),
    )
    net(torch.randn(6, 1, 6, 6))  # non-trivial running statistics
    return net


def _stats_free_net() -> nn.Sequential:
    """Conv-BN-ReLU-conv-BN whose batch norms keep no running statistics."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
    )


def _stats_free_input() -> torch.Tensor:
    """The global batch: 3 images for rank 0, then 2 for rank 1."""
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2


def _eval_on_rank_0_only(rank_: int, world: int) -> dict:
    torch.set_num_threads(1)
    net = convert_global_batchnorm(_stats_free_net())
    local = _stats_free_input()[:3] if rank_ == 0 else _stats_free_input()[3:]
    out = {"train": net(local).detach().numpy()}  # collectives on both ranks
    net.eval()
    if rank_ == 0:  # rank 1 calls nothing until the final barrier
        with torch.no_grad():
            out["eval"] = net(local).numpy()
    return out


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_eval_without_running_stats_on_one_rank_uses_the_local_batch():
    got = run_ranks(_eval_on_rank_0_only, 2, timeout=60)
    plain = _stats_free_net()
    x = _stats_free_input()
    with torch.no_grad():
        train = plain(x)  # training mode: the global batch
        plain.eval()
        local_eval = plain(x[:3])  # eval mode without running stats: the local batch
    torch.testing.assert_close(torch.as_tensor(got[0]["train"]), train[:3], **TOL)
    torch.testing.assert_close(torch.as_tensor(got[1]["train"]), train[3:], **TOL)
    torch.testing.assert_close(torch.as_tensor(got[0]["eval"]), local_eval, **TOL)
    assert "eval" not in got[1]


def test_convert_keeps_state_dict_and_parameters():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    net.eval()
    converted = convert_global_batchnorm(net)
    assert converted is net
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(GlobalBatchNorm) == 3
    assert not any(t in kinds for t in (nn.BatchNorm1d, nn.BatchNorm2d))
    after = converted.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert not any(m.training for m in converted.modules())
    assert converted[2][2].momentum is None and not converted[3].affine

    # and the state dict loads into the plain model again
    plain = _net()
    plain.load_state_dict(converted.state_dict())


def test_convert_a_bare_batchnorm_returns_the_new_layer():
    bn = nn.BatchNorm2d(3, eps=1e-3)
    out = convert_global_batchnorm(bn)
    assert isinstance(out, GlobalBatchNorm) and out.eps == 1e-3 and out.weight is bn.weight


def test_rejects_inputs_without_a_channel_dim():
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        GlobalBatchNorm(3)(torch.randn(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_half_precision_parameters_compute_in_fp32(training, scope):
    """DeepSpeed's bf16 casts parameters, not buffers: the layer then normalises in fp32 with
    fp32 copies of its parameters, as a BatchNorm on the same (bf16-valued) data in fp32 does."""
    from hpc_btunet.global_batchnorm import apply_recorded_statistics, convert_local_batchnorm

    convert = convert_global_batchnorm if scope == "global" else convert_local_batchnorm
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    layer = convert(nn.BatchNorm2d(3))
    layer.load_state_dict(reference.state_dict())
    layer.weight.data = layer.weight.data.bfloat16()  # what DeepSpeed's cast does
    layer.bias.data = layer.bias.data.bfloat16()
    with torch.no_grad():  # the reference sees the same rounded values, in fp32
        reference.weight.copy_(layer.weight.float())
        reference.bias.copy_(layer.bias.float())
    reference.train(training)
    layer.train(training)
    x = (torch.randn(4, 3, 5, 5) * 3 + 2).bfloat16()
    out = layer(x)
    apply_recorded_statistics(layer)  # the engine's call at the step (local scope)
    assert out.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32
    want = reference(x.float())
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked)
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16


# --- local scope: LocalBatchNorm, its running statistics, frozen statistics --------------------

MICRO = (
    4  # images per micro-batch; slice j of the global batch is rows [j * MICRO, (j + 1) * MICRO)
)


def _micro_batches(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(MICRO, 3, 5, 5, generator=g) * (j + 1) + j for j in range(count)]


def _sequential_batchnorm(batches: list[torch.Tensor]) -> dict:
    """One process, one nn.BatchNorm2d, the slices in global order, twice (two 'views')."""
    bn = nn.BatchNorm2d(3)
    outs = []
    for x in batches:
        outs += [bn(x), bn(x * 2)]
    return {"outs": [o.detach() for o in outs], "state": bn.state_dict()}


def _local_rank_fn(rank_: int, world: int, micro_batches: int) -> dict:
    """Rank r's micro-batch k is slice k * W + r; each is embedded as two 'views'."""
    from hpc_btunet.global_batchnorm import LocalBatchNorm, apply_recorded_statistics

    batches = _micro_batches(world * micro_batches)
    bn = LocalBatchNorm(3)
    outs = {}
    for k in range(micro_batches):
        j = k * world + rank_
        outs[j] = [bn(batches[j]).detach().numpy(), bn(batches[j] * 2).detach().numpy()]
    apply_recorded_statistics(bn, micro_batches)
    # numpy: tensors would travel as shared memory that ends with the process
    return {"outs": outs, "state": {k: v.numpy() for k, v in bn.state_dict().items()}}


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("world,micro_batches", [(2, 1), (2, 2), (1, 3)])
def test_local_batchnorm_normalises_per_slice_and_applies_every_ranks_statistics(
    world, micro_batches
):
    """Each slice is normalised alone, and every rank ends with the running statistics of one
    nn.BatchNorm that saw all slices in global order (micro-batch by micro-batch, then rank)."""
    want = _sequential_batchnorm(_micro_batches(world * micro_batches))
    if world == 1:
        results = [_local_rank_fn(0, 1, micro_batches)]
    else:
        results = run_ranks(_local_rank_fn, world, micro_batches, timeout=60)
    for got in results:
        for j, (a, b) in got["outs"].items():
            torch.testing.assert_close(torch.as_tensor(a), want["outs"][2 * j], **TOL)
            torch.testing.assert_close(torch.as_tensor(b), want["outs"][2 * j + 1], **TOL)
        for name, value in want["state"].items():
            torch.testing.assert_close(torch.as_tensor(got["state"][name]), value, **TOL, msg=name)


def test_frozen_statistics_leave_running_statistics_and_records_untouched():
    from hpc_btunet.global_batchnorm import (
        LocalBatchNorm,
        apply_recorded_statistics,
        frozen_statistics,
    )

    net = nn.Sequential(nn.BatchNorm2d(3), LocalBatchNorm(3))
    x = _micro_batches(1)[0]
    net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_statistics(net):
        net(x * 3)
        assert not torch.equal(net[0].running_mean, before["0.running_mean"])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert len(net[1].records) == 1, "only the forward outside the block is recorded"
    apply_recorded_statistics(net)
    assert int(net[1].num_batches_tracked) == 1 and not net[1].records


def test_local_batchnorm_refuses_a_batch_of_one():
    from hpc_btunet.global_batchnorm import LocalBatchNorm

    with pytest.raises(ValueError, match="more than 1 value per channel"):
        LocalBatchNorm(3)(torch.randn(1, 3))


# --- groups: both views in one forward, statistics apart, one collective per layer -------------


def _grouped_inputs() -> dict[str, torch.Tensor]:
    """A global batch of 6 images per view (3 per rank) and the upstream gradients."""
    g = torch.Generator().manual_seed(5)
    return {
        "a": torch.randn(6, 3, 4, 4, generator=g) * 3 + 50,
        "b": torch.randn(6, 3, 4, 4, generator=g) * 0.5 - 2,  # other statistics than view a
        "up_a": torch.randn(6, 3, 4, 4, generator=g),
        "up_b": torch.randn(6, 3, 4, 4, generator=g),
    }


def _grouped_layer(cls) -> nn.Module:
    torch.manual_seed(0)
    bn = cls(3, momentum=0.2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _grouped_run(bn: nn.Module, a: torch.Tensor, b: torch.Tensor, up_a, up_b) -> dict:
    """Both views as one input of two blocks, in training mode; then the records applied."""
    from hpc_btunet.global_batchnorm import apply_recorded_statistics, batch_groups

    x = torch.cat([a, b]).requires_grad_()
    calls = []
    real = torch.distributed.all_gather

    def counted(parts, tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return real(parts, tensor, *args, **kwargs)

    torch.distributed.all_gather = counted
    try:
        with batch_groups(bn, 2):
            y = bn(x)
        (y * torch.cat([up_a, up_b])).sum().backward()
    finally:
        torch.distributed.all_gather = real
    apply_recorded_statistics(bn)
    out = {
        "y": y.detach(),
        "x_grad": x.grad,
        "weight_grad": bn.weight.grad,
        "bias_grad": bn.bias.grad,
        **{k: v.clone() for k, v in bn.state_dict().items()},
    }
    return {k: v.numpy() for k, v in out.items()} | {"collective_bytes": calls}


def _grouped_reference(inputs: dict, scope: str, world: int) -> dict:
    """Separate forwards of nn.BatchNorm2d: view a, then view b, over the global batch of each
    view (global scope), or for each rank's slice in rank order (local scope: the order in
    which apply_recorded_statistics applies the records)."""
    bn = _grouped_layer(nn.BatchNorm2d)
    rows = 6 // world
    slices = [slice(r * rows, (r + 1) * rows) for r in range(world)]
    if scope == "global":
        slices = [slice(0, 6)]
    ys, grads = {}, {}
    for s in slices:
        for view in ("a", "b"):
            x = inputs[view][s].clone().requires_grad_()
            y = bn(x)
            (y * inputs[f"up_{view}"][s]).sum().backward()
            ys[view, s.start] = y.detach()
            grads[view, s.start] = x.grad
    return {"bn": bn, "y": ys, "x_grad": grads, "rows": rows}


def _grouped_rank_fn(rank_: int, world: int, scope: str) -> dict:
    from hpc_btunet.global_batchnorm import LocalBatchNorm

    torch.set_num_threads(1)
    inputs = _grouped_inputs()
    rows = 6 // world
    local = {k: v[rank_ * rows : (rank_ + 1) * rows] for k, v in inputs.items()}
    bn = _grouped_layer(GlobalBatchNorm if scope == "global" else LocalBatchNorm)
    return _grouped_run(bn, local["a"], local["b"], local["up_a"], local["up_b"])


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_both_views_in_one_forward_equal_two_forwards(scope, world):
    """Rows of two views in one input, normalised apart: outputs, input gradients, running
    statistics (view a's update, then view b's) and parameter gradients (summed over ranks)
    equal two forwards of nn.BatchNorm; global scope makes one all-gather per direction."""
    inputs = _grouped_inputs()
    ref = _grouped_reference(inputs, scope, world)
    if world == 1:
        results = [_grouped_rank_fn(0, 1, scope)]
    else:
        results = run_ranks(_grouped_rank_fn, world, scope, timeout=60)
    rows = ref["rows"]
    start = 0 if scope == "global" else None
    for r, got in enumerate(results):
        lo, hi = r * rows, (r + 1) * rows
        for key in ("y", "x_grad"):
            value = torch.as_tensor(got[key])
            for i, view in enumerate("ab"):
                want = ref[key][view, lo if start is None else start]
                want = want if start is None else want[lo:hi]
                torch.testing.assert_close(value[i * rows : (i + 1) * rows], want, **TOL)
        for name, value in ref["bn"].state_dict().items():
            torch.testing.assert_close(torch.as_tensor(got[name]), value, **TOL, msg=name)
        if scope == "global" and world == 2:
            # forward: (count, mean, M2) x 3 channels x 2 views; backward: 2 sums x 3 x 2
            assert got["collective_bytes"] == [2 * 3 * 3 * 8, 2 * 2 * 3 * 8]
    for key in ("weight_grad", "bias_grad"):
        total = sum(torch.as_tensor(got[key]) for got in results)
        torch.testing.assert_close(total, getattr(ref["bn"], key.split("_")[0]).grad, **TOL)


def test_batch_groups_refuses_a_plain_batchnorm_and_uneven_blocks():
    from hpc_btunet.global_batchnorm import batch_groups, groups_supported

    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert not groups_supported(plain) and groups_supported(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="one of ours"), batch_groups(plain, 2):
        pass
    bn = GlobalBatchNorm(2)
    with pytest.raises(ValueError, match="5 rows does not split into 2"), batch_groups(bn, 2):
        bn(torch.randn(5, 2, 3, 3))
    assert bn.groups == 1, "the block restores the layers"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_groups_keep_the_memory_format_and_dtype(layout, dtype):
    """One process, two blocks: equal to nn.BatchNorm2d on each block, for channels-last and
    bf16 inputs (normalised in fp32, returned in the input's format and dtype)."""
    from hpc_btunet.global_batchnorm import batch_groups

    torch.manual_seed(1)
    x = (torch.randn(8, 5, 6, 7) * 3 + 4).to(dtype).contiguous(memory_format=layout)
    x.requires_grad_()
    up = torch.randn(8, 5, 6, 7)
    layer, reference = GlobalBatchNorm(5), nn.BatchNorm2d(5)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    reference.load_state_dict(layer.state_dict())
    with batch_groups(layer, 2):
        y = layer(x)
    (y.float() * up).sum().backward()
    xr = x.detach().float().requires_grad_()
    yr = torch.cat([reference(xr[:4]), reference(xr[4:])])
    (yr * up).sum().backward()
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    tol = TOL if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(y.float(), yr, **tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, **tol)
    torch.testing.assert_close(layer.running_var, reference.running_var, **TOL)
    assert int(layer.num_batches_tracked) == 2
