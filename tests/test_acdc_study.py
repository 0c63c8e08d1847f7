"""The ACDC fine-tune study's code (issue 22) on tiny data: examples/acdc/study.sh parses and has its stages, the
collector (examples/acdc/collect_results.py) writes the new keys from a hand-made work folder, its paired bootstrap
agrees with a naive loop, the 400-iteration JSON is moved aside; marching cubes of segmentations
(nnunet_topo.segmentation_meshes) in predict_meshes' layout, read by the mesh evaluator; label-free measures
(nnunet_topo.label_free)."""
import importlib.util
import json
import math
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "examples", "acdc", "study.sh")


def _module(name, *path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


col = _module("collect_results_ft", "examples", "acdc", "collect_results.py")
acdc_topology = _module("convert_acdc_h5_t", "examples", "acdc", "convert_acdc_h5.py").acdc_topology


# ------------------------------------------------------------------------------------------------ study.sh
def test_study_script_parses_and_defines_every_default_stage():
    subprocess.run(["bash", "-n", STUDY], check=True)
    text = open(STUDY).read()
    default = text.split('STAGES="${STUDY_STAGES:-', 1)[1].split("}", 1)[0].split()
    assert default == ["data", "backbone", "finetune", "scratch", "evaluate", "external", "collect"]
    for stage in default:
        assert f"stage_{stage}() {{" in text, stage


# ------------------------------------------------------------------------------------------------ bootstrap
def naive_bootstrap(a, b, n_resamples, seed, relative=False):
    """Loop version: the same index matrix, statistics and percentiles by hand."""
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    stats = []
    for row in idx:
        sa = sum(pairs[i][0] for i in row) / n
        sb = sum(pairs[i][1] for i in row) / n
        stats.append(sa / sb - 1 if relative else sa - sb)
    stats.sort()

    def pct(q):  # linear interpolation between order statistics (numpy's default)
        pos = q / 100 * (len(stats) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(stats) - 1)
        return stats[lo] + (stats[hi] - stats[lo]) * (pos - lo)
    mean_a = sum(x for x, _ in pairs) / n
    mean_b = sum(y for _, y in pairs) / n
    est = mean_a / mean_b - 1 if relative else mean_a - mean_b
    return est, pct(2.5), pct(97.5)


@pytest.mark.parametrize("relative", [False, True])
def test_bootstrap_matches_a_naive_loop(relative):
    a = [0.91, 0.85, 0.77, 0.95, 0.60, 0.88, float("nan")]
    b = [0.90, 0.80, 0.79, 0.93, 0.70, 0.86, 0.50]
    got = col.paired_bootstrap(a, b, relative=relative, n_resamples=500, seed=3)
    est, lo, hi = naive_bootstrap(a, b, 500, 3, relative)
    assert got["n"] == 6  # the NaN pair is left out
    assert got["estimate"] == pytest.approx(est, abs=1e-12)
    assert got["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert got["ci95"][0] <= got["estimate"] <= got["ci95"][1]


def test_bootstrap_known_answers():
    x = [0.3, 0.7, 0.5, 0.9]
    same = col.paired_bootstrap(x, x)
    assert same["estimate"] == 0 and same["ci95"] == [0.0, 0.0]
    shifted = col.paired_bootstrap([v + 0.02 for v in x], x)  # a constant paired difference has no spread
    assert shifted["estimate"] == pytest.approx(0.02) and shifted["ci95"] == pytest.approx([0.02, 0.02])
    half = col.paired_bootstrap([v / 2 for v in x], x, relative=True)  # -50 % in every resample
    assert half["estimate"] == pytest.approx(-0.5) and half["ci95"] == pytest.approx([-0.5, -0.5])
    assert col.paired_bootstrap([float("nan")], [1.0]) == {"estimate": None, "ci95": None, "n": 0}
    with pytest.raises(ValueError):
        col.paired_bootstrap([1.0, 2.0], [1.0])
    # fixed seed: the same interval twice
    a, b = [0.1, 0.4, 0.35, 0.8, 0.2], [0.2, 0.1, 0.3, 0.5, 0.25]
    assert col.paired_bootstrap(a, b) == col.paired_bootstrap(a, b)


# ------------------------------------------------------------------------------------------------ collector
CASES = ["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient002_frame12"]
NAMES = {"1": "RV", "2": "MYO", "3": "LV"}
STRUCTS = ["LV_endo", "LV_epi", "RV"]


def label_summary(dice_shift=0.0, betti=2.0, cce=1.0, tc2d=(False, False, True, False)):
    """An evaluator summary (the keys the collector reads) of 4 cases; Dice RV/MYO/LV of case i = base + shift."""
    cases = []
    for i, c in enumerate(CASES):
        base = {"1": 0.70 + 0.02 * i, "2": 0.75 + 0.01 * i, "3": 0.90 - 0.01 * i}
        cases.append({"reference_file": f"/gt/{c}.nii.gz", "prediction_file": f"/pred/{c}.nii.gz",
                      "metrics": {k: {"Dice": v + dice_shift, "HD95": 5.0, "betti_error_2d": 0.5 * i,
                                      "cce_3d": cce} for k, v in base.items()},
                      "topology": {"TVS": 0.01 * i, "betti_error_3d": betti + i, "topologically_correct_2d": tc2d[i],
                                   "slices_meeting_prior_2d": 0.9}})
    mean = {k: {"Dice": float(np.mean([e["metrics"][k]["Dice"] for e in cases])), "HD95": 5.0} for k in NAMES}
    topo = {"TVS": 0.015, "VR": 0.5, "betti_error_3d": betti + 1.5, "betti_error_2d": 0.75, "cce_3d": cce,
            "cce_2d": 0.5, "topologically_correct": 0.0, "topologically_correct_2d": float(np.mean(tc2d)),
            "slices_meeting_prior_2d": 0.9, "num_cases": len(cases)}
    return {"metric_per_case": cases, "mean": mean, "label_names": NAMES, "topology_mean": topo,
            "foreground_mean": {"Dice": float(np.mean([m["Dice"] for m in mean.values()]))}}


def mesh_summary(tvs, dice=0.8, chamfer=3.0, ratios=(1.0, 1.1, 1.3), skip=()):
    """A merged label + mesh summary: ``ratios[j]`` = mesh / reference volume of structure j in every case."""
    s = label_summary()
    for e in s["metric_per_case"]:
        case = os.path.basename(e["reference_file"])[:-7]
        if case in skip:
            continue
        e["mesh_metrics"] = {st: {"Dice": dice, "Chamfer_mm": chamfer, "HD95_mm": 2 * chamfer,
                                  "laplacian_energy_mm2": 1.0, "volume_mm3": 1000.0 * ratios[j],
                                  "volume_ref_mm3": 1000.0} for j, st in enumerate(STRUCTS)}
        e["mesh_topology"] = {"TVS": tvs}
    s["mesh_mean"] = {st: {"Dice": dice, "Chamfer_mm": chamfer, "HD95_mm": 2 * chamfer, "laplacian_energy_mm2": 1.0,
                           "volume_mm3": 1000.0 * ratios[j], "volume_ref_mm3": 1000.0} for j, st in enumerate(STRUCTS)}
    s["mesh_mean_num_cases"] = {st: {"Dice": len(CASES) - len(skip)} for st in STRUCTS}
    s["mesh_topology_mean"] = {"TVS": tvs, "TVS_per_rule": {}, "TVS_over_foreground": tvs * 1.3, "grid_mm": [1.0]}
    s["mesh_structures"] = STRUCTS
    return s


def train_folder(work, tr, epochs, iters, seed=None, epoch_s=10.0, pseudo=None, planned=None):
    """A trained fold: nnU-Net's debug.json (``planned`` epochs, default ``epochs``) and a log of ``epochs``."""
    fold = work / "results" / col.NAME / f"{tr}__{col.PLANS_CONF}" / "fold_0"
    fold.mkdir(parents=True)
    dbg = {"num_epochs": str(planned or epochs), "num_iterations_per_epoch": str(iters), "batch_size": "2"}
    if seed is not None:
        dbg["seed"] = str(seed)
    (fold / "debug.json").write_text(json.dumps(dbg))
    lines = []
    for e in range(epochs):
        lines.append(f"2026-12-06 17:00:00.0: Epoch {e}")
        if pseudo:
            lines.append("2026-12-06 17:00:01.0: Pseudo dice [" +
                         ", ".join(f"np.float32({v})" for v in pseudo[e]) + "]")
        lines.append(f"2026-12-06 17:00:02.0: Epoch time: {epoch_s} s")
    (fold / "training_log_2026_12_6_16_15_18.txt").write_text("\n".join(lines) + "\n")


def test_training_budget_reports_the_sum_and_a_median_a_paused_epoch_does_not_move(tmp_path):
    # the control's real log of 2026-12-07: its first epoch held a 30-minute pause for the test suite
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "debug.json").write_text(json.dumps({"num_epochs": "4", "num_iterations_per_epoch": "100",
                                                 "batch_size": "2", "seed": "1"}))
    times = [2323.0, 151.7, 144.5, 160.0]
    (fold / "training_log_2026_12_7_15_33_07.txt").write_text(
        "".join(f"2026-12-07 16:00:00.0: Epoch {e}\n2026-12-07 16:00:01.0: Epoch time: {t} s\n"
                for e, t in enumerate(times)))
    b = col.training_budget(str(fold))
    assert b["seconds"] == pytest.approx(sum(times)) and b["epochs_logged"] == 4
    assert b["epoch_seconds_median"] == pytest.approx(155.8)  # (151.7 + 160.0) / 2, not pulled up by the pause
    assert b["iterations"] == 400 and b["seed"] == 1


def fake_work(tmp_path, with_betti=True):
    work = tmp_path / "work"
    (work / "eval").mkdir(parents=True)
    (work / "logs").mkdir()
    (work / "preprocessed" / col.NAME).mkdir(parents=True)
    (work / "preprocessed" / col.NAME / "splits_final.json").write_text(json.dumps([{"train": [], "val": CASES}]))
    (work / "raw" / col.NAME).mkdir(parents=True)
    (work / "raw" / col.NAME / "dataset.json").write_text(json.dumps({"spacing_assumed_mm": [10, 1.5, 1.5]}))
    ev = work / "eval"
    # backbone: 2 epochs x 100 of 40 planned (stopped at its goals); pseudo Dice meets the goals (RV, MYO >= 0.70,
    # LV >= 0.85) from epoch 1 on
    train_folder(work, col.BACKBONE, 2, 100, pseudo=[[0.6, 0.7, 0.9], [0.72, 0.71, 0.86]], planned=40)
    (ev / f"{col.BACKBONE}_label.json").write_text(json.dumps(label_summary()))
    train_folder(work, col.CONTROL, 10, 100, seed=1)
    (ev / f"{col.CONTROL}_label.json").write_text(json.dumps(label_summary()))
    train_folder(work, col.CONTROL + "_seed2", 10, 100, seed=2)
    (ev / f"{col.CONTROL}_seed2_label.json").write_text(json.dumps(label_summary(0.01)))
    if with_betti:
        train_folder(work, "nnUNetTrainerBetti_acdcFT", 10, 100, seed=1)
        (ev / "nnUNetTrainerBetti_acdcFT_label.json").write_text(json.dumps(label_summary(-0.005, betti=1.0)))
    train_folder(work, col.MESH_FT, 10, 100, seed=1)
    (ev / f"{col.MESH_FT}_label.json").write_text(json.dumps(label_summary(-0.03)))
    (ev / f"{col.MESH_FT}_mesh.json").write_text(json.dumps(mesh_summary(0.10, skip={CASES[3]})))
    (work / f"meshes_{col.MESH_FT}").mkdir()
    (work / f"meshes_{col.MESH_FT}" / "meshes.json").write_text(json.dumps({"cases_without_mesh": [CASES[3]]}))
    (work / f"repaired_{col.MESH_FT}").mkdir()  # the repair moved LV_endo by 1.0 / 3.0 mm (max) in 2 cases, 1 failed
    (work / f"repaired_{col.MESH_FT}" / "repair.json").write_text(json.dumps({"gap_mm": 0.5, "cases": {
        CASES[0]: {"meshes": {"LV_endo": {"max_displacement_mm": 1.0, "mean_displacement_mm": 0.1,
                                          "moved_vertices": 10}}},
        CASES[1]: {"meshes": {"LV_endo": {"max_displacement_mm": 3.0, "mean_displacement_mm": 0.3,
                                          "moved_vertices": 30}}},
        CASES[2]: {"error": "case x: not repaired"}}, "cases_not_repaired": [CASES[2]]}))
    train_folder(work, "nnUNetTrainerTPM_acdcFT2", 5, 100)  # no seed in debug.json: from the name (1)
    (ev / "nnUNetTrainerTPM_acdcFT2_label.json").write_text(json.dumps(label_summary(-0.004)))
    (ev / "nnUNetTrainerTPM_acdcFT2_mesh.json").write_text(json.dumps(mesh_summary(0.005, dice=0.79)))
    train_folder(work, col.MESH_CONTINUED, 5, 100, seed=1)
    (ev / f"{col.MESH_CONTINUED}_label.json").write_text(json.dumps(label_summary()))
    (ev / f"{col.MESH_CONTINUED}_mesh.json").write_text(json.dumps(mesh_summary(0.10)))
    (ev / f"{col.REFINE}_label.json").write_text(json.dumps(label_summary(0.0, tc2d=(True, True, True, False))))
    (work / f"refine_{col.CONTROL}").mkdir()
    (work / f"refine_{col.CONTROL}" / "refinement_summary.json").write_text(
        json.dumps({"steps": 10, "lr": 1e-4, "lambda": 0.01, "keep_present": True, "cases": {}}))
    (ev / f"{col.MARCHING_CUBES}_mesh.json").write_text(json.dumps(mesh_summary(0.0, chamfer=4.0)))
    (ev / f"external_{col.CONTROL}_label_free.json").write_text(json.dumps({"summary": {
        "num_cases": 20, "share_cases_violating": {"r": 0.1}, "share_slices_meeting_prior_2d": {"all": 0.8},
        "share_cases_meeting_prior_3d": {"LV_epi": 0.5}, "share_cases_lacking": {"RV": 0.05}}}))
    (work / "logs" / "stage_seconds.tsv").write_text("data\t68\tvm/2cpu/cpu\t2026-12-06T16:15:10+00:00\n")
    return work


def strict_json(path):
    def no_nan(x):
        raise AssertionError(f"non-JSON constant {x} in {path}")
    return json.loads(open(path).read(), parse_constant=no_nan)


def test_collector_writes_the_fine_tune_json(tmp_path, capsys):
    work = fake_work(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    out = docs / "acdc_fold0.json"
    old = {"split": "...", "trainers": {"nnUNetTrainer": {"label": {"Dice": {"RV": 0.17}}}}}  # the 400-it study
    out.write_text(json.dumps(old))
    assert col.main(["--work", str(work), "--out", str(out)]) == 0
    # the 400-iteration rows moved aside, not merged
    assert json.loads((docs / "acdc_fold0_400it.json").read_text()) == old
    r = strict_json(out)
    assert r["protocol"] == "fine-tune" and "nnUNetTrainer" not in r["trainers"]
    assert r["num_validation_cases"] == 4
    b = r["backbone"]
    assert b["iterations"] == 200 and b["seconds"] == 20.0 and b["iterations_bound"] == 4000
    assert b["stopped_by"].startswith("Dice goals")
    assert b["label"]["Dice"]["LV"] == pytest.approx(np.mean([0.90, 0.89, 0.88, 0.87]))
    assert b["dice_goals_met"] == {"LV": True, "MYO": True, "RV": True}
    assert b["first_epoch_pseudo_dice_meets_goals"] == 1
    t = r["trainers"]
    assert t[col.CONTROL]["finetune_iterations"] == 1000 and t[col.CONTROL]["seed"] == 1
    assert t[col.CONTROL]["started_from"] == col.BACKBONE and t[col.CONTROL]["iterations_after_backbone"] == 1000
    tpm = t["nnUNetTrainerTPM_acdcFT2"]
    assert tpm["finetune_iterations"] == 500 and tpm["seed"] == 1 and tpm["started_from"] == col.MESH_FT
    assert tpm["iterations_after_backbone"] == 1500 and tpm["trainer"] == "nnUNetTrainerTPM_finetune"
    for key in ("Dice", "HD95_mm", "TVS", "VR", "SVR_per_rule", "betti_error_3d", "betti_error_2d",
                "topologically_correct", "topologically_correct_2d", "cce_3d"):
        assert key in t[col.CONTROL]["label"], key
    m = t[col.MESH_FT]["mesh"]
    for key in ("Dice", "Chamfer_mm", "HD95_mm", "laplacian_energy_mm2", "TVS", "TVS_over_foreground"):
        assert key in m, key
    assert m["volume_ratio"] == pytest.approx({"LV_endo": 1.0, "LV_epi": 1.1, "RV": 1.3})
    # 3 of 4 cases meshed, the unmeshed one counts outside the range; RV ratio 1.3 is outside everywhere
    assert m["volume_ratio_share_in_0.85_1.15"] == pytest.approx({"LV_endo": 0.75, "LV_epi": 0.75, "RV": 0.0})
    assert m["cases_without_mesh"] == [CASES[3]]
    rep = t[col.MESH_FT]["repair"]
    assert rep["cases_repaired"] == 2 and rep["cases_not_repaired"] == [CASES[2]] and rep["gap_mm"] == 0.5
    assert rep["max_displacement_mm"]["LV_endo"] == pytest.approx(2.0)
    assert rep["max_displacement_mm_worst_case"]["LV_endo"] == 3.0
    assert rep["mean_displacement_mm"]["LV_endo"] == pytest.approx(0.2)
    assert "repair" not in t[col.MESH_CONTINUED]
    assert t[col.REFINE]["refinement"]["keep_present"] is True and "label" in t[col.REFINE]
    assert "mesh" in t[col.MARCHING_CUBES] and "label" not in t[col.MARCHING_CUBES]
    assert "nnUNetTrainerMIE_acdcFT" in r["missing"] and col.CONTROL not in r["missing"]
    # differences: Mesh's Dice 3 points under the control in every case: exactly -0.03, interval [-0.03, -0.03]
    d = r["differences"]
    assert d["vs_control"][col.MESH_FT]["Dice_RV"]["estimate"] == pytest.approx(-0.03)
    assert d["vs_control"][col.MESH_FT]["Dice_RV"]["ci95"] == pytest.approx([-0.03, -0.03])
    assert d["vs_control"][col.MESH_CONTINUED]["Dice_LV"]["ci95"] == [0.0, 0.0]  # identical evaluations
    betti = d["vs_control"]["nnUNetTrainerBetti_acdcFT"]["betti_error_3d"]
    assert betti["estimate"] == pytest.approx(-1.0) and betti["n"] == 4
    tpm_d = d["tpm_vs_mesh_continued"]["nnUNetTrainerTPM_acdcFT2"]
    assert tpm_d["mesh_TVS_relative"]["estimate"] == pytest.approx(-0.95)
    assert tpm_d["mesh_Dice_RV"]["estimate"] == pytest.approx(-0.01)
    head = d["head_vs_marching_cubes"][col.MESH_FT]
    assert head["mesh_TVS"]["n"] == 3 and head["mesh_TVS"]["estimate"] == pytest.approx(0.10)  # paired on meshed
    assert head["Chamfer_mean"]["estimate"] == pytest.approx(-1.0)
    assert r["bootstrap"]["resamples"] == 2000
    assert t[col.CONTROL + "_seed2"]["seed"] == 2
    seeds = d["seed_repeats"][col.CONTROL + "_seed2"]
    assert seeds["Dice_MYO"]["estimate"] == pytest.approx(0.01) and "TVS" in seeds and "HD95" not in str(seeds)
    # goals
    status = {(g["goal"].split(" ")[0], g["arm"]): g["status"] for g in r["goals"]}
    assert status[("label", col.MESH_FT)] == "not met"
    assert status[("label", "nnUNetTrainerBetti_acdcFT")] == "met"  # -0.5 point in every case
    assert status[("label", "nnUNetTrainerMIE_acdcFT")] == "not measured"
    assert status[("TPM:", "nnUNetTrainerTPM_acdcFT2")] == "met"  # -95 %, -1 point
    assert status[("refinement:", col.REFINE)] in ("met", "estimate only")
    assert status[("betti_error_3d", "nnUNetTrainerBetti_acdcFT")] == "met"
    assert status[("learned", col.MESH_FT)] == "not met"  # more mesh TVS than marching cubes
    assert status[("mesh", col.MESH_FT)] == "not met"
    assert r["external_lge"][col.CONTROL]["num_cases"] == 20
    assert r["stage_seconds"] == [{"step": "data", "seconds": 68, "machine": "vm/2cpu/cpu",
                                   "date": "2026-12-06T16:15:10+00:00"}]
    pc = r["per_case"][col.MESH_FT]
    assert pc["label"]["case"] == CASES and len(pc["mesh"]["case"]) == 3
    printed = capsys.readouterr().out
    for heading in ("| backbone |", "| row | ft iters", "Δ Dice RV", "Second seed", "TPM Table 2", "marching cubes",
                    "| goal |", "External LGE", "Repair (nnUNetv2_topo_repair_meshes"):
        assert heading in printed, heading


@pytest.mark.parametrize("rv_shift, cce, status", [(-0.005, 1.0, "met"), (-0.05, 1.0, "not met"),
                                                   (0.0, 2.0, "not met")])
def test_collector_compares_projpool_from_scratch_with_the_plain_run_only(tmp_path, rv_shift, cce, status):
    """Issue 27's goal: RV/MYO Dice within 2 points of the same-length plain run and CCE not worse; the scratch rows
    are compared with each other, not with the fine-tuned control."""
    work = fake_work(tmp_path)
    train_folder(work, col.SCRATCH_PLAIN, 10, 100, seed=1)
    (work / "eval" / f"{col.SCRATCH_PLAIN}_label.json").write_text(json.dumps(label_summary(-0.1)))
    train_folder(work, col.SCRATCH_PROJPOOL, 10, 100, seed=1)
    (work / "eval" / f"{col.SCRATCH_PROJPOOL}_label.json").write_text(
        json.dumps(label_summary(-0.1 + rv_shift, cce=cce)))
    out = tmp_path / "r.json"
    assert col.main(["--work", str(work), "--out", str(out), "--no-merge"]) == 0
    r = strict_json(out)
    t = r["trainers"][col.SCRATCH_PROJPOOL]
    assert t["started_from"] == "scratch" and t["finetune_iterations"] == 1000 and "iterations_after_backbone" not in t
    d = r["differences"]
    assert col.SCRATCH_PROJPOOL not in d["vs_control"] and col.SCRATCH_PLAIN not in d["vs_control"]
    assert d["scratch_projpool_vs_plain"]["Dice_RV"]["estimate"] == pytest.approx(rv_shift)
    assert d["scratch_projpool_vs_plain"]["cce_3d"]["estimate"] == pytest.approx(cce - 1.0)
    goal = [g for g in r["goals"] if g["goal"].startswith("issue 27")]
    assert [g["status"] for g in goal] == [status]


def test_collector_head_only_row_starts_from_the_control_and_measures_the_mesh_share(tmp_path, capsys):
    """The head alone on the control's frozen network (share 0) is a mesh row started from the control (its
    iterations after the backbone count the control's), and Mesh (default share) is compared with it per case."""
    work = fake_work(tmp_path)
    train_folder(work, col.HEAD_ONLY, 10, 100, seed=1)
    (work / "eval" / f"{col.HEAD_ONLY}_label.json").write_text(json.dumps(label_summary()))
    (work / "eval" / f"{col.HEAD_ONLY}_mesh.json").write_text(json.dumps(mesh_summary(0.02, dice=0.75, chamfer=3.5)))
    out = tmp_path / "r.json"
    assert col.main(["--work", str(work), "--out", str(out)]) == 0
    r = strict_json(out)
    t = r["trainers"][col.HEAD_ONLY]
    assert t["started_from"] == col.CONTROL and t["iterations_after_backbone"] == 2000
    assert "volume_ratio" in t["mesh"]
    share = r["differences"]["mesh_share_vs_head_only"]
    # Mesh (dice 0.8, Chamfer 3.0, TVS 0.10; case 3 unmeshed) minus head-only (0.75, 3.5, 0.02), paired on 3 cases
    assert share["mesh_Dice_RV"]["estimate"] == pytest.approx(0.05) and share["mesh_Dice_RV"]["n"] == 3
    assert share["Chamfer_mean"]["estimate"] == pytest.approx(-0.5)
    assert share["mesh_TVS"]["estimate"] == pytest.approx(0.08)
    assert col.HEAD_ONLY in r["differences"]["head_vs_marching_cubes"]
    assert "The mesh share:" in capsys.readouterr().out


def test_collector_merges_an_earlier_fine_tune_run_and_moves_only_once(tmp_path):
    out = tmp_path / "acdc_fold0.json"
    assert col.main(["--work", str(fake_work(tmp_path / "a")), "--out", str(out)]) == 0
    assert not (tmp_path / "acdc_fold0_400it.json").exists()  # nothing of the 400-iteration study to move
    first = strict_json(out)
    # a later run whose work folder lacks the Betti arm: the row and its per-case values are kept, marked
    assert col.main(["--work", str(fake_work(tmp_path / "b", with_betti=False)), "--out", str(out)]) == 0
    r = strict_json(out)
    assert r["trainers"]["nnUNetTrainerBetti_acdcFT"]["from_earlier_run"] is True
    assert r["per_case"]["nnUNetTrainerBetti_acdcFT"] == first["per_case"]["nnUNetTrainerBetti_acdcFT"]
    assert r["differences"]["vs_control"]["nnUNetTrainerBetti_acdcFT"] == \
        first["differences"]["vs_control"]["nnUNetTrainerBetti_acdcFT"]
    assert "from_earlier_run" not in r["trainers"][col.CONTROL]
    assert not (tmp_path / "acdc_fold0_400it.json").exists()
    assert col.main(["--work", str(fake_work(tmp_path / "c", with_betti=False)), "--out", str(out),
                     "--no-merge"]) == 0
    assert "nnUNetTrainerBetti_acdcFT" not in strict_json(out)["trainers"]


def test_move_keeps_an_existing_400it_file(tmp_path):
    out, hist = tmp_path / "acdc_fold0.json", tmp_path / "acdc_fold0_400it.json"
    out.write_text(json.dumps({"trainers": {}}))
    hist.write_text(json.dumps({"history": True}))
    assert col.move_earlier_protocol(str(out)) is None
    assert json.loads(hist.read_text()) == {"history": True}


# ------------------------------------------------------------------------------------------------ marching cubes
DJ = {"labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3}, "file_ending": ".nii.gz",
      "channel_names": {"0": "cineMRI"}, "numTraining": 2, "topology": acdc_topology()}
SPACING_ZYX = (4.0, 1.5, 1.5)


def heart(shape=(8, 24, 28)):
    """Short-axis stack: in slices 1..6 an LV disk in a MYO ring, an RV block beside it (a background gap): every
    rule and prior of the ACDC topology block holds."""
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    r2 = (yy - 12) ** 2 + (xx - 10) ** 2
    inside = (zz >= 1) & (zz <= 6)
    lab[inside & (r2 <= 36)] = 2
    lab[inside & (r2 <= 9)] = 3
    lab[1:7, 8:16, 19:25] = 1
    return lab


def write(path, arr):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(SPACING_ZYX)))
    img.SetOrigin((10.0, -5.0, 3.0))
    # an oblique direction, as the external LGE volumes have
    c, s = math.cos(0.4), math.sin(0.4)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))


