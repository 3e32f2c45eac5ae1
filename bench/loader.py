"""Loader throughput: loose PNG files vs shards (PNG, raw arrays) vs decoding alone.

    python bench/loader.py --num-images 1024 --workers 2 --batch-size 32

Reads the same synthetic images (image + mask per sample) four ways and prints samples/s:

  (a) loose PNG files, a plain torch ``Dataset`` + ``DataLoader`` (one file open per image/mask)
  (b) shards with PNG members, ``hpc_btunet.data.make_loader``
  (c) shards with raw uint8 arrays (``--encoding npy``), ``make_loader``
  (d) PNG decoding alone, in-memory bytes, one loop in one process (the bound for (a) and (b)
      per worker; the last column scales it by the number of workers)

Every loader uses the same batch size and number of workers; each is run for ``--epochs`` epochs
after one warm-up epoch (page cache warm for all), and the best epoch is reported. This is a
benchmark, not a test: numbers depend on the machine; record them with the machine named.

    python bench/loader.py --compare-order --num-images 2048 --workers 2 --batch-size 32

compares instead this tree's ``make_loader`` (global order, window shuffle, workers striding
over batches) with the one at git revision ``--ref`` (contiguous blocks per rank and worker, a
shuffle buffer per worker), loaded from ``git show REF:hpc_btunet/data/loader.py`` at run time
(it imports the rest of the package from this tree). Same shards, batch size and workers; rank 0
of 1 (reads every sample) and rank 0 of 4 (reads a quarter), each epoch a new ``set_epoch``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hpc_btunet.data import loader as current_loader
from hpc_btunet.data import make_loader
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.data.synthetic import SyntheticSource


class LoosePngDataset(Dataset):
    def __init__(self, root: Path) -> None:
        self.images = sorted((root / "images").glob("*.png"))
        self.masks = root / "masks"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        path = self.images[i]
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(self.masks / path.name)) > 0
        return {
            "image": torch.from_numpy(image[None].copy()),
            "mask": torch.from_numpy(mask[None].astype(np.uint8)),
        }


def best_rate(make_iter, n_samples: int, epochs: int) -> float:
    for _ in make_iter():  # warm-up epoch: page cache, worker start-up paths
        pass
    best = 0.0
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for batch in make_iter():
            seen += len(batch["image"])
        best = max(best, seen / (time.perf_counter() - start))
    assert seen >= n_samples * 0.9, (seen, n_samples)
    return best


def machine() -> str:
    """CPU model and core count, for the line that names where numbers were taken."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def loader_at(ref: str) -> types.ModuleType:
    """``hpc_btunet/data/loader.py`` as it was at git revision ``ref``, as a module object."""
    repo = Path(__file__).resolve().parents[1]
    path = "hpc_btunet/data/loader.py"
    done = subprocess.run(
        ["git", "-C", str(repo), "show", f"{ref}:{path}"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"cannot read {path} at --ref {ref}: {done.stderr.strip()}")
    name = f"_loader_at_{ref}"
    module = types.ModuleType(name)
    module.__file__ = f"{ref}:{path}"
    sys.modules[name] = module  # dataclasses and forked workers look the module up by name
    exec(compile(done.stdout, module.__file__, "exec"), module.__dict__)
    return module


def compare_order(args, packed: dict[str, Path]) -> None:
    """Samples/s of the loader at ``args.ref`` and of this tree's, on the same shards."""
    previous = loader_at(args.ref)
    w, b = args.workers, args.batch_size
    rows = []
    for enc, root in packed.items():
        for world_size in (1, 4):
            rates = []
            for impl in (previous, current_loader):
                loader = impl.make_loader(
                    root, "train", batch_size=b, num_workers=w, rank=0, world_size=world_size
                )
                epochs = itertools.count()

                def one_epoch(loader=loader, epochs=epochs):
                    loader.dataset.set_epoch(next(epochs))
                    return loader

                rates.append(best_rate(one_epoch, len(loader) * b, args.epochs))
            rows.append((enc, world_size, len(loader) * b, *rates))
    print(
        f"\nLoader order, {args.ref} vs this tree: {args.num_images} images "
        f"({args.image_size}x{args.image_size} grayscale + mask, shards of {args.shard_size}), "
        f"batch {b}, {w} worker(s), {machine()}, best of {args.epochs} epochs after a warm-up\n"
    )
    print(
        f"| shards | reads | samples/epoch | {args.ref} samples/s | this tree samples/s | ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for enc, world_size, n, old, new in rows:
        print(
            f"| {enc} | rank 0 of {world_size} | {n:,} | {old:,.0f} | {new:,.0f} "
            f"| {new / old:.2f}x |"
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument(
        "--compare-order",
        action="store_true",
        help="compare this tree's loader with the one at --ref instead (same shards)",
    )
    p.add_argument("--ref", default="8ea8828", help="git revision of the previous loader")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = SyntheticSource(num_images=args.num_images, seed=0)
        split = SplitConfig(test_fraction=0.01, labelled_fraction=1.0, folds=2)
        t0 = time.perf_counter()
        for enc in ("png", "npy"):
            cfg = PackConfig(
                out=tmp / enc,
                image_size=args.image_size,
                shard_size=args.shard_size,
                encoding=enc,
                splits=split,
            )
            m = pack(source, cfg, log=lambda _: None)
        print(
            f"packed {args.num_images} images twice in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        if args.compare_order:
            compare_order(args, {enc: tmp / enc for enc in ("png", "npy")})
            return 0

        loose = tmp / "loose"
        (loose / "images").mkdir(parents=True)
        (loose / "masks").mkdir()
        pngs = []
        train = set(m.splits["train"])
        for e in source.entries():
            if e.key not in train:
                continue
            s = source.load(e, args.image_size)
            Image.fromarray(s.image).save(loose / "images" / f"{e.key}.png")
            Image.fromarray(s.mask * 255).save(loose / "masks" / f"{e.key}.png")
            pngs.append(
                (
                    (loose / "images" / f"{e.key}.png").read_bytes(),
                    (loose / "masks" / f"{e.key}.png").read_bytes(),
                )
            )
        n = len(train)

        w, b = args.workers, args.batch_size
        loose_loader = DataLoader(
            LoosePngDataset(loose),
            batch_size=b,
            shuffle=True,
            num_workers=w,
            drop_last=True,
            persistent_workers=False,
        )
        rates = {
            "(a) loose PNG files, torch Dataset": best_rate(lambda: loose_loader, n, args.epochs),
        }
        for enc, label in (("png", "(b) shards, PNG"), ("npy", "(c) shards, raw uint8 arrays")):
            loader = make_loader(tmp / enc, "train", batch_size=b, num_workers=w, seed=0)
            rates[label] = best_rate(lambda loader=loader: loader, n, args.epochs)

        def decode_only():
            start = time.perf_counter()
            for img, msk in pngs:
                np.asarray(Image.open(io.BytesIO(img)))
                np.asarray(Image.open(io.BytesIO(msk)))
            return len(pngs) / (time.perf_counter() - start)

        decode_only()
        rate_d = max(decode_only() for _ in range(args.epochs))

    print(
        f"\nLoader throughput, {n} samples (image + mask) of {args.image_size}x{args.image_size} "
        f"grayscale, batch {b}, {w} worker(s), {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, best of {args.epochs} epochs\n"
    )
    print("| loader | samples/s | vs (a) |")
    print("| --- | ---: | ---: |")
    base = rates["(a) loose PNG files, torch Dataset"]
    for label, r in rates.items():
        print(f"| {label} | {r:,.0f} | {r / base:.2f}x |")
    print(f"| (d) PNG decoding alone, one loop, 1 process | {rate_d:,.0f} | {rate_d / base:.2f}x |")
    print(
        f"| (d) x {w} workers (ideal bound for (a), (b)) | {rate_d * w:,.0f} | {rate_d * w / base:.2f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
