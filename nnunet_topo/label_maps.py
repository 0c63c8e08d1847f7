"""Label maps read for a comparison, and the checks that two of them can be compared voxel by voxel.

:func:`read_label_map` reads one through nnU-Net's reader/writer (a value that dataset.json does not define and an
unreadable file are clear errors); :func:`check_pair` wants the same shape, the same spacing and integer values;
:func:`check_geometry` the same origin and direction in patient space (from :func:`image_geometry`). The folder
evaluator (:mod:`nnunet_topo.evaluation`), the reference rule check (:mod:`nnunet_topo.rule_check`) and the QC report
read their label maps through here; a mismatch is an :class:`~nnunet_topo.summary_io.EvaluationError` that says how
to fix it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

from nnunet_topo.paths import check_label_values, reading
from nnunet_topo.summary_io import EvaluationError


#: spacings of prediction and reference may differ by this relative amount
SPACING_RTOL = 1e-3
#: origins of prediction and reference may differ by this fraction of the finest voxel spacing (a tenth of a voxel:
#: a voxel-by-voxel comparison is then off by less than that)
ORIGIN_TOL_VOXELS = 0.1
#: direction cosines may differ by this much per entry (about 0.06 degrees)
DIRECTION_TOL = 1e-3


def image_geometry(props: dict) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(origin mm, direction matrix)`` of an image from nnU-Net's reader properties, or None when the format
    carries none (PNG, TIFF: spacing only). SimpleITK: ``sitk_stuff``; nibabel: the affine of ``nibabel_stuff``
    (the reoriented one where present, as :meth:`nnunet_topo.frames.ImageGeometry.from_nnunet_properties`; its
    columns normalised by the spacing). Not that method itself: it is 3D only and imports torch, and this check
    also serves 2D images in the evaluator's spawned workers; both sides of a comparison are read alike, so the
    frame (RAS or LPS) does not matter here."""
    if "sitk_stuff" in props:
        origin = np.asarray(props["sitk_stuff"]["origin"], dtype=np.float64)
        d = len(origin)
        return origin, np.asarray(props["sitk_stuff"]["direction"], dtype=np.float64).reshape(d, d)
    if "nibabel_stuff" in props:
        stuff = props["nibabel_stuff"]
        affine = np.asarray(stuff.get("reoriented_affine", stuff.get("original_affine")), dtype=np.float64)
        rot = affine[:3, :3]
        return affine[:3, 3], rot / np.linalg.norm(rot, axis=0, keepdims=True)
    return None


def check_geometry(ref_geometry, pred_geometry, spacing: Sequence[float], ref_name: str = "reference",
                   pred_name: str = "prediction") -> None:
    """Raise :class:`EvaluationError` unless origin and direction agree (``ORIGIN_TOL_VOXELS`` x the finest spacing;
    ``DIRECTION_TOL`` per direction cosine). Without geometry on either side (PNG, TIFF) there is nothing to check."""
    if ref_geometry is None or pred_geometry is None:
        return
    (o_r, d_r), (o_p, d_p) = ref_geometry, pred_geometry
    if o_r.shape != o_p.shape or d_r.shape != d_p.shape:
        raise EvaluationError(f"geometry mismatch: {ref_name} is {len(o_r)}D, {pred_name} is {len(o_p)}D")
    tol = ORIGIN_TOL_VOXELS * float(min(spacing))
    shift = float(np.linalg.norm(o_r - o_p))
    turn = float(np.max(np.abs(d_r - d_p)))
    problems = []
    if shift > tol:
        problems.append(f"origins differ by {shift:.4g} mm (tolerance {tol:.3g} mm): {ref_name} "
                        f"{tuple(np.round(o_r, 4))}, {pred_name} {tuple(np.round(o_p, 4))}")
    if turn > DIRECTION_TOL:
        problems.append(f"directions differ by up to {turn:.4g} per cosine (tolerance {DIRECTION_TOL}): {ref_name} "
                        f"{np.round(d_r, 4).tolist()}, {pred_name} {np.round(d_p, 4).tolist()}")
    if problems:
        raise EvaluationError(
            "geometry mismatch: the prediction does not lie where the reference does in patient space, so a "
            "voxel-by-voxel comparison would be wrong; " + "; ".join(problems) + ". Resample the prediction into "
            "the reference's geometry (nnUNetv2_predict writes it so), or pass --ignore_geometry "
            "(ignore_geometry=True) if you are sure the voxels correspond.")


def check_pair(ref: np.ndarray, pred: np.ndarray, ref_spacing: Sequence[float], pred_spacing: Sequence[float],
               ref_name: str = "reference", pred_name: str = "prediction") -> None:
    """Raise :class:`EvaluationError` unless reference and prediction can be compared voxel by voxel."""
    if ref.shape != pred.shape:
        raise EvaluationError(
            f"shape mismatch: {ref_name} has shape {ref.shape}, {pred_name} has shape {pred.shape}. Predictions must be "
            "in the geometry of the reference (nnUNetv2_predict writes them so).")
    if len(ref_spacing) != len(pred_spacing) or not np.allclose(ref_spacing, pred_spacing, rtol=SPACING_RTOL, atol=0):
        raise EvaluationError(
            f"spacing mismatch: {ref_name} has spacing {tuple(ref_spacing)}, {pred_name} has {tuple(pred_spacing)} "
            f"(relative tolerance {SPACING_RTOL}).")
    for arr, name in ((ref, ref_name), (pred, pred_name)):
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                raise EvaluationError(f"{name} contains NaN or inf; a label map must hold integer label ids")
            if not np.all(arr == np.round(arr)):
                raise EvaluationError(f"{name} contains non-integer values; a label map must hold integer label ids")


def read_label_map(rw, path: str, defined: Optional[Sequence[int]] = None, what: str = "label map"):
    """``(seg, spacing, geometry)`` of a label map; with ``defined`` (dataset.json's label values), a value outside
    it is an :class:`~nnunet_topo.paths.UndefinedLabelError`; an unreadable file an
    :class:`~nnunet_topo.paths.InputReadError`."""
    if not os.path.isfile(path):
        raise EvaluationError(f"file not found: {path}")
    with reading(what, path):
        seg, props = rw.read_seg(path)
        seg = np.asarray(seg)
        spacing = tuple(float(s) for s in props["spacing"])
    if seg.ndim == 4:
        if seg.shape[0] != 1:
            raise EvaluationError(f"{path}: expected a single-channel segmentation, got shape {seg.shape}")
        seg = seg[0]
    if defined is not None:
        check_label_values(seg, defined, path, what)
    return seg, spacing, image_geometry(props)
