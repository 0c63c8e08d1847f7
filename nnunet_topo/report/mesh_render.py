"""The QC report's mesh figure: a case's meshes rendered offscreen with the vertices that penetrate a mesh they
must not enter, or leave their outer mesh, in red (:func:`penetrating_vertices`: exact generalised winding number,
:func:`nnunet_topo.occupancy.winding_number`)."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from nnunet_topo.topology_spec import MeshExclusionRule, TopologySpec, mesh_rule_meshes, mesh_rules_in_force
from nnunet_topo.report.figures import figure_classes, save_png
from nnunet_topo.report.html import format_value


#: meshes with more faces are decimated for the render and the penetration test
MAX_RENDER_FACES = 4000


_MESH_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#e377c2")


def _decimate(mesh, max_faces: int):
    import trimesh

    if len(mesh.faces) <= max_faces:
        return mesh, False
    try:
        d = mesh.simplify_quadric_decimation(face_count=int(max_faces))
        d = trimesh.Trimesh(np.asarray(d.vertices), np.asarray(d.faces), process=False)
        d.remove_unreferenced_vertices()
        if len(d.faces):
            return d, True
    except Exception:  # noqa: BLE001  (fast-simplification missing or failing: fall back to a face subset)
        pass
    step = int(math.ceil(len(mesh.faces) / max_faces))
    d = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces)[::step], process=False)
    d.remove_unreferenced_vertices()
    return d, True


def _winding(points: np.ndarray, mesh) -> np.ndarray:
    import torch

    from nnunet_topo.occupancy import winding_number

    points = np.asarray(points, np.float64)
    out = np.zeros(len(points))
    v = np.asarray(mesh.vertices, np.float64)
    if len(points) == 0 or len(v) == 0:
        return out
    lo, hi = v.min(0), v.max(0)
    near = np.all((points >= lo) & (points <= hi), axis=1)  # outside the bounding box the winding number is ~0
    if near.any():
        # float32 (twice as fast; a vertex within float32 rounding of the surface is within the tolerance anyway)
        w = winding_number(torch.from_numpy(points[near].astype(np.float32)), torch.from_numpy(v.astype(np.float32)),
                           torch.from_numpy(np.asarray(mesh.faces, np.int64)))
        out[near] = np.abs(w.numpy())  # either orientation
    return out


def penetrating_vertices(meshes: Mapping[str, Any], spec: TopologySpec, tol_mm: float = 0.0
                         ) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, str]]:
    """Vertices of the meshes that lie where a rule forbids them.

    For an exclusion ``(A, B)``: the vertices of A inside B and those of B inside A; for an inclusion ``I in O``
    (``| M``): the vertices of I outside O (and outside M). Inside = exact generalised winding number
    (:func:`nnunet_topo.occupancy.winding_number`, the occupancy of the mesh TVS) above 1/2, and a vertex counts
    only when it is more than ``tol_mm`` from the other surface (:func:`nnunet_topo.metrics.mesh.
    point_to_surface_distance`), so surfaces that coincide (an inner and an outer mesh sharing a cap) are not
    flagged. The rules are the mesh-level rules in force (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`: the
    dataset's ``mesh_rules`` and the voxel rules whose structures are mesh structures), as in the mesh evaluation.

    Returns ``({rule: {mesh name: bool (V,)}}, {rule: why it was skipped})``.
    """
    from nnunet_topo.metrics.mesh import point_to_surface_distance

    def deep(flags: np.ndarray, pts: np.ndarray, other) -> np.ndarray:
        if tol_mm > 0 and flags.any():
            idx = np.flatnonzero(flags)
            d = point_to_surface_distance(pts[idx], other)
            flags = flags.copy()
            flags[idx[d <= tol_mm]] = False
        return flags

    rules, not_on_meshes = mesh_rules_in_force(spec)
    out: Dict[str, Dict[str, np.ndarray]] = {}
    skipped: Dict[str, str] = {r: why for r, why in not_on_meshes.items() if "no mesh structure" in why}
    for rule in rules:
        lack = [m for m in mesh_rule_meshes(rule) if m not in meshes]
        if lack:
            skipped[rule.name] = "no mesh for " + ", ".join(lack)
            continue
        if isinstance(rule, MeshExclusionRule):
            res = {}
            for x, y in ((rule.a, rule.b), (rule.b, rule.a)):
                pts = np.asarray(meshes[x].vertices, np.float64)
                res[x] = deep(_winding(pts, meshes[y]) > 0.5, pts, meshes[y])
            out[rule.name] = res
        else:
            allowed = [meshes[rule.outer]] + [meshes[m] for m in rule.may_touch if m in meshes]
            pts = np.asarray(meshes[rule.inner].vertices, np.float64)
            flags = np.ones(len(pts), bool)
            for m in allowed:
                flags &= _winding(pts, m) <= 0.5
            for m in allowed:
                flags = deep(flags, pts, m)
            out[rule.name] = {rule.inner: flags}
    return out, skipped


def render_meshes(path: str, case: str, meshes: Mapping[str, Any], spec: TopologySpec, tol_mm: float = 0.0,
                  mesh_tvs: Optional[float] = None, max_faces: int = MAX_RENDER_FACES) -> Tuple[Tuple[int, int], dict]:
    """Offscreen render (mplot3d ``Poly3DCollection``, two views) of a case's meshes with the vertices of
    :func:`penetrating_vertices` and the faces that use them in red. Meshes above ``max_faces`` faces are decimated
    first (for the render and the vertex test; said in the title). Returns ``((width, height), info)``."""
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # registers the 3d projection

    Figure, _ = figure_classes()
    shown, decimated = {}, []
    for name, m in meshes.items():
        d, was = _decimate(m, max_faces)
        shown[name] = d
        if was:
            decimated.append(f"{name} {len(m.faces)}->{len(d.faces)}")
    flags, skipped = penetrating_vertices(shown, spec, tol_mm)
    bad_v = {n: np.zeros(len(m.vertices), bool) for n, m in shown.items()}
    counts = {}
    for rule, per in flags.items():
        counts[rule] = {n: int(f.sum()) for n, f in per.items()}
        for n, f in per.items():
            bad_v[n] |= f
    W, H = 1100, 560
    fig = Figure(figsize=(W / 100, H / 100), dpi=100)
    fig.subplots_adjust(left=0.0, right=1.0, top=0.86, bottom=0.12, wspace=0.0)
    allv = np.concatenate([np.asarray(m.vertices) for m in shown.values()]) if shown else np.zeros((1, 3))
    lo, hi = allv.min(0), allv.max(0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    for j, (elev, azim) in enumerate(((20, -60), (20, 120))):
        ax = fig.add_subplot(1, 2, j + 1, projection="3d")
        for k, (name, m) in enumerate(shown.items()):
            v, f = np.asarray(m.vertices), np.asarray(m.faces)
            face_bad = bad_v[name][f].any(axis=1)
            col = np.tile(np.asarray(to_rgba(_MESH_COLOURS[k % len(_MESH_COLOURS)], 0.28)), (len(f), 1))
            col[face_bad] = (1.0, 0.0, 0.0, 0.9)
            ax.add_collection3d(Poly3DCollection(v[f], facecolors=col, edgecolors="none"))
            if bad_v[name].any():
                p = v[bad_v[name]]
                ax.scatter(p[:, 0], p[:, 1], p[:, 2], color="red", s=4, depthshade=False)
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_zlim(centre[2] - half, centre[2] + half)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("x mm", fontsize=7)
        ax.set_ylabel("y mm", fontsize=7)
        ax.set_zlabel("z mm", fontsize=7)
        ax.tick_params(labelsize=6)
    total = sum(int(b.sum()) for b in bad_v.values())
    per_rule = "; ".join(f"{r}: " + ", ".join(f"{n} {c}" for n, c in cs.items()) for r, cs in counts.items())
    title = (f"{case}: meshes (world mm, ITK/LPS); {total} penetrating vertices (red)"
             + (f"; mesh TVS {format_value(mesh_tvs, 4)}" if mesh_tvs is not None else "")
             + (f"\n{per_rule}" if per_rule else "\nno rule between these meshes")
             + (f"\ndecimated for drawing: {', '.join(decimated)}" if decimated else ""))
    fig.suptitle(title, fontsize=9)
    handles = [Patch(facecolor=to_rgba(_MESH_COLOURS[k % len(_MESH_COLOURS)], 0.5), label=n)
               for k, n in enumerate(shown)]
    handles.append(Line2D([], [], marker="o", color="red", linestyle="none", label="penetrating vertex / face"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    size = save_png(fig, path)
    return size, {"penetrating_vertices": counts, "penetrating_total": total, "skipped_rules": skipped,
                  "decimated": decimated, "tolerance_mm": tol_mm}
