"""Every coordinate frame of nnunet-topo in one place, and the maps between them.

Losses, the mesh head, mesh prediction and evaluation all use these functions; see ``documentation/meshes.md`` for
the conventions (DESIGN.md section 4, explicit coordinate frames). Every function names the frame of its input and
output:

* **array index** ``(z, y, x)`` (also *voxel index* of a patch): a voxel's integer index into a numpy array in
  SimpleITK/nnU-Net order ``(Z, Y, X)``; continuous indices address the voxel *centres* (index ``k`` = centre of
  voxel ``k``).
* **world** ``(x, y, z)`` in mm: ITK/SimpleITK physical space (DICOM LPS for medical images),
  ``world = origin + D @ (spacing * (x, y, z)_index)`` with the image's ``spacing``, ``origin`` and 3x3
  ``direction`` ``D``, all in ``(x, y, z)`` order as SimpleITK reports them (:class:`ImageGeometry`,
  :func:`index_to_world`, :func:`world_to_index`).
* **normalised** ``(x, y, z)`` in ``[-1, 1]``: the grid coordinates of
  ``torch.nn.functional.grid_sample(input, grid, align_corners=True)`` for a volume ``input`` of shape
  ``(B, C, Z, Y, X)``: the last dimension of ``grid`` is ``(x, y, z)``, i.e. it indexes the *last* array axis
  first; ``-1`` is the centre of the first voxel and ``+1`` the centre of the last one along each axis. The mesh
  head predicts in this frame (:func:`index_to_normalized`, :func:`normalized_to_index`; their 3D patch twins
  :func:`voxel_to_normalized`, :func:`normalized_to_voxel`).
* **physical patch frame** ``(x, y, z)`` in mm from the centre of voxel 0 of a patch: ``index * spacing`` with the
  axis order reversed (:func:`voxel_to_mm`, :func:`mm_to_voxel`, :func:`normalized_to_mm`). The mesh losses measure
  everything here, because the normalised frame is anisotropic (one normalised unit is half the patch extent: 50 mm
  through-plane but ~175 mm in-plane for a 20x256x224 MRI patch at 5x1.56x1.56 mm). The maps between the normalised
  and this frame are positive axis scalings (plus the order reversal applied to both points and meshes), so
  inside/outside is the same in each.
* **preprocessed index** ``(z, y, x)``: continuous indices into nnU-Net's preprocessed array of a case (transposed,
  cropped to the nonzero box, resampled to the configuration's spacing), the array the network sees;
  :func:`preprocessed_index_to_original` maps them to array indices of the original image (whose world frame is
  :meth:`ImageGeometry.from_nnunet_properties`).

No nnU-Net import here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ImageGeometry",
    "index_to_world",
    "world_to_index",
    "index_to_normalized",
    "normalized_to_index",
    "voxel_to_normalized",
    "normalized_to_voxel",
    "check_spacing",
    "voxel_to_mm",
    "mm_to_voxel",
    "normalized_to_mm",
    "normalized_to_mm_scale",
    "preprocessed_index_to_original",
]


# ----------------------------------------------------------------------------------------------
# Image geometry: array index <-> world (mm)
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
# Patch frames: voxel index <-> normalised <-> physical patch frame (mm)
# ----------------------------------------------------------------------------------------------
def voxel_to_normalized(idx_zyx: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel indices ``(z, y, x)`` -> normalised patch coordinates ``(x, y, z)`` in ``[-1, 1]``.

    ``n = 2 * i / (size - 1) - 1`` per axis, order reversed (``grid_sample``, ``align_corners=True``); an axis of
    size 1 maps to 0. Same as :func:`index_to_normalized`.

    Args:
        idx_zyx: ``(..., 3)`` continuous or integer voxel indices in array order.
        shape: the patch shape ``(Z, Y, X)``.

    Returns:
        ``(..., 3)`` float tensor (float32 for integer input) in ``(x, y, z)`` order.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be the 3D patch shape (Z, Y, X), got {tuple(shape)}")
    return index_to_normalized(idx_zyx, shape)


def normalized_to_voxel(points_xyz: Tensor, shape: Sequence[int]) -> Tensor:
    """Normalised patch coordinates ``(x, y, z)`` -> continuous voxel indices ``(z, y, x)``; inverse of
    :func:`voxel_to_normalized` (``i = (n + 1) / 2 * (size - 1)``)."""
    if len(shape) != 3:
        raise ValueError(f"shape must be the 3D patch shape (Z, Y, X), got {tuple(shape)}")
    return normalized_to_index(points_xyz, shape)


def check_spacing(spacing: Optional[Sequence[float]]) -> Optional[Tuple[float, float, float]]:
    """``spacing`` as a tuple of three positive finite voxel sizes ``(z, y, x)`` in mm (None stays None: 1 mm);
    ``ValueError`` otherwise."""
    if spacing is None:
        return None
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive voxel sizes (z, y, x) in mm, got {spacing!r}")
    return sp


def _spacing_tensor(spacing: Optional[Sequence[float]], like: Tensor) -> Tensor:
    sp = check_spacing(spacing) or (1.0, 1.0, 1.0)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    # filled on the device (no host-to-device copy, which would wait for the device: torch.tensor(sp, device=...))
    return torch.stack([torch.full((), s, dtype=dtype, device=like.device) for s in sp])


def voxel_to_mm(idx_zyx: Tensor, spacing: Optional[Sequence[float]]) -> Tensor:
    """Voxel indices ``(z, y, x)`` of a patch -> the patch's physical frame: ``(x, y, z)`` in mm from the centre of
    voxel 0 (``index * spacing``, order reversed like the normalised frame, so that the map from the normalised
    frame is a positive scaling and keeps the orientation of meshes). ``spacing`` = ``(z, y, x)`` mm; None: 1 mm."""
    idx = idx_zyx if idx_zyx.is_floating_point() else idx_zyx.to(torch.float32)
    return (idx * _spacing_tensor(spacing, idx)).flip(-1)


def mm_to_voxel(points_mm: Tensor, spacing: Optional[Sequence[float]]) -> Tensor:
    """Inverse of :func:`voxel_to_mm`: ``(x, y, z)`` mm -> continuous voxel indices ``(z, y, x)``."""
    return points_mm.flip(-1) / _spacing_tensor(spacing, points_mm)


def normalized_to_mm(points_xyz: Tensor, shape: Sequence[int], spacing: Optional[Sequence[float]]) -> Tensor:
    """Normalised patch coordinates -> the patch's physical frame (:func:`voxel_to_mm`), e.g. mesh vertices."""
    return voxel_to_mm(normalized_to_voxel(points_xyz, shape), spacing)


