"""No silent wrong numbers: sparse (ignore-label) references, empty predictions, undefined means, per-slice priors,
geometry and ambiguous rule names. Each test here failed on the code before these cases were handled."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_topo.evaluation import (
    EvaluationError,
    aggregate,
    compute_topology_metrics_on_folder,
    evaluate_case,
    format_table,
    image_diagonal_mm,
)
from nnunet_topo.rule_check import check_rules_on_folder, format_rule_report
from nnunet_topo.topology_spec import parse_topology

IGNORE = 4
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "ignore": IGNORE}
TOPOLOGY = {"rules": [{"type": "exclusion", "a": "LV", "b": "RV"},
                      {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "mode": "2d", "axis": 0}],
            "betti": {"LV": [1, 0, 0], "MYO": [1, 1, 0], "RV": [1, 0, 0]},
            "betti_2d": {"axis": 0, "MYO": [1, 1]}}
DJ = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "numTraining": 2,
      "topology": TOPOLOGY}
SPEC = parse_topology(DJ)
IDS = [1, 2, 3]
SPACING = (2.0, 1.0, 1.0)


def heart(shape=(8, 20, 24)):
    """Short-axis stack: in slices 1..6 an LV disk in a MYO ring, an RV block beside it (gap of background)."""
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    r2 = (yy - 10) ** 2 + (xx - 9) ** 2
    inside = (zz >= 1) & (zz <= 6)
    lab[inside & (r2 <= 36)] = 2
    lab[inside & (r2 <= 9)] = 3
    lab[1:7, 6:14, 17:22] = 1
    return lab


def sparse(ref):
    """Every other slice ignored (slices 1, 3, 5, 7): nnU-Net's sparse annotation."""
    s = ref.copy()
    s[1::2] = IGNORE
    return s


def write(path, arr, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(spacing)))
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def labels_folder(tmp_path, cases, topology=TOPOLOGY, labels=LABELS):
    folder = tmp_path / "labelsTr"
    folder.mkdir(parents=True)
    for name, arr in cases.items():
        write(folder / f"{name}.nii.gz", arr)
    dj = dict(DJ, topology=topology, labels=labels)
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    return str(folder), str(tmp_path / "dataset.json")


# ------------------------------------------------------------------------------------------- sparse references
def test_perfect_dense_prediction_of_a_sparse_reference_has_no_error():
    ref = heart()
    r = evaluate_case(sparse(ref), ref, SPACING, SPEC, IDS, ignore_label=IGNORE)
    for lab, m in r["metrics"].items():
        assert m["Dice"] == 1.0, lab
        assert m["HD95"] == 0.0, lab  # before: every annotated voxel next to an ignored slice was "surface"
        assert m["betti_error_2d"] == 0.0 and m["cce_2d"] == 0.0, lab
        # 3D topology of a sparse reference is unknown: undefined, not an error of the prediction
        assert math.isnan(m["betti_error_3d"]) and math.isnan(m["cce_3d"]) and m["betti_3d_ref"] is None
    t = r["topology"]
    assert t["TVS"] == 0.0 and not any(t["violated"].values())
    assert math.isnan(t["topologically_correct"]) and math.isnan(t["betti_error_3d"])
    assert t["betti_prior_error_3d"] == 0  # the prior needs no reference: defined on the dense prediction
    assert t["sparse_reference"] and any("sparse reference" in w for w in t["warnings"])


def test_tvs_normaliser_is_not_shrunk_by_the_ignore_label():
    ref = heart()
    pred = ref.copy()
    pred[3, 10, 10:17] = 3  # an LV tongue through the wall to the RV, in a slice the sparse reference ignores
    dense = evaluate_case(ref, pred, SPACING, SPEC, IDS)["topology"]["TVS"]
    sp = evaluate_case(sparse(ref), pred, SPACING, SPEC, IDS, ignore_label=IGNORE)["topology"]["TVS"]
    assert dense > 0
    assert sp == pytest.approx(dense, rel=0.05)  # before: about 2x (divided by the annotated half only)