@pytest.fixture()
def seg_folder(tmp_path):
    folder = tmp_path / "seg"
    folder.mkdir()
    write(folder / "case0.nii.gz", heart())
    no_rv = heart()
    no_rv[no_rv == 1] = 0
    write(folder / "case1.nii.gz", no_rv)
    (tmp_path / "dataset.json").write_text(json.dumps(DJ))
    return folder


def test_marching_cubes_folder_in_predict_meshes_layout(seg_folder, tmp_path):
    from nnunet_topo.mesh_evaluation import evaluate_mesh_folder
    from nnunet_topo.cli.segmentation_meshes import main
    from nnunet_topo.segmentation_meshes import SegmentationMeshError, mesh_segmentation_folder

    out = tmp_path / "mc"
    summary = mesh_segmentation_folder(str(seg_folder), str(out), str(tmp_path / "dataset.json"), show_progress=False)
    listing = json.loads((out / "meshes.json").read_text())
    assert listing == summary
    assert listing["structures"] == ["LV_endo", "LV_epi", "RV"] and listing["format"] == ".vtp"
    assert listing["cases"]["case0"]["files"] == {s: f"case0_{s}.vtp" for s in ("LV_endo", "LV_epi", "RV")}
    assert all((out / f).is_file() for f in listing["cases"]["case0"]["files"].values())
    # a case with an empty mesh structure is recorded, not dropped
    assert listing["cases_without_mesh"] == ["case1"]
    assert listing["cases"]["case1"]["files"] == {} and "RV" in listing["cases"]["case1"]["error"]
    assert not list(out.glob("case1_*"))
    # the mesh evaluator reads the folder; against its own label map, marching cubes at level 0.5 is exact on the
    # voxel centres (mesh Dice 1), encloses about the voxels' volume, and its meshes do not overlap
    ev = evaluate_mesh_folder(str(seg_folder), str(out), DJ, chill=True, show_progress=False, num_samples=2000)
    (case,) = ev["metric_per_case"]
    assert case["case"] == "case0"
    for s, m in case["mesh_metrics"].items():
        assert m["Dice"] == pytest.approx(1.0), s
        assert 0.9 < m["volume_mm3"] / m["volume_ref_mm3"] < 1.0, s  # corners cut: a little less
        assert m["Chamfer_mm"] < 0.5, s
    assert case["mesh_topology"]["TVS"] < 0.01
    # the command: exit code 1 when a case got no mesh; 2 when outputs exist (no --overwrite)
    assert main(["-i", str(seg_folder), "-o", str(tmp_path / "mc2"), "-djfile", str(tmp_path / "dataset.json")]) == 1
    assert main(["-i", str(seg_folder), "-o", str(tmp_path / "mc2"), "-djfile", str(tmp_path / "dataset.json")]) == 2
    assert main(["-i", str(seg_folder), "-o", str(tmp_path / "mc2"), "-djfile", str(tmp_path / "dataset.json"),
                 "--overwrite"]) == 1
    with pytest.raises(SegmentationMeshError, match="differ"):
        mesh_segmentation_folder(str(seg_folder), str(seg_folder), DJ)
    with pytest.raises(SegmentationMeshError, match="no label maps"):
        mesh_segmentation_folder(str(tmp_path / "mc"), str(tmp_path / "mc3"), DJ)


