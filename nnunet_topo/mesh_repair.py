"""Mesh repair: surfaces that provably do not penetrate each other, for simulation (issue 25 item 2).

TPM reduces the violations of the mesh-level rules; a tissue-mechanics or electrophysiology simulation needs none.
For every mesh rule in force (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`: ``mesh_exclusion`` — the two enclosed
volumes must not overlap —, ``mesh_inclusion`` — the inner mesh inside the outer one or its allowed openings —, and
the voxel rules read on meshes) the repair moves the vertices of one mesh of the rule:

* **which mesh moves**: the inner mesh of an inclusion (it is pulled inward), the first mesh of an exclusion
  (``"meshes": [A, B]``: A is pushed out of B; order the rule to choose, e.g. ``["RV", "LV_epi"]`` keeps the LV
  epicardium and moves the RV's septal wall);
* **which vertices, how far**: only vertices closer than the gap ``g`` to the wrong side (signed distance to the
  fixed surface by exact closest points, :func:`nnunet_topo.metrics.mesh.closest_points_on_surface`, and the exact
  winding number for the side) are placed at distance ``g`` on the right side of their closest point, i.e. moved by
  their penetration depth plus ``g``; their neighbours up to ``rings`` edges away follow by a harmonic extension
  of those displacements (zero beyond), so the surface bends smoothly instead of growing spikes;
* **until exactly verified**: iterated until no vertex violates *and* the exact check passes — the violating volume
  by mesh booleans is 0 (:mod:`nnunet_topo.mesh_booleans`), the surfaces are at least ``g`` (1 - 1e-3) apart
  (manifold3d ``min_gap``: triangle to triangle, so a face of the fixed mesh that pokes between the moved vertices
  is caught) and the moved mesh does not intersect itself. Where the gap check fails although every vertex is far
  enough (a triangle's chord sagging towards the fixed mesh), the target gap of the vertices near the fixed
  surface grows by ``g / 4`` per round (:class:`_WidenWatch`: 8 rounds, more only while each one widens the verified
  gap, 32 at most; a mesh whose vertices are all clear while the volumes still overlap, e.g. one mesh swallowed by
  the other, is no local defect and is reported as not repairable).

Rules are repaired in order, in rounds (a mesh moved by one rule may be the fixed mesh of another), until every
rule passes the exact check in the same round, or :class:`MeshRepairError` names the case and rule. A mesh that
crosses itself on input (a fold of a deformed template; predicted meshes often have a few) is untangled first: the
neighbourhood of its crossing faces is relaxed tangentially until no face crosses another (its vertices count as
moved). With ``tangled="remesh"`` (the default), a mesh still crossing itself then, or one the vertex loop folds
while pushing it, is re-meshed as the boundary of the volume it encloses, carved by the rules it moves in
(:func:`nnunet_topo.remesh.remesh_enclosed_volume`; its vertex correspondence is lost). Open or non-manifold
meshes are errors. The input meshes are never touched; per case
and mesh the self-crossing face pairs found on input, the maximum and mean vertex displacement, the number of moved
vertices and, per rule, the violating volume before/after and the gap after are reported.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import trimesh

from nnunet_topo.mesh_booleans import (common_origin, exact_violating_volume_mm3, manifold_of, mesh_invalid_reason,
                                       self_intersecting_faces)
from nnunet_topo.metrics.mesh import closest_points_on_surface
from nnunet_topo.remesh import RemeshError, remesh_enclosed_volume, transfer_point_data
from nnunet_topo.topology_spec import MeshExclusionRule, TopologySpec, mesh_rule_meshes, mesh_rules_in_force

__all__ = ["MeshRepairError", "DEFAULT_GAP_MM", "format_repair_table", "repair_case", "repair_mesh_folder",
           "surface_gap_mm"]

#: default margin between repaired surfaces (mm): above the float32 noise of mesh files and the voxel-free contact
DEFAULT_GAP_MM = 0.5


class MeshRepairError(ValueError):
    """A case the repair cannot fix (the message names the case, the rule and why)."""


class _FoldedError(MeshRepairError):
    """The vertex loop made the moving mesh cross itself and untangling did not undo it."""


# ------------------------------------------------------------------------------------------------ geometry
def _inside(points: np.ndarray, mesh: trimesh.Trimesh) -> np.ndarray:
    """Exact winding number > 1/2 (float64 solid angles, :func:`nnunet_topo.occupancy.winding_number`)."""
    import torch

    from nnunet_topo.occupancy import winding_number

    w = winding_number(torch.as_tensor(points, dtype=torch.float64),
                       torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float64),
                       torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64))
    return (w > 0.5).numpy()


class _SideCache:
    """Which side of a closed surface points are on, by the exact winding number (:func:`_inside`), recomputed only
    for points that may have crossed the surface since their last exact evaluation. A point cannot cross a surface
    that stays closed while their relative motion since then (bounded by the caller: ``drift``, per point or one
    number) is below the point's distance to the surface then; such a point keeps its side. Exact, not an estimate:
    it spares the repair loop the winding number of the many vertices far from the other mesh (3/4 of its time)."""

    def __init__(self, n: int):
        self.side = np.zeros(n, bool)
        self.reach = np.full(n, -1.0)  # distance at the last evaluation less the drift since; <= 0: evaluate

    def inside(self, points: np.ndarray, mesh: trimesh.Trimesh, dist: np.ndarray, drift) -> np.ndarray:
        """``points`` (n, 3) inside ``mesh``; ``dist`` their distances to it now; ``drift`` how far each moved
        relative to the surface since the previous call (a bound)."""
        self.reach -= drift
        todo = self.reach <= 0
        if todo.any():
            self.side[todo] = _inside(points[todo], mesh)
            self.reach[todo] = dist[todo] * (1 - 1e-6)  # a little short of it: rounding of the distance
        return self.side.copy()


def _signed_side(points: np.ndarray, mesh: trimesh.Trimesh, with_face: bool = False,
                 sides: Optional[_SideCache] = None, drift=0.0):
    """``(closest point, signed distance (+ outside), outward unit direction at the closest point[, its face])``
    per point; the side from ``sides`` (kept where no point can have crossed, see :class:`_SideCache`) if given."""
    closest, dist, face = closest_points_on_surface(points, mesh)
    inside = _inside(points, mesh) if sides is None else sides.inside(points, mesh, dist, drift)
    sign = np.where(inside, -1.0, 1.0)
    offset = points - closest
    norm = np.linalg.norm(offset, axis=1)
    scale = 1e-9 * (1.0 + float(np.abs(points).max()))
    direction = np.where((norm > scale)[:, None], offset / np.maximum(norm, scale)[:, None] * sign[:, None],
                         np.asarray(mesh.face_normals)[face])
    return (closest, sign * dist, direction, face) if with_face else (closest, sign * dist, direction)


def surface_gap_mm(moving: trimesh.Trimesh, fixed: Sequence[trimesh.Trimesh], exclusion: bool,
                   search_mm: float) -> float:
    """Smallest distance (mm, at most ``search_mm``) between the surface of ``moving`` and the region it must
    avoid: the inside of ``fixed[0]`` (exclusion), or the outside of the union of ``fixed`` (inclusion). Triangle
    to triangle (manifold3d ``min_gap``); 0 where they overlap."""
    import manifold3d

    meshes = [moving] + list(fixed)
    origin = common_origin(meshes)  # the meshes' box starts at 0 after the shift
    a, *others = (manifold_of(m, origin) for m in meshes)
    if exclusion:
        return float(a.min_gap(others[0], search_mm))
    allowed = others[0]
    for o in others[1:]:
        allowed = allowed + o
    lo = np.full(3, -2 * search_mm - 1.0)
    hi = np.max([np.asarray(m.vertices, np.float64).max(axis=0) for m in meshes], axis=0) - origin + 2 * search_mm + 1
    outside = manifold3d.Manifold.cube(tuple(hi - lo)).translate(tuple(lo)) - allowed
    return float(a.min_gap(outside, search_mm))


def _neighbours(faces: np.ndarray, n: int):
    import scipy.sparse as sp

    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.float64)
    return a


def _harmonic_extension(adj, moved: np.ndarray, disp: np.ndarray, rings: int, iterations: int = 40) -> np.ndarray:
    """Displacements of the ``moved`` vertices kept; vertices up to ``rings`` edges away get the mean of their
    neighbours' (Jacobi iterations of the graph Laplace equation, zero beyond the rings): a smooth bump."""
    if rings <= 0:
        return disp
    free = _grow(adj, moved, rings) & ~moved
    if not free.any():
        return disp
    deg = np.asarray(adj.sum(axis=1)).ravel()
    out = disp.copy()
    for _ in range(iterations):
        avg = (adj @ out) / np.maximum(deg, 1)[:, None]
        out[free] = avg[free]
    return out


