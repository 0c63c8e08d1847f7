"""Sparse annotation (nnU-Net's ``ignore`` label) through nnU-Net's own commands, on the CPU.

Every other slice of every training reference is ignored. Before, the trainer refused to start (the rule check saw
ignored voxels as forbidden neighbours), the Betti loss took ignored voxels for background, and the validation
summary's TVS was divided by the annotated half of the reference only. Also: a checkpoint written without the newer
logged terms still resumes with ``--c``.
"""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_topo.synthetic import write_dataset
from nnunet_topo.trainers import TRAINER_DIR
from conftest import nnunet_cli, run_cli

pytestmark = pytest.mark.slow

DATASET_ID = 993
IGNORE = 4
SMOKE = '''
import os
import torch
from nnunet_topo.trainers.nnUNetTrainerBetti import nnUNetTrainerBetti


class nnUNetTrainerBetti_sparseSmoke(nnUNetTrainerBetti):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("SMOKE_EPOCHS", "1"))
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
'''


@pytest.fixture(scope="module")
def env(nnunet_dirs):
    folder = nnunet_dirs["ext_trainers"] / "sparse"
    folder.mkdir(exist_ok=True)
    (folder / "sparse_smoke_trainers.py").write_text(SMOKE)
    e = dict(os.environ)
    e.update(nnUNet_raw=str(nnunet_dirs["raw"]), nnUNet_preprocessed=str(nnunet_dirs["preprocessed"]),
             nnUNet_results=str(nnunet_dirs["results"]), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
             nnUNet_extTrainer=os.pathsep.join([TRAINER_DIR, str(folder)]))
    return e


@pytest.fixture(scope="module")
def dataset(nnunet_dirs, env):
    path = write_dataset(nnunet_dirs["raw"], DATASET_ID, preset="acdc", num_training=5, num_test=0, seed=3,
                         shape=(8, 40, 40), name="Sparse")
    for f in sorted((path / "labelsTr").glob("*.nii.gz")):
        img = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(img)
        arr[1::2] = IGNORE  # every other short-axis slice unannotated
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(f))
    dj = json.loads((path / "dataset.json").read_text())
    assert max(dj["labels"].values()) < IGNORE
    dj["labels"]["ignore"] = IGNORE
    (path / "dataset.json").write_text(json.dumps(dj, indent=2))
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1"], env)
    return path


def test_sparse_dataset_checks_trains_and_resumes(dataset, env, nnunet_dirs):
    proc = run_cli([nnunet_cli("nnUNetv2_topo_check_rules"), "-d", str(DATASET_ID)], env)
    assert "all rules and priors hold" in proc.stdout and "sparse case(s)" in proc.stdout

    trainer = "nnUNetTrainerBetti_sparseSmoke"
    train = [nnunet_cli("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    run_cli(train, dict(env, SMOKE_EPOCHS="1"))
    out = next(nnunet_dirs["results"].glob(f"Dataset{DATASET_ID}_*")) / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    summary = json.loads((out / "validation" / "summary_topology.json").read_text())
    for case in summary["metric_per_case"]:
        t = case["topology"]
        assert t["sparse_reference"] and np.isnan(t["topologically_correct"])
        # TVS is divided by the reference volume with the ignored voxels filled in by the prediction, not by the
        # annotated part only
        ref = sitk.GetArrayFromImage(sitk.ReadImage(case["reference_file"]))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(case["prediction_file"]))
        volume = np.count_nonzero((ref != 0) & (ref != IGNORE)) + np.count_nonzero((ref == IGNORE) & (pred != 0))
        for rule, v in t["violating_voxels"].items():
            if rule not in t["worst_case"]["rules"]:
                assert t["TVS_per_rule"][rule] == pytest.approx(v / volume)
    assert summary["topology_mean_num_cases"]["topologically_correct"] == 0  # undefined on every sparse case
    ckpt_file = out / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    assert len(ckpt["logging"]["train_betti_skipped"]) == 1

    # a checkpoint of an older version lacks the newer logged terms: --c must still resume
    for key in ("train_betti_skipped", "val_betti_skipped", "train_betti_prior_used", "val_betti_prior_used"):
        del ckpt["logging"][key]
    torch.save(ckpt, ckpt_file)
    run_cli(train + ["--c"], dict(env, SMOKE_EPOCHS="2"))
    logged = torch.load(ckpt_file, map_location="cpu", weights_only=False)["logging"]
    assert len(logged["train_betti_skipped"]) == 2 and np.isnan(logged["train_betti_skipped"][0])
    assert not np.isnan(logged["train_betti_skipped"][1])