# ------------------------------------------------------------------------------------------------ label-free
def test_label_free_case_counts_violations_and_priors():
    from nnunet_topo.label_free import label_free_case
    from nnunet_topo.topology_spec import spec_from_dataset_json

    spec = spec_from_dataset_json(DJ)
    good = label_free_case(heart(), spec)
    assert not any(good["violated"].values()) and good["lacking_labels"] == []
    assert good["meets_prior_3d"] == {"LV_epi": True} and good["meets_priors_2d"]
    assert good["slices_2d"] == good["slices_meeting_prior_2d"] == {"LV": 6, "LV_epi": 6, "MYO": 6, "RV": 6}
    bad = heart()
    bad[3, 12, 14:17] = 0  # cut the MYO ring on slice 3 (not an end slice): the LV touches background there
    r = label_free_case(bad, spec)
    incl = [n for n in r["violated"] if n.startswith("inclusion")]
    assert len(incl) == 1 and r["violated"][incl[0]] and r["violating_voxels"][incl[0]] > 0
    assert r["SVR_per_rule"][incl[0]] == pytest.approx(1 / 6)  # 1 of the 6 foreground slices
    assert r["meets_priors_2d"]  # an open MYO ring (C) and a notched LV+MYO disk are allowed shapes
    holed = heart()
    holed[4, 12, 10] = 0  # a hole in the LV (and LV+MYO) on slice 4: (1, 1) is not allowed; a cavity in 3D
    r = label_free_case(holed, spec)
    assert r["slices_meeting_prior_2d"] == {"LV": 5, "LV_epi": 5, "MYO": 6, "RV": 6} and not r["meets_priors_2d"]
    assert r["betti_3d"]["LV_epi"] == [1, 0, 1] and r["meets_prior_3d"] == {"LV_epi": False}
    no_rv = heart()
    no_rv[no_rv == 1] = 0
    assert label_free_case(no_rv, spec)["lacking_labels"] == ["RV"]


