#!/usr/bin/env python
"""Collect the 400-iteration ACDC study (examples/acdc/study_400it.sh, history) into
documentation/results/acdc_fold0_400it.json and print its tables. The fine-tune study has its own collector,
examples/acdc/collect_results.py.

Reads, in the study's work folder: ``eval/<TRAINER>_label.json`` (the evaluator on nnU-Net's fold-0 validation
outputs), ``eval/<TRAINER>_mesh.json`` (the evaluator with ``--mesh_folder`` on nnUNetv2_topo_predict_meshes'
output), ``eval/nnUNetTrainer_acdcStudy+refine_label.json``, and each model folder's ``debug.json`` (epochs,
iterations) and ``training_log_*.txt`` (the sum of nnU-Net's "Epoch time" lines = training seconds, validation and
inference excluded). Rows are named after the real trainers (``nnUNetTrainerTPM``, not the ``_acdcStudy`` variant
that only sets the budget); a trainer whose evaluation is missing is listed under ``missing``.

With ``--out`` an existing JSON is merged, not replaced: a row that this work folder does not have (e.g. measured
in an earlier run of the study, on another machine, whose work folder is gone) is kept and marked
``"from_earlier_run": true``; a row this work folder has replaces the old one. ``--no-merge`` writes only this
folder's rows.
"""
import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, Optional

SUFFIX = "_acdcStudy"
NAME = "Dataset127_ACDCh5"
PLANS_CONF = "nnUNetPlansMesh4.5mm__3d_mesh"
ORDER = ["nnUNetTrainer", "nnUNetTrainer+refine", "nnUNetTrainer+refine_lam0.005", "nnUNetTrainerProjPool", "nnUNetTrainerBetti", "nnUNetTrainerMesh",
         "nnUNetTrainerTPM", "nnUNetTrainerMIE", "nnUNetTrainerTPM_warmup10"]


def _load(path: str) -> Optional[dict]:
    return json.load(open(path)) if os.path.exists(path) else None


