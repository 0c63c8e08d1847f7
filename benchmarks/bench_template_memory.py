"""Peak memory and time of the mesh trainers' template building on CT-size cases (streamed ROI crops).

The mesh trainers read every preprocessed segmentation once, one at a time, keep only the patch-size crop around
its mesh structures (``mesh_head.label_templates.roi_crops``) and build the templates from the crops
(``training_templates``). This script feeds that code ``--num_cases`` label maps of ``--shape`` (default 20 x
512 x 512 x 300, uint8: the worst case where the mesh configuration keeps the CT's voxel grid), generated one at a
time (an LV ellipsoid inside a myocardial shell and an RV ellipsoid, in a random corner region, sizes varying per
case), and reports the peak resident memory of the process (``ru_maxrss``) and the wall time, against the size
of one case and of all cases together.

    python benchmarks/bench_template_memory.py --num_cases 20 --shape 300 512 512 --patch 128 128 128
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _case(rng: np.random.Generator, shape, spacing):
    seg = np.zeros(shape, np.uint8)
    half = np.asarray([40.0, 35.0, 35.0])  # heart half-size in mm (z, y, x)
    box = np.minimum(np.ceil(2.4 * half / np.asarray(spacing)).astype(int), shape)
    lo = [int(rng.integers(0, max(1, (s - b) // 3))) if rng.random() < 0.5 else
          int(s - b - rng.integers(0, max(1, (s - b) // 3))) for s, b in zip(shape, box)]
    zz, yy, xx = np.meshgrid(*[np.arange(b) * sp for b, sp in zip(box, spacing)], indexing="ij")
    c = box * np.asarray(spacing) / 2 * rng.uniform(0.9, 1.1, 3)
    s = rng.uniform(0.85, 1.15)

    def ell(center, radii):
        return ((zz - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2 + \
               ((xx - center[2]) / radii[2]) ** 2 <= 1

    sub = np.zeros(box, np.uint8)
    lv_c = c + np.asarray([0, 0, -12.0])
    sub[ell(lv_c, s * np.asarray([32, 20, 20]))] = 2  # LV epicardium (MYO shell)
    sub[ell(lv_c, s * np.asarray([27, 14, 14]))] = 1  # LV cavity
    rv = ell(c + np.asarray([0, 0, 24.0]), s * np.asarray([28, 22, 11])) & (sub == 0)
    sub[rv] = 3
    sl = tuple(slice(a, a + b) for a, b in zip(lo, box))
    seg[sl] = sub
    return seg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.5, 0.4, 0.4), metavar=("Z", "Y", "X"))
    parser.add_argument("--patch", type=int, nargs=3, default=(256, 256, 256), metavar=("Z", "Y", "X"),
                        help="patch of the mesh configuration in voxels of --spacing (must hold the heart ROI)")
    args = parser.parse_args(argv)

    from nnunet_topo.mesh_head.label_templates import roi_crops, training_templates

    structures = {"LV_endo": [1], "LV_epi": [1, 2], "RV": [3]}
    rng = np.random.default_rng(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    cases = ((f"case{i:02d}", _case(rng, tuple(args.shape), tuple(args.spacing))) for i in range(args.num_cases))
    crops, boxes = roi_crops(cases, [1, 2, 3], args.patch, "bench", "3d_mesh")
    t1 = time.perf_counter()
    peak_crops = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    templates = training_templates(crops, structures, args.patch, args.spacing, None)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    one = np.prod(args.shape) / 2 ** 20
    print(f"device: {platform.processor() or platform.machine()} ({os.cpu_count()} cores); numpy {np.__version__}")
    print(f"{args.num_cases} cases of {list(args.shape)} uint8 ({one:.0f} MiB each, {one * args.num_cases:.0f} MiB "
          f"together), patch {list(args.patch)} ({np.prod(args.patch) / 2 ** 20:.0f} MiB per crop)")
    print(f"ROI crops: {t1 - t0:.1f} s; templates: {t2 - t1:.1f} s "
          f"({', '.join(f'{t.name} {t.num_vertices} v' for t in templates)})")
    print(f"peak RSS: {base:.0f} MiB at start (imports), {peak_crops:.0f} MiB after the crops, {peak:.0f} MiB after "
          "the templates")


if __name__ == "__main__":
    main()