def test_label_free_folder_with_meshes(seg_folder, tmp_path):
    from nnunet_topo.cli.label_free import main
    from nnunet_topo.label_free import label_free_folder
    from nnunet_topo.segmentation_meshes import mesh_segmentation_folder

    mesh_segmentation_folder(str(seg_folder), str(tmp_path / "mc"), DJ, show_progress=False)
    out = tmp_path / "lf.json"
    r = label_free_folder(str(seg_folder), DJ, mesh_folder=str(tmp_path / "mc"), output_file=str(out),
                          show_progress=False)
    assert json.loads(out.read_text())["summary"] == r["summary"]
    s = r["summary"]
    assert s["num_cases"] == 2 and s["num_cases_meshed"] == 1 and s["share_meshed"] == 0.5
    assert s["cases_without_mesh"] == ["case1"] and s["share_cases_lacking"]["RV"] == 0.5
    assert s["share_slices_meeting_prior_2d"]["all"] == 1.0
    case0 = r["metric_per_case"][0]
    assert case0["meshed"] and set(case0["mesh"]["mesh_volume_mm3"]) == {"LV_endo", "LV_epi", "RV"}
    assert case0["mesh"]["mesh_TVS_over_mesh_volumes"] < 0.01  # marching cubes of disjoint labels barely overlap
    assert "RV" in r["metric_per_case"][1]["mesh_error"]
    assert main([str(seg_folder), "-djfile", str(tmp_path / "dataset.json"), "-o", str(tmp_path / "x.json")]) == 0
    assert main([str(tmp_path / "nowhere"), "-djfile", str(tmp_path / "dataset.json")]) == 2


