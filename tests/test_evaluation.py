"""Folder evaluator and rule checker: hand-computed values, nnU-Net summary format, bad input."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_topo.evaluation import (EvaluationError, check_rules_on_folder, compute_topology_metrics_on_folder,
                                    evaluate_case, format_table)
from nnunet_topo.rules import parse_topology

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
TOPOLOGY = {"rules": [{"type": "exclusion", "a": "LV", "b": "RV"},
                      {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"]}],
            "betti": {"LV": [1, 0, 0]}}
DJ = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "numTraining": 1,
      "topology": TOPOLOGY}


def heart(shape=(6, 12, 16)):
    """LV cube inside a MYO shell, RV cube beside it separated by the MYO wall."""
    lab = np.zeros(shape, np.uint8)
    lab[1:5, 2:10, 2:10] = 2      # MYO block
    lab[2:4, 4:8, 4:8] = 3        # LV inside (2 x 4 x 4 = 32 voxels)
    lab[1:5, 2:10, 10:14] = 1     # RV beside the MYO block, touches MYO only
    return lab


def write(path, arr, spacing=(2.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(img, str(path))


def test_evaluate_case_hand_computed_septal_hole():
    spec = parse_topology(DJ)
    ref = heart()
    pred = ref.copy()
    # open the LV through the wall to the RV: LV voxels at x = 8, 9 (wall) in one row -> LV touches RV at x = 10
    pred[2, 5, 8:10] = 3
    res = evaluate_case(ref, pred, (2.0, 1.0, 1.0), spec, [1, 2, 3])
    topo = res["topology"]
    # exclusion(LV,RV), 6-connected: LV voxel (2,5,9) touches RV (2,5,10) and vice versa -> 2 voxels
    assert topo["violating_voxels"]["exclusion(LV,RV)"] == 2
    # inclusion(LV in LV+MYO): LV voxel (2,5,9) touches RV (not allowed) + the RV voxel it touches -> 2 voxels
    assert topo["violating_voxels"]["inclusion(LV in LV+MYO)"] == 2
    ref_fg = int(np.count_nonzero(ref))
    assert topo["TVS"] == pytest.approx(4 / ref_fg)
    assert topo["TVS_per_rule"]["exclusion(LV,RV)"] == pytest.approx(2 / ref_fg)
    assert topo["violated"] == {"exclusion(LV,RV)": True, "inclusion(LV in LV+MYO)": True}
    # one of the 6 slices along axis 0 violated, 4 slices hold foreground
    assert topo["SVR_per_rule"]["exclusion(LV,RV)"] == pytest.approx(1 / 4)
    assert res["metrics"]["3"]["betti_3d_pred"] == [1, 0, 0]
    tp = int(((ref == 2) & (pred == 2)).sum())
    assert res["metrics"]["2"]["Dice"] == pytest.approx(2 * tp / ((ref == 2).sum() + (pred == 2).sum()))


def test_evaluate_case_perfect_and_empty_prediction():
    spec = parse_topology(DJ)
    ref = heart()
    perfect = evaluate_case(ref, ref, (1, 1, 1), spec, [1, 2, 3])
    assert perfect["topology"]["TVS"] == 0 and perfect["topology"]["topologically_correct"]
    assert all(m["Dice"] == 1.0 and m["betti_error_3d"] == 0 for m in perfect["metrics"].values())
    empty = evaluate_case(ref, np.zeros_like(ref), (1, 1, 1), spec, [1, 2, 3])
    assert empty["metrics"]["3"]["Dice"] == 0.0
    # a missed structure gets the documented worst-case HD95, the image diagonal (not NaN, which a mean would drop)
    assert empty["metrics"]["3"]["HD95"] == pytest.approx(float(np.sqrt(sum(n * n for n in ref.shape))))
    assert empty["metrics"]["3"]["betti_error_3d"] == 1
    # rules that hold only because a structure is missing get their worst case, not TVS 0
    assert empty["topology"]["worst_case"]["rules"] == list(spec.rule_names)
    assert empty["topology"]["TVS"] >= 0.5 and all(empty["topology"]["violated"].values())
    assert "prediction is empty" in " ".join(empty["topology"]["warnings"])
    # empty reference: TVS undefined, not a crash
    both = evaluate_case(np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1), spec, [1, 2, 3])
    assert math.isnan(both["topology"]["TVS"]) and math.isnan(both["metrics"]["1"]["Dice"])


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for i in range(3):
        lab = heart()
        write(ref / f"case_{i}.nii.gz", lab)
        p = lab.copy()
        if i == 0:
            p[2, 5, 8:10] = 3
        write(pred / f"case_{i}.nii.gz", p)
    (tmp_path / "dataset.json").write_text(json.dumps(DJ))
    return tmp_path


def test_folder_summary_format(folders):
    s = compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), str(folders / "dataset.json"),
                                           {}, show_progress=False)
    on_disk = json.loads((folders / "pred" / "summary_topology.json").read_text())
    assert set(on_disk) >= {"metric_per_case", "mean", "foreground_mean", "topology_mean"}
    assert len(on_disk["metric_per_case"]) == 3
    assert set(on_disk["mean"]) == {"1", "2", "3"}
    t = s["topology_mean"]
    assert t["VR"] == pytest.approx(1 / 3) and t["VR_per_rule"]["exclusion(LV,RV)"] == pytest.approx(1 / 3)
    # case 0: the tunnel through the wall opens the MYO's enclosed cavity: MYO Betti (1,0,1) -> (1,0,0)
    assert t["topologically_correct"] == pytest.approx(2 / 3)
    assert s["metric_per_case"][0]["metrics"]["2"]["betti_3d_pred"] == [1, 0, 0]
    assert s["metric_per_case"][0]["metrics"]["2"]["betti_3d_ref"] == [1, 0, 1]
    assert "TVS" in format_table(s)
    assert not (folders / "pred" / "summary.json").exists()


def test_folder_errors(folders, tmp_path):
    dj = str(folders / "dataset.json")
    with pytest.raises(EvaluationError, match="prediction folder not found"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(tmp_path / "nope"), dj, {})
    (folders / "pred" / "case_2.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="have no prediction"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), dj, {}, show_progress=False)
    s = compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), dj, {}, chill=True,
                                           show_progress=False)
    assert s["topology_mean"]["num_cases"] == 2
    write(folders / "pred" / "extra.nii.gz", heart())
    with pytest.raises(EvaluationError, match="have no reference"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), dj, {}, chill=True)
    (folders / "pred" / "extra.nii.gz").unlink()
    write(folders / "pred" / "case_1.nii.gz", heart((6, 12, 17)))
    with pytest.raises(EvaluationError, match="shape mismatch"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), dj, {}, chill=True,
                                           show_progress=False)
    write(folders / "pred" / "case_1.nii.gz", heart(), spacing=(2.0, 1.0, 1.5))
    with pytest.raises(EvaluationError, match="spacing mismatch"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), dj, {}, chill=True,
                                           show_progress=False)
    with pytest.raises(EvaluationError, match="dataset.json not found"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), str(tmp_path / "x.json"), {})


def test_nan_label_map_rejected():
    spec = parse_topology(DJ)
    pred = heart().astype(np.float32)
    pred[0, 0, 0] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate_case(heart(), pred, (1, 1, 1), spec, [1, 2, 3])


def test_unknown_label_in_rules_is_a_clear_error(folders):
    dj = dict(DJ, topology={"rules": [{"type": "exclusion", "a": "LV", "b": "RA"}]})
    (folders / "dataset.json").write_text(json.dumps(dj))
    from nnunet_topo.rules import TopologySpecError
    with pytest.raises(TopologySpecError, match="RA"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"), str(folders / "dataset.json"), {})


def test_check_rules_reports_case_voxels_and_slices(folders):
    report = check_rules_on_folder(str(folders / "pred"), str(folders / "dataset.json"), show_progress=False)
    assert not report["clean"]
    e = report["rules"]["exclusion(LV,RV)"]
    assert e["cases_violating"] == 1
    assert e["cases"]["case_0"] == {"voxels": 2, "slices": [2], "slice_axis": 0}
    clean = check_rules_on_folder(str(folders / "ref"), str(folders / "dataset.json"), show_progress=False)
    assert clean["clean"]
