"""Cross-validation summary (nnunet_topo.cv_summary): per-fold and pooled means from real evaluator output."""
import json
import math

import numpy as np
import pytest

from nnunet_topo.cli.summarize_cv import summarize_cv_entry
from nnunet_topo.cv_summary import CVSummaryError, format_cv_table, summarize_cv
from nnunet_topo.evaluation import compute_topology_metrics_on_folder
from test_evaluation import DJ as _DJ, TOPOLOGY, heart, write  # the same phantom and writer

DJ = dict(_DJ, numTraining=6)
DATASET = "Dataset042_Fake"
MODEL = "nnUNetTrainerTPM__nnUNetPlans__3d_fullres"
#: cases per fold (fold 1 has three, so that a mean of fold means differs from the pooled mean)
pytestmark = pytest.mark.filterwarnings("ignore:.*holds only vacuously")
SPLITS = {0: ["case_0", "case_1"], 1: ["case_2", "case_3", "case_4"], 2: ["case_5"]}


def defect(i):
    """Case i's prediction: a different defect per case (so the means differ from fold to fold)."""
    p = heart()
    if i == 0:
        p[2, 5, 8:10] = 3            # LV tunnels through the wall to the RV: exclusion + inclusion violated
    elif i == 2:
        p[1:5, 2:10, 10:14] = 0      # RV missed: worst-case HD95, vacuous exclusion
    elif i == 3:
        p[2:4, 4:6, 4:8] = 2         # LV shrunk
    elif i == 4:
        p[0, 0:2, 0:2] = 1           # a spurious RV component
    return p


@pytest.fixture
def nnunet(tmp_path, monkeypatch):
    """Fake nnU-Net folders: gt_segmentations under nnUNet_preprocessed, a model folder under nnUNet_results with
    dataset.json, plans.json and fold_k/validation/ (predictions, nnU-Net's summary.json)."""
    roots = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, p in roots.items():
        p.mkdir()
        monkeypatch.setenv(k, str(p))
    gt = roots["nnUNet_preprocessed"] / DATASET / "gt_segmentations"
    gt.mkdir(parents=True)
    model = roots["nnUNet_results"] / DATASET / MODEL
    model.mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(DJ))
    (model / "plans.json").write_text(json.dumps({}))
    for fold, names in SPLITS.items():
        val = model / f"fold_{fold}" / "validation"
        val.mkdir(parents=True)
        for name in names:
            i = int(name.split("_")[1])
            write(gt / f"{name}.nii.gz", heart())
            write(val / f"{name}.nii.gz", defect(i))
        (val / "summary.json").write_text(json.dumps(  # what nnU-Net writes (only what summarize_cv reads)
            {"metric_per_case": [{"prediction_file": str(val / f"{n}.nii.gz"),
                                  "reference_file": str(gt / f"{n}.nii.gz")} for n in names]}))
    return {"model": model, "gt": gt, **roots}


def evaluate_fold(nnunet, fold, dj=DJ):
    """The fold's summary_topology.json, as the trainers write it after validation."""
    val = nnunet["model"] / f"fold_{fold}" / "validation"
    return compute_topology_metrics_on_folder(str(nnunet["gt"]), str(val), dj, {}, chill=True, show_progress=False,
                                              output_file=str(val / "summary_topology.json"))


