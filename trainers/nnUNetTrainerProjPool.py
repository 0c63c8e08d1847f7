"""nnUNetTrainerProjPool: nnU-Net's Dice+CE plus the projected pooling loss (Fu et al., J. Med. Imaging 2024).

``L = L_seg + projpool_weight * L_projpool`` with ``L_seg`` nnU-Net's own deep-supervised Dice+CE and
``L_projpool`` (:mod:`nnunet_topo.losses.projected_pooling`) on the full-resolution output, weight 1 and
kernels (4, 5, 8, 10, 20) as in the paper. Variants are subclasses that change the class attributes.

Schedule (Fu et al.: "Because our approach needs to be pre-trained, each training involved two steps: (1) pre-train
for 150 epochs [Dice]; (2) fine tuning for the same number of epochs"): nnU-Net's loss alone for the first half of
``num_epochs``, then with L_projpool (a 1000-epoch nnU-Net run: 500 + 500). Fu's second phase also lowers the lr
10x; nnU-Net's poly schedule is already at 0.54x-0x of the initial lr in the second half, so it is kept as it is.
``nnUNetTrainerProjPool_finetune`` starts with the term on (for ``-pretrained_weights`` of a trained nnU-Net).
"""
from nnunet_topo.losses.projected_pooling import DEFAULT_KERNEL_SIZES, ProjectedPoolingLoss
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class nnUNetTrainerProjPool(nnUNetTrainerTopoBase):
    projpool_weight: float = 1.0
    projpool_kernel_sizes: tuple = DEFAULT_KERNEL_SIZES

    def default_topology_start_epoch(self) -> int:
        return self.num_epochs // 2

    def topology_term_names(self):
        return ("projpool",)

    def build_topology_terms(self):
        loss = ProjectedPoolingLoss(kernel_sizes=self.projpool_kernel_sizes, include_background=False,
                                    softmax=True, ignore_label=self.label_manager.ignore_label)
        return {"projpool": (loss, self.projpool_weight)}


class nnUNetTrainerProjPool_finetune(nnUNetTrainerProjPool):
    """The topology phase from the first epoch: for ``-pretrained_weights`` of a trained nnU-Net (its first phase)."""

    topology_start_epoch = 0
