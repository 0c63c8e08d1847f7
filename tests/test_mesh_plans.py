"""``nnUNetv2_topo_plan_mesh``: the heart-ROI mesh configuration, through nnU-Net's real planner and CLIs.

A synthetic whole-heart CT-like dataset (each heart in a corner of a larger image, spacing 1 x 2 x 1 mm, so nnU-Net
plans a non-identity ``transpose_forward``), fingerprint and plans by ``nnUNetv2_plan_and_preprocess --no_pp``,
then the new command through its console script and through the function. Nothing of nnU-Net is mocked; the
expected ROI is computed independently with SimpleITK on the raw labels.
"""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_cli, run_cli
from nnunet_topo.mesh_plans import (MeshPlansError, coarsen_spacing, roi_statistics, roi_voxels, write_mesh_plans)
from nnunet_topo.synthetic import write_dataset

DATASET_ID = 984
HEART = (32, 40, 40)
CANVAS = (48, 56, 52)
SPACING = (1.0, 2.0, 1.0)  # a coarse middle axis: transpose_forward [1, 0, 2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh_plans")
    e = {k: str(root / d) for k, d in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"),
                                        ("nnUNet_results", "res"))}
    for p in e.values():
        os.makedirs(p)
    e["nnUNet_def_n_proc"] = "1"
    with pytest.MonkeyPatch.context() as mp:  # in-process calls read the same folders as the subprocesses
        for k, v in e.items():
            mp.setenv(k, v)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def dataset(env):
    """(raw folder, preprocessed folder): fingerprint and plans only, no preprocessing."""
    raw = write_dataset(env["nnUNet_raw"], DATASET_ID, "wholeheart", num_training=5, num_test=0, seed=1,
                        shape=HEART, canvas=CANVAS, spacing=SPACING)
    # fingerprint and plans in one process (= nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment)
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "--no_pp", "-npfp", "1"], env)
    pre = os.path.join(env["nnUNet_preprocessed"], raw.name)
    return raw, pre


@pytest.fixture(scope="module")
def planned(dataset, env):
    """The default run of the console script: (stdout, input plans bytes before, plans dict written)."""
    raw, pre = dataset
    src = os.path.join(pre, "nnUNetPlans.json")
    before = open(src, "rb").read()
    proc = run_cli([nnunet_cli("nnUNetv2_topo_plan_mesh"), "-d", str(DATASET_ID)], env)
    return proc.stdout, before, json.load(open(os.path.join(pre, "nnUNetPlansMesh.json")))


def _expected_extent_mm(label_folder, label_ids, transpose_forward):
    """Per-axis max (transposed order) of the box size in mm of ``label_ids`` over the label files, and per-case."""
    per_case = {}
    for f in sorted(os.listdir(label_folder)):
        img = sitk.ReadImage(os.path.join(label_folder, f))
        a = sitk.GetArrayFromImage(img)  # (z, y, x)
        idx = np.argwhere(np.isin(a, label_ids))
        if len(idx) == 0:
            continue
        ext = (idx.max(0) + 1 - idx.min(0)) * np.asarray(img.GetSpacing()[::-1])
        per_case[f[:-len(".nii.gz")]] = ext[list(transpose_forward)]
    return np.max(list(per_case.values()), axis=0), per_case


def _parent(plans, name="3d_fullres"):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_configuration(name)


# ---------------------------------------------------------------------------------------------------------- units
def _write_label(path, arr, spacing_zyx):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    sitk.WriteImage(img, str(path))