def _poke_displacements(v: np.ndarray, faces: np.ndarray, fixed: trimesh.Trimesh, gap: float,
                        tol: float, sides: Optional[_SideCache] = None, drift=0.0) -> np.ndarray:
    """Per vertex of the moving mesh ``(v, faces)``, the mean displacement that moves the faces the fixed mesh's
    vertices poke (inside the moving mesh, or closer than ``gap`` to it from the wrong side) ``gap`` beyond them:
    against the moving mesh's outward direction at the poked point, by the depth plus the gap (a fixed vertex
    short of it by ``tol`` or less is clear; ``sides``, ``drift``: :func:`_signed_side`'s, for the fixed vertices
    against the moving mesh)."""
    moving = trimesh.Trimesh(v, faces, process=False)
    _, sd, out, face = _signed_side(np.asarray(fixed.vertices, np.float64), moving, with_face=True, sides=sides,
                                    drift=drift)
    need = gap - sd  # the fixed vertices must stay outside the moving mesh by the gap
    hit = need > tol
    total = np.zeros_like(v)
    count = np.zeros(len(v))
    if hit.any():
        d = -out[hit] * need[hit][:, None]
        for k in range(3):
            idx = faces[face[hit], k]
            np.add.at(total, idx, d)
            np.add.at(count, idx, 1.0)
    return total / np.maximum(count, 1.0)[:, None]


