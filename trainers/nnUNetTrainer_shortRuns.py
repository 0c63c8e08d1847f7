"""Short-run variants for CPUs: the README demo and the CPU studies of documentation/results.md (the ACDC fine-tune
study's variants are in nnUNetTrainer_acdcFinetune.py).

They change training length and sample counts only (attributes set in ``__init__``, the convention of nnU-Net's
own ``nnUNetTrainer_5epochs``); the losses, networks and hooks are those of the real trainers.
"""
import os
from typing import Any, Dict

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_topo.trainers.nnUNetTrainerBetti import nnUNetTrainerBetti
from nnunet_topo.trainers.nnUNetTrainerMIE import nnUNetTrainerMIE
from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh
from nnunet_topo.trainers.nnUNetTrainerProjPool import nnUNetTrainerProjPool
from nnunet_topo.trainers.nnUNetTrainerTPM import nnUNetTrainerTPM


#: torch threads of a CPU training. nnU-Net's ``run_training`` gives every CPU training all cores; two trainings at
#: once on the same 2 cores (the ACDC study) then run 4 threads on 2 cores. One thread each was 2.2x faster per
#: training step (documentation/benchmarks.md, ``python benchmarks/bench_parallel_threads.py``).
CPU_THREADS_ENV = "NNUNET_TOPO_CPU_THREADS"


def cpu_threads_from_env(device: torch.device) -> None:
    """``torch.set_num_threads($NNUNET_TOPO_CPU_THREADS)`` for a training on the CPU; unset: nnU-Net's choice stays.
    Raises ValueError naming the variable unless it is a positive integer."""
    value = os.environ.get(CPU_THREADS_ENV)
    if not value or torch.device(device).type != "cpu":
        return
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{CPU_THREADS_ENV}={value!r}: expected a positive number of threads")
    torch.set_num_threads(int(value))


class ShortRunMixin:
    """Sets the attributes of ``short_run`` after the trainer's own ``__init__``; on the CPU, the torch threads of
    ``$NNUNET_TOPO_CPU_THREADS`` when it is set (several short runs at once on one machine)."""

    short_run: Dict[str, Any] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.short_run.items():
            setattr(self, name, value)
        cpu_threads_from_env(device)


class nnUNetTrainerProjPool_demo(ShortRunMixin, nnUNetTrainerProjPool):
    """A short run for trying the plugin on a CPU (README demo): 10 epochs x 20 iterations."""

    short_run = dict(num_epochs=10, num_iterations_per_epoch=20, num_val_iterations_per_epoch=5)


#: the CPU study (examples/study_tpm_vs_mesh.sh): 15 epochs x 20 iterations, 512 occupancy query points per mesh
#: (512 MIE points), the topology terms on after 5 epochs at the latest (100 iterations)
CPU_STUDY = dict(num_epochs=15, num_iterations_per_epoch=20, num_val_iterations_per_epoch=2, occ_num_uniform=256,
                 occ_num_surface=256, max_critical_points=512, topology_start_epoch=5)


class nnUNetTrainerMesh_cpuStudy(ShortRunMixin, nnUNetTrainerMesh):
    short_run = CPU_STUDY


class nnUNetTrainerTPM_cpuStudy(ShortRunMixin, nnUNetTrainerTPM):
    short_run = CPU_STUDY


class nnUNetTrainerMIE_cpuStudy(ShortRunMixin, nnUNetTrainerMIE):
    short_run = dict(CPU_STUDY, mie_num_points=512)


# ---------------------------------------------------------------------------------------------------- ACDC study
#: the first ACDC study (documentation/results.md): the same training length for every trainer (epochs x iterations
#: at batch size 2; the study's CPU budget), nnU-Net's defaults otherwise.
ACDC_STUDY = dict(num_epochs=20, num_iterations_per_epoch=20, num_val_iterations_per_epoch=2)


class _NoTTAMixin:
    """Inference without mirroring (test-time augmentation), for every trainer of a CPU study alike (nnU-Net's
    validation and ``nnUNetv2_predict`` read ``inference_allowed_mirroring_axes``); training augmentation unchanged."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return out


class nnUNetTrainer_acdcStudy(_NoTTAMixin, ShortRunMixin, nnUNetTrainer):
    short_run = ACDC_STUDY


class nnUNetTrainerProjPool_acdcStudy(_NoTTAMixin, ShortRunMixin, nnUNetTrainerProjPool):
    short_run = ACDC_STUDY


class nnUNetTrainerBetti_acdcStudy(_NoTTAMixin, ShortRunMixin, nnUNetTrainerBetti):
    short_run = ACDC_STUDY


class nnUNetTrainerMesh_acdcStudy(_NoTTAMixin, ShortRunMixin, nnUNetTrainerMesh):
    short_run = ACDC_STUDY


class nnUNetTrainerTPM_acdcStudy(_NoTTAMixin, ShortRunMixin, nnUNetTrainerTPM):
    short_run = ACDC_STUDY


class nnUNetTrainerMIE_acdcStudy(_NoTTAMixin, ShortRunMixin, nnUNetTrainerMIE):
    short_run = ACDC_STUDY


class nnUNetTrainerTPM_acdcStudy_warmup10(_NoTTAMixin, ShortRunMixin, nnUNetTrainerTPM):
    """TPM with L_TPM switched on after 10 of the 20 epochs (half the budget) instead of 2: measured on ACDC
    (documentation/results.md), L_TPM switched on at epoch 2, while the meshes are still near their templates (~1200
    mesh critical points per step), separated the meshes but ruined their fit and the shared segmentation."""

    short_run = dict(ACDC_STUDY, topology_start_epoch=10)
