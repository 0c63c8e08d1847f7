"""Mesh templates for the GCN mesh head (DESIGN §7 "Templates").

A template is one closed, genus-correct triangle surface per mesh structure with a *fixed* vertex
count and connectivity; the head deforms its vertices and never changes its faces. Every template
lives in the **normalised patch frame** of ``torch.nn.functional.grid_sample(...,
align_corners=True)``: coordinates in ``[-1, 1]``, last dimension ordered ``(x, y, z)`` where ``x``
indexes the *last* array axis of a ``(B, C, Z, Y, X)`` volume (see ``documentation/meshes.md``).
Faces are wound so that normals point outward in that frame (positive signed volume).

Templates from training labels (:func:`template_from_masks`, DESIGN §7):

* the genus is the majority genus of the individual masks (``b0 = 1, b2 = 0``; ``b1 = 0`` -> genus 0,
  ``b1 = 1`` -> genus 1); anything else raises ``ValueError``. (The Betti numbers of the *mean* mask of a thin
  structure are unreliable: the mean of 6 synthetic crescent RVs has (1, 1, 2).)
* genus 0: the **isosurface** of the soft mean mask (the fraction of masks containing a voxel), smoothed with a
  Gaussian of ``iso_smoothing_mm`` (half the finest spacing), resampled to isotropic voxels of the finest spacing (linear), cut at 0.5 by
  marching cubes (scikit-image) in mm, the largest watertight piece kept, then decimated to the template's vertex
  count (the resampling is refined while the isosurface has fewer faces) by quadric edge collapse
  (``trimesh.Trimesh.simplify_quadric_decimation``, i.e. the fast-simplification
  library: a maintained C++ implementation of Garland-Heckbert that keeps a closed manifold closed, chosen over
  pymeshlab, a much larger binary), and scaled about its centroid to the volume of the thresholded mean mask
  (smoothing and decimation shrink it). The result must be watertight with Euler characteristic 2 (genus 0); the
  smoothing is doubled up to twice until it is. No star shape is needed, so a crescent RV gets a crescent.
  Only if that fails, an icosphere is *shrink-wrapped* onto the 0.5 level of the thresholded mean mask along rays
  from its centroid (star-shaped structures only), else ``ValueError`` (the trainers then use a moment-fitted
  ellipsoid and log it).
* genus 1: a torus with an elliptic cross-section fitted by moments (centroid; axis = the principal
  direction whose line through the centroid crosses the least foreground, i.e. the one through the
  hole; major radius = mean distance of the foreground voxels from the axis; cross-section
  semi-axes = 2 standard deviations of the radial and axial coordinates, as for a uniformly filled
  ellipse), with the cross-section rescaled so that the *polygonal* torus's volume equals the mean
  mask's voxel volume (within 0.1 %). It is a fitted torus, not
  shape-adapted beyond its moments.

The isosurface is computed in mm (``spacing``, the patch's voxel size); ray marching and torus fitting in voxel
indices; everything is then mapped to the normalised frame with :func:`nnunet_topo.frames.index_to_normalized`
(``n = 2 i / (size - 1) - 1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import trimesh
from scipy import ndimage

from nnunet_topo.frames import index_to_normalized
from nnunet_topo.metrics.topology import betti_numbers_3d
from nnunet_topo.surfaces import orient_outward, signed_volume

__all__ = [
    "Template",
    "sphere_template",
    "torus_template",
    "template_from_masks",
]


@dataclass
class Template:
    """A closed template surface in the normalised ``(x, y, z)`` patch frame.

    Attributes:
        vertices: ``(V, 3)`` float32, normalised ``grid_sample`` coordinates ``(x, y, z)``.
        faces: ``(F, 3)`` int64 vertex indices, wound outward (positive signed volume).
        name: structure name (e.g. ``"LV_epi"``).
        genus: 0 (sphere-like) or 1 (torus-like).
    """

    vertices: np.ndarray
    faces: np.ndarray
    name: str = "structure"
    genus: int = 0

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(np.asarray(self.vertices, dtype=np.float32))
        self.faces = np.ascontiguousarray(np.asarray(self.faces, dtype=np.int64))
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3 or len(self.vertices) == 0:
            raise ValueError(f"Template {self.name!r}: vertices must be (V, 3) with V > 0, got {self.vertices.shape}.")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3 or len(self.faces) == 0:
            raise ValueError(f"Template {self.name!r}: faces must be (F, 3) with F > 0, got {self.faces.shape}.")
        if self.faces.min() < 0 or self.faces.max() >= len(self.vertices):
            raise ValueError(f"Template {self.name!r}: face indices must lie in [0, {len(self.vertices)}).")
        if not np.all(np.isfinite(self.vertices)):
            raise ValueError(f"Template {self.name!r}: vertices must be finite.")
        if int(self.genus) not in (0, 1):
            raise ValueError(f"Template {self.name!r}: genus must be 0 or 1, got {self.genus}.")
        self.genus = int(self.genus)
        self.name = str(self.name)

    @property
    def num_vertices(self) -> int:
        return int(len(self.vertices))

    def volume(self) -> float:
        """Signed enclosed volume in the normalised frame."""
        return signed_volume(self.vertices, self.faces)

    def to_trimesh(self) -> trimesh.Trimesh:
        return trimesh.Trimesh(self.vertices.astype(np.float64), self.faces, process=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON and checkpoint friendly) representation; inverse of :meth:`from_dict`."""
        return {
            "name": self.name,
            "genus": self.genus,
            "vertices": self.vertices.tolist(),
            "faces": self.faces.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Template":
        missing = {"name", "genus", "vertices", "faces"} - set(d)
        if missing:
            raise ValueError(f"Template dict is missing the keys {sorted(missing)}.")
        return cls(
            vertices=np.asarray(d["vertices"], dtype=np.float32).reshape(-1, 3),
            faces=np.asarray(d["faces"], dtype=np.int64).reshape(-1, 3),
            name=d["name"],
            genus=d["genus"],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Template):
            return NotImplemented
        return (
            self.name == other.name
            and self.genus == other.genus
            and np.array_equal(self.vertices, other.vertices)
            and np.array_equal(self.faces, other.faces)
        )


def sphere_template(
    subdivisions: int = 3,
    radius: float = 0.5,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    name: str = "sphere",
) -> Template:
    """An icosphere (``trimesh.creation.icosphere``): ``10 * 4**subdivisions + 2`` vertices.

    Args:
        subdivisions: icosphere subdivision level (0: icosahedron, 3: 642 vertices).
        radius: radius in normalised units.
        center: centre ``(x, y, z)`` in normalised units.
        name: structure name.
    """
    if int(subdivisions) < 0:
        raise ValueError(f"subdivisions must be >= 0, got {subdivisions}.")
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}.")
    ico = trimesh.creation.icosphere(subdivisions=int(subdivisions), radius=1.0)
    v = np.asarray(ico.vertices, dtype=np.float64) * float(radius) + np.asarray(center, dtype=np.float64)
    f = orient_outward(v, np.asarray(ico.faces, dtype=np.int64))
    return Template(v, f, name=name, genus=0)