# ------------------------------------------------------------------------------------------------ study.sh, run
STUBS = r'''
stub_log() { echo "$*" >> "$STUB_LOG"; }
_arg() { local flag=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$flag" ] && { echo "$2"; return; }; shift; done; }
nnUNetv2_topo_evaluate_folder() {
  stub_log "evaluate $*"; local o; o=$(_arg -o "$@")
  case " $* " in *" --mesh_folder "*) cp "$FAKE/mesh_summary.json" "$o" ;; *) cp "$FAKE/label_summary.json" "$o" ;; esac
}
nnUNetv2_topo_predict_meshes() {  # exit code 1: a case without mesh, as the real command
  stub_log "predict_meshes $*"; local o; o=$(_arg -o "$@"); mkdir -p "$o"; cp -r "$FAKE/meshes/." "$o/"; return 1
}
nnUNetv2_topo_refine() {
  stub_log "refine $*"; local o; o=$(_arg -o "$@"); mkdir -p "$o"; cp "$FAKE"/seg/*.nii.gz "$o/"
  echo '{"steps": 10, "lr": 0.0001, "lambda": 0.01, "keep_present": true, "cases": {}}' > "$o/refinement_summary.json"
}
nnUNetv2_predict() { stub_log "predict $*"; local o; o=$(_arg -o "$@"); mkdir -p "$o"; cp "$FAKE"/seg/*.nii.gz "$o/"; }
export -f stub_log _arg nnUNetv2_topo_evaluate_folder nnUNetv2_topo_predict_meshes nnUNetv2_topo_refine nnUNetv2_predict
'''