def test_roi_statistics_known_boxes(tmp_path):
    """Boxes placed by hand, a transpose that moves every axis, a case without mesh structures, a non-mesh label."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    dj = {"labels": {"background": 0, "A": 1, "B": 2, "C": 3}, "channel_names": {"0": "CT"}, "numTraining": 3,
          "file_ending": ".nii.gz", "topology": {"mesh_structures": {"AB": ["A", "B"]}}}
    shape, sp = (12, 14, 16), (2.0, 1.0, 0.5)  # (z, y, x)
    boxes = {"c0": ((1, 2, 3), (5, 6, 7)), "c1": ((0, 0, 0), (3, 10, 4)), "c2": None}
    for case, box in boxes.items():
        a = np.zeros(shape, np.uint8)
        a[-1, -1, -1] = 3  # C: not a mesh structure, must not count
        if box is not None:
            (z0, y0, x0), (z1, y1, x1) = box
            a[z0:z1, y0:y1, x0:x1] = 2
            a[z0, y0, x0] = 1
        _write_label(tmp_path / "labelsTr" / f"{case}.nii.gz", a, sp)
        _write_label(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", a, sp)
    tf = [2, 0, 1]
    plans = {"transpose_forward": tf, "transpose_backward": [1, 2, 0], "image_reader_writer": "SimpleITKIO"}
    st = roi_statistics(str(tmp_path), dj, plans, margin_mm=3.0)
    # extents (z, y, x) mm: c0 (8, 4, 2), c1 (6, 10, 2); transposed by [2, 0, 1]: c0 (2, 8, 4), c1 (2, 6, 10)
    assert st.extent_mm_max == (2.0, 8.0, 10.0)
    assert st.size_mm == (8.0, 14.0, 16.0)
    assert st.largest_case == ("c0", "c0", "c1")  # the first case on the tie of axis 0
    assert st.num_cases == 2 and st.cases_without_structures == ("c2",)
    assert st.structures == ("AB",) and st.label_ids == (1, 2)
    assert st.as_json("3d_fullres")["parent_configuration"] == "3d_fullres"

    with pytest.raises(MeshPlansError, match="none of the 3 training cases.*C_only"):
        roi_statistics(str(tmp_path), dict(dj, topology={"mesh_structures": {"C_only": ["A"]}},
                                           labels={"background": 0, "A": 4, "B": 2, "C": 3}), plans)
    with pytest.raises(MeshPlansError, match="no 'topology' block.*mesh_structures"):
        roi_statistics(str(tmp_path), {k: v for k, v in dj.items() if k != "topology"}, plans)
    with pytest.raises(MeshPlansError, match="no 'mesh_structures'.*LV_epi"):
        roi_statistics(str(tmp_path), dict(dj, topology={"connectivity": 6}), plans)


def test_coarsen_spacing_is_nnunets_lowres_rule():
    """Anisotropic fine axes first while max/spacing > 2 (ACDC-like), then all axes by 1.03."""
    np.testing.assert_allclose(coarsen_spacing([7.0, 1.5, 1.5]), [7.0, 1.545, 1.545])
    np.testing.assert_allclose(coarsen_spacing([2.0, 1.0, 1.0]), [2.06, 1.03, 1.03])
    np.testing.assert_array_equal(roi_voxels([30.0, 10.0, 10.5], [1.5, 1.0, 1.0]), [20, 10, 11])


# ---------------------------------------------------------------------------------------------------------- nnU-Net
def test_cli_plans_the_heart_roi(dataset, planned, env):
    """(a) the ROI is the independently computed one; (b) the patch holds it, at the parent's spacing where it fits
    the parent's patch (the patch then shrinks); (d) the input plans are untouched; the configuration resolves."""
    raw, pre = dataset
    stdout, before, plans = planned
    assert open(os.path.join(pre, "nnUNetPlans.json"), "rb").read() == before
    tf = plans["transpose_forward"]
    assert tf != [0, 1, 2]  # the non-identity transpose, planned by nnU-Net itself
    conf = plans["configurations"]["3d_mesh"]
    assert plans["plans_name"] == "nnUNetPlansMesh" and conf["inherits_from"] == "3d_fullres"
    for k in ("data_identifier", "spacing", "patch_size", "batch_size", "median_image_size_in_voxels",
              "architecture", "mesh_roi"):
        assert k in conf, k
    assert conf["data_identifier"] == "nnUNetPlansMesh_3d_mesh"
    src = json.loads(before)
    assert {k: v for k, v in plans["configurations"].items() if k != "3d_mesh"} == src["configurations"]

    # (a) ROI == SimpleITK bbox of the union of all mesh structures (here every foreground label), transposed
    dj = json.load(open(raw / "dataset.json"))
    ids = sorted({dj["labels"][n] for names in dj["topology"]["mesh_structures"].values() for n in names})
    ext, per_case = _expected_extent_mm(raw / "labelsTr", ids, tf)
    r = conf["mesh_roi"]
    np.testing.assert_allclose(r["extent_mm_max"], ext, rtol=1e-6)
    np.testing.assert_allclose(r["size_mm"], ext + 2 * 10.0, rtol=1e-6)
    assert r["margin_mm"] == 10.0 and r["num_cases"] == 5 and r["cases_without_structures"] == []
    assert r["largest_case"] == [max(per_case, key=lambda c: (per_case[c][k], -sorted(per_case).index(c)))
                                 for k in range(3)]
    assert r["parent_configuration"] == "3d_fullres" and r["structures"] == list(dj["topology"]["mesh_structures"])

    # (b) the patch holds the ROI; never finer than the parent; here the ROI fits the parent's patch, so the
    # parent's spacing is kept and the patch shrinks to the ROI rounded up to the stride
    cm, parent = _parent(plans, "3d_mesh"), _parent(plans)
    assert cm.patch_size == conf["patch_size"] and cm.spacing == conf["spacing"]
    n = roi_voxels(r["size_mm"], cm.spacing)
    assert np.all(np.asarray(cm.patch_size) >= n)
    assert np.all(roi_voxels(r["size_mm"], parent.spacing) <= np.asarray(parent.patch_size))
    assert cm.spacing == parent.spacing
    assert np.all(np.asarray(cm.patch_size) <= np.asarray(parent.patch_size))
    assert np.prod(cm.patch_size) < np.prod(parent.patch_size)
    assert conf["median_image_size_in_voxels"] == n.tolist()
    assert all(isinstance(v, int) for v in conf["patch_size"] + [conf["batch_size"]])
    assert all(isinstance(v, float) for v in conf["spacing"])

    assert f"nnUNetv2_preprocess -d {DATASET_ID} -plans_name nnUNetPlansMesh -c 3d_mesh" in stdout
    assert f"nnUNetv2_train {DATASET_ID} 3d_mesh FOLD -tr nnUNetTrainerTPM -p nnUNetPlansMesh" in stdout
    assert str(conf["patch_size"]) in stdout


