"""Loader throughput: loose PNG files, our loader, the stock WebDataset pipeline, the decode bound.

    python bench/loader.py --num-images 2048 --workers 2 --batch-size 32

Reads the same synthetic images (image + mask per sample, 256x256 grayscale) five ways, in one
run, and prints samples/s as a table:

  (a) loose PNG files, a plain torch ``Dataset`` + ``DataLoader`` (Pillow, as such code does)
  (b) shards with PNG members, ``hpc_btunet.data.make_loader``
  (c) shards of the fastest encoding (raw uint8 arrays, ``--encoding npy``), ``make_loader``
  (d) the stock ``webdataset.WebDataset`` pipeline on the shards of (b): shard shuffle, sample
      shuffle (buffer 1000), ``decode("l8")``, ``to_tuple``, ``batched``, in a ``WebLoader``
  (e) the decode bound: the loader's PNG decoder in one loop over the samples' bytes in memory,
      one process, times the number of workers

Every loader uses the same batch size and number of workers; each is run for ``--epochs`` epochs
after one warm-up epoch (page cache warm for all), and the best epoch is reported. The goals of
this project on its 2-core machine: (b) >= 1.5 x (d) and >= 0.8 x (e), (c) >= 3 x (a).

    python bench/loader.py --decoders

measures PNG decoders (Pillow and, where installed, pyspng, OpenCV, imagecodecs) and compressed
raw encodings (zstd, with and without PNG's "up" filter, where ``zstandard`` is installed) on the
same images: bytes per sample and samples/s of one loop, one process.

    python bench/loader.py --compare-order --num-images 2048 --workers 2 --batch-size 32

compares instead this tree's ``make_loader`` with the one at git revision ``--ref``, loaded from
``git show REF:hpc_btunet/data/loader.py`` at run time (it imports the rest of the package from
this tree). Same shards, batch size and workers; rank 0 of 1 (reads every sample) and rank 0 of
4 (reads a quarter), each epoch a new ``set_epoch``.

This is a benchmark, not a test: numbers depend on the machine; record them with the machine
named (the table's heading names it), and time it alone.
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
from hpc_btunet.data.codec import decode_array
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


def stock_webdataset(root: Path, batch_size: int, workers: int):
    """(d): WebDataset's own pipeline over the shards of ``root``, as its documentation builds it
    (shard and sample shuffle, decode to uint8 grayscale arrays, tuples, batches)."""
    import webdataset as wds

    urls = [str(u) for u in sorted(root.glob("train-*.tar"))]
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
        .shuffle(1000)
        .decode("l8")
        .to_tuple("image.png", "mask.png")
        .batched(batch_size)
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)

    def batches():
        for image, mask in loader:
            yield {"image": image, "mask": mask}

    return batches


def sample_images(source: SyntheticSource, keys: set[str], size: int) -> dict[str, tuple]:
    """Key -> (image, mask as 0/255) arrays of the samples ``keys``."""
    out = {}
    for e in source.entries():
        if e.key in keys:
            s = source.load(e, size)
            out[e.key] = (s.image, (s.mask * 255).astype(np.uint8))
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def best_loop_rate(decode, payloads: list[tuple], epochs: int) -> float:
    """Samples/s of decoding every (image, mask) payload pair in one loop, best of ``epochs``."""
    for pair in payloads[:8]:
        decode(pair[0])
    best = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        for image, mask in payloads:
            decode(image)
            decode(mask)
        best = max(best, len(payloads) / (time.perf_counter() - start))
    return best


def decoders(args) -> None:
    """PNG decoders and compressed raw encodings: bytes per sample and samples/s, one loop."""
    source = SyntheticSource(num_images=args.num_images, seed=0)
    arrays = list(
        sample_images(source, {e.key for e in source.entries()}, args.image_size).values()
    )
    pngs = [(png_bytes(a), png_bytes(b)) for a, b in arrays]
    rows = {"Pillow (PNG)": ("png", lambda d: np.asarray(Image.open(io.BytesIO(d))))}
    optional = {
        "pyspng (PNG, the loader's)": ("pyspng", "png", lambda m: lambda d: m.load(d)),
        "OpenCV headless (PNG)": (
            "cv2",
            "png",
            lambda m: lambda d: m.imdecode(np.frombuffer(d, np.uint8), m.IMREAD_UNCHANGED),
        ),
        "imagecodecs (PNG)": ("imagecodecs", "png", lambda m: lambda d: m.png_decode(d)),
    }
    missing = []
    for label, (module, enc, make) in optional.items():
        try:
            rows[label] = (enc, make(__import__(module)))
        except ImportError:
            missing.append(module)
    encoded = {"png": pngs}
    try:
        import zstandard

        size = args.image_size
        level = zstandard.ZstdCompressor(level=3)
        plain = zstandard.ZstdDecompressor()
        encoded["zstd"] = [
            (level.compress(a.tobytes()), level.compress(b.tobytes())) for a, b in arrays
        ]

        def up(a):  # PNG's "up" filter: each row minus the one above, mod 256
            d = a.copy()
            d[1:] -= a[:-1]
            return d

        encoded["zstd-up"] = [
            (level.compress(up(a).tobytes()), level.compress(up(b).tobytes())) for a, b in arrays
        ]
        rows["raw + zstd 3"] = (
            "zstd",
            lambda d: np.frombuffer(plain.decompress(d), np.uint8).reshape(size, size),
        )
        rows["raw, up filter + zstd 3"] = (
            "zstd-up",
            lambda d: np.cumsum(
                np.frombuffer(plain.decompress(d), np.uint8).reshape(size, size), 0, np.uint8
            ),
        )
    except ImportError:
        missing.append("zstandard")
    raw = 2 * args.image_size**2
    print(
        f"\nDecoders, {len(arrays)} samples (image + mask) of {args.image_size}x{args.image_size} "
        f"grayscale, one loop in one process, best of {args.epochs}, {machine()}"
        + (f"; not installed: {', '.join(missing)}" if missing else "")
        + "\n"
    )
    print("| decoder | KiB per sample | samples/s |")
    print("| --- | ---: | ---: |")
    print(f"| raw uint8 (npy) | {raw / 1024:.1f} | |")
    for label, (enc, decode) in rows.items():
        kib = sum(len(a) + len(b) for a, b in encoded[enc]) / len(arrays) / 1024
        rate = best_loop_rate(decode, encoded[enc], args.epochs)
        print(f"| {label} | {kib:.1f} | {rate:,.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument(
        "--compare-order",
        action="store_true",
        help="compare this tree's loader with the one at --ref instead (same shards)",
    )
    p.add_argument("--ref", default="8ea8828", help="git revision of the previous loader")
    p.add_argument("--decoders", action="store_true", help="compare decoders and encodings")
    args = p.parse_args()
    if args.decoders:
        decoders(args)
        return 0

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

        train = set(m.splits["train"])
        arrays = sample_images(source, train, args.image_size)
        loose = tmp / "loose"
        (loose / "images").mkdir(parents=True)
        (loose / "masks").mkdir()
        pngs = []
        for key, (image, mask) in arrays.items():
            pair = png_bytes(image), png_bytes(mask)
            (loose / "images" / f"{key}.png").write_bytes(pair[0])
            (loose / "masks" / f"{key}.png").write_bytes(pair[1])
            pngs.append(pair)
        n = len(train)

        w, b = args.workers, args.batch_size
        loose_loader = DataLoader(
            LoosePngDataset(loose),
            batch_size=b,
            shuffle=True,
            num_workers=w,
            drop_last=True,
            persistent_workers=w > 0,
        )
        rates = {
            "(a) loose PNG files, torch Dataset": best_rate(lambda: loose_loader, n, args.epochs)
        }
        for enc, label in (
            ("png", "(b) our loader, PNG shards"),
            ("npy", "(c) our loader, raw uint8 shards (npy)"),
        ):
            loader = make_loader(tmp / enc, "train", batch_size=b, num_workers=w, seed=0)
            rates[label] = best_rate(lambda loader=loader: loader, n, args.epochs)
        rates["(d) stock WebDataset pipeline, PNG shards"] = best_rate(
            stock_webdataset(tmp / "png", b, w), n, args.epochs
        )
        rate_e = best_loop_rate(lambda d: decode_array(d, "png"), pngs, args.epochs)
        rates[f"(e) decode bound: one loop x {w} workers"] = rate_e * max(w, 1)

    print(
        f"\nLoader throughput, {n} samples (image + mask) of {args.image_size}x{args.image_size} "
        f"grayscale, batch {b}, {w} worker(s), {machine()}, best of {args.epochs} epochs after "
        "a warm-up\n"
    )
    print("| loader | samples/s | vs (a) |")
    print("| --- | ---: | ---: |")
    base = rates["(a) loose PNG files, torch Dataset"]
    for label, r in rates.items():
        print(f"| {label} | {r:,.0f} | {r / base:.2f}x |")
    a, b_, c, d, e = rates.values()
    print(
        f"\n(b) = {b_ / d:.2f} x (d) (goal >= 1.5), {b_ / e:.2f} x (e) (goal >= 0.8); "
        f"(c) = {c / a:.2f} x (a) (goal >= 3)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
