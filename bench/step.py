"""Pre-training step throughput: DDP and DeepSpeed, fp32 and bf16, through the toolkit's engine.

    python bench/step.py [--image-size 256] [--batch-size 16] [--accumulate 1] [--steps 10]
                         [--warmup 3] [--configs ddp-fp32,zero2-bf16] [--device auto]
                         [--threads N] [--peak-tflops 989]

Measures images/s of the Barlow Twins pre-training step of the U-Net (``--model``, default
``unet``) on synthetic data, one row per configuration:

  ddp-fp32       DDP, fp32
  ddp-bf16       DDP, bf16 (``torch.autocast``)
  ddp-bf16-cl    DDP, bf16, channels_last
  zero1-fp32     DeepSpeed ZeRO-1, fp32
  zero2-fp32     DeepSpeed ZeRO-2, fp32
  zero1-bf16     DeepSpeed ZeRO-1, bf16 (bf16 weights, fp32 master copies)
  zero2-bf16     DeepSpeed ZeRO-2, bf16

Each step is the ``pretrain`` job's step itself (``pretrain.TwinStep`` on the real engine:
``create_engine``, ``Engine.prepare``, ``inputs``, ``autocast``, ``step``, ``all_finite``), built
as ``_pretrain`` builds it: ``SiameseNet`` of the encoder and the ``Projector`` (width image size / 2), Adam with
the warm-up + cosine schedule, ``BarlowTwinsLoss``, and the two views made by ``TwoViews`` on the
device from a uint8 batch; options this script does not expose (learning rate, lambda, crop scale,
rotation, projector layers, optimiser) take ``pretrain``'s defaults. The batch is random uint8 in
memory (pinned on CUDA), copied to the device every step as the job does: there is no data
loading, so this measures the step alone, i.e. the ceiling of what ``pretrain`` reaches when the
loader keeps up. ``--warmup`` steps are run first and not timed, then ``--steps`` timed steps:
images/s = global batch x steps / seconds (a single process here: global batch = batch size x
``--accumulate``). ``--accumulate K`` runs the exact gradient cache over K micro-batches of
``--batch-size``: compare ``--batch-size 8 --accumulate 4`` with ``--batch-size 32`` for its cost
(one more forward pass) and its memory (one micro-batch's activations). The memory column is the
peak GPU memory on CUDA and the process's peak resident memory (imports included) on the CPU.

Each configuration runs in a fresh process (DeepSpeed and process groups do not re-initialise
cleanly in one): this script re-invokes itself with ``--one CONFIG`` and reads the JSON line the
child prints. The engine runs as one process, as ``pretrain`` does on one GPU: DDP's wrapper is
then the identity (no gradient all-reduce) and DeepSpeed gets a 1-rank process group, so the
rows compare precision, memory format and DeepSpeed's own step, not communication.

FLOPs: the forward FLOPs per image of encoder + projector are counted once, fp32, batch 1, by
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs; convolutions and
matrix products are counted, element-wise operations, normalisation, pooling and the loss are
not). A training step is taken as 3 x the forward FLOPs (forward + backward ~ 2 x forward) for
both views, so achieved TFLOP/s = 3 x 2 x forward FLOPs per image x images/s. ``--peak-tflops``
(the GPU's dense bf16 peak, e.g. 989 for an H100 SXM) adds the fraction of it achieved (every row
against that same bf16 peak).

The ms/step column gives the mean and, in brackets, the fastest and slowest timed step: a wide
spread means the measurement was disturbed. On a CPU shared with other work, OpenMP threads that
lose their core stall each other at every barrier and steps can become tens of times slower: use
``--threads`` below the number of idle cores there. This is a benchmark, not a test: numbers
depend on the machine; record them with the machine named (the table's heading names it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata

import torch
from torch.utils.flop_counter import FlopCounterMode

# name: (label, engine, precision, ZeRO stage, channels_last)
CONFIGS = {
    "ddp-fp32": ("DDP fp32", "ddp", "fp32", 0, False),
    "ddp-bf16": ("DDP bf16", "ddp", "bf16", 0, False),
    "ddp-bf16-cl": ("DDP bf16 + channels_last", "ddp", "bf16", 0, True),
    "zero1-fp32": ("DeepSpeed ZeRO-1 fp32", "deepspeed", "fp32", 1, False),
    "zero2-fp32": ("DeepSpeed ZeRO-2 fp32", "deepspeed", "fp32", 2, False),
    "zero1-bf16": ("DeepSpeed ZeRO-1 bf16", "deepspeed", "bf16", 1, False),
    "zero2-bf16": ("DeepSpeed ZeRO-2 bf16", "deepspeed", "bf16", 2, False),
}
RESULT = "STEP_BENCH_RESULT "  # the child's JSON line starts with this


def pretrain_defaults() -> dict:
    """The ``pretrain`` job's option defaults (so that this bench builds what the job builds)."""
    from hpc_btunet.train.pretrain import PretrainConfig

    return {f.name: f.default for f in dataclasses.fields(PretrainConfig)}