@pytest.mark.slow
def test_study_stages_evaluate_external_collect_with_stubbed_nnunet(seg_folder, tmp_path):
    """study.sh's stages after finetune, with nnU-Net's and our model commands replaced by shell functions that copy
    tiny outputs (a real evaluator summary, marching-cubes meshes with one unmeshed case and exit code 1); the
    marching-cubes step, the label-free measures, the archive and the collector run for real."""
    from nnunet_topo.evaluation import compute_topology_metrics_on_folder
    from nnunet_topo.segmentation_meshes import mesh_segmentation_folder

    fake = tmp_path / "fake"
    fake.mkdir()
    os.rename(seg_folder, fake / "seg")
    mesh_segmentation_folder(str(fake / "seg"), str(fake / "meshes"), DJ, show_progress=False)
    for f in (fake / "seg").glob("*.nii.gz"):  # predict_meshes writes the segmentations beside the meshes
        (fake / "meshes" / f.name).write_bytes(f.read_bytes())
    kw = dict(show_progress=False, chill=True)
    s = compute_topology_metrics_on_folder(str(fake / "seg"), str(fake / "seg"), DJ, {}, **kw,
                                           output_file=str(fake / "label_summary.json"))
    assert s["metric_per_case"]
    compute_topology_metrics_on_folder(str(fake / "seg"), str(fake / "seg"), DJ, {}, **kw,
                                       mesh_folder=str(fake / "meshes"), output_file=str(fake / "mesh_summary.json"))
    # a work folder after stage finetune: every model's fold-0 validation outputs
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / ".nnunet_topo_study").touch()
    for stage in ("data", "backbone", "finetune"):
        (work / "logs" / f"stage_{stage}.done").touch()
    raw = work / "raw" / col.NAME
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps(DJ))
    arms = [col.BACKBONE] + [trainer for trainer, parent in ft_queue() if parent != "scratch"]
    scratch = [trainer for trainer, parent in ft_queue() if parent == "scratch"]  # trained, so only evaluated here
    assert set(col.ARMS) <= set(arms + scratch) and col.SCRATCH_PROJPOOL in scratch
    for tr in arms + scratch:
        val = work / "results" / col.NAME / f"{tr}__{col.PLANS_CONF}" / "fold_0" / "validation"
        val.mkdir(parents=True)
        (val / "summary.json").write_text("{}")
        for f in (fake / "seg").glob("*.nii.gz"):
            (val / f.name).write_bytes(f.read_bytes())
    (tmp_path / "lge").mkdir()
    (tmp_path / "stubs.sh").write_text(STUBS)
    results = tmp_path / "results"
    env = dict(os.environ, NNUNET_TOPO_STUDY_DIR=str(work), STUDY_SKIP_SETUP="1", STUDY_RESULTS_DIR=str(results),
               STUDY_STAGES="scratch evaluate external collect", STUDY_EXTERNAL_IMAGES=str(tmp_path / "lge"),
               FAKE=str(fake),
               STUB_LOG=str(tmp_path / "stub.log"))
    cmd = f"source {tmp_path / 'stubs.sh'} && bash {STUDY}"
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    calls = (tmp_path / "stub.log").read_text().splitlines()
    mesh_arms = [a for a in arms if a.startswith(("nnUNetTrainerMesh_", "nnUNetTrainerTPM", "nnUNetTrainerMIE"))]
    assert len([c for c in calls if c.startswith("predict_meshes")]) == len(mesh_arms) + 3  # + 3 external
    assert len([c for c in calls if c.startswith("evaluate")]) == len(arms + scratch) + len(mesh_arms) + 2  # refine, MC
    assert all("--chill" in c for c in calls if c.startswith("evaluate") and "--mesh_folder" in c)
    assert len([c for c in calls if c.startswith("refine")]) == 2
    assert len([c for c in calls if c.startswith("predict ")]) == 1
    mc = json.loads((work / f"meshes_{col.MARCHING_CUBES}" / "meshes.json").read_text())
    assert mc["cases_without_mesh"] == ["case1"]
    for row in (col.CONTROL, col.REFINE, "nnUNetTrainerMesh_acdcFT", "nnUNetTrainerTPM_acdcFT2",
                "nnUNetTrainerMIE_acdcFT"):
        lf = json.loads((work / "eval" / f"external_{row}_label_free.json").read_text())
        assert lf["summary"]["num_cases"] == 2
        assert ("share_meshed" in lf["summary"]) == (row.startswith(("nnUNetTrainerMesh_", "nnUNetTrainerTPM",
                                                                      "nnUNetTrainerMIE")))
    import tarfile
    with tarfile.open(results / "external_lge_predictions.tar.gz") as tar:
        names = tar.getnames()
    assert "external_lge_predictions/README.txt" in names
    assert f"external_lge_predictions/{col.REFINE}/case0.nii.gz" in names
    assert "external_lge_predictions/nnUNetTrainerTPM_acdcFT2/case0_RV.vtp" in names
    assert "external_lge_predictions/nnUNetTrainerTPM_acdcFT2/meshes.json" in names
    assert f"external_lge_predictions/label_free/external_{col.CONTROL}_label_free.json" in names
    r = strict_json(results / "acdc_fold0.json")
    assert r["protocol"] == "fine-tune" and r["missing"] == []
    assert r["trainers"][col.MARCHING_CUBES]["mesh"]["cases_without_mesh"] == ["case1"]
    assert r["trainers"]["nnUNetTrainerMesh_acdcFT"]["mesh"]["volume_ratio_share_in_0.85_1.15"]["RV"] == 0.5
    repair_arms = repair_arms_of_study()
    assert repair_arms and set(repair_arms) < set(mesh_arms)
    for arm in mesh_arms:  # the real repair ran on REPAIR_ARMS' meshes (the marching-cubes meshes here), only there
        if arm not in repair_arms:
            assert "repair" not in r["trainers"][arm], arm
            continue
        rep = r["trainers"][arm]["repair"]
        assert rep["cases_repaired"] + len(rep["cases_not_repaired"]) == len(mc["cases"]) - 1, (arm, rep)  # case1: none
    assert r["differences"]["vs_control"][col.REFINE]["Dice_LV"]["ci95"] == [0.0, 0.0]
    assert set(r["external_lge"]) == {col.CONTROL, col.REFINE, "nnUNetTrainerMesh_acdcFT",
                                      "nnUNetTrainerTPM_acdcFT2", "nnUNetTrainerMIE_acdcFT"}
    steps = {s["step"] for s in r["stage_seconds"]}
    assert {"evaluate", "external", f"marching_cubes_{col.CONTROL}", "external_pack"} <= steps
    assert (work / "logs" / "tables.md").read_text().count("| goal |") == 1
    assert (work / "logs" / "stage_evaluate.done").exists() and not (work / "logs" / "stage_collect.done").exists()
    # resumable: a second run redoes only collect
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stage evaluate: done" in p.stdout and "stage external: done" in p.stdout
    assert (tmp_path / "stub.log").read_text().splitlines() == calls


def repair_arms_of_study():
    """study.sh's REPAIR_ARMS."""
    block = open(STUDY).read().split("REPAIR_ARMS=(", 1)[1].split(")", 1)[0]
    return block.split()


