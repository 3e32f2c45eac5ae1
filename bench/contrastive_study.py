"""The contrastive UNet++ pair against its baselines on the built-in lesion data, over seeds.

    python bench/contrastive_study.py --out experiments/contrastive-study [--seeds 0,1,2]

Packs the synthetic lesion dataset once (``pack --source synthetic --task lesion``), then per
seed trains the pair (``contrastive --method pair``) and the CAM baseline (``--method cam``) with
the same options and the same labels, and prints Dice, precision and IoU on the test split's
abnormal images (and on all test images) as mean +- sample std over the seeds, beside the organ
mask and the whole image as predictions. The seed changes the weights, the data order and the
distortions; the dataset stays the same. Every run is an ordinary job folder: rerunning the
script skips what is complete. Writes ``<out>/study.md`` and ``<out>/study.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def hpc(*args) -> None:
    command = [sys.executable, "-m", "hpc_btunet.submit", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("experiments/contrastive-study"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num-images", type=int, default=400)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-width", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--extra", default="", help="more options for both methods, one string")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = args.out / "data"
    if not (data / "manifest.json").exists():
        hpc("pack", "--source", "synthetic", "--task", "lesion", "--num-images", args.num_images,
            "--image-size", args.image_size, "--out", data, "--seed", 0)  # fmt: skip
    common = ["--data", data, "--epochs", args.epochs, "--batch-size", args.batch_size,
              "--base-width", args.base_width, "--depth", args.depth, "--executor", "local",
              "--wandb", "disabled", *args.extra.split()]  # fmt: skip
    seconds: dict[str, list[float]] = {"pair": [], "cam": []}
    results: dict[str, list[dict]] = {"pair": [], "cam": []}
    for seed in seeds:
        for method in ("pair", "cam"):
            out = args.out / f"seed-{seed}"
            hpc("contrastive", *common, "--out", out, "--method", method, "--seed", seed)
            metrics = out / "contrastive" / method / "unet_plus_plus" / "metrics.json"
            results[method].append(json.loads(metrics.read_text()))
            seconds[method].append(results[method][-1]["train_seconds"])  # over requeues

    def row(name: str, runs: list[dict], pick) -> str:
        cells = []
        for part in ("abnormal", "all"):
            for metric in ("dice", "precision", "iou"):
                values = np.array([pick(r, part)["mean"][metric] for r in runs])
                std = values.std(ddof=1) if len(values) > 1 else 0.0
                cells.append(f"{values.mean():.3f} ± {std:.3f}")
        return f"| {name} | " + " | ".join(cells) + " |"

    table = [
        "| prediction | DC abnormal | Pr abnormal | IoU abnormal | DC all | Pr all | IoU all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        row("contrastive pair", results["pair"], lambda r, p: r["test_abnormal" if p == "abnormal" else "test"]),
        row("CAM of a classifier", results["cam"], lambda r, p: r["test_abnormal" if p == "abnormal" else "test"]),
        row("organ mask", results["pair"], lambda r, p: r["baselines"]["organ"][p]),
        row("whole image", results["pair"], lambda r, p: r["baselines"]["whole_image"][p]),
    ]  # fmt: skip

    def mean_std(values) -> str:
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        if np.isnan(values).all():
            return "n/a"
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{values.mean():.3f} ± {std:.3f}"

    def separation(name: str, runs: list[dict]) -> str:
        scores = [r["scores"] for r in runs]
        cells = [mean_std(s["auroc"] for s in scores)]
        cells.append(mean_std(s.get("organ", {}).get("auroc") for s in scores))
        cells += [mean_std(s[k] for s in scores) for k in ("lesion_mean", "other_mean")]
        cells.append(mean_std(s["normal_mean"] for s in scores))
        return f"| {name} | " + " | ".join(cells) + " |"

    organ_auroc = mean_std(r["baselines"].get("organ", {}).get("auroc") for r in results["pair"])
    maps = [
        "| map before its threshold | pixel AUROC | AUROC in the organ | lesion pixels | "
        "other pixels | normal images |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        separation("contrastive pair (probability)", results["pair"]),
        separation("CAM (map / its maximum)", results["cam"]),
        f"| organ mask (0 or 1) | {organ_auroc} | 0.500 (constant) | | | |",
    ]
    images = results["pair"][0]["test_images"]
    text = "\n".join(
        [
            f"Seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds of each run's "
            f"per-image mean; test split: {images['all']} images, {images['abnormal']} abnormal.",
            "",
            *table,
            "",
            "Abnormal test images: how each map ranks lesion pixels against the other pixels "
            "(AUROC, 0.5 = no location), over the whole image and inside the organ (where the "
            "lesions are), and its mean value on lesion pixels, on the other pixels, and on "
            "normal test images.",
            "",
            *maps,
            "",
            "Training time per run (train_seconds, summed over resumes): pair "
            + ", ".join(f"{s:.0f} s" for s in seconds["pair"])
            + "; CAM "
            + ", ".join(f"{s:.0f} s" for s in seconds["cam"]),
        ]
    )
    (args.out / "study.md").write_text(text + "\n")
    (args.out / "study.json").write_text(json.dumps({"results": results, "seconds": seconds}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
