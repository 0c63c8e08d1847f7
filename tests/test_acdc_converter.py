"""examples/acdc/convert_acdc_h5.py on tiny h5 files written here (the real ACDC data is not in a fresh clone)."""
import importlib.util
import json
import os
import subprocess
import sys

import h5py  # the test extra (setup.cfg); the converter needs it
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_topo.rule_check import check_rules_on_folder
from nnunet_topo.topology_spec import parse_topology
from nnunet_topo.synthetic import make_phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "acdc", "convert_acdc_h5.py")


def _module():
    spec = importlib.util.spec_from_file_location("convert_acdc_h5", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


conv = _module()


def _phantom_label(seed: int) -> np.ndarray:
    ph = make_phantom("acdc", seed)
    assert ph.labels == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}  # ACDC's ids
    return ph.label


def _write_h5(folder, name, label, image=None):
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, name), "w") as f:
        f["image"] = (np.random.default_rng(0).random(label.shape).astype(np.float32)
                      if image is None else image)
        f["label"] = label
        f["scribble"] = np.zeros_like(label)


def _lv_slices(label):
    return np.where((label == 3).any((1, 2)))[0]


def _open_ring(label, z):
    """Let the LV touch the background in slice z: replace the MYO voxels next to one LV voxel by LV."""
    out = label.copy()
    zz = out[z]
    lv = np.argwhere(zz == 3)
    y, x = lv[np.argmax(lv[:, 1])]  # the LV voxel with the largest x
    xe = x
    while xe + 1 < zz.shape[1] and zz[y, xe + 1] == 2:
        xe += 1
        zz[y, xe] = 3
    assert xe > x and zz[y, xe + 1] == 0, "phantom: expected MYO then background to the right of the LV"
    return out


@pytest.fixture()
def h5_folder(tmp_path):
    src = tmp_path / "h5"
    for p in (1, 2, 3, 4, 5):
        for fr, seed in ((1, 10 * p), (12, 10 * p + 1)):
            _write_h5(src, f"patient{p:03d}_frame{fr:02d}.h5", _phantom_label(seed))
    return src