def ft_queue():
    """study.sh's FT_QUEUE as (trainer, parent) pairs."""
    text = open(STUDY).read()
    block = text.split("FT_QUEUE=(", 1)[1].split(")", 1)[0]
    return [tuple(w.split(":")) for w in block.split()]


# a trainer's fold folder after nnUNetv2_train: a checkpoint of random weights, validation outputs; FAIL names the
# trainers that fail; "start"/"end" lines (with the -pretrained_weights argument and the threads) show the schedule
TRAIN_STUBS = r'''
nnUNetv2_train() {
  local tr pw d; tr=$(_arg -tr "$@"); pw=$(_arg -pretrained_weights "$@")
  d="$nnUNet_results/Dataset127_ACDCh5/${tr}__nnUNetPlansMesh4.5mm__3d_mesh/fold_0"
  stub_log "start $tr ${pw:-none} threads=${NNUNET_TOPO_CPU_THREADS:-all}/${OMP_NUM_THREADS:-all}"
  case " ${FAIL:-} " in *" $tr "*) stub_log "fail $tr"; return 1 ;; esac
  mkdir -p "$d/validation"
  python -c "import sys, torch; torch.manual_seed(len(sys.argv[2])); torch.save({'network_weights': {'a.weight': \
torch.randn(4, 3) * 3, 'a.num_batches': torch.tensor(7)}, 'trainer_name': sys.argv[2], 'init_args': {}, \
'current_epoch': 12, 'optimizer_state': {'big': torch.zeros(10)}}, sys.argv[1])" "$d/checkpoint_final.pth" "$tr"
  cp "$FAKE"/seg/*.nii.gz "$d/validation/"; echo '{}' > "$d/validation/summary.json"
  stub_log "end $tr"
}
nnUNetv2_topo_repair_meshes() {
  stub_log "repair $*"; local o; o=$(_arg -o "$@"); mkdir -p "$o"
  echo '{"gap_mm": 0.5, "cases": {}}' > "$o/repair.json"
}
export -f nnUNetv2_train nnUNetv2_topo_repair_meshes
'''


def stub_work(tmp_path, name, seg_folder, done=("data",)):
    """A work folder of study.sh after the given stages, and the fake outputs the stubs copy."""
    fake = tmp_path / "fake"
    if not fake.exists():
        fake.mkdir()
        os.rename(seg_folder, fake / "seg")
        (fake / "meshes").mkdir()
        (fake / "meshes" / "meshes.json").write_text(json.dumps({"cases": {}, "cases_without_mesh": []}))
        (fake / "label_summary.json").write_text(json.dumps(label_summary()))
        (fake / "mesh_summary.json").write_text(json.dumps(mesh_summary(0.01)))
        (tmp_path / "stubs.sh").write_text(STUBS + TRAIN_STUBS)
    work = tmp_path / name
    (work / "logs").mkdir(parents=True)
    (work / "val_images").mkdir()
    (work / ".nnunet_topo_study").touch()
    for stage in done:
        (work / "logs" / f"stage_{stage}.done").touch()
    raw = work / "raw" / col.NAME
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps(DJ))
    return work


def run_study(tmp_path, work, stages, **extra):
    env = dict(os.environ, NNUNET_TOPO_STUDY_DIR=str(work), STUDY_SKIP_SETUP="1", STUDY_STAGES=stages,
               STUDY_RESULTS_DIR=str(tmp_path / "results"), FAKE=str(tmp_path / "fake"),
               STUB_LOG=str(work / "stub.log"))
    env.update(extra)
    p = subprocess.run(["bash", "-c", f"source {tmp_path / 'stubs.sh'} && bash {STUDY}"], env=env,
                       capture_output=True, text=True, timeout=900)
    calls = (work / "stub.log").read_text().splitlines() if (work / "stub.log").exists() else []
    return p, calls


@pytest.mark.slow
def test_study_archives_the_backbone_and_schedules_each_arm_after_its_parent(seg_folder, tmp_path):
    """Stages backbone and finetune with nnUNetv2_train (and the model commands) stubbed: the backbone is archived in
    float16 and restored, not retrained, in a new work folder; every arm starts from its parent's final checkpoint
    after the parent ended, two at a time, and its row is in the results JSON; a failed parent stops only its
    children."""
    import torch

    archive = tmp_path / "results" / "acdc_backbone_fp16.pt"
    work = stub_work(tmp_path, "work", seg_folder)
    p, calls = run_study(tmp_path, work, "backbone finetune")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the backbone: trained once, archived, every arm starts from its rounded weights (named in backbone_checkpoint)
    start = work / "backbone_start.pth"
    assert (work / "backbone_checkpoint.txt").read_text().strip() == str(start)
    trained = torch.load(work / "results" / col.NAME / f"{col.BACKBONE}__{col.PLANS_CONF}" / "fold_0" /
                         "checkpoint_final.pth", weights_only=False)["network_weights"]
    got = torch.load(start, weights_only=False)
    assert got["network_weights"]["a.weight"].dtype == torch.float32
    assert torch.equal(got["network_weights"]["a.weight"], trained["a.weight"].half().float())
    assert not torch.equal(got["network_weights"]["a.weight"], trained["a.weight"])  # rounded, not copied
    assert got["current_epoch"] == 12 and "optimizer_state" not in got
    sha = (work / "backbone_id.txt").read_text().strip()
    assert torch.load(archive, weights_only=False)["sha256"] == sha
    assert [c for c in calls if c.startswith("predict ")] and "-chk checkpoint_fp16.pth" in \
        next(c for c in calls if c.startswith("predict "))  # the rounded backbone's own validation
    # the schedule: parents end before their children start, from the parent's checkpoint; two at a time
    queue = ft_queue()
    assert [q[0] for q in queue[:2]] == [col.CONTROL, col.MESH_FT]
    starts = {c.split()[1]: (i, c.split()[2]) for i, c in enumerate(calls) if c.startswith("start ")}
    ends = {c.split()[1]: i for i, c in enumerate(calls) if c.startswith("end ")}
    for tr, parent in queue:
        if parent == "scratch":  # issue 27's pair: nnU-Net's random initialisation, no -pretrained_weights
            assert starts[tr][1] == "none", tr
            continue
        want = str(start) if parent == "backbone" else \
            str(work / "results" / col.NAME / f"{parent}__{col.PLANS_CONF}" / "fold_0" / "checkpoint_final.pth")
        assert starts[tr][1] == want, tr
        assert ends[parent if parent != "backbone" else col.BACKBONE] < starts[tr][0], tr
    assert {tr for tr, parent in queue if parent == "scratch"} == {col.SCRATCH_PROJPOOL, col.SCRATCH_PLAIN}
    running = peak = 0
    for c in calls:
        running += c.startswith("start ") - c.startswith("end ")
        peak = max(peak, running)
    assert peak == 2
    # two at a time: one thread each (nnU-Net's run_training would give each all cores)
    assert {c.split()[3] for c in calls if c.startswith("start ") and c.split()[1] != col.BACKBONE} == {"threads=1/1"}
    r = strict_json(tmp_path / "results" / "acdc_fold0.json")
    # every arm, and the control's refinement and marching cubes, right after the control's training
    assert set(r["trainers"]) == {tr for tr, _ in queue} | {col.REFINE, col.MARCHING_CUBES}
    assert r["backbone"]["weights_sha256"] == sha and "label_fp16_start" in r["backbone"]
    repaired = sorted(c.split(" -i ")[1].split()[0].rsplit("meshes_", 1)[1] for c in calls if c.startswith("repair "))
    assert repaired == sorted(repair_arms_of_study())

    # run again (a new session): nothing is trained again, and no arm gets a second, 0-second training record
    tsv = work / "logs" / "stage_seconds.tsv"
    trained_steps = [ln.split("\t")[0] for ln in tsv.read_text().splitlines() if ln.startswith("train_")]
    assert sorted(trained_steps) == sorted(f"train_{tr}" for tr, _ in queue)
    before = len(calls)
    p, calls = run_study(tmp_path, work, "backbone finetune")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [c for c in calls[before:] if c.startswith("start ")]  # the stub log is appended to
    assert [ln.split("\t")[0] for ln in tsv.read_text().splitlines() if ln.startswith("train_")] == trained_steps

    # a new work folder (the machine is gone): the archive is restored, no backbone trained, the same weights
    again = stub_work(tmp_path, "again", seg_folder)
    p, calls = run_study(tmp_path, again, "backbone")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [c for c in calls if c.startswith("start ")]
    assert (again / "backbone_id.txt").read_text().strip() == sha
    assert torch.equal(torch.load(again / "backbone_start.pth", weights_only=False)["network_weights"]["a.weight"],
                       got["network_weights"]["a.weight"])
    assert strict_json(tmp_path / "results" / "acdc_fold0.json")["trainers"].keys() == r["trainers"].keys()

    # a parent that fails: its children never start, the others run, the stage fails naming the children
    failing = stub_work(tmp_path, "failing", seg_folder, done=("data",))
    p, calls = run_study(tmp_path, failing, "backbone finetune", FAIL=col.MESH_FT,
                         STUDY_RESULTS_DIR=str(tmp_path / "results_failing"),
                         STUDY_BACKBONE_ARCHIVE=str(archive))
    assert p.returncode == 1
    children = [tr for tr, parent in queue if parent == col.MESH_FT]
    assert children and all(tr in p.stderr for tr in children)
    started = {c.split()[1] for c in calls if c.startswith("start ")}
    assert not started & set(children)
    ended = {c.split()[1] for c in calls if c.startswith("end ")}
    assert ended == {tr for tr, parent in queue if col.MESH_FT not in (tr, parent)}


