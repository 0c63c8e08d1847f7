#!/usr/bin/env python
"""Collect the ACDC fine-tune study (examples/acdc/study.sh, issue 22) into documentation/results/acdc_fold0.json,
with paired bootstrap intervals and the issue's goals, and print the tables of documentation/results.md.

Reads, in the study's work folder (each file is small; nothing else is loaded):

* ``eval/<ROW>_label.json``: ``nnUNetv2_topo_evaluate_folder`` on nnU-Net's fold-0 validation outputs of the backbone
  and of every arm, and on the refined segmentations of the control (``<CONTROL>+refine``);
* ``eval/<ROW>_mesh.json``: the evaluator with ``--mesh_folder`` on the mesh arms' ``nnUNetv2_topo_predict_meshes``
  output (``meshes_<ROW>/``) and on the marching cubes of the control's segmentations (``<CONTROL>+marching_cubes``,
  ``python -m nnunet_topo.cli.segmentation_meshes``); ``meshes_<ROW>/meshes.json`` for the cases without mesh;
* each model's ``fold_0/debug.json`` and ``training_log_*.txt`` (iterations, seed, the sum of nnU-Net's "Epoch time"
  lines = training seconds; the backbone's pseudo Dice per epoch); ``refine_<CONTROL>/refinement_summary.json``;
* ``eval/external_<ROW>_label_free.json`` (``python -m nnunet_topo.cli.label_free`` on the external LGE predictions);
* ``logs/stage_seconds.tsv`` (seconds of every stage and step, and the machine).

JSON (``--out``): ``"protocol": "fine-tune"``, the split and configuration, ``"backbone": {"iterations", "seconds",
"label": {... Dice per structure ...}, "dice_goals", "dice_goals_met", ...}``, ``"trainers": {ROW: {"trainer",
"started_from", "finetune_iterations", "iterations_after_backbone", "seed", "seconds", "label": {Dice, HD95_mm, TVS,
VR, SVR, Betti errors 3D/2D, topologically correct shares, CCE}, "mesh": {Dice, Chamfer_mm, HD95_mm,
laplacian_energy_mm2, TVS (TPM Eq. 13), TVS_over_foreground, "volume_ratio": {structure: mean of mesh volume /
reference volume over the meshed cases}, "volume_ratio_share_in_0.85_1.15": {structure: share of the cases to mesh
(unmeshed ones count as outside)}, cases_without_mesh}}}``, ``"differences"`` (paired per-case bootstrap 95 %
intervals: every row against the control on label Dice per structure, TVS, Betti errors, CCE, topologically correct
share; the TPM arms against Mesh continued on mesh TVS (difference and relative change) and mesh Dice; every learned
mesh head against marching cubes on mesh TVS and Chamfer; each second seed against its first), ``"goals"``
(issue 22's, each met or not and how), ``"external_lge"``, ``"stage_seconds"`` and ``"per_case"`` (the per-case
values the intervals use, by row, so that they can be recomputed from the JSON when the work folder is gone).

An existing ``--out`` of the 400-iteration study (no ``"protocol": "fine-tune"``) is first moved to
``<name>_400it.json`` (``git mv`` where tracked) unless that file exists. An existing fine-tune ``--out`` is merged:
rows this work folder lacks are kept (``"from_earlier_run": true``) with their per-case values; ``--no-merge`` writes
only this folder's rows.
"""
import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

PROTOCOL = "fine-tune"
NAME = "Dataset127_ACDCh5"
PLANS_CONF = "nnUNetPlansMesh4.5mm__3d_mesh"
FILE_ENDING = ".nii.gz"
BACKBONE = "nnUNetTrainerMeshROI_acdcBackbone"
CONTROL = "nnUNetTrainerMeshROI_acdcFT"
MESH_FT = "nnUNetTrainerMesh_acdcFT"
MESH_CONTINUED = "nnUNetTrainerMesh_acdcFT2"
#: the head alone on the control's final checkpoint (network frozen): the mesh share at 0 against MESH_FT's default
HEAD_ONLY = "nnUNetTrainerMesh_headOnly_acdcFT"
#: written by examples/acdc/backbone_archive.py beside the start checkpoint: sha256 of the weights every arm starts from
BACKBONE_ID_FILE = "backbone_id.txt"
REFINE = CONTROL + "+refine"
MARCHING_CUBES = CONTROL + "+marching_cubes"
#: the arms of examples/acdc/study.sh (FT_FIRST, FT_FROM_MESH): row (= trainer class) -> (what it fine-tunes, from)
ARMS = {
    CONTROL: ("nnUNetTrainerMeshROI", BACKBONE),
    CONTROL + "_seed2": ("nnUNetTrainerMeshROI", BACKBONE),
    "nnUNetTrainerProjPool_acdcFT": ("nnUNetTrainerProjPool_finetune", BACKBONE),
    "nnUNetTrainerBetti_acdcFT": ("nnUNetTrainerBetti_finetune", BACKBONE),
    MESH_FT: ("nnUNetTrainerMesh", BACKBONE),
    "nnUNetTrainerMIE_acdcFT": ("nnUNetTrainerMIE_finetune", BACKBONE),
    HEAD_ONLY: ("nnUNetTrainerMesh_headOnly", CONTROL),
    "nnUNetTrainerTPM_acdcFT2": ("nnUNetTrainerTPM_finetune", MESH_FT),
    "nnUNetTrainerTPM_acdcFT2_seed2": ("nnUNetTrainerTPM_finetune", MESH_FT),
    "nnUNetTrainerTPM_lambda1_acdcFT2": ("nnUNetTrainerTPM_lambda1_finetune", MESH_FT),
    MESH_CONTINUED: ("nnUNetTrainerMesh", MESH_FT),
}
#: issue 27 (stage "scratch"): ProjPool from scratch with its default two-phase schedule against the same-length plain
#: run; compared with each other only (``differences["scratch_projpool_vs_plain"]``)
SCRATCH_PLAIN, SCRATCH_PROJPOOL = "nnUNetTrainerMeshROI_acdcScratch", "nnUNetTrainerProjPool_acdcScratch"
ARMS.update({SCRATCH_PLAIN: ("nnUNetTrainerMeshROI", "scratch"),
             SCRATCH_PROJPOOL: ("nnUNetTrainerProjPool (default schedule)", "scratch")})
DERIVED = {REFINE: "nnUNetv2_topo_refine of the control's model on the validation images (keep_present)",
           MARCHING_CUBES: "marching cubes (nnunet_topo.surfaces.mesh_from_mask) of the control's validation "
                           "segmentations; mesh metrics only"}
