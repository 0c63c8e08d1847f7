"""nnUNetTrainerProjPool: nnU-Net's Dice+CE plus the projected pooling loss (Fu et al., J. Med. Imaging 2024).

``L = L_seg + projpool_weight * L_projpool`` with ``L_seg`` nnU-Net's own deep-supervised Dice+CE and
``L_projpool`` (:mod:`nnunet_topo.losses.projected_pooling`) on the full-resolution output, weight 1 and
kernels (4, 5, 8, 10, 20) as in the paper. Variants are subclasses that change the class attributes.
"""
from nnunet_topo.losses.projected_pooling import DEFAULT_KERNEL_SIZES, ProjectedPoolingLoss
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class nnUNetTrainerProjPool(nnUNetTrainerTopoBase):
    projpool_weight: float = 1.0
    projpool_kernel_sizes: tuple = DEFAULT_KERNEL_SIZES

    def topology_term_names(self):
        return ("projpool",)

    def build_topology_terms(self):
        loss = ProjectedPoolingLoss(kernel_sizes=self.projpool_kernel_sizes, include_background=False,
                                    softmax=True, ignore_label=self.label_manager.ignore_label)
        return {"projpool": (loss, self.projpool_weight)}