def _torus_arrays(
    major_radius: float,
    radial_semi_axis: float,
    axial_semi_axis: float,
    major_sections: int,
    minor_sections: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Torus around the z axis with an elliptic cross-section, in a local (x, y, z) frame."""
    phi = 2 * np.pi * np.arange(major_sections) / major_sections  # around the axis
    theta = 2 * np.pi * np.arange(minor_sections) / minor_sections  # around the tube
    P, T = np.meshgrid(phi, theta, indexing="ij")
    r = major_radius + radial_semi_axis * np.cos(T)
    v = np.stack([r * np.cos(P), r * np.sin(P), axial_semi_axis * np.sin(T)], axis=-1).reshape(-1, 3)
    i = np.arange(major_sections)[:, None]
    j = np.arange(minor_sections)[None, :]
    a = i * minor_sections + j
    b = ((i + 1) % major_sections) * minor_sections + j
    c = ((i + 1) % major_sections) * minor_sections + (j + 1) % minor_sections
    d = i * minor_sections + (j + 1) % minor_sections
    faces = np.concatenate(
        [np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)], axis=0
    ).astype(np.int64)
    return v, faces


def _frame_from_axis(axis: np.ndarray) -> np.ndarray:
    """3x3 rotation whose third column is ``axis`` (unit)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    helper = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(a, helper)
    u /= np.linalg.norm(u)
    w = np.cross(a, u)
    return np.stack([u, w, a], axis=1)


def torus_template(
    major_radius: float = 0.5,
    minor_radius: float = 0.2,
    major_sections: int = 32,
    minor_sections: int = 16,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    axis: Sequence[float] = (0.0, 0.0, 1.0),
    axial_semi_axis: float | None = None,
    name: str = "torus",
) -> Template:
    """A torus with ``major_sections * minor_sections`` vertices, in normalised ``(x, y, z)`` units.

    Args:
        major_radius: distance of the tube's centre line from the axis.
        minor_radius: tube radius in the radial direction.
        major_sections, minor_sections: vertices around the axis / around the tube (>= 3 each).
        center: centre ``(x, y, z)``.
        axis: direction ``(x, y, z)`` of the symmetry axis (through the hole).
        axial_semi_axis: tube semi-axis along ``axis`` (elliptic cross-section); default
            ``minor_radius`` (circular cross-section).
        name: structure name.
    """
    if major_sections < 3 or minor_sections < 3:
        raise ValueError("major_sections and minor_sections must be >= 3.")
    axial = minor_radius if axial_semi_axis is None else axial_semi_axis
    if not (0 < minor_radius < major_radius) or not axial > 0:
        raise ValueError(
            f"need 0 < minor_radius < major_radius and axial_semi_axis > 0, got "
            f"minor_radius={minor_radius}, major_radius={major_radius}, axial_semi_axis={axial}."
        )
    v, f = _torus_arrays(major_radius, minor_radius, axial, int(major_sections), int(minor_sections))
    ax = np.asarray(axis, dtype=np.float64)
    if ax.shape != (3,) or not np.linalg.norm(ax) > 0:
        raise ValueError(f"axis must be a nonzero 3-vector, got {axis}.")
    v = v @ _frame_from_axis(ax).T + np.asarray(center, dtype=np.float64)
    return Template(v, orient_outward(v, f), name=name, genus=1)


# ----------------------------------------------------------------------------------------------
# Templates from training masks
# ----------------------------------------------------------------------------------------------


def _soft_mean(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Fraction of the masks containing each voxel (float32), accumulated mask by mask: memory of two volumes, not
    of all masks stacked (20 CT-size crops would need GBs)."""
    total = np.zeros(np.shape(masks[0]), np.float32)
    for m in masks:
        total += np.asarray(m) != 0
    return total / np.float32(len(masks))


def _mean_mask(masks: Sequence[np.ndarray]) -> np.ndarray:
    if len(masks) == 0:
        raise ValueError("template_from_masks needs at least one mask.")
    arrs = [np.asarray(m) != 0 for m in masks]
    shape = arrs[0].shape
    if len(shape) != 3:
        raise ValueError(f"masks must be 3D (Z, Y, X) arrays, got shape {shape}.")
    for k, a in enumerate(arrs):
        if a.shape != shape:
            raise ValueError(
                f"all masks must have the same shape (crop/resample them to the patch first); mask 0 "
                f"has {shape}, mask {k} has {a.shape}."
            )
    return _soft_mean(arrs) >= 0.5


def _shrink_wrap_sphere(mask: np.ndarray, subdivisions: int, name: str) -> np.ndarray:
    """Icosphere vertices (index frame, (z, y, x)) on the 0.5 level of ``mask`` along centroid rays."""
    pad = 2
    m = np.pad(mask.astype(np.float32), pad)
    centroid = np.argwhere(m > 0).mean(axis=0)  # (z, y, x) in the padded array
    if ndimage.map_coordinates(m, centroid[:, None], order=1)[0] < 0.5:
        raise ValueError(
            f"template_from_masks({name!r}): the centroid of the mean mask lies outside it, so the "
            "structure is not star-shaped from its centroid; a sphere template cannot be shrink-wrapped "
            "onto it. Provide a template (sphere_template/Template) instead."
        )
    ico = trimesh.creation.icosphere(subdivisions=int(subdivisions), radius=1.0)
    dirs_xyz = np.asarray(ico.vertices, dtype=np.float64)
    dirs = dirs_xyz[:, ::-1]  # (z, y, x)
    step = 0.1
    max_len = float(np.linalg.norm(m.shape)) + 1.0
    t = np.arange(0.0, max_len, step)
    pts = centroid[None, None, :] + t[None, :, None] * dirs[:, None, :]  # (N, T, 3)
    vals = ndimage.map_coordinates(m, pts.reshape(-1, 3).T, order=1, cval=0.0).reshape(len(dirs), len(t))
    inside = vals >= 0.5
    radii = np.empty(len(dirs))
    for k in range(len(dirs)):
        out_idx = np.flatnonzero(~inside[k])
        if len(out_idx) == 0:  # cannot happen with padding, kept as a guard
            raise ValueError(f"template_from_masks({name!r}): a ray from the centroid never leaves the mask.")
        j = out_idx[0]
        # linear interpolation of the 0.5 crossing between samples j-1 (inside) and j (outside)
        v0, v1 = vals[k, j - 1], vals[k, j]
        frac = (v0 - 0.5) / max(v0 - v1, 1e-12)
        radii[k] = t[j - 1] + frac * step
        # star-shapedness: the ray must not re-enter the mask more than ~1 voxel beyond the exit
        reentry = np.flatnonzero(inside[k, j:])
        if len(reentry) and t[j + reentry[-1]] - radii[k] > 1.0:
            raise ValueError(
                f"template_from_masks({name!r}): the mean mask is not star-shaped from its centroid "
                f"(a ray leaves it at {radii[k]:.1f} voxels and re-enters up to "
                f"{t[j + reentry[-1]]:.1f} voxels), so a sphere cannot be shrink-wrapped onto it. "
                "Provide a template (sphere_template/Template) instead."
            )
    return centroid[None, :] + radii[:, None] * dirs - pad, np.asarray(ico.faces, dtype=np.int64)


def _fit_torus(mask: np.ndarray, major_sections: int, minor_sections: int, name: str):
    """Elliptic-section torus (index frame, (z, y, x)) fitted to ``mask`` by moments."""
    pts = np.argwhere(mask).astype(np.float64)  # (N, 3) (z, y, x)
    c = pts.mean(axis=0)
    q = pts - c
    _, vecs = np.linalg.eigh(q.T @ q / len(q))
    # the axis is the principal direction whose line through the centroid crosses the hole
    m = mask.astype(np.float32)
    ext = float(np.linalg.norm(mask.shape))
    t = np.arange(-ext, ext, 0.25)
    crossings = []
    for k in range(3):
        line = c[None, :] + t[:, None] * vecs[:, k][None, :]
        crossings.append(float((ndimage.map_coordinates(m, line.T, order=1, cval=0.0) >= 0.5).sum()))
    axis = vecs[:, int(np.argmin(crossings))]
    if min(crossings) > 0:
        raise ValueError(
            f"template_from_masks({name!r}): no principal axis through the centroid passes through the "
            "hole of the genus-1 mean mask, so a torus cannot be fitted by moments. Provide a template "
            "(torus_template/Template) instead."
        )
    h = q @ axis
    radial = np.linalg.norm(q - h[:, None] * axis[None, :], axis=1)
    R = radial.mean()
    a_r = 2.0 * radial.std()
    a_h = 2.0 * h.std()
    # match the mean mask's volume (voxel count): Pappus, V = 2 pi R * pi a_r a_h
    scale = np.sqrt(len(pts) / (2 * np.pi * R * np.pi * a_r * a_h))
    a_r, a_h = a_r * scale, a_h * scale
    if not (0 < a_r < R):  # checked again after the polygon correction below
        raise ValueError(
            f"template_from_masks({name!r}): the fitted torus is degenerate (tube radius {a_r:.2f} "
            f">= major radius {R:.2f} voxels). Provide a template (torus_template/Template) instead."
        )
    target = float(len(pts))
    for _ in range(3):  # the polygonal torus is smaller than the smooth one: rescale the cross-section
        v, f = _torus_arrays(R, a_r, a_h, int(major_sections), int(minor_sections))  # local frame, axis = 3rd
        k = np.sqrt(target / abs(signed_volume(v, f)))
        a_r, a_h = a_r * k, a_h * k
        if not a_r < R:
            break
    v, f = _torus_arrays(R, a_r, a_h, int(major_sections), int(minor_sections))
    if not (0 < a_r < R):
        raise ValueError(
            f"template_from_masks({name!r}): the fitted torus is degenerate (tube radius {a_r:.2f} "
            f">= major radius {R:.2f} voxels). Provide a template (torus_template/Template) instead."
        )
    frame = _frame_from_axis(axis)  # columns in (z, y, x) coordinates
    return v @ frame.T + c, f


def _majority_genus(masks: Sequence[np.ndarray], name: str) -> int:
    """The genus (0 or 1) of most masks with Betti numbers (1, g, 0); ValueError if there is none."""
    votes: dict[int, int] = {}
    for m in masks:
        if np.any(m):
            b0, b1, b2 = betti_numbers_3d(np.asarray(m) != 0)
            if b0 == 1 and b2 == 0 and b1 in (0, 1):
                votes[int(b1)] = votes.get(int(b1), 0) + 1
    if not votes:
        raise ValueError(
            f"template_from_masks({name!r}): no mask has Betti numbers (1, 0, 0) or (1, 1, 0); supported are "
            "genus 0 (sphere-like) and genus 1 (torus-like) structures. Check the structure's label ids, or provide "
            "a template.")
    return max(votes, key=lambda g: (votes[g], -g))


def _isosurface_genus0(soft_mean: np.ndarray, spacing: Sequence[float], num_vertices: int, smoothing_mm: float,
                       name: str) -> tuple[np.ndarray, np.ndarray]:
    """Genus-0 surface of the 0.5 level of the smoothed soft mean mask, decimated to ``num_vertices``: vertices in
    voxel indices ``(z, y, x)``. ValueError when no closed genus-0 surface results."""
    from skimage.measure import marching_cubes

    sp = np.asarray(spacing, dtype=np.float64)
    target_faces = 2 * int(num_vertices) - 4  # closed genus 0: F = 2 V - 4
    errors = []
    for sigma in (smoothing_mm, 2.0 * smoothing_mm, 4.0 * smoothing_mm):
        sm = ndimage.gaussian_filter(soft_mean.astype(np.float32), sigma=sigma / sp) if sigma > 0 else soft_mean
        pad = np.pad(sm, 1)
        if pad.max() <= 0.5:
            errors.append(f"smoothing {sigma:.2f} mm: nothing above 0.5")
            continue
        mesh = None
        for refine in (1, 2, 4):  # isotropic voxels of the finest spacing, finer while too few faces
            up = ndimage.zoom(pad, sp / sp.min() * refine, order=1)
            step = (np.asarray(pad.shape) - 1) / (np.asarray(up.shape) - 1) * sp  # mm per resampled voxel
            v, f, _, _ = marching_cubes(up, 0.5, spacing=tuple(step))
            pieces = trimesh.Trimesh(v - sp, f, process=True).split(only_watertight=True)
            mesh = max(pieces, key=lambda m: abs(m.volume)) if len(pieces) else None
            if mesh is None or len(mesh.faces) > target_faces:
                break
        if mesh is None:
            errors.append(f"smoothing {sigma:.2f} mm: no closed surface")
            continue
        if len(mesh.faces) > target_faces:
            mesh = mesh.simplify_quadric_decimation(face_count=target_faces)
        if not (mesh.is_watertight and mesh.euler_number == 2 and abs(mesh.volume) > 0):
            errors.append(f"smoothing {sigma:.2f} mm: Euler characteristic {mesh.euler_number}, watertight "
                          f"{mesh.is_watertight}")
            continue
        # smoothing and decimation shrink the surface: scale it about its centroid to the mean mask's volume
        target = float((soft_mean >= 0.5).sum()) * float(np.prod(sp))
        verts = np.asarray(mesh.vertices, dtype=np.float64)
        c = np.asarray(mesh.center_mass, dtype=np.float64)  # the volume centroid, kept in place
        verts = c + (verts - c) * (target / abs(mesh.volume)) ** (1.0 / 3.0)
        return verts / sp, np.asarray(mesh.faces, dtype=np.int64)  # mm -> voxel indices (z, y, x)
    raise ValueError(f"template_from_masks({name!r}): the isosurface of the mean mask is not a closed genus-0 "
                     f"surface ({'; '.join(errors)}).")


def template_from_masks(
    masks: Sequence[np.ndarray],
    subdivisions: int = 3,
    name: str = "structure",
    torus_sections: tuple[int, int] = (32, 16),
    spacing: Sequence[float] | None = None,
    iso_smoothing_mm: float | None = None,
    log=None,
) -> Template:
    """A genus-correct template from the training masks of one structure (module docstring).

    Args:
        masks: ``(Z, Y, X)`` arrays of equal shape (nonzero = structure), already cropped/resampled
            to the patch the network sees (and aligned, e.g. by centroid).
        subdivisions: vertex count of genus-0 templates, that of an icosphere of this level
            (``10 * 4**subdivisions + 2``; the isosurface is decimated to it).
        name: structure name, stored in the template.
        torus_sections: ``(major, minor)`` sections for genus 1 (``major * minor`` vertices).
        spacing: ``(z, y, x)`` voxel size in mm (None: 1 mm, isotropic).
        iso_smoothing_mm: Gaussian smoothing of the mean mask before the isosurface (None: half the finest
            spacing; more rounds thin structures off).
        log: optional callable for a note when the shrink-wrapped sphere replaces the isosurface.

    Returns:
        A :class:`Template` in the normalised ``(x, y, z)`` frame of a patch of shape ``(Z, Y, X)``.

    Raises:
        ValueError: empty or ill-shaped masks; no mask of genus 0 or 1; a genus-0 structure whose isosurface is
            not closed genus 0 and that is not star-shaped either; a genus-1 mean mask to which no torus can be
            fitted.
    """
    mean = _mean_mask(masks)
    if not mean.any():
        raise ValueError(f"template_from_masks({name!r}): the mean mask (mean >= 0.5) is empty.")
    sp = (1.0, 1.0, 1.0) if spacing is None else tuple(float(x) for x in spacing)
    genus = _majority_genus(masks, name)
    if genus == 0:
        soft = _soft_mean(masks)
        sigma = 0.5 * min(sp) if iso_smoothing_mm is None else float(iso_smoothing_mm)
        try:
            v_zyx, f = _isosurface_genus0(soft, sp, 10 * 4 ** int(subdivisions) + 2, sigma, name)
        except ValueError as e:
            v_zyx, f = _shrink_wrap_sphere(mean, subdivisions, name)  # raises if not star-shaped
            if log is not None:
                log(f"{e} -> shrink-wrapped icosphere instead")
    else:
        b0, b1, b2 = betti_numbers_3d(mean)
        if (b0, b1, b2) != (1, 1, 0):
            raise ValueError(
                f"template_from_masks({name!r}): most masks are genus 1, but the mean mask has Betti numbers "
                f"({b0}, {b1}, {b2}), not (1, 1, 0), so no torus can be fitted. Provide a template.")
        v_zyx, f = _fit_torus(mean, torus_sections[0], torus_sections[1], name)
    v = index_to_normalized(v_zyx, mean.shape)
    return Template(v, orient_outward(v, f), name=name, genus=int(genus))