ORDER = list(ARMS) + list(DERIVED)
TPM_ARMS = ["nnUNetTrainerTPM_acdcFT2", "nnUNetTrainerTPM_acdcFT2_seed2", "nnUNetTrainerTPM_lambda1_acdcFT2"]
#: the arms a topology term trains (issue 22: label Dice within 1 point of the control's)
TOPOLOGY_ARMS = ["nnUNetTrainerProjPool_acdcFT", "nnUNetTrainerBetti_acdcFT", MESH_FT, "nnUNetTrainerMIE_acdcFT"] \
    + TPM_ARMS + [MESH_CONTINUED]
MESH_ARMS = [MESH_FT, "nnUNetTrainerMIE_acdcFT", HEAD_ONLY] + TPM_ARMS + [MESH_CONTINUED]
BACKBONE_DICE_GOALS = {"LV": 0.85, "MYO": 0.70, "RV": 0.70}
VOLUME_RANGE = (0.85, 1.15)
VOLUME_KEY = f"volume_ratio_share_in_{VOLUME_RANGE[0]}_{VOLUME_RANGE[1]}"
N_RESAMPLES, BOOTSTRAP_SEED = 2000, 0
#: the paper's ACDC row (TPM, C. Zhang et al., arXiv:2503.07874, Table 2, lambda_TP 0.5)
TPM_PAPER = {"mesh_TVS_relative": -0.908, "Dice_points": -1.4}


def _load(path: str) -> Optional[dict]:
    return json.load(open(path)) if os.path.exists(path) else None


def _nanmean(values) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else math.nan


def _seed_from_name(row: str) -> int:
    m = re.search(r"_seed(\d+)$", row)
    return int(m.group(1)) if m else 1


# ------------------------------------------------------------------------------------------------ training budget
def training_budget(model_fold: str) -> dict:
    """``{"epochs", "iterations", "batch_size", "seed", "seconds", "epochs_logged", "epoch_seconds_median"}`` of a
    trained fold (nnU-Net's debug.json, whose values are strings, and the training logs' "Epoch time" lines: their sum,
    which includes any time the training was paused (SIGSTOP while the test suite ran), and their median, which an
    occasional paused epoch does not move)."""
    out: dict = {}
    dbg = _load(os.path.join(model_fold, "debug.json"))
    if dbg:
        ep, it = int(dbg["num_epochs"]), int(dbg["num_iterations_per_epoch"])
        out.update(epochs=ep, iterations=ep * it, batch_size=int(dbg.get("batch_size", 0)) or None)
        if str(dbg.get("seed", "")).isdigit():
            out["seed"] = int(dbg["seed"])
    times = []
    for log in sorted(glob.glob(os.path.join(model_fold, "training_log_*.txt"))):
        times += [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", open(log).read())]
    if times:
        out.update(seconds=round(sum(times), 1), epochs_logged=len(times),
                   epoch_seconds_median=round(float(np.median(times)), 1))
    return out


def pseudo_dice_per_epoch(model_fold: str) -> List[List[float]]:
    """nnU-Net's "Pseudo dice [...]" of every logged epoch (validation patches, labels in id order)."""
    rows = []
    for log in sorted(glob.glob(os.path.join(model_fold, "training_log_*.txt"))):
        for inner in re.findall(r"Pseudo dice \[([^\]]*)\]", open(log).read()):
            inner = re.sub(r"np\.float\d+\(([^)]*)\)", r"\1", inner)
            rows.append([float(x) for x in inner.split(",") if x.strip()])
    return rows


# ------------------------------------------------------------------------------------------------ evaluator JSONs
def _case(entry: dict) -> str:
    if "case" in entry:
        return entry["case"]
    base = os.path.basename(entry["reference_file"])
    return base[: -len(FILE_ENDING)] if base.endswith(FILE_ENDING) else base.split(".")[0]


def _num(x) -> float:
    if x is None:
        return math.nan
    return float(x)


def label_block(summary: dict) -> dict:
    """Means of the label evaluation (``nnUNetv2_topo_evaluate_folder``)."""
    names = summary["label_names"]
    mean, topo, fg = summary["mean"], summary["topology_mean"], summary["foreground_mean"]
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
        "cce_3d": topo["cce_3d"], "cce_2d": topo["cce_2d"], "num_cases": topo["num_cases"],
    }


def label_per_case(summary: dict) -> Dict[str, list]:
    """Per-case columns of a label evaluation: ``case``, ``Dice_<label>``, ``TVS``, ``betti_error_3d`` (sum over
    labels), ``betti_error_2d`` and ``cce_3d`` (means over labels, as the evaluator's ``topology_mean``),
    ``topologically_correct_2d`` (0/1), ``slices_meeting_prior_2d``."""
    names = summary["label_names"]
    cols: Dict[str, list] = {"case": []}

    def add(key, value):
        cols.setdefault(key, []).append(_num(value))
    for e in summary["metric_per_case"]:
        cols["case"].append(_case(e))
        for lid, m in e["metrics"].items():
            add(f"Dice_{names[lid]}", m.get("Dice"))
        t = e["topology"]
        add("TVS", t.get("TVS"))
        add("betti_error_3d", t.get("betti_error_3d"))
        add("betti_error_2d", _nanmean(m.get("betti_error_2d") for m in e["metrics"].values()))
        add("cce_3d", _nanmean(m.get("cce_3d") for m in e["metrics"].values()))
        add("topologically_correct_2d", t.get("topologically_correct_2d"))
        add("slices_meeting_prior_2d", t.get("slices_meeting_prior_2d"))
    return cols


def _mesh_entries(summary: dict) -> List[dict]:
    return [e for e in summary.get("metric_per_case", []) if "mesh_metrics" in e] + summary.get("mesh_only_cases", [])


