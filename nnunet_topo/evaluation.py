"""Folder evaluator: nnU-Net's Dice beside topology metrics, in nnU-Net's summary format.

This is nnU-Net glue (it reads images with nnU-Net's reader/writer, takes the label ids from nnU-Net's
label manager and reuses ``compute_tp_fp_fn_tn``); the metrics themselves live in
:mod:`nnunet_topo.metrics` and :mod:`nnunet_topo.violations`.

``summary_topology.json`` has nnU-Net's keys, so tools that read ``summary.json`` read it too:

* ``metric_per_case``: one entry per case with ``reference_file``, ``prediction_file``, ``metrics`` (per label
  id: nnU-Net's ``Dice, IoU, TP, FP, FN, TN, n_pred, n_ref`` plus ``HD95`` (mm), ``betti_3d_pred``,
  ``betti_3d_ref``, ``betti_error_3d``, ``betti_error_2d``, ``cce_3d``, ``cce_2d``) and ``topology`` (per case:
  ``TVS``, ``TVS_per_rule``, ``violating_voxels``, ``violated``, ``SVR_per_rule``, ``betti_error_3d`` (sum over
  labels), ``betti_prior_error_3d``, ``topologically_correct``, the per-slice prior metrics ``betti_prior_error_2d``,
  ``slices_meeting_prior_2d``, ``topologically_correct_2d``, ``sparse_reference``, ``worst_case``, ``warnings``);
* ``mean`` (per label, NaN-ignoring mean over cases, as nnU-Net), ``foreground_mean`` (mean over labels), and
  ``mean_num_cases`` / ``foreground_mean_num_cases`` / ``topology_mean_num_cases``: how many cases each mean used;
* ``topology_mean``: ``TVS``, ``TVS_per_rule``, ``VR``, ``VR_per_rule``, ``SVR_per_rule``, ``betti_error_3d``,
  ``betti_error_2d``, ``cce_3d``, ``cce_2d``, ``betti_prior_error_3d``, ``topologically_correct``,
  ``betti_prior_error_2d``, ``slices_meeting_prior_2d``, ``topologically_correct_2d``, ``num_cases``.

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

from nnunet_topo.label_maps import check_geometry, check_pair, read_label_map
from nnunet_topo.metrics.geometry import hausdorff_distance_95
from nnunet_topo.metrics.topology import (
    betti_error,
    betti_error_2d,
    betti_numbers_3d,
    betti_numbers_per_slice,
    betti_prior_error,
    connected_component_error_2d,
    connected_component_error_3d,
    slice_violation_rate,
)
from nnunet_topo.paths import OutputPathError, check_output, defined_label_values, reading
from nnunet_topo.summary_io import EvaluationError, load_json_arg, mean_and_count, nanmean, to_builtin
from nnunet_topo.topology_spec import TopologySpec, rule_structures, spec_from_dataset_json
from nnunet_topo.violations import violation_maps_numpy


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length (mm) of the image's diagonal, ``sqrt(sum((n_i * s_i)^2))``: longer than any distance between two voxel
    centres of the image, so it is the worst-case HD95 of a structure that is missed (or invented) entirely."""
    return float(math.sqrt(sum((float(n) * float(sp)) ** 2 for n, sp in zip(shape, spacing))))


