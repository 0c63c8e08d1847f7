"""Models trained before a code move keep working (issue 24): a tiny TPM model folder written by the code of commit
8e1edfa (tests/fixtures/legacy_model, see its README) must still load, predict through ``nnUNetv2_predict`` and mesh
through ``nnUNetv2_topo_predict_meshes`` with today's code."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import integration_env, nnunet_cli, run_cli

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_model"
TRAINER = "nnUNetTrainerTPM_legacyFixture"


def test_model_trained_before_the_move_predicts_and_meshes(tmp_path):
    import SimpleITK as sitk
    import torch

    from nnunet_topo.mesh_io import read_mesh

    dirs = {k: tmp_path / k for k in ("raw", "preprocessed", "results", "ext_trainers")}
    for d in dirs.values():
        d.mkdir()
    shutil.copytree(FIXTURE / "results", dirs["results"], dirs_exist_ok=True)
    shutil.copy(FIXTURE / "legacy_fixture_trainer.py", dirs["ext_trainers"])
    env = dict(integration_env(dirs), nnUNet_compile="f")
    model = next(dirs["results"].glob(f"Dataset981_*/{TRAINER}__*"))
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and "nnunet_topo_mesh_head" in ckpt

    images = FIXTURE / "raw" / "imagesTs"
    common = ["-d", "981", "-c", "3d_mesh", "-tr", TRAINER, "-p", "nnUNetPlansMesh", "-f", "0", "-device", "cpu"]
    seg = tmp_path / "seg"
    run_cli([nnunet_cli("nnUNetv2_predict"), "-i", str(images), "-o", str(seg), "-chk", "checkpoint_final.pth",
             "--disable_tta"] + common, env)
    (case,) = [f.name[:-len("_0000.nii.gz")] for f in images.iterdir()]
    img = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
    out = sitk.ReadImage(str(seg / f"{case}.nii.gz"))
    assert out.GetSize() == img.GetSize() and np.allclose(out.GetSpacing(), img.GetSpacing())

    meshes = tmp_path / "meshes"
    run_cli([nnunet_cli("nnUNetv2_topo_predict_meshes"), "-i", str(images), "-o", str(meshes), "--format", "vtk",
             "--roi_from", str(FIXTURE / "raw" / "labelsTs")] + common, env)
    entry = json.loads((meshes / "meshes.json").read_text())["cases"][case]
    assert "error" not in entry, entry
    assert set(entry["files"]) == {"LV_endo", "LV_epi", "RV"}
    for name, f in entry["files"].items():
        m = read_mesh(str(meshes / f))
        assert m.is_watertight and m.volume > 0, name
