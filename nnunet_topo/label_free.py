"""What can be measured of predictions without references: an external test set (issue 22, item 4).

Per case, on the predicted label map alone (the dataset's topology block):

* **rules**: violating voxels per rule (:func:`nnunet_topo.violations.violation_maps_numpy`), whether the rule is
  violated, and its slice violation rate over the slices that hold predicted foreground (MIE's SVR; the evaluator
  also counts the reference's slices, which do not exist here);
* **3D Betti priors** (``betti``): the structure's Betti numbers and whether they meet the prior;
* **per-slice Betti priors** (``betti_2d``): on the slices where the structure is predicted, how many meet the
  allowed set (Clough's "topologically correct" per slice, on the prediction's own slices; the evaluator also counts
  the reference's);
* the foreground labels the prediction lacks;
* with a mesh folder (``nnUNetv2_topo_predict_meshes``' output): whether the case got meshes (``meshes.json``), the
  mesh volumes, and the volume violating each mesh rule in force (:func:`nnunet_topo.mesh_evaluation.
  violating_volume_mm3`, the numerator of the mesh TVS, TPM Eq. 13), over the sum of the predicted meshes' volumes
  (``mesh_TVS_over_mesh_volumes``: Eq. 13 with the predicted instead of the reference volumes, which are unknown).

None of these says whether a prediction is right: a model that predicts nothing violates no rule (hence the lacking
labels and the unmeshed cases are reported beside them). nnU-Net glue (its reader) only in :func:`label_free_folder`.

    python -m nnunet_topo.cli.label_free PREDICTIONS -djfile dataset.json [--mesh_folder MESHES] -o label_free.json
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from nnunet_topo.metrics.topology import betti_numbers_3d, betti_numbers_per_slice, meets_betti_prior, \
    slice_violation_rate
from nnunet_topo.topology_spec import TopologySpec, spec_from_dataset_json
from nnunet_topo.summary_io import EvaluationError, load_json_arg, nanmean, to_builtin
from nnunet_topo.violations import violation_maps_numpy

__all__ = ["label_free_case", "mesh_overlaps_case", "aggregate_label_free", "label_free_folder"]


def label_free_case(seg: np.ndarray, spec: TopologySpec) -> dict:
    """Rule violations and Betti priors of one predicted ``(Z, Y, X)`` label map (no reference).

    Returns:
        ``{"lacking_labels": [label names not predicted], "violating_voxels": {rule: n}, "violated": {rule: bool},
        "SVR_per_rule": {rule: share of the predicted-foreground slices with a violation (NaN without foreground)},
        "betti_3d": {structure: [b0, b1, b2]}, "meets_prior_3d": {structure: bool},
        "slices_2d": {structure: slices where it is predicted}, "slices_meeting_prior_2d": {structure: of those,
        meeting the allowed set}, "meets_priors_2d": every such slice of every structure meets its prior}``.
    """
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise ValueError(f"seg must be a 3D (Z, Y, X) label map, got shape {seg.shape}")
    seg = seg.astype(np.int32, copy=False)
    present = set(int(v) for v in np.unique(seg))
    vmaps = violation_maps_numpy(seg, spec)
    fg = seg != 0
    svr = {}
    for rule in spec.rules:
        axis = rule.axis if rule.mode == "2d" else spec.betti_2d_axis
        svr[rule.name] = slice_violation_rate(vmaps[rule.name], axis=axis, considered=fg) if fg.any() else math.nan
    betti3 = {name: list(betti_numbers_3d(np.isin(seg, spec.betti_structures[name].label_ids)))
              for name in spec.betti}
    axis2d = spec.betti_2d_axis
    other = tuple(a for a in range(3) if a != axis2d)
    slices, meeting = {}, {}
    for name, prior in spec.betti_2d.items():
        mask = np.isin(seg, spec.betti_structures[name].label_ids)
        used = mask.any(axis=other)
        per_slice = betti_numbers_per_slice(mask, axis=axis2d)
        slices[name] = int(used.sum())
        meeting[name] = int(sum(meets_betti_prior(per_slice[k], prior) for k in np.nonzero(used)[0]))
    return {"lacking_labels": [n for n, i in spec.labels.items() if i not in present],
            "violating_voxels": {k: int(np.count_nonzero(v)) for k, v in vmaps.items()},
            "violated": {k: bool(v.any()) for k, v in vmaps.items()}, "SVR_per_rule": svr,
            "betti_3d": betti3, "meets_prior_3d": {n: tuple(b) == tuple(spec.betti[n]) for n, b in betti3.items()},
            "slices_2d": slices, "slices_meeting_prior_2d": meeting,
            "meets_priors_2d": all(meeting[n] == slices[n] for n in slices)}


def mesh_overlaps_case(meshes: Mapping[str, "trimesh.Trimesh"], spec: TopologySpec, h: float) -> dict:  # noqa: F821
    """Volumes (mm³) of the predicted meshes and the volume violating each mesh rule in force, as the mesh
    evaluator's mesh TVS (:func:`nnunet_topo.mesh_evaluation.mesh_rule_volumes`: exact booleans, the world grid of
    step ``h`` mm for a rule with a mesh that is not a valid closed manifold).

    Returns:
        ``{"mesh_volume_mm3": {structure: mm³}, "violating_volume_mm3": {rule: mm³},
        "mesh_TVS_over_mesh_volumes": sum of the violating volumes / sum of the mesh volumes, "grid_mm": h,
        "method": {rule: "exact" | "grid"}, "invalid_meshes": {structure: reason}}``.
    """
    from nnunet_topo.mesh_evaluation import mesh_rule_volumes
    from nnunet_topo.metrics.mesh import mesh_volume

    volumes = {s: float(mesh_volume(m)) for s, m in meshes.items()}
    rv = mesh_rule_volumes(meshes, spec, h)
    violating = rv["violating_volume_mm3"]
    total = sum(volumes.values())
    tvs = sum(violating.values()) / total if violating and total > 0 else math.nan
    return {"mesh_volume_mm3": volumes, "violating_volume_mm3": violating, "mesh_TVS_over_mesh_volumes": tvs,
            "grid_mm": h, "method": rv["method"], "invalid_meshes": rv["invalid_meshes"]}


def aggregate_label_free(cases: List[dict], spec: TopologySpec) -> dict:
    """Shares over cases (and over slices for the per-slice priors) of :func:`label_free_case` results, plus the
    mesh entries where present.

    Returns:
        ``{"num_cases", "share_cases_violating": {rule}, "mean_SVR_per_rule": {rule}, "share_cases_meeting_prior_3d":
        {structure}, "share_slices_meeting_prior_2d": {structure} (pooled over the cases' slices) and ``"all"``,
        "share_cases_meeting_priors_2d", "share_cases_lacking": {label}; with meshes: "num_cases_meshed",
        "share_meshed", "cases_without_mesh", "share_meshed_cases_with_mesh_overlap": {rule},
        "mean_mesh_TVS_over_mesh_volumes", "mean_mesh_volume_mL": {structure}}``.
    """
    n = len(cases)

    def share(values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else math.nan
    rules = [r.name for r in spec.rules]
    out: dict = {
        "num_cases": n,
        "share_cases_violating": {r: share(c["violated"][r] for c in cases) for r in rules},
        "mean_SVR_per_rule": {r: nanmean(c["SVR_per_rule"][r] for c in cases) for r in rules},
        "share_cases_meeting_prior_3d": {s: share(c["meets_prior_3d"][s] for c in cases) for s in spec.betti},
        "share_slices_meeting_prior_2d": {}, "share_cases_meeting_priors_2d": share(c["meets_priors_2d"]
                                                                                   for c in cases),
        "share_cases_lacking": {lab: share(lab in c["lacking_labels"] for c in cases) for lab in spec.labels},
    }
    tot_used = tot_met = 0
    for s in spec.betti_2d:
        used = sum(c["slices_2d"][s] for c in cases)
        met = sum(c["slices_meeting_prior_2d"][s] for c in cases)
        out["share_slices_meeting_prior_2d"][s] = met / used if used else math.nan
        tot_used, tot_met = tot_used + used, tot_met + met
    out["share_slices_meeting_prior_2d"]["all"] = tot_met / tot_used if tot_used else math.nan
    if any("meshed" in c for c in cases):
        meshed = [c for c in cases if c.get("meshed")]
        out["num_cases_meshed"] = len(meshed)
        out["share_meshed"] = len(meshed) / n if n else math.nan
        out["cases_without_mesh"] = [c["case"] for c in cases if not c.get("meshed")]
        mesh_rules = sorted({r for c in meshed for r in c["mesh"]["violating_volume_mm3"]})
        out["share_meshed_cases_with_mesh_overlap"] = {
            r: share(c["mesh"]["violating_volume_mm3"].get(r, 0.0) > 0 for c in meshed) for r in mesh_rules}
        out["mean_mesh_TVS_over_mesh_volumes"] = nanmean(c["mesh"]["mesh_TVS_over_mesh_volumes"] for c in meshed)
        out["mean_mesh_volume_mL"] = {s: nanmean(c["mesh"]["mesh_volume_mm3"].get(s, math.nan) / 1000 for c in meshed)
                                      for s in spec.mesh_structures}
    return out


def label_free_folder(pred_folder: str, dataset_json: Union[str, os.PathLike, dict], mesh_folder: Optional[str] = None,
                      output_file: Optional[str] = None, show_progress: bool = True) -> dict:
    """:func:`label_free_case` on every label map ``CASE<file_ending>`` of ``pred_folder``; with ``mesh_folder``
    (``meshes.json`` of ``nnUNetv2_topo_predict_meshes`` or ``python -m nnunet_topo.cli.segmentation_meshes``) also
    :func:`mesh_overlaps_case` of each meshed case (grid step ``min(1 mm, finest spacing of the label map)``, as
    the mesh evaluator's) and ``"meshed"`` / ``"mesh_error"`` per case.

    Returns (and writes to ``output_file``, ``.json``): ``{"prediction_folder", "mesh_folder", "metric_per_case":
    [{"case", ...}], "summary": aggregate_label_free(...), "rules", "label_names"}``.

    Raises:
        EvaluationError: a folder missing, no label maps, a meshes.json without a ``cases`` table or naming a file
            that is not there.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnunet_topo.mesh_evaluation import mesh_tvs_grid_step
    from nnunet_topo.mesh_io import read_mesh

    dataset_json = load_json_arg(dataset_json, "dataset.json")
    if not os.path.isdir(pred_folder):
        raise EvaluationError(f"prediction folder not found: {pred_folder}")
    spec = spec_from_dataset_json(dataset_json)
    file_ending = dataset_json["file_ending"]
    files = sorted(f for f in os.listdir(pred_folder) if f.endswith(file_ending))
    if not files:
        raise EvaluationError(f"no label maps ending in {file_ending!r} in {pred_folder}")
    listing: Dict[str, dict] = {}
    if mesh_folder is not None:
        path = os.path.join(mesh_folder, "meshes.json")
        if not os.path.isfile(path):
            raise EvaluationError(f"no meshes.json in {mesh_folder} (written by nnUNetv2_topo_predict_meshes)")
        with open(path) as f:
            listing = json.load(f).get("cases")
        if not isinstance(listing, dict):
            raise EvaluationError(f"{path} has no 'cases' table")
    rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(pred_folder, files[0]))()
    it: Sequence[str] = files
    if show_progress:
        from tqdm import tqdm
        it = tqdm(files, desc="label-free measures")
    cases = []
    for fname in it:
        case = fname[: -len(file_ending)]
        seg, props = rw.read_seg(os.path.join(pred_folder, fname))
        seg = np.asarray(seg)
        if seg.ndim == 4:
            seg = seg[0]
        entry = {"case": case, **label_free_case(seg, spec)}
        if mesh_folder is not None:
            info = listing.get(case, {"error": "not listed in meshes.json", "files": {}})
            listed = info.get("files") or {}
            entry["meshed"] = bool(listed) and not info.get("error")
            if not entry["meshed"]:
                entry["mesh_error"] = str(info.get("error", "no mesh files"))
            else:
                meshes = {}
                for s, fn in listed.items():
                    p = os.path.join(mesh_folder, fn)
                    if not os.path.isfile(p):
                        raise EvaluationError(f"case {case}, structure {s!r}: mesh file not found: {p}")
                    meshes[s] = read_mesh(p)
                entry["mesh"] = mesh_overlaps_case(meshes, spec, mesh_tvs_grid_step(props["spacing"]))
        cases.append(entry)
    result = to_builtin({"prediction_folder": os.path.abspath(pred_folder),
                         "mesh_folder": None if mesh_folder is None else os.path.abspath(mesh_folder),
                         "metric_per_case": cases, "summary": aggregate_label_free(cases, spec),
                         "rules": [r.name for r in spec.rules],
                         "label_names": {str(v): k for k, v in spec.labels.items()}})
    if output_file is not None:
        if not output_file.endswith(".json"):
            raise EvaluationError(f"output_file must end with .json, got {output_file}")
        with open(output_file, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return result
