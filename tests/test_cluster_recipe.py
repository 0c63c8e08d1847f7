"""The SLURM recipe (examples/cluster/) run for real through a fake ``sbatch``, and ``nnUNetv2_topo_precompute``.

A tiny synthetic ACDC-like dataset (5 training cases, 1 test case) is planned with nnUNetv2_plan_and_preprocess and
given a plans file whose patch covers every case (as tests/test_mesh_trainers.py does). ``examples/cluster/submit.sh``
then submits its three jobs to ``tests/fake_slurm/sbatch`` (first on PATH), which runs each job at once, honouring
``--array`` and ``--dependency=afterok``, and records every job's state: the precompute, the five folds of a mesh
trainer (1 epoch x 2 iterations, CPU) and the post job (CV summary, nnU-Net's find_best_configuration, the 5-fold
ensemble with meshes, the QC report). Nothing of nnU-Net is mocked; only SLURM is.
"""
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import nnunet_cli, run_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "cluster"
DATASET_ID = 979
PLANS = "nnUNetPlansCluster"  # nnU-Net's plans with a patch that covers every preprocessed case
TRAINER = "nnUNetTrainerMesh_clusterSmoke"
SMOKE_TRAINER = textwrap.dedent('''
    import torch
    from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh


    class nnUNetTrainerMesh_clusterSmoke(nnUNetTrainerMesh):
        """1 epoch x 2 iterations, 1 validation iteration: the recipe, not the accuracy."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1
            self.occ_num_uniform = self.occ_num_surface = self.max_critical_points = 128
            self.head_kwargs = {"hidden_features": 16, "num_blocks": 1, "num_residual": 1, "alignment_hidden": 16}
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a cluster user: nnU-Net's folders, the venv (activated by env.sh), the fake sbatch."""
    root = tmp_path_factory.mktemp("cluster")
    e = dict(os.environ)
    for var, d in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res"),
                   ("nnUNet_extTrainer", "ext")):
        (root / d).mkdir()
        e[var] = str(root / d)
    (root / "ext" / "cluster_smoke_trainer.py").write_text(SMOKE_TRAINER)
    e.update(VENV=str(Path(sys.executable).parent.parent), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
             nnUNet_compile="f", PATH=os.pathsep.join([str(REPO / "tests" / "fake_slurm"), e["PATH"]]),
             DATASET=str(DATASET_ID), CONFIGURATION="3d_fullres", PLANS=PLANS, TRAINER=TRAINER, DEVICE="cpu",
             NUM_PROCESSES="1", _root=str(root))
    e.pop("nnUNet_wandb_enabled", None)
    return e


@pytest.fixture(scope="module")
def dataset(env):
    from nnunet_topo.synthetic import write_dataset

    raw = write_dataset(env["nnUNet_raw"], DATASET_ID, "acdc", num_training=5, num_test=1, seed=0, shape=(8, 40, 40))
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1"], dict(env, nnUNet_n_proc_DA="1"))  # the planner needs >= 1 (training: 0, no workers)
    pre = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    conf = plans["configurations"]["3d_fullres"]
    conf["patch_size"] = [12, 48, 48]  # same data identifier: the preprocessed data is reused
    conf["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]  # a smaller network: a faster CPU run
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))
    return {"raw": raw, "pre": pre}


def _submit(env, out, slurm_state, **variables):
    e = dict(env, OUTPUT_DIR=str(out), FAKE_SLURM_DIR=str(slurm_state), **variables)
    proc = run_cli(["bash", str(RECIPE / "submit.sh")], e, timeout=3000)
    jobs = [json.loads(p.read_text()) for p in sorted(Path(slurm_state).glob("*.json"), key=lambda p: int(p.stem))]
    return proc, {j["name"]: j for j in jobs}, e


def test_recipe_end_to_end_through_a_fake_sbatch(env, dataset):
    root = Path(env["_root"])
    raw = dataset["raw"]
    out = root / "out"
    start = time.time()
    proc, jobs, e = _submit(env, out, root / "slurm", TEST_IMAGES=str(raw / "imagesTs"),
                            TEST_LABELS=str(raw / "labelsTs"))
    print(f"submit.sh ran the whole recipe in {time.time() - start:.0f} s")
    assert list(jobs) == ["topo_precompute", "topo_fold", "topo_post"], jobs
    pre, folds, post = jobs["topo_precompute"], jobs["topo_fold"], jobs["topo_post"]
    assert all(j["state"] == "COMPLETED" for j in jobs.values()), {k: j["state"] for k, j in jobs.items()}
    assert f"precompute {pre['id']} -> folds {folds['id']}" in proc.stdout
    # the dependency chain as submitted: array 0-4 after the precompute, the post job after the array
    assert folds["array"] == "0,1,2,3,4" and sorted(folds["tasks"]) == ["0", "1", "2", "3", "4"]
    assert folds["dependency"] == f"afterok:{pre['id']}" and post["dependency"] == f"afterok:{folds['id']}"

    # the precompute ran once and did the work; every fold reused it
    pre_log = Path(pre["tasks"]["0"]["log"])
    text = pre_log.read_text()
    assert "templates: built from the training labels" in text and "roi boxes: computed for 5 case(s)" in text
    assert "wrote plans.json, dataset.json" in text
    model = Path(env["nnUNet_results"]) / dataset["pre"].name / f"{TRAINER}__{PLANS}__3d_fullres"
    for cache in ("nnunet_topo_reference_check.json", "nnunet_topo_roi_boxes_nnUNetPlans_3d_fullres.json",
                  "splits_final.json"):  # written by the precompute, not rewritten by a fold
        assert os.path.getmtime(dataset["pre"] / cache) <= os.path.getmtime(pre_log), cache
    for k in range(5):
        fold = model / f"fold_{k}"
        log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
        assert "mesh templates reused from the plans" in log and "mesh templates built" not in log, k
        assert "ROI boxes of 5 case(s) read from the cache" in log, k
        assert "ROI boxes of 5 case(s) computed" not in log and "Creating new 5-fold" not in log, k
        assert (fold / "checkpoint_final.pth").is_file(), k
        assert (fold / "validation" / "summary.json").is_file() and list((fold / "validation").glob("*.npz")), k
        assert "mesh templates reused" in Path(folds["tasks"][str(k)]["log"]).read_text()  # the job's own log

    # the post job: CV summary, nnU-Net's choice, the ensemble's segmentations and meshes, the QC report
    assert (model / "summary_topology_cv.json").is_file()
    assert (model.parent / "inference_instructions.txt").is_file()
    case = "acdc_005"
    pred = out / "test_predictions"
    assert (pred / f"{case}.nii.gz").is_file()
    assert {p.name for p in pred.glob("*.vtk")} == {f"{case}_{s}.vtk" for s in ("LV_endo", "LV_epi", "RV")}
    info = json.loads((pred / "meshes.json").read_text())
    assert info["folds"] == [0, 1, 2, 3, 4] and info["cases_without_mesh"] == []
    assert (out / "qc_report" / "index.html").is_file()

    # resubmitting the array resumes: a finished fold is left alone, one without its validation is validated
    (model / "fold_1" / "validation" / "summary.json").unlink()
    slurm = root / "slurm"
    run_cli([str(REPO / "tests" / "fake_slurm" / "sbatch"), "--array=0-1", f"--output={out}/logs/again_%a.log",
             str(RECIPE / "train_fold.sbatch")],
            dict(e, FAKE_SLURM_DIR=str(slurm), RECIPE_DIR=str(RECIPE), FOLDS="0 1 2 3 4", OUTPUT_DIR=str(out),
                 NUM_GPUS="1"))
    assert "fold 0: trained and validated already" in (out / "logs" / "again_0.log").read_text()
    assert (model / "fold_1" / "validation" / "summary.json").is_file()


def test_a_failed_precompute_runs_neither_the_folds_nor_the_post_job(env, dataset):
    root = Path(env["_root"])
    _, jobs, _ = _submit(env, root / "out_failed", root / "slurm_failed", DATASET="978")  # no such dataset
    assert [j["state"] for j in jobs.values()] == ["FAILED", "DEPENDENCY_NEVER_SATISFIED",
                                                   "DEPENDENCY_NEVER_SATISFIED"]
    assert jobs["topo_precompute"]["tasks"]["0"]["rc"] == 2
    assert "error: -d 978: no such dataset" in Path(jobs["topo_precompute"]["tasks"]["0"]["log"]).read_text()
    assert jobs["topo_fold"]["tasks"] == {} and jobs["topo_post"]["tasks"] == {}
    assert not list((root / "out_failed" / "logs").glob("fold_*"))
    assert not (root / "out_failed" / "test_predictions").exists()


# ---------------------------------------------------------------------------------------------- the command itself
@pytest.fixture
def in_process(env, monkeypatch):
    """Run ``precompute_entry`` in this process with the module's nnU-Net folders: ``(exit code, stdout, stderr)``."""
    from nnunet_topo.cli.precompute import precompute_entry

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(REPO / "trainers"), env["nnUNet_extTrainer"]]))

    def run(capsys, *args):
        try:
            precompute_entry(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
        cap = capsys.readouterr()
        return code, cap.out, cap.err
    return run


def _snapshot(*folders):
    return {p: p.read_bytes() for f in folders for p in Path(f).rglob("*") if p.is_file()}


@pytest.mark.parametrize("args, message", [
    (("-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainerNope", "-p", PLANS),
     "-tr nnUNetTrainerNope: nnU-Net finds no trainer of that name"),
    (("-d", "978", "-c", "3d_fullres", "-tr", "nnUNetTrainerMesh"), "-d 978: no such dataset"),
    (("-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainerMesh", "-p", "nnUNetPlansNope"),
     f"-p nnUNetPlansNope: no .*nnUNetPlansNope.json \\(plans here: nnUNetPlans, {PLANS}\\)"),
    (("-d", str(DATASET_ID), "-c", "3d_nope", "-tr", "nnUNetTrainerMesh"), "-c 3d_nope: not a configuration"),
])
def test_bad_arguments_are_one_line_errors(in_process, capsys, dataset, env, args, message):
    import re

    before = _snapshot(dataset["pre"], env["nnUNet_results"])
    code, _, err = in_process(capsys, *args)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert _snapshot(dataset["pre"], env["nnUNet_results"]) == before


def test_a_model_folder_with_other_templates_or_settings_is_never_overwritten(in_process, capsys, dataset, env):
    args = ("-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainerMesh", "-p", PLANS)
    model = Path(env["nnUNet_results"]) / dataset["pre"].name / f"nnUNetTrainerMesh__{PLANS}__3d_fullres"
    model.mkdir(parents=True)
    try:
        # a plans.json without templates (other templates than the trainer builds)
        shutil.copy(dataset["pre"] / f"{PLANS}.json", model / "plans.json")
        before = _snapshot(dataset["pre"], model)
        code, _, err = in_process(capsys, *args)
        assert code == 2 and "holds other mesh templates than this training would use" in err, err
        assert "never replaced" in err and "remove" in err
        assert _snapshot(dataset["pre"], model) == before  # also: no dataset.json, no fold_0 log left behind
        assert sorted(p.name for p in model.iterdir()) == ["plans.json"]

        # the model folder's own plans: accepted, nothing written; then one setting changed: refused
        (model / "plans.json").unlink()
        code, out, _ = in_process(capsys, *args)
        assert code == 0 and "wrote plans.json, dataset.json" in out
        code, out, _ = in_process(capsys, *args)
        assert code == 0 and "reused from the model folder's plans.json" in out and "nothing to write" in out
        plans = json.loads((model / "plans.json").read_text())
        plans["configurations"]["3d_fullres"]["batch_size"] = 3
        (model / "plans.json").write_text(json.dumps(plans, indent=4))
        before = _snapshot(dataset["pre"], model)
        code, _, err = in_process(capsys, *args)
        assert code == 2 and "holds other settings of '3d_fullres' (batch_size)" in err, err
        assert _snapshot(dataset["pre"], model) == before
    finally:
        shutil.rmtree(model)


def test_a_trainer_without_templates_only_checks_the_rules(in_process, capsys, dataset, env):
    code, out, _ = in_process(capsys, "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainerBetti")
    assert code == 0, out
    assert "rule check: c" in out  # computed, or cached by an earlier test of this module
    assert "templates: none (this trainer has no mesh templates)" in out and "nothing to write" in out
    model = Path(env["nnUNet_results"]) / dataset["pre"].name / "nnUNetTrainerBetti__nnUNetPlans__3d_fullres"
    assert not model.exists()


def test_a_plans_json_being_rewritten_by_another_fold_is_read_again(tmp_path):
    """The folds of an array start together: one fold's nnU-Net ``on_train_start`` rewrites the model folder's
    plans.json (not atomically) while another fold's constructor reads the templates from it."""
    import threading

    from nnunet_topo.plans import saved_configuration

    full = json.dumps({"configurations": {"3d_fullres": {"patch_size": [8, 8, 8]}}})
    (tmp_path / "plans.json").write_text(full[:10])  # half written
    writer = threading.Timer(0.3, (tmp_path / "plans.json").write_text, args=(full,))
    writer.start()
    try:
        assert saved_configuration(str(tmp_path), "3d_fullres") == {"patch_size": [8, 8, 8]}
    finally:
        writer.join()
    (tmp_path / "plans.json").write_text("not json")  # broken for good: nothing, after a short wait
    assert saved_configuration(str(tmp_path), "3d_fullres") == {}


def test_roi_boxes_are_cached_per_label_set_and_patch_until_a_case_changes(dataset, tmp_path):
    from nnunet_topo.roi_cache import roi_boxes_and_crops, roi_cache_file

    data = tmp_path / "nnUNetPlans_3d_fullres"  # a copy: the module's own caches stay as the recipe left them
    shutil.copytree(dataset["pre"] / "nnUNetPlans_3d_fullres", data)
    logs = []

    def boxes(patch=(12, 48, 48), crop=False):
        crops, out = roi_boxes_and_crops(str(data), [1, 2, 3], patch, crop=crop, log=logs.append)
        return crops, out, logs[-1]

    crops, first, said = boxes(crop=True)
    assert len(crops) == 5 and "computed and cached" in said
    _, again, said = boxes()
    assert again == first and "read from the cache" in said  # tuples again, as roi_crops returns them
    assert boxes(crop=True)[2].startswith("ROI boxes of 5 case(s) computed")  # crops always stream the cases
    assert "computed" in boxes(patch=(10, 40, 40))[2] and "read from the cache" in boxes()[2]  # two entries
    case = next(data.glob("*.pkl"))
    os.utime(case, (time.time() + 10,) * 2)  # a case rewritten
    assert "computed" in boxes()[2] and "read from the cache" in boxes()[2]
    cache = Path(roi_cache_file(str(data)))
    cache.unlink()
    cache.mkdir()  # a cache that cannot be written (read-only shared data): computed, training goes on
    _, out, said = boxes()
    assert out == first and "not cached" in said
