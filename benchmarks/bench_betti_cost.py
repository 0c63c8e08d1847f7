"""CPU cost per training step of the Betti prior loss at nnU-Net's planned patch sizes (a script, not a test).

The persistence of ``BettiPriorLoss`` runs on the CPU whatever the device of the network, so this cost is what a
GPU step waits for. For each patch (batch 2, 4 channels, 3 foreground classes as in cardiac data) the script times
forward + backward of the loss on a smooth random softmax (realistic numbers of local extrema) at several
downsampling factors and persistence thread counts, and prints the factor the trainer picks by default
(``betti_downsample_for_patch``: the smallest factor whose pooled map has at most ``max_voxels`` voxels).

Usage::

    python benchmarks/bench_betti_cost.py                     # ACDC-like and CT-like nnU-Net patches
    python benchmarks/bench_betti_cost.py --patches 10,256,224 128,128,128 --factors 1 2 3 4 --threads 1 2
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from nnunet_topo.losses.betti import BettiPriorLoss, betti_downsample_for_patch

#: nnU-Net 3d_fullres patches: ACDC cine MRI (10 x 1.5 x 1.5 mm, measured in issue 11), a typical CT patch, the
#: synthetic demo patch
DEFAULT_PATCHES = ["10,256,224", "128,128,128", "10,64,64"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", nargs="+", default=DEFAULT_PATCHES, help="Z,Y,X patch sizes")
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"{'patch':>16}{'factor':>8}{'pooled voxels':>15}{'threads':>9}{'ms fwd+bwd (median)':>22}")
    for text in args.patches:
        patch = tuple(int(v) for v in text.split(","))
        auto = betti_downsample_for_patch(patch)
        field = torch.nn.functional.avg_pool3d(torch.randn(args.batch, 4, *patch), 5, 1, 2)
        labels = field.argmax(1, keepdim=True).float()
        logits = (field * 40).requires_grad_(True)
        for f in sorted(set(args.factors) | {auto}):
            pooled = 1
            for n in patch:
                pooled *= -(-n // f)
            for threads in args.threads:
                loss = BettiPriorLoss([1, 2, 3], target="patch", downsample=f, num_workers=threads)
                times = []
                for i in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    loss(logits, labels).backward()
                    if i:
                        times.append((time.perf_counter() - t0) * 1000)
                mark = "  <- trainer default" if f == auto else ""
                print(f"{text:>16}{f:>8}{pooled:>15}{threads:>9}{statistics.median(times):>22.1f}{mark}")


if __name__ == "__main__":
    main()