def mesh_per_case(summary: dict) -> Dict[str, list]:
    """Per-case columns of a mesh evaluation (the meshed cases): ``case``, ``mesh_Dice_<s>``, ``Chamfer_<s>``,
    ``volume_ratio_<s>`` (mesh volume / reference volume), ``mesh_Dice_mean`` and ``Chamfer_mean`` (over the
    structures), ``mesh_TVS`` (Eq. 13)."""
    structures = summary["mesh_structures"]
    cols: Dict[str, list] = {"case": []}

    def add(key, value):
        cols.setdefault(key, []).append(_num(value))
    for e in _mesh_entries(summary):
        cols["case"].append(_case(e))
        mm = e["mesh_metrics"]
        for s in structures:
            m = mm.get(s, {})
            add(f"mesh_Dice_{s}", m.get("Dice"))
            add(f"Chamfer_{s}", m.get("Chamfer_mm"))
            ref = _num(m.get("volume_ref_mm3"))
            add(f"volume_ratio_{s}", _num(m.get("volume_mm3")) / ref if ref > 0 else math.nan)
        add("mesh_Dice_mean", _nanmean(mm.get(s, {}).get("Dice") for s in structures))
        add("Chamfer_mean", _nanmean(mm.get(s, {}).get("Chamfer_mm") for s in structures))
        add("mesh_TVS", e["mesh_topology"].get("TVS"))
    return cols


def mesh_block(summary: dict, cases_without_mesh: Sequence[str] = ()) -> dict:
    """Means of a mesh evaluation, plus the volume ratios (per structure: the mean over the meshed cases of mesh
    volume / reference volume, and the share of the cases to mesh, unmeshed ones counted outside, within
    ``VOLUME_RANGE``)."""
    mm, mt = summary["mesh_mean"], summary["mesh_topology_mean"]
    num = summary.get("mesh_mean_num_cases", {})
    cols = mesh_per_case(summary)
    n_all = len(cols["case"]) + len(cases_without_mesh)
    lo, hi = VOLUME_RANGE
    ratio, share = {}, {}
    for s in summary["mesh_structures"]:
        r = np.asarray(cols.get(f"volume_ratio_{s}", []), dtype=float)
        ratio[s] = float(np.nanmean(r)) if np.isfinite(r).any() else math.nan
        share[s] = float(np.count_nonzero((r >= lo) & (r <= hi)) / n_all) if n_all else math.nan
    return {
        "Dice": {s: v["Dice"] for s, v in mm.items()},
        "Chamfer_mm": {s: v["Chamfer_mm"] for s, v in mm.items()},
        "HD95_mm": {s: v["HD95_mm"] for s, v in mm.items()},
        "laplacian_energy_mm2": {s: v["laplacian_energy_mm2"] for s, v in mm.items()},
        "volume_mL": {s: _num(v.get("volume_mm3")) / 1000 for s, v in mm.items()},
        "reference_volume_mL": {s: _num(v.get("volume_ref_mm3")) / 1000 for s, v in mm.items()},
        "volume_ratio": ratio, VOLUME_KEY: share,
        "TVS": mt["TVS"], "TVS_per_rule": mt.get("TVS_per_rule"), "TVS_over_foreground": mt.get("TVS_over_foreground"),
        "grid_mm": mt.get("grid_mm"), "num_cases": {s: v.get("Dice") for s, v in num.items()},
        "cases_without_mesh": list(cases_without_mesh),
    }


# ------------------------------------------------------------------------------------------------ bootstrap
def paired_bootstrap(a: Sequence[float], b: Sequence[float], relative: bool = False, n_resamples: int = N_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired per-case bootstrap of ``mean(a) - mean(b)`` (or, ``relative``, ``mean(a) / mean(b) - 1``).

    ``a[i]`` and ``b[i]`` are the same case; pairs with a NaN are left out. The cases are resampled with replacement
    ``n_resamples`` times (``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``, the same index
    matrix for both sides), and the interval is the 2.5th and 97.5th percentile of the resampled statistic (linear
    interpolation; resamples whose relative change is undefined, ``mean(b) = 0``, are left out).

    Returns:
        ``{"estimate": statistic on all pairs, "ci95": [lo, hi], "n": pairs}`` (``None`` values without pairs).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1D of the same length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = len(a)
    if n == 0:
        return {"estimate": None, "ci95": None, "n": 0}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    if relative:
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = a[idx].mean(axis=1) / b[idx].mean(axis=1) - 1.0
            est = a.mean() / b.mean() - 1.0 if b.mean() != 0 else math.nan
        boot = boot[np.isfinite(boot)]
    else:
        d = a - b
        boot, est = d[idx].mean(axis=1), d.mean()
    if len(boot) == 0:
        return {"estimate": float(est), "ci95": None, "n": n}
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"estimate": float(est), "ci95": [float(lo), float(hi)], "n": n}


def paired_columns(cols_a: Dict[str, list], cols_b: Dict[str, list], key: str):
    """The values of ``key`` of the cases both column sets hold, in case order: ``(a, b)``."""
    va = dict(zip(cols_a.get("case", []), cols_a.get(key, [])))
    vb = dict(zip(cols_b.get("case", []), cols_b.get(key, [])))
    common = sorted(set(va) & set(vb))
    return [_num(va[c]) for c in common], [_num(vb[c]) for c in common]


def _compare(cols_a, cols_b, keys, relative_keys=()) -> dict:
    out = {}
    for k in keys:
        if k in cols_a and k in cols_b:
            out[k] = paired_bootstrap(*paired_columns(cols_a, cols_b, k))
    for k in relative_keys:
        if k in cols_a and k in cols_b:
            out[k + "_relative"] = paired_bootstrap(*paired_columns(cols_a, cols_b, k), relative=True)
    return out


