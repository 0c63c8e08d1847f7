"""Re-meshing a surface that crosses itself: the boundary of the volume it encloses (issue 25, the repair's inputs).

A deformed template mesh can fold through itself (a few hundred crossing faces in the RV of a briefly trained
model). Such a surface is no valid input for mesh booleans, tetrahedral meshing or a simulation, and moving
vertices to untangle it can take them far (documentation/mesh_output.md: 13–20 mm). What it *does* define is an
enclosed volume: the points with winding number > 0 — the occupancy every mesh metric of this package uses
(:func:`nnunet_topo.voxelize.voxelize`, exact integer winding numbers by signed ray crossings, which are
well-defined for a closed surface that crosses itself). :func:`remesh_enclosed_volume` rebuilds the surface as
that volume's boundary:

1. winding numbers on a regular world grid of ``grid_mm`` (default: half the mesh's mean edge length, within
   0.5–2 mm) around the mesh, inside = winding > 0 (a pocket folded inside out, winding < 0, is outside);
2. the largest connected component (6-connectivity, scipy), its cavities filled: one closed shell, as the template
   was (other components are slivers cut off by the fold; their volume is reported);
   (with ``outside_of`` / ``inside_of``, the volume is first carved by other meshes, see the arguments);
3. marching cubes (:func:`nnunet_topo.surfaces.mesh_from_mask`: a closed 2-manifold) and Taubin smoothing
   (volume-preserving to first order), which removes the staircase; if the smoothing makes the surface cross
   itself, the unsmoothed surface is used.

The result is checked (closed, oriented, no self-intersection) and raises :class:`RemeshError` otherwise. Vertex
correspondence with the input is lost (the vertex count changes); per-vertex data are carried over from the
nearest input vertex (:func:`transfer_point_data`). The report gives the surface distances between input and
output in both directions, so that a user sees how much of the fold was cut away.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import trimesh

__all__ = ["RemeshError", "remesh_enclosed_volume", "transfer_point_data"]

#: Taubin step pairs applied after marching cubes (removes the voxel staircase at 0.5–2 mm)
SMOOTHING_ITERATIONS = 10


class RemeshError(ValueError):
    """The enclosed volume of a mesh could not be turned into a valid closed surface."""


def remesh_enclosed_volume(mesh: trimesh.Trimesh, grid_mm: Optional[float] = None,
                           outside_of: Sequence[Tuple[trimesh.Trimesh, float]] = (),
                           inside_of: Sequence[Tuple[trimesh.Trimesh, float]] = ()) -> Tuple[trimesh.Trimesh, dict]:
    """The boundary of the volume a closed (possibly self-crossing) world-space mesh encloses (module docstring).

    Args:
        mesh: closed, outward-oriented triangle mesh in mm (it may cross itself).
        grid_mm: grid spacing in mm (> 0); ``None`` = half the mean edge length, clipped to [0.5, 2].
        outside_of, inside_of: ``(other mesh, margin mm)`` pairs: the enclosed volume is carved before meshing —
            grid points inside another mesh of ``outside_of`` or nearer than its margin to it, and points of
            ``inside_of`` meshes nearer than the margin to their boundary (or outside them), are removed (Euclidean
            distance transforms of the other meshes' occupancy on the same grid, scipy). The mesh repair uses it
            for a re-meshed mesh, whose vertex correspondence is lost anyway: the rule holds by construction up
            to the smoothing, and the vertex loop finishes what is left.

    Returns:
        ``(new mesh, report)``, report = ``{"grid_mm", "faces_before", "faces_after", "volume_mm3_before",
        "carved_mm3", "volume_mm3_after", "components_dropped", "dropped_volume_mm3", "smoothed",
        "max_output_to_input_mm",
        "mean_output_to_input_mm", "max_input_to_output_mm", "mean_input_to_output_mm"}`` (volumes: enclosed,
        i.e. of the occupancy; the input's signed volume counts folded pockets twice or negatively).

    Raises:
        RemeshError: no enclosed volume, a non-finite or bad grid, or a result that is not a valid surface.
    """
    import torch
    from scipy import ndimage

    from nnunet_topo.frames import ImageGeometry
    from nnunet_topo.mesh_booleans import mesh_invalid_reason
    from nnunet_topo.metrics.mesh import closest_points_on_surface
    from nnunet_topo.surfaces import MeshBuildError, mesh_from_mask
    from nnunet_topo.voxelize import grid_winding_number

    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    if len(f) == 0 or not np.isfinite(v).all():
        raise RemeshError("the mesh has no faces or non-finite vertices")
    if grid_mm is None:
        edges = np.asarray(mesh.edges_unique_length)
        grid_mm = float(np.clip(0.5 * edges.mean(), 0.5, 2.0))
    if not (grid_mm > 0 and np.isfinite(grid_mm)):
        raise RemeshError(f"grid_mm must be a positive number of mm, got {grid_mm!r}")
    h = float(grid_mm)
    pad = 2 * h + max([m for _, m in list(outside_of) + list(inside_of)], default=0.0)
    lo = v.min(axis=0) - pad
    shape_zyx = tuple(int(s) for s in (np.ceil((v.max(axis=0) + pad - lo) / h).astype(int) + 1)[::-1])

    def occupancy(vertices, faces) -> np.ndarray:
        grid_zyx = torch.from_numpy(((np.asarray(vertices, np.float64) - lo) / h)[:, ::-1].copy())[None]
        # faces are outward in the (x, y, z) world frame; the grid's (z, y, x) order reverses its handedness
        return grid_winding_number(grid_zyx, torch.from_numpy(np.asarray(faces, np.int64)), shape_zyx,
                                   orientation=-1)[0].numpy() > 0

    inside = occupancy(v, f)
    enclosed = float(inside.sum()) * h ** 3
    for other, margin in outside_of:
        occ = occupancy(other.vertices, other.faces)
        inside &= ~occ & (ndimage.distance_transform_edt(~occ, sampling=h) > margin)
    for other, margin in inside_of:
        inside &= ndimage.distance_transform_edt(occupancy(other.vertices, other.faces), sampling=h) > margin
    labels, n = ndimage.label(inside)
    if n == 0:
        raise RemeshError(f"the mesh encloses no volume on a {h:.3g} mm grid")
    sizes = np.asarray(ndimage.sum(inside, labels, range(1, n + 1)))
    keep = 1 + int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(labels == keep)
    geometry = ImageGeometry((h, h, h), tuple(float(x) for x in lo), np.eye(3))
    try:
        out = mesh_from_mask(mask, geometry, smoothing_iterations=SMOOTHING_ITERATIONS)
        reason = mesh_invalid_reason(out)
        smoothed = reason is None
        if not smoothed:
            out = mesh_from_mask(mask, geometry)
            reason = mesh_invalid_reason(out)
    except MeshBuildError as e:
        raise RemeshError(f"marching cubes of the enclosed volume failed: {e}") from None
    if reason:
        raise RemeshError(f"the re-meshed surface is not valid: {reason}")
    to_in = closest_points_on_surface(np.asarray(out.vertices), mesh)[1]
    to_out = closest_points_on_surface(v, out)[1]
    report = {"grid_mm": h, "faces_before": int(len(f)), "faces_after": int(len(out.faces)),
              "volume_mm3_before": enclosed, "carved_mm3": enclosed - float(inside.sum()) * h ** 3,
              "volume_mm3_after": float(out.volume),
              "components_dropped": int(n - 1), "dropped_volume_mm3": float(sizes.sum() - sizes[keep - 1]) * h ** 3,
              "smoothed": bool(smoothed),
              "max_output_to_input_mm": float(to_in.max()), "mean_output_to_input_mm": float(to_in.mean()),
              "max_input_to_output_mm": float(to_out.max()), "mean_input_to_output_mm": float(to_out.mean())}
    return out, report


def transfer_point_data(old_vertices: np.ndarray, new_vertices: np.ndarray,
                        arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-vertex arrays of a mesh carried over to new vertices: each new vertex takes the values of the nearest
    old vertex (scipy k-d tree).

    Raises:
        RemeshError: an array whose first axis is not the old vertex count (named; nothing is dropped silently).
    """
    from scipy.spatial import cKDTree

    old = np.asarray(old_vertices, dtype=np.float64)
    for k, a in arrays.items():
        if np.ndim(a) < 1 or len(a) != len(old):
            raise RemeshError(f"per-vertex data {k!r} has {len(a) if np.ndim(a) else 0} values, its mesh {len(old)} "
                              "vertices")
    idx = cKDTree(old).query(np.asarray(new_vertices, dtype=np.float64))[1]
    return {k: np.asarray(a)[idx] for k, a in arrays.items()}
