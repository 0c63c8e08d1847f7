"""How fine can the smoothed dipole occupancy be, in millimetres? (the default of ``occupancy_smoothing_mm``)

The mesh losses measure the dipole smoothing sigma in mm (DESIGN §6 "Frames"). A smaller sigma resolves thinner
walls (the septum between the LV and RV meshes), but the one-point-per-vertex quadrature of the dipole form is only
smooth when sigma is not much smaller than the edge length: below that the occupancy near the surface becomes
bumpy (it depends on where a point lies relative to the vertices). For an icosphere template of a heart-chamber
size (radius R mm, subdivisions s) this prints, per sigma, the mean occupancy at signed distances d from the
surface (d < 0 inside) and its spread (max - min) over 2000 directions, against the exact winding number.

    python benchmarks/bench_dipole_smoothing.py            # R = 25 mm (an adult LV), subdivisions 3 and 4
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import trimesh

from nnunet_topo.occupancy import winding_number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--radius", type=float, default=25.0, help="sphere radius in mm")
    parser.add_argument("--subdivisions", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    parser.add_argument("--distances", type=float, nargs="+", default=[-3.0, -1.5, -0.75, 0.75, 1.5, 3.0])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(2000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for sub in args.subdivisions:
        ico = trimesh.creation.icosphere(subdivisions=sub, radius=args.radius)
        v = torch.tensor(ico.vertices, dtype=torch.float64)
        f = torch.tensor(ico.faces, dtype=torch.long)
        edge = float(ico.edges_unique_length.mean())
        print(f"\nicosphere subdivisions {sub}: {len(v)} vertices, radius {args.radius} mm, mean edge {edge:.2f} mm")
        print("sigma mm | " + " | ".join(f"d={d:+.2f} mean (spread)" for d in args.distances))
        pts = torch.tensor(np.concatenate([dirs * (args.radius + d) for d in args.distances]), dtype=torch.float64)
        exact = winding_number(pts, v, f, method="exact").view(len(args.distances), -1)
        print("exact    | " + " | ".join(f"{float(e.mean()):.3f} ({float(e.max() - e.min()):.3f})" for e in exact))
        for s in args.sigmas:
            w = winding_number(pts, v, f, method="dipole", smoothing=s).view(len(args.distances), -1)
            print(f"{s:8.2f} | " + " | ".join(f"{float(x.mean()):.3f} ({float(x.max() - x.min()):.3f})" for x in w))


if __name__ == "__main__":
    main()