def test_rule_check_of_a_sparse_but_valid_reference_finds_no_violation(tmp_path):
    ref = heart()
    partial = ref.copy()
    half = partial[2]
    half[(half == 2) & (np.arange(half.shape[1])[None, :] < 9)] = IGNORE  # half of a slice's MYO ring unannotated
    folder, dj = labels_folder(tmp_path, {"case_0": sparse(ref), "case_1": ref, "case_2": partial})
    report = check_rules_on_folder(folder, dj, show_progress=False)
    # before: LV voxels next to an ignored slice "touched the outside" of LV+MYO
    assert all(e["cases_violating"] == 0 for e in report["rules"].values()), report["rules"]
    assert report["betti"]["LV"]["cases_undefined"] == ["case_0", "case_2"]
    assert report["betti_2d"]["MYO"]["cases_differing"] == 0
    assert report["clean"]
    # a real violation in an annotated slice is still found
    bad = sparse(ref)
    bad[2, 10, 12:17] = 3  # LV tongue through MYO and the gap to the RV, annotated slice 2
    folder2, dj2 = labels_folder(tmp_path / "b", {"case_0": bad})
    report = check_rules_on_folder(folder2, dj2, show_progress=False)
    assert report["rules"]["exclusion(LV,RV)"]["cases"]["case_0"]["slices"] == [2]
    assert report["rules"]["inclusion(LV in LV+MYO) [2d axis 0]"]["cases_violating"] == 1


# ------------------------------------------------------------------------------------------- empty predictions
HIGHER_IS_BETTER = {"Dice", "IoU", "topologically_correct", "topologically_correct_2d", "slices_meeting_prior_2d"}
COUNTS = {"TP", "FP", "FN", "TN", "n_pred", "n_ref"}


def defective(ref, seed):
    pred = ref.copy()
    if seed == 0:
        pred[3, 10, 10:17] = 3            # LV-RV contact (TVS, VR, SVR)
        pred[2, 16:18, 2:4] = 1           # a spurious RV blob (Betti / CCE error)
    else:
        pred[4, 10, 3:6] = 0              # a gap in the MYO ring of one slice (per-slice Betti error)
        pred[5][pred[5] == 1] = 0         # RV missing in one slice
    return pred


def means(cases):
    s = aggregate(cases, SPEC, IDS)
    flat = {}
    for lab, m in s["mean"].items():
        flat.update({(lab, k): v for k, v in m.items() if k not in COUNTS})
    for k, v in s["topology_mean"].items():
        if isinstance(v, dict):
            flat.update({("topology", k, r): x for r, x in v.items()})
        elif k != "num_cases":
            flat[("topology", k)] = v
    return flat


@pytest.mark.parametrize("emptied", [0, 1])
def test_emptying_a_prediction_never_improves_any_mean(emptied):
    refs = [heart(), np.roll(heart(), 1, axis=2)]
    preds = [defective(r, i) for i, r in enumerate(refs)]
    before = means([evaluate_case(r, p, SPACING, SPEC, IDS) for r, p in zip(refs, preds)])
    preds[emptied] = np.zeros_like(preds[emptied])
    after = means([evaluate_case(r, p, SPACING, SPEC, IDS) for r, p in zip(refs, preds)])
    assert set(before) == set(after)
    checked = 0
    for key, b in before.items():
        a = after[key]
        assert not math.isnan(a), f"{key}: the emptied case made the mean undefined"
        name = key[1]
        if name in HIGHER_IS_BETTER:
            assert a <= b + 1e-12, f"{key}: {b} -> {a} improved"
        else:
            assert a >= b - 1e-12, f"{key}: {b} -> {a} improved"
        checked += 1
    assert checked >= 25
    # and a missed structure's HD95 is the documented worst case
    r = evaluate_case(refs[0], np.zeros_like(refs[0]), SPACING, SPEC, IDS)
    assert r["metrics"]["1"]["HD95"] == pytest.approx(image_diagonal_mm(refs[0].shape, SPACING))
    assert r["topology"]["worst_case"]["HD95"] == ["1", "2", "3"]


