"""The heart-ROI box of every preprocessed case, computed once per dataset and cached in the preprocessed folder.

The mesh trainers (``nnUNetTrainerMesh`` and its variants) and ``nnUNetTrainerMeshROI`` place every training patch
on the box of the case's mesh structures (:mod:`nnunet_topo.roi_loader`). The boxes come from streaming every
preprocessed segmentation (:func:`nnunet_topo.mesh_head.label_templates.roi_crops`), which each fold of a
cross-validation would repeat. :func:`roi_boxes_and_crops` keeps them in
``<preprocessed dataset>/nnunet_topo_roi_boxes_<data identifier>.json`` under a key of the case files' names and
modification times, the label ids and the patch size; a stale or unreadable cache is recomputed, the file is written
atomically (:func:`nnunet_topo.summary_io.write_json_atomic`, as the reference rule check's cache is), and a
preprocessed folder that cannot be written (read-only shared data) only costs the recomputation. The command
``nnUNetv2_topo_precompute`` fills the cache once before the folds start (examples/cluster/README.md).

nnU-Net glue (imports nnunetv2 through :func:`nnunet_topo.plans.preprocessed_cases`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_topo.roi import Box
from nnunet_topo.summary_io import write_json_atomic

__all__ = ["roi_cache_file", "roi_boxes_and_crops"]

#: part of the key: entries written by an older version are recomputed
_VERSION = 1
#: entries kept per file (one per label set x patch size; e.g. two plans sharing one preprocessed data folder)
_MAX_ENTRIES = 8


def roi_cache_file(preprocessed_dataset_folder: str) -> str:
    """The cache file of one configuration's preprocessed data folder (beside it, in the dataset's folder)."""
    folder = os.path.normpath(preprocessed_dataset_folder)
    return os.path.join(os.path.dirname(folder), f"nnunet_topo_roi_boxes_{os.path.basename(folder)}.json")


def _key(preprocessed_dataset_folder: str, label_ids: Sequence[int], patch_size: Sequence[int]) -> str:
    """SHA-1 of the folder's file names and modification times, the label ids and the patch size. ``.npy`` files
    are left out: nnU-Net's training unpacks ``.npz`` cases into them (older preprocessed data), same content."""
    files = sorted((e.name, e.stat().st_mtime) for e in os.scandir(preprocessed_dataset_folder)
                   if e.is_file() and not e.name.endswith(".npy"))
    return hashlib.sha1(json.dumps([_VERSION, files, sorted(int(i) for i in label_ids),
                                    [int(p) for p in patch_size]]).encode()).hexdigest()


def _read_entries(cache_file: str) -> Dict[str, dict]:
    try:
        with open(cache_file) as f:
            entries = json.load(f)["entries"]
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _decode(boxes: dict) -> Dict[str, Optional[Box]]:
    return {k: None if b is None else (tuple(int(x) for x in b[0]), tuple(int(x) for x in b[1]))
            for k, b in boxes.items()}


def roi_boxes_and_crops(preprocessed_dataset_folder: str, label_ids: Sequence[int], patch_size: Sequence[int],
                        who: str = "mesh trainer", configuration: str = "", crop: bool = True,
                        log: Callable[[str], None] = lambda msg: None
                        ) -> Tuple[List[Tuple[str, np.ndarray]], Dict[str, Optional[Box]]]:
    """:func:`roi_crops` over every preprocessed case, the boxes cached.

    Args:
        preprocessed_dataset_folder: one configuration's preprocessed data folder (``<dataset>/<data identifier>``).
        label_ids: labels of the union of the mesh structures.
        patch_size: the configuration's patch (voxels); every case's box must fit it (checked when computed).
        who, configuration: name the trainer and configuration in :func:`roi_crops`' errors.
        crop: also return the patch-size crops (to build templates): the cases are then always streamed, and the
            boxes cached on the way. Without crops a cached entry is returned without reading any case.
        log: receives one line saying whether the boxes were read from the cache or computed.

    Returns ``([(identifier, crop)], {identifier: box or None})`` as :func:`roi_crops` (no crops unless ``crop``).
    Raises ``RuntimeError`` as :func:`roi_crops` does (a case's structures larger than the patch, none at all)."""
    from nnunet_topo.mesh_head.label_templates import roi_crops
    from nnunet_topo.plans import preprocessed_cases

    cache = roi_cache_file(preprocessed_dataset_folder)
    key = _key(preprocessed_dataset_folder, label_ids, patch_size)
    entries = _read_entries(cache)
    if not crop and isinstance(entries.get(key), dict):
        boxes = _decode(entries[key])
        log(f"ROI boxes of {len(boxes)} case(s) read from the cache {cache}")
        return [], boxes
    crops, boxes = roi_crops(((k, seg[0]) for k, _, seg in preprocessed_cases(preprocessed_dataset_folder)),
                             label_ids, patch_size, who, configuration, crop=crop)
    entries = {k: v for k, v in _read_entries(cache).items() if k != key}  # re-read: another job may have written
    entries = dict(list(entries.items())[-(_MAX_ENTRIES - 1):])
    entries[key] = {k: None if b is None else [list(b[0]), list(b[1])] for k, b in boxes.items()}
    try:
        write_json_atomic(cache, {"entries": entries})
        log(f"ROI boxes of {len(boxes)} case(s) computed and cached in {cache}")
    except OSError as e:  # e.g. read-only shared data: the boxes are computed again next time, nothing else changes
        log(f"ROI boxes of {len(boxes)} case(s) computed; not cached ({cache}: {e.strerror or e})")
    return crops, boxes
