"""Draws docs/figures/lesion-samples.png: slices of ``pack --source synthetic --task lesion``
(seed 0, 256 x 256; the first four abnormal ones and the first two normal ones), each as packed
and with its stored organ and lesion masks as contours.

Run from the repository root: ``python docs/figures/lesion_samples.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

from hpc_btunet.data.lesions import LesionSource  # noqa: E402

ORGAN, LESION = "#56B4E9", "#E69F00"  # colour-blind-safe (Okabe-Ito) sky blue and orange
OUT = Path(__file__).with_name("lesion-samples.png")


def main(out: Path = OUT) -> None:
    source = LesionSource(20, seed=0)
    entries = source.entries()
    chosen = [e for e in entries if e.label == "abnormal"][:4]
    chosen += [e for e in entries if e.label == "normal"][:2]
    fig, axes = plt.subplots(2, len(chosen), figsize=(2.3 * len(chosen), 5.2))
    for column, entry in enumerate(chosen):
        sample = source.load(entry, 256)
        for row in (0, 1):
            ax = axes[row, column]
            ax.imshow(sample.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_axis_off()
        axes[1, column].contour(sample.organ, levels=[0.5], colors=ORGAN, linewidths=1.1)
        if sample.mask.any():
            axes[1, column].contour(sample.mask, levels=[0.5], colors=LESION, linewidths=1.1)
        axes[0, column].set_title(f"{entry.key}\n{entry.label}", fontsize=9)
    handles = [Line2D([], [], color=c, label=n) for c, n in ((ORGAN, "organ"), (LESION, "lesion"))]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("pack --source synthetic --task lesion: as packed (top) and its masks (bottom)")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.07, top=0.86, wspace=0.04, hspace=0.04)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90)
    plt.close(fig)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.open(buffer).convert("RGB").save(tmp, "PNG", optimize=True)  # no alpha: smaller
    tmp.replace(out)


if __name__ == "__main__":
    main()
