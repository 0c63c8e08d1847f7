"""Training patches on the heart ROI: nnU-Net's data loader with the patch placement replaced (DESIGN §7).

:class:`MeshROIDataLoader` subclasses ``nnunetv2.training.dataloading.data_loader.nnUNetDataLoader`` and overrides
``get_bbox`` only: loading, cropping, padding, augmentation and batching stay nnU-Net's. The *final* (network) patch
of every sample contains the case's mesh-structure box (:mod:`nnunet_topo.roi`), shifted uniformly at random within
the admissible starts (``[hi - patch, lo]`` per axis), so a mesh structure is never cut by the patch placement.
nnU-Net's training loader reads a larger *initial* patch (room for rotation) whose centre becomes the final patch
after augmentation; the box is placed in that central part. A case without mesh structures keeps nnU-Net's own
placement. (Rotation up to the mesh trainers' ±15° and nnU-Net's scaling augmentation can still move a structure's
border out of the final patch; the ROI margin of ``nnUNetv2_topo_plan_mesh`` is there for that.)

``get_bbox`` is not told which case it places, so the loader wraps its dataset in :class:`_RecordingDataset`,
which remembers the identifier (and segmentation) of the last ``load_case``; nnU-Net's ``generate_train_batch``
calls ``load_case`` immediately before ``get_bbox`` for every sample.

nnU-Net's ``nnUNetTrainer.get_dataloaders`` builds ``nnUNetDataLoader`` by name (no class attribute to override), so
:func:`roi_data_loaders` rebinds that name in the trainer module for the duration of the call, to a picklable
``functools.partial`` of :class:`MeshROIDataLoader` with the boxes; it is restored afterwards, also on error.
nnU-Net glue (imports nnunetv2).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_topo.roi import Box, check_box_fits, structure_box

__all__ = ["MeshROIDataLoader", "MeshROISampling", "roi_data_loaders"]


class _RecordingDataset:
    """Delegates to an nnU-Net dataset; remembers the identifier and segmentation of the last ``load_case``."""

    def __init__(self, dataset):
        self._dataset = dataset
        self.last_key: Optional[str] = None
        self.last_seg = None

    def load_case(self, identifier):
        out = self._dataset.load_case(identifier)
        self.last_key, self.last_seg = identifier, out[1]
        return out

    def __getattr__(self, name):  # identifiers, __len__-like helpers, ...
        if name == "_dataset":
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def __len__(self):
        return len(self._dataset)


class MeshROIDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose patches always contain the case's mesh structures (see the module docstring).

    Args (beyond nnU-Net's): ``mesh_boxes`` ``{identifier: box or None}`` in the preprocessed frame (computed once
    by the trainer; a missing identifier is computed from the loaded segmentation) and ``mesh_label_ids`` (the
    labels of the union of the mesh structures)."""

    def __init__(self, data, *args, mesh_boxes: Dict[str, Optional[Box]], mesh_label_ids: Sequence[int], **kwargs):
        super().__init__(data, *args, **kwargs)
        self._data = _RecordingDataset(self._data)
        self.mesh_boxes = dict(mesh_boxes)
        self.mesh_label_ids = [int(i) for i in mesh_label_ids]

    def _current_box(self) -> Optional[Box]:
        key = self._data.last_key
        if key not in self.mesh_boxes:
            self.mesh_boxes[key] = structure_box(np.asarray(self._data.last_seg[0]), self.mesh_label_ids)
        return self.mesh_boxes[key]

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        box = self._current_box()
        if box is None or len(data_shape) != 3:
            return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        final = [int(p) for p in self.final_patch_size]
        initial = [int(p) for p in self.patch_size]
        check_box_fits(box, final, str(self._data.last_key), advice="Plan a mesh configuration whose patch holds "
                       "the heart ROI (nnUNetv2_topo_plan_mesh).")
        lo, hi = box
        start = [np.random.randint(h - p, l + 1) for l, h, p in zip(lo, hi, final)]
        lbs = [s - (i - p) // 2 for s, i, p in zip(start, initial, final)]
        return lbs, [b + i for b, i in zip(lbs, initial)]


@contextlib.contextmanager
def roi_data_loaders(mesh_boxes: Dict[str, Optional[Box]], mesh_label_ids: Sequence[int]) -> Iterator[None]:
    """Within the block, ``nnUNetTrainer.get_dataloaders`` builds :class:`MeshROIDataLoader` s."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = functools.partial(MeshROIDataLoader, mesh_boxes=mesh_boxes,
                                                        mesh_label_ids=list(mesh_label_ids))
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original


class MeshROISampling:
    """Trainer mixin (before the nnU-Net trainer in the bases): the mesh trainers' data sampling and augmentation.

    * training and validation patches contain every case's mesh-structure box (the heart ROI), placed by
      :class:`MeshROIDataLoader`;
    * rotation limited to ``mesh_max_rotation_degrees`` (±15°) and, by default, no mirroring in training or at
      inference (a template is a shape prior in the image frame; documentation/mesh_trainers.md).

    Needs ``self.topology_spec`` (``nnUNetTrainerTopoBase``). The mesh trainers set ``self.mesh_boxes`` while they
    build their templates (one pass over the cases); otherwise the boxes are computed once, streamed, the first time
    the loaders are built; either way they are cached in the preprocessed folder (:mod:`nnunet_topo.roi_cache`).
    ``nnUNetTrainerMeshROI`` (plain nnU-Net loss) uses it, so a backbone trained with it sees the patches its mesh
    fine-tunes will see."""

    mesh_max_rotation_degrees: float = 15.0
    mesh_mirroring: bool = False
    mesh_boxes: Optional[Dict[str, Optional[Box]]] = None

    def mesh_structure_label_ids(self) -> list:
        """Labels of the union of the topology spec's mesh structures (an error naming the fix when there are none)."""
        from nnunet_topo.topology_spec import TopologySpecError

        structures = self.topology_spec.mesh_structures
        if not structures:
            raise TopologySpecError(
                f"{self.__class__.__name__} samples patches on the mesh structures, but the dataset's topology spec "
                "has no 'mesh_structures'. Add them to the 'topology' block of dataset.json, e.g. \"mesh_structures\": "
                "{\"LV_epi\": [\"LV\", \"MYO\"], \"RV\": [\"RV\"]} (documentation/topology_spec.md), and copy "
                "dataset.json into the preprocessed folder.")
        return sorted({int(i) for s in structures.values() for i in s.label_ids})

    def get_dataloaders(self):
        """nnU-Net's loaders, with training and validation patches placed on the mesh structures (the heart ROI)."""
        if self.mesh_boxes is None:
            from nnunet_topo.roi_cache import roi_boxes_and_crops

            _, self.mesh_boxes = roi_boxes_and_crops(
                self.preprocessed_dataset_folder, self.mesh_structure_label_ids(),
                self.configuration_manager.patch_size, self.__class__.__name__, self.configuration_name, crop=False,
                log=self.print_to_log_file)
        with roi_data_loaders(self.mesh_boxes, self.mesh_structure_label_ids()):
            return super().get_dataloaders()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's settings with the rotation limited to ``mesh_max_rotation_degrees`` and (by default) no
        mirroring; the initial (pre-rotation) patch size is recomputed by nnU-Net's ``get_patch_size``."""
        from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

        _, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        r = float(self.mesh_max_rotation_degrees) / 180.0 * np.pi
        patch_size = self.configuration_manager.patch_size
        initial_patch_size = get_patch_size(patch_size, (-r, r), (-r, r), (-r, r), (0.85, 1.25))
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        mirror_axes = mirror_axes if self.mesh_mirroring else None
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file(f"mesh-ROI sampling: patches on the mesh structures, rotation "
                               f"±{self.mesh_max_rotation_degrees}°, mirror axes {mirror_axes}")
        return (-r, r), dummy_2d, initial_patch_size, mirror_axes
