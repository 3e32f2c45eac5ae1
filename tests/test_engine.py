"""The engines: DeepSpeed (ZeRO 0, 1, 2) computes what DDP and one process compute, keeps BatchNorm
buffers identical on every rank, and both engines train in mixed precision with the loss in fp32.

Tolerances. Between engines and world sizes only the order of floating-point reductions differs
(DDP's bucketed all-reduce, DeepSpeed's flat-buffer reduce(-scatter), one process's single sum):
fp32 sums of a few thousand terms agree to ~1e-6 relative. A wrong gradient scale (1/W), per-rank
BatchNorm statistics or a skipped rank would be off by O(1), orders of magnitude above the
tolerances used here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import logged_losses, submit_cli
from multiproc import run_ranks
from test_barlow_twins import _StandInEncoder  # the encoder contract, with BatchNorm
from torch import nn

from hpc_btunet.distributed import Placement
from hpc_btunet.ssl import BarlowTwinsLoss, Projector, TwoViews
from hpc_btunet.train import pretrain
from hpc_btunet.train.engine import DDPEngine, EngineSpec

GLOBAL_BATCH = 8
SMALL = ["--base-width", "4", "--depth", "2", "--log-every", "1", "--wandb", "disabled"]


def _siamese() -> nn.Module:
    torch.manual_seed(0)
    return pretrain.SiameseNet(_StandInEncoder(), Projector(8, hidden_dim=16, out_dim=24))


def _views() -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 1, 16, 16), dtype=torch.uint8, generator=g)
    view_a, view_b = TwoViews()(images, seed=0, step=0)
    return view_a.numpy(), view_b.numpy()


def _one_process() -> dict:
    net = _siamese()
    view_a, view_b = (torch.as_tensor(v) for v in _views())
    loss = BarlowTwinsLoss()(net(view_a), net(view_b))
    loss.backward()
    return {
        "loss": loss.item(),
        "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
    }


def _deepspeed_rank(rank: int, world: int, stage: int, view_a, view_b) -> dict:
    torch.set_num_threads(1)
    from hpc_btunet.train.deepspeed_engine import DeepSpeedEngine

    b = GLOBAL_BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    engine = DeepSpeedEngine(
        EngineSpec(kind="deepspeed", zero_stage=stage, batch_size=b),
        torch.device("cpu"),
        Placement(rank, world, rank, world),
    )
    siamese = _siamese()
    net = engine.prepare(siamese, torch.optim.Adam(siamese.parameters(), lr=1e-3))
    za = net(torch.as_tensor(view_a[rows]))
    zb = net(torch.as_tensor(view_b[rows]))
    loss = BarlowTwinsLoss()(za, zb)
    engine.ds.backward(loss)
    grads = engine.full_gradients()
    engine.ds.step()
    for _ in range(2):  # more steps: the running statistics must stay the same on every rank
        engine.step(
            BarlowTwinsLoss()(
                net(torch.as_tensor(view_a[rows])), net(torch.as_tensor(view_b[rows]))
            )
        )
    exported = engine.export()
    return {  # numpy: tensors would travel through shared memory gone with this process
        "loss": loss.item(),
        "grads": {n: g.numpy() for n, g in grads.items()},
        "buffers": {n: t.numpy().copy() for n, t in engine.module.named_buffers()},
        "exported": {n: (t.numpy(), str(t.dtype)) for n, t in exported.items()},
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_gradients_equal_one_process_on_the_global_batch(stage):
    view_a, view_b = _views()
    want = _one_process()
    results = run_ranks(_deepspeed_rank, 2, stage, view_a, view_b, timeout=240)
    for rank, got in enumerate(results):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"rank {rank}"
        assert got["grads"].keys() == want["grads"].keys()
        for name, g in want["grads"].items():
            atol = 1e-5 * float(g.abs().max())
            got_g = torch.as_tensor(got["grads"][name])
            torch.testing.assert_close(got_g, g, rtol=1e-4, atol=atol, msg=name)
    # DeepSpeed broadcasts parameters only: the engine makes the buffers agree, and the global
    # statistics keep them equal, so the exported model is the same whichever rank writes it
    for name, buf in results[0]["buffers"].items():
        np.testing.assert_array_equal(results[1]["buffers"][name], buf, err_msg=name)
    for name, (value, dtype) in results[0]["exported"].items():
        assert dtype in ("torch.float32", "torch.int64"), (name, dtype)
        np.testing.assert_array_equal(results[1]["exported"][name][0], value, err_msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "data"
    submit_cli("pack", "--num-images", 60, "--image-size", 32, "--shard-size", 15, "--out", out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_zero_0_1_2_follow_ddp_on_two_ranks(data, tmp_path):
    """The real pretrain job, 2 local gloo ranks x batch 4, 6 steps with warm-up and cosine."""
    common = ["pretrain", "--data", data, "--steps", 6, "--batch-size", 4, "--warmup-steps", 2]
    common += [*SMALL, "--executor", "local", "--tasks-per-node", 2, "--wait"]
    runs = {}
    for name, flags in {
        "ddp": ["--engine", "ddp"],
        "zero0": ["--engine", "deepspeed", "--zero-stage", 0],
        "zero1": ["--engine", "deepspeed", "--zero-stage", 1],
        "zero2": ["--engine", "deepspeed", "--zero-stage", 2],
    }.items():
        submit_cli(*common, *flags, "--out", tmp_path / name)
        runs[name] = tmp_path / name / "pretrain" / "unet"
    want_losses = logged_losses(runs["ddp"])
    want = torch.load(runs["ddp"] / "encoder.pt", weights_only=True)
    assert len(want_losses) == 6
    for name in ("zero0", "zero1", "zero2"):
        # reduction order only (see the module docstring): 6 Adam steps keep it below 1e-4
        assert logged_losses(runs[name]) == pytest.approx(want_losses, rel=1e-4), name
        got = torch.load(runs[name] / "encoder.pt", weights_only=True)
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k].dtype == v.dtype, k
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        assert json.loads((runs[name] / "deepspeed.json").read_text())["zero_optimization"] == {
            "stage": int(name[-1])
        }


class _Recorder:
    """Wraps the Barlow Twins loss to record the dtype of what it receives and returns."""

    def __init__(self, monkeypatch):
        self.seen = []
        real = BarlowTwinsLoss.forward

        def forward(loss_self, z_a, z_b):
            out = real(loss_self, z_a, z_b)
            self.seen.append((z_a.dtype, out.dtype))
            return out

        monkeypatch.setattr(BarlowTwinsLoss, "forward", forward)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "engine, channels_last",
    [("ddp", False), ("ddp", True), ("deepspeed", False)],
    ids=["ddp", "ddp-channels-last", "deepspeed"],
)
def test_bf16_pretraining_on_cpu_computes_the_loss_in_fp32(
    data, tmp_path, engine, channels_last, monkeypatch
):
    recorder = _Recorder(monkeypatch)
    cfg = pretrain.PretrainConfig(
        data=data,
        out=tmp_path,
        steps=3,
        base_width=4,
        depth=2,
        batch_size=8,
        device="cpu",
        engine=engine,
        precision="bf16",
        channels_last=channels_last,
        wandb="disabled",
        log_every=1,
    )
    watched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    before = {k: os.environ.get(k) for k in watched}
    path = pretrain.run(cfg)
    # sbatch passes this process's environment to jobs it submits later: nothing may leak
    assert {k: os.environ.get(k) for k in watched} == before
    assert recorder.seen and all(z == torch.bfloat16 for z, _ in recorder.seen), (
        "the embeddings come out of a bf16 forward pass"
    )
    assert all(out == torch.float32 for _, out in recorder.seen), "the loss is fp32"
    losses = logged_losses(cfg.run_dir())
    assert len(losses) == 3 and all(np.isfinite(losses))
    encoder = torch.load(path, weights_only=True)
    assert {v.dtype for v in encoder.values() if v.is_floating_point()} == {torch.float32}


def test_fp16_under_ddp_scales_the_loss_and_skips_overflowing_steps():
    """fp16 runs on CUDA only; the engine's scaling logic is the same on CPU, tested here."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    engine = DDPEngine(EngineSpec(precision="fp16"), torch.device("cpu"), Placement())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    net = engine.prepare(model, optimizer, scheduler)
    assert engine.scaler is not None and engine.scaler.get_scale() == 2.0**16

    scaled = []
    real_backward = torch.Tensor.backward

    def backward(t, *a, **kw):
        scaled.append(float(t.detach()))
        return real_backward(t, *a, **kw)

    x = torch.full((2, 4), 0.5)  # fp16 gradients of the scaled loss stay below 65504
    with engine.autocast():
        loss = net(x).float().mean()
    before = model.weight.detach().clone()
    torch.Tensor.backward = backward
    try:
        engine.step(loss)
    finally:
        torch.Tensor.backward = real_backward
    assert scaled == [pytest.approx(float(loss) * 2.0**16, rel=1e-3)], "backward of the scaled loss"
    # the update itself is unscaled: SGD moves each weight by lr x d(mean)/dw = 0.1 x 0.5
    torch.testing.assert_close(model.weight.detach(), before - 0.05, rtol=0, atol=1e-3)
    assert scheduler.last_epoch == 1

    before = model.weight.detach().clone()
    engine.step(net(x).float().mean() * float("inf"))  # overflow: skipped, scale lowered
    assert torch.equal(model.weight.detach(), before)
    assert engine.scaler.get_scale() < 2.0**16
    assert scheduler.last_epoch == 1, "no scheduler step for a skipped optimiser step"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finetuning_reads_an_encoder_pretrained_under_deepspeed_bf16(data, tmp_path):
    common = ["--data", data, "--base-width", 4, "--depth", 2, "--wandb", "disabled"]
    common += ["--executor", "debug"]
    submit_cli("pretrain", *common, "--steps", 2, "--batch-size", 8, "--out", tmp_path / "ddp")
    submit_cli(
        "pretrain",
        *common,
        "--steps",
        2,
        "--batch-size",
        8,
        "--engine",
        "deepspeed",
        "--zero-stage",
        2,
        "--precision",
        "bf16",
        "--out",
        tmp_path / "ds",
    )
    ddp = torch.load(tmp_path / "ddp/pretrain/unet/encoder.pt", weights_only=True)
    ds = torch.load(tmp_path / "ds/pretrain/unet/encoder.pt", weights_only=True)
    assert ds.keys() == ddp.keys()
    assert all(ds[k].dtype == ddp[k].dtype and ds[k].shape == ddp[k].shape for k in ddp)
    done = submit_cli(
        "finetune",
        *common,
        "--epochs",
        1,
        "--pretrained",
        tmp_path / "ds/pretrain/unet/encoder.pt",
        "--out",
        tmp_path / "ds",
    )
    assert "test dice" in done.stdout


def test_ddp_clips_the_global_gradient_norm():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    engine = DDPEngine(EngineSpec(grad_clip=1e-3), torch.device("cpu"), Placement())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    net = engine.prepare(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    engine.step((net(torch.randn(16, 8)) * 100).square().mean())  # a gradient far above 1e-3
    moved = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-3), "SGD lr 1: the clipped norm"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_on_cpu_needs_no_compiler(data, tmp_path):
    """DeepSpeed's CPU backend would compile a shared-memory op with the C++ compiler at start-up
    (used by inference only): the engine does not build it, so a machine without g++ trains."""
    env = dict(os.environ, CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    done = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", "pretrain", "--data", str(data)]
        + ["--out", str(tmp_path / "exp"), "--steps", "2", "--batch-size", "8", *SMALL]
        + ["--engine", "deepspeed", "--zero-stage", "1", "--executor", "debug"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "exp" / "pretrain" / "unet" / "encoder.pt").exists()
    assert not (tmp_path / "extensions").exists(), "nothing was compiled"