def training_budget(model_fold: str) -> Dict[str, float]:
    """``{"iterations", "seconds", "epochs"}`` of a trained fold (nnU-Net's debug.json and training log)."""
    out: Dict[str, float] = {}
    dbg = _load(os.path.join(model_fold, "debug.json"))
    if dbg:
        ep, it = int(dbg["num_epochs"]), int(dbg["num_iterations_per_epoch"])
        out.update(epochs=ep, iterations=ep * it, batch_size=int(dbg.get("batch_size", 0)) or None)
    times = []
    for log in sorted(glob.glob(os.path.join(model_fold, "training_log_*.txt"))):
        times += [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", open(log).read())]
    if times:
        out.update(seconds=round(sum(times), 1), epochs_logged=len(times))
    return out


def label_block(summary: dict) -> dict:
    names = summary["label_names"]
    mean, topo = summary["mean"], summary["topology_mean"]
    fg = summary["foreground_mean"]
    return {
        "Dice": {names[k]: v["Dice"] for k, v in mean.items()},
        "HD95_mm": {names[k]: v.get("HD95") for k, v in mean.items()},
        "Dice_foreground_mean": fg["Dice"],
        "TVS": topo["TVS"], "TVS_per_rule": topo.get("TVS_per_rule"),
        "VR": topo["VR"], "VR_per_rule": topo.get("VR_per_rule"), "SVR_per_rule": topo.get("SVR_per_rule"),
        "betti_error_3d": topo["betti_error_3d"], "betti_error_2d": topo["betti_error_2d"],
        "betti_prior_error_3d": topo.get("betti_prior_error_3d"),
        "topologically_correct": topo["topologically_correct"],
        "topologically_correct_2d": topo.get("topologically_correct_2d"),
        "slices_meeting_prior_2d": topo.get("slices_meeting_prior_2d"),
        "betti_prior_error_2d": topo.get("betti_prior_error_2d"),
        "cce_3d": topo["cce_3d"], "cce_2d": topo["cce_2d"],
        "num_cases": topo["num_cases"],
    }


def mesh_block(summary: dict) -> dict:
    mm, mt = summary["mesh_mean"], summary["mesh_topology_mean"]
    num = summary.get("mesh_mean_num_cases", {})
    return {
        "Dice": {s: v["Dice"] for s, v in mm.items()},
        "Chamfer_mm": {s: v["Chamfer_mm"] for s, v in mm.items()},
        "HD95_mm": {s: v["HD95_mm"] for s, v in mm.items()},
        "laplacian_energy_mm2": {s: v["laplacian_energy_mm2"] for s, v in mm.items()},
        "TVS": mt["TVS"], "TVS_per_rule": mt.get("TVS_per_rule"), "grid_mm": mt.get("grid_mm"),
        "num_cases": {s: v.get("Dice") for s, v in num.items()},
    }


def collect(work: str) -> dict:
    split = _load(os.path.join(work, "preprocessed", NAME, "splits_final.json"))
    ds = _load(os.path.join(work, "raw", NAME, "dataset.json")) or {}
    result = {"split": "nnU-Net 5-fold (nnU-Net's ACDC split by patient), fold 0",
              "num_validation_cases": len(split[0]["val"]) if split else None,
              "spacing_assumed_mm": ds.get("spacing_assumed_mm"),
              "study_spacing_mm": [10.0, 4.5, 4.5], "configuration": PLANS_CONF.replace("__", " "),
              "trainers": {}, "missing": []}
    for path in sorted(glob.glob(os.path.join(work, "eval", "*_label.json"))):
        tr = os.path.basename(path)[: -len("_label.json")]
        name = tr.replace(SUFFIX, "")
        row: dict = {"trainer_class": tr.split("+")[0]}
        if "+refine" not in tr:
            row.update(training_budget(os.path.join(work, "results", NAME, f"{tr}__{PLANS_CONF}", "fold_0")))
        else:
            # refine rows: folder refine<suffix> (e.g. "+refine_lam0.005" -> refine_lam0.005), written by study.sh or by hand
            ref = _load(os.path.join(work, "refine" + tr.split("+refine", 1)[1], "refinement_summary.json")) or {}
            row["refinement"] = {k: ref[k] for k in ("steps", "lr", "lambda", "downsample") if k in ref}
        row["label"] = label_block(json.load(open(path)))
        mesh = _load(os.path.join(work, "eval", f"{tr}_mesh.json"))
        if mesh and "mesh_mean" in mesh:
            row["mesh"] = mesh_block(mesh)
        result["trainers"][name] = row
    result["missing"] = [n for n in ORDER if n not in result["trainers"]]
    return result


def merge_earlier(new: dict, old: dict) -> dict:
    """``new`` plus the trainer rows of ``old`` that ``new`` lacks (marked ``from_earlier_run``); ``missing`` again."""
    for name, row in old.get("trainers", {}).items():
        if name not in new["trainers"]:
            new["trainers"][name] = dict(row, from_earlier_run=True)
    new["missing"] = [n for n in ORDER if n not in new["trainers"]]
    return new


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_tables(r: dict) -> None:
    rows = [n for n in ORDER if n in r["trainers"]] + [n for n in r["trainers"] if n not in ORDER]
    print(f"\nACDC, {r['split']}, {r['num_validation_cases']} validation volumes; assumed spacing "
          f"{r['spacing_assumed_mm']} mm, study spacing {r['study_spacing_mm']} mm\n")
    print("| trainer | iters | train s | Dice RV | Dice MYO | Dice LV | HD95 LV mm | TVS | VR | Betti err 3D | "
          "Betti err 2D | topo. correct 3D | topo. correct 2D | slices meeting prior | CCE 3D |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in rows:
        t = r["trainers"][n]
        lab = t["label"]
        mark = " (earlier run)" if t.get("from_earlier_run") else ""
        print(f"| {n}{mark} | {t.get('iterations', '-')} | {t.get('seconds', '-')} | {_f(lab['Dice'].get('RV'))} | "
              f"{_f(lab['Dice'].get('MYO'))} | {_f(lab['Dice'].get('LV'))} | {_f(lab['HD95_mm'].get('LV'), 1)} | "
              f"{_f(lab['TVS'], 4)} | {_f(lab['VR'], 3)} | {_f(lab['betti_error_3d'], 2)} | "
              f"{_f(lab['betti_error_2d'], 2)} | {_f(lab['topologically_correct'], 3)} | "
              f"{_f(lab.get('topologically_correct_2d'), 3)} | {_f(lab.get('slices_meeting_prior_2d'), 3)} | "
              f"{_f(lab['cce_3d'], 2)} |")
    mesh_rows = [n for n in rows if "mesh" in r["trainers"][n]]
    if mesh_rows:
        print("\n| trainer | mesh Dice LV_endo | LV_epi | RV | Chamfer mm LV_endo | LV_epi | RV | HD95 mm RV | "
              "Laplacian mm² LV_epi | mesh TVS |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n in mesh_rows:
            m = r["trainers"][n]["mesh"]
            print(f"| {n} | {_f(m['Dice'].get('LV_endo'))} | {_f(m['Dice'].get('LV_epi'))} | "
                  f"{_f(m['Dice'].get('RV'))} | {_f(m['Chamfer_mm'].get('LV_endo'), 2)} | "
                  f"{_f(m['Chamfer_mm'].get('LV_epi'), 2)} | {_f(m['Chamfer_mm'].get('RV'), 2)} | "
                  f"{_f(m['HD95_mm'].get('RV'), 1)} | {_f(m['laplacian_energy_mm2'].get('LV_epi'), 2)} | "
                  f"{_f(m['TVS'], 4)} |")
    if r["missing"]:
        print(f"\nnot (yet) evaluated: {', '.join(r['missing'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the study's work folder")
    p.add_argument("--out", default=None, help="JSON to write (default: print only); an existing one is merged")
    p.add_argument("--no-merge", action="store_true", help="do not keep the rows of an existing --out JSON")
    a = p.parse_args(argv)
    r = collect(a.work)
    if a.out and not a.no_merge and os.path.exists(a.out):
        r = merge_earlier(r, json.load(open(a.out)))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
        print(f"wrote {a.out}")
    print_tables(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
