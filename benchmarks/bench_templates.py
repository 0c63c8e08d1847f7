"""Template fidelity: mesh Dice of each mesh template against the mean aligned mask it is built from.

Compares the isosurface templates of ``template_from_masks`` (DESIGN §7) with the moment-fitted ellipsoid (the old
fallback for structures that are not star-shaped, e.g. the crescent RV), on the synthetic presets and, where
``../shared/data/acdc`` is present, on real ACDC labels (end-diastole frames; ACDC stores no spacing, so a spacing of
10 x 1.5 x 1.5 mm is *assumed*: it sets the smoothing and the vertex placement in mm, not the voxel Dice). Masks are
centre-padded to the largest shape and aligned by centroid, as the mesh trainers do.

    python benchmarks/bench_templates.py                 # synthetic acdc + wholeheart, and ACDC if present
    python benchmarks/bench_templates.py --cases 20
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np
import torch

from nnunet_topo import synthetic as syn
from nnunet_topo.mesh_head.label_templates import align_centroids, ellipsoid_template
from nnunet_topo.mesh_head.templates import template_from_masks
from nnunet_topo.frames import normalized_to_index
from nnunet_topo.occupancy import winding_number
from nnunet_topo.patches import center_pad_to
from nnunet_topo.topology_spec import parse_topology

ACDC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "acdc")


def template_dice(t, mask: np.ndarray, spacing) -> float:
    sp = np.asarray(spacing, dtype=np.float64)
    v_mm = normalized_to_index(t.vertices.astype(np.float64), mask.shape) * sp
    lo = np.maximum(np.floor(v_mm.min(0) / sp).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(v_mm.max(0) / sp).astype(int) + 2, mask.shape)
    box = np.zeros(mask.shape, bool)
    idx = np.argwhere(np.ones(hi - lo, bool)) + lo
    w = winding_number(torch.from_numpy(idx * sp), torch.from_numpy(v_mm), torch.from_numpy(t.faces[:, ::-1].copy()))
    box[tuple(idx.T)] = w.numpy() > 0.5
    return 2 * float((box & mask).sum()) / float(box.sum() + mask.sum())


def report(title, label_maps, structures, spacing):
    shape = np.max([m.shape for m in label_maps], axis=0)
    print(f"\n{title}: {len(label_maps)} cases, padded to {tuple(int(s) for s in shape)}, spacing {spacing} mm")
    print("structure | isosurface template: genus, vertices, mesh Dice | ellipsoid mesh Dice | build s")
    for name, ids in structures.items():
        masks = align_centroids([np.isin(center_pad_to(m, shape), ids) for m in label_maps])
        mean = np.mean(masks, axis=0) >= 0.5
        t0 = time.time()
        try:
            t = template_from_masks(masks, 3, name, spacing=spacing)
            iso = f"{t.genus}, {t.num_vertices}, {template_dice(t, mean, spacing):.3f}"
        except ValueError as e:
            iso = f"failed: {str(e)[:60]}"
        dt = time.time() - t0
        e = ellipsoid_template(masks, 3, name)
        ell = f"{template_dice(e, mean, spacing):.3f}" if e is not None else "n/a (not genus 0)"
        print(f"{name} | {iso} | {ell} | {dt:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10)
    args = parser.parse_args()
    for preset in ("acdc", "wholeheart"):
        ph = [syn.make_phantom(preset, s) for s in range(args.cases)]
        spec = parse_topology({"labels": syn.labels_for(preset), "topology": syn.topology_block(preset)})
        report(f"synthetic {preset}", [p.label for p in ph],
               {n: s.label_ids for n, s in spec.mesh_structures.items()}, tuple(float(x) for x in ph[0].spacing))
    files = sorted(glob.glob(os.path.join(ACDC, "*_frame01.h5")))[: args.cases]
    if files:
        import h5py  # only for this benchmark (pip install h5py)

        labels = []
        for f in files:
            with h5py.File(f, "r") as h:
                labels.append(np.asarray(h["label"], dtype=np.uint8))
        report("ACDC end-diastole (labels 1 RV, 2 MYO, 3 LV)", labels,
               {"LV_endo": [3], "LV_epi": [2, 3], "RV": [1]}, (10.0, 1.5, 1.5))
    else:
        print(f"\n(no ACDC data at {ACDC}: skipped)")


if __name__ == "__main__":
    main()
