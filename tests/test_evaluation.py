"""Folder evaluator and rule checker: hand-computed values, nnU-Net summary format, bad input."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_topo.evaluation import EvaluationError, compute_topology_metrics_on_folder, evaluate_case, format_table
from nnunet_topo.rule_check import check_rules_on_folder
from nnunet_topo.topology_spec import parse_topology

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
    from nnunet_topo.topology_spec import TopologySpecError
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


def basal_stack(defect_slice):
    """Short-axis stack (axis 0): LV inside a MYO ring on slices 1..5, RV beside it; in ``defect_slice`` the LV
    opens to the background and touches the RV (as the basal slice of some ACDC references does)."""
    lab = np.zeros((7, 9, 12), np.uint8)
    lab[1:6, 1:8, 1:8] = 2
    lab[1:6, 3:6, 3:6] = 3
    lab[1:6, 2:7, 9:11] = 1
    if defect_slice is not None:
        lab[defect_slice, 4, 1:3] = 3   # LV through the ring to the background
        lab[defect_slice, 4, 6:9] = 3   # LV through the ring to the RV
    return lab


def basal_dataset_json(k):
    extra = {"exempt_end_slices": k} if k is not None else {}
    return dict(DJ, topology={"rules": [
        {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "mode": "2d", "axis": 0, **extra},
        {"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 0, **extra}]})


def test_check_rules_exempts_the_basal_slice_only_when_asked(tmp_path):
    labels = tmp_path / "labelsTr"
    labels.mkdir()
    write(labels / "case_0.nii.gz", basal_stack(1))  # first LV slice
    write(labels / "case_1.nii.gz", basal_stack(5))  # last LV slice (the stack may run apex to base)
    names = ["inclusion(LV in LV+MYO) [2d axis 0]", "exclusion(LV,RV) [2d axis 0]"]
    for k in (None, 0):
        report = check_rules_on_folder(str(labels), basal_dataset_json(k), show_progress=False)
        assert not report["clean"]
        for name in names:
            assert report["rules"][name]["cases_violating"] == 2
            assert report["rules"][name]["cases"]["case_0"]["slices"] == [1]
            assert report["rules"][name]["cases"]["case_1"]["slices"] == [5]
    report = check_rules_on_folder(str(labels), basal_dataset_json(1), show_progress=False)
    assert report["clean"] and all(report["rules"][n]["cases_violating"] == 0 for n in names)
    # a defect in a middle slice is still reported with k = 1
    write(labels / "case_2.nii.gz", basal_stack(3))
    report = check_rules_on_folder(str(labels), basal_dataset_json(1), show_progress=False)
    assert not report["clean"]
    for name in names:
        assert list(report["rules"][name]["cases"]) == ["case_2"]
        assert report["rules"][name]["cases"]["case_2"]["slices"] == [3]


def test_evaluate_case_counts_no_violation_in_exempt_end_slices():
    ref = basal_stack(None)  # a clean reference
    names = ["inclusion(LV in LV+MYO) [2d axis 0]", "exclusion(LV,RV) [2d axis 0]"]
    for defect, k, violated in ((1, 0, True), (1, 1, False), (5, 1, False), (3, 1, True)):
        topo = evaluate_case(ref, basal_stack(defect), (2.0, 1.0, 1.0), parse_topology(basal_dataset_json(k)),
                             [1, 2, 3])["topology"]
        assert [topo["violated"][n] for n in names] == [violated, violated], (defect, k)
        assert (topo["TVS"] > 0) == violated
        if violated:
            assert all(topo["SVR_per_rule"][n] == pytest.approx(1 / 5) for n in names)


def ring_and_c_stack():
    """MYO (label 2) on slices 1..5 of 7 along axis 0: a closed ring (1, 1) on slices 1..3, an open "C" (1, 0) on
    slices 4 and 5 (as basal ACDC slices), LV (3) inside the ring everywhere."""
    lab = np.zeros((7, 16, 16), np.uint8)
    yy, xx = np.mgrid[:16, :16]
    r = np.hypot(yy - 7.5, xx - 7.5)
    lab[1:6][:, r <= 6.2] = 2
    lab[1:6][:, r <= 3.8] = 3
    lab[4:6, 7:9, 12:] = 0  # cut the ring on the right: a "C" (LV and background meet there)
    return lab


def test_check_rules_per_slice_prior_with_an_allowed_set(tmp_path):
    from nnunet_topo.rule_check import format_rule_report
    from nnunet_topo.metrics.topology import betti_numbers_per_slice

    lab = ring_and_c_stack()
    assert betti_numbers_per_slice(lab == 2, axis=0).tolist() == [[0, 0]] + [[1, 1]] * 3 + [[1, 0]] * 2 + [[0, 0]]
    labels = tmp_path / "labelsTr"
    labels.mkdir()
    write(labels / "case_0.nii.gz", lab)
    write(labels / "case_1.nii.gz", np.where(np.arange(7)[:, None, None] >= 4, 0, lab).astype(np.uint8))  # rings only

    def check(prior):
        return check_rules_on_folder(str(labels), dict(DJ, topology={"betti_2d": {"axis": 0, "MYO": prior}}),
                                     show_progress=False)
    report = check([[1, 1], [1, 0]])
    e = report["betti_2d"]["MYO"]
    assert e["prior"] == [[1, 1], [1, 0]] and e["cases_differing"] == 0 and report["clean"]
    assert "per-slice Betti prior MYO (1, 1) or (1, 0) (axis 0): differs in 0/2 case(s)" in format_rule_report(report)
    for prior in ([1, 1], [[1, 1]]):  # one vector, also written as a 1-element set: the "C" slices differ
        report = check(prior)
        e = report["betti_2d"]["MYO"]
        assert e["prior"] == [[1, 1]] and e["cases_differing"] == 1 and not report["clean"]
        assert e["cases"] == {"case_0": {"slices": [4, 5], "betti": [[1, 0], [1, 0]]}}
        assert "per-slice Betti prior MYO (1, 1) (axis 0): differs in 1/2 case(s)" in format_rule_report(report)
    e = check([[1, 0], [2, 0]])["betti_2d"]["MYO"]  # the rings differ now, in both cases
    assert e["cases_differing"] == 2 and e["cases"]["case_0"]["slices"] == [1, 2, 3]
    assert e["cases"]["case_1"] == {"slices": [1, 2, 3], "betti": [[1, 1]] * 3}


def test_per_slice_prior_metrics_allowed_sets_hand_counted():
    """betti_prior_error_2d / slices_meeting_prior_2d / topologically_correct_2d against a hand count, with an
    allowed set: MYO ring (1, 1) or open C (1, 0) meet [[1, 1], [1, 0]]; two pieces (2, 0) miss it by 1."""
    lab = np.zeros((4, 12, 12), np.uint8)
    lab[:, 2:9, 2:9] = 2
    lab[:, 4:7, 4:7] = 3                   # slices 0-3: MYO ring around the LV
    pred = lab.copy()
    pred[1, 2:4, 5] = 0                    # slice 1: ring cut once -> open C (1, 0)
    pred[2, 2:4, 5] = 0
    pred[2, 7:9, 5] = 0                    # slice 2: ring cut twice -> two pieces (2, 0)
    pred[2, 4:7, 4:7] = 2                  # ... and no LV hole: MYO of slice 2 is a disc with two notches -> (1, 0)
    dj = dict(DJ, topology={"betti_2d": {"axis": 0, "MYO": [[1, 1], [1, 0]], "LV": [1, 0]}})
    spec = parse_topology(dj)
    from nnunet_topo.metrics.topology import betti_numbers_2d
    got = [tuple(betti_numbers_2d(pred[z] == 2)) for z in range(4)]
    assert got == [(1, 1), (1, 0), (1, 0), (1, 1)]
    pred[3, 2:9, 5] = 0                    # slice 3: MYO and LV split in two -> MYO (2, 0), LV (2, 0)
    assert tuple(betti_numbers_2d(pred[3] == 2)) == (2, 0) and tuple(betti_numbers_2d(pred[3] == 3)) == (2, 0)
    res = evaluate_case(lab, pred, (1, 1, 1), spec, [1, 2, 3])["topology"]
    # MYO slices 0..3: errors 0, 0, 0, 1 ; LV slices 0..3: errors 0, 0, 1 (slice 2: the prediction misses the
    # reference's LV, (0, 0) vs [1, 0]), 1
    assert res["betti_prior_error_2d"] == pytest.approx(3 / 8)
    assert res["slices_meeting_prior_2d"] == pytest.approx(5 / 8)
    assert res["topologically_correct_2d"] is False
    ok = evaluate_case(lab, lab, (1, 1, 1), spec, [1, 2, 3])["topology"]
    assert ok["betti_prior_error_2d"] == 0 and ok["slices_meeting_prior_2d"] == 1 and ok["topologically_correct_2d"]
    single = evaluate_case(lab, pred, (1, 1, 1), parse_topology(dict(DJ, topology={"betti_2d": {"MYO": [1, 1]}})),
                           [1, 2, 3])["topology"]
    assert single["slices_meeting_prior_2d"] == pytest.approx(1 / 4)  # only slice 0 is a ring
    none = evaluate_case(lab, pred, (1, 1, 1), parse_topology(dict(DJ, topology={})), [1, 2, 3])["topology"]
    assert math.isnan(none["topologically_correct_2d"]) and math.isnan(none["slices_meeting_prior_2d"])


def test_reference_exceptions_let_a_few_imperfect_references_pass_and_are_reported(folders):
    """topology.reference_exceptions: the excepted case is listed with its voxels and reason, not counted; a case
    not in the folder and an exception that is not needed are notes; an un-excepted case still fails the check."""
    from nnunet_topo.rule_check import format_rule_report, reference_exceptions_message, reference_violations_message

    def check(exceptions):
        dj = dict(DJ, topology=dict(TOPOLOGY, reference_exceptions=exceptions))
        (folders / "dj.json").write_text(json.dumps(dj))
        return check_rules_on_folder(str(folders / "pred"), str(folders / "dj.json"), show_progress=False)

    before = check([])
    assert "case_0" in reference_violations_message(before) and "reference_exceptions" in \
        reference_violations_message(before)
    report = check([{"cases": ["case_0", "case_7"], "rules": ["exclusion(LV,RV)"], "reason": "septum gap"},
                    {"cases": ["case_0"], "rules": ["inclusion(LV in LV+MYO)"]}, {"cases": ["case_1"]}])
    assert list(report["rules"]["inclusion(LV in LV+MYO)"]["cases_excepted"]) == ["case_0"]
    e = report["rules"]["exclusion(LV,RV)"]
    assert e["cases_violating"] == 0 and e["cases"] == {}
    assert e["cases_excepted"] == {"case_0": {"voxels": 2, "slices": [2], "slice_axis": 0, "reason": "septum gap"}}
    assert report["clean"] and reference_violations_message(report) == ""
    assert "case_0 (2 voxels, slices [2]): septum gap" in reference_exceptions_message(report)
    assert any("'case_7' is not among the 3 reference cases" in n for n in report["notes"])
    assert any("'case_1' satisfies rule(s) exclusion(LV,RV), inclusion(LV in LV+MYO)" in n for n in report["notes"])
    assert "excepted by topology.reference_exceptions: septum gap" in format_rule_report(report)
    other = check([{"cases": ["case_0"], "rules": ["inclusion(LV in LV+MYO)"]}])  # excepted from another rule only
    assert not other["clean"] and other["rules"]["exclusion(LV,RV)"]["cases_violating"] == 1