def _untangle(v: np.ndarray, faces: np.ndarray, rings: int, attempts: int = 6) -> np.ndarray:
    """Relax the neighbourhood of a mesh's self-crossing faces (tangential smoothing, a growing neighbourhood) until
    no face crosses another; returns the vertices (unchanged where there was no crossing). The caller checks the
    result again."""
    adj = _neighbours(faces, len(v))
    for k in range(attempts):
        pairs = self_intersecting_faces(v, faces)
        if len(pairs) == 0:
            break
        region = np.zeros(len(v), bool)
        region[np.unique(faces[pairs.ravel()])] = True
        v = _relax(v, faces, adj, _grow(adj, region, rings + k), iterations=10)
    return v


def _grow(adj, region: np.ndarray, rings: int) -> np.ndarray:
    """``region`` and the vertices up to ``rings`` edges from it."""
    out = region.copy()
    for _ in range(rings):
        out = out | (adj @ out.astype(np.float64) > 0)
    return out


def _relax(v: np.ndarray, faces: np.ndarray, adj, region: np.ndarray, iterations: int = 2,
           weight: float = 0.5) -> np.ndarray:
    """Tangential Laplacian smoothing of the ``region``'s vertices: each moves ``weight`` of the way to its
    neighbours' mean, without the component along its vertex normal (so the surface does not shrink and the
    vertices keep their distance to the fixed mesh to first order); evens out the spacing and undoes folds."""
    deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1)[:, None]
    for _ in range(iterations):
        normals = trimesh.Trimesh(v, faces, process=False).vertex_normals
        delta = (adj @ v) / deg - v
        delta -= np.einsum("ij,ij->i", delta, normals)[:, None] * normals
        v = v.copy()
        v[region] += weight * delta[region]
    return v


# ------------------------------------------------------------------------------------------------ one rule
def _verify(moving, fixed, exclusion: bool, gap: float) -> Tuple[float, float, Optional[str]]:
    """``(violating volume mm³, surface gap mm, self-intersection reason or None)`` of one rule, exactly."""
    volume = exact_violating_volume_mm3(moving, list(fixed), exclusion, check=False)
    return volume, surface_gap_mm(moving, fixed, exclusion, 2 * gap + 1.0), mesh_invalid_reason(moving)


class _StallWatch:
    """When the vertex loop of :func:`_repair_rule` stops making progress, so that the exact check runs and the
    oscillating vertices are lifted clear (a stall) instead of trading moves until the iterations run out.

    A few vertices can trade tiny moves for ever (a push off one fixed face nudges a neighbour towards another, a
    poked face moves a vertex another rule point needs): ``after`` iterations in a row whose moves are all below a
    tenth of the gap are a stall. Or two sets of vertices trade moves that shrink too slowly (measured on ACDC, a
    head-only model's RV against LV_epi: the RV faces LV_epi's vertices poke and the RV vertices pushed off LV_epi
    alternate, the residual falling ~1.4 % per iteration, 0.6 mm to 0.044 mm in 200): no halving of the largest
    residual move within ``after`` iterations is a stall too, counted again from each stall."""

    def __init__(self, gap: float, after: int = 10):
        self.small, self.after = 0.1 * gap, after
        self.small_steps, self.it, self.best, self.it_best = 0, 0, math.inf, 0

    def stalled(self, residual: float) -> bool:
        """One iteration's largest residual move (mm, before the step): is the loop stalled?"""
        self.it += 1
        if residual < 0.5 * self.best:
            self.best, self.it_best = residual, self.it
        out = self.small_steps >= self.after or self.it - self.it_best >= self.after
        if out:
            self.best, self.it_best = residual, self.it
        return out

    def checked(self) -> None:
        """The exact check ran (and failed): the run of small steps starts again."""
        self.small_steps = 0

    def step(self, size: float) -> None:
        """The largest move the iteration made (mm)."""
        self.small_steps = self.small_steps + 1 if size < self.small else 0


class _WidenWatch:
    """Whether :func:`_repair_rule` widens the gap near the fixed surface once more (the chord case: every vertex
    clear, the exact gap short). Each round adds ``gap / 4`` there. The first ``rounds`` always run; beyond them a round
    runs only while the last one widened the verified gap by at least a 20th of the gap, and never more than
    ``max_rounds`` (bounded displacement: at most ``max_rounds * gap / 4`` beyond the gap). Measured on ACDC
    (a TPM model's LV_endo in LV_epi, edges of 7-8 mm, patient088): the verified gap grew ~0.1 mm a round and reached
    0.44 of 0.5 mm when the old fixed bound of 8 stopped it; a swallowed mesh's gap does not grow (stops after 8)."""

    def __init__(self, gap: float, rounds: int = 8, max_rounds: int = 32):
        self.gap, self.rounds, self.max_rounds = gap, rounds, max_rounds
        self.done, self.best = 0, -math.inf

    def more(self, verified_gap: float) -> bool:
        """The exact check failed with ``verified_gap`` (mm) and every vertex is clear: widen once more?"""
        grew = verified_gap >= self.best + 0.05 * self.gap
        self.best = max(self.best, verified_gap)
        if self.done >= self.max_rounds or (self.done >= self.rounds and not grew):
            return False
        self.done += 1
        return True


