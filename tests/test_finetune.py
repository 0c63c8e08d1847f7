"""Fine-tuning and the two-phase schedule through nnU-Net's own ``nnUNetv2_train`` (CPU, tiny synthetic ACDC data).

* ``-pretrained_weights`` of a plain-loss model (``nnUNetTrainerMeshROI``) starts ``nnUNetTrainerMesh`` and
  ``nnUNetTrainerMIE`` (nnU-Net's network loaded, its segmentation layers too, the head fresh), and of a trained
  ``nnUNetTrainerMesh`` model starts ``nnUNetTrainerTPM_finetune`` with the head loaded (the TPM paper's protocol);
* the schedule: ``nnUNetTrainerProjPool`` logs NaN for its term in the first phase and a value after the switch;
  killed in the second phase, ``--c`` resumes with the term on; the ``_finetune`` variants (TPM, MIE here) start
  with it on.
nnU-Net's final validation is skipped in these short runs (it is exercised by the integration tests).
Nothing of nnU-Net is mocked.
"""
import json
import math
import os
import textwrap

import pytest
import torch

from conftest import integration_env, nnunet_cli, run_cli
from nnunet_topo.synthetic import write_dataset

pytestmark = pytest.mark.slow

DATASET_ID = 981
PLANS, CONF = "nnUNetPlansMesh", "3d_mesh"
SHORT_TRAINERS = textwrap.dedent('''
    import os

    import torch
    from nnunet_topo.trainers.nnUNetTrainerMIE import nnUNetTrainerMIE_finetune
    from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh
    from nnunet_topo.trainers.nnUNetTrainerMeshROI import nnUNetTrainerMeshROI
    from nnunet_topo.trainers.nnUNetTrainerProjPool import nnUNetTrainerProjPool
    from nnunet_topo.trainers.nnUNetTrainerTPM import nnUNetTrainerTPM_finetune
    from nnunet_topo.trainers.nnUNetTrainer_acdcFinetune import _StopAtDiceGoals

    SHORT = dict(num_epochs=1, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, occ_num_uniform=64,
                 occ_num_surface=64, max_critical_points=64, mie_num_points=128)


    class _Short:
        short = SHORT

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            for k, v in self.short.items():
                setattr(self, k, v)

        def perform_actual_validation(self, save_probabilities=False):
            pass  # nnU-Net's final validation (sliding window + evaluators) is tested elsewhere; it is not why we are here

        def on_epoch_start(self):  # a kill in the middle of a run, for --c
            if os.environ.get("NNUNET_TOPO_TEST_KILL_AT_EPOCH") == str(self.current_epoch):
                os._exit(3)
            super().on_epoch_start()


    class nnUNetTrainerMeshROI_ftTest(_Short, nnUNetTrainerMeshROI):
        pass


    class nnUNetTrainerMesh_ftTest(_Short, nnUNetTrainerMesh):
        pass


    class nnUNetTrainerTPM_finetune_ftTest(_Short, nnUNetTrainerTPM_finetune):
        pass


    class nnUNetTrainerMIE_finetune_ftTest(_Short, nnUNetTrainerMIE_finetune):
        pass


    class nnUNetTrainerMeshROI_stopTest(_StopAtDiceGoals, _Short, nnUNetTrainerMeshROI):
        """The ACDC backbone's stop rule with goals any model meets: ends after epoch 1 (two epochs' mean)."""

        short = dict(SHORT, num_epochs=5)
        dice_goals = {"LV": 0.0, "MYO": 0.0, "RV": 0.0}


    class nnUNetTrainerProjPool_ftTest(_Short, nnUNetTrainerProjPool):
        """3 epochs, the term on from epoch 1 (the default would be num_epochs // 2 = 1); a checkpoint every epoch."""

        short = dict(SHORT, num_epochs=3, save_every=1)
''')


