"""The command line: ``hpc-btunet COMMAND`` or ``python -m hpc_btunet.submit COMMAND``.

Parses, dispatches to the part of the package that does the work, and prints what happened.
Errors a user can cause print one message (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hpc_btunet import __version__
from hpc_btunet.errors import UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _add_pack(sub) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a dataset into WebDataset shards with a manifest of splits and folds",
        formatter_class=_Formatter,
        description=(
            "Pack a dataset into WebDataset tar shards (train-NNNNNN.tar, test-NNNNNN.tar) and a\n"
            "manifest.json holding the seeded, group-aware train/test split, the labelled subset\n"
            "of train and its k folds. The manifest is written last: a dataset without one is\n"
            "incomplete, and rerunning the same command completes it."
        ),
    )
    p.add_argument("--source", default="synthetic", help="synthetic (built-in nuclei) or folder")
    p.add_argument("--root", type=Path, help="--source folder: folder holding images/ and masks/")
    p.add_argument("--out", type=Path, help="output folder (default: shards/<source>)")
    p.add_argument(
        "--num-images", type=int, default=200, help="--source synthetic: how many images"
    )
    p.add_argument(
        "--group-size", type=int, default=1, help="--source synthetic: images per slide (group)"
    )
    p.add_argument("--image-size", type=int, default=256, help="images are resized to SIZE x SIZE")
    p.add_argument(
        "--channels",
        default="auto",
        choices=["auto", "1", "3"],
        help="1 (grayscale) or 3 (RGB); auto: 1 for synthetic, 3 for a folder with colour images",
    )
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="--source folder: allow images without masks (they go to train, unlabelled)",
    )
    p.add_argument(
        "--mask-suffix", default="", help="--source folder: mask stem = image stem + SUFFIX"
    )
    p.add_argument(
        "--group-regex",
        help="--source folder: the first capture group of this regex on the "
        "file stem is the group (e.g. '^(.*)_slice\\d+$'); default: each image its own group",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.3, help="fraction of samples in the test split"
    )
    p.add_argument(
        "--labelled-fraction",
        type=float,
        default=0.2,
        help="fraction of the train split that forms the labelled subset",
    )
    p.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds of the labelled subset"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, folds and shard order")
    p.add_argument("--shard-size", type=int, default=1000, help="about this many samples per shard")
    p.add_argument(
        "--encoding",
        default="png",
        choices=["png", "npy"],
        help="png: lossless, compact; npy: raw uint8 arrays, no decoding when loading",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="threads reading and encoding",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete dataset at --out")
    p.set_defaults(func=_run_pack)


def _run_pack(args) -> int:
    from hpc_btunet.data.pack import PackConfig, pack
    from hpc_btunet.data.sources import build_source
    from hpc_btunet.data.splits import SplitConfig

    start = time.perf_counter()
    out = args.out or Path("shards") / args.source
    cfg = PackConfig(
        out=out,
        image_size=args.image_size,
        shard_size=args.shard_size,
        encoding=args.encoding,
        overwrite=args.overwrite,
        workers=args.workers,
        splits=SplitConfig(args.test_fraction, args.labelled_fraction, args.folds, args.seed),
    )
    source = build_source(
        args.source,
        root=args.root,
        num_images=args.num_images,
        channels=args.channels,
        seed=args.seed,
        group_size=args.group_size,
        unlabelled=args.unlabelled,
        mask_suffix=args.mask_suffix,
        group_regex=args.group_regex,
    )
    m = pack(source, cfg)
    c = m.counts
    size = sum(s.bytes for s in m.shards)
    print(
        f"packed {c['total']} {m.image_size}x{m.image_size} images ({m.channels} channel(s), {m.encoding}) "
        f"from {args.source} into {out} in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"  train {c['train']} (labelled {c['labelled']}, unlabelled {c['unlabelled']}), test {c['test']}, "
        f"folds {c['folds']}"
    )
    print(f"  {len(m.shards)} shard(s), {_human_bytes(size)}; manifest: {out / 'manifest.json'}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check every shard of a packed dataset against its manifest (sha256)",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--data", type=Path, required=True, help="a packed dataset (folder with manifest.json)"
    )
    p.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    from hpc_btunet.data.manifest import load_manifest, verify_shards

    m = load_manifest(args.data)
    verify_shards(args.data, m.shards)
    print(
        f"{args.data}: {len(m.shards)} shard(s), {m.counts['total']} samples, all match the manifest"
    )
    return 0


def _add_jobs(sub) -> None:
    from hpc_btunet.config import add_arguments
    from hpc_btunet.launch import EXECUTORS
    from hpc_btunet.pipeline import DemoConfig
    from hpc_btunet.train.finetune import FinetuneConfig
    from hpc_btunet.train.pretrain import PretrainConfig

    jobs = (
        (
            "pretrain",
            PretrainConfig,
            "Barlow Twins pre-training of a model's encoder on the train split (no labels)",
        ),
        (
            "finetune",
            FinetuneConfig,
            "fine-tune a whole model on one fold of the labelled subset, test on the test split",
        ),
    )
    for name, cls, text in jobs:
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        add_arguments(p, cls)
        p.add_argument(
            "--executor",
            default="local",
            choices=EXECUTORS,
            help="local: a child process through submitit; debug: in this process",
        )
        p.set_defaults(func=_run_job, job=name, config_class=cls)

    p = sub.add_parser(
        "report",
        help="the Table 2 layout (model x BT: Pr, DC, IoU) from fine-tuning results",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--experiment", type=Path, required=True, help="experiment folder (the jobs' --out)"
    )
    p.add_argument(
        "--aggregate",
        default="mean",
        choices=["mean", "pooled"],
        help="per fold: mean of per-image metrics, or pooled (micro) metrics",
    )
    p.set_defaults(func=_run_report)

    text = "the whole method on this machine: pack the built-in dataset, pre-train, fine-tune every fold with and without BT, report"
    p = sub.add_parser("demo", help=text, description=text, formatter_class=_Formatter)
    add_arguments(p, DemoConfig)
    p.set_defaults(func=_run_demo)


def _run_job(args) -> int:
    from hpc_btunet.config import resolve
    from hpc_btunet.launch import LaunchConfig, run_jobs
    from hpc_btunet.train import finetune, pretrain

    cfg = resolve(args.config_class, args)
    fn = {"pretrain": pretrain.run, "finetune": finetune.run}[args.job]
    launch = LaunchConfig(executor=args.executor, logs=Path(cfg.out) / "logs")
    (path,) = run_jobs(launch, args.job, fn, [cfg], [cfg.model])
    print(f"{args.job}: output in {Path(path).parent}")
    return 0


def _run_report(args) -> int:
    from hpc_btunet.report import write_report

    table, folder = write_report(args.experiment, args.aggregate)
    print(table)
    print(f"written: {folder / 'table.md'}, {folder / 'table.csv'}")
    return 0


def _run_demo(args) -> int:
    from hpc_btunet.config import resolve
    from hpc_btunet.pipeline import DemoConfig, demo

    demo(resolve(DemoConfig, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-btunet",
        description="Barlow Twins pre-training and U-Net fine-tuning for biomedical segmentation, on SLURM or locally.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hpc_btunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pack(sub)
    _add_verify(sub)
    _add_jobs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"hpc-btunet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpc-btunet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