def _repair_rule(moving: trimesh.Trimesh, fixed: Sequence[trimesh.Trimesh], exclusion: bool, gap: float,
                 rings: int, max_iterations: int = 200) -> Tuple[np.ndarray, int, float, float]:
    """New vertices of ``moving`` that satisfy the rule with the gap, the iterations used, and the exact violating
    volume and surface gap that verified them (module docstring). Raises :class:`MeshRepairError` (without the
    case: the caller adds it)."""
    faces = np.asarray(moving.faces)
    v = np.array(moving.vertices, dtype=np.float64)
    adj = _neighbours(faces, len(v))
    extra = np.zeros(len(v))
    widen = _WidenWatch(gap)
    untangled, max_untangles = 0, 5
    edge = float(np.mean(moving.edges_unique_length)) if len(moving.edges_unique) else 1.0
    last = "no iteration ran"
    # vertices are placed slightly beyond the gap (the overshoot) and count as clear within a tolerance below it,
    # so that the loop does not creep towards the gap by ever smaller steps (closest points change faces as
    # vertices move); the exact verification accepts a gap of gap * (1 - 1e-3)
    overshoot, tol = 2e-3 * gap, 1e-3 * gap
    # stalls (oscillating vertices): :class:`_StallWatch`; after one the exact check runs, and if it fails the target
    # gap of the vertices still moving and their neighbours grows by gap / 8, and so does the gap poked faces keep,
    # so that they land clear of the oscillation (at most `max_unstalls` times)
    watch, unstalled, max_unstalls = _StallWatch(gap), 0, 8
    # the sides of the moving vertices against the fixed meshes, and of the fixed mesh's vertices against the moving
    # mesh, are recomputed only where they can have changed (:class:`_SideCache`): the drift of a moving vertex is
    # its own motion, that of a fixed vertex relative to the moving surface at most the largest vertex motion
    sides = [_SideCache(len(v)) for _ in fixed]
    poked_sides, last_v = _SideCache(len(fixed[0].vertices)), v.copy()
    for it in range(1, max_iterations + 1):
        motion, last_v = np.linalg.norm(v - last_v, axis=1), v.copy()
        target_gap = gap + overshoot + extra
        closest, sd, out = _signed_side(v, fixed[0], sides=sides[0], drift=motion)
        if exclusion:
            need = target_gap - sd  # sd > 0 outside the fixed mesh
            target = closest + out * target_gap[:, None]
        else:
            need = target_gap + sd  # depth inside the outer mesh is -sd
            target = closest - out * target_gap[:, None]
            for opening, opening_sides in zip(fixed[1:], sides[1:]):  # deep enough inside an allowed opening: fine
                _, sd_o, _ = _signed_side(v, opening, sides=opening_sides, drift=motion)
                need = np.where(-sd_o >= gap, -np.inf, need)
        # the other way round: a vertex of the fixed mesh inside the moving mesh, or nearer than the gap to its
        # surface from the wrong side, pokes between the moving mesh's vertices; the face it pokes moves away
        poke_gap = gap + overshoot + unstalled * gap / 8
        poke = (_poke_displacements(v, faces, fixed[0], poke_gap, tol, poked_sides, float(motion.max(initial=0.0)))
                if len(fixed) == 1 else np.zeros_like(v))
        poke_size = np.linalg.norm(poke, axis=1)
        moved = (need > tol) | (poke_size > tol)
        stalled = watch.stalled(max(float(need.max(initial=0.0)), float(poke_size.max(initial=0.0))))
        if not moved.any() or stalled:  # the loop's criterion is stricter than the exact check, which decides
            m = trimesh.Trimesh(v, faces, process=False)
            volume, got_gap, self_cross = _verify(m, fixed, exclusion, gap)
            if volume <= 1e-9 * max(abs(float(m.volume)), 1.0) and got_gap >= gap * (1 - 1e-3) and self_cross is None:
                return v, it, volume, got_gap
            watch.checked()
            if self_cross is not None:  # a fold where moved and resting vertices meet: relax it, then push again
                untangled += 1
                if untangled > max_untangles:
                    raise _FoldedError(f"the moved mesh {self_cross} (more smoothing rings, a smaller gap, or a "
                                       "better prediction needed)")
                v = _untangle(v, faces, rings + 1, attempts=1)
                continue
            if moved.any():  # stalled and not yet verified: lift the oscillating vertices clear, then go on
                if unstalled < max_unstalls:
                    extra[_grow(adj, moved, 1)] += gap / 8
                    unstalled += 1
            else:
                last = f"violating volume {volume:.4g} mm³, gap {got_gap:.4g} mm after {it} iteration(s)"
                if not widen.more(got_gap):  # all vertices clear, and widening no longer helps: not a local fix
                    break
                near = np.abs(sd) < gap + extra + edge  # the chord case: widen the gap where the surfaces are close
                extra[near] += gap / 4
                continue
        # a step of at most half an edge, so that no vertex jumps over its neighbours; then the moved patch relaxes
        # tangentially (vertex spacing evened out, no shrinking) so that the rim of the patch does not fold
        last = (f"{int(moved.sum())} vertices still to move, up to {float(max(need.max(), 0.0)):.3g} mm, after {it} "
                "iteration(s)")
        disp = np.where((need > tol)[:, None], target - v, 0.0)
        disp = np.where((poke_size > np.linalg.norm(disp, axis=1))[:, None], poke, disp)
        size = np.linalg.norm(disp, axis=1)
        watch.step(float(size.max()))
        disp *= (np.minimum(size, 0.5 * edge) / np.maximum(size, 1e-12))[:, None]
        v = v + _harmonic_extension(adj, moved, disp, rings)
        if size.max() > 0.5 * edge:  # large moves: keep the patch untangled (the last small ones converge)
            v = _relax(v, faces, adj, _grow(adj, moved, rings), iterations=2)
    raise MeshRepairError(f"not repaired ({last}; the gap was widened {widen.done} time(s) (beyond {widen.rounds} only "
                          f"while the verified gap grows, at most {widen.max_rounds}), "
                          f"locally against oscillation {unstalled} time(s), and {max_iterations} iterations are "
                          "allowed)")


