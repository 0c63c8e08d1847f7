"""nnUNetTrainerMesh_headOnly: a mesh head on top of a trained nnU-Net whose network stays exactly as it is."""
from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh


class nnUNetTrainerMesh_headOnly(nnUNetTrainerMesh):
    """A mesh head on top of a trained nnU-Net that stays exactly as it is: start it with ``-pretrained_weights`` of
    a plain model trained on the same plans and configuration; the network is frozen (no gradient, no step, also no
    bounded mesh share), only the head learns. nnU-Net's validation then reproduces the pretrained model's
    segmentation (its segmentation layers are loaded too, ``keep_pretrained_seg_layers``)."""

    freeze_network = True
