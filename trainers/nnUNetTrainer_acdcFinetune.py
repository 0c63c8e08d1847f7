"""The ACDC fine-tune study's trainer variants (examples/acdc/study.sh, issue 22; documentation/results.md): the
backbone (stage 1), the equal fine-tunes from it (stage 2, ``*_acdcFT``; TPM from the Mesh fine-tune, ``*_acdcFT2``),
the head trained alone on the control, and issue 27's from-scratch pair. Training length, seeds and sampling only;
losses, networks and hooks are the real trainers'.
"""
from typing import Dict

import numpy as np
import torch

from nnunet_topo.roi_loader import MeshROISampling
from nnunet_topo.trainers.nnUNetTrainer_shortRuns import ShortRunMixin
from nnunet_topo.trainers.nnUNetTrainerBetti import nnUNetTrainerBetti_finetune
from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh
from nnunet_topo.trainers.nnUNetTrainerMesh_headOnly import nnUNetTrainerMesh_headOnly
from nnunet_topo.trainers.nnUNetTrainerMeshROI import nnUNetTrainerMeshROI
from nnunet_topo.trainers.nnUNetTrainerMIE import nnUNetTrainerMIE_finetune
from nnunet_topo.trainers.nnUNetTrainerProjPool import nnUNetTrainerProjPool, nnUNetTrainerProjPool_finetune
from nnunet_topo.trainers.nnUNetTrainerTPM import nnUNetTrainerTPM_finetune, nnUNetTrainerTPM_lambda1_finetune


# ----------------------------------------------------------------------------- ACDC fine-tune study (issue 22)
#: stage 1 of examples/acdc/study.sh: the backbone every arm is fine-tuned from (checkpoint_latest every 2 epochs, so
#: that --c after a lost session resumes near where it stopped). At most 4000 iterations (40 epochs x 100, the issue's
#: bound), stopped earlier when the Dice goals are met (LV 0.85 / MYO 0.70 / RV 0.70, + 0.05 margin, on nnU-Net's
#: pseudo Dice averaged over the last 2 epochs; results.md reports nnU-Net's full-case validation Dice). The lr at the
#: stop does not matter downstream: every stage-2 arm starts at nnU-Net's initial lr with -pretrained_weights.
ACDC_BACKBONE = dict(num_epochs=40, num_iterations_per_epoch=100, num_val_iterations_per_epoch=10, save_every=2)
ACDC_BACKBONE_GOALS = {"LV": 0.85 + 0.05, "MYO": 0.70 + 0.05, "RV": 0.70 + 0.05}


def pseudo_dice_goals_met(history, label_index: Dict[str, int], goals: Dict[str, float], window: int = 2) -> bool:
    """True when, for every label of ``goals``, the mean of the last ``window`` epochs' pseudo Dice (nnU-Net's
    ``dice_per_class_or_region`` log: one list per epoch, one value per foreground label) is at least its goal."""
    if len(history) < window:
        return False
    for name, goal in goals.items():
        values = [float(epoch[label_index[name]]) for epoch in history[-window:]]
        if sum(values) / window < goal:
            return False
    return True


class _GoalsMet(Exception):
    pass


class _StopAtDiceGoals:
    """Ends nnU-Net's training after the epoch at which ``pseudo_dice_goals_met``: nnU-Net's own ``on_train_end``
    (checkpoint_final, data loaders shut down) and then its validation, as after the last epoch."""

    dice_goals: Dict[str, float] = {}

    def on_epoch_end(self):
        super().on_epoch_end()
        foreground = list(self.label_manager.foreground_labels)
        index = {name: foreground.index(int(value)) for name, value in self.dataset_json["labels"].items()
                 if isinstance(value, int) and int(value) in foreground}
        history = self.logger.get_value("dice_per_class_or_region", step=None)
        if self.dice_goals and pseudo_dice_goals_met(history, index, self.dice_goals):
            self.print_to_log_file(f"Dice goals {self.dice_goals} met (pseudo Dice, mean of the last 2 epochs) "
                                   f"after epoch {self.current_epoch - 1}: training ends here")
            raise _GoalsMet

    def run_training(self):
        try:
            super().run_training()
        except _GoalsMet:
            self.on_train_end()