# ------------------------------------------------------------------------------------------------ one case
def _remesh_carved(name: str, meshes: Mapping[str, trimesh.Trimesh], spec: TopologySpec, gap: float, rings: int,
                   why: str) -> Tuple[trimesh.Trimesh, dict]:
    """``meshes[name]`` re-meshed from the volume it encloses, carved by the rules in which it moves: outside the
    second mesh of its exclusions, inside the outer mesh of its inclusions (not where openings are allowed), each by
    the gap (the other meshes as given; a tangled one still encloses a volume). The report adds ``why`` and the
    smoothing ``rings`` that keep the neighbourhood's width in mm on the finer surface. Raises :class:`RemeshError`."""
    out, inside = [], []
    for r in mesh_rules_in_force(spec)[0]:
        if isinstance(r, MeshExclusionRule):
            if r.a == name and r.b in meshes:
                out.append((meshes[r.b], gap))
        elif r.inner == name and r.outer in meshes and not any(m in meshes for m in r.may_touch):
            inside.append((meshes[r.outer], gap))
    new, report = remesh_enclosed_volume(meshes[name], outside_of=out, inside_of=inside)
    ratio = float(np.mean(meshes[name].edges_unique_length) / np.mean(new.edges_unique_length))
    report.update(why=why, rings=max(rings, int(math.ceil(rings * ratio))))
    return new, report


