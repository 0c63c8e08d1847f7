"""Benchmark of the topology metrics on a whole-heart-CT-sized label map (a script, not a test).

Builds a 240 x 512 x 512 uint8 label map with 7 ellipsoid-like structures (LV, MYO shell, RV, LA, RA,
AO tube, PA tube) and a perturbed copy as the prediction (shifted and rough boundaries, spurious
blobs, a hole punched through the myocardium, a split structure), then times, for all 7 structures
of prediction and reference, what an evaluator computes per case: 3D Betti numbers, per-slice Betti
numbers, 3D and 2D connected-component errors and the 2D Betti error. Dice and HD95 are timed
separately (``--no-geometry`` skips them).

Usage::

    python benchmarks/bench_metrics.py [--repeats 3] [--no-geometry]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

import numpy as np
from scipy import ndimage

from nnunet_topo.metrics.geometry import dice, hausdorff_distance_95
from nnunet_topo.metrics.topology import (
    betti_error_2d,
    betti_numbers_3d,
    betti_numbers_per_slice,
    connected_component_error_2d,
    connected_component_error_3d,
)

SHAPE = (240, 512, 512)
SPACING = (0.8, 0.45, 0.45)  # mm, (Z, Y, X)
NAMES = ["LV", "MYO", "RV", "LA", "RA", "AO", "PA"]


def _ellipsoid(out: np.ndarray, label: int, center, radii, only_background: bool = True) -> None:
    """Writes an axis-aligned ellipsoid into ``out`` in place, touching only its bounding box."""
    box = tuple(
        slice(max(0, int(c - r) - 1), min(s, int(c + r) + 2)) for c, r, s in zip(center, radii, out.shape)
    )
    grids = np.ogrid[box]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1.0
    view = out[box]
    if only_background:
        inside &= view == 0
    view[inside] = label


def _tube(out: np.ndarray, label: int, center_yx, radius: float, z_range) -> None:
    """A vertical cylinder (great vessel) from z_range[0] to z_range[1]."""
    cy, cx = center_yx
    box = (slice(*z_range), slice(int(cy - radius) - 1, int(cy + radius) + 2),
           slice(int(cx - radius) - 1, int(cx + radius) + 2))
    _, y, x = np.ogrid[box]
    disk = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    view = out[box]
    view[np.broadcast_to(disk, view.shape) & (view == 0)] = label


def make_reference() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    # LV first, then MYO as a shell around it (only where still background).
    _ellipsoid(lab, 1, (110, 270, 290), (45, 42, 38))
    _ellipsoid(lab, 2, (110, 270, 290), (53, 50, 46))
    lab[:75][lab[:75] == 2] = 0  # open the myocardial cup at the base (no cavity): Betti (1, 0, 0)
    _ellipsoid(lab, 3, (105, 240, 200), (42, 50, 40))
    _ellipsoid(lab, 4, (170, 330, 280), (30, 35, 40))
    _ellipsoid(lab, 5, (165, 300, 170), (32, 38, 35))
    _tube(lab, 6, (300, 250), 16, (150, 235))
    _tube(lab, 7, (210, 250), 15, (140, 225))
    return lab


def make_prediction(ref: np.ndarray, seed: int = 0) -> np.ndarray:
    """A plausible bad prediction: rough, shifted boundaries plus topological defects."""
    rng = np.random.default_rng(seed)
    pred = np.zeros_like(ref)
    boxes = ndimage.find_objects(ref)
    for k in range(1, 8):
        box = boxes[k - 1]
        box = tuple(slice(max(0, s.start - 6), min(n, s.stop + 6)) for s, n in zip(box, ref.shape))
        region = ref[box] == k
        # rough boundary: threshold a smoothed mask plus smooth noise, shifted by a few voxels
        field = ndimage.gaussian_filter(region.astype(np.float32), 2.0)
        field += 0.25 * ndimage.gaussian_filter(rng.standard_normal(region.shape).astype(np.float32), 3.0) * 6
        field = np.roll(field, tuple(rng.integers(-3, 4, 3)), axis=(0, 1, 2))
        sub = pred[box]
        sub[(field > 0.5) & (sub == 0)] = k
    # defects: spurious blobs, a hole through the MYO wall, a cut through RV
    for k, c in [(1, (60, 150, 150)), (3, (200, 400, 100)), (6, (30, 450, 450)), (6, (35, 460, 440))]:
        _ellipsoid(pred, k, c, (3, 4, 4), only_background=True)
    wall = (slice(100, 120), slice(265, 275), slice(326, 345))
    pred[wall][pred[wall] == 2] = 0
    pred[:, 238:242, :][pred[:, 238:242, :] == 3] = 0
    return pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    parser.add_argument("--no-geometry", action="store_true", help="skip Dice and HD95")
    args = parser.parse_args()

    t0 = time.perf_counter()
    ref = make_reference()
    pred = make_prediction(ref)
    t_build = time.perf_counter() - t0

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={os.cpu_count()}, "
          f"usable cpus={len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
    print(f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"label map {SHAPE} uint8, spacing {SPACING} mm, built in {t_build:.1f} s")
    for k, name in enumerate(NAMES, start=1):
        print(f"  {name:4s} ref {int((ref == k).sum()):9d} vox, pred {int((pred == k).sum()):9d} vox")

    best: dict[str, float] = defaultdict(lambda: float("inf"))
    results = {}
    for _ in range(args.repeats):
        times: dict[str, float] = defaultdict(float)
        for k, name in enumerate(NAMES, start=1):
            t = time.perf_counter()
            p, r = pred == k, ref == k
            times["mask extraction (label == k)"] += time.perf_counter() - t

            t = time.perf_counter()
            bp, br = betti_numbers_3d(p), betti_numbers_3d(r)
            times["betti_numbers_3d (pred+ref)"] += time.perf_counter() - t

            t = time.perf_counter()
            _sp, _sr = betti_numbers_per_slice(p, 0), betti_numbers_per_slice(r, 0)
            times["betti_numbers_per_slice (pred+ref)"] += time.perf_counter() - t

            t = time.perf_counter()
            cce3 = connected_component_error_3d(p, r)
            times["connected_component_error_3d"] += time.perf_counter() - t

            t = time.perf_counter()
            cce2 = connected_component_error_2d(p, r, 0)
            times["connected_component_error_2d"] += time.perf_counter() - t

            t = time.perf_counter()
            be2 = betti_error_2d(p, r, 0)
            times["betti_error_2d"] += time.perf_counter() - t

            if not args.no_geometry:
                t = time.perf_counter()
                d = dice(p, r)
                times["[geometry] dice"] += time.perf_counter() - t
                t = time.perf_counter()
                hd = hausdorff_distance_95(p, r, SPACING)
                times["[geometry] hausdorff_distance_95"] += time.perf_counter() - t
            else:
                d = hd = float("nan")
            results[name] = (bp, br, cce3, cce2, be2, d, hd)
        for key, v in times.items():
            best[key] = min(best[key], v)

    print()
    print(f"{'structure':9s} {'betti3d pred':>14s} {'betti3d ref':>12s} {'CCE3D':>6s} {'CCE2D':>7s} "
          f"{'BE2D':>6s} {'Dice':>6s} {'HD95 mm':>8s}")
    for name, (bp, br, cce3, cce2, be2, d, hd) in results.items():
        print(f"{name:9s} {str(bp):>14s} {str(br):>12s} {cce3:6d} {cce2:7.3f} {be2:6.3f} {d:6.3f} {hd:8.2f}")

    print()
    print(f"timings, 7 structures, best of {args.repeats} (seconds)")
    topo_total = 0.0
    for key, v in best.items():
        print(f"  {key:40s} {v:8.3f}")
        if not key.startswith("[geometry]"):
            topo_total += v
    print(f"  {'TOTAL topology (incl. mask extraction)':40s} {topo_total:8.3f}")
    if not args.no_geometry:
        geo = sum(v for k, v in best.items() if k.startswith("[geometry]"))
        print(f"  {'TOTAL geometry':40s} {geo:8.3f}")


if __name__ == "__main__":
    main()
