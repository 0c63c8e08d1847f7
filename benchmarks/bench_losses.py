"""Forward+backward time of the topology loss terms against patch size (a script, not a test).

Times each term alone on random logits/labels of nnU-Net-like batch shapes (B=2, C=4), on the CPU or CUDA:
the extra cost a topology trainer adds to one training iteration, without the noise of a whole train_step.

Usage::

    python benchmarks/bench_losses.py [--device cpu|cuda] [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from nnunet_topo.losses.betti import BettiPriorLoss
from nnunet_topo.losses.projected_pooling import ProjectedPoolingLoss

SHAPES = [(12, 64, 64), (48, 96, 96), (64, 128, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dev = torch.device(args.device)
    terms = {"projpool": ProjectedPoolingLoss(),
             "betti(ds=2)": BettiPriorLoss([1, 2, 3], target="patch", downsample=2),
             "betti(ds=1)": BettiPriorLoss([1, 2, 3], target="patch", downsample=1)}
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"{platform.machine()} ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'term':<12}{'patch':>18}{'ms fwd+bwd (median)':>22}")
    for tname, loss in terms.items():
        for shape in SHAPES:
            x = torch.randn(2, 4, *shape, device=dev, requires_grad=True)
            # a smooth random label map (blobs), so that the Betti targets are realistic, not salt-and-pepper
            field = torch.nn.functional.avg_pool3d(torch.randn(2, 4, *shape, device=dev), 5, 1, 2)
            t = field.argmax(1, keepdim=True).float()
            times = []
            reps = args.repeats if tname == "projpool" else max(2, args.repeats // 5)
            for i in range(reps + 2):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss(x, t).backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1000)
            print(f"{tname:<12}{str(shape):>18}{statistics.median(times):>22.2f}")


if __name__ == "__main__":
    main()
