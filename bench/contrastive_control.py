"""A positive control for the contrastive UNet++ pair: lesions nobody could miss.

    python bench/contrastive_control.py [--steps 300] [--seeds 0,1,2]

Normal images are smooth noise; abnormal ones add one to three bright discs (radius 2-6 px,
+0.4 over the background). If the pair's step (``pair_loss``: the pairs, the targets, Eq. 1)
learns lesions anywhere, it is here; if it does not, the failure on the harder lesion data says
nothing about the data. Trains the pair in this process with the job's defaults (``PairTargets``,
``DistortionConfig``) and prints, on 64 fresh abnormal images, the pixel AUROC of the mean
probability (lesion pixels against the others), its mean on lesion and other pixels, and Dice at
0.5, and the same for the CAM baseline (``CamClassifier`` on the same encoder, trained with
binary cross-entropy on the same images; its map over its maximum, thresholded at 0.5).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from hpc_btunet.models import build_model
from hpc_btunet.ssl.contrastive import DistortionConfig, plan_pairs
from hpc_btunet.train.contrastive import CamClassifier, cam_scores
from hpc_btunet.train.contrastive_step import ContrastivePair, PairTargets, pair_loss
from hpc_btunet.train.metrics import ScoreSeparation, SegmentationMetrics


def make_images(n: int, size: int, generator: torch.Generator) -> tuple:
    """``n`` images (half abnormal, alternating), their labels and lesion masks."""
    noise = torch.rand(n, 1, size // 4, size // 4, generator=generator)
    images = 0.3 + 0.2 * F.interpolate(noise, size=(size, size), mode="bilinear")
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    abnormal = torch.arange(n) % 2 == 0
    for i in torch.nonzero(abnormal).flatten().tolist():
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            r = 2 + 4 * torch.rand(1, generator=generator).item()
            cy, cx = (r + (size - 2 * r) * torch.rand(2, generator=generator)).tolist()
            masks[i, 0] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    images = images + 0.4 * masks
    return images, abnormal, masks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    rows: dict[str, list] = {"pair": [], "cam": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in ("pair", "cam"):
            start = time.perf_counter()
            torch.manual_seed(seed)
            nets = [build_model("unet_plus_plus", base_width=8, depth=3) for _ in range(2)]
            model = ContrastivePair(*nets) if method == "pair" else CamClassifier(nets[0].encoder)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(1000 + seed)  # the same images for both methods
            for step in range(args.steps):
                x, abnormal, _ = make_images(args.batch_size, args.size, g)
                if method == "pair":
                    plan = plan_pairs(abnormal, seed=seed, step=step)
                    total, count, _ = pair_loss(
                        model, x, plan, torch.arange(len(plan)), distortion=DistortionConfig(),
                        targets=PairTargets(), seed=seed, step=step,
                    )  # fmt: skip
                    loss = total / count
                else:
                    loss = F.binary_cross_entropy_with_logits(model(x), abnormal.float())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            x, abnormal, masks = make_images(128, args.size, torch.Generator().manual_seed(7))
            score = model.predict(x) if method == "pair" else cam_scores(*model.cam(x))
            separation, metrics = ScoreSeparation(), SegmentationMetrics()
            separation.update(score[abnormal], masks[abnormal])
            metrics.update(score[abnormal], masks[abnormal])
            s, dice = separation.compute(), metrics.compute()["mean"]["dice"]
            normal = float(score[~abnormal].mean())
            rows[method].append([s["auroc"], s["lesion_mean"], s["other_mean"], normal, dice])
            print(
                f"seed {seed} {method}: AUROC {s['auroc']:.3f}, lesion {s['lesion_mean']:.3f}, "
                f"other {s['other_mean']:.3f}, normal images {normal:.3f}, Dice {dice:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    names = ("AUROC", "lesion", "other", "normal images", "Dice")
    for method, values in rows.items():
        values = np.array(values)
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(names))
        cells = (
            f"{n} {m:.3f} ± {d:.3f}" for n, m, d in zip(names, values.mean(0), std, strict=True)
        )
        print(f"{method}, mean ± std over seeds: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
