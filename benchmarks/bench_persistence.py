"""Benchmark of super-level cubical persistence and the Betti prior loss (a script, not a test).

1. Persistence of one class map (``persistence_diagrams``, cripser T-construction + gather) on
   random smooth fields of 64^3, 96^3 and 128^3 voxels.
2. ``BettiPriorLoss`` forward + backward on a ``(2, 4, 64, 64, 64)`` batch of logits (3 foreground
   classes, "patch" targets from a synthetic label map), with ``downsample`` 1 and 2, computed
   serially, in a thread pool and in a process pool.

It also measures how much parallel CPU capacity the machine really has (two busy pure-Python
processes versus one), because a virtual machine's vCPU count can overstate it.

Usage::

    python benchmarks/bench_persistence.py [--repeats 3] [--sizes 64 96 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from scipy import ndimage

from nnunet_topo.losses.betti import BettiPriorLoss
from nnunet_topo.persistence import _PROCESS_POOLS, persistence_diagrams


def smooth_field(shape, seed, sigma=2.0):
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return (a - a.min()) / (a.max() - a.min())


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _spin(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t


def parallel_capacity(workers: int) -> float:
    """Speed-up of ``workers`` busy processes over one (1.0 = no real parallelism)."""
    n = 5_000_000
    one = _spin(n)
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_spin, [1000] * workers))  # start the workers
        t = time.perf_counter()
        list(ex.map(_spin, [n] * workers))
        many = time.perf_counter() - t
    return workers * one / many


def synthetic_batch(shape=(2, 4, 64, 64, 64), seed=0, device="cpu"):
    """Label map with a ball (1), a solid torus (2) and a shell (3) per sample; noisy logits."""
    B, C, X, Y, Z = shape
    g = np.stack(np.mgrid[:X, :Y, :Z], 0).astype(float) - np.array([X, Y, Z])[:, None, None, None] / 2
    z, y, x = g
    r = np.sqrt(z**2 + y**2 + x**2)
    lab = np.zeros((X, Y, Z), dtype=np.int64)
    lab[np.hypot(np.hypot(y, x) - 18, z) <= 5] = 2
    lab[np.abs(r - 10) <= 2] = 3
    lab[r <= 5] = 1
    labels = np.stack([np.roll(lab, 3 * b, axis=0) for b in range(B)])[:, None]
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), [0, 0, 2, 2, 2]) * 6
    onehot = np.eye(C)[labels[:, 0]].transpose(0, 4, 1, 2, 3)
    logits = 4 * onehot + noise
    return (torch.from_numpy(logits).float().to(device), torch.from_numpy(labels).to(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import cripser

    cpus = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={cpus}, usable CPUs={affinity}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"cripser {getattr(cripser, '__version__', '0.0.37?')}, device {args.device}")
    if affinity > 1:
        print(f"parallel capacity: {min(affinity, 4)} busy processes run "
              f"{parallel_capacity(min(affinity, 4)):.2f}x as fast as one")
    print()

    print("| map | bars (dim 0/1/2) | persistence_diagrams, s (best of %d) |" % args.repeats)
    print("|---|---|---|")
    for n in args.sizes:
        p = torch.from_numpy(smooth_field((n, n, n), n)).float().to(args.device)
        diagrams = persistence_diagrams(p)
        counts = "/".join(str(len(d.births)) for d in diagrams)
        t = best_of(lambda: persistence_diagrams(p), args.repeats)
        print(f"| {n}^3 | {counts} | {t:.3f} |")
    print()

    logits, labels = synthetic_batch(device=args.device)
    print(f"BettiPriorLoss([1, 2, 3]) forward + backward, logits {tuple(logits.shape)}, 'patch' targets")
    print("| downsample | executor | workers | seconds (best of %d) | loss |" % args.repeats)
    print("|---|---|---|---|---|")
    settings = [("serial", 1)] + [(ex, w) for ex in ("thread", "process") for w in sorted({2, affinity})]
    for ds in (1, 2):
        for executor, workers in settings:
            loss_fn = BettiPriorLoss([1, 2, 3], downsample=ds, num_workers=workers,
                                     executor="thread" if executor == "serial" else executor)
            x = logits.clone().requires_grad_(True)

            def step():
                x.grad = None
                loss = loss_fn(x, labels)
                loss.backward()
                return loss

            startup = ""
            if executor == "process" and workers not in _PROCESS_POOLS:
                t0 = time.perf_counter()
                step()
                startup = f" (first call incl. pool start-up {time.perf_counter() - t0:.2f} s)"
            value = step().item()
            t = best_of(step, args.repeats)
            print(f"| {ds} | {executor} | {workers} | {t:.3f}{startup} | {value:.3f} |")


if __name__ == "__main__":
    main()
