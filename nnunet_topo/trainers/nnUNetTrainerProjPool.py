"""nnUNetTrainerProjPool: nnU-Net's Dice+CE plus the projected pooling loss (Fu et al., J. Med. Imaging 2024).

``L = L_seg + projpool_weight * L_projpool`` with ``L_seg`` nnU-Net's own deep-supervised Dice+CE and
``L_projpool`` (:mod:`nnunet_topo.losses.projected_pooling`) on the full-resolution output, weight 1 and
kernels (4, 5, 8, 10, 20) as in the paper. Variants are subclasses that change the class attributes.
"""
import torch

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


class nnUNetTrainerProjPool_demo(nnUNetTrainerProjPool):
    """A short run for trying the plugin on a CPU (README demo): 10 epochs x 20 iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 5
