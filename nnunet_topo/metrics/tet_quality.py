"""Quality of a tetrahedral mesh: signed volumes, dihedral angles, boundary triangles (issue 25 item 3).

What a simulation needs to know before it runs on a volume mesh: no tetrahedron is inverted (signed volume
``<= 0``; a finite-element solver fails or returns nonsense on one), the smallest dihedral angle (a sliver, angle
near 0°, makes the stiffness matrix ill-conditioned; Shewchuk, *What is a good linear finite element?*, 2002), and
the total volume. Tetrahedra use VTK's vertex order (``VTK_TETRA``: the fourth vertex lies on the side of the
first three's right-hand normal), so a valid tetrahedron has a positive signed volume
``det(b - a, c - a, d - a) / 6``. Pure numpy, no nnU-Net import.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["tet_signed_volumes", "tet_dihedral_angles_deg", "boundary_triangles", "tet_quality"]

#: faces of a positively oriented tetrahedron (VTK order), each with its outward right-hand normal; face ``k`` is
#: the one opposite vertex ``k``
_OUTWARD_FACES = np.array([[1, 2, 3], [0, 3, 2], [0, 1, 3], [0, 2, 1]], dtype=np.int64)

#: the six edges of a tetrahedron as pairs of the faces that meet there (face k is opposite vertex k, so faces k and
#: l meet along the edge through the other two vertices)
_FACE_PAIRS = [(k, l) for k in range(4) for l in range(k + 1, 4)]


def _check(points: np.ndarray, tets: np.ndarray) -> tuple:
    p = np.asarray(points, dtype=np.float64)
    t = np.asarray(tets, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"tets must have shape (T, 4), got {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= len(p)):
        raise ValueError(f"tets index points outside 0..{len(p) - 1}")
    return p, t


def tet_signed_volumes(points: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """Signed volume of each tetrahedron ``(a, b, c, d)``: ``det(b - a, c - a, d - a) / 6``.

    Args:
        points: ``(N, 3)`` vertex coordinates (mm).
        tets: ``(T, 4)`` vertex indices, VTK order.

    Returns:
        ``(T,)`` float64, mm³; positive for a valid tetrahedron, ``<= 0`` for an inverted or flat one.
    """
    p, t = _check(points, tets)
    a, b, c, d = (p[t[:, i]] for i in range(4))
    return np.einsum("ij,ij->i", np.cross(b - a, c - a), d - a) / 6.0


def tet_dihedral_angles_deg(points: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """The six interior dihedral angles of each tetrahedron, in degrees.

    The angle along the edge where faces ``k`` and ``l`` meet is ``180° - angle(n_k, n_l)`` with ``n_k`` the unit
    normal of face ``k`` pointing away from the vertex opposite it (the orientation is taken per face from that
    vertex, so the result does not depend on the tetrahedron's vertex order). A regular tetrahedron has six angles
    of ``arccos(1/3) = 70.53°``; a flat one has angles of 0° (and 180°).

    Returns:
        ``(T, 6)`` float64 degrees; ``nan`` for a tetrahedron with a degenerate (zero-area) face.
    """
    p, t = _check(points, tets)
    q = p[t]  # (T, 4, 3)
    normals = []
    for k in range(4):
        i, j, m = [x for x in range(4) if x != k]
        n = np.cross(q[:, j] - q[:, i], q[:, m] - q[:, i])
        away = np.sign(np.einsum("ij,ij->i", n, q[:, i] - q[:, k]))
        away[away == 0] = 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            normals.append(n * (away / np.linalg.norm(n, axis=1))[:, None])
    angles = [np.pi - np.arccos(np.clip(np.einsum("ij,ij->i", normals[k], normals[l]), -1.0, 1.0))
              for k, l in _FACE_PAIRS]
    return np.degrees(np.stack(angles, axis=1))


def boundary_triangles(tets: np.ndarray) -> tuple:
    """The faces that belong to exactly one tetrahedron, oriented outward (positively oriented tetrahedra).

    Args:
        tets: ``(T, 4)`` vertex indices, VTK order, positive signed volumes.

    Returns:
        ``(triangles (F, 3) int64, owner (F,) int64)``: each boundary triangle with its outward right-hand normal,
        and the index of the tetrahedron it bounds.
    """
    t = np.asarray(tets, dtype=np.int64)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"tets must have shape (T, 4), got {t.shape}")
    faces = t[:, _OUTWARD_FACES].reshape(-1, 3)  # (4T, 3), face k of tet i at row 4i + k
    key = np.sort(faces, axis=1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    once = counts[inverse.ravel()] == 1
    rows = np.flatnonzero(once)
    return faces[rows], rows // 4


def tet_quality(points: np.ndarray, tets: np.ndarray) -> Dict[str, float]:
    """Summary figures of a tetrahedral mesh.

    Returns:
        ``{"tets", "points", "min_dihedral_deg", "mean_dihedral_deg", "inverted_tets" (signed volume <= 0),
        "volume_mm3" (sum of signed volumes), "mean_edge_mm"}``; angles ``nan`` for an empty mesh.
    """
    p, t = _check(points, tets)
    vol = tet_signed_volumes(p, t)
    ang = tet_dihedral_angles_deg(p, t)
    edges = np.sort(t[:, [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]].reshape(-1, 2), axis=1)
    edges = np.unique(edges, axis=0)
    finite = ang[np.isfinite(ang)]
    return {
        "tets": int(len(t)),
        "points": int(len(np.unique(t))) if t.size else 0,
        "min_dihedral_deg": float(finite.min()) if finite.size else float("nan"),
        "mean_dihedral_deg": float(finite.mean()) if finite.size else float("nan"),
        "inverted_tets": int((vol <= 0).sum()),
        "volume_mm3": float(vol.sum()),
        "mean_edge_mm": float(np.linalg.norm(p[edges[:, 0]] - p[edges[:, 1]], axis=1).mean()) if len(edges)
        else float("nan"),
    }
