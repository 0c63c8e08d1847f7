"""End to end through nnU-Net's own command-line tools on a tiny synthetic dataset, on the CPU.

make synthetic dataset -> nnUNetv2_topo_check_rules -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train with
nnUNetTrainerProjPool (a 2 epoch x 2 iteration subclass written to a second nnUNet_extTrainer folder) ->
nnUNetv2_predict -> nnUNetv2_topo_evaluate_folder. Nothing of nnU-Net is mocked.
"""
import json
import os
import textwrap

import pytest
import torch

from nnunet_topo.synthetic import write_dataset
from conftest import integration_env, nnunet_cli, run_cli

pytestmark = pytest.mark.slow

DATASET_ID = 991
# Short-run subclasses, written to a second nnUNet_extTrainer folder (test glue only). Each runs 2 iterations per
# epoch; the epoch count comes from SMOKE_EPOCHS so that a test can stop after one epoch and resume with --c.
SMOKE_BASES = {"nnUNetTrainerProjPool": "nnUNetTrainerProjPool", "nnUNetTrainerBetti": "nnUNetTrainerBetti",
               "nnUNetTrainerBettiSemi": "nnUNetTrainerBetti", "nnUNetTrainerTPM": "nnUNetTrainerTPM"}
SMOKE_TRAINERS = "import os\nimport torch\n" + "".join(
    f"from nnunet_topo.trainers.{module} import {base}\n" for base, module in SMOKE_BASES.items()) + "".join(
    textwrap.dedent(f'''


    class {base}_smoke({base}):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ.get("SMOKE_EPOCHS", "1"))
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1
            # fewer occupancy query points keep a CPU iteration of the mesh trainers short
            for k, v in dict(occ_num_uniform=128, occ_num_surface=128, max_critical_points=128).items():
                if hasattr(self, k):
                    setattr(self, k, v)
    ''') for base in SMOKE_BASES)


#: an offline stand-in for the wandb module (nnU-Net's WandbLogger imports it): records keys logged per epoch and the
#: run summary into $NNUNET_TOPO_TEST_WANDB
WANDB_STUB = textwrap.dedent('''
    import json
    import os


    class _Summary(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            _RUN.save()


    class _Config(dict):
        pass


    class _Run:
        def __init__(self):
            self.config, self.summary, self.step, self.logged = _Config(), _Summary(), 0, set()

        def log(self, values, step=None):
            self.logged.update(values)
            self.save()

        def save(self):
            with open(os.environ["NNUNET_TOPO_TEST_WANDB"], "w") as f:
                json.dump({"logged": sorted(self.logged), "summary": dict(self.summary)}, f, default=str)


    _RUN = None


    def init(**kwargs):
        global _RUN
        _RUN = _Run()
        return _RUN
''')


@pytest.fixture(scope="module")
def env(nnunet_dirs):
    (nnunet_dirs["ext_trainers"] / "smoke_trainers.py").write_text(SMOKE_TRAINERS)
    return integration_env(nnunet_dirs)


@pytest.fixture(scope="module")
def dataset(nnunet_dirs, env):
    path = write_dataset(nnunet_dirs["raw"], DATASET_ID, preset="acdc", num_training=6, num_test=2,
                         seed=0, shape=(8, 40, 40))
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
             "--verify_dataset_integrity", "-np", "1", "-npfp", "1"], env)
    return path


def test_check_rules_on_reference(dataset, env):
    proc = run_cli([nnunet_cli("nnUNetv2_topo_check_rules"), "-d", str(DATASET_ID)], env)
    assert "all rules and priors hold" in proc.stdout


