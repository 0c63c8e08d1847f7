"""Time per case of the visual QC report (``nnUNetv2_topo_report``) on a 300 x 512 x 512 label pair (a script, not a
test).

Builds the 7-structure heart label map of ``bench_metrics.py`` (240 x 512 x 512, 0.8 x 0.45 x 0.45 mm) padded to
300 slices, its perturbed prediction (rough boundaries and topological defects: rule violations in many slices) and
a grey image, writes them as ``.nii.gz`` into a temporary nnU-Net-style layout (labelsTs, pred, imagesTs), runs
:func:`nnunet_topo.report.write_report` and prints

* the evaluation time (``nnUNetv2_topo_evaluate_folder``'s work, done once),
* the report's own time per case (``report.json`` ``seconds``: reading reference, prediction and image, the
  violation maps, choosing the slices, drawing the slices and the per-slice Betti plot),
* with ``--meshes``: the mesh render per case (:func:`nnunet_topo.report.render_meshes` on marching-cubes meshes of
  the prediction, decimated to ``MAX_RENDER_FACES`` faces each for drawing and the penetration test; timed alone, the
  mesh *evaluation* of such meshes takes minutes per rule on a CPU and is the evaluator's cost, not the report's).

Writing the files is not timed.

Usage::

    python benchmarks/bench_report.py [--cases 1] [--no_image] [--meshes]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import NAMES, SPACING, make_prediction, make_reference  # noqa: E402

PAD = 30  # slices added at each end: 240 + 60 = 300


def _write(arr: np.ndarray, path: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in SPACING[::-1]))
    sitk.WriteImage(img, path, useCompression=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1, help="cases (copies of the pair), default 1")
    parser.add_argument("--no_image", action="store_true", help="no image folder (contours on white)")
    parser.add_argument("--meshes", action="store_true", help="also time the mesh render of one case")
    args = parser.parse_args()

    from nnunet_topo.report import MAX_RENDER_FACES, render_meshes, write_report
    from nnunet_topo.topology_spec import parse_topology

    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(NAMES)}}
    topology = {
        "rules": [{"type": "exclusion", "a": "LV", "b": "RV"}, {"type": "exclusion", "a": "LA", "b": "RA"},
                  {"type": "exclusion", "a": "LV", "b": "RA"}, {"type": "exclusion", "a": "RV", "b": "LA"},
                  {"type": "exclusion", "a": "AO", "b": "PA"},
                  {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": ["LA", "AO"]},
                  {"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 0}],
        "betti": {n: [1, 0, 0] for n in NAMES}, "betti_2d": {"axis": 0, "LV": [1, 0], "MYO": [1, 1]},
        "mesh_structures": {"LV_endo": ["LV"], "RV": ["RV"]}}
    dj = {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 1,
          "topology": topology}
    t0 = time.perf_counter()
    ref = np.pad(make_reference(), ((PAD, PAD), (0, 0), (0, 0)))
    pred = np.pad(make_prediction(make_reference()), ((PAD, PAD), (0, 0), (0, 0)))
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 40, ref.shape) + 300 * (ref > 0) + 80 * ref).astype(np.float32)
    t_build = time.perf_counter() - t0
    work = tempfile.mkdtemp(prefix="bench_report_")
    try:
        folders = {k: os.path.join(work, k) for k in ("labelsTs", "pred", "imagesTs")}
        for f in folders.values():
            os.makedirs(f)
        t0 = time.perf_counter()
        for i in range(args.cases):
            _write(ref, os.path.join(folders["labelsTs"], f"case_{i:03d}.nii.gz"))
            _write(pred, os.path.join(folders["pred"], f"case_{i:03d}.nii.gz"))
            if not args.no_image:
                _write(image, os.path.join(folders["imagesTs"], f"case_{i:03d}_0000.nii.gz"))
        t_write = time.perf_counter() - t0
        djfile = os.path.join(work, "dataset.json")
        with open(djfile, "w") as f:
            json.dump(dj, f)
        out = os.path.join(work, "qc")
        t0 = time.perf_counter()
        write_report(folders["labelsTs"], folders["pred"], djfile, {}, out,
                     image_folder=None if args.no_image else folders["imagesTs"], show_progress=False)
        total = time.perf_counter() - t0
        meta = json.load(open(os.path.join(out, "report.json")))
        per_case = [c["seconds"] for c in meta["cases"]]
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
        print(f"label map {ref.shape} uint8 (Z, Y, X), spacing {SPACING} mm, {len(NAMES)} structures, "
              f"{len(topology['rules'])} rules; built in {t_build:.1f} s, files written in {t_write:.1f} s (not timed)")
        sl = meta["cases"][0]["figures"]["slices"]["slices"]
        print("slices drawn: " + ", ".join(f"axis {s['axis']} slice {s['index']} ({s['violating']} violating)"
                                           for s in sl))
        print(f"write_report total {total:.1f} s for {args.cases} case(s): evaluation "
              f"{total - sum(per_case):.1f} s, report {sum(per_case):.1f} s")
        print(f"report time per case ({'with' if not args.no_image else 'without'} image): "
              + ", ".join(f"{s:.1f} s" for s in per_case))
        if args.meshes:
            from nnunet_topo.frames import ImageGeometry
            from nnunet_topo.surfaces import mesh_from_mask

            geom = ImageGeometry(SPACING[::-1], (0.0, 0.0, 0.0), np.eye(3))
            spec = parse_topology(dj)
            meshes = {name: mesh_from_mask(np.isin(pred, [labels[n] for n in ids]), geom)
                      for name, ids in topology["mesh_structures"].items()}
            faces = {n: len(m.faces) for n, m in meshes.items()}
            t0 = time.perf_counter()
            _, info = render_meshes(os.path.join(out, "mesh.png"), "case_000", meshes, spec, 0.2)
            t_mesh = time.perf_counter() - t0
            print(f"mesh render of one case: {t_mesh:.1f} s (meshes {faces} faces, decimated to "
                  f"{MAX_RENDER_FACES} each; {info['penetrating_total']} penetrating vertices)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