def test_convert_writes_nnunet_dataset_with_spacing_split_and_topology(h5_folder, tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    out = conv.convert(str(h5_folder), str(raw), 127, spacing=(10.0, 1.5, 1.25), preprocessed=str(pre))
    assert os.path.basename(out) == "Dataset127_ACDCh5"
    ds = json.load(open(os.path.join(out, "dataset.json")))
    assert ds["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3} and ds["numTraining"] == 10
    assert ds["spacing_assumed_mm"] == [10.0, 1.5, 1.25] and "10 x 1.5 x 1.25 mm" in ds["description"]
    spec = parse_topology(ds)  # the block is valid for the project's parser
    assert {r.name for r in spec.rules} == {"exclusion(LV,RV) [2d axis 0]", "inclusion(LV in LV_epi) [2d axis 0]"}
    assert all(r.exempt_end_slices == 1 for r in spec.rules)
    assert set(spec.mesh_structures) == {"LV_endo", "LV_epi", "RV"}
    # images and labels: same arrays, spacing written in ITK order (x, y, z)
    with h5py.File(h5_folder / "patient002_frame12.h5") as f:
        lab, img = f["label"][()], f["image"][()]
    li = sitk.ReadImage(os.path.join(out, "labelsTr", "patient002_frame12.nii.gz"))
    ii = sitk.ReadImage(os.path.join(out, "imagesTr", "patient002_frame12_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(li), lab)
    np.testing.assert_allclose(sitk.GetArrayFromImage(ii), img)
    assert li.GetSpacing() == pytest.approx((1.25, 1.5, 10.0)) and ii.GetSpacing() == li.GetSpacing()
    # nnU-Net's ACDC split: 5 folds, by patient (both frames of a patient in one fold), every case validated once
    split = json.load(open(pre / "Dataset127_ACDCh5" / "splits_final.json"))
    assert len(split) == 5
    val = [c for s in split for c in s["val"]]
    assert sorted(val) == sorted(f[:-3] for f in os.listdir(h5_folder))
    for s in split:
        pats = {c[:10] for c in s["val"]}
        assert not pats & {c[:10] for c in s["train"]}
    # an existing split is kept
    (pre / "Dataset127_ACDCh5" / "splits_final.json").write_text("[]")
    conv.convert(str(h5_folder), str(raw), 127, preprocessed=str(pre), overwrite=True)
    assert (pre / "Dataset127_ACDCh5" / "splits_final.json").read_text() == "[]"


def test_topology_block_holds_and_basal_slice_exemption(h5_folder, tmp_path):
    """The block holds on clean references; an LV opening in its first slice (ACDC's basal slices) passes thanks to
    exempt_end_slices, the same opening in a middle slice is reported."""
    out = conv.convert(str(h5_folder), str(tmp_path / "raw"), 127)
    labels, dsj = os.path.join(out, "labelsTr"), os.path.join(out, "dataset.json")
    report = check_rules_on_folder(labels, dsj)
    assert report["clean"], report
    path = os.path.join(labels, "patient003_frame01.nii.gz")
    img = sitk.ReadImage(path)
    lab = sitk.GetArrayFromImage(img)
    zs = _lv_slices(lab)
    assert len(zs) >= 4

    def write(arr):
        o = sitk.GetImageFromArray(arr)
        o.CopyInformation(img)
        sitk.WriteImage(o, path)

    write(_open_ring(lab, int(zs[0])))
    report = check_rules_on_folder(labels, dsj)
    assert report["rules"]["inclusion(LV in LV_epi) [2d axis 0]"]["cases_violating"] == 0
    write(_open_ring(lab, int(zs[len(zs) // 2])))
    report = check_rules_on_folder(labels, dsj)
    assert not report["clean"]
    assert report["rules"]["inclusion(LV in LV_epi) [2d axis 0]"]["cases_violating"] == 1


def test_myo_open_c_slice_meets_allowed_set(h5_folder, tmp_path):
    """A basal MYO slice that is an open C ([1, 0]) meets the MYO prior [[1, 1], [1, 0], [2, 0]]."""
    out = conv.convert(str(h5_folder), str(tmp_path / "raw"), 127)
    path = os.path.join(out, "labelsTr", "patient001_frame01.nii.gz")
    img = sitk.ReadImage(path)
    lab = sitk.GetArrayFromImage(img)
    z = int(_lv_slices(lab)[0])
    sl = lab[z]
    cy = int(round(np.where(sl == 3)[0].mean()))
    # cut the ring on the row through the LV centre, right of the LV: MYO -> background there (the LV then meets
    # the background in its first slice, which the 2D rules exempt)
    row = sl[cy]
    xr = [x for x in range(sl.shape[1]) if row[x] == 2 and x > np.where(sl == 3)[1].mean()]
    sl[cy, xr] = 0
    lab[z] = sl
    o = sitk.GetImageFromArray(lab)
    o.CopyInformation(img)
    sitk.WriteImage(o, path)
    from nnunet_topo.metrics.topology import betti_numbers_2d
    assert tuple(betti_numbers_2d(lab[z] == 2)) == (1, 0)
    report = check_rules_on_folder(os.path.join(out, "labelsTr"), os.path.join(out, "dataset.json"))
    assert report["betti_2d"]["MYO"]["cases_differing"] == 0
    ds = json.load(open(os.path.join(out, "dataset.json")))
    ds["topology"]["betti_2d"]["MYO"] = [1, 1]
    json.dump(ds, open(os.path.join(out, "dataset.json"), "w"))
    report = check_rules_on_folder(os.path.join(out, "labelsTr"), os.path.join(out, "dataset.json"))
    assert report["betti_2d"]["MYO"]["cases_differing"] == 1


def test_converter_errors_and_never_overwrites(h5_folder, tmp_path):
    raw = tmp_path / "raw"
    (raw / "Dataset127_ACDCh5").mkdir(parents=True)
    (raw / "Dataset127_ACDCh5" / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match="not written by this converter"):
        conv.convert(str(h5_folder), str(raw), 127)
    assert (raw / "Dataset127_ACDCh5" / "mine.txt").read_text() == "user data"
    out = conv.convert(str(h5_folder), str(raw), 128, num_cases=2)
    assert len(os.listdir(os.path.join(out, "labelsTr"))) == 2
    with pytest.raises(SystemExit, match="--overwrite"):
        conv.convert(str(h5_folder), str(raw), 128)
    with pytest.raises(SystemExit, match="spacing"):
        conv.convert(str(h5_folder), str(raw), 129, spacing=(10, 0, 1.5))
    with pytest.raises(SystemExit, match="no patientNNN"):
        conv.convert(str(tmp_path), str(raw), 130)
    bad = tmp_path / "bad"
    _write_h5(bad, "patient001_frame01.h5", np.full((4, 8, 8), 5, np.uint8))
    with pytest.raises(ValueError, match="label values"):
        conv.convert(str(bad), str(raw), 131)
    _write_h5(bad, "patient001_frame01.h5", np.zeros((4, 8, 8), np.uint8), image=np.zeros((4, 8, 9), np.float32))
    with pytest.raises(ValueError, match="same 3D shape"):
        conv.convert(str(bad), str(raw), 132)
    _write_h5(bad, "patient001_frame01.h5", np.zeros((4, 8, 8), np.uint8),
              image=np.full((4, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        conv.convert(str(bad), str(raw), 133)


def test_converter_command_line(h5_folder, tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"))
    r = subprocess.run([sys.executable, SCRIPT, "-i", str(h5_folder), "-d", "127", "--num_cases", "4"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 4 cases" in r.stdout and "assumed spacing 10 x 1.5 x 1.5 mm" in r.stdout
    assert (tmp_path / "pre" / "Dataset127_ACDCh5" / "splits_final.json").exists()