def repair_case(meshes: Mapping[str, trimesh.Trimesh], spec: TopologySpec, gap_mm: float = DEFAULT_GAP_MM,
                rings: int = 2, max_iterations: int = 200, max_rounds: int = 4, case: str = "case",
                max_violating_share: float = 0.5,
                tangled: str = "remesh") -> Tuple[Dict[str, trimesh.Trimesh], dict]:
    """Repair one case's meshes for every mesh rule in force (module docstring).

    Args:
        meshes: ``{mesh structure: closed world-space trimesh (mm)}``; not modified.
        spec: the dataset's topology spec.
        gap_mm: margin between the surfaces after the repair (> 0).
        rings: neighbourhood (edges) over which a vertex's displacement is smoothed out.
        max_iterations, max_rounds: iterations per rule and round, rounds over all rules.
        max_violating_share: a rule whose violating volume exceeds this share of the moving mesh's volume is not
            repaired (an error: not a local defect).
        tangled: a mesh that still crosses itself after untangling, or that the vertex loop folds, is
            ``"remesh"``-ed as the boundary of the volume it encloses, carved by its rules
            (:func:`nnunet_topo.remesh.remesh_enclosed_volume`; its vertex order is lost) or ``"refuse"``-d (an
            error).
        case: name used in messages.

    Returns:
        ``(repaired meshes (same vertex order and faces, except re-meshed ones; unchanged meshes are copies),
        report)``, report = ``{"gap_mm", "rounds", "meshes": {structure: {"self_crossing_face_pairs_before",
        "moved_vertices", "max_displacement_mm", "mean_displacement_mm" (over all vertices),
        "mean_moved_displacement_mm", "remeshed": null | remesh report}}, "rules": {rule: {"moved_mesh",
        "violating_volume_mm3_before", "violating_volume_mm3_after", "gap_mm_after", "method": "exact"}}}``.
        For a re-meshed mesh every vertex counts as moved and its displacement is the distance of each output
        vertex to the input surface (the remesh report adds the other direction: how much of a fold was cut).

    Raises:
        MeshRepairError: an invalid input mesh (open, inside out, self-intersecting beyond untangling), a mesh a
            rule needs missing, a non-positive gap, or a case not repaired (names the case and the rule).
    """
    if not (gap_mm > 0 and math.isfinite(gap_mm)):
        raise MeshRepairError(f"gap_mm must be a positive number of mm, got {gap_mm!r}")
    if tangled not in ("remesh", "refuse"):
        raise MeshRepairError(f"tangled must be 'remesh' or 'refuse', got {tangled!r}")
    work, crossings, remeshed = {}, {}, {}

    def rings_of(name: str) -> int:  # a re-meshed surface is finer: more rings for the same width in mm
        return remeshed[name]["rings"] if name in remeshed else rings

    for name, m in meshes.items():
        v, f = np.array(m.vertices, np.float64), np.array(m.faces)
        reason = mesh_invalid_reason(m)
        if reason and reason.startswith("intersects itself"):  # a fold of a deformed template: untangle it first
            crossings[name] = int(len(self_intersecting_faces(v, f)))
            v = _untangle(v, f, rings)
            reason = mesh_invalid_reason(trimesh.Trimesh(v, f, process=False))
            if reason and tangled == "remesh":  # still folded: the boundary of the volume it encloses, carved
                try:
                    new, remeshed[name] = _remesh_carved(name, meshes, spec, gap_mm, rings,
                                                         "it crosses itself beyond untangling")
                except RemeshError as e:
                    reason = f"{reason}; re-meshing its enclosed volume failed: {e}"
                else:
                    v, f, reason = np.asarray(new.vertices, np.float64), np.asarray(new.faces), None
        if reason:
            how = " even after untangling its folds" if name in crossings else ""
            how += " (--tangled remesh re-meshes it)" if name in crossings and tangled == "refuse" else ""
            raise MeshRepairError(f"case {case}: mesh {name} cannot be repaired, it is not a valid closed surface"
                                  f"{how}: {reason}")
        work[name] = trimesh.Trimesh(v, f, process=False)
    remeshed_on_input = list(remeshed)
    in_force, _ = mesh_rules_in_force(spec)
    rules = []
    for r in in_force:
        lack = [m for m in mesh_rule_meshes(r) if m not in work]
        if lack:  # a rule that cannot be checked cannot be guaranteed: no silently partial repair
            raise MeshRepairError(f"case {case}: no mesh for {lack}, which rule {r.name} needs (every mesh "
                                  f"structure of the rule must be present to guarantee it)")
        rules.append(r)

    def parts(r) -> Tuple[str, List[str], bool]:
        if isinstance(r, MeshExclusionRule):
            return r.a, [r.b], True
        return r.inner, [r.outer] + [m for m in r.may_touch if m in work], False

    before = {}
    for r in rules:
        mv, fx, excl = parts(r)
        before[r.name] = exact_violating_volume_mm3(work[mv], [work[f] for f in fx], excl, check=False)
        share = before[r.name] / max(float(work[mv].volume), 1e-12)
        if share > max_violating_share:
            raise MeshRepairError(
                f"case {case}, rule {r.name}: {share:.0%} of {mv}'s volume violates the rule (over "
                f"{max_violating_share:.0%}): not a local defect that moving surfaces can repair (a failed "
                "prediction?)")
    rounds, verified = 0, {}
    for rounds in range(1, max_rounds + 1):
        changed = False
        for r in rules:
            mv, fx, excl = parts(r)
            try:
                try:
                    v, iterations, *verified[r.name] = _repair_rule(work[mv], [work[f] for f in fx], excl, gap_mm,
                                                                    rings_of(mv), max_iterations)
                except _FoldedError as e:
                    # the vertex loop folds the mesh (a thin part pushed through itself): with --tangled remesh,
                    # the mesh is re-meshed from its enclosed volume, carved by its rules, and the rule tried again
                    if tangled != "remesh" or mv in remeshed:
                        raise
                    try:
                        work[mv], remeshed[mv] = _remesh_carved(mv, work, spec, gap_mm, rings,
                                                                f"moving it for rule {r.name} folded it: {e}")
                    except RemeshError as e2:
                        raise MeshRepairError(f"{e}; re-meshing it failed: {e2}") from None
                    v, iterations, *verified[r.name] = _repair_rule(work[mv], [work[f] for f in fx], excl, gap_mm,
                                                                    rings_of(mv), max_iterations)
                    iterations = max(iterations, 2)  # the mesh changed
            except MeshRepairError as e:
                raise MeshRepairError(f"case {case}, rule {r.name} (moving {mv}): {e}") from None
            if iterations > 1:
                work[mv] = trimesh.Trimesh(v, np.asarray(work[mv].faces), process=False)
                changed = True
        if not changed:
            break
    else:
        raise MeshRepairError(f"case {case}: the rules still move each other's meshes after {max_rounds} rounds")
    # the last round moved nothing, so each rule's verification in it is of the final meshes
    report_rules = {r.name: {"moved_mesh": parts(r)[0], "violating_volume_mm3_before": before[r.name],
                             "violating_volume_mm3_after": verified[r.name][0], "gap_mm_after": verified[r.name][1],
                             "method": "exact",
                             # a mesh crossing itself on input has no exact volume: "before" is of its re-meshed,
                             # carved surface (its remeshed block gives the carved volume)
                             "before_measured_on": sorted(set(mesh_rule_meshes(r)) & set(remeshed_on_input))
                             or "input meshes"} for r in rules}
    report_meshes = {}
    for n, m in meshes.items():
        if n in remeshed:  # no vertex correspondence: each output vertex's distance to the input surface
            d = closest_points_on_surface(np.asarray(work[n].vertices), m)[1]
            moved = np.ones(len(d), bool)
        else:
            d = np.linalg.norm(np.asarray(work[n].vertices) - np.asarray(m.vertices, np.float64), axis=1)
            moved = d > 1e-9
        report_meshes[n] = {"self_crossing_face_pairs_before": crossings.get(n, 0),
                            "moved_vertices": int(moved.sum()), "max_displacement_mm": float(d.max(initial=0.0)),
                            "mean_displacement_mm": float(d.mean()) if len(d) else 0.0,
                            "mean_moved_displacement_mm": float(d[moved].mean()) if moved.any() else 0.0,
                            "remeshed": remeshed.get(n)}
    return work, {"gap_mm": gap_mm, "rounds": rounds, "meshes": report_meshes, "rules": report_rules}


