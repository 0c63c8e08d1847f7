"""Mesh repair and exact mesh TVS on heart-shaped meshes: time per case, displacement, before/after render.

Meshes: marching cubes (``meshes.mesh_from_mask``, smoothed, decimated to heart-head size) of synthetic ACDC-like
references (``synthetic.make_phantom``), the RV inflated by ``--push_mm`` along its vertex normals so that it
penetrates the LV epicardium at the septum (the defect TPM reduces and a simulation cannot take). Per case: the exact
violating volumes before, the repair (``mesh_repair.repair_case``), its time, the moved vertices and displacements,
and the exact mesh TVS numerators after (0 by construction of the repair's exact check; recomputed here).

    python benchmarks/bench_repair.py [--cases 5] [--push_mm 2.5] [--figure documentation/results/repair_septum.png]

``--side_cache_check`` repairs each case a second time with every inside/outside test recomputed by the exact
winding number (the repair loop keeps the side of points that cannot have crossed a surface, ``_SideCache``) and
reports both times and whether the repaired vertices are identical. ``--mesh_folder DIR --djfile dataset.json
--names CASE ...`` takes predicted meshes (``nnUNetv2_topo_predict_meshes`` output, ``CASE_<structure>.vtp``) instead
of the synthetic hearts.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def heart_meshes(seed: int, push_mm: float, target_faces: int):
    import trimesh

    from nnunet_topo.frames import ImageGeometry
    from nnunet_topo.surfaces import mesh_from_mask
    from nnunet_topo.synthetic import make_phantom

    ph = make_phantom("acdc", seed)
    geo = ImageGeometry(spacing_xyz=tuple(reversed(ph.spacing)), origin_xyz=ph.origin,
                        direction=np.asarray(ph.direction, float).reshape(3, 3))
    lab = ph.labels
    masks = {"LV_endo": ph.label == lab["LV"], "LV_epi": np.isin(ph.label, [lab["LV"], lab["MYO"]]),
             "RV": ph.label == lab["RV"]}
    meshes = {n: mesh_from_mask(m, geo, smoothing_iterations=10, target_faces=target_faces) for n, m in masks.items()}
    rv = meshes["RV"]
    meshes["RV"] = trimesh.Trimesh(np.asarray(rv.vertices) + push_mm * np.asarray(rv.vertex_normals),
                                   np.asarray(rv.faces), process=False)
    return meshes


def side_cache_check(meshes, spec, gap_mm: float, repaired, seconds: float) -> dict:
    """The case repaired again with every inside/outside test recomputed by the exact winding number: seconds with
    and without the repair loop's side cache, and whether the repaired vertices are identical."""
    from nnunet_topo import mesh_repair

    cached = mesh_repair._SideCache.inside
    mesh_repair._SideCache.inside = lambda self, points, mesh, dist, drift: mesh_repair._inside(points, mesh)
    try:
        t = time.perf_counter()
        again, _ = mesh_repair.repair_case(meshes, spec, gap_mm)
        without = time.perf_counter() - t
    finally:
        mesh_repair._SideCache.inside = cached
    same = all(np.array_equal(np.asarray(again[n].vertices), np.asarray(repaired[n].vertices)) for n in repaired)
    return {"seconds_with": round(seconds, 2), "seconds_without": round(without, 2), "identical": bool(same)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--push_mm", type=float, default=2.5)
    p.add_argument("--gap_mm", type=float, default=0.5)
    p.add_argument("--target_faces", type=int, default=2000, help="faces per mesh (the head's templates: 1280)")
    p.add_argument("--figure", default=None, help="write a before/after render of the first case (PNG)")
    p.add_argument("--side_cache_check", action="store_true",
                   help="repair each case again with every side recomputed: times and identical output")
    p.add_argument("--mesh_folder", default=None, help="predicted meshes CASE_<structure>.vtp instead of synthetic")
    p.add_argument("--djfile", default=None, help="dataset.json of --mesh_folder's dataset (its topology)")
    p.add_argument("--names", nargs="*", default=[], help="the cases of --mesh_folder")
    args = p.parse_args()

    from nnunet_topo.mesh_booleans import mesh_invalid_reason
    from nnunet_topo.mesh_evaluation import mesh_rule_volumes
    from nnunet_topo.mesh_repair import repair_case
    from nnunet_topo.topology_spec import parse_topology
    from nnunet_topo.synthetic import labels_for, topology_block

    if args.mesh_folder:
        from nnunet_topo.mesh_io import read_mesh

        with open(args.djfile) as f:
            spec = parse_topology(json.load(f))
        cases = [(name, lambda name=name: {s: read_mesh(os.path.join(args.mesh_folder, f"{name}_{s}.vtp"))
                                           for s in spec.mesh_structures}) for name in args.names]
    else:
        spec = parse_topology({"labels": labels_for("acdc"), "topology": topology_block("acdc")})
        cases = [(seed, lambda seed=seed: heart_meshes(seed, args.push_mm, args.target_faces))
                 for seed in range(args.cases)]
    rows = []
    for seed, load in cases:
        meshes = load()
        invalid = {n: r for n, m in meshes.items() if (r := mesh_invalid_reason(m))}
        if invalid and not args.mesh_folder:  # predicted meshes often cross themselves: the repair untangles them
            rows.append({"seed": seed, "skipped": invalid})
            continue
        t = time.perf_counter()
        before = mesh_rule_volumes(meshes, spec, 1.0)
        t_exact = time.perf_counter() - t
        t = time.perf_counter()
        grid = mesh_rule_volumes(meshes, spec, 1.0, method="grid")
        t_grid = time.perf_counter() - t
        t = time.perf_counter()
        repaired, report = repair_case(meshes, spec, args.gap_mm, case=f"seed{seed}")
        t_repair = time.perf_counter() - t
        after = mesh_rule_volumes(repaired, spec, 1.0)
        check = side_cache_check(meshes, spec, args.gap_mm, repaired, t_repair) if args.side_cache_check else None
        rows.append({"seed": seed, "faces": {n: len(m.faces) for n, m in meshes.items()}, "invalid_on_input": invalid,
                     "violating_mm3_exact": before["violating_volume_mm3"], "methods_before": before["method"],
                     "violating_mm3_grid_1mm": grid["violating_volume_mm3"],
                     "seconds_exact_tvs": round(t_exact, 2), "seconds_grid_tvs": round(t_grid, 2),
                     "seconds_repair": round(t_repair, 2), "violating_mm3_after": after["violating_volume_mm3"],
                     "methods_after": after["method"], "meshes": report["meshes"],
                     "gap_after": {r: e["gap_mm_after"] for r, e in report["rules"].items()},
                     "side_cache_check": check})
        if args.figure and seed == cases[0][0]:
            from nnunet_topo.report import render_meshes

            stem, ext = os.path.splitext(args.figure)
            render_meshes(stem + "_before" + ext, "before repair", meshes, spec)
            render_meshes(stem + "_after" + ext, "after repair", repaired, spec)
    print(json.dumps(rows, indent=1))
    done = [r for r in rows if "skipped" not in r]
    if done:
        print(f"{len(done)} case(s): repair {np.mean([r['seconds_repair'] for r in done]):.1f} s/case, exact mesh "
              f"TVS {np.mean([r['seconds_exact_tvs'] for r in done]):.2f} s/case (grid 1 mm: "
              f"{np.mean([r['seconds_grid_tvs'] for r in done]):.2f}), RV max displacement "
              f"{np.mean([r['meshes']['RV']['max_displacement_mm'] for r in done]):.2f} mm ("
              f"{'' if args.mesh_folder else f'push {args.push_mm} mm + '}gap {args.gap_mm}), moved RV vertices "
              f"{np.mean([r['meshes']['RV']['moved_vertices'] for r in done]):.0f}; violating volume after: "
              f"{max(sum(r['violating_mm3_after'].values()) for r in done)} mm3")
        if args.side_cache_check:
            c = [r["side_cache_check"] for r in done]
            print(f"side cache: {np.mean([x['seconds_with'] for x in c]):.1f} s/case, every side recomputed "
                  f"{np.mean([x['seconds_without'] for x in c]):.1f} s/case (x"
                  f"{np.mean([x['seconds_without'] / x['seconds_with'] for x in c]):.2f}); identical output in "
                  f"{sum(x['identical'] for x in c)}/{len(c)} case(s)")


if __name__ == "__main__":
    main()
