"""Synthetic multi-chamber heart phantoms, written as nnU-Net v2 raw datasets (DESIGN §9).

Two presets (see ``documentation/synthetic_data.md`` for the geometry, the intensity model and the
topology each preset guarantees):

* ``"acdc"`` — short-axis cine-MRI-like stacks, labels ``background 0, RV 1, MYO 2, LV 3`` (ACDC's order),
  anisotropic spacing (6–10 mm between slices, 1.3–1.8 mm in-plane).
* ``"wholeheart"`` — CT-like, near-isotropic (0.9–1.5 mm), labels ``background 0, LV 1, MYO 2, RV 3, LA 4,
  RA 5, AO 6``.

One module per step, in the order a phantom is made:

* :mod:`~nnunet_topo.synthetic.presets` — the preset tables, their ``topology`` blocks, argument checks;
* :mod:`~nnunet_topo.synthetic.heart` — the heart geometry (a reference label map per preset);
* :mod:`~nnunet_topo.synthetic.reference` — the self-check of a reference against its rules and Betti priors
  (with the project's own rule and Betti code: :mod:`nnunet_topo.violations`, :mod:`nnunet_topo.metrics.topology`);
* :mod:`~nnunet_topo.synthetic.intensities` — the image appearance (MRI- or CT-like intensities, blur, bias, noise);
* :mod:`~nnunet_topo.synthetic.phantom` — :class:`Phantom` and :func:`make_phantom` (draws until the self-check
  passes), :func:`embed_phantom` (a large canvas around the heart);
* :mod:`~nnunet_topo.synthetic.defects` — :func:`plant_defect`: known defects (septal hole, bridge, wall hole, extra
  component) and the metric changes they cause, for tests of the metrics and violation maps;
* :mod:`~nnunet_topo.synthetic.writer` — :func:`save_phantom` and :func:`write_dataset` (the nnU-Net raw dataset).

This package does not import nnU-Net; SimpleITK is used only to write images.
"""
from nnunet_topo.synthetic.defects import DEFECT_KINDS, PlantedDefect, plant_defect
from nnunet_topo.synthetic.phantom import Phantom, embed_phantom, make_phantom
from nnunet_topo.synthetic.presets import PRESETS, Preset, labels_for, topology_block
from nnunet_topo.synthetic.reference import check_reference, rule_name
from nnunet_topo.synthetic.writer import save_phantom, write_dataset

__all__ = [
    "PRESETS",
    "Preset",
    "Phantom",
    "PlantedDefect",
    "DEFECT_KINDS",
    "make_phantom",
    "embed_phantom",
    "topology_block",
    "labels_for",
    "rule_name",
    "check_reference",
    "plant_defect",
    "save_phantom",
    "write_dataset",
]
