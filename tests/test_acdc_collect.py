"""examples/acdc/collect_results_400it.py (the 400-iteration study, history): a re-run that lacks some rows keeps the earlier run's rows, marked."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "acdc", "collect_results_400it.py")
_spec = importlib.util.spec_from_file_location("collect_results", SCRIPT)
col = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(col)


def test_merge_keeps_earlier_rows_and_replaces_measured_ones(tmp_path):
    work = tmp_path / "work"
    (work / "eval").mkdir(parents=True)
    summary = {"label_names": {"1": "RV"}, "mean": {"1": {"Dice": 0.8, "HD95": 3.0}},
               "foreground_mean": {"Dice": 0.8},
               "topology_mean": {"TVS": 0.01, "VR": 0.2, "betti_error_3d": 1.0, "betti_error_2d": 0.5,
                                 "topologically_correct": 0.5, "cce_3d": 1.0, "cce_2d": 0.5, "num_cases": 4}}
    (work / "eval" / "nnUNetTrainerTPM_acdcStudy_label.json").write_text(json.dumps(summary))
    out = tmp_path / "acdc.json"
    earlier = col.label_block(dict(summary, mean={"1": {"Dice": 0.5, "HD95": 9.0}}))
    old = {"trainers": {"nnUNetTrainer": {"label": earlier}, "nnUNetTrainerTPM": {"label": earlier}}}
    out.write_text(json.dumps(old))
    assert col.main(["--work", str(work), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["trainers"]["nnUNetTrainerTPM"]["label"]["Dice"]["RV"] == 0.8  # measured here: replaced
    assert "from_earlier_run" not in r["trainers"]["nnUNetTrainerTPM"]
    assert r["trainers"]["nnUNetTrainer"] == {"label": earlier, "from_earlier_run": True}
    assert "nnUNetTrainer" not in r["missing"] and "nnUNetTrainerMIE" in r["missing"]
    assert col.main(["--work", str(work), "--out", str(out), "--no-merge"]) == 0
    assert "nnUNetTrainer" not in json.loads(out.read_text())["trainers"]