def evaluate_case(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], spec: TopologySpec,
                  label_ids: Sequence[int], ignore_label: Optional[int] = None) -> dict:
    """All metrics of one case.

    Args:
        reference, prediction: ``(Z, Y, X)`` integer label maps of the same shape.
        spacing: voxel spacing in mm, same axis order.
        spec: the topology spec (rules and priors).
        label_ids: foreground label ids to report (nnU-Net's ``label_manager.foreground_labels``).
        ignore_label: nnU-Net's ignore label. Ignored reference voxels are *unknown* (sparse annotation), never
            background: each metric is computed on what the reference defines or is undefined (NaN), as
            documentation/metrics.md says per metric.

    Returns:
        ``{"metrics": {str(label): {...}}, "topology": {...}}`` (plain Python numbers, NaN where undefined;
        ``topology["worst_case"]`` lists the values replaced by their documented worst case, ``warnings`` why).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    check_pair(reference, prediction, spacing, spacing)
    reference = reference.astype(np.int32, copy=False)
    prediction = prediction.astype(np.int32, copy=False)
    ignore_mask = reference == ignore_label if ignore_label is not None else None
    sparse = ignore_mask is not None and bool(ignore_mask.any())
    known = ~ignore_mask if sparse else None
    ref_fg_mask = (reference != 0) & ~ignore_mask if sparse else reference != 0
    axis2d = spec.betti_2d_axis
    # slices (along the per-slice axis) without an ignored voxel: the per-slice errors are measured there only
    slice_known = None
    if sparse:
        other = tuple(a for a in range(reference.ndim) if a != axis2d)
        full = ~ignore_mask.any(axis=other)
        shape = [1] * reference.ndim
        shape[axis2d] = -1
        slice_known = full.reshape(shape)
    case_warnings: List[str] = []
    pred_known = prediction if known is None else np.where(known, prediction, 0)
    if not np.any(pred_known):
        case_warnings.append("prediction is empty (all background)")
    if not np.any(ref_fg_mask):
        case_warnings.append("reference is empty (all background): TVS is undefined (NaN)")
    if sparse:
        case_warnings.append(
            f"sparse reference ({int(ignore_mask.sum())} ignored voxels): Dice and HD95 on the annotated voxels, "
            f"per-slice errors on the {int(slice_known.sum())} fully annotated slice(s) along axis {axis2d}; "
            "3D Betti error, CCE 3D and topologically correct are undefined (NaN)")
    diagonal = image_diagonal_mm(reference.shape, spacing)
    worst: Dict[str, list] = {"HD95": [], "rules": []}

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
        if (tp + fp > 0) != (tp + fn > 0):  # missed or invented entirely: no distance exists, take the worst
            m["HD95"] = diagonal
            worst["HD95"].append(str(lab))
        else:
            m["HD95"] = hausdorff_distance_95(mp, mr, spacing, known)
        bp = betti_numbers_3d(mp)
        m["betti_3d_pred"] = list(bp)
        if sparse:
            m["betti_3d_ref"] = None
            m["betti_error_3d"] = m["cce_3d"] = m["topologically_correct"] = math.nan
            mp2, mr2 = mp & slice_known, mr & slice_known
        else:
            br = betti_numbers_3d(mr)
            m["betti_3d_ref"] = list(br)
            m["betti_error_3d"] = betti_error(bp, br)
            m["cce_3d"] = connected_component_error_3d(mp, mr)
            m["topologically_correct"] = float(m["betti_error_3d"] == 0)
            betti_sum += m["betti_error_3d"]
            all_correct &= m["betti_error_3d"] == 0
            mp2, mr2 = mp, mr
        m["betti_error_2d"] = betti_error_2d(mp2, mr2, axis=axis2d)
        m["cce_2d"] = connected_component_error_2d(mp2, mr2, axis=axis2d)
        metrics[str(lab)] = m

    # Betti priors of the dataset (labels or regions), on the prediction (needs no reference: defined when sparse)
    prior_error = 0
    for name, prior in spec.betti.items():
        ids = spec.betti_structures[name].label_ids
        prior_error += betti_error(betti_numbers_3d(np.isin(prediction, ids)), prior)

    # per-slice Betti priors (betti_2d, allowed sets) on the prediction, on the slices where the prediction or the
    # reference has the structure (a slice the prediction misses counts with its (0, 0); fully annotated slices only
    # when sparse): Clough's "topologically correct" for slice-wise priors
    prior_2d_errors, prior_2d_met = [], []
    other_axes = tuple(a for a in range(reference.ndim) if a != axis2d)
    for name, prior in spec.betti_2d.items():
        ids = spec.betti_structures[name].label_ids
        mp, mr = np.isin(prediction, ids), np.isin(reference, ids)
        if slice_known is not None:
            mp, mr = mp & slice_known, mr & slice_known
        present = mp.any(axis=other_axes) | mr.any(axis=other_axes)
        for b, used in zip(betti_numbers_per_slice(mp, axis=axis2d), present):
            if used:
                prior_2d_errors.append(betti_prior_error(b, prior))
                prior_2d_met.append(prior_2d_errors[-1] == 0)
    have_2d = bool(spec.betti_2d)

    # rule violations on the prediction, normalised by the reference foreground volume; for a sparse reference
    # the ignored voxels are filled with the prediction, so the ignore label does not shrink the volume
    vmaps = violation_maps_numpy(prediction, spec)
    ref_fg = int(np.count_nonzero(ref_fg_mask))
    if sparse:
        ref_fg += int(np.count_nonzero(ignore_mask & (prediction != 0)))
    violating = {name: int(np.count_nonzero(v)) for name, v in vmaps.items()}
    vacuous = {}
    for rule in spec.rules:
        structs = rule_structures(rule)
        lost = [s.name for s in structs
                if not np.isin(prediction, s.label_ids).any() and np.isin(reference, s.label_ids).any()]
        if lost:  # the rule holds only because the prediction lacks a structure the reference has
            vacuous[rule.name] = int(np.count_nonzero(np.isin(reference, [i for s in structs for i in s.label_ids])))
            case_warnings.append(f"rule {rule.name} holds only vacuously (the prediction lacks {lost}): its TVS is "
                                 "the worst case, the reference volume of its structures; violated and SVR 1")
            worst["rules"].append(rule.name)
    counted = {**violating, **{k: max(v, violating[k]) for k, v in vacuous.items()}}
    if not spec.rules:
        tvs_per_rule, tvs_total = {}, math.nan  # no rule: nothing to violate, the score is undefined, not 0
    else:
        tvs_per_rule = {name: (v / ref_fg if ref_fg > 0 else math.nan) for name, v in counted.items()}
        tvs_total = (sum(counted.values()) / ref_fg) if ref_fg > 0 else math.nan
    considered = ref_fg_mask | (prediction != 0)
    svr = {}
    for rule in spec.rules:
        axis = rule.axis if rule.mode == "2d" else axis2d
        svr[rule.name] = 1.0 if rule.name in vacuous else \
            slice_violation_rate(vmaps[rule.name], axis=axis, considered=considered)
    topology = {
        "TVS": tvs_total,
        "TVS_per_rule": tvs_per_rule,
        "violating_voxels": violating,
        "violated": {k: v > 0 or k in vacuous for k, v in violating.items()},
        "SVR_per_rule": svr,
        "betti_error_3d": math.nan if sparse else betti_sum,
        "betti_prior_error_3d": prior_error,
        "topologically_correct": math.nan if sparse else bool(all_correct),
        # betti_2d priors: mean per-slice prior error over the prediction's slices with the structures, share of
        # those slices meeting the prior, and whether all do (NaN without betti_2d priors)
        "betti_prior_error_2d": (float(np.mean(prior_2d_errors)) if prior_2d_errors else 0.0) if have_2d else math.nan,
        "slices_meeting_prior_2d": (float(np.mean(prior_2d_met)) if prior_2d_met else math.nan) if have_2d else math.nan,
        "topologically_correct_2d": bool(all(prior_2d_met)) if have_2d else math.nan,
        "sparse_reference": sparse,
        "worst_case": worst,
        "warnings": case_warnings,
    }
    return {"metrics": metrics, "topology": topology}


def _evaluate_file_pair(ref_file: str, pred_file: str, rw, spec: TopologySpec, label_ids, ignore_label,
                        ignore_geometry: bool = False, defined: Optional[Sequence[int]] = None) -> dict:
    ref, ref_spacing, ref_geometry = read_label_map(rw, ref_file, defined, "reference")
    pred, pred_spacing, pred_geometry = read_label_map(rw, pred_file, defined, "prediction")
    check_pair(ref, pred, ref_spacing, pred_spacing, ref_name=ref_file, pred_name=pred_file)
    try:
        check_geometry(ref_geometry, pred_geometry, ref_spacing, ref_name=ref_file, pred_name=pred_file)
    except EvaluationError as e:
        if not ignore_geometry:
            raise
        warnings.warn(f"--ignore_geometry: evaluating voxel by voxel despite: {e}")
    result = evaluate_case(ref, pred, ref_spacing, spec, label_ids, ignore_label)
    for w in result["topology"]["warnings"]:
        warnings.warn(f"{os.path.basename(pred_file)}: {w}")
    return {"reference_file": ref_file, "prediction_file": pred_file, **result}


def aggregate(cases: List[dict], spec: TopologySpec, label_ids: Sequence[int]) -> dict:
    """nnU-Net's ``mean`` / ``foreground_mean`` plus ``topology_mean`` over evaluated cases.

    Each mean leaves out the cases where the value is undefined (NaN), as nnU-Net does, and says over how many
    cases it was taken: ``mean_num_cases`` (per label and metric), ``foreground_mean_num_cases`` (per metric: the
    fewest cases any label's mean used), ``topology_mean_num_cases`` (per metric; per rule for ``*_per_rule``).
    Worst-case values (HD95 of a missed structure, TVS of a vacuous rule) are ordinary values here, so that
    emptying a prediction can never improve a mean.
    """
    scalar_keys = [k for k, v in cases[0]["metrics"][str(label_ids[0])].items() if not isinstance(v, list)
                   and v is not None] if cases and label_ids else []
    scalar_keys = [k for k in scalar_keys if k != "betti_3d_ref"]
    mean, mean_n = {}, {}
    for lab in label_ids:
        pairs = {k: mean_and_count([c["metrics"][str(lab)].get(k) for c in cases]) for k in scalar_keys}
        mean[str(lab)] = {k: v[0] for k, v in pairs.items()}
        mean_n[str(lab)] = {k: v[1] for k, v in pairs.items()}
    foreground_mean = {k: nanmean(mean[str(lab)][k] for lab in label_ids) for k in scalar_keys}
    foreground_n = {k: min((mean_n[str(lab)][k] for lab in label_ids), default=0) for k in scalar_keys}
    rule_names = [r.name for r in spec.rules]
    topo = [c["topology"] for c in cases]
    tm: Dict[str, object] = {"num_cases": len(cases)}
    tn: Dict[str, object] = {}
    for key in ("TVS", "betti_error_3d", "betti_prior_error_3d", "topologically_correct", "betti_prior_error_2d",
                "slices_meeting_prior_2d", "topologically_correct_2d"):
        tm[key], tn[key] = mean_and_count([float(t[key]) if isinstance(t.get(key), bool) else t.get(key, math.nan)
                                           for t in topo])
    if rule_names:
        tm["VR"], tn["VR"] = mean_and_count([float(any(t["violated"].values())) for t in topo])
    else:  # no rules: nothing can be violated; undefined, not 0
        tm["VR"], tn["VR"] = math.nan, 0
    for key, per_case in (("TVS_per_rule", lambda t, r: t["TVS_per_rule"][r]),
                          ("VR_per_rule", lambda t, r: float(t["violated"][r])),
                          ("SVR_per_rule", lambda t, r: t["SVR_per_rule"][r])):
        pairs = {r: mean_and_count([per_case(t, r) for t in topo]) for r in rule_names}
        tm[key] = {r: v[0] for r, v in pairs.items()}
        tn[key] = {r: v[1] for r, v in pairs.items()}
    for key in ("betti_error_2d", "cce_3d", "cce_2d"):
        tm[key], tn[key] = foreground_mean.get(key, math.nan), foreground_n.get(key, 0)
    return {"mean": mean, "mean_num_cases": mean_n, "foreground_mean": foreground_mean,
            "foreground_mean_num_cases": foreground_n, "topology_mean": tm, "topology_mean_num_cases": tn}


def check_summary_output(output_file: str, folder_ref: str, folder_pred: str, mesh_folder: Optional[str] = None,
                         dataset_json: Union[str, os.PathLike, dict, None] = None,
                         plans: Union[str, os.PathLike, dict, None] = None, **more_inputs: Optional[str]) -> None:
    """The evaluator's output guard, before any work: the summary never replaces an input (it may lie in the
    prediction folder, as nnU-Net's summary.json does; the .json ending keeps it off the predictions) and is never
    nnU-Net's own ``summary.json`` (its validation and its evaluate_folder write that name). ``more_inputs``:
    further inputs of a caller, ``{what: path}``. Raises :class:`nnunet_topo.paths.OutputPathError`."""
    check_output(output_file, {"reference folder": folder_ref, "prediction folder": folder_pred,
                               "mesh folder": mesh_folder,
                               "dataset.json": None if isinstance(dataset_json, dict) else dataset_json,
                               "plans file": None if isinstance(plans, dict) else plans, **more_inputs},
                 kind="file", extensions=(".json",), may_lie_in=[folder_pred])
    if os.path.basename(output_file) == "summary.json":
        raise OutputPathError(f"-o {output_file}: summary.json is the name of nnU-Net's own summary, which this "
                              "command never replaces; use another name (the default is summary_topology.json)")


def compute_topology_metrics_on_folder(folder_ref: str, folder_pred: str,
                                       dataset_json: Union[str, os.PathLike, dict],
                                       plans: Union[str, os.PathLike, dict],
                                       output_file: Optional[str] = None,
                                       num_processes: int = 1,
                                       chill: bool = False,
                                       spec: Optional[TopologySpec] = None,
                                       show_progress: bool = True,
                                       mesh_folder: Optional[str] = None,
                                       ignore_geometry: bool = False) -> dict:
    """Evaluate every prediction in ``folder_pred`` against the file of the same name in ``folder_ref``.

    Same inputs as nnU-Net's ``compute_metrics_on_folder2`` (``nnUNetv2_evaluate_folder``). Writes
    ``output_file`` (default ``folder_pred/summary_topology.json``; nnU-Net's ``summary.json`` is never
    touched) and returns the summary dict. With ``mesh_folder`` (the output of ``nnUNetv2_topo_predict_meshes``), mesh
    Dice, Chamfer, HD95, smoothness and mesh TVS are added (:mod:`nnunet_topo.mesh_evaluation`).

    Raises:
        EvaluationError: a folder or file is missing, a reference is missing for a prediction, a reference has
            no prediction (unless ``chill``), shapes or spacings differ, origin or direction differ (unless
            ``ignore_geometry``: then a warning per case), or a label map holds NaNs.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for folder, what in ((folder_ref, "reference folder"), (folder_pred, "prediction folder")):
        if not os.path.isdir(folder):
            raise EvaluationError(f"{what} not found: {folder}")
    if output_file is None:
        output_file = os.path.join(folder_pred, "summary_topology.json")
    check_summary_output(output_file, folder_ref, folder_pred, mesh_folder, dataset_json, plans)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    plans = load_json_arg(plans, "plans file")
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
    with reading("reference", os.path.join(folder_ref, files_ref[0])):
        rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(folder_ref, files_ref[0]))()
    args = [(os.path.join(folder_ref, f), os.path.join(folder_pred, f), rw, spec, label_ids,
             label_manager.ignore_label, ignore_geometry, defined_label_values(dataset_json)) for f in files_pred]

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
    with open(output_file, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def format_cell(v, width: int, precision: int, n: Optional[int] = None, total: Optional[int] = None) -> str:
    """A right-aligned number; ``n/a`` when undefined; a ``*`` when the mean was taken over fewer than all cases."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'n/a':>{width}}"
    flag = "*" if n is not None and total is not None and n < total else ""
    return f"{v:.{precision}f}{flag}".rjust(width)


def format_table(summary: dict) -> str:
    """A plain-text table of the headline numbers (per label and topology).

    ``n/a``: undefined for every case (e.g. TVS without rules). ``*``: a mean over fewer cases than were evaluated
    (the others were undefined); the footnote says how many.
    """
    names = summary.get("label_names", {})
    t = summary["topology_mean"]
    total = t["num_cases"]
    mean_n = summary.get("mean_num_cases", {})
    tn = summary.get("topology_mean_num_cases", {})
    short: List[str] = []
    lines = [f"{'label':<12}{'Dice':>9}{'HD95mm':>10}{'Betti3D':>10}{'Betti2D':>10}{'CCE3D':>9}"]
    for key, m in summary["mean"].items():
        n = mean_n.get(key, {})
        cols = [("Dice", 9, 3), ("HD95", 10, 2), ("betti_error_3d", 10, 2), ("betti_error_2d", 10, 3),
                ("cce_3d", 9, 2)]
        row = f"{names.get(key, key):<12}"
        for k, w, p in cols:
            row += format_cell(m.get(k), w, p, n.get(k), total)
            if n.get(k) is not None and 0 < n[k] < total:
                short.append(f"{names.get(key, key)} {k}: {n[k]}/{total}")
        lines.append(row)

    def topo(key, w=0, p=3, per_rule=None):
        v = t[key] if per_rule is None else t[key].get(per_rule)
        n = tn.get(key) if per_rule is None else tn.get(key, {}).get(per_rule)
        if n is not None and 0 < n < total:
            short.append(f"{key if per_rule is None else f'{key} {per_rule}'}: {n}/{total}")
        return format_cell(v, w, p, n, total).strip()

    lines.append("")
    no_rules = " (no rules)" if not t["TVS_per_rule"] else ""
    lines.append(f"cases {total}  TVS {topo('TVS', p=5)}{no_rules}  VR {topo('VR')}  mean Betti error 3D "
                 f"{topo('betti_error_3d')}  prior Betti error 3D {topo('betti_prior_error_3d')}  topologically "
                 f"correct {topo('topologically_correct')}")
    tc2 = t.get("topologically_correct_2d")
    if isinstance(tc2, (int, float)) and not math.isnan(tc2):
        lines.append(f"per-slice priors (betti_2d): topologically correct {topo('topologically_correct_2d')}  slices "
                     f"meeting the prior {topo('slices_meeting_prior_2d')}  mean prior error "
                     f"{topo('betti_prior_error_2d')}")
    for r in t["TVS_per_rule"]:
        lines.append(f"  {r:<45} TVS {topo('TVS_per_rule', p=5, per_rule=r)}  VR {topo('VR_per_rule', per_rule=r)}"
                     f"  SVR {topo('SVR_per_rule', per_rule=r)}")
    if "mesh_mean" in summary:
        lines.append("")
        lines.append(f"{'mesh':<12}{'Dice':>8}{'Chamfer':>9}{'HD95mm':>9}{'Laplacian':>11}")
        mt = summary.get("mesh_topology_mean", {})
        mesh_total = mt.get("num_cases")
        for name, m in summary["mesh_mean"].items():
            n = summary.get("mesh_mean_num_cases", {}).get(name, {})
            row = f"{name:<12}"
            for k, w in (("Dice", 8), ("Chamfer_mm", 9), ("HD95_mm", 9), ("laplacian_energy_mm2", 11)):
                row += format_cell(m.get(k), w, 3, n.get(k), mesh_total)
                if n.get(k) is not None and mesh_total is not None and 0 < n[k] < mesh_total:
                    short.append(f"mesh {name} {k}: {n[k]}/{mesh_total}")
            lines.append(row)
        grid = ", ".join(f"{g:g}" for g in mt.get("grid_mm", []))
        exact, on_grid = mt.get("rules_exact"), mt.get("rules_grid")
        how = (f"  (violating volumes: {exact} exact by mesh booleans, {on_grid} on a {grid} mm world grid, "
               f"{mt.get('cases_with_invalid_meshes', 0)} case(s) with a mesh that is not a valid closed manifold)"
               if exact is not None else f"  (violating volumes on a {grid} mm isotropic world grid)" if grid else "")
        lines.append(f"mesh TVS {format_cell(mt.get('TVS'), 0, 5).strip()}" + how)
    if short:
        lines.append("")
        lines.append("* mean over fewer cases than evaluated (undefined elsewhere, see documentation/metrics.md): "
                     + "; ".join(short))
    return "\n".join(lines)


