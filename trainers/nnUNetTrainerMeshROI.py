"""nnUNetTrainerMeshROI: plain nnU-Net loss with the mesh trainers' patch sampling and augmentation.

The control of every mesh comparison and the backbone a user fine-tunes the mesh trainers from
(``-pretrained_weights``): the network, loss and optimiser are nnU-Net's, untouched; training patches always contain
the mesh structures (the heart ROI, ``nnunet_topo/roi_loader.py``), rotation is limited to ±15° and mirroring is off,
exactly as in ``nnUNetTrainerMesh``. Validation writes ``summary_topology.json`` (``nnUNetTrainerTopoBase``).
"""
from __future__ import annotations

from nnunet_topo.roi_loader import MeshROISampling
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class nnUNetTrainerMeshROI(MeshROISampling, nnUNetTrainerTopoBase):
    """nnU-Net's loss; patches on the mesh structures; ±15° rotation; no mirroring."""
