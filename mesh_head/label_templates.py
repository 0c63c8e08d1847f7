"""Templates from training label maps (DESIGN §7 "Templates"): the data side of template building.

:func:`templates_from_label_maps` turns the preprocessed segmentations of a dataset into one template per mesh
structure, in the normalised frame of the training patch:

1. each case is cut to the patch-size window centred on the box of its mesh structures (:func:`roi_crops`, the
   heart ROI of DESIGN §7; the ROI data loader shifts training patches at random around that same centre), one
   case at a time, so only the crops are held in memory;
2. mask = ``isin(seg, structure ids)``; every mask is shifted by whole voxels so that its centroid lies on the mean
   centroid (:func:`align_centroids`, the "mean aligned mask");
3. :func:`~nnunet_topo.mesh_head.templates.template_from_masks` (genus of most masks; genus 0: isosurface of the
   smoothed mean mask, decimated; genus 1: fitted torus); where that fails and most masks are genus 0, a
   moment-fitted ellipsoid (:func:`ellipsoid_template`), the last resort, logged.

Plain numpy/torch (no nnU-Net import); the trainers load the cases and call this.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_topo.frames import index_to_normalized
from nnunet_topo.mesh_head.network import TEMPLATES_KEY
from nnunet_topo.mesh_head.templates import Template, sphere_template, template_from_masks
from nnunet_topo.metrics.topology import betti_numbers_3d
from nnunet_topo.patches import center_pad_to
from nnunet_topo.roi import Box, box_fits, centered_window_start, crop_to_window, structure_box
from nnunet_topo.surfaces import orient_outward

__all__ = ["TemplateBuildError", "align_centroids", "ellipsoid_template", "roi_crops", "training_templates",
           "templates_from_label_maps"]


class TemplateBuildError(RuntimeError):
    """No template (not even the ellipsoid fallback) could be built for a mesh structure."""


def align_centroids(masks: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Shift each (Z, Y, X) mask by whole voxels so its centroid lands on the mean centroid (zero fill): the
    "mean aligned mask" of DESIGN §7, so that position jitter between cases does not blur the template."""
    masks = [np.asarray(m, dtype=bool) for m in masks]
    cents = [np.argwhere(m).mean(0) if m.any() else None for m in masks]
    valid = [c for c in cents if c is not None]
    if not valid:
        return masks
    target = np.mean(valid, axis=0)
    out = []
    for m, c in zip(masks, cents):
        if c is None:
            out.append(m)
            continue
        shift = np.round(target - c).astype(int)
        shifted = np.zeros_like(m)
        src = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(shift, m.shape))
        dst = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(shift, m.shape))
        shifted[dst] = m[src]
        out.append(shifted)
    return out


def ellipsoid_template(masks: Sequence[np.ndarray], subdivisions: int, name: str) -> Optional[Template]:
    """Fallback genus-0 template: an icosphere scaled to the moments of the soft mean mask (axis-aligned ellipsoid,
    semi-axis = sqrt(5) x the weighted standard deviation, as for a uniformly filled ellipsoid, clipped to the
    patch), centred at its weighted centroid. None unless most masks are genus 0 (Betti (1, 0, 0))."""
    masks = [np.asarray(m, dtype=bool) for m in masks if np.any(m)]
    if not masks or sum(tuple(betti_numbers_3d(m)) == (1, 0, 0) for m in masks) * 2 <= len(masks):
        return None
    mean = np.mean(np.stack(masks).astype(np.float64), axis=0)
    idx = np.argwhere(mean > 0).astype(np.float64)
    w = mean[mean > 0]
    c = (idx * w[:, None]).sum(0) / w.sum()
    sd = np.maximum(np.sqrt((((idx - c) ** 2) * w[:, None]).sum(0) / w.sum()), 0.5)
    shape = np.asarray(mean.shape, dtype=np.float64)
    semi = np.minimum(np.sqrt(5.0) * sd, np.minimum(c, shape - 1 - c).clip(min=0.5))
    unit = sphere_template(subdivisions, radius=1.0, name=name)
    v_zyx = c + unit.vertices[:, ::-1].astype(np.float64) * semi  # icosphere (x, y, z) -> (z, y, x) offsets
    v = index_to_normalized(v_zyx, mean.shape)
    return Template(v, orient_outward(np.asarray(v, dtype=np.float64), unit.faces), name=name, genus=0)