# ------------------------------------------------------------------------------------------------ a folder
def _cases_of_folder(folder: str, structures: Sequence[str]) -> Tuple[Dict[str, Dict[str, str]], dict]:
    """``({case: {structure: path}}, meshes.json listing or {})`` of a predict_meshes folder (its ``meshes.json``)
    or of a folder of ``CASE_<structure><ext>`` files."""
    import os

    from nnunet_topo.mesh_evaluation import mesh_files_by_name, mesh_files_from_json
    from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS
    from nnunet_topo.paths import read_json

    listing_path = os.path.join(folder, "meshes.json")
    if os.path.isfile(listing_path):
        return mesh_files_from_json(folder), read_json(listing_path, "meshes.json")
    names = set()
    for f in os.listdir(folder):
        for s in sorted(structures, key=len, reverse=True):
            hit = next((e for e in SUPPORTED_MESH_EXTENSIONS if f.endswith(f"_{s}{e}")), None)
            if hit:
                names.add(f[: -len(f"_{s}{hit}")])
                break
    return mesh_files_by_name(folder, sorted(names), structures), {}


def repair_mesh_folder(input_folder: str, output_folder: str, dataset_json, gap_mm: float = DEFAULT_GAP_MM,
                       rings: int = 2, overwrite: bool = False, show_progress: bool = False,
                       tangled: str = "remesh", resume: bool = False) -> dict:
    """Repair every case of a mesh folder (``nnUNetv2_topo_predict_meshes`` output, or ``CASE_<structure><ext>``
    files) into ``output_folder``: the same file names and formats, per-vertex data of ``.vtk``/``.vtp`` files
    (an ensemble's ``spread_mm``) and ``_spread.npy`` sidecars carried over (vertex order is kept; a mesh
    re-meshed because it crossed itself, ``tangled="remesh"``, takes each value from the nearest input vertex), a
    ``meshes.json`` listing the repaired files, and ``repair.json``::

        {"input_folder", "gap_mm", "rings", "tangled", "cases": {CASE: repair_case report | {"error": message}},
         "cases_not_repaired": [CASE, ...]}

    A case that cannot be repaired gets no files and its reason; the others go on. The input folder is never
    written into (paths resolved); existing outputs need ``overwrite``. After each case the results so far go to
    ``repair_progress.json`` (removed at the end): with ``resume``, the cases it records (their files present) are
    kept and not repaired again, so that an interrupted run of a large folder finishes where it stopped; the
    settings (input folder, gap, rings, tangled) must be those of the interrupted run.

    Raises:
        MeshRepairError: no mesh files, a mesh structure the dataset does not define, existing outputs;
        OutputPathError / InputReadError (:mod:`nnunet_topo.paths`): output inside an input, unreadable files.
    """
    import os
    import shutil
    import time

    from nnunet_topo.mesh_io import export_mesh, read_mesh, read_point_data
    from nnunet_topo.paths import check_output, reading
    from nnunet_topo.topology_spec import spec_from_dataset_json
    from nnunet_topo.summary_io import load_json_arg, write_json_atomic

    if not os.path.isdir(input_folder):
        raise MeshRepairError(f"mesh folder not found: {input_folder}")
    dj_path = dataset_json if isinstance(dataset_json, (str, os.PathLike)) else None
    check_output(output_folder, {"mesh folder": input_folder, "dataset.json": dj_path}, kind="folder")
    spec = spec_from_dataset_json(load_json_arg(dataset_json, "dataset.json"))
    structures = list(spec.mesh_structures)
    if not structures:
        raise MeshRepairError("the dataset's topology block has no mesh_structures, so there is nothing to repair")
    cases, listing = _cases_of_folder(input_folder, structures)
    if not cases:
        raise MeshRepairError(f"no mesh files CASE_<structure><ext> (structures {structures}) and no meshes.json "
                              f"with cases in {input_folder}")
    for case, files in cases.items():
        unknown = [s for s in files if s not in spec.mesh_structures]
        if unknown:
            raise MeshRepairError(f"case {case}: mesh(es) {unknown} are not mesh structures of the dataset "
                                  f"({structures})")
    sidecars = {c: dict(listing.get("cases", {}).get(c, {}).get("spread_files", {})) for c in cases}
    result = {"input_folder": os.path.abspath(input_folder), "gap_mm": gap_mm, "rings": rings, "tangled": tangled,
              "cases": {},
              "cases_not_repaired": []}
    out_listing = {k: v for k, v in listing.items() if k not in ("cases", "cases_without_mesh")}
    out_listing.update({"repaired_from": os.path.abspath(input_folder), "repair": "repair.json", "cases": {},
                        "cases_without_mesh": list(listing.get("cases_without_mesh", []))})
    progress_path = os.path.join(output_folder, "repair_progress.json")
    done = _resumed_cases(progress_path, result, out_listing, cases, sidecars, output_folder) if resume else set()
    outputs = [os.path.basename(p) for c, files in cases.items() if c not in done for p in files.values()] + \
        [f for c, s in sidecars.items() if c not in done for f in s.values()] + ["meshes.json", "repair.json"]
    if not overwrite:
        for f in outputs:
            if os.path.exists(os.path.join(output_folder, f)):
                raise MeshRepairError(f"{os.path.join(output_folder, f)} exists; pass --overwrite to replace it"
                                      + ("" if resume else " (or --continue_repair to finish an interrupted run)"))
    os.makedirs(output_folder, exist_ok=True)
    items = [(c, files) for c, files in sorted(cases.items()) if c not in done]
    if show_progress:
        from tqdm import tqdm
        items = tqdm(items, desc="repairing meshes")
    for case, files in items:
        t0 = time.time()
        meshes, point_data = {}, {}
        for s, path in files.items():
            with reading("mesh", path):
                meshes[s] = read_mesh(path)
                point_data[s] = read_point_data(path) if path.endswith((".vtk", ".vtp")) else {}
        try:
            repaired, report = repair_case(meshes, spec, gap_mm, rings, case=case, tangled=tangled)
        except MeshRepairError as e:
            result["cases"][case] = {"error": str(e)}
            result["cases_not_repaired"].append(case)
            out_listing["cases_without_mesh"].append(case)
            out_listing["cases"][case] = {"error": str(e), "files": {}}
            write_json_atomic(progress_path, {"repair": result, "meshes": out_listing})
            continue
        entry = dict(listing.get("cases", {}).get(case, {}))
        entry.pop("segmentation", None)  # the segmentation stays in the input folder (not repaired)
        remeshed = {s for s, m in report["meshes"].items() if m["remeshed"]}
        for s, path in files.items():
            data = point_data[s]
            if s in remeshed and data:
                data = transfer_point_data(meshes[s].vertices, repaired[s].vertices, data)
            export_mesh(repaired[s], os.path.join(output_folder, os.path.basename(path)), overwrite=True,
                        point_data=data or None)
        for s, f in sidecars[case].items():
            if s in remeshed:
                spread = {f: np.load(os.path.join(input_folder, f))}
                try:
                    np.save(os.path.join(output_folder, f),
                            transfer_point_data(meshes[s].vertices, repaired[s].vertices, spread)[f])
                except RemeshError as e:
                    raise MeshRepairError(f"{os.path.join(input_folder, f)}: {e}") from None
            else:
                shutil.copyfile(os.path.join(input_folder, f), os.path.join(output_folder, f))
        entry["files"] = {s: os.path.basename(p) for s, p in files.items()}
        out_listing["cases"][case] = entry
        result["cases"][case] = {**report, "seconds": round(time.time() - t0, 2)}
        write_json_atomic(progress_path, {"repair": result, "meshes": out_listing})
    result["cases"] = dict(sorted(result["cases"].items()))
    out_listing["cases"] = dict(sorted(out_listing["cases"].items()))
    for name, obj in (("repair.json", result), ("meshes.json", out_listing)):
        write_json_atomic(os.path.join(output_folder, name), obj, indent=2)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    return result


