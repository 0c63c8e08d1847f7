"""Bad inputs through the real console scripts (issue 23): nothing the user gave is overwritten or silently ignored.

Each case runs one command as a subprocess and asserts exit code 2, a message on stderr that names the offender
(a path or a value), and that every input file is byte-identical afterwards (the whole input tree is hashed before
and after; no file may appear or change in it). The inputs are built once per module from tiny synthetic datasets;
no model is trained: refine and predict_meshes are refused by the output guard before a model is looked up.
"""
import hashlib
import json
import os
import shutil

import pytest
import SimpleITK as sitk

from conftest import nnunet_cli, run_cli

DS = 931
NAME = f"Dataset{DS:03d}_BadInputs"
TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _relabel(src, dst, value):
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = value
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(dst))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nnunet_topo.synthetic import write_dataset

    root = tmp_path_factory.mktemp("bad_inputs")
    inp = root / "inputs"  # everything under here is an input: hashed before and after every case
    raw = inp / "raw"
    ds = write_dataset(raw, DS, "acdc", num_training=5, num_test=2, seed=0, shape=(6, 32, 32), name="BadInputs")
    fe = ".nii.gz"
    ref = ds / "labelsTs"
    cases = sorted(p.name for p in ref.iterdir())
    pred = inp / "pred"
    shutil.copytree(ref, pred)
    (inp / "plans.json").write_text("{}")
    for name, value in (("pred7", 7), ("ref9", 9)):  # undefined labels: one voxel each
        d = inp / name
        shutil.copytree(ref, d)
        _relabel(ref / cases[0], d / cases[0], value)
    garbage = b"\x00not an image at all\xff" * 8
    for name in ("pred_garbage", "ref_garbage"):
        d = inp / name
        shutil.copytree(ref, d)
        (d / cases[0]).write_bytes(garbage)
    # raw datasets whose labelsTr or dataset.json is broken (for check_rules --folder)
    for name, edit in (("ds_label9", "label9"), ("ds_garbage_label", "garbage"), ("ds_bad_json", "json"),
                       ("ds_list_json", "list")):
        d = inp / name
        d.mkdir()
        shutil.copy(ds / "dataset.json", d / "dataset.json")
        shutil.copytree(ds / "labelsTr", d / "labelsTr")
        first = sorted((d / "labelsTr").iterdir())[0]
        if edit == "label9":
            _relabel(first, first, 9)
        elif edit == "garbage":
            first.write_bytes(garbage)
        elif edit == "json":
            (d / "dataset.json").write_text('{"labels": {"background": 0,')
        else:
            (d / "dataset.json").write_text("[1, 2, 3]")
    (inp / "bad.json").write_bytes(b"\xff\xfe not json")
    # preprocessed: plans for plan_whole_volume / plan_mesh
    pre = inp / "preprocessed" / NAME
    pre.mkdir(parents=True)
    shutil.copy(ds / "dataset.json", pre / "dataset.json")
    (pre / "dataset_fingerprint.json").write_text("{}")
    (pre / "nnUNetPlans.json").write_text(json.dumps({"dataset_name": NAME, "configurations": {}}))
    (pre / "Existing.json").write_text("{}")
    (pre / "BadPlans.json").write_text("{ this is not json")
    # results: a model folder with a broken fold summary, one with a broken dataset.json (summarize_cv)
    res = inp / "results" / NAME
    for tr, dj in ((TRAINER, (ds / "dataset.json").read_text()), ("T2__nnUNetPlans__3d_fullres", "{oops")):
        m = res / tr
        (m / "fold_0" / "validation").mkdir(parents=True)
        (m / "dataset.json").write_text(dj)
        (m / "plans.json").write_text(json.dumps({"dataset_name": NAME, "configurations": {}}))
        (m / "fold_0" / "validation" / "summary_topology.json").write_text("{truncated")
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(inp / "preprocessed"),
               nnUNet_results=str(inp / "results"))
    return {"inp": inp, "ds": ds, "ref": ref, "pred": pred, "case": cases[0], "plans": inp / "plans.json",
            "dj": ds / "dataset.json", "images": ds / "imagesTs", "pre": pre, "env": env, "fe": fe}