def differences(per_case: Dict[str, dict]) -> dict:
    """The paired intervals of issue 22 from the per-case columns of every row (``{row: {"label": cols, "mesh":
    cols}}``)."""
    out: dict = {"vs_control": {}, "tpm_vs_mesh_continued": {}, "head_vs_marching_cubes": {}, "seed_repeats": {},
                 "scratch_projpool_vs_plain": {}, "mesh_share_vs_head_only": {}}
    ctl = per_case.get(CONTROL, {}).get("label")
    label_keys = ["TVS", "betti_error_3d", "betti_error_2d", "cce_3d", "topologically_correct_2d"]
    if ctl:
        keys = [k for k in ctl if k.startswith("Dice_")] + label_keys
        for row, pc in per_case.items():
            if row not in (CONTROL, SCRATCH_PLAIN, SCRATCH_PROJPOOL) and pc.get("label"):
                out["vs_control"][row] = _compare(pc["label"], ctl, keys)
    plain = per_case.get(SCRATCH_PLAIN, {}).get("label")
    if plain and per_case.get(SCRATCH_PROJPOOL, {}).get("label"):
        keys = [k for k in plain if k.startswith("Dice_")] + label_keys
        out["scratch_projpool_vs_plain"] = _compare(per_case[SCRATCH_PROJPOOL]["label"], plain, keys)
    # the second seed against the first (the noise a difference must be read against): label, and mesh where present
    for row, pc in per_case.items():
        first = per_case.get(row[: -len("_seed2")]) if row.endswith("_seed2") else None
        if first:
            entry = {}
            for part in ("label", "mesh"):
                if pc.get(part) and first.get(part):
                    keys = [k for k in pc[part] if k != "case" and (part == "mesh" or k.startswith("Dice_")
                                                                     or k in label_keys)]
                    entry.update(_compare(pc[part], first[part], keys))
            out["seed_repeats"][row] = entry
    mesh_c = per_case.get(MESH_CONTINUED, {}).get("mesh")
    if mesh_c:
        keys = [k for k in mesh_c if k.startswith("mesh_Dice_")] + ["mesh_TVS"]
        for row in TPM_ARMS:
            if per_case.get(row, {}).get("mesh"):
                out["tpm_vs_mesh_continued"][row] = _compare(per_case[row]["mesh"], mesh_c, keys, ["mesh_TVS"])
    # the mesh share (MESH_FT, default mesh_backbone_grad_share) against 0 (HEAD_ONLY: the control's network, frozen)
    ho, mf = per_case.get(HEAD_ONLY, {}), per_case.get(MESH_FT, {})
    if ho.get("mesh") and mf.get("mesh"):
        keys = [k for k in ho["mesh"] if k.startswith(("mesh_Dice_", "Chamfer_"))] + ["mesh_TVS"]
        out["mesh_share_vs_head_only"] = _compare(mf["mesh"], ho["mesh"], keys)
    mc = per_case.get(MARCHING_CUBES, {}).get("mesh")
    if mc:
        keys = ["mesh_TVS", "Chamfer_mean"] + [k for k in mc if k.startswith("Chamfer_") and k != "Chamfer_mean"]
        for row in MESH_ARMS:
            if per_case.get(row, {}).get("mesh"):
                out["head_vs_marching_cubes"][row] = _compare(per_case[row]["mesh"], mc, keys)
    return out


# ------------------------------------------------------------------------------------------------ goals
def _status(interval_ok: bool, estimate_ok: bool) -> str:
    return "met" if interval_ok else ("estimate only" if estimate_ok else "not met")


def _lo(d):
    return d["ci95"][0] if d and d.get("ci95") else math.nan


def _hi(d):
    return d["ci95"][1] if d and d.get("ci95") else math.nan


def _est(d):
    return d["estimate"] if d and d.get("estimate") is not None else math.nan


def _fd(d: Optional[dict], scale: float = 1.0, nd: int = 3) -> str:
    """``estimate [lo, hi]`` of a bootstrap result, scaled (100: Dice points)."""
    if not d or d.get("estimate") is None:
        return "-"
    s = f"{d['estimate'] * scale:+.{nd}f}"
    if d.get("ci95"):
        s += f" [{d['ci95'][0] * scale:+.{nd}f}, {d['ci95'][1] * scale:+.{nd}f}]"
    return s


def goals(r: dict) -> List[dict]:
    """Issue 22's goals on this data, each ``{"goal", "arm", "measured", "status"}``: ``met`` (the paired 95 %
    interval lies on the goal's side; for the volume and TPM goals, which are stated on means, the estimates),
    ``estimate only`` (the estimate does, the interval does not), ``not met``, ``not measured``."""
    out: List[dict] = []
    diff, rows = r["differences"], r["trainers"]

    def add(goal, arm, measured, status):
        out.append({"goal": goal, "arm": arm, "measured": measured, "status": status})
    g = "label Dice within 1 point of the control's, per structure (paired interval above -1 point)"
    for arm in TOPOLOGY_ARMS:
        d = diff["vs_control"].get(arm)
        if not d:
            add(g, arm, "-", "not measured")
            continue
        dice = {k[5:]: v for k, v in d.items() if k.startswith("Dice_")}
        ok_i = all(_lo(v) >= -0.01 for v in dice.values())
        ok_e = all(_est(v) >= -0.01 for v in dice.values())
        add(g, arm, "; ".join(f"{s} {_fd(v, 100, 1)}" for s, v in dice.items()), _status(ok_i, ok_e))
    g = f"mesh volume / reference volume in {VOLUME_RANGE[0]}-{VOLUME_RANGE[1]} in >= 90 % of cases, every structure"
    for arm in MESH_ARMS:
        m = rows.get(arm, {}).get("mesh")
        if not m:
            add(g, arm, "-", "not measured")
            continue
        shares = m[VOLUME_KEY]
        ok = all(v is not None and v >= 0.9 for v in shares.values())
        add(g, arm, "; ".join(f"{s} {_f(v, 2)} (mean ratio {_f(m['volume_ratio'].get(s), 2)})"
                              for s, v in shares.items()), "met" if ok else "not met")
    g = "TPM: mesh TVS >= 90 % below Mesh continued at mesh Dice within 2 points (TPM Table 2: -90.8 % at -1.4)"
    for arm in TPM_ARMS:
        d = diff["tpm_vs_mesh_continued"].get(arm)
        if not d:
            add(g, arm, "-", "not measured")
            continue
        rel = d.get("mesh_TVS_relative")
        dice = {k[10:]: v for k, v in d.items() if k.startswith("mesh_Dice_")}
        ok_e = _est(rel) <= -0.9 and all(_est(v) >= -0.02 for v in dice.values())
        ok_i = _hi(rel) <= -0.9 and all(_lo(v) >= -0.02 for v in dice.values())
        add(g, arm, f"mesh TVS {_fd(rel, 100, 1)} %; mesh Dice " +
            "; ".join(f"{s} {_fd(v, 100, 1)}" for s, v in dice.items()), _status(ok_i, ok_e))
    g = "refinement: topologically correct share (per-slice priors) up, label Dice within 1 point"
    d = diff["vs_control"].get(REFINE)
    if d:
        tc = d.get("topologically_correct_2d")
        dice = {k[5:]: v for k, v in d.items() if k.startswith("Dice_")}
        ok_i = _lo(tc) > 0 and all(_lo(v) >= -0.01 for v in dice.values())
        ok_e = _est(tc) > 0 and all(_est(v) >= -0.01 for v in dice.values())
        add(g, REFINE, f"topo. correct 2D {_fd(tc, 1, 3)}; Dice " +
            "; ".join(f"{s} {_fd(v, 100, 1)}" for s, v in dice.items()), _status(ok_i, ok_e))
    else:
        add(g, REFINE, "-", "not measured")
    for arm, key in (("nnUNetTrainerBetti_acdcFT", "betti_error_3d"), ("nnUNetTrainerProjPool_acdcFT", "cce_3d")):
        g = f"{key} better than the control's (paired interval excludes 0)"
        d = diff["vs_control"].get(arm, {}).get(key)
        add(g, arm, _fd(d, 1, 2) if d else "-",
            "not measured" if not d else _status(_hi(d) < 0, _est(d) < 0))
    g = ("issue 27: ProjPool from scratch, default two-phase schedule, against the same-length plain run: RV and MYO "
         "Dice within 2 points, CCE not worse")
    d = diff.get("scratch_projpool_vs_plain")
    if d:
        dice = {k[5:]: d[k] for k in ("Dice_RV", "Dice_MYO") if k in d}
        cce = d.get("cce_3d")
        # "not worse": the CCE estimate (a count per case) at or below the plain run's; Dice by its interval
        ok_i = all(_lo(v) >= -0.02 for v in dice.values()) and _est(cce) <= 0
        ok_e = all(_est(v) >= -0.02 for v in dice.values()) and _est(cce) <= 0
        measured = "; ".join(f"{s} {_fd(v, 100, 1)}" for s, v in dice.items()) + f"; CCE {_fd(cce, 1, 2)}"
        add(g, SCRATCH_PROJPOOL, measured, _status(ok_i, ok_e))
    else:
        add(g, SCRATCH_PROJPOOL, "-", "not measured")
    g = "learned mesh head beats marching cubes of the control's segmentation on mesh TVS and Chamfer"
    for arm in MESH_ARMS:
        d = diff["head_vs_marching_cubes"].get(arm)
        if not d:
            add(g, arm, "-", "not measured")
            continue
        t, c = d.get("mesh_TVS"), d.get("Chamfer_mean")
        add(g, arm, f"mesh TVS {_fd(t, 1, 4)}; Chamfer (mean of structures) {_fd(c, 1, 2)} mm",
            _status(_hi(t) < 0 and _hi(c) < 0, _est(t) < 0 and _est(c) < 0))
    return out


