"""Exact violation volumes of closed meshes by mesh booleans, and the validity check they rest on (issue 25).

The mesh TVS (TPM Eq. 13) needs, per mesh rule, the volume inside two meshes that must not overlap, or inside an
inner mesh and outside its outer mesh. For closed, consistently oriented, self-intersection-free triangle meshes
these are polyhedra, and their booleans are exact up to floating point:

* exclusion ``(A, B)``: ``vol(A ∩ B)``; inclusion ``(I in O | M...)``: ``vol(I − (O ∪ M...))``.

Booleans by **manifold3d** (Apache-2.0, wheels for Linux/macOS/Windows; the engine trimesh uses for its own
booleans): guaranteed-manifold output, robust to coplanar and touching input, a few ms for heart meshes. manifold3d
assumes valid input (a closed 2-manifold that does not intersect itself) and gives undefined volumes otherwise, so
every mesh is checked first by :func:`mesh_invalid_reason`: closed and 2-manifold (manifold3d's own status), outward
oriented (positive volume), and **no self-intersection** (:func:`self_intersecting_faces`, written here: candidate
triangle pairs by a k-d tree on the centroids (scipy), then exact segment–triangle tests in float64, vectorised; the
GPL libraries that ship such a check (CGAL, pymeshlab) are not an option for a plugin users embed). A mesh that
fails is reported with the reason, and the caller measures on the grid instead (never a silent number).

Coordinates are shifted to a common origin before the float32 conversion manifold3d's ``Mesh`` needs (world mm
can be hundreds of mm from the origin); ``Mesh64`` keeps float64 where the build has it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

__all__ = ["MeshNotValidError", "common_origin", "exact_violating_volume_mm3", "manifold_of", "mesh_invalid_reason",
           "self_intersecting_faces"]

#: relative tolerance of the segment–triangle test (scaled by the mesh's size): touching counts as intersecting
_EPS = 1e-9


class MeshNotValidError(ValueError):
    """A mesh the exact booleans cannot take (open, non-manifold, inside out, or intersecting itself)."""


def _segments_hit_triangles(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray,
                            eps: float) -> np.ndarray:
    """Whether segment ``p→q`` meets triangle ``abc`` (inclusive, Möller–Trumbore; parallel segments miss), rows."""
    d = q - p
    e1, e2 = b - a, c - a
    h = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, h)
    ok = np.abs(det) > eps * (np.linalg.norm(d, axis=1) * np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1)
                              + 1e-300)
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = p - a
    u = np.einsum("ij,ij->i", s, h) * inv
    qv = np.cross(s, e1)
    v = np.einsum("ij,ij->i", d, qv) * inv
    t = np.einsum("ij,ij->i", e2, qv) * inv
    tol = 1e-12
    return ok & (u >= -tol) & (v >= -tol) & (u + v <= 1 + tol) & (t >= -tol) & (t <= 1 + tol)


def self_intersecting_faces(vertices: np.ndarray, faces: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of faces that intersect each other, beyond the vertices and edges they share.

    Candidates: face pairs whose centroids lie within the sum of their circumradii bounds (``scipy.spatial.cKDTree``).
    Pairs without a shared vertex intersect iff an edge of one meets the other (6 segment–triangle tests, touching
    included). Pairs sharing one vertex ``v`` meet beyond ``v`` iff the edge opposite ``v`` in one meets the other
    triangle (the intersection of two non-coplanar triangles through ``v`` is a segment from ``v`` that ends on such an
    edge). Pairs sharing an edge can only overlap when coplanar and folded onto each other, which these tests do not
    look for (a degenerate fold, not a crossing).
    """
    from scipy.spatial import cKDTree

    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    tri = v[f]
    centre = tri.mean(axis=1)
    radius = np.linalg.norm(tri - centre[:, None], axis=2).max(axis=1)
    pairs = cKDTree(centre).query_pairs(2.0 * float(radius.max()) * (1 + 1e-9), output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = pairs[np.linalg.norm(centre[pairs[:, 0]] - centre[pairs[:, 1]], axis=1)
                  <= (radius[pairs[:, 0]] + radius[pairs[:, 1]]) * (1 + 1e-9)]
    eps = _EPS
    hits: List[np.ndarray] = []
    for s in range(0, len(pairs), chunk):
        pr = pairs[s:s + chunk]
        fi, fj = f[pr[:, 0]], f[pr[:, 1]]
        shared = (fi[:, :, None] == fj[:, None, :])  # (n, 3, 3): vertex k of i equals vertex l of j
        n_shared = shared.any(axis=2).sum(axis=1)
        ti, tj = tri[pr[:, 0]], tri[pr[:, 1]]
        hit = np.zeros(len(pr), dtype=bool)
        free = n_shared == 0
        if free.any():
            a, b = ti[free], tj[free]
            h = np.zeros(len(a), dtype=bool)
            for (x, y) in ((0, 1), (1, 2), (2, 0)):
                h |= _segments_hit_triangles(a[:, x], a[:, y], b[:, 0], b[:, 1], b[:, 2], eps)
                h |= _segments_hit_triangles(b[:, x], b[:, y], a[:, 0], a[:, 1], a[:, 2], eps)
            hit[free] = h
        one = n_shared == 1
        if one.any():
            a, b, sh = ti[one], tj[one], shared[one]
            k = np.argmax(sh.any(axis=2), axis=1)  # the shared vertex's slot in i
            m = np.argmax(sh.any(axis=1), axis=1)  # ... and in j
            rows = np.arange(len(a))
            pa, qa = a[rows, (k + 1) % 3], a[rows, (k + 2) % 3]  # the edge of i opposite the shared vertex
            pb, qb = b[rows, (m + 1) % 3], b[rows, (m + 2) % 3]
            h = _segments_hit_triangles(pa, qa, b[:, 0], b[:, 1], b[:, 2], eps)
            h |= _segments_hit_triangles(pb, qb, a[:, 0], a[:, 1], a[:, 2], eps)
            hit[one] = h
        hits.append(pr[hit])
    return np.concatenate(hits).astype(np.int64) if hits else np.zeros((0, 2), dtype=np.int64)


def common_origin(meshes: Sequence) -> np.ndarray:
    """The componentwise minimum of the meshes' vertices: the shift applied before the conversion to manifold3d."""
    return np.min([np.asarray(m.vertices, np.float64).min(axis=0) for m in meshes], axis=0)


def manifold_of(mesh, origin: np.ndarray):
    """A manifold3d solid of a trimesh (or anything with ``vertices``/``faces``), coordinates shifted by ``-origin``
    (float64 ``Mesh64`` where the build has it; float32 ``Mesh`` otherwise)."""
    import manifold3d

    v = np.ascontiguousarray(np.asarray(mesh.vertices, np.float64) - origin)
    f = np.ascontiguousarray(np.asarray(mesh.faces), dtype=np.uint32)
    if hasattr(manifold3d, "Mesh64"):
        return manifold3d.Manifold(manifold3d.Mesh64(vert_properties=v, tri_verts=f))
    return manifold3d.Manifold(manifold3d.Mesh(vert_properties=v.astype(np.float32), tri_verts=f))


def mesh_invalid_reason(mesh) -> Optional[str]:
    """Why ``mesh`` (a trimesh) cannot go into exact booleans, or None when it is a closed, outward oriented
    2-manifold that does not intersect itself."""
    v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    if len(f) < 4:
        return f"only {len(f)} face(s)"
    if not np.isfinite(v).all():
        return "non-finite vertex coordinates"
    m = manifold_of(mesh, v.min(axis=0))
    status = m.status()
    if str(status).split(".")[-1] != "NoError":
        return f"not a closed 2-manifold (manifold3d: {str(status).split('.')[-1]})"
    if m.volume() <= 0 or float(mesh.volume) <= 0:
        return "encloses no positive volume (inside out or flat)"
    pairs = self_intersecting_faces(v, f)
    if len(pairs):
        return f"intersects itself ({len(pairs)} pair(s) of crossing faces, e.g. faces {pairs[0].tolist()})"
    return None


def exact_violating_volume_mm3(first, second: Sequence, exclusion: bool, check: bool = True) -> float:
    """Volume (mm³) inside ``first`` and inside ``second[0]`` (``exclusion``), or inside ``first`` and outside the
    union of ``second`` (an inclusion's outer mesh and allowed openings), by exact mesh booleans (module docstring).

    Args:
        first, second: closed world-space trimeshes (mm).
        exclusion: the rule's kind.
        check: verify every mesh first (:func:`mesh_invalid_reason`); callers that checked already pass False.

    Raises:
        MeshNotValidError: a mesh is not valid for booleans (the message names which and why).
    """
    meshes = [first] + list(second)
    if check:
        for i, m in enumerate(meshes):
            reason = mesh_invalid_reason(m)
            if reason:
                raise MeshNotValidError(f"{'first' if i == 0 else f'second[{i - 1}]'} mesh: {reason}")
    origin = common_origin(meshes)
    a, *others = (manifold_of(m, origin) for m in meshes)
    if exclusion:
        return max(float((a ^ others[0]).volume()), 0.0)
    outer = others[0]
    for o in others[1:]:
        outer = outer + o
    return max(float((a - outer).volume()), 0.0)
