"""Folder evaluator: nnU-Net's Dice beside topology metrics, in nnU-Net's summary format.

This is nnU-Net glue (it reads images with nnU-Net's reader/writer, takes the label ids from nnU-Net's
label manager and reuses ``compute_tp_fp_fn_tn``); the metrics themselves live in
:mod:`nnunet_topo.metrics` and :mod:`nnunet_topo.violations`.

``summary_topology.json`` has nnU-Net's keys, so tools that read ``summary.json`` read it too:

* ``metric_per_case``: one entry per case with ``reference_file``, ``prediction_file``, ``metrics`` (per label
  id: nnU-Net's ``Dice, IoU, TP, FP, FN, TN, n_pred, n_ref`` plus ``HD95`` (mm), ``betti_3d_pred``,
  ``betti_3d_ref``, ``betti_error_3d``, ``betti_error_2d``, ``cce_3d``, ``cce_2d``) and ``topology`` (per case:
  ``TVS``, ``TVS_per_rule``, ``violating_voxels``, ``violated``, ``SVR_per_rule``, ``betti_error_3d`` (sum over
  labels), ``betti_prior_error_3d``, ``topologically_correct``, ``warnings``);
* ``mean`` (per label, NaN-ignoring mean over cases, as nnU-Net), ``foreground_mean`` (mean over labels);
* ``topology_mean``: ``TVS``, ``TVS_per_rule``, ``VR``, ``VR_per_rule``, ``SVR_per_rule``, ``betti_error_3d``,
  ``betti_error_2d``, ``cce_3d``, ``cce_2d``, ``betti_prior_error_3d``, ``topologically_correct``, ``num_cases``.

See documentation/metrics.md for the definitions.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from nnunet_topo.metrics.geometry import hausdorff_distance_95
from nnunet_topo.metrics.topology import (
    betti_error,
    betti_error_2d,
    betti_numbers_3d,
    connected_component_error_2d,
    connected_component_error_3d,
    slice_violation_rate,
)
from nnunet_topo.rules import TopologySpec, spec_from_dataset_json
from nnunet_topo.summary_io import EvaluationError, load_json_arg, nanmean, to_builtin
from nnunet_topo.violations import violation_maps_numpy


SPACING_RTOL = 1e-3


def check_pair(ref: np.ndarray, pred: np.ndarray, ref_spacing: Sequence[float], pred_spacing: Sequence[float],
               ref_name: str = "reference", pred_name: str = "prediction") -> None:
    """Raise :class:`EvaluationError` unless reference and prediction can be compared voxel by voxel."""
    if ref.shape != pred.shape:
        raise EvaluationError(
            f"shape mismatch: {ref_name} has shape {ref.shape}, {pred_name} has shape {pred.shape}. Predictions must be "
            "in the geometry of the reference (nnUNetv2_predict writes them so).")
    if len(ref_spacing) != len(pred_spacing) or not np.allclose(ref_spacing, pred_spacing, rtol=SPACING_RTOL, atol=0):
        raise EvaluationError(
            f"spacing mismatch: {ref_name} has spacing {tuple(ref_spacing)}, {pred_name} has {tuple(pred_spacing)} "
            f"(relative tolerance {SPACING_RTOL}).")
    for arr, name in ((ref, ref_name), (pred, pred_name)):
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                raise EvaluationError(f"{name} contains NaN or inf; a label map must hold integer label ids")
            if not np.all(arr == np.round(arr)):
                raise EvaluationError(f"{name} contains non-integer values; a label map must hold integer label ids")


def evaluate_case(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], spec: TopologySpec,
                  label_ids: Sequence[int], ignore_label: Optional[int] = None) -> dict:
    """All metrics of one case.

    Args:
        reference, prediction: ``(Z, Y, X)`` integer label maps of the same shape.
        spacing: voxel spacing in mm, same axis order.
        spec: the topology spec (rules and priors).
        label_ids: foreground label ids to report (nnU-Net's ``label_manager.foreground_labels``).
        ignore_label: nnU-Net's ignore label; those reference voxels are excluded from Dice as in nnU-Net.

    Returns:
        ``{"metrics": {str(label): {...}}, "topology": {...}}`` (plain Python numbers, NaN where undefined).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    check_pair(reference, prediction, spacing, spacing)
    reference = reference.astype(np.int32, copy=False)
    prediction = prediction.astype(np.int32, copy=False)
    ignore_mask = reference == ignore_label if ignore_label is not None else None
    axis2d = spec.betti_2d_axis
    case_warnings: List[str] = []
    if not np.any(prediction[reference != ignore_label] if ignore_label is not None else prediction):
        case_warnings.append("prediction is empty (all background)")
    if not np.any(reference):
        case_warnings.append("reference is empty (all background): TVS is undefined (NaN)")

    metrics: Dict[str, dict] = {}
    betti_sum = 0
    all_correct = True
    for lab in label_ids:
        mr = reference == lab
        mp = prediction == lab
        tp, fp, fn, tn = compute_tp_fp_fn_tn(mr, mp, ignore_mask)
        m: Dict[str, object] = {}
        if tp + fp + fn == 0:
            m["Dice"], m["IoU"] = math.nan, math.nan
        else:
            m["Dice"] = 2 * tp / (2 * tp + fp + fn)
            m["IoU"] = tp / (tp + fp + fn)
        m.update(FP=int(fp), TP=int(tp), FN=int(fn), TN=int(tn), n_pred=int(fp + tp), n_ref=int(fn + tp))
        m["HD95"] = hausdorff_distance_95(mp, mr, spacing)
        bp, br = betti_numbers_3d(mp), betti_numbers_3d(mr)
        m["betti_3d_pred"], m["betti_3d_ref"] = list(bp), list(br)
        m["betti_error_3d"] = betti_error(bp, br)
        m["betti_error_2d"] = betti_error_2d(mp, mr, axis=axis2d)
        m["cce_3d"] = connected_component_error_3d(mp, mr)
        m["cce_2d"] = connected_component_error_2d(mp, mr, axis=axis2d)
        m["topologically_correct"] = float(m["betti_error_3d"] == 0)
        betti_sum += m["betti_error_3d"]
        all_correct &= m["betti_error_3d"] == 0
        metrics[str(lab)] = m

    # Betti priors of the dataset (labels or regions), on the prediction
    prior_error = 0
    for name, prior in spec.betti.items():
        ids = spec.betti_structures[name].label_ids
        prior_error += betti_error(betti_numbers_3d(np.isin(prediction, ids)), prior)

    # rule violations on the prediction
    vmaps = violation_maps_numpy(prediction, spec)
    ref_fg = int(np.count_nonzero(reference)) if ignore_label is None else \
        int(np.count_nonzero((reference != 0) & (reference != ignore_label)))
    violating = {name: int(np.count_nonzero(v)) for name, v in vmaps.items()}
    tvs_per_rule = {name: (v / ref_fg if ref_fg > 0 else math.nan) for name, v in violating.items()}
    tvs_total = (sum(violating.values()) / ref_fg) if ref_fg > 0 else math.nan
    considered = (reference != 0) | (prediction != 0)
    svr = {}
    for rule in spec.rules:
        axis = rule.axis if rule.mode == "2d" else axis2d
        svr[rule.name] = slice_violation_rate(vmaps[rule.name], axis=axis, considered=considered)
    topology = {
        "TVS": tvs_total,
        "TVS_per_rule": tvs_per_rule,
        "violating_voxels": violating,
        "violated": {k: v > 0 for k, v in violating.items()},
        "SVR_per_rule": svr,
        "betti_error_3d": betti_sum,
        "betti_prior_error_3d": prior_error,
        "topologically_correct": bool(all_correct),
        "warnings": case_warnings,
    }
    return {"metrics": metrics, "topology": topology}


def _read(rw, path: str):
    if not os.path.isfile(path):
        raise EvaluationError(f"file not found: {path}")
    seg, props = rw.read_seg(path)
    seg = np.asarray(seg)
    if seg.ndim == 4:
        if seg.shape[0] != 1:
            raise EvaluationError(f"{path}: expected a single-channel segmentation, got shape {seg.shape}")
        seg = seg[0]
    return seg, tuple(float(s) for s in props["spacing"])


def _evaluate_file_pair(ref_file: str, pred_file: str, rw, spec: TopologySpec, label_ids, ignore_label) -> dict:
    ref, ref_spacing = _read(rw, ref_file)
    pred, pred_spacing = _read(rw, pred_file)
    check_pair(ref, pred, ref_spacing, pred_spacing, ref_name=ref_file, pred_name=pred_file)
    result = evaluate_case(ref, pred, ref_spacing, spec, label_ids, ignore_label)
    for w in result["topology"]["warnings"]:
        warnings.warn(f"{os.path.basename(pred_file)}: {w}")
    return {"reference_file": ref_file, "prediction_file": pred_file, **result}


def aggregate(cases: List[dict], spec: TopologySpec, label_ids: Sequence[int]) -> dict:
    """nnU-Net's ``mean`` / ``foreground_mean`` plus ``topology_mean`` over evaluated cases."""
    scalar_keys = [k for k, v in cases[0]["metrics"][str(label_ids[0])].items() if not isinstance(v, list)] \
        if cases and label_ids else []
    mean = {str(lab): {k: nanmean(c["metrics"][str(lab)][k] for c in cases) for k in scalar_keys}
            for lab in label_ids}
    foreground_mean = {k: nanmean(mean[str(lab)][k] for lab in label_ids) for k in scalar_keys}
    rule_names = [r.name for r in spec.rules]
    topo = [c["topology"] for c in cases]
    topology_mean = {
        "num_cases": len(cases),
        "TVS": nanmean(t["TVS"] for t in topo),
        "TVS_per_rule": {r: nanmean(t["TVS_per_rule"][r] for t in topo) for r in rule_names},
        "VR": float(np.mean([any(t["violated"].values()) for t in topo])) if topo else math.nan,
        "VR_per_rule": {r: float(np.mean([t["violated"][r] for t in topo])) if topo else math.nan
                        for r in rule_names},
        "SVR_per_rule": {r: nanmean(t["SVR_per_rule"][r] for t in topo) for r in rule_names},
        "betti_error_3d": nanmean(t["betti_error_3d"] for t in topo),
        "betti_prior_error_3d": nanmean(t["betti_prior_error_3d"] for t in topo),
        "betti_error_2d": foreground_mean.get("betti_error_2d", math.nan),
        "cce_3d": foreground_mean.get("cce_3d", math.nan),
        "cce_2d": foreground_mean.get("cce_2d", math.nan),
        "topologically_correct": float(np.mean([t["topologically_correct"] for t in topo])) if topo else math.nan,
    }
    return {"mean": mean, "foreground_mean": foreground_mean, "topology_mean": topology_mean}


def compute_topology_metrics_on_folder(folder_ref: str, folder_pred: str,
                                       dataset_json: Union[str, os.PathLike, dict],
                                       plans: Union[str, os.PathLike, dict],
                                       output_file: Optional[str] = None,
                                       num_processes: int = 1,
                                       chill: bool = False,
                                       spec: Optional[TopologySpec] = None,
                                       show_progress: bool = True,
                                       mesh_folder: Optional[str] = None) -> dict:
    """Evaluate every prediction in ``folder_pred`` against the file of the same name in ``folder_ref``.

    Same inputs as nnU-Net's ``compute_metrics_on_folder2`` (``nnUNetv2_evaluate_folder``). Writes
    ``output_file`` (default ``folder_pred/summary_topology.json``; nnU-Net's ``summary.json`` is never
    touched) and returns the summary dict. With ``mesh_folder`` (the output of ``nnUNetv2_topo_predict_meshes``), mesh
    Dice, Chamfer, HD95, smoothness and mesh TVS are added (:mod:`nnunet_topo.mesh_evaluation`).

    Raises:
        EvaluationError: a folder or file is missing, a reference is missing for a prediction, a reference has
            no prediction (unless ``chill``), shapes or spacings differ, or a label map holds NaNs.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = load_json_arg(dataset_json, "dataset.json")
    plans = load_json_arg(plans, "plans file")
    for folder, what in ((folder_ref, "reference folder"), (folder_pred, "prediction folder")):
        if not os.path.isdir(folder):
            raise EvaluationError(f"{what} not found: {folder}")
    file_ending = dataset_json["file_ending"]
    files_pred = sorted(f for f in os.listdir(folder_pred) if f.endswith(file_ending))
    files_ref = sorted(f for f in os.listdir(folder_ref) if f.endswith(file_ending))
    if not files_pred:
        raise EvaluationError(f"no predictions ending in {file_ending!r} in {folder_pred}")
    missing_ref = [f for f in files_pred if f not in files_ref]
    if missing_ref:
        raise EvaluationError(f"{len(missing_ref)} prediction(s) have no reference in {folder_ref}: {missing_ref[:10]}")
    missing_pred = [f for f in files_ref if f not in files_pred]
    if missing_pred and not chill:
        raise EvaluationError(
            f"{len(missing_pred)} reference case(s) have no prediction in {folder_pred}: {missing_pred[:10]} "
            "(pass chill=True / --chill to evaluate only the cases that were predicted)")
    if spec is None:
        spec = spec_from_dataset_json(dataset_json)
    label_manager = PlansManager(plans).get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise EvaluationError("region-based label definitions are not supported by the topology evaluator")
    label_ids = [int(i) for i in label_manager.foreground_labels]
    rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(folder_ref, files_ref[0]))()
    args = [(os.path.join(folder_ref, f), os.path.join(folder_pred, f), rw, spec, label_ids,
             label_manager.ignore_label) for f in files_pred]

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if num_processes <= 1:
        it = (_evaluate_file_pair(*a) for a in args)
        if show_progress and tqdm is not None:
            it = tqdm(it, total=len(args), desc="topology evaluation")
        cases = list(it)
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            async_results = [pool.apply_async(_evaluate_file_pair, a) for a in args]
            it = (r.get() for r in async_results)
            if show_progress and tqdm is not None:
                it = tqdm(it, total=len(args), desc="topology evaluation")
            cases = list(it)

    summary = {"metric_per_case": cases, **aggregate(cases, spec, label_ids),
               "rules": [r.name for r in spec.rules], "label_names": {str(v): k for k, v in spec.labels.items()}}
    if mesh_folder is not None:
        # imported here: it pulls in torch and trimesh, which the spawned label-map workers do not need
        from nnunet_topo.mesh_evaluation import evaluate_mesh_folder, merge_mesh_summary

        mesh_summary = evaluate_mesh_folder(folder_ref, mesh_folder, dataset_json, spec=spec, chill=chill,
                                            show_progress=show_progress)
        summary = merge_mesh_summary(summary, mesh_summary)
    summary = to_builtin(summary)
    if output_file is None:
        output_file = os.path.join(folder_pred, "summary_topology.json")
    if not output_file.endswith(".json"):
        raise EvaluationError(f"output_file must end with .json, got {output_file}")
    with open(output_file, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def format_table(summary: dict) -> str:
    """A plain-text table of the headline numbers (per label and topology)."""
    names = summary.get("label_names", {})
    lines = [f"{'label':<12}{'Dice':>8}{'HD95mm':>9}{'Betti3D':>9}{'Betti2D':>9}{'CCE3D':>8}"]
    for key, m in summary["mean"].items():
        def f(v, w, p=3):
            return f"{'nan':>{w}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{w}.{p}f}"
        lines.append(f"{names.get(key, key):<12}{f(m['Dice'], 8)}{f(m['HD95'], 9, 2)}{f(m['betti_error_3d'], 9, 2)}"
                     f"{f(m['betti_error_2d'], 9, 3)}{f(m['cce_3d'], 8, 2)}")
    t = summary["topology_mean"]
    lines.append("")
    lines.append(f"cases {t['num_cases']}  TVS {t['TVS']:.5f}  VR {t['VR']:.3f}  mean Betti error 3D "
                 f"{t['betti_error_3d']:.3f}  topologically correct {t['topologically_correct']:.3f}")
    for r, v in t["TVS_per_rule"].items():
        lines.append(f"  {r:<45} TVS {v if v is not None else float('nan'):.5f}  VR {t['VR_per_rule'][r]:.3f}  "
                     f"SVR {t['SVR_per_rule'][r] if t['SVR_per_rule'][r] is not None else float('nan'):.3f}")
    if "mesh_mean" in summary:
        lines.append("")
        lines.append(f"{'mesh':<12}{'Dice':>8}{'Chamfer':>9}{'HD95mm':>9}{'Laplacian':>11}")
        for name, m in summary["mesh_mean"].items():
            def g(k, w=9, p=3):
                v = m.get(k)
                return f"{'nan':>{w}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{w}.{p}f}"
            lines.append(f"{name:<12}{g('Dice', 8)}{g('Chamfer_mm')}{g('HD95_mm')}{g('laplacian_energy_mm2', 11)}")
        mt = summary.get("mesh_topology_mean", {})
        tvs = mt.get("TVS")
        grid = ", ".join(f"{g:g}" for g in mt.get("grid_mm", []))
        lines.append(f"mesh TVS {tvs if tvs is not None else float('nan'):.5f}"
                     + (f"  (violating volumes on a {grid} mm isotropic world grid)" if grid else ""))
    return "\n".join(lines)


def check_rules_on_folder(labels_folder: str, dataset_json: Union[str, os.PathLike, dict],
                          show_progress: bool = True) -> dict:
    """Check the reference label maps of a dataset against its own topology spec.

    For every case: per rule the number of violating voxels and the slice indices (along the rule's axis for
    2D rules, along ``betti_2d.axis`` for 3D rules) that hold violations; per Betti prior, the reference Betti
    numbers where they differ from the prior. A rule that reference labels violate cannot be learned: fix
    the rule, add ``may_touch``, or switch it to ``"mode": "2d"``.

    Returns:
        ``{"num_cases", "rules": {name: {"cases_violating", "cases": {case: {"voxels", "slices"}}}},
        "betti": {structure: {"prior", "cases_differing", "cases": {case: betti}}}, "clean": bool}``.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = load_json_arg(dataset_json, "dataset.json")
    if not os.path.isdir(labels_folder):
        raise EvaluationError(f"labels folder not found: {labels_folder}")
    spec = spec_from_dataset_json(dataset_json)
    file_ending = dataset_json["file_ending"]
    files = sorted(f for f in os.listdir(labels_folder) if f.endswith(file_ending))
    if not files:
        raise EvaluationError(f"no label files ending in {file_ending!r} in {labels_folder}")
    rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(labels_folder, files[0]))()
    report = {"num_cases": len(files),
              "rules": {r.name: {"cases_violating": 0, "cases": {}} for r in spec.rules},
              "betti": {name: {"prior": list(p), "cases_differing": 0, "cases": {}} for name, p in spec.betti.items()}}
    it = files
    if show_progress:
        try:
            from tqdm import tqdm
            it = tqdm(files, desc="checking rules")
        except ImportError:  # pragma: no cover
            pass
    for f in it:
        case = f[: -len(file_ending)]
        seg, _ = _read(rw, os.path.join(labels_folder, f))
        check_pair(seg, seg, (1, 1, 1), (1, 1, 1), ref_name=f, pred_name=f)
        seg = seg.astype(np.int32, copy=False)
        vmaps = violation_maps_numpy(seg, spec)
        for rule in spec.rules:
            v = vmaps[rule.name]
            n = int(np.count_nonzero(v))
            if n:
                axis = rule.axis if rule.mode == "2d" else spec.betti_2d_axis
                other = tuple(a for a in range(v.ndim) if a != axis)
                slices = np.nonzero(v.any(axis=other))[0].tolist()
                entry = report["rules"][rule.name]
                entry["cases_violating"] += 1
                entry["cases"][case] = {"voxels": n, "slices": slices, "slice_axis": axis}
        for name, prior in spec.betti.items():
            b = betti_numbers_3d(np.isin(seg, spec.betti_structures[name].label_ids))
            if tuple(b) != tuple(prior):
                report["betti"][name]["cases_differing"] += 1
                report["betti"][name]["cases"][case] = list(b)
    report["clean"] = all(e["cases_violating"] == 0 for e in report["rules"].values()) and \
        all(e["cases_differing"] == 0 for e in report["betti"].values())
    return report