def test_train_predict_evaluate(dataset, env, nnunet_dirs):
    trainer = "nnUNetTrainerProjPool_smoke"
    train = [nnunet_cli("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    run_cli(train, dict(env, SMOKE_EPOCHS="1"))
    # resume with --c for a second epoch: our logged terms must come back from the checkpoint; nnU-Net's W&B logger
    # on, with an offline stub of the wandb module (no network) that records what reaches it
    stub = nnunet_dirs["results"].parent / "wandb_stub"
    stub.mkdir(exist_ok=True)
    (stub / "wandb.py").write_text(WANDB_STUB)
    record = stub / "record.json"
    wandb_env = dict(env, SMOKE_EPOCHS="2", nnUNet_wandb_enabled="1", NNUNET_TOPO_TEST_WANDB=str(record),
                     PYTHONPATH=str(stub) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = run_cli(train + ["--c"], wandb_env)
    out = next((nnunet_dirs["results"]).glob(f"Dataset{DATASET_ID}_*")) / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (out / "checkpoint_final.pth").is_file()
    assert (out / "progress_topology.png").is_file()
    assert (out / "validation" / "summary.json").is_file()  # nnU-Net's own validation summary, untouched
    topo_val = json.loads((out / "validation" / "summary_topology.json").read_text())
    assert topo_val["topology_mean"]["num_cases"] >= 1
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = ckpt["logging"]
    assert len(logged["train_projpool"]) == 2 and len(logged["val_projpool"]) == 2
    assert all(v > 0 for v in logged["train_projpool"])
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "projpool: train" in log and "Topology summary" in log
    wandb = json.loads(record.read_text())
    assert "val_projpool" in wandb["logged"]  # the per-epoch terms (nnU-Net's logger)
    assert wandb["summary"]["final_val/topology_TVS"] == pytest.approx(topo_val["topology_mean"]["TVS"])
    assert "final_val/topology_VR" in wandb["summary"] and "final_val/foreground_dice" in wandb["summary"]

    _export_round_trip(env, nnunet_dirs, trainer, out)

    pred = nnunet_dirs["results"] / "pred"
    run_cli([nnunet_cli("nnUNetv2_predict"), "-i", str(dataset / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
             "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
            env)
    assert len(list(pred.glob("*.nii.gz"))) == 2

    plans = next((nnunet_dirs["preprocessed"]).glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlans.json"
    proc = run_cli([nnunet_cli("nnUNetv2_topo_evaluate_folder"), str(dataset / "labelsTs"), str(pred),
                    "-djfile", str(dataset / "dataset.json"), "-pfile", str(plans)], env)
    assert "TVS" in proc.stdout
    summary = json.loads((pred / "summary_topology.json").read_text())
    assert len(summary["metric_per_case"]) == 2
    assert set(summary["mean"]) == {"1", "2", "3"}
    for m in summary["mean"].values():
        assert 0.0 <= m["Dice"] <= 1.0
    t = summary["topology_mean"]
    assert set(t["TVS_per_rule"]) == {"exclusion(LV,RV)", "inclusion(LV in LV+MYO) [2d axis 0]"}
    assert t["TVS"] >= 0 and 0 <= t["VR"] <= 1


def test_evaluator_rejects_missing_prediction_folder(dataset, env, nnunet_dirs, tmp_path):
    plans = next((nnunet_dirs["preprocessed"]).glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlans.json"
    proc = run_cli([nnunet_cli("nnUNetv2_topo_evaluate_folder"), str(dataset / "labelsTs"), str(tmp_path / "nope"),
                    "-djfile", str(dataset / "dataset.json"), "-pfile", str(plans)], env, check=False)
    assert proc.returncode == 2 and "prediction folder not found" in proc.stderr


def test_trainer_refuses_rules_that_the_reference_labels_violate(dataset, env, nnunet_dirs, monkeypatch):
    """A rule the training labels break cannot be learned: the trainer says so before training."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    from nnunet_topo.topology_spec import TopologySpecError
    from nnunet_topo.trainers.nnUNetTrainerProjPool import nnUNetTrainerProjPool

    pre = next((nnunet_dirs["preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dj = json.loads((pre / "dataset.json").read_text())
    dj["topology"]["rules"].append({"type": "exclusion", "a": "MYO", "b": "RV"})  # MYO always touches RV
    with pytest.raises(TopologySpecError, match=r"exclusion\(MYO,RV\): violated in 6/6"):
        nnUNetTrainerProjPool(dict(plans, continue_training=False), "3d_fullres", 0, dj, torch.device("cpu"))
    # imperfect references: the data-level exception in the topology block (issue 23 item 6); the message names
    # the cases left, the trainer logs the excepted ones
    cases = sorted(p.name[:-len(dj["file_ending"])] for p in (pre / "gt_segmentations").iterdir())
    dj["topology"]["reference_exceptions"] = [{"cases": cases[:5], "rules": ["exclusion(MYO,RV)"],
                                               "reason": "annotated without a gap"}]
    with pytest.raises(TopologySpecError, match=rf"exclusion\(MYO,RV\): violated in 1/6 reference case\(s\): "
                                                rf"{cases[5]} \(\d+ voxels"):
        nnUNetTrainerProjPool(dict(plans, continue_training=False), "3d_fullres", 0, dj, torch.device("cpu"))
    dj["topology"]["reference_exceptions"][0]["cases"] = cases
    tr = nnUNetTrainerProjPool(dict(plans, continue_training=False), "3d_fullres", 0, dj, torch.device("cpu"))
    log = open(tr.log_file).read()
    assert "reference cases excepted from the rule check" in log
    assert all(f"exclusion(MYO,RV): {c} (" in log for c in cases) and "annotated without a gap" in log
    # the dataset's own rules hold: the same construction succeeds, and the check is cached
    nnUNetTrainerProjPool(dict(plans, continue_training=False), "3d_fullres", 0,
                          json.loads((pre / "dataset.json").read_text()), torch.device("cpu"))
    assert (pre / "nnunet_topo_reference_check.json").is_file()


def test_betti_trainer_and_refinement(dataset, env, nnunet_dirs):
    """nnUNetTrainerBetti through nnUNetv2_train, then nnUNetv2_topo_refine on the test images."""
    trainer = "nnUNetTrainerBetti_smoke"
    run_cli([nnunet_cli("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    out = next((nnunet_dirs["results"]).glob(f"Dataset{DATASET_ID}_*")) / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(ckpt["logging"]["train_betti"]) == 1 and ckpt["logging"]["train_betti"][0] >= 0
    assert (out / "validation" / "summary_topology.json").is_file()

    images = dataset / "imagesTs"
    before = {p.name: p.stat().st_mtime for p in images.iterdir()}
    refined = nnunet_dirs["results"] / "refined"
    proc = run_cli([nnunet_cli("nnUNetv2_topo_refine"), "-i", str(images), "-o", str(refined), "-d", str(DATASET_ID),
                    "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", "cpu", "--steps", "2"], env)
    assert "Betti err 3D" in proc.stdout
    assert {p.name: p.stat().st_mtime for p in images.iterdir()} == before  # inputs untouched
    assert len(list(refined.glob("*.nii.gz"))) == 2
    summary = json.loads((refined / "refinement_summary.json").read_text())
    assert len(summary["cases"]) == 2 and summary["priors_3d"] == {"1": [1, 0, 0], "2": [1, 1, 0], "3": [1, 0, 0]}
    # refusing to write into the input folder and to replace existing outputs
    bad = run_cli([nnunet_cli("nnUNetv2_topo_refine"), "-i", str(images), "-o", str(images), "-d", str(DATASET_ID),
                   "-c", "3d_fullres", "-tr", trainer, "-device", "cpu"], env, check=False)
    assert bad.returncode == 2 and "is the input folder" in bad.stderr
    again = run_cli([nnunet_cli("nnUNetv2_topo_refine"), "-i", str(images), "-o", str(refined), "-d", str(DATASET_ID),
                     "-c", "3d_fullres", "-tr", trainer, "-device", "cpu", "--steps", "1"], env, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # the refined segmentations are scored by the evaluator like any prediction
    plans = next((nnunet_dirs["preprocessed"]).glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlans.json"
    run_cli([nnunet_cli("nnUNetv2_topo_evaluate_folder"), str(dataset / "labelsTs"), str(refined),
             "-djfile", str(dataset / "dataset.json"), "-pfile", str(plans)], env)


def test_semi_supervised_betti_trainer(dataset, env, nnunet_dirs):
    """Unlabelled images in imagesUnlabelled are preprocessed by nnU-Net's preprocessor and get the prior only."""
    import shutil

    unl = dataset / "imagesUnlabelled"
    unl.mkdir(exist_ok=True)
    for p in (dataset / "imagesTs").glob("*.nii.gz"):
        shutil.copy(p, unl / p.name.replace("acdc_", "unl_"))
    trainer = "nnUNetTrainerBettiSemi_smoke"
    run_cli([nnunet_cli("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    out = next((nnunet_dirs["results"]).glob(f"Dataset{DATASET_ID}_*")) / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    logged = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert len(logged["train_unlabelled_betti"]) == 1 and logged["train_unlabelled_betti"][0] >= 0
    pre = next((nnunet_dirs["preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    assert len(list((pre / "nnUNetPlans_3d_fullres_unlabelled").glob("unl_*.npy"))) == 2
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "semi-supervised priors: 2 unlabelled case(s)" in log


def test_tpm_trainer_meshes_end_to_end(dataset, env, nnunet_dirs):
    """nnUNetTrainerTPM through nnUNetv2_train (plans whose patch covers the volume), nnUNetv2_predict,
    nnUNetv2_topo_predict_meshes (closed meshes in patient coordinates, the ROI recorded, and a segmentation equal to
    nnUNetv2_predict's) and the evaluator with --mesh_folder."""
    import trimesh

    run_cli([nnunet_cli("nnUNetv2_topo_plan_whole_volume"), "-d", str(DATASET_ID), "-c", "3d_fullres",
             "--overwrite"], env)
    trainer = "nnUNetTrainerTPM_smoke"
    run_cli([nnunet_cli("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-p",
             "nnUNetPlansWholeVolume", "-device", "cpu"], env)
    out = next((nnunet_dirs["results"]).glob(f"Dataset{DATASET_ID}_*")) / \
        f"{trainer}__nnUNetPlansWholeVolume__3d_fullres" / "fold_0"
    logged = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert len(logged["train_occ"]) == 1 and logged["train_occ"][0] > 0

    pred = nnunet_dirs["results"] / "pred_tpm"
    common = ["-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", trainer, "-p", "nnUNetPlansWholeVolume", "-f", "0",
              "-device", "cpu"]
    run_cli([nnunet_cli("nnUNetv2_predict"), "-i", str(dataset / "imagesTs"), "-o", str(pred), "--disable_tta",
             "-npp", "1", "-nps", "1"] + common, env)
    meshes = nnunet_dirs["results"] / "meshes_tpm"
    run_cli([nnunet_cli("nnUNetv2_topo_predict_meshes"), "-i", str(dataset / "imagesTs"), "-o", str(meshes),
             "--format", "vtk"] + common, env)
    files = sorted(meshes.glob("*.vtk"))
    assert len(files) == 2 * 3  # 2 cases x (LV_endo, LV_epi, RV)
    from nnunet_topo.mesh_io import read_mesh
    for f in files:
        m = read_mesh(f)
        assert isinstance(m, trimesh.Trimesh) and m.is_watertight and m.volume > 0
    # the segmentation written next to the meshes is nnUNetv2_predict's, voxel for voxel and with its geometry; the
    # head ran on the patch-size ROI that contains the predicted structures' box (preprocessed frame)
    import numpy as np
    import SimpleITK as sitk

    listing = json.loads((meshes / "meshes.json").read_text())
    patch = json.loads((out.parent / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
    assert listing["cases_without_mesh"] == [] and len(listing["cases"]) == 2
    for case, entry in listing["cases"].items():
        assert entry["segmentation"] == case + ".nii.gz" and set(entry["files"]) == {"LV_endo", "LV_epi", "RV"}
        ours = sitk.ReadImage(str(meshes / entry["segmentation"]))
        theirs = sitk.ReadImage(str(pred / (case + ".nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
        for get in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(getattr(ours, get)(), getattr(theirs, get)(), atol=1e-6)
        roi = entry["roi"]
        (lo, hi), start = roi["box"], roi["start"]
        assert roi["size"] == patch and all(s <= a < b <= s + p for s, a, b, p in zip(start, lo, hi, patch)), roi
    again = run_cli([nnunet_cli("nnUNetv2_topo_predict_meshes"), "-i", str(dataset / "imagesTs"), "-o", str(meshes),
                     "--format", "vtk"] + common, env, check=False)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr

    plans = next((nnunet_dirs["preprocessed"]).glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlansWholeVolume.json"
    proc = run_cli([nnunet_cli("nnUNetv2_topo_evaluate_folder"), str(dataset / "labelsTs"), str(pred),
                    "-djfile", str(dataset / "dataset.json"), "-pfile", str(plans), "--mesh_folder", str(meshes)], env)
    summary = json.loads((pred / "summary_topology.json").read_text())
    assert "mesh_topology_mean" in summary and "mesh_mean" in summary
    assert set(summary["mesh_mean"]) == {"LV_endo", "LV_epi", "RV"}
    assert "mesh TVS" in proc.stdout


def _export_round_trip(env, nnunet_dirs, trainer, fold_dir):
    """nnUNetv2_topo_export (nnU-Net's export + the topology files) -> nnU-Net's own
    nnUNetv2_install_pretrained_model_from_zip into a fresh nnUNet_results: the topology files come back byte-identical
    and nnUNetv2_topo_summarize_cv reads the installed fold's summary_topology.json without recomputing it."""
    import hashlib
    import subprocess

    run_cli([nnunet_cli("nnUNetv2_topo_summarize_cv"), "-d", str(DATASET_ID), "-tr", trainer, "-c", "3d_fullres",
             "-f", "0"], env)
    model_dir = fold_dir.parent
    files = [fold_dir / "progress_topology.png", fold_dir / "validation" / "summary_topology.json",
             model_dir / "summary_topology_cv.json"]
    digest = {f.relative_to(nnunet_dirs["results"]): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    archive = nnunet_dirs["results"].parent / "model_export.zip"
    export = [nnunet_cli("nnUNetv2_topo_export"), "-d", str(DATASET_ID), "-o", str(archive), "-c", "3d_fullres",
              "-tr", trainer, "-f", "0"]
    proc = run_cli(export, env)
    assert "3 topology file(s)" in proc.stdout, proc.stdout
    again = subprocess.run(export, env=env, capture_output=True, text=True)  # never replaced without --overwrite
    assert again.returncode == 2 and "exists; give --overwrite" in again.stderr
    installed = nnunet_dirs["results"].parent / "installed_results"
    installed.mkdir()
    env2 = dict(env, nnUNet_results=str(installed))
    run_cli([nnunet_cli("nnUNetv2_install_pretrained_model_from_zip"), str(archive)], env2)
    for rel, sha in digest.items():
        assert hashlib.sha256((installed / rel).read_bytes()).hexdigest() == sha, rel
    assert (installed / fold_dir.relative_to(nnunet_dirs["results"]) / "checkpoint_final.pth").is_file()
    (installed / model_dir.relative_to(nnunet_dirs["results"]) / "summary_topology_cv.json").unlink()
    proc = run_cli([nnunet_cli("nnUNetv2_topo_summarize_cv"), "-d", str(DATASET_ID), "-tr", trainer, "-c",
                    "3d_fullres", "-f", "0"], env2)
    assert (installed / model_dir.relative_to(nnunet_dirs["results"]) / "summary_topology_cv.json").is_file()
