"""The heart ROI: where the mesh structures of a case sit, and the patch-size window that holds them (DESIGN §7).

One definition serves the three places that need it, so they cannot drift apart:

* the mesh plans (``nnUNetv2_topo_plan_mesh``): the ROI size in mm is the per-axis maximum of
  :func:`box_extent_mm` over the training cases, plus a margin;
* training (the ROI data loader and the template builder): a patch window that contains the case's box,
  centred (:func:`centered_window_start`, templates) or shifted at random while keeping the box inside
  (:func:`random_window_start`, training patches);
* inference (``nnUNetv2_topo_predict_meshes``): the box of the *predicted* mesh structures, the centred window,
  the crop (:func:`crop_to_window`), and the crop offset added back to the vertices.

Boxes are half-open voxel index ranges ``(lo, hi)`` per axis (``lo`` inclusive, ``hi`` exclusive), in the array
order of whatever array they were computed on (for nnU-Net's preprocessed data: the transposed order). Plain
numpy, no nnU-Net import.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Box", "RoiError", "structure_box", "largest_component_box", "box_extent_mm", "box_fits", "check_box_fits",
           "centered_window_start", "random_window_start", "crop_to_window", "window_contains"]

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]


class RoiError(ValueError):
    """A case's mesh structures do not fit the patch, or there are none."""


def structure_box(label_map: np.ndarray, label_ids: Sequence[int]) -> Optional[Box]:
    """``(lo, hi)`` of the voxels of ``label_map`` whose label is in ``label_ids`` (None when there are none).

    Works on the last 3 axes only if ``label_map`` has a leading channel axis of size 1 (nnU-Net's ``(1, Z, Y, X)``
    segmentations); streams axis by axis (``np.any`` projections), so memory stays at one boolean mask."""
    a = np.asarray(label_map)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    mask = np.isin(a, np.asarray(list(label_ids)))
    if not mask.any():
        return None
    lo, hi = [], []
    for ax in range(mask.ndim):
        other = tuple(k for k in range(mask.ndim) if k != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return tuple(lo), tuple(hi)


def largest_component_box(label_map: np.ndarray, structures: Mapping[str, Sequence[int]]
                          ) -> Tuple[Optional[Box], int]:
    """``(box, ignored voxels)``: the union over the mesh structures (``{name: label ids}``) of the box of each
    structure's *largest* connected component (26-connectivity, scipy.ndimage), and the number of voxels of the
    other components. A mesh structure is one closed surface (its template has b0 = 1), so islands of its labels
    away from the main component are spurious for the ROI (a predicted segmentation often has a few): they would
    stretch the box, not add to the mesh. Box None when no structure has a voxel."""
    from scipy import ndimage

    a = np.asarray(label_map)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    lo, hi, ignored = None, None, 0
    for ids in structures.values():
        mask = np.isin(a, np.asarray(list(ids)))
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            keep = int(np.argmax(sizes)) + 1
            ignored += int(sizes.sum() - sizes[keep - 1])
            mask = lab == keep
        del lab
        b = structure_box(mask, [1])
        lo = b[0] if lo is None else tuple(min(x, y) for x, y in zip(lo, b[0]))
        hi = b[1] if hi is None else tuple(max(x, y) for x, y in zip(hi, b[1]))
    return (None if lo is None else (lo, hi)), ignored


def box_extent_mm(box: Box, spacing: Sequence[float]) -> Tuple[float, ...]:
    """Size of ``box`` in mm: voxels x spacing per axis (a one-voxel box is one spacing wide)."""
    lo, hi = box
    return tuple(float((h - l) * s) for l, h, s in zip(lo, hi, spacing))


def box_fits(box: Box, patch: Sequence[int]) -> bool:
    lo, hi = box
    return all(h - l <= int(p) for l, h, p in zip(lo, hi, patch))


def check_box_fits(box: Box, patch: Sequence[int], case: str, what: str = "its mesh structures",
                   advice: str = "") -> None:
    """:class:`RoiError` naming ``case`` and both sizes unless ``box`` fits in ``patch``."""
    if not box_fits(box, patch):
        size = [h - l for l, h in zip(*box)]
        raise RoiError(f"case {case}: {what} span {size} voxels, more than the patch {list(map(int, patch))}"
                       + (f". {advice}" if advice else ""))


def centered_window_start(box: Box, patch: Sequence[int]) -> Tuple[int, ...]:
    """Start index of the ``patch``-size window centred on ``box`` (``floor((lo + hi - patch) / 2)``); the window
    may reach outside the array (the crop pads). Contains the box whenever the box fits."""
    lo, hi = box
    return tuple(int(np.floor((l + h - int(p)) / 2)) for l, h, p in zip(lo, hi, patch))


def random_window_start(box: Box, patch: Sequence[int], rng: Optional[np.random.Generator] = None
                        ) -> Tuple[int, ...]:
    """A uniformly random start of a ``patch``-size window that contains ``box``: per axis in
    ``[hi - patch, lo]``. Raises :class:`RoiError` if the box does not fit."""
    rng = np.random.default_rng() if rng is None else rng
    check_box_fits(box, patch, "?")
    lo, hi = box
    return tuple(int(rng.integers(h - int(p), l + 1)) for l, h, p in zip(lo, hi, patch))


def window_contains(start: Sequence[int], patch: Sequence[int], box: Box) -> bool:
    lo, hi = box
    return all(s <= l and h <= s + int(p) for s, p, l, h in zip(start, patch, lo, hi))


def crop_to_window(array: np.ndarray, start: Sequence[int], patch: Sequence[int], fill: float = 0) -> np.ndarray:
    """The window ``[start, start + patch)`` of the last ``len(patch)`` axes of ``array``, padded with ``fill``
    where it reaches outside (leading axes kept). Reads only the part inside the array (memory-mapped inputs stay
    mapped)."""
    lead = array.ndim - len(patch)
    if lead < 0:
        raise ValueError(f"array of shape {np.shape(array)} has fewer axes than the patch {list(patch)}")
    shape = array.shape[lead:]
    src, dst = [], []
    for s, p, n in zip(start, patch, shape):
        a, b = max(int(s), 0), min(int(s) + int(p), int(n))
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - int(s), a - int(s) + max(b - a, 0)))
    out = np.full(tuple(array.shape[:lead]) + tuple(int(p) for p in patch), fill,
                  dtype=np.asarray(array[(slice(None),) * lead + (slice(0, 0),) * len(patch)]).dtype)
    out[(slice(None),) * lead + tuple(dst)] = array[(slice(None),) * lead + tuple(src)]
    return out
