"""Parameter counts and forward FLOPs of every registered model at 1 x C x 256 x 256.

    python bench/models.py [--size 256] [--channels 1]

Prints a Markdown table (recorded in docs/models.md). FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs; convolutions,
matrix products and their relatives are counted, element-wise operations are not).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from hpc_btunet.models import build_model, list_models


def count(name: str, size: int, channels: int) -> tuple[int, int, float]:
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels).eval()
    params = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, channels, size, size))
    return params, encoder, counter.get_total_flops() / 1e9


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--channels", type=int, default=1)
    args = p.parse_args()
    print(
        f"| model | parameters | encoder parameters | GFLOPs (1x{args.channels}x{args.size}x{args.size}, forward) |"
    )
    print("| --- | ---: | ---: | ---: |")
    for name in list_models():
        params, encoder, gflops = count(name, args.size, args.channels)
        print(f"| `{name}` | {params:,} | {encoder:,} | {gflops:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