def templates_from_label_maps(label_maps: Sequence[np.ndarray], structures: Mapping[str, Sequence[int]],
                              patch_size: Sequence[int], subdivisions: int = 3,
                              torus_sections: Sequence[int] = (32, 16),
                              log: Callable[[str], None] = lambda msg: None,
                              spacing: Optional[Sequence[float]] = None) -> List[Template]:
    """One template per entry of ``structures`` (``{name: label ids}``, in that order) from ``(Z, Y, X)`` label maps
    that fit in ``patch_size``, of voxel size ``spacing`` ``(z, y, x)`` mm (None: 1 mm); vertices in the normalised
    frame of the patch.

    Raises :class:`TemplateBuildError` when neither :func:`template_from_masks` nor the ellipsoid fallback works.
    """
    patch = [int(p) for p in patch_size]
    templates = []
    for name, label_ids in structures.items():
        ids = np.asarray(list(label_ids))
        masks = align_centroids([np.isin(center_pad_to(np.asarray(s), patch), ids) for s in label_maps])
        try:
            templates.append(template_from_masks(masks, subdivisions=subdivisions, name=name,
                                                 torus_sections=tuple(torus_sections), spacing=spacing, log=log))
        except ValueError as e:
            fallback = ellipsoid_template(masks, subdivisions, name)
            if fallback is None:
                raise TemplateBuildError(f"cannot build the template of mesh structure {name!r} from "
                                         f"{len(label_maps)} training case(s): {e}") from e
            log(f"template {name!r}: {e} -> using the moment-fitted ellipsoid instead")
            templates.append(fallback)
    return templates


def roi_crops(cases: Iterable[Tuple[str, np.ndarray]], label_ids: Sequence[int], patch_size: Sequence[int],
              who: str = "mesh trainer", configuration: str = "", crop: bool = True
              ) -> Tuple[List[Tuple[str, np.ndarray]], Dict[str, Optional[Box]]]:
    """``([(identifier, patch-size crop)], {identifier: box or None})`` from streamed ``(identifier, (Z, Y, X) label
    map)`` cases: each crop is the ``patch_size`` window centred on the box of the voxels with ``label_ids`` (the
    union of the mesh structures), padded with 0 where it reaches outside the case; cases without those labels get
    box None and no crop. Only the crops are kept, so memory is bounded by the patch, not by the case size. With
    ``crop=False`` only the boxes are computed (and checked): templates that exist already need no crops.

    Raises ``RuntimeError`` naming the cases whose mesh structures span more than the patch, or when no case has
    any of them."""
    patch = [int(p) for p in patch_size]
    crops, boxes, too_big = [], {}, []
    for key, seg in cases:
        seg = np.asarray(seg)
        box = structure_box(seg, label_ids)
        boxes[key] = box
        if box is not None and not box_fits(box, patch):
            too_big.append((key, [h - lo for lo, h in zip(*box)]))
        elif box is not None and crop:
            crops.append((key, crop_to_window(seg, centered_window_start(box, patch), patch, fill=0)))
        del seg
    if too_big:
        raise RuntimeError(
            f"{who}: a mesh describes a whole structure, so the mesh structures of every case must fit in the patch "
            f"{patch} of configuration {configuration!r}, but they span more voxels in {len(too_big)} case(s), e.g. "
            f"{too_big[:3]}. Plan a mesh configuration whose patch holds the heart ROI (nnUNetv2_topo_plan_mesh -d "
            "ID, then nnUNetv2_preprocess and nnUNetv2_train with the configuration and plans it prints).")
    if all(b is None for b in boxes.values()):
        raise RuntimeError(f"{who}: none of the {len(boxes)} preprocessed case(s) contains the mesh structures "
                           f"(labels {list(label_ids)}); check the topology block's mesh_structures")
    return crops, boxes


def training_templates(cases: Sequence[tuple], structures: Mapping[str, Sequence[int]], patch_size: Sequence[int],
                       spacing: Optional[Sequence[float]], stored: Optional[List[Template]], subdivisions: int = 3,
                       torus_sections: Sequence[int] = (32, 16), log: Callable[[str], None] = lambda msg: None) \
        -> List[Template]:
    """The templates of a mesh trainer: ``stored`` ones (a run being continued) if given, else built from the
    ``(identifier, (Z, Y, X) label map)`` ``cases`` (patch-size ROI crops, :func:`roi_crops`) by
    :func:`templates_from_label_maps`.

    Raises ``RuntimeError`` with the fix when the stored templates are for other structures than ``structures``."""
    patch = [int(p) for p in patch_size]
    if stored is not None:
        log(f"mesh templates reused from the plans: {[t.name for t in stored]}")
        templates = stored
    else:
        templates = templates_from_label_maps([s for _, s in cases], structures, patch, subdivisions,
                                              torus_sections, log=log, spacing=spacing)
        log("mesh templates built from the training labels: " + ", ".join(
            f"{t.name} (genus {t.genus}, {t.num_vertices} vertices)" for t in templates))
    if [t.name for t in templates] != list(structures):
        raise RuntimeError(f"the templates in the plans are for {[t.name for t in templates]} but the topology "
                           f"spec's mesh_structures are {list(structures)}; remove {TEMPLATES_KEY!r} "
                           "from the plans (or train into a new output folder) to rebuild them.")
    return templates