def test_restricted_mesh_structures_roi(dataset, planned):
    """(a) once more with a subset of the labels as mesh structures: the ROI is their box only."""
    raw, pre = dataset
    plans = planned[2]
    dj = json.load(open(raw / "dataset.json"))
    dj["topology"]["mesh_structures"] = {"LV_epi": ["LV", "MYO"]}
    dj["topology"].pop("mesh_rules", None)  # they name the other mesh structures
    st = roi_statistics(str(raw), dj, plans, margin_mm=4.0)
    ext, _ = _expected_extent_mm(raw / "labelsTr", [dj["labels"]["LV"], dj["labels"]["MYO"]],
                                 plans["transpose_forward"])
    np.testing.assert_allclose(st.extent_mm_max, ext, rtol=1e-6)
    np.testing.assert_allclose(st.size_mm, ext + 8.0, rtol=1e-6)
    assert np.all(ext <= np.asarray(planned[2]["configurations"]["3d_mesh"]["mesh_roi"]["extent_mm_max"]))


def test_patch_limit_forces_a_coarser_spacing(dataset, planned):
    """(c) a small --patch: the finest coarser spacing (nnU-Net's lowres steps) whose ROI fits; the patch holds
    the ROI and stays within the limit."""
    raw, pre = dataset
    cap = [16, 24, 24]
    path = write_mesh_plans(str(DATASET_ID), output_identifier="nnUNetPlansMeshSmall", patch=cap)
    plans = json.load(open(path))
    cm, parent = _parent(plans, "3d_mesh"), _parent(plans)
    size = plans["configurations"]["3d_mesh"]["mesh_roi"]["size_mm"]
    sp, ps = np.asarray(cm.spacing), np.asarray(cm.patch_size)
    assert np.all(sp >= np.asarray(parent.spacing)) and np.any(sp > np.asarray(parent.spacing))
    assert np.all(ps >= roi_voxels(size, sp)) and np.all(ps <= cap)
    # the spacing is on nnU-Net's coarsening path, and the step before it does not fit the limit
    chain = [np.asarray(parent.spacing, float)]
    while not np.allclose(chain[-1], sp):
        chain.append(coarsen_spacing(chain[-1]))
        assert len(chain) < 200
    assert np.any(roi_voxels(size, chain[-2]) > cap)


def test_gpu_memory_target_forces_a_coarser_spacing(dataset, planned):
    """(c) a small GPU memory target: nnU-Net's planner shrinks the patch, so a coarser spacing is needed."""
    path = write_mesh_plans(str(DATASET_ID), output_identifier="nnUNetPlansMeshLowMem", gpu_memory_target=0.1)
    plans = json.load(open(path))
    cm, parent = _parent(plans, "3d_mesh"), _parent(plans)
    size = plans["configurations"]["3d_mesh"]["mesh_roi"]["size_mm"]
    assert np.all(np.asarray(cm.spacing) >= parent.spacing) and np.any(np.asarray(cm.spacing) > parent.spacing)
    assert np.all(np.asarray(cm.patch_size) >= roi_voxels(size, cm.spacing))


