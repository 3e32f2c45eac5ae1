"""Weak scaling of ``pretrain`` on one CPU node: W ranks on W cores against one rank on one core.

    python bench/scaling.py [--image-size 256] [--batch-size 32] [--steps 12] [--ranks 2]

Packs a synthetic dataset, then runs the real command, ``hpc-btunet pretrain --executor local``
(gloo, same per-rank batch, so the global batch grows with the ranks), several ways:

  threads by hand     OMP_NUM_THREADS=1 in every rank (what torchrun sets)
  default threads     nothing set: the toolkit gives each rank its share of the cores
  all cores per rank  OMP_NUM_THREADS=<cores> in every rank (PyTorch's own default, which the
                      toolkit used to keep): the oversubscription the placement avoids

each with 1 rank on 1 core (``taskset`` narrows the affinity to core 0) and W ranks on W cores.
images/s is the median over the logged intervals after the first (warm-up: start-up, the
workers' first batches) of global batch x steps / seconds; with ``--repeats N`` each cell is run N
times and the best kept (a shared machine's noise only ever slows a run). The ratio to ideal is
images/s(W ranks) / (W x images/s(1 rank)).

``--count`` instead profiles one pre-training step on W gloo ranks (the job's own ``TwinStep``
on the real engine, warm-up steps first) with ``torch.profiler`` and lists the collectives a step
makes (gloo operations, calls and bytes per rank), DDP's gradient all-reduce included; run it with
``PYTHONPATH`` pointing at another checkout to count that version's collectives.

A benchmark, not a test: it needs the machine to itself (time it alone), and numbers depend on
the machine; record them with the machine named (the heading names it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import machine  # noqa: E402  (bench/loader.py: CPU model and cores)

ROWS = {
    "by-hand": ("threads by hand (OMP_NUM_THREADS=1)", lambda cores: {"OMP_NUM_THREADS": "1"}),
    "default": ("default threads (the toolkit's placement)", lambda cores: {}),
    "all-cores": (
        "all cores per rank (PyTorch's default)",
        lambda cores: {"OMP_NUM_THREADS": str(cores)},
    ),
}


def pack_dataset(root: Path, args) -> Path:
    data = root / "data"
    cmd = [
        sys.executable, "-m", "hpc_btunet.submit", "pack", "--source", "synthetic",
        "--num-images", str(args.num_images), "--image-size", str(args.image_size),
        "--test-fraction", "0.05", "--out", str(data),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return data


def run_pretrain(data: Path, out: Path, ranks: int, cores: list[int], env: dict, args) -> dict:
    """One ``pretrain`` run; images/s over the logged intervals after the first."""
    cmd = [
        "taskset", "-c", ",".join(map(str, cores)),
        sys.executable, "-m", "hpc_btunet.submit", "pretrain", "--data", str(data),
        "--out", str(out), "--executor", "local", "--tasks-per-node", str(ranks),
        "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--log-every", str(args.log_every), "--checkpoint-every", str(args.steps),
        "--num-workers", str(args.workers), "--wandb", "disabled", "--wait",
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=base | env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pretrain failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    records = [
        json.loads(line)
        for line in (out / "pretrain" / "unet" / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    config = yaml.safe_load((out / "pretrain" / "unet" / "config.yaml").read_text())
    threads = config.get("runtime", {}).get("threads")
    return {"images_per_s": statistics.median(rates), "wall_s": wall, "threads": threads}


def scaling(args) -> None:
    all_cores = sorted(os.sched_getaffinity(0))
    if len(all_cores) < args.ranks:
        raise SystemExit(
            f"--ranks {args.ranks} needs as many cores; this machine has {len(all_cores)}"
        )
    rows = [r.strip() for r in args.rows.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = pack_dataset(tmp, args)
        for name in rows:
            label, env_of = ROWS[name]
            got = {}
            for ranks in (1, args.ranks):
                cores = all_cores[:ranks]
                if name == "all-cores" and ranks == 1 and results:
                    got[1] = results[0][1][1]  # one rank on one core: the same run as by hand
                    continue
                print(f"{name}: {ranks} rank(s) on core(s) {cores} ...", file=sys.stderr)
                runs = [
                    run_pretrain(
                        data, tmp / f"{name}-{ranks}-{i}", ranks, cores, env_of(ranks), args
                    )
                    for i in range(args.repeats)
                ]
                got[ranks] = max(runs, key=lambda r: r["images_per_s"])
            results.append((label, got))
    w = args.ranks
    print(
        f"\nWeak scaling of `pretrain` (unet, {args.image_size}x{args.image_size} grayscale, batch "
        f"{args.batch_size} per rank, {args.steps} steps, gloo, {args.workers} loader worker(s) "
        f"per rank, best of {args.repeats}), {machine()}\n"
    )
    print(f"| threads | 1 rank on 1 core: images/s | {w} ranks on {w} cores: images/s | of ideal |")
    print("| --- | ---: | ---: | ---: |")
    for label, got in results:
        one, many = got[1]["images_per_s"], got[w]["images_per_s"]
        print(f"| {label} | {one:,.1f} | {many:,.1f} | {100 * many / (w * one):.0f} % |")
    for label, got in results:
        print(f"{label}: recorded {got[1]['threads']!r} / {got[w]['threads']!r}", file=sys.stderr)


# --- --count: the collectives of one step --------------------------------------------------------


def _count_rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    import torch
    from step import build_siamese, pretrain_defaults  # bench/step.py
    from torch.profiler import ProfilerActivity, profile

    from hpc_btunet.ssl import BarlowTwinsLoss, TwoViews
    from hpc_btunet.train.engine import EngineSpec, engine_session
    from hpc_btunet.train.optim import build_optimizer
    from hpc_btunet.train.pretrain import TwinStep

    d = pretrain_defaults()
    spec = EngineSpec(kind="ddp", batch_size=args.batch_size, device="cpu")
    with engine_session(spec) as engine:
        net_args = argparse.Namespace(
            model="unet", channels=1, base_width=16, depth=4, image_size=args.image_size
        )
        siamese = build_siamese(net_args, d)
        optimizer = build_optimizer("adam", siamese, d["lr"], 0.0, args.batch_size * world)
        net = engine.prepare(siamese, optimizer)
        step = TwinStep(
            engine, net, BarlowTwinsLoss(), TwoViews(), seed=0,
            global_batch=args.batch_size * world,
        )  # fmt: skip
        engine.train()
        shape = (args.batch_size, 1, args.image_size, args.image_size)
        batch = torch.randint(0, 256, shape, dtype=torch.uint8)
        for s in range(3):
            step([batch], s)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step([batch], 3)
        calls, nbytes = Counter(), Counter()
        for e in prof.events():
            if e.name.startswith("gloo:"):
                size = torch.tensor([], dtype=_dtype(e.input_dtypes)).element_size()
                calls[e.name] += 1
                nbytes[e.name] += sum(_numel(s) for s in e.input_shapes) * size
        one_pass = step.one_pass(batch) if callable(getattr(step, "one_pass", None)) else False
        queue.put((rank, dict(calls), dict(nbytes), one_pass))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype(names):
    import torch

    name = next((n for n in names if n), "float")
    return {"double": torch.float64, "long int": torch.int64, "int": torch.int32}.get(
        name, torch.float32
    )


def count(args) -> None:
    import multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 20000 + os.getpid() % 20000
    procs = [
        ctx.Process(target=_count_rank, args=(r, args.ranks, port, args, queue))
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    _, calls, nbytes, one_pass = results[0]
    import hpc_btunet

    print(
        f"\nCollectives of one pre-training step, rank 0 of {args.ranks} (unet, "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size} per rank, fp32, DDP on "
        f"gloo; views in {'one forward' if one_pass else 'two forwards'}), hpc_btunet from "
        f"{Path(hpc_btunet.__file__).parent.parent}\n"
    )
    print("| collective | calls per step | bytes per step |")
    print("| --- | ---: | ---: |")
    for name in sorted(calls):
        print(f"| {name} | {calls[name]} | {nbytes[name]:,} |")
    print(f"| all | {sum(calls.values())} | {sum(nbytes.values()):,} |")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="images per rank")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--rows", default=",".join(ROWS), help=f"from {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell; the best is kept")
    p.add_argument("--count", action="store_true", help="list one step's collectives instead")
    args = p.parse_args()
    if args.count:
        count(args)
    else:
        scaling(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
