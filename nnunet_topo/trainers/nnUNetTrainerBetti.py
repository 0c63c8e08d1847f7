"""nnUNetTrainerBetti: nnU-Net's Dice+CE plus the persistent-homology Betti prior loss (Clough et al., TPAMI 2020).

``L = L_seg + betti_weight * L_betti`` on the full-resolution output. On training *patches* the target Betti
numbers come from the reference patch (``betti_target = "patch"``): a patch cuts structures, so the whole-organ
prior of ``dataset.json`` would be wrong there (DESIGN §6). The dataset priors are used where the whole structure
is in view: test-time refinement (``nnUNetv2_topo_refine``).

Cost control (persistence is CPU work): the probability map is downsampled by ``betti_downsample`` before the
persistence computation, and the term is evaluated every ``betti_every`` iterations (a graph-connected zero in
between). Defaults were chosen by measurement (documentation/benchmarks.md). Variants are subclasses.
"""
import torch
from torch import nn

from nnunet_topo.losses.betti import BettiPriorLoss
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class EveryKCalls(nn.Module):
    """Evaluate ``module`` on every ``k``-th training call only; otherwise return a graph-connected zero.

    Validation calls (no grad) always evaluate, so the logged validation value is the real term.
    """

    def __init__(self, module: nn.Module, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.module, self.k, self.calls = module, int(k), 0

    def forward(self, logits, target):
        if not torch.is_grad_enabled():
            return self.module(logits, target)
        self.calls += 1
        if (self.calls - 1) % self.k:
            return logits.sum() * 0.0
        return self.module(logits, target)


class nnUNetTrainerBetti(nnUNetTrainerTopoBase):
    betti_weight: float = 0.01
    betti_downsample: int = 2
    betti_every: int = 1
    betti_target: str = "patch"

    def topology_term_names(self):
        return ("betti",)

    def betti_class_ids(self):
        """Label ids that get the loss: those with a 3D Betti prior in the spec, else every foreground label."""
        spec = self.topology_spec
        ids = []
        for name in spec.betti:
            s = spec.betti_structures[name]
            if len(s.label_ids) == 1:
                ids.append(int(s.label_ids[0]))
        return sorted(set(ids)) or [int(i) for i in self.label_manager.foreground_labels]

    def build_topology_terms(self):
        loss = BettiPriorLoss(class_ids=self.betti_class_ids(), target=self.betti_target,
                              downsample=self.betti_downsample, softmax=True)
        if self.betti_every > 1:
            loss = EveryKCalls(loss, self.betti_every)
        return {"betti": (loss, self.betti_weight)}


class nnUNetTrainerBetti_lambda005(nnUNetTrainerBetti):
    betti_weight = 0.005
