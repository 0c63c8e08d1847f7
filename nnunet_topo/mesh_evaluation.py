"""Evaluation of predicted surface meshes against reference label maps (DESIGN §5 on meshes).

Per mesh structure (the dataset's ``mesh_structures``):

* **mesh Dice**: the predicted mesh is voxelised on the reference grid by occupancy (the winding number at every
  voxel centre mapped to world, inside = ``w > 0.5``; computed exactly by signed ray crossings, :class:`_ColumnCrossings`,
  which for a closed mesh equals the solid-angle sum of :func:`nnunet_topo.occupancy.winding_number`)
  and compared with ``isin(reference, structure label ids)``;
* **Chamfer** and **HD95** in mm against the reference surface ``meshes.mesh_from_mask(reference structure,
  geometry)`` (:mod:`nnunet_topo.metrics.mesh`: area-uniform samples, exact point-to-triangle distances);
* **Laplacian smoothness energy** (mm²) and enclosed **volume** (mm³) of the predicted mesh.

**Mesh TVS** (TPM, C. Zhang et al., arXiv:2503.07874, Eq. 13)::

    TVS = ( sum_{exclusion (A, B)} vol(in(A) & in(B)) + sum_{inclusion (I in O | M)} vol(in(I) & ~(in(O) | in(M))) )
          / sum_{mesh structures X} reference volume of region(X)

The denominator is Eq. 13's ``Σ_i |V_i|``, the sum of the reference volumes of the mesh structures (for the usual
cardiac meshes LV_endo, LV_epi = LV+MYO and RV: the reference foreground plus the LV cavity once more, about 1.32x
the foreground on ACDC); ``TVS_per_rule`` uses the same denominator, so the rules' values add up to ``TVS``. The
value over the reference foreground volume, which this module called TVS before, is kept as ``TVS_over_foreground``
(documentation/metrics.md says how the two relate). The rules are the mesh-level rules in force
(:func:`nnunet_topo.topology_spec.mesh_rules_in_force`): the dataset's ``mesh_rules`` (``mesh_exclusion``: the two meshes
must not overlap, contact allowed; ``mesh_inclusion``: one mesh inside another) and the voxel rules whose
structures are mesh structures, read on the meshes.

The violating volumes are measured **exactly by mesh booleans** (:mod:`nnunet_topo.mesh_booleans`) where the rule's
meshes are valid closed manifolds without self-intersection (checked per case; :func:`mesh_rule_volumes`), and
otherwise, with the mesh and the reason reported, on a **fine isotropic world grid** (cell centres, step
``h = min(1 mm, finest spacing of the reference)``, reported as ``grid_mm``), not at the reference voxel centres: with 10 mm slices a
penetration thinner than a slice would be missed. Only the box where a violation can lie is sampled (the
intersection of the two meshes' bounding boxes for an exclusion, the inner mesh's box for an inclusion), in slabs
of at most ``_GRID_POINTS`` points (bounded memory); inside/outside at every cell centre by signed ray
crossings (:class:`_ColumnCrossings`: O(cells + covered lines), not O(cells x faces)). Reference volumes are
``voxels x voxel volume``.

A rule is evaluated when its meshes were predicted; other rules are skipped and listed with the reason (a voxel
rule whose structures are no mesh structures, or whose check on the meshes a mesh rule already states, too).
A voxel inclusion's ``may_touch`` joins the outer mesh only if it has a mesh itself (otherwise the rule is evaluated
without it and this is noted). 2d-mode rules are evaluated in 3D here: an overlap of two closed surfaces is a volume
whatever the slice axis.

Everything is in world coordinates (mm, ITK/LPS); the reference's geometry comes from nnU-Net's reader
(:meth:`ImageGeometry.from_nnunet_properties`). nnU-Net glue only in :func:`evaluate_mesh_folder`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import trimesh

from nnunet_topo.frames import ImageGeometry, world_to_index
from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS, read_mesh
from nnunet_topo.surfaces import MeshBuildError, mesh_from_mask
from nnunet_topo.metrics.mesh import laplacian_smoothness_energy, mesh_volume, surface_distances_mesh
from nnunet_topo.topology_spec import (InclusionRule, MeshExclusionRule, TopologySpec, mesh_rule_meshes, mesh_rules_in_force,
                                spec_from_dataset_json)
from nnunet_topo.paths import read_json, reading
from nnunet_topo.summary_io import ignore_label_of, load_json_arg, mean_and_count, nanmean, to_builtin
from nnunet_topo.voxelize import RAY_JITTER  # offset of the ray lines from the grid points (one definition)

__all__ = [
    "MeshEvaluationError",
    "voxelize_mesh",
    "mesh_tvs_grid_step",
    "violating_volume_mm3",
    "evaluate_mesh_case",
    "evaluate_mesh_folder",
    "aggregate_mesh_cases",
    "merge_mesh_summary",
]

#: grid points per slab of the mesh-TVS grid (~0.1 GB of float64 coordinates and results at most)
_GRID_POINTS = 2 ** 21


class MeshEvaluationError(ValueError):
    """Bad input to the mesh evaluator (missing mesh files, unknown structures, broken meshes)."""


def voxelize_mesh(mesh: trimesh.Trimesh, shape_zyx: Sequence[int], geometry: ImageGeometry) -> np.ndarray:
    """Boolean ``(Z, Y, X)`` occupancy of a closed world-space mesh on an image grid.

    A voxel is inside when the winding number of the mesh at its centre (mapped to world with ``geometry``) exceeds
    0.5, computed exactly by signed ray crossings along the image's x lines (:class:`_ColumnCrossings`; equal to the
    solid-angle winding number of :func:`nnunet_topo.occupancy.winding_number` for a closed mesh). Only voxels in
    the mesh's bounding box (in index space, plus one voxel) are evaluated, in slabs; the rest are outside.
    """
    shape = tuple(int(s) for s in shape_zyx)
    out = np.zeros(shape, dtype=bool)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    if len(v) == 0 or len(f) == 0:
        return out
    idx = world_to_index(v, geometry)
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, np.array(shape) - 1)
    if np.any(hi < lo):
        return out  # the mesh lies outside the image
    n = hi - lo + 1
    # sign of the world -> index map's determinant (index order z, y, x): flips the crossings' signs if < 0
    jac = world_to_index(np.eye(3), geometry) - world_to_index(np.zeros((1, 3)), geometry)
    cc = _ColumnCrossings(idx - lo, f, n, float(np.sign(np.linalg.det(jac))))
    for i0, i1 in _slabs(n):
        out[lo[0] + i0:lo[0] + i1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = cc.inside(i0, i1)
    return out


def mesh_tvs_grid_step(spacing: Sequence[float]) -> float:
    """Step (mm) of the mesh-TVS grid: 1 mm, or the finest spacing of the reference if that is finer."""
    return float(min(1.0, min(float(x) for x in spacing)))


def _slabs(n: Sequence[int]):
    """``(i0, i1)`` ranges of the first axis of a grid of shape ``n``, at most ``_GRID_POINTS`` points each."""
    step = max(1, _GRID_POINTS // int(n[1] * n[2]))
    for i0 in range(0, int(n[0]), step):
        yield i0, min(int(n[0]), i0 + step)


class _ColumnCrossings:
    """Signed crossings of a closed triangle mesh with the lines of a regular grid along its last axis.

    The grid's points are the integer coordinates ``(i, j, k)``, ``0 <= i, j, k < shape``; ``grid_vertices`` are the
    mesh's vertices in those coordinates (any affine map of the world, ``orientation`` = the sign of its
    determinant). For a closed mesh the generalised winding number at a point equals the signed count of the
    surface crossings of any ray from it (each crossing ``+1`` where the surface leaves along the ray's direction,
    ``-1`` where it enters): here the ray along ``+k``. The crossings of every grid line are found by a 2D
    point-in-triangle test of the line's ``(i, j)`` in each triangle's projection (only the lines in its bounding
    box), so the occupancy of the whole grid costs O(grid points + covered lines), not O(points x faces) as the
    solid-angle sum does. The lines are offset by ``RAY_JITTER`` grid units (irrational ratio) so that none passes
    exactly through an edge or a vertex of a mesh, where the 2D test would count a crossing twice or not at all.
    Integer winding numbers (self-intersecting meshes included) match the exact solid-angle sum
    (tests/test_mesh_evaluation.py). :mod:`nnunet_topo.voxelize` is its torch twin (dense over (triangle, line)
    pairs, no host synchronisation; used for the losses' critical points).
    """

    def __init__(self, grid_vertices: np.ndarray, faces: np.ndarray, shape: Sequence[int], orientation: float = 1.0):
        self.shape = tuple(int(s) for s in shape)
        tri = np.asarray(grid_vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 3)
        a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
        # twice the signed area of the projection on (i, j): > 0 where the outward normal points along +k
        area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
        keep = area2 != 0  # triangles parallel to the lines cross none of them (the jitter avoids their edges)
        a, b, c, area2 = a[keep], b[keep], c[keep], area2[keep]
        ji, jj = RAY_JITTER
        lo = np.ceil(np.minimum(np.minimum(a, b), c)[:, :2] - (ji, jj)).astype(np.int64)
        hi = np.floor(np.maximum(np.maximum(a, b), c)[:, :2] - (ji, jj)).astype(np.int64)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(self.shape[:2]) - 1)
        ni, nj = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
        cnt = ni * nj
        t = np.repeat(np.arange(len(cnt)), cnt)  # candidate (triangle, line) pairs
        r = np.arange(len(t)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        i = lo[t, 0] + r // nj[t]
        j = lo[t, 1] + r % nj[t]
        pi, pj = i + ji, j + jj
        s = np.sign(area2[t])
        ta, tb, tc = a[t], b[t], c[t]

        def edge(p, q):  # twice the signed area of (p, q, line), times the triangle's orientation sign
            return s * ((q[:, 0] - p[:, 0]) * (pj - p[:, 1]) - (q[:, 1] - p[:, 1]) * (pi - p[:, 0]))

        w0, w1, w2 = edge(tb, tc), edge(tc, ta), edge(ta, tb)
        hit = (w0 > 0) & (w1 > 0) & (w2 > 0)
        w0, w1, w2, t, i, j = w0[hit], w1[hit], w2[hit], t[hit], i[hit], j[hit]
        ta, tb, tc, s = ta[hit], tb[hit], tc[hit], s[hit]
        k_cross = (w0 * ta[:, 2] + w1 * tb[:, 2] + w2 * tc[:, 2]) / (w0 + w1 + w2)
        # a crossing at k_cross counts for the points k < k_cross: acc[i, j, m] with m = #points below it
        m = np.clip(np.ceil(k_cross), 0, self.shape[2]).astype(np.int64)
        sign = (s * (1.0 if orientation > 0 else -1.0)).astype(np.int64)
        order = np.argsort(i, kind="stable")  # by i, so that a slab's crossings are one contiguous range
        self._i, self._j, self._m, self._sign = i[order], j[order], m[order], sign[order]

    def winding(self, i0: int, i1: int) -> np.ndarray:
        """Integer winding numbers ``(i1 - i0, n_j, n_k)`` of the grid points with ``i0 <= i < i1``."""
        n_j, n_k = self.shape[1], self.shape[2]
        a, b = np.searchsorted(self._i, [i0, i1])
        acc = np.zeros((i1 - i0, n_j, n_k + 1), dtype=np.int32)
        np.add.at(acc, (self._i[a:b] - i0, self._j[a:b], self._m[a:b]), self._sign[a:b])
        # w(k) = sum of the crossings above k = sum_{m > k} acc[m]
        tail = np.cumsum(acc[..., ::-1], axis=-1)[..., ::-1]
        return tail[..., 1:]

    def inside(self, i0: int, i1: int) -> np.ndarray:
        """``winding > 1/2`` (the exact solid-angle winding number's inside test) on slab ``[i0, i1)``."""
        return self.winding(i0, i1) > 0


def violating_volume_mm3(first: trimesh.Trimesh, second: Sequence[trimesh.Trimesh], exclusion: bool,
                         h: float) -> float:
    """Volume (mm³) inside ``first`` and inside ``second[0]`` (``exclusion``), or inside ``first`` and outside every
    mesh of ``second`` (an inclusion's outer mesh and allowed openings), on the world grid of step ``h`` mm.

    The grid's cells cover the box where a violation can lie (``first``'s bounding box, intersected with
    ``second[0]``'s for an exclusion); a cell counts ``h³`` when its centre is inside / outside (winding number by
    signed ray crossings along world z, :class:`_ColumnCrossings`), evaluated in slabs of at most ``_GRID_POINTS``.
    """
    lo, hi = np.asarray(first.bounds[0], float), np.asarray(first.bounds[1], float)
    if exclusion:
        lo, hi = np.maximum(lo, second[0].bounds[0]), np.minimum(hi, second[0].bounds[1])
        if np.any(hi <= lo):
            return 0.0
    n = np.maximum(np.ceil((hi - lo) / h).astype(int), 0)
    if np.any(n == 0):
        return 0.0

    def crossings(m: trimesh.Trimesh) -> _ColumnCrossings:  # cell centre lo + (i + 1/2) h -> grid point i
        return _ColumnCrossings((np.asarray(m.vertices, np.float64) - lo) / h - 0.5, np.asarray(m.faces), n)

    c_first, c_second = crossings(first), [crossings(m) for m in second]
    count = 0
    for i0, i1 in _slabs(n):
        inside = c_first.inside(i0, i1)
        if exclusion:
            inside &= c_second[0].inside(i0, i1)
        else:
            for c in c_second:
                inside &= ~c.inside(i0, i1)
        count += int(np.count_nonzero(inside))
    return count * h ** 3


def mesh_rule_volumes(meshes: Mapping[str, trimesh.Trimesh], spec: TopologySpec, h: float,
                      method: str = "exact") -> dict:
    """The volume violating each mesh rule in force (the numerators of the mesh TVS), for one case's meshes.

    ``method="exact"``: by mesh booleans (:mod:`nnunet_topo.mesh_booleans`) where every mesh of the rule is a valid
    closed manifold without self-intersection; a rule with an invalid mesh is measured on the world grid of step
    ``h`` (:func:`violating_volume_mm3`) and the mesh is listed with the reason. ``method="grid"``: the grid for all.

    Returns:
        ``{"violating_volume_mm3": {rule: mm³}, "method": {rule: "exact" | "grid"}, "invalid_meshes": {mesh: reason},
        "skipped_rules": {rule: reason}, "notes": {rule: note}}``.
    """
    if method not in ("exact", "grid"):
        raise ValueError(f"method must be 'exact' or 'grid', got {method!r}")
    from nnunet_topo.mesh_booleans import exact_violating_volume_mm3, mesh_invalid_reason

    in_force, not_on_meshes = mesh_rules_in_force(spec)
    skipped: Dict[str, str] = dict(not_on_meshes)
    notes: Dict[str, str] = {}
    voxel_rules = {r.name: r for r in spec.rules}
    invalid: Dict[str, str] = {}
    checked: Dict[str, bool] = {}

    def valid(name: str) -> bool:
        if name not in checked:
            reason = mesh_invalid_reason(meshes[name])
            checked[name] = reason is None
            if reason:
                invalid[name] = reason
        return checked[name]

    violating: Dict[str, float] = {}
    used: Dict[str, str] = {}
    for rule in in_force:
        lack = [m for m in mesh_rule_meshes(rule) if m not in meshes]
        if lack:
            skipped[rule.name] = f"no predicted mesh for {lack}"
            continue
        if isinstance(rule, MeshExclusionRule):
            names, exclusion = [rule.a, rule.b], True
        else:
            names, exclusion = [rule.inner, rule.outer] + [m for m in rule.may_touch if m in meshes], False
            src = voxel_rules.get(rule.name)
            if isinstance(src, InclusionRule) and src.may_touch is not None:
                if not rule.may_touch:
                    notes[rule.name] = f"may_touch {src.may_touch.name!r} has no mesh; evaluated without it"
                elif rule.may_touch[0] not in meshes:
                    notes[rule.name] = f"may_touch mesh {rule.may_touch[0]!r} was not predicted; evaluated without it"
        first, second = meshes[names[0]], [meshes[n] for n in names[1:]]
        if method == "exact" and all(valid(n) for n in names):
            violating[rule.name] = exact_violating_volume_mm3(first, second, exclusion, check=False)
            used[rule.name] = "exact"
        else:
            violating[rule.name] = violating_volume_mm3(first, second, exclusion, h)
            used[rule.name] = "grid"
            if method == "exact":
                bad = [n for n in names if n in invalid]
                notes[rule.name] = (f"measured on the {h:g} mm grid: mesh(es) {bad} not valid for exact booleans "
                                    f"({'; '.join(f'{n}: {invalid[n]}' for n in bad)})")
    return {"violating_volume_mm3": violating, "method": used, "invalid_meshes": invalid, "skipped_rules": skipped,
            "notes": notes}


def evaluate_mesh_case(ref_label_map: np.ndarray, geometry: ImageGeometry,
                       predicted_meshes: Mapping[str, trimesh.Trimesh], spec: TopologySpec,
                       num_samples: int = 20000, seed: int = 0, ignore_label: Optional[int] = None,
                       method: str = "exact") -> dict:
    """Mesh metrics and mesh TVS of one case.

    A sparse reference (voxels with nnU-Net's ``ignore_label``, unknown): mesh Dice is taken over the annotated
    voxels (as nnU-Net's Dice); Chamfer and HD95 against the reference surface are undefined (NaN, with a note):
    the surface of a partly annotated structure is not known; the reference volume of a mesh structure (mesh-TVS
    denominator) is its annotated reference volume plus the ignored voxels inside its predicted mesh, the foreground
    of ``TVS_over_foreground`` the annotated foreground plus the ignored voxels inside any predicted mesh (the ignore
    label shrinks neither).

    Args:
        ref_label_map: ``(Z, Y, X)`` integer reference label map.
        geometry: its geometry (world mm).
        predicted_meshes: ``{mesh structure name: closed world-space trimesh}``; names must be keys of
            ``spec.mesh_structures``.
        spec: the dataset's topology spec (``mesh_structures`` and ``rules``).
        num_samples, seed: surface samples per mesh for Chamfer/HD95 (:mod:`nnunet_topo.metrics.mesh`).

    Returns:
        ``{"mesh_metrics": {structure: {"Dice", "Chamfer_mm", "HD95_mm", "laplacian_energy_mm2", "volume_mm3",
        "volume_ref_mm3", "n_inside", "n_ref"}}, "mesh_topology": {"TVS" (Eq. 13: over the sum of the mesh
        structures' reference volumes), "TVS_per_rule", "violating_volume_mm3", "reference_volume_sum_mm3",
        "reference_volumes_mm3" (per mesh structure), "TVS_over_foreground", "TVS_over_foreground_per_rule",
        "reference_foreground_mm3", "grid_mm" (step of the mesh-TVS grid), "evaluated_rules", "skipped_rules",
        "notes", "missing_structures", "method" ({rule: "exact" | "grid"}), "invalid_meshes" ({structure:
        reason})}}`` (plain Python numbers; NaN where undefined). ``method="grid"`` measures every rule on the grid.

    Raises:
        MeshEvaluationError: a mesh name that is not a mesh structure of the spec, or a non-3D reference.
    """
    ref = np.asarray(ref_label_map)
    if ref.ndim != 3:
        raise MeshEvaluationError(f"the reference must be a 3D (Z, Y, X) label map, got shape {ref.shape}")
    unknown = [n for n in predicted_meshes if n not in spec.mesh_structures]
    if unknown:
        raise MeshEvaluationError(f"mesh(es) {unknown} are not mesh structures of the dataset; known: "
                                  f"{sorted(spec.mesh_structures)} (dataset.json topology.mesh_structures)")
    vv = geometry.voxel_volume
    ignored = ref == ignore_label if ignore_label is not None else np.zeros(ref.shape, dtype=bool)
    sparse = bool(ignored.any())
    occ: Dict[str, np.ndarray] = {}
    metrics: Dict[str, dict] = {}
    notes: Dict[str, str] = {}
    for name, mesh in predicted_meshes.items():
        ids = list(spec.mesh_structures[name].label_ids)
        ref_mask = np.isin(ref, ids)
        o = voxelize_mesh(mesh, ref.shape, geometry)
        occ[name] = o
        o_known = o & ~ignored if sparse else o
        n_in, n_ref = int(o_known.sum()), int(ref_mask.sum())
        inter = int(np.count_nonzero(o_known & ref_mask))
        m: Dict[str, Any] = {"Dice": (2 * inter / (n_in + n_ref)) if n_in + n_ref > 0 else math.nan,
                             "n_inside": n_in, "n_ref": n_ref, "volume_ref_mm3": n_ref * vv}
        if sparse:
            m["Chamfer_mm"] = m["HD95_mm"] = math.nan
            notes[name] = ("sparse reference (ignored voxels): Chamfer and HD95 are undefined; Dice over the "
                           "annotated voxels")
        elif n_ref > 0:
            ref_mesh = mesh_from_mask(ref_mask, geometry)
            d_ab, d_ba = surface_distances_mesh(mesh, ref_mesh, num_samples, seed)
            if len(d_ab) and len(d_ba):
                m["Chamfer_mm"] = float((np.mean(d_ab) + np.mean(d_ba)) / 2)
                m["HD95_mm"] = float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
            else:
                m["Chamfer_mm"] = m["HD95_mm"] = math.nan
        else:
            m["Chamfer_mm"] = m["HD95_mm"] = math.nan  # no reference surface
        m["laplacian_energy_mm2"] = float(laplacian_smoothness_energy(np.asarray(mesh.vertices, np.float64),
                                                                       np.asarray(mesh.faces, np.int64)))
        m["volume_mm3"] = float(mesh_volume(mesh))
        metrics[name] = m
    missing = [n for n in spec.mesh_structures if n not in predicted_meshes]

    # Eq. 13's denominator: the sum of the reference volumes of the mesh structures (sparse: plus the ignored
    # voxels inside the structure's predicted mesh, as for the foreground below)
    ref_volumes: Dict[str, float] = {}
    for name, structure in spec.mesh_structures.items():
        n = int(np.count_nonzero(np.isin(ref, list(structure.label_ids)) & ~ignored))
        if sparse and name in occ:
            n += int(np.count_nonzero(ignored & occ[name]))
        ref_volumes[name] = n * vv
    ref_sum_mm3 = float(sum(ref_volumes.values()))
    ref_fg = int(np.count_nonzero((ref != 0) & ~ignored))
    if sparse and occ:
        ref_fg += int(np.count_nonzero(ignored & np.logical_or.reduce(list(occ.values()))))
    ref_fg_mm3 = ref_fg * vv
    h = mesh_tvs_grid_step(geometry.spacing_xyz)
    rv = mesh_rule_volumes(predicted_meshes, spec, h, method)
    violating, skipped = rv["violating_volume_mm3"], rv["skipped_rules"]
    notes.update(rv["notes"])

    def ratio(v: float, d: float) -> float:
        return v / d if d > 0 else math.nan

    tvs_per_rule = {r: ratio(v, ref_sum_mm3) for r, v in violating.items()}
    tvs = ratio(sum(violating.values()), ref_sum_mm3) if violating else math.nan
    topology = {"TVS": tvs, "TVS_per_rule": tvs_per_rule, "violating_volume_mm3": violating,
                "reference_volume_sum_mm3": ref_sum_mm3, "reference_volumes_mm3": ref_volumes,
                "TVS_over_foreground": ratio(sum(violating.values()), ref_fg_mm3) if violating else math.nan,
                "TVS_over_foreground_per_rule": {r: ratio(v, ref_fg_mm3) for r, v in violating.items()},
                "reference_foreground_mm3": ref_fg_mm3, "grid_mm": h, "evaluated_rules": list(violating),
                "skipped_rules": skipped, "notes": notes, "missing_structures": missing,
                "method": rv["method"], "invalid_meshes": rv["invalid_meshes"]}
    return {"mesh_metrics": metrics, "mesh_topology": topology}


# ----------------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------------

def mesh_files_from_json(mesh_folder: str, case_names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, str]]:
    """``{case: {structure: path}}`` of the cases ``meshes.json`` (nnUNetv2_topo_predict_meshes) lists with meshes
    (cases it gave no mesh are left out; :func:`no_mesh_reasons`). ``case_names`` is not used (the listing is
    the truth); kept for the caller's symmetry with :func:`mesh_files_by_name`."""
    listing = read_json(os.path.join(mesh_folder, "meshes.json"), "meshes.json")
    cases = listing.get("cases")
    if not isinstance(cases, dict):
        raise MeshEvaluationError(f"{mesh_folder}/meshes.json has no 'cases' table (written by "
                                  "nnUNetv2_topo_predict_meshes)")
    out = {}
    for case, entry in cases.items():
        if isinstance(entry, dict) and entry.get("error") and not entry.get("files"):
            continue  # nnUNetv2_topo_predict_meshes wrote no mesh for this case (its reason is in meshes.json)
        files = entry.get("files", entry) if isinstance(entry, dict) else None
        if not isinstance(files, dict):
            raise MeshEvaluationError(f"meshes.json: case {case!r} lists no files")
        out[case] = {s: os.path.join(mesh_folder, fn) for s, fn in files.items()}
    return out


def no_mesh_reasons(mesh_folder: str) -> Dict[str, str]:
    """``{case: error}`` of the cases nnUNetv2_topo_predict_meshes gave no mesh (empty without a meshes.json)."""
    path = os.path.join(mesh_folder, "meshes.json")
    if not os.path.isfile(path):
        return {}
    cases = read_json(path, "meshes.json").get("cases", {})
    if not isinstance(cases, dict):
        return {}
    return {c: str(e["error"]) for c, e in cases.items() if isinstance(e, dict) and e.get("error")}


def mesh_files_by_name(mesh_folder: str, case_names: Sequence[str], structures: Sequence[str]
                       ) -> Dict[str, Dict[str, str]]:
    """``{case: {structure: path}}`` of the files ``CASE_<structure><ext>`` in a folder without ``meshes.json``."""
    present = set(os.listdir(mesh_folder))
    out: Dict[str, Dict[str, str]] = {}
    for case in case_names:
        found = {}
        for s in structures:
            hits = [f"{case}_{s}{e}" for e in SUPPORTED_MESH_EXTENSIONS if f"{case}_{s}{e}" in present]
            if len(hits) > 1:
                raise MeshEvaluationError(f"case {case}, structure {s!r}: several mesh files {hits}; keep one")
            if hits:
                found[s] = os.path.join(mesh_folder, hits[0])
        if found:
            out[case] = found
    return out


def evaluate_mesh_folder(ref_folder: str, mesh_folder: str, dataset_json: Union[str, os.PathLike, dict],
                         spec: Optional[TopologySpec] = None, num_samples: int = 20000, chill: bool = False,
                         output_file: Optional[str] = None, show_progress: bool = True) -> dict:
    """Evaluate the meshes of ``mesh_folder`` against the reference label maps of ``ref_folder``.

    Mesh files are taken from ``mesh_folder/meshes.json`` (written by ``nnUNetv2_topo_predict_meshes``) or, without
    it, found as ``CASE_<structure>.<ext>`` (``.vtk .vtp .ply .obj .stl``) for the reference cases ``CASE<file
    ending>``. Every mesh structure of the spec must have a file for every evaluated case.

    Returns (and writes to ``output_file`` if given, ``.json``)::

        {"metric_per_case": [{"case", "reference_file", "mesh_files", "mesh_metrics", "mesh_topology"}],
         "mesh_mean": {structure: {metric: NaN-ignoring mean}}, "mesh_foreground_mean": {metric: mean over
         structures}, "mesh_topology_mean": {"TVS", "TVS_per_rule", "TVS_over_foreground", "num_cases", "grid_mm" (the
         grid steps used)}, "mesh_structures": [...]}

    :func:`merge_mesh_summary` adds these to a ``summary_topology.json`` dict.

    Raises:
        MeshEvaluationError: folders missing, no mesh for any case, a listed or expected mesh file missing
            (naming case and structure), reference cases without meshes (unless ``chill``), unreadable meshes.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = load_json_arg(dataset_json, "dataset.json")
    for folder, what in ((ref_folder, "reference folder"), (mesh_folder, "mesh folder")):
        if not os.path.isdir(folder):
            raise MeshEvaluationError(f"{what} not found: {folder}")
    if spec is None:
        spec = spec_from_dataset_json(dataset_json)
    ignore_label = ignore_label_of(dataset_json)
    structures = list(spec.mesh_structures)
    if not structures:
        raise MeshEvaluationError("the dataset's topology block defines no mesh_structures; nothing to evaluate")
    file_ending = dataset_json["file_ending"]
    ref_files = sorted(f for f in os.listdir(ref_folder) if f.endswith(file_ending))
    if not ref_files:
        raise MeshEvaluationError(f"no reference label maps ending in {file_ending!r} in {ref_folder}")
    case_names = [f[: -len(file_ending)] for f in ref_files]
    if os.path.isfile(os.path.join(mesh_folder, "meshes.json")):
        files = mesh_files_from_json(mesh_folder, case_names)
        unknown = [c for c in files if c not in case_names]
        if unknown:
            raise MeshEvaluationError(f"meshes.json lists case(s) without a reference in {ref_folder}: {unknown[:10]}")
    else:
        files = mesh_files_by_name(mesh_folder, case_names, structures)
    if not files:
        raise MeshEvaluationError(f"no mesh files CASE_<structure>.<ext> (structures {structures}) and no meshes.json "
                                  f"in {mesh_folder}")
    for case, fs in files.items():
        for s in structures:
            if s not in fs:
                raise MeshEvaluationError(f"case {case}: no mesh file for structure {s!r} in {mesh_folder} "
                                          f"(expected {case}_{s}.vtk or another of {SUPPORTED_MESH_EXTENSIONS})")
            if not os.path.isfile(fs[s]):
                raise MeshEvaluationError(f"case {case}, structure {s!r}: mesh file not found: {fs[s]}")
    missing_cases = [c for c in case_names if c not in files]
    if missing_cases and not chill:
        reasons = no_mesh_reasons(mesh_folder)
        why = "; ".join(f"{c}: {reasons[c]}" for c in missing_cases[:3] if c in reasons)
        raise MeshEvaluationError(f"{len(missing_cases)} reference case(s) have no meshes in {mesh_folder}: "
                                  f"{missing_cases[:10]} (pass chill=True / --chill to evaluate only those predicted)"
                                  + (f". meshes.json says why: {why}" if why else ""))
    with reading("reference", os.path.join(ref_folder, ref_files[0])):
        rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(ref_folder, ref_files[0]))()
    it = [c for c in case_names if c in files]
    if show_progress:
        try:
            from tqdm import tqdm
            it = tqdm(it, desc="mesh evaluation")
        except ImportError:  # pragma: no cover
            pass
    cases = []
    for case in it:
        ref_file = os.path.join(ref_folder, case + file_ending)
        with reading("reference", ref_file):
            seg, props = rw.read_seg(ref_file)
            seg = np.asarray(seg)
        if seg.ndim == 4:
            seg = seg[0]
        geometry = ImageGeometry.from_nnunet_properties(props)
        meshes = {}
        for s in structures:
            try:
                meshes[s] = read_mesh(files[case][s])
            except (ValueError, OSError) as e:
                raise MeshEvaluationError(f"case {case}, structure {s!r}: cannot read {files[case][s]}: {e}") from e
        try:
            result = evaluate_mesh_case(seg, geometry, meshes, spec, num_samples=num_samples,
                                        ignore_label=ignore_label)
        except MeshBuildError as e:
            raise MeshEvaluationError(f"case {case}: {e}") from e
        cases.append({"case": case, "reference_file": ref_file, "mesh_files": files[case], **result})
    summary = {"metric_per_case": cases, **aggregate_mesh_cases(cases, spec), "mesh_structures": structures}
    summary = to_builtin(summary)
    if output_file is not None:
        if not output_file.endswith(".json"):
            raise MeshEvaluationError(f"output_file must end with .json, got {output_file}")
        with open(output_file, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def aggregate_mesh_cases(cases: List[dict], spec: TopologySpec) -> dict:
    """``mesh_mean`` (per structure), ``mesh_foreground_mean`` and ``mesh_topology_mean`` over cases."""
    structures = list(spec.mesh_structures)
    keys = ["Dice", "Chamfer_mm", "HD95_mm", "laplacian_energy_mm2", "volume_mm3", "volume_ref_mm3"]
    per = {s: {k: mean_and_count([c["mesh_metrics"][s][k] for c in cases if s in c["mesh_metrics"]]) for k in keys}
           for s in structures}
    mean = {s: {k: v[0] for k, v in d.items()} for s, d in per.items()}
    mean_n = {s: {k: v[1] for k, v in d.items()} for s, d in per.items()}
    fg = {k: nanmean(mean[s][k] for s in structures) for k in keys}
    rules = sorted({r for c in cases for r in c["mesh_topology"]["TVS_per_rule"]})
    tvs, tvs_n = mean_and_count([c["mesh_topology"]["TVS"] for c in cases])
    topo = {"num_cases": len(cases), "TVS": tvs, "TVS_num_cases": tvs_n,
            "grid_mm": sorted({c["mesh_topology"].get("grid_mm") for c in cases} - {None}),
            "TVS_per_rule": {r: nanmean(c["mesh_topology"]["TVS_per_rule"].get(r) for c in cases) for r in rules},
            # the other normalisation (over the reference foreground; documentation/metrics.md "Mesh TVS")
            "TVS_over_foreground": nanmean(c["mesh_topology"].get("TVS_over_foreground", math.nan) for c in cases),
            # how the violating volumes were measured: (case, rule) pairs by exact booleans / on the grid, and the
            # cases with a mesh that is not a valid closed manifold (issue 25)
            "rules_exact": sum(v == "exact" for c in cases for v in c["mesh_topology"].get("method", {}).values()),
            "rules_grid": sum(v == "grid" for c in cases for v in c["mesh_topology"].get("method", {}).values()),
            "cases_with_invalid_meshes": sum(bool(c["mesh_topology"].get("invalid_meshes")) for c in cases)}
    return {"mesh_mean": mean, "mesh_mean_num_cases": mean_n, "mesh_foreground_mean": fg,
            "mesh_topology_mean": topo}


def merge_mesh_summary(summary: dict, mesh_summary: dict) -> dict:
    """Add a :func:`evaluate_mesh_folder` result to a ``summary_topology.json`` dict (in place; returned).

    Each entry of ``summary["metric_per_case"]`` whose reference file has the case's name gets ``mesh_metrics``
    and ``mesh_topology``; the top level gets ``mesh_mean``, ``mesh_foreground_mean``, ``mesh_topology_mean``
    and ``mesh_structures``. Cases evaluated on meshes but absent from ``summary`` are listed under
    ``mesh_only_cases`` (with their full entries).
    """
    by_case = {c["case"]: c for c in mesh_summary["metric_per_case"]}
    used = set()
    for entry in summary.get("metric_per_case", []):
        ref = os.path.basename(entry.get("reference_file", ""))
        for case, c in by_case.items():
            if ref.startswith(case) and case not in used and ref[len(case):].startswith("."):
                entry["mesh_metrics"] = c["mesh_metrics"]
                entry["mesh_topology"] = c["mesh_topology"]
                entry["mesh_files"] = c["mesh_files"]
                used.add(case)
                break
    for k in ("mesh_mean", "mesh_mean_num_cases", "mesh_foreground_mean", "mesh_topology_mean", "mesh_structures"):
        summary[k] = mesh_summary[k]
    extra = [c for case, c in by_case.items() if case not in used]
    if extra:
        summary["mesh_only_cases"] = extra
    return summary
