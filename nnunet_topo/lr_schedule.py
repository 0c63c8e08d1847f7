"""Learning-rate schedule with per-parameter-group factors (nnU-Net glue: subclasses nnU-Net's schedule).

The mesh trainers put the mesh head into its own SGD parameter group at a fraction of nnU-Net's learning rate
(documentation/mesh_trainers.md "Optimiser"); nnU-Net's ``PolyLRScheduler`` sets one lr for every group.
"""
from __future__ import annotations

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

__all__ = ["GroupPolyLRScheduler"]


class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule, with each parameter group's lr scaled by its ``lr_factor`` (default 1)."""

    def step(self, current_step=None):
        super().step(current_step)  # sets nnU-Net's poly lr on every group
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_factor", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