class nnUNetTrainerMeshROI_acdcBackbone(_StopAtDiceGoals, ShortRunMixin, nnUNetTrainerMeshROI):
    short_run = ACDC_BACKBONE
    dice_goals = ACDC_BACKBONE_GOALS


#: stage 2: every arm fine-tuned from the backbone (-pretrained_weights) for the same 1000 iterations (10 epochs x
#: 100, nnU-Net's poly schedule from the initial lr), with the mesh trainers' heart-ROI sampling and augmentation;
#: the topology terms on from the first epoch (the backbone was the first phase). FT2: TPM from the Mesh fine-tune's
#: checkpoint for 500 more iterations, against Mesh continued for the same 500 (the TPM paper's protocol).
ACDC_FT = dict(num_epochs=10, num_iterations_per_epoch=100, num_val_iterations_per_epoch=10, save_every=1)
ACDC_FT2 = dict(num_epochs=5, num_iterations_per_epoch=100, num_val_iterations_per_epoch=10, save_every=1)


class _SeedMixin:
    """``seed``: torch's and numpy's generators of the main process seeded before the trainer is built (the head's
    initialisation, the query points); nnU-Net's augmentation workers draw their own, so two seeds are two runs."""

    seed: int = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)


class nnUNetTrainerMeshROI_acdcFT(_SeedMixin, ShortRunMixin, nnUNetTrainerMeshROI):
    short_run = ACDC_FT


class nnUNetTrainerMeshROI_acdcFT_seed2(nnUNetTrainerMeshROI_acdcFT):
    seed = 2


class nnUNetTrainerProjPool_acdcFT(_SeedMixin, MeshROISampling, ShortRunMixin, nnUNetTrainerProjPool_finetune):
    short_run = ACDC_FT


class nnUNetTrainerBetti_acdcFT(_SeedMixin, MeshROISampling, ShortRunMixin, nnUNetTrainerBetti_finetune):
    short_run = ACDC_FT


class nnUNetTrainerMesh_acdcFT(_SeedMixin, ShortRunMixin, nnUNetTrainerMesh):
    short_run = ACDC_FT


class nnUNetTrainerMIE_acdcFT(_SeedMixin, ShortRunMixin, nnUNetTrainerMIE_finetune):
    short_run = ACDC_FT


class nnUNetTrainerMesh_headOnly_acdcFT(_SeedMixin, ShortRunMixin, nnUNetTrainerMesh_headOnly):
    """The head alone on the control's final checkpoint (its network frozen, exactly the control): "add meshes to the
    nnU-Net you already trained" on ACDC, and the mesh share at 0 against nnUNetTrainerMesh_acdcFT's default."""

    short_run = ACDC_FT


class nnUNetTrainerMesh_acdcFT2(_SeedMixin, ShortRunMixin, nnUNetTrainerMesh):
    short_run = ACDC_FT2


class nnUNetTrainerTPM_acdcFT2(_SeedMixin, ShortRunMixin, nnUNetTrainerTPM_finetune):
    short_run = ACDC_FT2


class nnUNetTrainerTPM_acdcFT2_seed2(nnUNetTrainerTPM_acdcFT2):
    seed = 2


class nnUNetTrainerTPM_lambda1_acdcFT2(_SeedMixin, ShortRunMixin, nnUNetTrainerTPM_lambda1_finetune):
    short_run = ACDC_FT2


#: issue 27: from scratch, ProjPool with its default two-phase schedule (plain for epochs 0-4, its term from epoch 5)
#: against the same-length plain run, 1000 iterations each (examples/acdc/study.sh, stage "scratch")
class nnUNetTrainerMeshROI_acdcScratch(_SeedMixin, ShortRunMixin, nnUNetTrainerMeshROI):
    short_run = ACDC_FT


class nnUNetTrainerProjPool_acdcScratch(_SeedMixin, MeshROISampling, ShortRunMixin, nnUNetTrainerProjPool):
    short_run = ACDC_FT