# ------------------------------------------------------------------------------------------------ collect
def _row(work: str, row: str) -> Optional[dict]:
    """The JSON row and per-case columns of one arm or derived row, or None when it was not evaluated."""
    label = _load(os.path.join(work, "eval", f"{row}_label.json"))
    mesh = _load(os.path.join(work, "eval", f"{row}_mesh.json"))
    if label is None and mesh is None:
        return None
    out: dict = {}
    pc: dict = {}
    if row in ARMS:
        trainer, start = ARMS[row]
        budget = training_budget(os.path.join(work, "results", NAME, f"{row}__{PLANS_CONF}", "fold_0"))
        out.update(trainer=trainer, started_from=start, finetune_iterations=budget.pop("iterations", None),
                   seed=budget.pop("seed", _seed_from_name(row)), **budget)
    else:
        out.update(trainer=CONTROL, derived=DERIVED[row])
        if row == REFINE:
            ref = _load(os.path.join(work, "refine_" + CONTROL, "refinement_summary.json")) or {}
            out["refinement"] = {k: ref[k] for k in ("steps", "lr", "lambda", "downsample", "keep_present")
                                 if k in ref}
    if label is not None:
        out["label"] = label_block(label)
        pc["label"] = label_per_case(label)
    if mesh is not None and "mesh_mean" in mesh:
        listing = _load(os.path.join(work, f"meshes_{row}", "meshes.json")) or {}
        out["mesh"] = mesh_block(mesh, listing.get("cases_without_mesh", []))
        pc["mesh"] = mesh_per_case(mesh)
    rep = _load(os.path.join(work, f"repaired_{row}", "repair.json"))
    if rep is not None:
        out["repair"] = repair_block(rep)
    return {"row": out, "per_case": pc}


def repair_block(rep: dict) -> dict:
    """How far ``nnUNetv2_topo_repair_meshes`` had to move a model's meshes (issue 25: the repair's displacement per
    trainer): per structure the mean over the repaired cases of each case's maximum and mean vertex displacement,
    the worst case's maximum, and the cases it could not repair."""
    ok = {c: r for c, r in rep.get("cases", {}).items() if "error" not in r}
    structures = sorted({s for r in ok.values() for s in r.get("meshes", {})})

    def values(s, key):
        return [r["meshes"][s][key] for r in ok.values() if s in r.get("meshes", {})]
    return {"gap_mm": rep.get("gap_mm"), "cases_repaired": len(ok),
            "cases_not_repaired": list(rep.get("cases_not_repaired", [])),
            "max_displacement_mm": {s: _nanmean(values(s, "max_displacement_mm")) for s in structures},
            "max_displacement_mm_worst_case": {s: max(values(s, "max_displacement_mm"), default=math.nan)
                                               for s in structures},
            "mean_displacement_mm": {s: _nanmean(values(s, "mean_displacement_mm")) for s in structures},
            "moved_vertices": {s: _nanmean(values(s, "moved_vertices")) for s in structures}}


def backbone_block(work: str) -> dict:
    fold = os.path.join(work, "results", NAME, f"{BACKBONE}__{PLANS_CONF}", "fold_0")
    b: dict = {"trainer": BACKBONE}
    b.update(training_budget(fold))
    logged, planned = b.get("epochs_logged"), b.get("epochs")
    if logged and planned and logged < planned:  # stopped at its Dice goals: what it ran, not the bound
        per_epoch = b["iterations"] // planned
        b.update(iterations_bound=b["iterations"], epochs_bound=planned, iterations=logged * per_epoch,
                 epochs=logged, stopped_by="Dice goals (pseudo Dice)")
    ckpt = os.path.join(work, "backbone_checkpoint.txt")
    if os.path.exists(ckpt):
        b["checkpoint"] = open(ckpt).read().strip()
    sha = os.path.join(work, BACKBONE_ID_FILE)  # examples/acdc/backbone_archive.py: the rounded start weights
    if os.path.exists(sha):
        b["weights_sha256"] = open(sha).read().strip()
    rounded = _load(os.path.join(work, "eval", f"{BACKBONE}+fp16_label.json"))
    if rounded is not None:  # the start checkpoint every arm uses: the backbone's weights rounded to float16
        b["label_fp16_start"] = {"Dice": label_block(rounded)["Dice"]}
    b["dice_goals"] = BACKBONE_DICE_GOALS
    label = _load(os.path.join(work, "eval", f"{BACKBONE}_label.json"))
    if label is not None:
        b["label"] = label_block(label)
        dice = b["label"]["Dice"]
        b["dice_goals_met"] = {s: bool(dice.get(s, 0) >= g) for s, g in BACKBONE_DICE_GOALS.items()}
        names = [label["label_names"][k] for k in sorted(label["label_names"], key=int)]
        pseudo = pseudo_dice_per_epoch(fold)
        first = next((e for e, row in enumerate(pseudo) if len(row) == len(names) and
                      all(v >= BACKBONE_DICE_GOALS.get(n, 0) for n, v in zip(names, row))), None)
        b["pseudo_dice_last_epoch"] = dict(zip(names, pseudo[-1])) if pseudo else None
        b["first_epoch_pseudo_dice_meets_goals"] = first
        b["note"] = ("label Dice: the evaluator on nnU-Net's validation of the final checkpoint (after the Dice goals "
                     "stopped the training, or after the iteration bound); pseudo Dice: nnU-Net's per-epoch value on "
                     "validation patches (progress.png), which the stop reads")
    return b