@pytest.fixture(scope="module")
def env(nnunet_dirs):
    (nnunet_dirs["ext_trainers"] / "finetune_trainers.py").write_text(SHORT_TRAINERS)
    e = dict(integration_env(nnunet_dirs), nnUNet_compile="f")
    write_dataset(e["nnUNet_raw"], DATASET_ID, "acdc", num_training=5, num_test=0, seed=4, shape=(8, 40, 40))
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "--no_pp", "-npfp", "1"], e)
    run_cli([nnunet_cli("nnUNetv2_topo_plan_mesh"), "-d", str(DATASET_ID)], e)
    run_cli([nnunet_cli("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-plans_name", PLANS, "-c", CONF, "-np", "1"],
            e)
    return e


def _train(env, trainer, *extra, check=True):
    return run_cli([nnunet_cli("nnUNetv2_train"), str(DATASET_ID), CONF, "0", "-tr", trainer, "-p", PLANS,
                    "-device", "cpu", *extra], env, check=check)


def _fold(env, trainer):
    name = next(p.name for p in os.scandir(env["nnUNet_results"]) if p.name.startswith(f"Dataset{DATASET_ID}_"))
    return os.path.join(env["nnUNet_results"], name, f"{trainer}__{PLANS}__{CONF}", "fold_0")


def _log(env, trainer, name="checkpoint_final.pth"):
    return torch.load(os.path.join(_fold(env, trainer), name), weights_only=False)["logging"]


def test_mesh_trainers_start_from_a_trained_nnunet_and_tpm_from_a_trained_mesh_model(env):
    from nnunet_topo.mesh_head.network import HEAD_STATE_KEY

    _train(env, "nnUNetTrainerMeshROI_ftTest")
    backbone = os.path.join(_fold(env, "nnUNetTrainerMeshROI_ftTest"), "checkpoint_final.pth")
    ck = torch.load(backbone, weights_only=False)
    assert HEAD_STATE_KEY not in ck and not any(k.startswith("mesh_head.") for k in ck["network_weights"])

    out = _train(env, "nnUNetTrainerMesh_ftTest", "-pretrained_weights", backbone).stdout
    assert "Loading pretrained weights" in out and "segmentation layers included" in out
    assert "mesh head starts fresh" in out and "it has no mesh head" in out
    mesh_ckpt = os.path.join(_fold(env, "nnUNetTrainerMesh_ftTest"), "checkpoint_final.pth")
    assert torch.load(mesh_ckpt, weights_only=False)[HEAD_STATE_KEY]["format"] == 2

    out = _train(env, "nnUNetTrainerTPM_finetune_ftTest", "-pretrained_weights", mesh_ckpt).stdout
    assert "mesh head loaded from" in out
    log = _log(env, "nnUNetTrainerTPM_finetune_ftTest")
    assert math.isfinite(log["train_tpm"][0])  # the _finetune variant: L_TPM on from the first epoch

    out = _train(env, "nnUNetTrainerMIE_finetune_ftTest", "-pretrained_weights", backbone).stdout
    assert "mesh head starts fresh" in out
    assert _log(env, "nnUNetTrainerMIE_finetune_ftTest")["train_mie_rho"][0] == pytest.approx(0.2)

    # a mesh model of the earlier format (network + head in one state dict) is refused with a clear message
    old = dict(ck, network_weights={**{f"network.{k}": v for k, v in ck["network_weights"].items()},
                                    "mesh_head.w": torch.zeros(1)})
    old_file = os.path.join(os.path.dirname(backbone), "old_format.pth")
    torch.save(old, old_file)
    proc = _train(env, "nnUNetTrainerMesh_ftTest", "-pretrained_weights", old_file, check=False)
    assert proc.returncode != 0 and "a mesh model of an earlier nnunet-topo" in proc.stderr + proc.stdout


def test_projpool_schedule_nan_then_on_and_resumes_across_the_switch(env):
    # no augmentation workers in the run that is killed: orphaned workers would keep its output pipe open
    kill = dict(env, NNUNET_TOPO_TEST_KILL_AT_EPOCH="2", nnUNet_n_proc_DA="0")
    proc = _train(kill, "nnUNetTrainerProjPool_ftTest", check=False)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "topology terms ['projpool'] on from epoch 1" in proc.stdout
    log = _log(env, "nnUNetTrainerProjPool_ftTest", "checkpoint_latest.pth")
    assert len(log["train_projpool"]) == 2
    assert math.isnan(log["train_projpool"][0]) and math.isnan(log["val_projpool"][0])  # first phase: nnU-Net
    assert math.isfinite(log["train_projpool"][1]) and math.isfinite(log["val_projpool"][1])
    _train(env, "nnUNetTrainerProjPool_ftTest", "--c")
    log = _log(env, "nnUNetTrainerProjPool_ftTest")
    assert len(log["train_projpool"]) == 3 and math.isfinite(log["train_projpool"][2])
    assert os.path.isfile(os.path.join(_fold(env, "nnUNetTrainerProjPool_ftTest"), "progress_topology.png"))


def test_backbone_stops_at_its_dice_goals_through_nnunet_train(env):
    """The ACDC backbone's rule (trainers/nnUNetTrainer_acdcFinetune.py): nnU-Net's own end of training (checkpoint_final,
    'Training done.') after the epoch where the goals are met, not after num_epochs."""
    out = _train(env, "nnUNetTrainerMeshROI_stopTest").stdout
    assert "Dice goals" in out and "after epoch 1: training ends here" in out and "Training done." in out
    log = _log(env, "nnUNetTrainerMeshROI_stopTest")
    assert len(log["dice_per_class_or_region"]) == 2
    assert not os.path.isfile(os.path.join(_fold(env, "nnUNetTrainerMeshROI_stopTest"), "checkpoint_latest.pth"))
