"""Surface meshes from label maps, in patient (world) coordinates, and mesh file export.

Implements the mesh side of DESIGN.md section 4 (explicit coordinate frames) and the "Export" item
of section 7 (meshes in patient coordinates as VTK, PLY, OBJ or STL, one file per structure).
See ``documentation/meshes.md`` for the frames, the conventions and the caveats.

Coordinate frames (every function names the frame of its input and output):

* **array index** ``(z, y, x)``: a voxel's integer index into a numpy array in SimpleITK/nnU-Net
  order ``(Z, Y, X)``; continuous indices address the voxel *centres* (index ``k`` = centre of voxel
  ``k``).
* **world** ``(x, y, z)`` in mm: ITK/SimpleITK physical space (DICOM LPS for medical images),
  ``world = origin + D @ (spacing * (x, y, z)_index)`` with the image's ``spacing``, ``origin`` and
  3x3 ``direction`` ``D``, all in ``(x, y, z)`` order as SimpleITK reports them.
* **normalised** ``(x, y, z)`` in ``[-1, 1]``: the grid coordinates of
  ``torch.nn.functional.grid_sample(input, grid, align_corners=True)`` for a volume
  ``input`` of shape ``(B, C, Z, Y, X)``: the last dimension of ``grid`` is ``(x, y, z)``, i.e. it
  indexes the *last* array axis first; ``-1`` is the centre of the first voxel and ``+1`` the centre
  of the last one along each axis.

No nnU-Net import here.
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import trimesh
from skimage import measure

__all__ = [
    "MeshBuildError",
    "ImageGeometry",
    "index_to_world",
    "world_to_index",
    "index_to_normalized",
    "normalized_to_index",
    "mesh_from_mask",
    "structure_meshes",
    "export_mesh",
    "read_mesh",
    "read_point_data",
    "SUPPORTED_MESH_EXTENSIONS",
]

#: File extensions accepted by :func:`export_mesh` and :func:`read_mesh` (lower case).
SUPPORTED_MESH_EXTENSIONS = (".vtk", ".vtp", ".ply", ".obj", ".stl")

# Taubin's lambda/mu smoothing: a shrinking step with lambda followed by an inflating step with
# -nu; 1/lambda - 1/nu = 0.077 is the pass-band frequency (Taubin recommends 0.01-0.1).
_TAUBIN_LAMBDA = 0.5
_TAUBIN_NU = 0.52


class MeshBuildError(ValueError):
    """A surface mesh could not be built (empty mask, open surface, non-finite vertices...)."""


# ----------------------------------------------------------------------------------------------
# Image geometry and coordinate frames
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageGeometry:
    """Geometry of a 3D image as SimpleITK defines it, everything in ``(x, y, z)`` order.

    Attributes:
        spacing_xyz: voxel size in mm along the image's x, y and z index axes (positive, finite).
        origin_xyz: world position in mm of the centre of voxel ``(x, y, z)_index = (0, 0, 0)``.
        direction: ``(3, 3)`` float64 array whose *columns* are the world directions of the x, y
            and z index axes (SimpleITK's 9-tuple ``GetDirection()`` read row-major). Must be
            non-singular; usually orthonormal (``det = +-1``).

    The map from a continuous index to world coordinates is
    ``world = origin + direction @ (spacing * (x, y, z)_index)``, which is SimpleITK's
    ``TransformContinuousIndexToPhysicalPoint``. Numpy arrays of the image are indexed
    ``[z, y, x]`` (see :func:`index_to_world`).
    """

    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        spacing = _float_tuple(self.spacing_xyz, "spacing_xyz", 3)
        origin = _float_tuple(self.origin_xyz, "origin_xyz", 3)
        if not all(s > 0 for s in spacing):
            raise ValueError(f"spacing_xyz must be positive (mm), got {spacing}.")
        direction = np.array(self.direction, dtype=np.float64)
        if direction.size != 9:
            raise ValueError(
                f"direction must have 9 entries (a 3x3 matrix, row-major as SimpleITK's "
                f"GetDirection()), got shape {direction.shape}."
            )
        direction = direction.reshape(3, 3)
        if not np.all(np.isfinite(direction)):
            raise ValueError(f"direction must be finite, got {direction.tolist()}.")
        if abs(np.linalg.det(direction)) < 1e-6:
            raise ValueError(f"direction must be a non-singular 3x3 matrix, got {direction.tolist()}.")
        direction.setflags(write=False)
        object.__setattr__(self, "spacing_xyz", spacing)
        object.__setattr__(self, "origin_xyz", origin)
        object.__setattr__(self, "direction", direction)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def identity(cls) -> "ImageGeometry":
        """Unit spacing, zero origin, identity direction: world ``(x, y, z)`` = index ``(x, y, z)``."""
        return cls((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))

    @classmethod
    def from_sitk(cls, image: Any) -> "ImageGeometry":
        """Geometry of a 3D ``SimpleITK.Image`` (``GetSpacing``, ``GetOrigin``, ``GetDirection``)."""
        if image.GetDimension() != 3:
            raise ValueError(
                f"ImageGeometry is for 3D images; got a {image.GetDimension()}D SimpleITK image."
            )
        return cls(image.GetSpacing(), image.GetOrigin(), np.reshape(image.GetDirection(), (3, 3)))

    @classmethod
    def from_nnunet_properties(cls, properties: Mapping[str, Any]) -> "ImageGeometry":
        """Geometry from the properties dict of nnU-Net's image readers.

        ``SimpleITKIO`` and ``SimpleITKIOWithReorient`` store ``properties["sitk_stuff"]`` with
        ``"spacing"``, ``"origin"`` and ``"direction"`` in SimpleITK's ``(x, y, z)`` order (for
        ``SimpleITKIOWithReorient`` these describe the *reoriented* image, i.e. the array nnU-Net
        works on, so meshes of that array land in the right place). ``NibabelIO`` and
        ``NibabelIOWithReorient`` store ``properties["nibabel_stuff"]`` with a RAS affine of the
        nibabel array ``(i, j, k)``; nnU-Net transposes that array to ``(k, j, i)``, so ``(i, j, k)``
        is our ``(x, y, z)`` index and the affine is converted to ITK's LPS world here.
        This is the geometry of the arrays that nnU-Net reads and writes (``read_seg`` /
        ``write_seg``), not of its preprocessed (cropped, resampled) arrays.
        """
        if "sitk_stuff" in properties:
            stuff = properties["sitk_stuff"]
            missing = [k for k in ("spacing", "origin", "direction") if k not in stuff]
            if missing:
                raise ValueError(f"properties['sitk_stuff'] lacks {missing}; got keys {sorted(stuff)}.")
            if len(stuff["spacing"]) != 3:
                raise ValueError(
                    f"ImageGeometry is for 3D images; properties['sitk_stuff']['spacing'] has "
                    f"{len(stuff['spacing'])} entries (a 2D image)."
                )
            return cls(stuff["spacing"], stuff["origin"], np.reshape(stuff["direction"], (3, 3)))
        if "nibabel_stuff" in properties:
            stuff = properties["nibabel_stuff"]
            affine = stuff.get("reoriented_affine", stuff.get("original_affine"))
            if affine is None:
                raise ValueError("properties['nibabel_stuff'] holds no affine.")
            affine = np.asarray(affine, dtype=np.float64)
            lps = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS
            linear = lps @ affine[:3, :3]
            spacing = np.linalg.norm(linear, axis=0)
            return cls(spacing, lps @ affine[:3, 3], linear / spacing)
        raise ValueError(
            "nnU-Net properties carry no image geometry: expected the key 'sitk_stuff' (written by "
            "SimpleITKIO / SimpleITKIOWithReorient) or 'nibabel_stuff' (NibabelIO); got keys "
            f"{sorted(properties)}. Other readers (e.g. Tiff3DIO, NaturalImage2DIO) store no "
            "orientation; build an ImageGeometry by hand."
        )

    # -- derived -----------------------------------------------------------------------------

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """``(3, 3)`` linear part ``D @ diag(spacing)`` acting on ``(x, y, z)`` index vectors."""
        return self.direction * np.asarray(self.spacing_xyz)[None, :]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` homogeneous map from ``(x, y, z, 1)`` index to ``(x, y, z, 1)`` world (mm)."""
        a = np.eye(4)
        a[:3, :3] = self.index_to_world_matrix
        a[:3, 3] = self.origin_xyz
        return a

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3 (``prod(spacing) * |det(direction)|``)."""
        return float(abs(np.linalg.det(self.index_to_world_matrix)))

    def _key(self) -> tuple:
        return (self.spacing_xyz, self.origin_xyz, tuple(self.direction.ravel().tolist()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageGeometry):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"ImageGeometry(spacing_xyz={self.spacing_xyz}, origin_xyz={self.origin_xyz}, "
            f"direction={self.direction.ravel().tolist()})"
        )


def _float_tuple(values: Any, name: str, n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {n} numbers, got {values!r}.") from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {n} finite numbers, got {values!r}.")
    return out


def _check_points(points: np.ndarray | torch.Tensor, name: str, ndim: int = 3) -> None:
    if points.ndim < 1 or points.shape[-1] != ndim:
        raise ValueError(f"{name} must have shape (..., {ndim}), got {tuple(points.shape)}.")


def _as_float_array(points: Any) -> np.ndarray:
    a = np.asarray(points)
    return a.astype(np.float64) if not np.issubdtype(a.dtype, np.floating) else a


def _as_float_tensor(points: torch.Tensor) -> torch.Tensor:
    return points if points.is_floating_point() else points.to(torch.get_default_dtype())


def index_to_world(
    ijk_zyx: np.ndarray | torch.Tensor, geometry: ImageGeometry
) -> np.ndarray | torch.Tensor:
    """Continuous array indices ``(z, y, x)`` -> world coordinates ``(x, y, z)`` in mm.

    ``world = origin + D @ (spacing * (x, y, z)_index)``, SimpleITK's
    ``TransformContinuousIndexToPhysicalPoint`` (whose index is ``(x, y, z)``: the reverse of ours).

    Args:
        ijk_zyx: ``(N, 3)`` (or ``(..., 3)``) indices into a ``(Z, Y, X)`` array; integer or float.
        geometry: the image's geometry.

    Returns:
        ``(N, 3)`` world points ``(x, y, z)`` in mm: a float64 array for numpy input (float input
        keeps its dtype), a tensor on the input's device for a tensor (differentiable).
    """
    _check_points(ijk_zyx, "ijk_zyx")
    if isinstance(ijk_zyx, torch.Tensor):
        p = _as_float_tensor(ijk_zyx)
        m = torch.as_tensor(geometry.index_to_world_matrix, dtype=p.dtype, device=p.device)
        o = torch.as_tensor(geometry.origin_xyz, dtype=p.dtype, device=p.device)
        return torch.flip(p, dims=(-1,)) @ m.T + o
    p = _as_float_array(ijk_zyx)
    m = geometry.index_to_world_matrix.astype(p.dtype)
    return p[..., ::-1] @ m.T + np.asarray(geometry.origin_xyz, dtype=p.dtype)


def world_to_index(
    xyz: np.ndarray | torch.Tensor, geometry: ImageGeometry
) -> np.ndarray | torch.Tensor:
    """World coordinates ``(x, y, z)`` in mm -> continuous array indices ``(z, y, x)``.

    The inverse of :func:`index_to_world` (SimpleITK's ``TransformPhysicalPointToContinuousIndex``
    with the index order reversed). Round to the nearest integer to get the voxel that contains a
    point: voxel ``k`` covers continuous indices ``[k - 0.5, k + 0.5)``.

    Args:
        xyz: ``(N, 3)`` (or ``(..., 3)``) world points in mm.
        geometry: the image's geometry.

    Returns:
        ``(N, 3)`` continuous indices ``(z, y, x)``, numpy or torch like the input.
    """
    _check_points(xyz, "xyz")
    inv = np.linalg.inv(geometry.index_to_world_matrix)
    if isinstance(xyz, torch.Tensor):
        p = _as_float_tensor(xyz)
        m = torch.as_tensor(inv, dtype=p.dtype, device=p.device)
        o = torch.as_tensor(geometry.origin_xyz, dtype=p.dtype, device=p.device)
        return torch.flip((p - o) @ m.T, dims=(-1,))
    p = _as_float_array(xyz)
    return ((p - np.asarray(geometry.origin_xyz, dtype=p.dtype)) @ inv.T.astype(p.dtype))[..., ::-1]


def _grid_denominator(shape: Sequence[int], like: np.ndarray | torch.Tensor):
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive, got {shape}.")
    # size-1 axes: grid_sample (align_corners=True) maps every normalised value to index 0.
    denom = [max(s - 1, 1) for s in shape]
    half = [0.0 if s == 1 else 1.0 for s in shape]
    if isinstance(like, torch.Tensor):
        kw = dict(dtype=like.dtype, device=like.device)
        return torch.tensor(denom, **kw), torch.tensor(half, **kw)
    return np.asarray(denom, dtype=like.dtype), np.asarray(half, dtype=like.dtype)


def index_to_normalized(
    ijk_zyx: np.ndarray | torch.Tensor, shape_zyx: Sequence[int]
) -> np.ndarray | torch.Tensor:
    """Array indices ``(z, y, x)`` -> ``grid_sample`` coordinates ``(x, y, z)`` in ``[-1, 1]``.

    For a volume ``input`` of shape ``(B, C, Z, Y, X)`` (``shape_zyx = (Z, Y, X)``),
    ``torch.nn.functional.grid_sample(input, grid, align_corners=True)`` with
    ``grid[..., :] = index_to_normalized(ijk_zyx, shape_zyx)`` samples ``input`` at the continuous
    index ``ijk_zyx``: ``grid``'s last dimension is ``(x, y, z)`` (``x`` indexes the last array axis
    ``X``), and ``-1``/``+1`` are the centres of the first/last voxel
    (``n = 2 * i / (size - 1) - 1``). An axis of size 1 maps to 0 (grid_sample ignores the
    coordinate there). Works for 2D too (``shape_zyx = (Y, X)``, points ``(y, x)`` -> ``(x, y)``).

    Args:
        ijk_zyx: ``(N, D)`` (or ``(..., D)``) continuous indices in array order, ``D = len(shape_zyx)``.
        shape_zyx: the array's spatial shape, in array order.

    Returns:
        ``(N, D)`` normalised coordinates in reversed order ``(x, y, z)``; numpy or torch like the input.
    """
    _check_points(ijk_zyx, "ijk_zyx", len(shape_zyx))
    if isinstance(ijk_zyx, torch.Tensor):
        p = _as_float_tensor(ijk_zyx)
        denom, half = _grid_denominator(shape_zyx, p)
        return torch.flip((2.0 * p / denom - 1.0) * half, dims=(-1,))
    p = _as_float_array(ijk_zyx)
    denom, half = _grid_denominator(shape_zyx, p)
    return ((2.0 * p / denom - 1.0) * half)[..., ::-1]


def normalized_to_index(
    grid_xyz: np.ndarray | torch.Tensor, shape_zyx: Sequence[int]
) -> np.ndarray | torch.Tensor:
    """``grid_sample`` coordinates ``(x, y, z)`` (``align_corners=True``) -> array indices ``(z, y, x)``.

    The inverse of :func:`index_to_normalized`: ``i = (n + 1) / 2 * (size - 1)`` per axis.

    Args:
        grid_xyz: ``(N, D)`` (or ``(..., D)``) normalised coordinates in ``grid_sample`` order.
        shape_zyx: the sampled array's spatial shape, in array order.

    Returns:
        ``(N, D)`` continuous indices in array order; numpy or torch like the input.
    """
    _check_points(grid_xyz, "grid_xyz", len(shape_zyx))
    if isinstance(grid_xyz, torch.Tensor):
        p = torch.flip(_as_float_tensor(grid_xyz), dims=(-1,))
        denom, half = _grid_denominator(shape_zyx, p)
        return (p + 1.0) * 0.5 * denom * half
    p = _as_float_array(grid_xyz)[..., ::-1]
    denom, half = _grid_denominator(shape_zyx, p)
    return (p + 1.0) * 0.5 * denom * half


# ----------------------------------------------------------------------------------------------
# Meshes from masks
# ----------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _check_mesh(mesh: trimesh.Trimesh, what: str) -> None:
    if not np.all(np.isfinite(mesh.vertices)):
        raise MeshBuildError(f"{what}: the mesh has non-finite (NaN/inf) vertex coordinates.")
    if not mesh.is_watertight:
        raise MeshBuildError(
            f"{what}: the surface is not closed (watertight): some edge is not shared by exactly "
            "two triangles. With method='lewiner' this happens where voxels touch only along an "
            "edge; use method='lorensen' (the default)."
        )
    if not mesh.is_winding_consistent:
        raise MeshBuildError(f"{what}: the triangles are not consistently oriented.")


def _orient_outward(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Flip all faces if the signed volume is negative (normals then point out of the solid)."""
    if mesh.volume < 0:
        mesh = trimesh.Trimesh(mesh.vertices, mesh.faces[:, ::-1], process=False)
    return mesh