def stage_seconds(work: str) -> List[dict]:
    path = os.path.join(work, "logs", "stage_seconds.tsv")
    out = []
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                out.append({"step": parts[0], "seconds": int(parts[1]), "machine": parts[2], "date": parts[3]})
    return out


def external_block(work: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(work, "eval", "external_*_label_free.json"))):
        row = os.path.basename(path)[len("external_"): -len("_label_free.json")]
        out[row] = json.load(open(path))["summary"]
    return out


def collect(work: str) -> dict:
    split = _load(os.path.join(work, "preprocessed", NAME, "splits_final.json"))
    ds = _load(os.path.join(work, "raw", NAME, "dataset.json")) or {}
    r: dict = {"protocol": PROTOCOL,
               "split": "nnU-Net 5-fold (nnU-Net's ACDC split by patient), fold 0",
               "num_validation_cases": len(split[0]["val"]) if split else None,
               "spacing_assumed_mm": ds.get("spacing_assumed_mm"), "study_spacing_mm": [10.0, 4.5, 4.5],
               "configuration": PLANS_CONF.replace("__", " "), "backbone": backbone_block(work),
               "trainers": {}, "missing": [],
               "bootstrap": {"resamples": N_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": "percentile, 95 %",
                             "unit": "validation volume, paired by case (the two phases of a patient are two "
                                     "volumes)"},
               "per_case": {}}
    for row in ORDER:
        got = _row(work, row)
        if got is not None:
            r["trainers"][row] = got["row"]
            r["per_case"][row] = got["per_case"]
    r["external_lge"] = external_block(work)
    r["stage_seconds"] = stage_seconds(work)
    return r


def merge_earlier(new: dict, old: dict) -> dict:
    """``new`` plus the rows (and per-case values) of an earlier fine-tune ``old`` that ``new`` lacks, marked
    ``from_earlier_run``; the backbone's entries ``new`` lacks (a restored backbone has no training folder). Rows
    fine-tuned from another backbone (``weights_sha256`` differs) are not kept: they are not comparable."""
    sha_new, sha_old = new["backbone"].get("weights_sha256"), old.get("backbone", {}).get("weights_sha256")
    if sha_new and sha_old and sha_new != sha_old:
        print(f"the earlier JSON's rows come from another backbone ({sha_old[:12]} != {sha_new[:12]}): not kept",
              file=sys.stderr)
        return new
    for key, value in old.get("backbone", {}).items():
        new["backbone"].setdefault(key, value)
    for row, entry in old.get("trainers", {}).items():
        if row not in new["trainers"]:
            new["trainers"][row] = dict(entry, from_earlier_run=True)
            if row in old.get("per_case", {}):
                new["per_case"][row] = old["per_case"][row]
    for key in ("external_lge",):
        for row, entry in old.get(key, {}).items():
            new[key].setdefault(row, entry)
    return new


def finish(r: dict) -> dict:
    """``missing``, ``differences`` and ``goals`` of the (merged) rows, iterations after the backbone."""
    for row, t in r["trainers"].items():
        start = t.get("started_from")
        if start == BACKBONE:
            t["iterations_after_backbone"] = t.get("finetune_iterations")
        elif start in r["trainers"] and t.get("finetune_iterations") is not None:
            prev = r["trainers"][start].get("finetune_iterations")
            t["iterations_after_backbone"] = None if prev is None else prev + t["finetune_iterations"]
    r["missing"] = [row for row in ORDER if row not in r["trainers"]]
    r["differences"] = differences(r["per_case"])
    r["goals"] = goals(r)
    return r