def close(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def same(a, b):
    """Nested dicts and lists equal, floats to rounding, NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return close(float(a), float(b))
    return a == b


def test_pooled_means_are_means_over_all_validation_cases(nnunet):
    per_fold = {k: evaluate_fold(nnunet, k) for k in SPLITS}
    s = summarize_cv(str(nnunet["model"]))
    on_disk = json.loads((nnunet["model"] / "summary_topology_cv.json").read_text())
    assert on_disk["pooled"]["topology_mean"]["num_cases"] == 6
    assert set(on_disk) >= {"folds", "pooled", "metric_per_case", "mean", "foreground_mean", "missing_folds",
                            "label_names", "rules"}
    cases = s["metric_per_case"]
    assert len(cases) == 6 and [c["fold"] for c in cases] == [0, 0, 1, 1, 1, 2]
    for lab in ("1", "2", "3"):
        for metric in ("Dice", "HD95", "betti_error_3d", "cce_3d"):
            expected = float(np.nanmean([c["metrics"][lab][metric] for c in cases]))
            assert close(s["pooled"]["mean"][lab][metric], expected), (lab, metric)
            assert close(s["mean"][lab][metric], expected)
    tvs = float(np.nanmean([c["topology"]["TVS"] for c in cases]))
    assert s["pooled"]["topology_mean"]["TVS"] == pytest.approx(tvs) and tvs > 0
    vr = float(np.mean([any(c["topology"]["violated"].values()) for c in cases]))
    assert s["pooled"]["topology_mean"]["VR"] == pytest.approx(vr)
    fold_means = [per_fold[k]["topology_mean"]["TVS"] for k in SPLITS]
    assert not close(float(np.mean(fold_means)), tvs)  # pooled, not a mean of fold means
    for k, fs in per_fold.items():
        entry = s["folds"][str(k)]
        assert entry["num_cases"] == len(SPLITS[k])
        assert same(entry["topology_mean"], fs["topology_mean"])
        assert same(entry["foreground_mean"], fs["foreground_mean"])
        for lab in ("1", "2", "3"):
            assert same(entry["mean"][lab], fs["mean"][lab])
        assert entry["mean_num_cases"] == fs["mean_num_cases"]
        assert entry["topology_mean_num_cases"] == fs["topology_mean_num_cases"]
    assert s["missing_folds"] == [] and s["rules"] == per_fold[0]["rules"]
    assert s["label_names"] == {"1": "RV", "2": "MYO", "3": "LV"}
    table = format_cv_table(s)
    assert "pooled" in table and "LV" in table and "TVS" in table
    rows = {ln.split()[0]: ln.split() for ln in table.split("\n\n")[0].splitlines()[1:]}
    assert list(rows) == ["0", "1", "2", "pooled"]
    assert rows["pooled"][1] == "6" and rows["pooled"][4] == f"{tvs:.5f}" and rows["1"][1] == "3"


def test_missing_fold_errors_or_is_listed_with_chill(nnunet):
    for k in (0, 1):
        evaluate_fold(nnunet, k)
    for f in (nnunet["model"] / "fold_2" / "validation").iterdir():
        f.unlink()
    with pytest.raises(CVSummaryError, match="fold 2"):
        summarize_cv(str(nnunet["model"]))
    with pytest.raises(CVSummaryError, match="fold 7"):  # a requested fold that does not exist
        summarize_cv(str(nnunet["model"]), folds=[0, 7])
    s = summarize_cv(str(nnunet["model"]), chill=True)
    assert s["missing_folds"] == [2] and set(s["folds"]) == {"0", "1"}
    assert s["pooled"]["topology_mean"]["num_cases"] == 5
    assert "missing folds" in format_cv_table(s)
    s = summarize_cv(str(nnunet["model"]), folds=[0, 7], chill=True)
    assert s["missing_folds"] == [7] and set(s["folds"]) == {"0"}
    s = summarize_cv(str(nnunet["model"]), folds=[1])
    assert set(s["folds"]) == {"1"} and len(s["metric_per_case"]) == 3


def test_folds_with_different_rules_are_refused(nnunet):
    evaluate_fold(nnunet, 0)
    evaluate_fold(nnunet, 1, dj=dict(DJ, topology=dict(TOPOLOGY, rules=TOPOLOGY["rules"][:1])))
    evaluate_fold(nnunet, 2)
    with pytest.raises(CVSummaryError, match="fold 1 was evaluated with other rules"):
        summarize_cv(str(nnunet["model"]))
    assert not (nnunet["model"] / "summary_topology_cv.json").exists()


def test_missing_topology_summary_is_computed_from_nnunet_validation_outputs(nnunet):
    evaluate_fold(nnunet, 0)
    evaluate_fold(nnunet, 1)
    target = nnunet["model"] / "fold_2" / "validation" / "summary_topology.json"
    assert not target.exists()
    s = summarize_cv(str(nnunet["model"]))
    assert target.exists()
    assert s["folds"]["2"]["num_cases"] == 1 and len(s["metric_per_case"]) == 6
    assert same(s["folds"]["2"]["topology_mean"], evaluate_fold(nnunet, 2)["topology_mean"])


def test_computing_needs_a_complete_validation(nnunet):
    evaluate_fold(nnunet, 0)
    evaluate_fold(nnunet, 1)
    (nnunet["model"] / "fold_2" / "validation" / "summary.json").unlink()  # validation interrupted
    with pytest.raises(CVSummaryError, match="fold 2.*summary.json"):
        summarize_cv(str(nnunet["model"]))


def test_cli_prints_the_table(nnunet, capsys):
    (nnunet["model"].parent / "nnUNetTrainer__nnUNetPlans__3d_fullres").mkdir()  # another model, not read
    (nnunet["model"] / "fold_all").mkdir()  # not a cross-validation fold
    summarize_cv_entry(["-d", "42", "-tr", "nnUNetTrainerTPM", "-c", "3d_fullres"])
    out = capsys.readouterr().out
    assert "pooled" in out and "TVS" in out and "summary_topology_cv.json" in out
    assert set(json.loads((nnunet["model"] / "summary_topology_cv.json").read_text())["folds"]) == {"0", "1", "2"}
    with pytest.raises(SystemExit) as e:
        summarize_cv_entry(["-d", "42", "-tr", "nnUNetTrainerTPM", "-c", "3d_fullres", "-f", "0", "9"])
    assert e.value.code == 2 and "error: " in capsys.readouterr().err
    summarize_cv_entry(["-d", DATASET, "-tr", "nnUNetTrainerTPM", "-c", "3d_fullres", "-f", "0", "9", "--chill"])
    assert "missing folds" in capsys.readouterr().out