def _resumed_cases(progress_path: str, result: dict, out_listing: dict, cases: dict, sidecars: dict,
                   output_folder: str) -> set:
    """The cases an interrupted :func:`repair_mesh_folder` run finished (recorded in ``progress_path``, their
    output files present), copied into ``result`` and ``out_listing``; none without a progress file. Raises
    :class:`MeshRepairError` for a progress file of other settings or unreadable."""
    import os

    from nnunet_topo.summary_io import load_json_arg

    if not os.path.isfile(progress_path):
        return set()
    try:
        saved = load_json_arg(progress_path, "repair progress")
        old, old_listing = saved["repair"], saved["meshes"]
    except (ValueError, KeyError, TypeError) as e:
        raise MeshRepairError(f"{progress_path} cannot be read ({e}); delete it to repair every case again") \
            from None
    for key in ("input_folder", "gap_mm", "rings", "tangled"):
        if old.get(key) != result[key]:
            raise MeshRepairError(f"{progress_path} is of a run with {key} {old.get(key)!r}, this run has "
                                  f"{result[key]!r}; delete it (or the output folder) to repair every case again")
    done = set()
    for case, entry in old.get("cases", {}).items():
        files = old_listing.get("cases", {}).get(case, {}).get("files", {})
        wanted = [] if "error" in entry else list(files.values()) + list(sidecars.get(case, {}).values())
        if case in cases and all(os.path.isfile(os.path.join(output_folder, f)) for f in wanted):
            done.add(case)
            result["cases"][case] = entry
            out_listing["cases"][case] = old_listing["cases"][case]
            if "error" in entry:
                result["cases_not_repaired"].append(case)
                out_listing["cases_without_mesh"].append(case)
    return done


def format_repair_table(result: dict) -> str:
    """One line per case and rule: violating volume before -> after, gap, the moved mesh's displacements."""
    lines = [f"{'case':<16}{'rule':<36}{'before mm3':>11}{'after':>8}{'gap mm':>8}{'moved':>7}{'max mm':>8}"
             f"{'mean mm':>8}"]
    for case, r in result["cases"].items():
        if "error" in r:
            lines.append(f"{case:<16}NOT REPAIRED: {r['error']}")
            continue
        for rule, e in r["rules"].items():
            m = r["meshes"][e["moved_mesh"]]
            lines.append(f"{case:<16}{rule[:35]:<36}{e['violating_volume_mm3_before']:>11.3f}"
                         f"{e['violating_volume_mm3_after']:>8.3f}{e['gap_mm_after']:>8.3f}{m['moved_vertices']:>7d}"
                         f"{m['max_displacement_mm']:>8.3f}{m['mean_moved_displacement_mm']:>8.3f}")
    return "\n".join(lines)