def build_siamese(args: argparse.Namespace, defaults: dict) -> torch.nn.Module:
    """Encoder + projector, as ``_pretrain`` builds them (seeded the same way)."""
    from hpc_btunet.models import build_model, check_input_size
    from hpc_btunet.ssl import Projector
    from hpc_btunet.train.pretrain import SiameseNet

    torch.manual_seed(defaults["seed"])
    model = build_model(
        args.model, in_channels=args.channels, base_width=args.base_width, depth=args.depth
    )
    check_input_size(model, args.image_size)
    projector = Projector(
        model.encoder.out_channels,
        hidden_dim=defaults["projector_width"] or args.image_size // 2,
        num_layers=defaults["projector_layers"],
    )
    return SiameseNet(model.encoder, projector)


def forward_flops(args: argparse.Namespace) -> float:
    """Forward FLOPs of encoder + projector for one image, fp32 on CPU."""
    net = build_siamese(args, pretrain_defaults()).eval()  # eval: BatchNorm1d takes a batch of 1
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, args.channels, args.image_size, args.image_size))
    return float(counter.get_total_flops())


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process: build as ``_pretrain`` does, time ``--steps`` steps."""
    from hpc_btunet.ssl import BarlowTwinsLoss, TwoViews, ViewConfig
    from hpc_btunet.train.engine import EngineSpec, engine_session
    from hpc_btunet.train.optim import build_optimizer, warmup_cosine
    from hpc_btunet.train.pretrain import TwinStep

    label, kind, precision, zero_stage, channels_last = CONFIGS[args.one]
    torch.set_num_threads(args.threads)
    d = pretrain_defaults()
    spec = EngineSpec(
        kind=kind,
        precision=precision,
        zero_stage=zero_stage,
        grad_clip=d["grad_clip"],
        channels_last=channels_last,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        device=args.device,
    )
    with engine_session(spec) as engine:
        siamese = build_siamese(args, d)
        global_batch = args.batch_size * args.accumulate * engine.world_size
        total = args.warmup + args.steps
        optimizer = build_optimizer(
            d["optimizer"], siamese, d["lr"], d["weight_decay"], global_batch
        )
        scheduler = warmup_cosine(optimizer, total, d["warmup_steps"])
        net = engine.prepare(siamese, optimizer, scheduler)
        twin_step = TwinStep(
            engine,
            net,
            BarlowTwinsLoss(lambd=d["lambd"]),
            TwoViews(ViewConfig(crop_scale=(d["crop_scale"], 1.0), rotation_degrees=d["rotation"])),
            seed=d["seed"],
            global_batch=global_batch,
        )
        cuda = engine.device.type == "cuda"
        generator = torch.Generator().manual_seed(engine.rank)
        shape = (args.batch_size, args.channels, args.image_size, args.image_size)
        batches = [
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
            for _ in range(args.accumulate)
        ]
        if cuda:
            batches = [b.pin_memory() for b in batches]
            torch.cuda.reset_peak_memory_stats(engine.device)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(engine.device)

        engine.train()
        last_loss, times = float("nan"), []
        for step in range(total):
            tick = time.perf_counter()
            if step == args.warmup:
                sync()
                start = time.perf_counter()
            loss, _, _ = twin_step(batches, step)  # the pretrain job's step
            last_loss = loss.item()  # waits for the step (as the job's loss.item() does)
            if step >= args.warmup:
                times.append(time.perf_counter() - tick)
        sync()
        seconds = time.perf_counter() - start
        device_name = torch.cuda.get_device_name(engine.device) if cuda else cpu_name()
        return {
            "config": args.one,
            "label": label,
            "images_per_s": global_batch * args.steps / seconds,
            "step_ms": 1000 * seconds / args.steps,
            "step_ms_min": 1000 * min(times),
            "step_ms_max": 1000 * max(times),
            "seconds": seconds,
            "global_batch": global_batch,
            "world_size": engine.world_size,
            "loss": last_loss,
            "device": str(engine.device),
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "peak_memory_gib": torch.cuda.max_memory_allocated(engine.device) / 2**30
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        }


def cpu_name() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine()


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def child_command(args: argparse.Namespace, name: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name]
    for flag in (
        "image_size",
        "batch_size",
        "accumulate",
        "steps",
        "warmup",
        "base_width",
        "depth",
    ):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--model", args.model, "--channels", str(args.channels)]
    return cmd + ["--device", args.device, "--threads", str(args.threads)]


def run_child(args: argparse.Namespace, name: str) -> tuple[dict | None, str]:
    """Run configuration ``name`` in a fresh process; (its result, or None and why not)."""
    proc = subprocess.run(child_command(args, name), capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :]), ""
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return None, f"exit status {proc.returncode}\n{tail}"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument(
        "--batch-size", type=int, default=16, help="images per micro-batch (one process)"
    )
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--model", default="unet")
    p.add_argument("--channels", type=int, default=1, help="image channels (grayscale: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--threads", type=int, default=core_count(), help="torch.set_num_threads (all cores)"
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated rows, from {', '.join(CONFIGS)}",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s"
    )
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or args.threads < 1:
        p.error(
            "need --steps >= 1, --warmup >= 0, --batch-size >= 2 (Barlow Twins), --threads >= 1"
        )
    if args.accumulate < 1:
        p.error("need --accumulate >= 1")

    if args.one:
        print(RESULT + json.dumps(run_one(args)), flush=True)
        return 0

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(
            f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(CONFIGS)}"
        )
    torch.set_num_threads(args.threads)
    gflop = forward_flops(args) / 1e9

    results: dict[str, dict | None] = {}
    failures = []
    begin = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"{name} ...", end=" ", file=sys.stderr, flush=True)
        results[name], why = run_child(args, name)
        print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if results[name] is None:
            failures.append(name)
            print(f"{name} failed: {why}", file=sys.stderr)
    elapsed = time.perf_counter() - begin

    done = [r for r in results.values() if r is not None]
    first = done[0] if done else {"device": args.device, "device_name": "?"}
    if first["device"].startswith("cuda"):
        where = f"{first['device_name']} ({first['device']}), {core_count()} CPU cores"
    else:
        where = f"{first['device_name']}, {core_count()} cores, {args.threads} torch threads"
    print(
        f"\nPre-training step throughput, {args.model} (base width {args.base_width}, depth "
        f"{args.depth}) + projector, {args.image_size}x{args.image_size}x{args.channels}, "
        f"batch {args.batch_size} x {args.accumulate} micro-batch(es) x 1 process, {args.steps} "
        f"timed steps after {args.warmup} "
        f"warm-up; {where}; torch {torch.__version__}, deepspeed {version('deepspeed')}; "
        f"forward {gflop:.3g} GFLOP/image (encoder + projector, fp32), training FLOPs taken as "
        f"3 x forward x 2 views\n"
    )
    peak = args.peak_tflops
    cuda = first["device"].startswith("cuda")
    head = "| configuration | images/s | ms/step (min-max) | fwd GFLOP/image | TFLOP/s |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    memory = "peak memory GiB" if cuda else "peak RSS GiB"
    head, rule = head + f" {memory} |", rule + " ---: |"
    if peak:
        head, rule = head + f" of {peak:g} TFLOP/s bf16 peak |", rule + " ---: |"
    print(head)
    print(rule)
    for name in names:
        r = results[name]
        if r is None:
            cells = ["failed", "", f"{gflop:.3g}", "", ""] + [""] * bool(peak)
            print(f"| {CONFIGS[name][0]} | " + " | ".join(cells) + " |")
            continue
        tflops = 3 * 2 * gflop * r["images_per_s"] / 1e3
        spread = f"{r['step_ms']:,.0f} ({r['step_ms_min']:,.0f}-{r['step_ms_max']:,.0f})"
        cells = [f"{r['images_per_s']:,.1f}", spread, f"{gflop:.3g}"]
        cells.append(f"{tflops:.3f}")
        cells.append(f"{r['peak_memory_gib']:.2f}")
        if peak:
            cells.append(f"{100 * tflops / peak:.1f} %")
        print(f"| {r['label']} | " + " | ".join(cells) + " |")
    print(f"\n{len(names)} configuration(s) in {elapsed:.0f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    from hpc_btunet.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as e:  # a wrong option (image size, device, ...): its message, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
