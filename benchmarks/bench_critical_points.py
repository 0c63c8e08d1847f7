"""Cost of TPM's critical points per training step: label-map source vs mesh source, against the whole loss.

On an ACDC-like patch (default 20 x 160 x 160 at 5 x 1.5 x 1.5 mm, batch 2) with three 642-vertex meshes (LV_endo,
LV_epi, RV) placed so that they penetrate each other, times (median of repeats):

* ``label map``: violation voxels of ``argmax(logits)`` (source a), every rule;
* ``meshes``: ``mesh_violation_masks`` (source b): every mesh named by a rule voxelised once on the patch grid
  (exact ray crossings, :mod:`nnunet_topo.voxelize`), the rules as boolean expressions;
* ``TPMLoss`` forward + backward with both sources (dipole occupancy, 1024 + 1024 L_occ points, <= 2048 critical
  points per mesh), and with the mesh source off (``mesh_critical_points=False``).

    python benchmarks/bench_critical_points.py [--device cpu|cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import trimesh

from nnunet_topo.frames import normalized_to_mm
from nnunet_topo.losses.mesh_targets import critical_point_masks, mesh_violation_masks
from nnunet_topo.losses.tpm import TPMLoss
from nnunet_topo.topology_spec import parse_topology

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
SPEC = parse_topology({"labels": LABELS, "topology": {
    "rules": [{"type": "exclusion", "a": "LV", "b": "RV"},
              {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"]}],
    "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]}}})
NAMES = ["LV_endo", "LV_epi", "RV"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", type=int, nargs=3, default=[20, 160, 160])
    parser.add_argument("--spacing", type=float, nargs=3, default=[5.0, 1.5, 1.5])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dev = torch.device(args.device)
    shape, sp = tuple(args.shape), tuple(args.spacing)
    ext = np.array([(s - 1) * h for s, h in zip(shape, sp)])[::-1]  # (x, y, z) mm extent
    c = ext / 2
    meshes = []
    for name, off, r in (("LV_endo", (6, 0, 0), 22.0), ("LV_epi", (6, 0, 0), 28.0), ("RV", (-20, 0, 0), 26.0)):
        ico = trimesh.creation.icosphere(subdivisions=3, radius=r)
        v_mm = ico.vertices + c + np.asarray(off, float)
        idx = v_mm[:, ::-1] / np.asarray(sp)
        n = 2 * idx / (np.asarray(shape) - 1) - 1
        meshes.append((torch.tensor(n[:, ::-1].copy(), dtype=torch.float32, device=dev)[None].repeat(2, 1, 1),
                       torch.tensor(ico.faces, device=dev)))
    vs, fs = [m[0].requires_grad_(True) for m in meshes], [m[1] for m in meshes]
    logits = torch.randn(2, 4, *shape, device=dev)
    logits = torch.nn.functional.avg_pool3d(logits, 5, 1, 2) * 10
    ref = logits.argmax(1)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"{platform.machine()} ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; patch {shape} at {sp} mm, batch 2, 3 meshes x 642 vertices")

    def timed(fn):
        out = []
        for i in range(args.repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                out.append((time.perf_counter() - t0) * 1000)
        return statistics.median(out)

    mm = [normalized_to_mm(v.detach(), shape, sp) for v in vs]
    gen = torch.Generator().manual_seed(0)
    t_a = timed(lambda: critical_point_masks(ref, ref, SPEC))
    t_b = timed(lambda: mesh_violation_masks(mm, fs, NAMES, SPEC, shape, sp))
    viol = mesh_violation_masks(mm, fs, NAMES, SPEC, shape, sp)
    print(f"mesh-source critical voxels: {', '.join(f'{k}: {int(v.sum())}' for k, v in viol.items())}")
    rows = [("label map (source a)", t_a), ("meshes (source b, every voxel)", t_b)]
    for label, cand in (("TPMLoss fwd+bwd, both sources", True), ("TPMLoss fwd+bwd, label map only", False)):
        loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=1.5, spacing=sp, mesh_critical_points=cand)
        rows.append((label, timed(lambda: loss(vs, fs, logits, ref[:, None].float(), generator=gen)["total"].backward())))
    for label, ms in rows:
        print(f"{label:<48} {ms:10.1f} ms")


if __name__ == "__main__":
    main()