def move_earlier_protocol(out: str) -> Optional[str]:
    """Move an ``out`` JSON of the 400-iteration study (no ``"protocol": "fine-tune"``) to ``<name>_400it.json``
    (``git mv`` where the file is tracked, else a rename), unless that file exists; returns the new path or None."""
    if not os.path.exists(out):
        return None
    try:
        old = json.load(open(out))
    except ValueError:
        old = {}
    if old.get("protocol") == PROTOCOL:
        return None
    dest = out[: -len(".json")] + "_400it.json" if out.endswith(".json") else out + "_400it"
    if os.path.exists(dest):
        return None
    folder = os.path.dirname(os.path.abspath(out))
    try:
        tracked = subprocess.run(["git", "-C", folder, "ls-files", "--error-unmatch", os.path.basename(out)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:
        tracked = False
    if tracked:
        subprocess.run(["git", "-C", folder, "mv", os.path.basename(out), os.path.basename(dest)], check=True)
    else:
        os.rename(out, dest)
    return dest


def _clean(x, nd: int = 6):
    """NaN/inf -> None (valid JSON), floats rounded to ``nd`` decimals in per-case columns."""
    if isinstance(x, dict):
        return {k: _clean(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v, nd) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if not math.isfinite(x) else x
    if isinstance(x, np.integer):
        return int(x)
    return x


def _round_columns(per_case: dict) -> dict:
    return {row: {part: {k: (v if k == "case" else [None if not math.isfinite(_num(x)) else round(_num(x), 6)
                                                    for x in v]) for k, v in cols.items()}
                  for part, cols in pc.items()} for row, pc in per_case.items()}


def dumps(r: dict) -> str:
    """The JSON text: indented as the earlier study's, except ``per_case``, one line per row and part (columns of
    40 numbers would otherwise take a line each)."""
    head = json.dumps({k: v for k, v in r.items() if k != "per_case"}, indent=1)
    if not r.get("per_case"):
        return head + "\n"
    lines = []
    for row, parts in r["per_case"].items():
        inner = ",\n".join(f"  {json.dumps(part)}: {json.dumps(cols, separators=(',', ':'))}"
                           for part, cols in parts.items())
        lines.append(f" {json.dumps(row)}: {{\n{inner}\n }}")
    return head[:-2] + ',\n "per_case": {\n' + ",\n".join(lines) + "\n }\n}\n"


# ------------------------------------------------------------------------------------------------ tables
def _v(x, missing: str = "-") -> str:
    return missing if x is None else str(x)


def _f(x, nd=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def print_tables(r: dict) -> None:
    rows = [n for n in ORDER if n in r["trainers"]] + [n for n in r["trainers"] if n not in ORDER]
    print(f"\nACDC fine-tune study, {r['split']}, {r['num_validation_cases']} validation volumes; assumed spacing "
          f"{r['spacing_assumed_mm']} mm, study spacing {r['study_spacing_mm']} mm, {r['configuration']}\n")
    b = r["backbone"]
    if b.get("label"):
        d = b["label"]["Dice"]
        print("| backbone | iterations | train s | Dice RV | Dice MYO | Dice LV | goals (RV/MYO/LV >= 0.70/0.70/0.85) "
              "| first epoch pseudo Dice meets goals |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {b['trainer']} | {_v(b.get('iterations'))} | {_v(b.get('seconds'))} | {_f(d.get('RV'))} | "
              f"{_f(d.get('MYO'))} | {_f(d.get('LV'))} | "
              f"{'met' if all(b['dice_goals_met'].values()) else 'not met'} | "
              f"{_v(b.get('first_epoch_pseudo_dice_meets_goals'), 'never' if b.get('pseudo_dice_last_epoch') else '-')}"
              " |\n")
    print("| row | ft iters | after backbone | seed | train s | s/epoch (median) | Dice RV | Dice MYO | Dice LV | "
          "HD95 LV mm | TVS | VR | Betti err 3D | Betti err 2D | topo. correct 3D | topo. correct 2D | slices meeting prior | CCE 3D |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in rows:
        t = r["trainers"][n]
        lab = t.get("label")
        if not lab:
            continue
        mark = " (earlier run)" if t.get("from_earlier_run") else ""
        print(f"| {n}{mark} | {_v(t.get('finetune_iterations'))} | {_v(t.get('iterations_after_backbone'))} | "
              f"{_v(t.get('seed'))} | {_v(t.get('seconds'))} | {_v(t.get('epoch_seconds_median'))} | "
              f"{_f(lab['Dice'].get('RV'))} | "
              f"{_f(lab['Dice'].get('MYO'))} | {_f(lab['Dice'].get('LV'))} | {_f(lab['HD95_mm'].get('LV'), 1)} | "
              f"{_f(lab['TVS'], 4)} | {_f(lab['VR'], 3)} | {_f(lab['betti_error_3d'], 2)} | "
              f"{_f(lab['betti_error_2d'], 2)} | {_f(lab['topologically_correct'], 3)} | "
              f"{_f(lab.get('topologically_correct_2d'), 3)} | {_f(lab.get('slices_meeting_prior_2d'), 3)} | "
              f"{_f(lab['cce_3d'], 2)} |")
    mesh_rows = [n for n in rows if "mesh" in r["trainers"][n]]
    if mesh_rows:
        s3 = ("LV_endo", "LV_epi", "RV")
        print("\n| row | mesh Dice LV_endo | LV_epi | RV | Chamfer mm LV_endo | LV_epi | RV | HD95 mm RV | "
              "Laplacian mm² LV_epi | mesh TVS | vol. ratio LV_endo | LV_epi | RV | share in 0.85-1.15 LV_endo | "
              "LV_epi | RV | no mesh |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in mesh_rows:
            m = r["trainers"][n]["mesh"]
            print(f"| {n} | " + " | ".join(_f(m['Dice'].get(s)) for s in s3) + " | "
                  + " | ".join(_f(m['Chamfer_mm'].get(s), 2) for s in s3) + f" | {_f(m['HD95_mm'].get('RV'), 1)} | "
                  f"{_f(m['laplacian_energy_mm2'].get('LV_epi'), 2)} | {_f(m['TVS'], 4)} | "
                  + " | ".join(_f(m['volume_ratio'].get(s), 2) for s in s3) + " | "
                  + " | ".join(_f(m[VOLUME_KEY].get(s), 2) for s in s3) + f" | {len(m['cases_without_mesh'])} |")
    repair_rows = [n for n in rows if "repair" in r["trainers"][n]]
    if repair_rows:
        print("\nRepair (nnUNetv2_topo_repair_meshes, gap "
              f"{r['trainers'][repair_rows[0]]['repair']['gap_mm']} mm): how far each model's meshes had to move "
              "(mean over the repaired cases of each case's maximum / mean vertex displacement, mm; worst case)\n")
        print("| row | repaired | not repaired | max LV_endo | LV_epi | RV | worst RV | mean LV_endo | LV_epi | RV |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n in repair_rows:
            x = r["trainers"][n]["repair"]
            print(f"| {n} | {x['cases_repaired']} | {len(x['cases_not_repaired'])} | "
                  + " | ".join(_f(x["max_displacement_mm"].get(s), 2) for s in ("LV_endo", "LV_epi", "RV")) + " | "
                  + f"{_f(x['max_displacement_mm_worst_case'].get('RV'), 2)} | "
                  + " | ".join(_f(x["mean_displacement_mm"].get(s), 3) for s in ("LV_endo", "LV_epi", "RV")) + " |")
    d = r["differences"]
    if d["vs_control"]:
        print(f"\nDifferences against the control ({CONTROL}), paired bootstrap 95 % intervals over the validation "
              f"volumes ({N_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); Dice in points:\n")
        print("| row | Δ Dice RV | Δ Dice MYO | Δ Dice LV | Δ TVS | Δ Betti err 3D | Δ Betti err 2D | Δ CCE 3D | "
              "Δ topo. correct 2D |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n, x in d["vs_control"].items():
            print(f"| {n} | {_fd(x.get('Dice_RV'), 100, 1)} | {_fd(x.get('Dice_MYO'), 100, 1)} | "
                  f"{_fd(x.get('Dice_LV'), 100, 1)} | {_fd(x.get('TVS'), 1, 4)} | "
                  f"{_fd(x.get('betti_error_3d'), 1, 2)} | "
                  f"{_fd(x.get('betti_error_2d'), 1, 2)} | {_fd(x.get('cce_3d'), 1, 2)} | "
                  f"{_fd(x.get('topologically_correct_2d'), 1, 3)} |")
    if d.get("seed_repeats"):
        print("\nSecond seed against the first (the run-to-run spread), same intervals:\n")
        print("| row | Δ Dice RV | Δ Dice MYO | Δ Dice LV | Δ TVS | Δ mesh TVS | Δ mesh Dice (mean) |")
        print("|---|---|---|---|---|---|---|")
        for n, x in d["seed_repeats"].items():
            print(f"| {n} | {_fd(x.get('Dice_RV'), 100, 1)} | {_fd(x.get('Dice_MYO'), 100, 1)} | "
                  f"{_fd(x.get('Dice_LV'), 100, 1)} | {_fd(x.get('TVS'), 1, 4)} | {_fd(x.get('mesh_TVS'), 1, 4)} | "
                  f"{_fd(x.get('mesh_Dice_mean'), 100, 1)} |")
    if d["tpm_vs_mesh_continued"]:
        print(f"\nTPM against {MESH_CONTINUED} (equal totals), beside TPM Table 2 (ACDC, λ_TP 0.5: mesh TVS "
              f"{TPM_PAPER['mesh_TVS_relative'] * 100:+.1f} % at {TPM_PAPER['Dice_points']:+.1f} DSC points):\n")
        print("| row | mesh TVS change % | Δ mesh TVS | Δ mesh Dice LV_endo | LV_epi | RV |")
        print("|---|---|---|---|---|---|")
        for n, x in d["tpm_vs_mesh_continued"].items():
            print(f"| {n} | {_fd(x.get('mesh_TVS_relative'), 100, 1)} | {_fd(x.get('mesh_TVS'), 1, 4)} | "
                  f"{_fd(x.get('mesh_Dice_LV_endo'), 100, 1)} | {_fd(x.get('mesh_Dice_LV_epi'), 100, 1)} | "
                  f"{_fd(x.get('mesh_Dice_RV'), 100, 1)} |")
    if d["head_vs_marching_cubes"]:
        print(f"\nLearned mesh head against marching cubes of the control's segmentation ({MARCHING_CUBES}):\n")
        print("| row | Δ mesh TVS | Δ Chamfer mm (mean) | LV_endo | LV_epi | RV |")
        print("|---|---|---|---|---|---|")
        for n, x in d["head_vs_marching_cubes"].items():
            print(f"| {n} | {_fd(x.get('mesh_TVS'), 1, 4)} | {_fd(x.get('Chamfer_mean'), 1, 2)} | "
                  f"{_fd(x.get('Chamfer_LV_endo'), 1, 2)} | {_fd(x.get('Chamfer_LV_epi'), 1, 2)} | "
                  f"{_fd(x.get('Chamfer_RV'), 1, 2)} |")
    if d.get("mesh_share_vs_head_only"):
        x = d["mesh_share_vs_head_only"]
        print(f"\nThe mesh share: {MESH_FT} (mesh terms reach the backbone, bounded) against {HEAD_ONLY} (the head "
              "alone on the control's frozen network: share 0), same intervals; mesh Dice in points:\n")
        print("| Δ mesh Dice LV_endo | Δ mesh Dice LV_epi | Δ mesh Dice RV | Δ Chamfer mean (mm) | Δ mesh TVS |")
        print("|---|---|---|---|---|")
        print(f"| {_fd(x.get('mesh_Dice_LV_endo'), 100, 1)} | {_fd(x.get('mesh_Dice_LV_epi'), 100, 1)} | "
              f"{_fd(x.get('mesh_Dice_RV'), 100, 1)} | {_fd(x.get('Chamfer_mean'), 1, 2)} | "
              f"{_fd(x.get('mesh_TVS'), 1, 4)} |")
    print("\nGoals of issue 22 (met: the paired interval is on the goal's side; estimate only: the estimate is, the "
          "interval is not):\n")
    print("| goal | row | measured | status |")
    print("|---|---|---|---|")
    for g in r["goals"]:
        print(f"| {g['goal']} | {g['arm']} | {g['measured']} | {g['status']} |")
    ext = r.get("external_lge") or {}
    if ext:
        rules = sorted({k for s in ext.values() for k in s.get("share_cases_violating", {})})
        print("\nExternal LGE set (no labels; label-free measures, python -m nnunet_topo.cli.label_free):\n")
        print("| model | cases | meshed | " + " | ".join(f"cases violating {x}" for x in rules)
              + " | slices meeting per-slice priors | cases meeting 3D prior LV_epi | cases lacking RV | "
                "mesh overlap / mesh volume |")
        print("|---|---|---|" + "---|" * len(rules) + "---|---|---|---|")
        for n, s in ext.items():
            print(f"| {n} | {s['num_cases']} | {_f(s.get('share_meshed'), 2)} | "
                  + " | ".join(_f(s['share_cases_violating'].get(x), 2) for x in rules)
                  + f" | {_f(s['share_slices_meeting_prior_2d'].get('all'), 3)} | "
                  f"{_f(s['share_cases_meeting_prior_3d'].get('LV_epi'), 2)} | "
                  f"{_f(s['share_cases_lacking'].get('RV'), 2)} | {_f(s.get('mean_mesh_TVS_over_mesh_volumes'), 4)} |")
    if r.get("stage_seconds"):
        print("\n| step | seconds | machine | date |")
        print("|---|---|---|---|")
        for s in r["stage_seconds"]:
            print(f"| {s['step']} | {s['seconds']} | {s['machine']} | {s['date']} |")
    if r["missing"]:
        print(f"\nnot (yet) evaluated: {', '.join(r['missing'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the study's work folder")
    p.add_argument("--out", default=None, help="JSON to write (default: print only); an existing fine-tune JSON is "
                                               "merged, a 400-iteration one moved to <name>_400it.json first")
    p.add_argument("--no-merge", action="store_true", help="do not keep the rows of an existing --out JSON")
    a = p.parse_args(argv)
    r = collect(a.work)
    if a.out:
        moved = move_earlier_protocol(a.out)
        if moved:
            print(f"moved the 400-iteration study's {a.out} to {moved}")
        if not a.no_merge and os.path.exists(a.out):
            old = json.load(open(a.out))
            if old.get("protocol") == PROTOCOL:
                r = merge_earlier(r, old)
    r = finish(r)
    r["per_case"] = _round_columns(r["per_case"])
    r = _clean(r)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(dumps(r))
        print(f"wrote {a.out}")
    print_tables(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
