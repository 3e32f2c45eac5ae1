"""Packing a BraTS-like tree: seconds per subject and peak memory, with 1 and 2 workers.

    python bench/pack_volumes.py --subjects 30 --workers 1,2

Writes (once, kept in ``--tree``) a BraTS 2018 tree of phantom subjects of the real shape
240 x 240 x 155 (four int16 modalities and a label map per subject, gzip-compressed as BraTS ships
them; ``hpc_btunet.data.phantoms``), then runs ``python -m hpc_btunet.submit pack --source brats``
on it once per worker count (and per ``--modality``), each into a fresh folder, and prints a table:
wall time, seconds per subject, slices packed and the peak resident memory of the pack's process
(sampled every 50 ms). The page cache is warmed by reading the tree before the first run.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from hpc_btunet.data.phantoms import BRATS_SHAPE, write_brats_tree


def _peak_rss(proc: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss
            rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            break
        peak[0] = max(peak[0], rss)
        time.sleep(0.05)


def run_pack(tree: Path, out: Path, workers: int, modality: str, image_size: int) -> dict:
    cmd = [
        sys.executable, "-m", "hpc_btunet.submit", "pack", "--source", "brats", "--root",
        str(tree), "--out", str(out), "--workers", str(workers), "--modality", modality,
        "--image-size", str(image_size), "--labelled-fraction", "0.5", "--folds", "5",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=_peak_rss, args=(psutil.Process(proc.pid), stop, peak))
    watcher.start()
    stdout, stderr = proc.communicate()
    stop.set()
    watcher.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"pack failed:\n{stderr}")
    slices = int(stdout.split()[1])
    return {"wall": wall, "peak": peak[0], "slices": slices}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subjects", type=int, default=30)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--modality", action="append", help="repeatable; default: flair")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "bench-brats")
    args = p.parse_args()
    modalities = args.modality or ["flair"]

    marker = args.tree / f".complete-{args.subjects}"
    if not marker.exists():
        shutil.rmtree(args.tree, ignore_errors=True)
        t = time.perf_counter()
        write_brats_tree(args.tree, subjects=args.subjects, shape=BRATS_SHAPE, seed=0, healthy=0)
        marker.touch()
        print(f"wrote {args.subjects} subjects of {BRATS_SHAPE} in {time.perf_counter() - t:.0f} s")
    size = sum(f.stat().st_size for f in args.tree.rglob("*.nii.gz"))
    for f in args.tree.rglob("*.nii.gz"):
        f.read_bytes()  # warm the page cache
    print(
        f"tree: {args.tree} ({args.subjects} subjects, {size / 2**20:.0f} MiB); "
        f"{_cpu()}, {psutil.cpu_count()} cores, "
        f"image size {args.image_size}"
    )
    print("| modality | workers | wall s | s / subject | slices | peak memory |")
    print("|---|---|---|---|---|---|")
    for modality in modalities:
        for workers in [int(w) for w in args.workers.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                r = run_pack(args.tree, Path(tmp) / "out", workers, modality, args.image_size)
            print(
                f"| {modality} | {workers} | {r['wall']:.1f} | {r['wall'] / args.subjects:.2f} | "
                f"{r['slices']} | {r['peak'] / 2**20:.0f} MiB |"
            )


if __name__ == "__main__":
    main()