def test_collector_keeps_earlier_rows_only_from_the_same_backbone(tmp_path):
    out = tmp_path / "acdc_fold0.json"
    a = fake_work(tmp_path / "a")
    (a / col.BACKBONE_ID_FILE).write_text("aa" * 32 + "\n")
    assert col.main(["--work", str(a), "--out", str(out)]) == 0
    b = fake_work(tmp_path / "b", with_betti=False)
    (b / col.BACKBONE_ID_FILE).write_text("bb" * 32 + "\n")  # another backbone: the Betti row is not comparable
    assert col.main(["--work", str(b), "--out", str(out)]) == 0
    r = strict_json(out)
    assert "nnUNetTrainerBetti_acdcFT" not in r["trainers"] and r["backbone"]["weights_sha256"] == "bb" * 32
    (b / col.BACKBONE_ID_FILE).write_text("aa" * 32 + "\n")
    assert col.main(["--work", str(a), "--out", str(out)]) == 0
    c = fake_work(tmp_path / "c", with_betti=False)
    (c / col.BACKBONE_ID_FILE).write_text("aa" * 32 + "\n")
    assert col.main(["--work", str(c), "--out", str(out)]) == 0  # same backbone: kept, marked
    assert strict_json(out)["trainers"]["nnUNetTrainerBetti_acdcFT"]["from_earlier_run"] is True


def test_backbone_archive_round_trip_loads_with_nnunets_own_loader(tmp_path):
    """examples/acdc/backbone_archive.py on a real nnU-Net network: save -> restore gives the float16-rounded weights
    that nnU-Net's load_pretrained_weights puts into a fresh network; a damaged archive is refused."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    arc = _module("backbone_archive_t", "examples", "acdc", "backbone_archive.py")

    def net():
        return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), 2, 4, 2, conv_bias=True,
                             norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                             nonlin=torch.nn.LeakyReLU)
    torch.manual_seed(0)
    trained = net()
    with torch.no_grad():
        for prm in trained.parameters():
            prm.add_(torch.randn_like(prm) * 0.3)
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": trained.state_dict(), "optimizer_state": {}, "trainer_name": "T",
                "init_args": {"fold": 0}, "current_epoch": 3, "inference_allowed_mirroring_axes": None}, ckpt)
    sha = arc.save(str(ckpt), str(tmp_path / "a" / "arch.pt"), str(tmp_path / "w1" / "start.pth"))
    assert arc.restore(str(tmp_path / "a" / "arch.pt"), str(tmp_path / "w2" / "start.pth")) == sha
    assert (tmp_path / "w2" / arc.ID_FILE).read_text().strip() == sha
    assert os.path.getsize(tmp_path / "a" / "arch.pt") < 0.7 * os.path.getsize(ckpt)
    fresh = net()
    load_pretrained_weights(fresh, str(tmp_path / "w2" / "start.pth"))  # nnU-Net's own -pretrained_weights loader
    for k, v in trained.state_dict().items():
        if ".seg_layers." in k:  # nnU-Net re-initialises them (the topology trainers reload them, pretrained.py)
            continue
        want = v.half().float() if v.is_floating_point() else v
        assert torch.equal(fresh.state_dict()[k], want), k
        if v.is_floating_point() and v.numel() > 8:
            assert (want - v).abs().max() <= v.abs().max() * 2 ** -11 + 6e-8, k
    assert arc.main(["id", str(tmp_path / "w1" / "start.pth")]) == 0
    damaged = torch.load(tmp_path / "a" / "arch.pt", weights_only=False)
    key = next(k for k, v in damaged["network_weights_fp16"].items() if v.is_floating_point())
    damaged["network_weights_fp16"][key].view(-1)[0] += 1
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged"):
        arc.restore(str(tmp_path / "damaged.pt"), str(tmp_path / "w3" / "start.pth"))


def test_backbone_dice_goals_on_pseudo_dice_history():
    from nnunet_topo.trainers.nnUNetTrainer_acdcFinetune import ACDC_BACKBONE_GOALS, pseudo_dice_goals_met

    index = {"RV": 0, "MYO": 1, "LV": 2}
    met = [0.80, 0.80, 0.95]
    assert pseudo_dice_goals_met([met, met], index, ACDC_BACKBONE_GOALS)
    assert not pseudo_dice_goals_met([met], index, ACDC_BACKBONE_GOALS)  # one epoch is not the window
    # the mean of the last two epochs decides: one low MYO epoch (0.68) keeps the mean below 0.75
    assert not pseudo_dice_goals_met([met, [0.80, 0.68, 0.95]], index, ACDC_BACKBONE_GOALS)
    assert not pseudo_dice_goals_met([met, met, [0.80, 0.80, 0.85]], index, ACDC_BACKBONE_GOALS)  # LV 0.90 needed
    # older epochs do not count
    assert pseudo_dice_goals_met([[0.1, 0.1, 0.1], met, met], index, ACDC_BACKBONE_GOALS)