def mesh_from_mask(
    mask: np.ndarray,
    geometry: ImageGeometry | None = None,
    smoothing_iterations: int = 0,
    target_faces: int | None = None,
    *,
    method: str = "lorensen",
) -> trimesh.Trimesh:
    """Closed, outward-oriented triangle surface of a binary mask.

    Marching cubes (``skimage.measure.marching_cubes``) at level 0.5 on the mask cropped to its
    bounding box and padded with one background voxel on every side, so the surface is closed
    even where the structure touches the array border. Vertices lie on midpoints between
    foreground and background voxel centres (before smoothing).

    Args:
        mask: ``(Z, Y, X)`` array; nonzero = foreground.
        geometry: the image's geometry. With it, vertices are world coordinates ``(x, y, z)`` in
            mm (:func:`index_to_world`); without it, vertices are *index* coordinates in reversed
            order ``(x, y, z)_index``, i.e. the same as ``geometry=ImageGeometry.identity()``.
            Both are ``(x, y, z)`` frames, so the orientation convention is the same.
        smoothing_iterations: number of Taubin lambda/mu step pairs (``lambda = 0.5``,
            ``mu = -0.52``, uniform weights, ``trimesh.smoothing.filter_taubin``); 0 = none.
            Taubin smoothing removes the voxel staircase with little shrinkage. With uniform
            weights the smoothing commutes with the affine index->world map, so it does not
            matter that it runs on world coordinates.
        target_faces: decimate to about this many faces with trimesh's
            ``simplify_quadric_decimation``; needs the optional package ``fast-simplification``
            (not a dependency of nnunet-topo). ``None`` = no decimation.
        method: marching-cubes variant. ``"lorensen"`` (default) gives a closed 2-manifold on
            every binary mask we tried (foreground voxels that touch only along an edge or at a
            corner become separate bodies); ``"lewiner"`` joins edge-touching voxels but then
            produces edges shared by four triangles (non-manifold), which raises here.

    Returns:
        A watertight ``trimesh.Trimesh`` with faces wound so that normals point out of the
        foreground (positive signed volume; inner faces of cavities point into the cavity).

    Raises:
        MeshBuildError: empty mask, a surface that is not closed or not consistently oriented,
            non-finite vertices (e.g. from a broken geometry), or a decimation that opened it.
        ValueError: a mask that is not 3D, or bad arguments.
        ImportError: ``target_faces`` without ``fast-simplification`` installed.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D (Z, Y, X) array, got shape {mask.shape}.")
    if smoothing_iterations < 0:
        raise ValueError(f"smoothing_iterations must be >= 0, got {smoothing_iterations}.")
    if target_faces is not None and target_faces < 4:
        raise ValueError(f"target_faces must be >= 4 (a tetrahedron) or None, got {target_faces}.")
    if method not in ("lorensen", "lewiner"):
        raise ValueError(f"method must be 'lorensen' or 'lewiner', got {method!r}.")
    fg = mask if mask.dtype == np.bool_ else mask != 0
    if not fg.any():
        raise MeshBuildError(
            f"cannot build a mesh of an empty mask (shape {mask.shape}, no foreground voxel)."
        )
    box = _bbox(fg)
    padded = np.pad(fg[box], 1).astype(np.float32)
    verts, faces, _, _ = measure.marching_cubes(
        padded, level=0.5, method=method, allow_degenerate=False
    )
    offset = np.array([s.start - 1 for s in box], dtype=np.float64)  # padding shifted by one
    ijk = verts.astype(np.float64) + offset  # (V, 3) continuous (z, y, x) indices
    xyz = index_to_world(ijk, geometry) if geometry is not None else ijk[:, ::-1].copy()
    mesh = trimesh.Trimesh(xyz, faces.astype(np.int64), process=False)
    _check_mesh(mesh, "marching cubes")
    mesh = _orient_outward(mesh)
    if smoothing_iterations > 0:
        trimesh.smoothing.filter_taubin(
            mesh, lamb=_TAUBIN_LAMBDA, nu=_TAUBIN_NU, iterations=2 * int(smoothing_iterations)
        )
        mesh = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    if target_faces is not None and len(mesh.faces) > target_faces:
        try:
            import fast_simplification  # noqa: F401  (only to give a clear message)
        except ImportError as exc:
            raise ImportError(
                "target_faces needs the optional package 'fast-simplification' (used by trimesh's "
                "simplify_quadric_decimation): pip install fast-simplification, or pass "
                "target_faces=None."
            ) from exc
        mesh = mesh.simplify_quadric_decimation(face_count=int(target_faces))
        mesh = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
        mesh.remove_unreferenced_vertices()
        _check_mesh(mesh, f"decimation to {target_faces} faces")
        mesh = _orient_outward(mesh)
    _check_mesh(mesh, "smoothing" if smoothing_iterations else "marching cubes")
    if mesh.volume <= 0:
        raise MeshBuildError(f"the surface encloses no volume (signed volume {mesh.volume}).")
    return mesh


def structure_meshes(
    label_map: np.ndarray,
    structures: Mapping[str, Sequence[int]],
    geometry: ImageGeometry | None,
    *,
    smoothing_iterations: int = 0,
    target_faces: int | None = None,
    skip_empty: bool = False,
) -> dict[str, trimesh.Trimesh]:
    """One closed surface per mesh structure of a label map.

    Args:
        label_map: ``(Z, Y, X)`` integer label map (value = nnU-Net label id).
        structures: ``{name: label ids}``; a structure is the union of its labels, e.g.
            ``{"LV_endo": [3], "LV_epi": [2, 3]}`` (the resolved ``mesh_structures`` block of the
            topology spec).
        geometry: the image's geometry (world mm), or ``None`` for index coordinates (see
            :func:`mesh_from_mask`).
        smoothing_iterations, target_faces: passed to :func:`mesh_from_mask`.
        skip_empty: leave structures without any voxel out of the result (with a warning)
            instead of raising.

    Returns:
        ``{name: mesh}`` in the order of ``structures``.

    Raises:
        MeshBuildError: naming the structure, if a mesh cannot be built (e.g. an empty structure
            and ``skip_empty=False``).
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 3:
        raise ValueError(f"label_map must be a 3D (Z, Y, X) array, got shape {label_map.shape}.")
    out: dict[str, trimesh.Trimesh] = {}
    for name, ids in structures.items():
        raw = list(ids) if isinstance(ids, (list, tuple, set, frozenset, np.ndarray)) else [ids]
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in raw):
            raise ValueError(
                f"mesh structure {name!r}: label ids must be integers, got {raw!r} (resolve label "
                "names to ids first, e.g. with the dataset's labels)."
            )
        ids = sorted({int(i) for i in raw})
        if not ids:
            raise ValueError(f"mesh structure {name!r} has no label ids.")
        mask = np.isin(label_map, ids)
        if skip_empty and not mask.any():
            warnings.warn(
                f"mesh structure {name!r} (labels {ids}) is empty in this label map; no mesh.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        try:
            out[name] = mesh_from_mask(mask, geometry, smoothing_iterations, target_faces)
        except MeshBuildError as exc:
            raise MeshBuildError(f"mesh structure {name!r} (labels {ids}): {exc}") from exc
    return out


# ----------------------------------------------------------------------------------------------
# Export and import
# ----------------------------------------------------------------------------------------------


def _extension(path: str) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in SUPPORTED_MESH_EXTENSIONS:
        raise ValueError(
            f"unsupported mesh file extension {ext!r} in {str(path)!r}; supported: "
            f"{', '.join(SUPPORTED_MESH_EXTENSIONS)}."
        )
    return ext


def _mesh_arrays(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(
            f"expected a triangle mesh with (V, 3) vertices and (F, 3) faces, got "
            f"{vertices.shape} and {faces.shape}."
        )
    if not np.all(np.isfinite(vertices)):
        raise ValueError("the mesh has non-finite vertex coordinates; refusing to write it.")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError("the mesh has face indices outside its vertex array.")
    return vertices, faces


def _check_point_data(point_data: Mapping[str, Any] | None, n_vertices: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, values in (point_data or {}).items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (n_vertices,):
            raise ValueError(f"point data {name!r} must be one value per vertex, shape ({n_vertices},), got "
                             f"{arr.shape}.")
        if not name or any(c.isspace() for c in name) or any(c in name for c in "<>&\"'"):
            raise ValueError(f"point data name {name!r} must be non-empty without spaces or XML characters.")
        out[name] = arr
    return out


def _write_vtk_legacy(path: str, vertices: np.ndarray, faces: np.ndarray,
                      point_data: Mapping[str, np.ndarray] | None = None) -> None:
    """Legacy VTK 4.2 POLYDATA, binary (big-endian float64 points, int32 polygon lists; point data as
    ``POINT_DATA`` float64 ``SCALARS``)."""
    if len(faces) and 4 * len(faces) >= 2**31:
        raise ValueError("mesh too large for a legacy VTK file (int32 indices).")
    polys = np.concatenate([np.full((len(faces), 1), 3, np.int64), faces], axis=1)
    with open(path, "wb") as f:
        f.write(b"# vtk DataFile Version 4.2\n")
        f.write(b"nnunet-topo surface mesh, world coordinates in mm SPACE=LPS\n")
        f.write(b"BINARY\n")
        f.write(b"DATASET POLYDATA\n")
        f.write(f"POINTS {len(vertices)} double\n".encode())
        f.write(vertices.astype(">f8").tobytes())
        f.write(b"\n")
        f.write(f"POLYGONS {len(faces)} {polys.size}\n".encode())
        f.write(polys.astype(">i4").tobytes())
        f.write(b"\n")
        if point_data:
            f.write(f"POINT_DATA {len(vertices)}\n".encode())
            for name, values in point_data.items():
                f.write(f"SCALARS {name} double 1\nLOOKUP_TABLE default\n".encode())
                f.write(np.asarray(values, np.float64).astype(">f8").tobytes())
                f.write(b"\n")


def _write_vtp(path: str, vertices: np.ndarray, faces: np.ndarray,
               point_data: Mapping[str, np.ndarray] | None = None) -> None:
    """VTK XML PolyData, ASCII (17 significant digits, so float64 coordinates round-trip); point data as Float64
    ``PointData`` arrays (before ``Points``, the order of the VTK XML format)."""
    pd = ""
    if point_data:
        arrays = "".join(
            f'        <DataArray type="Float64" Name="{name}" NumberOfComponents="1" format="ascii">\n'
            f"          {' '.join(repr(float(v)) for v in values)}\n"
            "        </DataArray>\n"
            for name, values in point_data.items())
        pd = f'      <PointData Scalars="{next(iter(point_data))}">\n{arrays}      </PointData>\n'
    pts = " ".join(repr(float(v)) for v in vertices.ravel())
    conn = " ".join(str(int(i)) for i in faces.ravel())
    offs = " ".join(str(3 * (k + 1)) for k in range(len(faces)))
    text = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
        "  <PolyData>\n"
        f'    <Piece NumberOfPoints="{len(vertices)}" NumberOfVerts="0" NumberOfLines="0" '
        f'NumberOfStrips="0" NumberOfPolys="{len(faces)}">\n'
        f"{pd}"
        "      <Points>\n"
        '        <DataArray type="Float64" Name="Points" NumberOfComponents="3" format="ascii">\n'
        f"          {pts}\n"
        "        </DataArray>\n"
        "      </Points>\n"
        "      <Polys>\n"
        '        <DataArray type="Int64" Name="connectivity" format="ascii">\n'
        f"          {conn}\n"
        "        </DataArray>\n"
        '        <DataArray type="Int64" Name="offsets" format="ascii">\n'
        f"          {offs}\n"
        "        </DataArray>\n"
        "      </Polys>\n"
        "    </Piece>\n"
        "  </PolyData>\n"
        "</VTKFile>\n"
    )
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike, overwrite: bool = False,
                point_data: Mapping[str, Any] | None = None) -> str:
    """Write a triangle mesh; the format follows the file extension.

    * ``.vtk``: legacy VTK 4.2 ``POLYDATA`` (binary), written here: surface meshes are VTK
      PolyData (readable by ParaView, 3D Slicer, VTK's ``vtkPolyDataReader``, pyvista). meshio
      5.3 writes only ``UNSTRUCTURED_GRID`` datasets, which some surface tools do not accept, and
      has no ``.vtp`` support at all.
    * ``.vtp``: VTK XML PolyData (ASCII), written here.
    * ``.ply`` / ``.obj`` / ``.stl``: through trimesh (binary PLY, OBJ without normals, binary STL).

    Vertex order is preserved by every format but STL (which stores each triangle's corners and
    loses vertex sharing; :func:`read_mesh` merges them again). Coordinates are written as
    given: for meshes from :func:`mesh_from_mask` with a geometry, ITK physical coordinates in mm
    (LPS for medical images), which 3D Slicer (>= 4.11) assumes for mesh files by default.

    Args:
        mesh: the mesh (``vertices (V, 3)``, ``faces (F, 3)``).
        path: output file; missing parent folders are created.
        overwrite: replace an existing file; by default an existing file is an error.
        point_data: ``{name: (V,) values}``, one scalar per vertex (e.g. ``spread_mm``), written as VTK point data
            (float64) into ``.vtk``/``.vtp`` files and read back by :func:`read_point_data`; other formats refuse it
            (``ValueError``).

    Returns:
        The path written, as a string.

    Raises:
        ValueError: unknown extension (the message lists the supported ones), or an invalid mesh.
        FileExistsError: the file exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    vertices, faces = _mesh_arrays(mesh)
    pdata = _check_point_data(point_data, len(vertices))
    if pdata and ext not in (".vtk", ".vtp"):
        raise ValueError(f"point data ({', '.join(pdata)}) is written only into .vtk/.vtp files, not {ext}.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if ext == ".vtk":
        _write_vtk_legacy(path, vertices, faces, pdata)
    elif ext == ".vtp":
        _write_vtp(path, vertices, faces, pdata)
    else:
        plain = trimesh.Trimesh(vertices, faces, process=False)
        kwargs = {"include_normals": False} if ext == ".obj" else {}
        plain.export(path, file_type=ext[1:], **kwargs)
    return path


def _read_vtk_legacy(path: str, point_data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Legacy VTK POLYDATA (versions <= 4.2 and 5.1, ASCII or binary); triangles only.

    Other legacy datasets (``UNSTRUCTURED_GRID``) are read with meshio. If ``point_data`` is a dict, the
    ``POINT_DATA`` ``SCALARS`` arrays are stored in it (``{name: (V,) or (V, k)}``); other attributes are skipped.
    """
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n", 4)
    if len(lines) < 5 or not lines[0].startswith(b"# vtk DataFile Version"):
        raise ValueError(f"{path} is not a legacy VTK file (no '# vtk DataFile Version' header).")
    mode = lines[2].strip().upper()
    dataset = lines[3].strip().upper()
    if dataset != b"DATASET POLYDATA":
        import meshio

        m = meshio.read(path)
        tri = [c.data for c in m.cells if c.type == "triangle"]
        others = sorted({c.type for c in m.cells if c.type != "triangle"})
        if others or not tri:
            raise ValueError(f"{path}: expected a triangle surface, found cells {others or 'none'}.")
        return np.asarray(m.points, np.float64), np.concatenate(tri).astype(np.int64)
    if mode not in (b"ASCII", b"BINARY"):
        raise ValueError(f"{path}: unknown legacy VTK data mode {mode!r}.")
    binary = mode == b"BINARY"
    body = lines[4]
    pos = 0
    vtk_types = {
        "float": "f4", "double": "f8", "int": "i4", "long": "i8", "vtktypeint64": "i8",
        "vtktypeint32": "i4", "unsigned_int": "u4", "unsigned_long": "u8", "short": "i2",
    }

    def raw_line() -> bytes | None:
        nonlocal pos
        if pos >= len(body):
            return None
        end = body.find(b"\n", pos)
        end = len(body) if end < 0 else end
        line = body[pos:end].strip()
        pos = end + 1
        return line

    def next_line() -> list[str]:
        while True:
            line = raw_line()
            if line is None:
                return []
            if line:
                return line.decode().split()

    def read_values(count: int, vtk_type: str) -> np.ndarray:
        nonlocal pos
        dt = np.dtype(vtk_types[vtk_type.lower()])
        if binary:
            nbytes = count * dt.itemsize
            arr = np.frombuffer(body, dtype=dt.newbyteorder(">"), count=count, offset=pos)
            pos += nbytes
            return arr.astype(dt.newbyteorder("="))
        out: list[str] = []
        while len(out) < count:
            toks = next_line()
            if not toks:
                raise ValueError(f"{path}: unexpected end of file.")
            out.extend(toks)
        return np.asarray(out[:count], dtype=dt)

    version_51 = lines[0].strip().endswith(b"5.1")
    points = None
    faces = None
    while True:
        toks = next_line()
        if not toks:
            break
        key = toks[0].upper()
        if key == "POINTS":
            points = read_values(3 * int(toks[1]), toks[2]).reshape(-1, 3).astype(np.float64)
        elif key == "POLYGONS":
            n_a, n_b = int(toks[1]), int(toks[2])
            nxt = next_line() if version_51 else None
            if nxt and nxt[0].upper() == "OFFSETS":  # VTK 5.1: offsets + connectivity
                offsets = read_values(n_a, nxt[1]).astype(np.int64)
                conn_hdr = next_line()
                conn = read_values(n_b, conn_hdr[1]).astype(np.int64)
                if not np.all(np.diff(offsets) == 3):
                    raise ValueError(f"{path}: only triangle polygons are supported.")
                faces = conn.reshape(-1, 3)
            else:
                if nxt:
                    raise ValueError(f"{path}: cannot parse POLYGONS section.")
                lst = read_values(n_b, "int").astype(np.int64).reshape(n_a, -1) if n_a else None
                if lst is not None and (lst.shape[1] != 4 or np.any(lst[:, 0] != 3)):
                    raise ValueError(f"{path}: only triangle polygons are supported.")
                faces = lst[:, 1:] if lst is not None else np.zeros((0, 3), np.int64)
        elif key == "METADATA":  # VTK >= 9 writes these after arrays; a blank line ends them
            while raw_line():
                pass
        elif key in ("VERTICES", "LINES", "TRIANGLE_STRIPS"):
            if int(toks[2]) > 0:
                raise ValueError(f"{path}: {key} cells are not supported (triangle surfaces only).")
            if version_51:  # empty section: OFFSETS (one 0) and an empty CONNECTIVITY
                hdr = next_line()
                read_values(int(toks[1]), hdr[1])
                next_line()
        elif key == "POINT_DATA" and point_data is not None and points is not None:
            n_pts = int(toks[1])
            while True:
                hdr = next_line()
                if not hdr or hdr[0].upper() != "SCALARS":
                    break  # other attributes (VECTORS, FIELD, CELL_DATA...) are not read
                ncomp = int(hdr[3]) if len(hdr) > 3 else 1
                lut = next_line()
                if not lut or lut[0].upper() != "LOOKUP_TABLE":
                    raise ValueError(f"{path}: SCALARS {hdr[1]} without LOOKUP_TABLE.")
                vals = read_values(n_pts * ncomp, hdr[2]).astype(np.float64)
                point_data[hdr[1]] = vals if ncomp == 1 else vals.reshape(n_pts, ncomp)
            break
        elif key in ("POINT_DATA", "CELL_DATA", "FIELD"):
            break  # attribute data follows the geometry; not needed
        else:
            raise ValueError(f"{path}: unexpected legacy VTK section {key!r}.")
    if points is None or faces is None:
        raise ValueError(f"{path}: no POINTS or no POLYGONS section.")
    return points, faces


def _read_vtp(path: str, point_data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """VTK XML PolyData with ASCII data arrays (as written by :func:`export_mesh`); ``PointData`` arrays into
    ``point_data`` if it is a dict."""
    root = ET.parse(path).getroot()
    if root.get("type") != "PolyData":
        raise ValueError(f"{path}: not a VTK XML PolyData file (type={root.get('type')!r}).")
    piece = root.find("PolyData/Piece")
    if piece is None:
        raise ValueError(f"{path}: no PolyData/Piece element.")

    def array(elem: ET.Element | None, what: str) -> np.ndarray:
        if elem is None:
            raise ValueError(f"{path}: missing {what}.")
        if elem.get("format", "ascii") != "ascii":
            raise ValueError(
                f"{path}: {what} is stored as {elem.get('format')!r}; only ASCII .vtp files are "
                "read (convert with ParaView/meshio, or use .vtk/.ply)."
            )
        return np.asarray((elem.text or "").split(), dtype=np.float64)

    points = array(piece.find("Points/DataArray"), "Points").reshape(-1, 3)
    polys = {e.get("Name"): e for e in piece.findall("Polys/DataArray")}
    conn = array(polys.get("connectivity"), "Polys connectivity").astype(np.int64)
    offsets = array(polys.get("offsets"), "Polys offsets").astype(np.int64)
    if len(offsets) and not np.all(np.diff(np.concatenate([[0], offsets])) == 3):
        raise ValueError(f"{path}: only triangle polygons are supported.")
    for kind in ("Verts", "Lines", "Strips"):
        if int(piece.get(f"NumberOf{kind}", "0")) > 0:
            raise ValueError(f"{path}: {kind} cells are not supported (triangle surfaces only).")
    if point_data is not None:
        for elem in piece.findall("PointData/DataArray"):
            vals = array(elem, f"PointData {elem.get('Name')}")
            ncomp = int(elem.get("NumberOfComponents", "1"))
            point_data[elem.get("Name")] = vals if ncomp == 1 else vals.reshape(-1, ncomp)
    return points, conn.reshape(-1, 3)


def read_point_data(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The per-vertex scalar arrays of a ``.vtk`` (legacy ``POINT_DATA SCALARS``) or ``.vtp`` (``PointData``) file,
    e.g. ``{"spread_mm": (V,)}`` as written by :func:`export_mesh`; ``{}`` when there are none.

    Raises:
        ValueError: another extension (other formats carry no point data here), or a malformed file.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if ext not in (".vtk", ".vtp"):
        raise ValueError(f"{path}: point data is read from .vtk/.vtp files only.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no mesh file at {path}.")
    out: dict[str, np.ndarray] = {}
    (_read_vtk_legacy if ext == ".vtk" else _read_vtp)(path, out)
    return out


def read_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Read a triangle mesh written by :func:`export_mesh` (or a compatible file).

    ``.vtk``: legacy POLYDATA (ASCII or binary, versions 4.2 and 5.1) is parsed here, other legacy
    datasets with triangle cells through meshio; ``.vtp``: ASCII VTK XML PolyData only;
    ``.ply``/``.obj``/``.stl``: trimesh. The vertex order of the file is kept (no merging), except
    for STL, whose duplicated triangle corners are merged into shared vertices.

    Returns:
        ``trimesh.Trimesh`` (``process=False``).

    Raises:
        ValueError: unknown extension, or a file that is not a triangle surface.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no mesh file at {path}.")
    if ext == ".vtk":
        vertices, faces = _read_vtk_legacy(path)
    elif ext == ".vtp":
        vertices, faces = _read_vtp(path)
    else:
        loaded = trimesh.load(path, file_type=ext[1:], force="mesh", process=False)
        if ext == ".stl":
            loaded.merge_vertices()
        vertices, faces = np.asarray(loaded.vertices), np.asarray(loaded.faces)
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"{path}: face indices outside the vertex array.")
    return trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=False)