def normalized_to_mm_scale(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> Tuple[float, float, float]:
    """Per-axis scale ``(x, y, z)`` from the normalised patch frame to mm: ``(size - 1) / 2 * spacing`` per axis
    (half the distance between the first and last voxel centres). ``points_xyz * scale`` is
    :func:`normalized_to_mm` up to a translation (a positive per-axis scaling, which keeps the orientation and the
    enclosed volume's sign of meshes). ``shape_zyx`` and ``spacing_zyx`` in array order; python floats."""
    return tuple((n - 1) / 2.0 * float(sp) for n, sp in zip(tuple(shape_zyx)[::-1], list(spacing_zyx)[::-1]))


# ----------------------------------------------------------------------------------------------
# nnU-Net's preprocessed array <-> the original image array
# ----------------------------------------------------------------------------------------------
def preprocessed_index_to_original(points_zyx: np.ndarray, shape_before_resampling: Sequence[int],
                                   preprocessed_shape_zyx: Sequence[int], crop_start: Sequence[int],
                                   transpose_forward: Sequence[int]) -> np.ndarray:
    """Continuous indices of nnU-Net's preprocessed array -> continuous indices of the original image array.

    Undoes, in reverse order, what nnU-Net's ``DefaultPreprocessor.run_case_npy`` (2.8.1) did:

    1. resampling from ``n_orig = shape_before_resampling`` to ``n_new = preprocessed_shape_zyx`` voxels per axis,
       with nnU-Net's ``align_corners=False`` convention ``i_orig = (i_new + 0.5) * n_orig / n_new - 0.5``;
    2. cropping: ``+ crop_start[k]`` (the start of ``bbox_used_for_cropping``, in the transposed order);
    3. ``transpose_forward``: transposed axis ``k`` is original axis ``transpose_forward[k]``.

    Args:
        points_zyx: ``(N, 3)`` continuous indices into the preprocessed (unpadded) array, array order.
        shape_before_resampling, preprocessed_shape_zyx, crop_start: per transposed axis (3 each).
        transpose_forward: the plans' axis permutation.

    Returns:
        ``(N, 3)`` float64 continuous indices ``(z, y, x)`` into the original image array.
    """
    p = np.asarray(points_zyx, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points_zyx must be (N, 3), got shape {p.shape}")
    n_orig = np.asarray(shape_before_resampling, dtype=np.float64)
    n_new = np.asarray(preprocessed_shape_zyx, dtype=np.float64)
    if n_orig.shape != (3,) or n_new.shape != (3,):
        raise ValueError(f"3D shapes expected, got {n_orig.tolist()} and {n_new.tolist()}")
    cropped = (p + 0.5) * (n_orig / n_new) - 0.5
    transposed = cropped + np.asarray(crop_start, dtype=np.float64)
    tf = list(transpose_forward)
    original = np.empty_like(transposed)
    original[:, tf] = transposed  # original axis tf[k] <- transposed axis k
    return original
