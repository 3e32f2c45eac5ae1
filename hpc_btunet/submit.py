"""The command line: ``hpc-btunet COMMAND`` or ``python -m hpc_btunet.submit COMMAND``.

Parses, dispatches to the part of the package that does the work, and prints what happened.
:func:`main` is the one place where errors meet the user: a ``UserError`` (or an ``OSError`` a
user can act on, see :func:`hpc_btunet.errors.as_user_error`) prints one ``error:`` line and
exits with status 2; anything else is a bug and keeps its traceback. Ctrl-C, SIGTERM and SIGHUP
stop the command together with every process it started (local jobs and their workers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hpc_btunet import __version__
from hpc_btunet.errors import UserError, as_user_error
from hpc_btunet.processes import Interrupted, stop_descendants, terminating_signals_interrupt


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: options built from a config already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


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
    p.add_argument(
        "--source",
        default="synthetic",
        help="synthetic (built-in: --task nuclei or lesion), folder (images/ + masks/), or a "
        "public dataset as "
        "downloaded: kdsb18, isic2018, busi, busis (2-D images), brats, decathlon (NIfTI "
        "volumes, packed as axial slices)",
    )
    p.add_argument(
        "--resize",
        choices=["squash", "pad"],
        help="public datasets, brats, decathlon: squash (default): every image to SIZE x SIZE "
        "(the paper); pad: pad to a square first, keeping the aspect ratio (the padding is "
        "recorded per sample)",
    )
    p.add_argument(
        "--root",
        type=Path,
        help="the dataset's folder (--source folder: the one holding images/ and masks/)",
    )
    p.add_argument(
        "--modality",
        help="brats, decathlon: the channel(s) to pack, comma-separated (at most 4), e.g. flair "
        "or flair,t1ce,t2; default: flair (brats), every channel (decathlon)",
    )
    p.add_argument(
        "--target",
        help="brats: wt (whole tumour, default), tc (tumour core), et (enhancing tumour) or "
        "label values; decathlon: label value(s) or name(s), default every non-zero label",
    )
    p.add_argument(
        "--slices",
        help="brats, decathlon: which axial slices: lesion (default: those holding the target), "
        "lesion:F (plus a fraction F of the others), all (every non-empty slice) or N (per "
        "subject, evenly spaced over those holding the target)",
    )
    p.add_argument(
        "--clip",
        help="brats, decathlon: per-volume intensity percentiles LO,HI (of the non-zero voxels) "
        "clipped to before scaling to 0-255 (default: 0.5,99.5)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: shards/<source>; shards/synthetic-lesion for --task lesion)",
    )
    p.add_argument(
        "--num-images", type=int, help="--source synthetic: how many images (default: 200)"
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="--source synthetic: images per group (a slide; with --task lesion, a patient; "
        "default: 1)",
    )
    p.add_argument(
        "--task",
        help="--source synthetic: nuclei (default: fluorescence nuclei with masks) or lesion "
        "(organ slices labelled normal/abnormal, lesion masks for evaluation, organ masks)",
    )
    p.add_argument(
        "--abnormal-fraction",
        type=float,
        help="--task lesion: the fraction of images with lesions, in (0, 1); default 0.5",
    )
    p.add_argument("--image-size", type=int, default=256, help="images are resized to SIZE x SIZE")
    p.add_argument(
        "--channels",
        default="auto",
        choices=["auto", "1", "3"],
        help="1 (grayscale) or 3 (RGB); auto: 1 for synthetic, 3 for a folder with colour images, "
        "one per --modality for volumes",
    )
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="--source folder: allow images without masks (they go to train, unlabelled)",
    )
    p.add_argument("--mask-suffix", help="--source folder: mask stem = image stem + SUFFIX")
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
        help="threads reading and encoding (processes decoding volumes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete dataset at --out")
    p.set_defaults(func=_run_pack)


def _run_pack(args) -> int:
    from hpc_btunet.data.pack import PackConfig, pack
    from hpc_btunet.data.sources import build_source
    from hpc_btunet.data.splits import SplitConfig

    start = time.perf_counter()
    task = f"-{args.task}" if args.source == "synthetic" and args.task == "lesion" else ""
    out = args.out or Path("shards") / f"{args.source}{task}"
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
        task=args.task,
        abnormal_fraction=args.abnormal_fraction,
        unlabelled=args.unlabelled,
        mask_suffix=args.mask_suffix,
        group_regex=args.group_regex,
        resize=args.resize,
        modality=args.modality,
        target=args.target,
        slices=args.slices,
        clip=args.clip,
    )

    def log(line: str) -> None:  # progress on stdout, warnings on stderr as the command's own
        if line.startswith("warning: "):
            print(f"hpc-btunet pack: {line}", file=sys.stderr)
        else:
            print(line)

    m = pack(source, cfg, log=log)
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
    from hpc_btunet.launch import LaunchConfig
    from hpc_btunet.pipeline import DemoConfig
    from hpc_btunet.train.contrastive import ContrastiveConfig
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
            "fine-tune a whole model on folds of the labelled subset, test on the test split",
        ),
        (
            "contrastive",
            ContrastiveConfig,
            "the second method: a UNet++ pair trained contrastively from image-level labels "
            "(normal/abnormal), or the CAM baseline (--method cam); scored on the test split",
        ),
    )
    for name, cls, text in jobs:
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        add_arguments(p, cls)
        if name == "finetune":
            p.add_argument(
                "--folds",
                type=int,
                help="fan out folds 0..K-1 as one SLURM array (instead of --fold)",
            )
            p.add_argument("--models", help="comma-separated models, or 'all' (instead of --model)")
            p.add_argument(
                "--variants",
                help="bt, scratch or bt,scratch (default: bt with --pretrained, else scratch); "
                "bt without --pretrained uses <out>/pretrain/<model>/encoder.pt",
            )
        launch = p.add_argument_group(
            "where and with what resources (SLURM, local processes or in-process)"
        )
        add_arguments(launch, LaunchConfig, skip=("logs",), with_config=False)
        p.set_defaults(func=_run_job, job=name, config_class=cls)

    from hpc_btunet.experiment import add_experiment_arguments
    from hpc_btunet.report import ReportConfig
    from hpc_btunet.status import add_status_arguments

    text = (
        "the whole study on a cluster (or this machine): per model one pre-training job, one "
        "array of folds x {bt, scratch} fine-tuning tasks (bt after its pre-training), and a "
        "report after all of them"
    )
    p = sub.add_parser("experiment", help=text, description=text, formatter_class=_Formatter)
    add_experiment_arguments(p)
    p.set_defaults(func=_run_experiment)

    text = "an experiment's stages and tasks: pending, running, done, failed, requeued"
    p = sub.add_parser("status", help=text, description=text, formatter_class=_Formatter)
    add_status_arguments(p)
    p.set_defaults(func=_run_status)

    text = (
        "Table 2 (model x BT: Pr, DC, IoU), Fig. 4 (change with BT), Fig. 5 (predictions), "
        "paired statistics and report.md from an experiment's results"
    )
    p = sub.add_parser("report", help=text, description=text, formatter_class=_Formatter)
    add_arguments(p, ReportConfig)
    p.set_defaults(func=_run_report)

    text = "the whole method on this machine: pack the built-in dataset, pre-train, fine-tune every fold with and without BT, report"
    p = sub.add_parser("demo", help=text, description=text, formatter_class=_Formatter)
    add_arguments(p, DemoConfig)
    p.set_defaults(func=_run_demo)


def _finetune_tasks(cfg, args, wait_for_pretrain: bool) -> list:
    """The (model, variant, fold) tasks of a finetune command, checked before anything is submitted."""
    import dataclasses

    from hpc_btunet.data import load_manifest
    from hpc_btunet.models import list_models

    models = [cfg.model]
    if args.models:
        models = (
            list_models() if args.models == "all" else [m.strip() for m in args.models.split(",")]
        )
        unknown = [m for m in models if m not in list_models()]
        if unknown:
            raise UserError(
                f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(list_models())} or 'all'"
            )
    variants = (args.variants or ("bt" if cfg.pretrained else "scratch")).split(",")
    if not set(variants) <= {"bt", "scratch"}:
        raise UserError(f"--variants {args.variants!r}: use bt, scratch or bt,scratch")
    n_folds = len(load_manifest(cfg.data).folds)
    folds = range(args.folds) if args.folds is not None else [cfg.fold]
    if args.folds is not None and not 1 <= args.folds <= n_folds:
        raise UserError(
            f"--folds {args.folds}: {cfg.data} has {n_folds} folds; ask for 1 to {n_folds}"
        )
    tasks = []
    for model in models:
        for variant in variants:
            pretrained = None
            if variant == "bt":
                pretrained = (
                    cfg.pretrained
                    if cfg.pretrained and len(models) == 1
                    else (Path(cfg.out) / "pretrain" / model / "encoder.pt")
                )
                if not Path(pretrained).exists() and not wait_for_pretrain:
                    raise UserError(
                        f"{pretrained} does not exist: run `hpc-btunet pretrain --model {model}` first, "
                        "or pass --after <pretrain job id> to wait for it"
                    )
            for fold in folds:
                tasks.append(
                    dataclasses.replace(cfg, model=model, fold=fold, pretrained=pretrained)
                )
    return tasks


def _run_job(args) -> int:
    from hpc_btunet.config import resolve
    from hpc_btunet.launch import LaunchConfig, submit
    from hpc_btunet.train import contrastive, finetune, pretrain

    cfg = resolve(args.config_class, args, others=(LaunchConfig,))
    launch = resolve(LaunchConfig, args, others=(args.config_class,), logs=Path(cfg.out) / "logs")
    if args.job == "pretrain":
        tasks, fn = [cfg], pretrain.run
    elif args.job == "contrastive":
        tasks, fn = [cfg], contrastive.run
    else:
        tasks, fn = _finetune_tasks(cfg, args, wait_for_pretrain=bool(launch.after)), finetune.run
    for task in tasks:
        task.preflight(launch.world_size, launch.device_type)
    submit(launch, args.job, fn, tasks, [t.label() for t in tasks])
    return 0


def _run_report(args) -> int:
    from hpc_btunet.config import resolve
    from hpc_btunet.report import ReportConfig, run

    report = run(resolve(ReportConfig, args))
    print((report.parent / "table.md").read_text())
    print(f"written: {report} (table, figures, statistics, provenance) and the files beside it")
    return 0


def _run_experiment(args) -> int:
    from hpc_btunet.experiment import run_experiment

    return run_experiment(args)


def _run_status(args) -> int:
    from hpc_btunet.status import run_status

    return run_status(args)


def _run_demo(args) -> int:
    from hpc_btunet.config import resolve
    from hpc_btunet.pipeline import DemoConfig, demo

    demo(resolve(DemoConfig, args))
    return 0


_DATA_COMMANDS = ("pack", "verify")  # need no torch: their parser is built without the job commands


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-btunet",
        description="Barlow Twins pre-training and U-Net fine-tuning for biomedical segmentation, on SLURM or locally.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hpc_btunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pack(sub)
    _add_verify(sub)
    if (
        command not in _DATA_COMMANDS
    ):  # the job commands' options come from configs that import torch
        _add_jobs(sub)
    return parser


def _stopped(command: str, why: str, code: int) -> int:
    stopped = stop_descendants()
    what = f"; stopped {len(stopped)} process(es) it had started" if stopped else ""
    print(
        f"hpc-btunet {command}: {why}{what}. Rerun the same command to resume.",
        file=sys.stderr,
    )
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        with terminating_signals_interrupt():
            return args.func(args)
    except KeyboardInterrupt:
        return _stopped(args.command, "interrupted", 130)
    except Interrupted as e:
        return _stopped(args.command, f"terminated by {e}", 128 + e.signum)
    except Exception as e:
        user = as_user_error(e)
        if user is None:
            raise
        print(f"hpc-btunet {args.command}: error: {user}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