def test_impossible_patch_is_refused(dataset, planned, env):
    """(c) --patch 4 4 4 cannot hold the ROI within 8x the parent spacing: exit 2, the message names the sizes."""
    raw, pre = dataset
    proc = run_cli([nnunet_cli("nnUNetv2_topo_plan_mesh"), "-d", str(DATASET_ID), "-o", "nnUNetPlansMeshTiny",
                    "--patch", "4", "4", "4"], env, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    size = [round(v, 3) for v in planned[2]["configurations"]["3d_mesh"]["mesh_roi"]["size_mm"]]
    parent = [round(v, 3) for v in _parent(planned[2]).spacing]
    last = proc.stderr.strip().splitlines()[-1]  # (the progress bar over the cases is on stderr too)
    assert last.startswith("error: the heart ROI of ")
    assert str(size) in last and str(parent) in last and "[4, 4, 4]" in last and "8x" in last
    assert not os.path.exists(os.path.join(pre, "nnUNetPlansMeshTiny.json"))


def test_existing_output_and_same_identifier_are_refused(dataset, planned):
    """(d) an existing output needs overwrite; -o equal to -p is refused; the input plans stay byte-identical."""
    raw, pre = dataset
    out = os.path.join(pre, "nnUNetPlansMesh.json")
    mtime = os.stat(out).st_mtime_ns
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):  # an OutputPathError (ValueError) too
        write_mesh_plans(str(DATASET_ID))
    assert os.stat(out).st_mtime_ns == mtime
    with pytest.raises(ValueError, match="must differ"):
        write_mesh_plans(str(DATASET_ID), output_identifier="nnUNetPlans")
    with pytest.raises(ValueError, match="already exists.*--name"):
        write_mesh_plans(str(DATASET_ID), output_identifier="nnUNetPlansX", name="3d_fullres")
    assert write_mesh_plans(str(DATASET_ID), overwrite=True) == out
    assert json.load(open(out)) == planned[2]  # deterministic
    assert open(os.path.join(pre, "nnUNetPlans.json"), "rb").read() == planned[1]


def test_no_mesh_structures_is_a_clear_error(dataset, env, tmp_path):
    """(f) a copy of the dataset whose dataset.json has no mesh_structures, then no topology block at all."""
    raw, pre = dataset
    other = 983
    raw2 = os.path.join(env["nnUNet_raw"], f"Dataset{other}_NoMesh")
    pre2 = os.path.join(env["nnUNet_preprocessed"], f"Dataset{other}_NoMesh")
    shutil.copytree(raw, raw2)
    os.makedirs(pre2)
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    plans["dataset_name"] = f"Dataset{other}_NoMesh"
    json.dump(plans, open(os.path.join(pre2, "nnUNetPlans.json"), "w"))
    shutil.copy(os.path.join(pre, "dataset_fingerprint.json"), pre2)
    dj = json.load(open(os.path.join(raw2, "dataset.json")))
    del dj["topology"]["mesh_structures"]
    dj["topology"].pop("mesh_rules", None)  # they need mesh structures (an error of their own)
    json.dump(dj, open(os.path.join(raw2, "dataset.json"), "w"))
    with pytest.raises(MeshPlansError, match="no 'mesh_structures'.*add"):
        write_mesh_plans(str(other))
    del dj["topology"]
    json.dump(dj, open(os.path.join(raw2, "dataset.json"), "w"))
    with pytest.raises(MeshPlansError, match="no 'topology' block.*add one with 'mesh_structures'"):
        write_mesh_plans(str(other))
    assert sorted(os.listdir(pre2)) == ["dataset_fingerprint.json", "nnUNetPlans.json"]


def test_preprocess_the_mesh_configuration(dataset, planned, env):
    """(e) nnU-Net preprocesses the mesh configuration into its own folder, at the mesh spacing."""
    raw, pre = dataset
    conf = planned[2]["configurations"]["3d_mesh"]
    run_cli([nnunet_cli("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-plans_name", "nnUNetPlansMesh", "-c",
             "3d_mesh", "-np", "1"], env)
    folder = os.path.join(pre, conf["data_identifier"])
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    cls = infer_dataset_class(folder)
    ids = sorted(cls.get_identifiers(folder))
    assert len(ids) == 5
    ds = cls(folder, ids)
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    from nnunet_topo.roi import box_fits, structure_box

    tf = planned[2]["transpose_forward"]
    for i in ids:  # resampled to the mesh spacing; every case's mesh structures fit the planned patch
        data, seg, _, props = ds.load_case(i)
        assert data.shape[0] == 1 and seg.shape[1:] == data.shape[1:]
        expected = compute_new_shape(props["shape_after_cropping_and_before_resampling"],
                                     [props["spacing"][k] for k in tf], conf["spacing"])
        assert list(data.shape[1:]) == list(expected)
        box = structure_box(np.asarray(seg), [1, 2, 3, 4, 5, 6])
        assert box is not None and box_fits(box, conf["patch_size"]), (i, box, conf["patch_size"])