def cached_rule_check(labels_folder: str, dataset_json: dict, cache_file: str) -> dict:
    """:func:`check_rules_on_folder`, cached in ``cache_file`` under a key of the spec, the labels and the files'
    names and modification times (written atomically; a stale or unreadable cache is recomputed)."""
    import hashlib

    files = sorted(f for f in os.listdir(labels_folder) if f.endswith(dataset_json["file_ending"]))
    key = hashlib.sha1(json.dumps([dataset_json.get("topology"), dataset_json["labels"], files,
                                   [os.path.getmtime(os.path.join(labels_folder, f)) for f in files]],
                                  sort_keys=True).encode()).hexdigest()
    if os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return cached["report"]
        except (OSError, ValueError, KeyError):
            pass
    report = check_rules_on_folder(labels_folder, dataset_json, show_progress=False)
    tmp = f"{cache_file}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, "report": report}, f)
    os.replace(tmp, cache_file)
    return report


def reference_violations_message(report: dict) -> str:
    """Why a rule check of reference labels forbids training ("" when every rule holds)."""
    bad = {name: e for name, e in report["rules"].items() if e["cases_violating"]}
    if not bad:
        return ""
    lines = [f"  {name}: violated in {e['cases_violating']}/{report['num_cases']} reference case(s), e.g. "
             + ", ".join(f"{c} ({v['voxels']} voxels, slices {v['slices'][:5]})"
                         for c, v in list(e["cases"].items())[:3]) for name, e in bad.items()]
    return ("the reference labels of this dataset violate topology rules of its dataset.json, so the rules cannot be "
            "learned:\n" + "\n".join(lines) + "\nFix the rules (add \"may_touch\", use \"mode\": \"2d\") or the "
            "labels; nnUNetv2_topo_check_rules -d DATASET reports every case.")


def format_rule_report(report: dict) -> str:
    lines = [f"{report['num_cases']} reference case(s) checked"]
    for name, e in report["rules"].items():
        lines.append(f"rule {name}: violated in {e['cases_violating']}/{report['num_cases']} case(s)")
        for case, c in list(e["cases"].items())[:20]:
            lines.append(f"    {case}: {c['voxels']} voxel(s) in slice(s) {c['slices']} (axis {c['slice_axis']})")
    for name, e in report["betti"].items():
        lines.append(f"Betti prior {name} {tuple(e['prior'])}: differs in {e['cases_differing']}/{report['num_cases']} "
                     "case(s)")
        for case, b in list(e["cases"].items())[:20]:
            lines.append(f"    {case}: reference Betti {tuple(b)}")
    lines.append("all rules and priors hold on the reference labels" if report["clean"] else
                 "some rules or priors do NOT hold on the reference labels: fix the rules (may_touch, \"mode\": \"2d\") "
                 "or the labels before training")
    return "\n".join(lines)
