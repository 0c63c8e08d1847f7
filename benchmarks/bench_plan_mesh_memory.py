"""Memory and time of the heart-ROI pass of ``nnUNetv2_topo_plan_mesh`` on CT-size label files.

Writes ``--num_cases`` (default 20) uint8 NIfTI label maps of ``--shape`` (default 300 x 512 x 512 voxels, Z Y X;
spacing 0.5 x 0.4 x 0.4 mm) with a few ellipsoid labels (the mesh structures) in a corner region that varies per
case, and times :func:`nnunet_topo.mesh_plans.roi_statistics` on them in a fresh child process whose peak resident
memory (``VmHWM`` of /proc/self/status, which starts afresh at exec; ``ru_maxrss`` elsewhere) is the number that
matters: the pass reads one case at a time with nnU-Net's reader (``SimpleITKIO.read_seg`` returns float32, about
0.3 GB for one such case). The child's peak after its imports (nnU-Net, torch), before the pass, is reported too.
The label files are written by another child, so the measured one starts from a small parent. Only the ROI pass
runs: it needs no images and no fingerprint (the dataset.json lists the cases with nnU-Net's ``"dataset"`` key;
the image paths there are never opened).

    python benchmarks/bench_plan_mesh_memory.py                       # 20 cases in a temporary folder
    python benchmarks/bench_plan_mesh_memory.py --num_cases 5 --shape 100 256 256
    python benchmarks/bench_plan_mesh_memory.py --dir /tmp/roi_bench --keep   # reuse the files on the next run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3, "AO": 4, "other": 5}
SPACING_ZYX = (0.5, 0.4, 0.4)


def write_case(path: str, shape, rng: np.random.Generator) -> None:
    """One label map: LV in MYO, RV beside them, AO above, in a corner block; an 'other' (non-mesh) label elsewhere."""
    import SimpleITK as sitk

    a = np.zeros(shape, np.uint8)
    block = [max(8, int(s * f)) for s, f in zip(shape, (0.45, 0.4, 0.4))]  # heart block (voxels)
    off = []
    for n, b in zip(shape, block):  # the low or the high third of the free room, per axis (a corner region)
        lo = int(rng.integers(0, (n - b) // 3 + 1))
        off.append(lo if rng.random() < 0.5 else n - b - lo)
    sub = a[tuple(slice(o, o + b) for o, b in zip(off, block))]
    zz, yy, xx = np.ogrid[tuple(slice(0, b) for b in block)]
    g = [(zz, block[0]), (yy, block[1]), (xx, block[2])]

    def ellipsoid(c, r):
        return sum(((q - ci * n) / max(ri * n, 1.0)) ** 2 for (q, n), ci, ri in zip(g, c, r)) <= 1.0

    s = rng.uniform(0.85, 1.0)
    sub[ellipsoid((0.5, 0.45, 0.4), (0.3 * s, 0.28 * s, 0.25 * s))] = 2
    sub[ellipsoid((0.5, 0.45, 0.4), (0.22 * s, 0.2 * s, 0.17 * s))] = 1
    sub[ellipsoid((0.5, 0.55, 0.72), (0.25 * s, 0.25 * s, 0.2 * s)) & (sub == 0)] = 3
    sub[ellipsoid((0.15, 0.3, 0.5), (0.12, 0.1, 0.1)) & (sub == 0)] = 4
    a[-4:, -4:, -4:] = 5  # not a mesh structure: must not widen the ROI
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(tuple(float(v) for v in SPACING_ZYX[::-1]))
    sitk.WriteImage(img, path, useCompression=True)


def write_dataset(folder: str, num_cases: int, shape, seed: int = 0) -> None:
    settings = {"num_cases": num_cases, "shape": list(shape), "seed": seed, "spacing_zyx": list(SPACING_ZYX)}
    marker = os.path.join(folder, "bench_settings.json")
    if os.path.isfile(marker) and json.load(open(marker)) == settings:
        print(f"reusing the label files in {folder}")
        return
    if os.path.exists(os.path.join(folder, "dataset.json")) and not os.path.isfile(marker):
        raise SystemExit(f"{folder} holds a dataset.json not written by this benchmark; choose another --dir")
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    t0 = time.perf_counter()
    cases = {}
    for i in range(num_cases):
        case = f"ct_{i:03d}"
        write_case(os.path.join(folder, "labelsTr", case + ".nii.gz"), shape, np.random.default_rng((seed, i)))
        cases[case] = {"images": [f"imagesTr/{case}_0000.nii.gz"], "label": f"labelsTr/{case}.nii.gz"}
    dj = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": num_cases, "file_ending": ".nii.gz",
          "dataset": cases,
          "topology": {"mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"], "AO": ["AO"]}}}
    json.dump(dj, open(os.path.join(folder, "dataset.json"), "w"), indent=2)
    json.dump(settings, open(marker, "w"))
    print(f"wrote {num_cases} label files of {list(shape)} voxels in {time.perf_counter() - t0:.1f} s")


def cleanup(folder: str) -> None:
    """Remove what :func:`write_dataset` wrote (nothing else), then the folder if it is empty."""
    labels = os.path.join(folder, "labelsTr")
    if os.path.isdir(labels):
        for f in os.listdir(labels):
            if f.startswith("ct_") and f.endswith(".nii.gz"):
                os.remove(os.path.join(labels, f))
    for f in ("dataset.json", "bench_settings.json"):
        if os.path.isfile(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    for d in (labels, folder):
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


def peak_rss_kb() -> int:
    """This process's peak resident memory (kB): ``VmHWM`` of /proc/self/status where there is one (it starts afresh
    at exec), else ``ru_maxrss`` (on Linux that one also keeps the parent's peak from before the exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child(folder: str, margin_mm: float) -> None:
    """The measured process: imports (nnU-Net, torch), then the ROI pass; prints one JSON line."""
    import nnunetv2.imageio.simpleitk_reader_writer  # noqa: F401  (what the pass imports, before the baseline)
    import nnunetv2.utilities.plans_handling.plans_handler  # noqa: F401
    import nnunetv2.utilities.utils  # noqa: F401

    from nnunet_topo.mesh_plans import roi_statistics

    rss_imports = peak_rss_kb()
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    plans = {"transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO"}
    t0 = time.perf_counter()
    st = roi_statistics(folder, dj, plans, margin_mm=margin_mm)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "peak_rss_after_imports_kb": rss_imports,
                      "peak_rss_kb": peak_rss_kb(),
                      "size_mm": st.size_mm, "num_cases": st.num_cases, "largest_case": st.largest_case}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_cases", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--margin_mm", type=float, default=10.0)
    p.add_argument("--dir", default=None, help="folder for the label files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the label files (reused by a later run with --dir)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_write", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        child(a._child, a.margin_mm)
        return
    if a._write:
        write_dataset(a._write, a.num_cases, a.shape)
        return
    folder = a.dir or tempfile.mkdtemp(prefix="bench_plan_mesh_")
    try:
        # the label files are written by another child, so this process stays small and the measured child
        # starts from a small parent
        me = [sys.executable, os.path.abspath(__file__)]
        subprocess.run(me + ["--_write", folder, "--num_cases", str(a.num_cases), "--shape", *map(str, a.shape)],
                       check=True)
        t0 = time.perf_counter()
        proc = subprocess.run(me + ["--_child", folder, "--margin_mm", str(a.margin_mm)], capture_output=True,
                              text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the ROI pass failed:\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        one_case_gb = np.prod(a.shape) * 4 / 1e9
        print(f"cases: {r['num_cases']} of {list(a.shape)} voxels (Z Y X), uint8 .nii.gz, spacing {list(SPACING_ZYX)} mm")
        print(f"ROI pass: {r['wall_s']:.1f} s ({r['wall_s'] / a.num_cases:.2f} s per case); child process "
              f"{total:.1f} s with imports")
        print(f"peak RSS of the child: {r['peak_rss_kb'] / 1024 ** 2:.2f} GiB (after its imports, before the pass: "
              f"{r['peak_rss_after_imports_kb'] / 1024 ** 2:.2f} GiB); one case as float32: {one_case_gb:.2f} GB")
        print(f"ROI size {[round(v, 1) for v in r['size_mm']]} mm, largest cases {r['largest_case']}")
    finally:
        if not a.keep:
            cleanup(folder)
        else:
            print(f"kept {folder}")


if __name__ == "__main__":
    main()