def test_means_say_over_how_many_cases_and_the_table_flags_short_means():
    ref = heart()
    no_rv = ref.copy()
    no_rv[no_rv == 1] = 0
    cases = [evaluate_case(ref, ref, SPACING, SPEC, IDS), evaluate_case(no_rv, no_rv, SPACING, SPEC, IDS)]
    s = aggregate(cases, SPEC, IDS)
    s.update(label_names={"1": "RV", "2": "MYO", "3": "LV"})
    assert s["mean_num_cases"]["1"]["HD95"] == 1  # both empty in case 1: undefined there
    assert s["mean_num_cases"]["2"]["HD95"] == 2
    assert s["topology_mean_num_cases"]["TVS"] == 2
    table = format_table(s)
    assert "*" in table and "RV HD95: 1/2" in table


def test_no_rules_means_tvs_and_vr_are_undefined():
    spec = parse_topology(dict(DJ, topology={"betti": {"LV": [1, 0, 0]}}))
    ref = heart()
    case = evaluate_case(ref, ref, SPACING, spec, IDS)
    assert math.isnan(case["topology"]["TVS"])
    s = aggregate([case], spec, IDS)
    s.update(label_names={})
    assert math.isnan(s["topology_mean"]["TVS"]) and math.isnan(s["topology_mean"]["VR"])
    assert "TVS n/a (no rules)" in format_table(s) and "VR n/a" in format_table(s)


# ------------------------------------------------------------------------------------------- rule check: priors
def test_check_rules_reports_a_wrong_per_slice_prior(tmp_path):
    topo = dict(TOPOLOGY, betti_2d={"axis": 0, "MYO": [5, 5]})
    folder, dj = labels_folder(tmp_path, {"case_0": heart()}, topology=topo)
    report = check_rules_on_folder(folder, dj, show_progress=False)
    e = report["betti_2d"]["MYO"]
    assert e["cases_differing"] == 1 and e["cases"]["case_0"]["slices"] == [1, 2, 3, 4, 5, 6]
    assert e["cases"]["case_0"]["betti"][0] == [1, 1]
    assert not report["clean"]
    assert "per-slice Betti prior MYO (5, 5)" in format_rule_report(report)


def test_check_rules_notes_rules_and_priors_on_labels_no_case_has(tmp_path):
    labels = {**LABELS, "LA": 5}
    topo = dict(TOPOLOGY, rules=TOPOLOGY["rules"] + [{"type": "exclusion", "a": "LA", "b": "RV"}],
                betti={**TOPOLOGY["betti"], "LA": [1, 0, 0]})
    folder, dj = labels_folder(tmp_path, {"case_0": heart()}, topology=topo, labels=labels)
    report = check_rules_on_folder(folder, dj, show_progress=False)
    notes = " ".join(report["notes"])
    assert "rule exclusion(LA,RV)" in notes and "['LA']" in notes and "Betti prior LA" in notes
    assert "note: rule exclusion(LA,RV)" in format_rule_report(report)


# ------------------------------------------------------------------------------------------- geometry
@pytest.fixture()
def folders(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    write(tmp_path / "ref" / "case_0.nii.gz", heart())
    dj = dict(DJ, labels={k: v for k, v in LABELS.items() if k != "ignore"})
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    return tmp_path


def test_flipped_direction_prediction_is_refused(folders):
    write(folders / "pred" / "case_0.nii.gz", heart(), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    with pytest.raises(EvaluationError, match="geometry mismatch.*directions differ.*--ignore_geometry"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"),
                                           str(folders / "dataset.json"), {}, show_progress=False)
    with pytest.warns(UserWarning, match="ignore_geometry"):
        s = compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"),
                                               str(folders / "dataset.json"), {}, show_progress=False,
                                               ignore_geometry=True)
    assert s["mean"]["3"]["Dice"] == 1.0


def test_shifted_origin_is_refused_but_float_noise_is_not(folders):
    write(folders / "pred" / "case_0.nii.gz", heart(), origin=(0.0, 0.0, 3.0))
    with pytest.raises(EvaluationError, match="origins differ by 3 mm"):
        compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"),
                                           str(folders / "dataset.json"), {}, show_progress=False)
    write(folders / "pred" / "case_0.nii.gz", heart(), origin=(1e-5, 0.0, 0.0))
    s = compute_topology_metrics_on_folder(str(folders / "ref"), str(folders / "pred"),
                                           str(folders / "dataset.json"), {}, show_progress=False)
    assert s["mean"]["3"]["Dice"] == 1.0