def _tree_hash(folder):
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, folder)
            out[rel] = "link:" + os.readlink(p) if os.path.islink(p) else \
                hashlib.sha256(open(p, "rb").read()).hexdigest()
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def _link(tmp, target, name="link"):
    p = tmp / name
    os.symlink(target, p)
    return p


# (id, command, argument builder w(world) t(tmp_path) -> args, substrings the message must hold (formatted))
def _ev(w, *extra, ref=None, pred=None, dj=None, plans=None):
    return [str(ref or w["ref"]), str(pred or w["pred"]), "-djfile", str(dj or w["dj"]), "-pfile",
            str(plans or w["plans"]), *map(str, extra)]


def _model(w, i, o, *extra):
    return ["-i", str(i), "-o", str(o), "-d", str(DS), "-c", "3d_fullres", "-device", "cpu", *map(str, extra)]


CASES = [
    # ---- check_rules: the report file never replaces the dataset's files
    ("rules_o_dataset_json", "check_rules", lambda w, t: ["--folder", w["ds"], "-o", w["ds"] / "dataset.json"],
     ["dataset.json", "is the"]),
    ("rules_o_label_file", "check_rules",
     lambda w, t: ["--folder", w["ds"], "-o", w["ds"] / "labelsTr" / "x.nii.gz"], ["labelsTr"]),
    ("rules_o_symlinked_dataset_json", "check_rules",
     lambda w, t: ["--folder", w["ds"], "-o", _link(t, w["ds"]) / "dataset.json"], ["link/dataset.json", "resolves to"]),
    ("rules_o_wrong_extension", "check_rules", lambda w, t: ["--folder", w["ds"], "-o", t / "report.txt"],
     ["report.txt", ".json"]),
    ("rules_undefined_reference_label", "check_rules", lambda w, t: ["--folder", w["inp"] / "ds_label9"],
     ["ds_label9", "[9]", "defined: [0, 1, 2, 3]"]),
    ("rules_garbage_label_file", "check_rules", lambda w, t: ["--folder", w["inp"] / "ds_garbage_label"],
     ["cannot read reference", "ds_garbage_label"]),
    ("rules_invalid_dataset_json", "check_rules", lambda w, t: ["--folder", w["inp"] / "ds_bad_json"],
     ["cannot read dataset.json", "ds_bad_json"]),
    # ---- evaluate_folder
    ("eval_undefined_prediction_label", "evaluate_folder",
     lambda w, t: _ev(w, "-o", t / "s.json", pred=w["inp"] / "pred7"), ["pred7", "[7]", "defined: [0, 1, 2, 3]"]),
    ("eval_undefined_reference_label", "evaluate_folder",
     lambda w, t: _ev(w, "-o", t / "s.json", ref=w["inp"] / "ref9"), ["ref9", "[9]", "defined:"]),
    ("eval_garbage_prediction", "evaluate_folder",
     lambda w, t: _ev(w, "-o", t / "s.json", pred=w["inp"] / "pred_garbage"), ["cannot read prediction",
                                                                               "pred_garbage"]),
    ("eval_o_is_prediction_file", "evaluate_folder", lambda w, t: _ev(w, "-o", w["pred"] / w["case"]),
     [".json", "{case}"]),
    ("eval_o_inside_reference", "evaluate_folder", lambda w, t: _ev(w, "-o", w["ref"] / "s.json"),
     ["lies inside the reference folder"]),
    ("eval_o_through_symlink_to_reference", "evaluate_folder",
     lambda w, t: _ev(w, "-o", _link(t, w["ref"]) / "s.json"), ["link/s.json", "reference folder"]),
    ("eval_o_nnunet_summary_json", "evaluate_folder", lambda w, t: _ev(w, "-o", w["pred"] / "summary.json"),
     ["summary.json", "nnU-Net's own summary"]),
    ("eval_invalid_dataset_json", "evaluate_folder",
     lambda w, t: _ev(w, "-o", t / "s.json", dj=w["inp"] / "bad.json"), ["cannot read dataset.json", "bad.json"]),
    ("eval_invalid_plans", "evaluate_folder",
     lambda w, t: _ev(w, "-o", t / "s.json", plans=w["inp"] / "bad.json"), ["cannot read plans file", "bad.json"]),
    ("eval_report_is_prediction_folder", "evaluate_folder",
     lambda w, t: _ev(w, "-o", t / "s.json", "--report", w["pred"]), ["--report", "is the prediction folder"]),
    # ---- report
    ("report_o_is_prediction_folder", "report", lambda w, t: _ev(w, "-o", w["pred"]), ["is the prediction folder"]),
    ("report_o_symlink_to_reference", "report", lambda w, t: _ev(w, "-o", _link(t, w["ref"])),
     ["is the reference folder", "resolves to"]),
    ("report_o_inside_prediction", "report", lambda w, t: _ev(w, "-o", w["pred"] / "qc"),
     ["lies inside the prediction folder"]),
    ("report_o_contains_inputs", "report", lambda w, t: _ev(w, "-o", w["ds"]), ["contains the reference folder"]),
    ("report_garbage_prediction", "report", lambda w, t: _ev(w, "-o", t / "qc", pred=w["inp"] / "pred_garbage"),
     ["cannot read", "pred_garbage"]),
    ("report_undefined_prediction_label", "report", lambda w, t: _ev(w, "-o", t / "qc", pred=w["inp"] / "pred7"),
     ["pred7", "[7]"]),
    # ---- refine / predict_meshes: refused before a model is looked up (dataset 931 has no trained model)
    ("refine_o_is_i", "refine", lambda w, t: _model(w, w["images"], w["images"]), ["is the input folder"]),
    ("refine_o_symlink_to_i", "refine", lambda w, t: _model(w, w["images"], _link(t, w["images"])),
     ["is the input folder", "resolves to"]),
    ("refine_o_contains_i", "refine", lambda w, t: _model(w, w["images"], w["ds"]), ["contains the input folder"]),
    ("meshes_o_symlink_to_i", "predict_meshes", lambda w, t: _model(w, w["images"], _link(t, w["images"])),
     ["is the input folder"]),
    ("meshes_o_is_roi_from", "predict_meshes",
     lambda w, t: _model(w, w["images"], w["pred"], "--roi_from", w["pred"]), ["is the --roi_from folder"]),
    # ---- plan_whole_volume / plan_mesh (-o is a plans identifier in the preprocessed folder)
    ("wv_o_replaces_dataset_json", "plan_whole_volume", lambda w, t: ["-d", DS, "-o", "dataset"],
     ["dataset.json", "is the dataset.json"]),
    ("wv_o_existing_without_overwrite", "plan_whole_volume", lambda w, t: ["-d", DS, "-o", "Existing"],
     ["Existing.json", "--overwrite"]),
    ("mesh_invalid_plans", "plan_mesh", lambda w, t: ["-d", DS, "-p", "BadPlans"],
     ["cannot read plans file", "BadPlans.json"]),
    ("mesh_o_with_folder", "plan_mesh", lambda w, t: ["-d", DS, "-o", "../../evil"], ["../../evil"]),
    # ---- summarize_cv
    ("cv_garbage_fold_summary", "summarize_cv",
     lambda w, t: ["-d", DS, "-tr", "nnUNetTrainer", "-c", "3d_fullres"],
     ["fold 0 summary", "summary_topology.json"]),

]


@pytest.mark.parametrize("case_id,command,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_inputs_untouched(world, tmp_path, case_id, command, build, expected):
    before = _tree_hash(world["inp"])
    args = [str(a) for a in build(world, tmp_path)]
    proc = run_cli([nnunet_cli(f"nnUNetv2_topo_{command}"), *args], world["env"], timeout=300, check=False)
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert last, err[-3000:]
    for s in expected:
        s = s.format(case=world["case"])
        assert s in last[-1], f"{s!r} not in {last[-1]!r}"
    assert _tree_hash(world["inp"]) == before, "an input file changed or a file appeared among the inputs"


def test_table_is_large_enough():
    assert len(CASES) >= 30
