"""Cross-validation summary: the folds' ``validation/summary_topology.json`` side by side, and pooled.

nnU-Net's 5-fold cross-validation trains one job per fold; each fold's topology trainer writes
``<model folder>/fold_k/validation/summary_topology.json``
(:func:`nnunet_topo.evaluation.compute_topology_metrics_on_folder`).
:func:`summarize_cv` reads them (or computes one where only nnU-Net's validation outputs exist) and writes
``<model folder>/summary_topology_cv.json``:

* ``folds``: per fold its own ``mean``, ``foreground_mean``, ``topology_mean``, the ``*_num_cases`` counts and
  ``num_cases``;
* ``pooled``: :func:`nnunet_topo.evaluation.aggregate` over all validation cases of all folds (each case counts
  once; not a mean of the fold means); its keys are also at the top level with ``metric_per_case`` (every case,
  with its ``fold``), so the file has nnU-Net's summary format;
* ``missing_folds`` (with ``chill``), ``label_names``, ``rules``.

``nnUNetv2_topo_summarize_cv -d ID -tr TRAINER -c CONFIG`` prints :func:`format_cv_table`.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Sequence, Union

from nnunet_topo.evaluation import aggregate, compute_topology_metrics_on_folder, format_cell, format_table
from nnunet_topo.topology_spec import spec_from_dataset_json
from nnunet_topo.paths import InputReadError, check_output, read_json
from nnunet_topo.summary_io import load_json_arg, to_builtin, write_json_atomic

SUMMARY_NAME = "summary_topology.json"
CV_SUMMARY_NAME = "summary_topology_cv.json"
#: the per-fold keys copied from each fold's summary (mesh keys where a fold has them)
FOLD_KEYS = ("mean", "mean_num_cases", "foreground_mean", "foreground_mean_num_cases", "topology_mean",
             "topology_mean_num_cases", "mesh_mean", "mesh_mean_num_cases", "mesh_topology_mean")


class CVSummaryError(ValueError):
    """A cross-validation summary cannot be made (missing folds, folds evaluated with different rules or labels)."""


def _fold_ids(model_folder: str) -> List[int]:
    """The ``fold_<digits>`` folders of a model folder, sorted (``fold_all`` is no cross-validation fold)."""
    ids = [int(m.group(1)) for m in (re.fullmatch(r"fold_(\d+)", n) for n in os.listdir(model_folder)) if m
           and os.path.isdir(os.path.join(model_folder, m.group(0)))]
    return sorted(ids)


def _gt_folder(model_folder: str, plans: dict) -> str:
    pre = os.environ.get("nnUNet_preprocessed")
    if not pre:
        raise CVSummaryError("nnUNet_preprocessed is not set, so the reference segmentations "
                             "($nnUNet_preprocessed/<dataset>/gt_segmentations) cannot be found")
    name = plans.get("dataset_name") or os.path.basename(os.path.dirname(os.path.abspath(model_folder)))
    return os.path.join(pre, name, "gt_segmentations")


def _validation_cases(summary_json: str) -> Optional[set]:
    """Basenames of the predictions nnU-Net's ``summary.json`` evaluated, or None if it cannot be read."""
    try:
        with open(summary_json) as f:
            s = json.load(f)
        return {os.path.basename(c["prediction_file"]) for c in s["metric_per_case"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_or_compute_fold(model_folder: str, fold: int, dataset_json: dict, plans: dict) -> Union[dict, str]:
    """The fold's summary, or a string saying what is missing."""
    fold_dir = os.path.join(model_folder, f"fold_{fold}")
    if not os.path.isdir(fold_dir):
        return f"fold {fold}: {fold_dir} does not exist"
    val = os.path.join(fold_dir, "validation")
    path = os.path.join(val, SUMMARY_NAME)
    if os.path.isfile(path):
        try:
            return read_json(path, f"fold {fold} summary")
        except InputReadError as e:
            raise CVSummaryError(f"{e}; delete it to recompute it") from None
    ending = dataset_json["file_ending"]
    preds = sorted(f for f in os.listdir(val) if f.endswith(ending)) if os.path.isdir(val) else []
    nnunet_summary = os.path.join(val, "summary.json")
    if not preds or not os.path.isfile(nnunet_summary):
        what = "no predictions" if not preds else "no nnU-Net summary.json (validation incomplete?)"
        return (f"fold {fold}: neither {path} nor nnU-Net's validation outputs ({what} in {val}); run the "
                f"fold's validation (nnUNetv2_train ... {fold} --val)")
    expected = _validation_cases(nnunet_summary)
    if expected is not None and expected != set(preds):
        raise CVSummaryError(f"fold {fold}: the predictions in {val} ({len(preds)}) are not the cases of nnU-Net's "
                             f"summary.json ({len(expected)}); the validation looks incomplete, rerun it")
    gt = _gt_folder(model_folder, plans)
    # chill: gt_segmentations holds every case of the dataset, validation/ only this fold's (as the trainers do)
    return compute_topology_metrics_on_folder(gt, val, dataset_json, plans, output_file=path, chill=True,
                                              show_progress=False)


def summarize_cv(model_folder: str, folds: Optional[Sequence[int]] = None, chill: bool = False,
                 dataset_json: Union[str, os.PathLike, dict, None] = None,
                 plans: Union[str, os.PathLike, dict, None] = None) -> dict:
    """Per-fold and pooled topology summary of a cross-validation; writes ``model_folder/summary_topology_cv.json``.

    Args:
        model_folder: nnU-Net's model folder (``$nnUNet_results/DatasetXXX_Name/Trainer__Plans__config``).
        folds: the folds (default: every ``fold_<k>`` folder, sorted; ``fold_all`` excluded).
        chill: list folds without output under ``missing_folds`` instead of failing.
        dataset_json, plans: dicts or paths (default: the copies nnU-Net keeps in the model folder).

    A fold without ``summary_topology.json`` but with nnU-Net's validation outputs (predictions and
    ``summary.json``) is evaluated against ``$nnUNet_preprocessed/<dataset>/gt_segmentations`` and its
    ``summary_topology.json`` written.

    Raises:
        CVSummaryError: a fold is missing (unless ``chill``), no fold is left, or the folds were evaluated with
            different rules or labels (or with other rules than ``dataset_json``'s).
    """
    if not os.path.isdir(model_folder):
        raise CVSummaryError(f"model folder not found: {model_folder}")
    # the one output: never an input (e.g. a summary_topology_cv.json that is a symlink to one), checked first
    check_output(os.path.join(model_folder, CV_SUMMARY_NAME),
                 {"dataset.json": None if isinstance(dataset_json, dict) else
                  dataset_json or os.path.join(model_folder, "dataset.json"),
                  "plans file": None if isinstance(plans, dict) else plans or os.path.join(model_folder, "plans.json"),
                  **{f"fold_{k} folder": os.path.join(model_folder, f"fold_{k}") for k in _fold_ids(model_folder)}},
                 kind="file", extensions=(".json",), option="output")
    dataset_json = load_json_arg(os.path.join(model_folder, "dataset.json") if dataset_json is None else dataset_json,
                                 "dataset.json")
    plans = load_json_arg(os.path.join(model_folder, "plans.json") if plans is None else plans, "plans file")
    if folds is None:
        folds = _fold_ids(model_folder)
        if not folds:
            raise CVSummaryError(f"no fold_<k> folders in {model_folder}")
    try:
        folds = sorted({int(f) for f in folds})
    except (TypeError, ValueError):
        raise CVSummaryError(f"folds must be integers, got {list(folds)}") from None

    per_fold, missing, problems = {}, [], []
    for k in folds:
        s = _load_or_compute_fold(model_folder, k, dataset_json, plans)
        if isinstance(s, str):
            problems.append(s)
            missing.append(k)
        else:
            per_fold[k] = s
    if problems and not chill:
        raise CVSummaryError("; ".join(problems) + " (pass chill=True / --chill to summarize the other folds)")
    if not per_fold:
        raise CVSummaryError("no fold has a validation summary: " + "; ".join(problems))

    spec = spec_from_dataset_json(dataset_json)
    first = next(iter(per_fold))
    ref = {"rules": list(per_fold[first].get("rules", [])), "labels": sorted(per_fold[first]["mean"], key=int),
           "label_names": per_fold[first].get("label_names", {})}
    for k, s in per_fold.items():
        this = {"rules": list(s.get("rules", [])), "labels": sorted(s["mean"], key=int),
                "label_names": s.get("label_names", {})}
        for key in ("rules", "labels", "label_names"):
            if this[key] != ref[key]:
                raise CVSummaryError(f"fold {k} was evaluated with other {key.replace('_', ' ')} than fold {first}: "
                                     f"{this[key]} vs {ref[key]}; the folds cannot be pooled (re-evaluate them with "
                                     "one dataset.json: delete the stale validation/summary_topology.json files and "
                                     "rerun)")
    spec_rules = [r.name for r in spec.rules]
    if spec_rules != ref["rules"]:
        raise CVSummaryError(f"the folds were evaluated with the rules {ref['rules']}, but the dataset.json has "
                             f"{spec_rules}; pass the dataset.json the folds were evaluated with, or re-evaluate")

    cases, seen = [], {}
    for k, s in per_fold.items():
        for c in s["metric_per_case"]:
            name = os.path.basename(c.get("prediction_file", "")) or None
            if name is not None and name in seen:
                raise CVSummaryError(f"case {name} is in the validation of fold {seen[name]} and of fold {k}; "
                                     "cross-validation folds must not overlap (a pooled mean would count it twice)")
            if name is not None:
                seen[name] = k
            cases.append({**c, "fold": k})
    label_ids = [int(i) for i in ref["labels"]]
    pooled = aggregate(cases, spec, label_ids)

    folds_out = {}
    for k, s in per_fold.items():
        entry = {key: s[key] for key in FOLD_KEYS if key in s}
        entry["num_cases"] = len(s["metric_per_case"])
        folds_out[str(k)] = entry
    summary = to_builtin({"folds": folds_out, "pooled": pooled, **pooled, "metric_per_case": cases,
                          "missing_folds": missing, "label_names": ref["label_names"], "rules": ref["rules"]})
    write_json_atomic(os.path.join(model_folder, CV_SUMMARY_NAME), summary, indent=2, sort_keys=True)
    return summary


def format_cv_table(summary: dict) -> str:
    """A row per fold and a pooled row (cases, foreground Dice and HD95, TVS, VR, mean Betti error 3D,
    topologically correct), then the pooled per-label table (:func:`nnunet_topo.evaluation.format_table`)."""
    header = (f"{'fold':<8}{'cases':>7}{'Dice':>9}{'HD95mm':>10}{'TVS':>10}{'VR':>8}{'Betti3D':>10}"
              f"{'correct':>9}")
    short = []

    def row(label: str, s: dict) -> str:
        t = s["topology_mean"]
        total = t.get("num_cases", s.get("num_cases"))
        fn, tn = s.get("foreground_mean_num_cases", {}), s.get("topology_mean_num_cases", {})
        line = f"{label:<8}{total:>7}"
        for v, n, w, p, what in ((s["foreground_mean"].get("Dice"), fn.get("Dice"), 9, 3, "Dice"),
                                 (s["foreground_mean"].get("HD95"), fn.get("HD95"), 10, 2, "HD95"),
                                 (t.get("TVS"), tn.get("TVS"), 10, 5, "TVS"),
                                 (t.get("VR"), tn.get("VR"), 8, 3, "VR"),
                                 (t.get("betti_error_3d"), tn.get("betti_error_3d"), 10, 2, "betti_error_3d"),
                                 (t.get("topologically_correct"), tn.get("topologically_correct"), 9, 3,
                                  "topologically_correct")):
            line += format_cell(v, w, p, n, total)
            if n is not None and total is not None and 0 < n < total:
                short.append(f"{label} {what}: {n}/{total}")
        return line

    lines = [header]
    for k, s in sorted(summary["folds"].items(), key=lambda kv: int(kv[0])):
        lines.append(row(k, s))
    lines.append(row("pooled", summary["pooled"]))
    if summary.get("missing_folds"):
        lines.append(f"missing folds (not in the pooled row): {', '.join(map(str, summary['missing_folds']))}")
    if short:
        lines.append("* mean over fewer cases than evaluated: " + "; ".join(short))
    lines.append("")
    lines.append("pooled over all validation cases:")
    lines.append(format_table(summary))
    return "\n".join(lines)
