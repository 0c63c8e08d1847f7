"""The reference rule check: do a dataset's reference label maps obey its own topology spec?

A rule that reference labels violate cannot be learned, so the trainers run this check before training
(:func:`cached_rule_check`, cached in the preprocessed folder) and ``nnUNetv2_topo_check_rules`` reports it
(:func:`check_rules_on_folder`, :func:`format_rule_report`): per rule the cases and slices that violate it, per Betti
prior the cases that differ, cases excepted by ``topology.reference_exceptions``, and notes on rules and priors that
no reference case tests. The voxel rules are those of :mod:`nnunet_topo.violations`, the spec that of
:mod:`nnunet_topo.topology_spec` (documentation/topology_spec.md). This is nnU-Net glue: it reads label maps with
nnU-Net's reader/writer.
"""
from __future__ import annotations

import json
import os
from typing import List, Union

import numpy as np

from nnunet_topo.label_maps import check_pair, read_label_map
from nnunet_topo.metrics.topology import (allowed_betti_vectors, betti_numbers_3d, betti_numbers_per_slice,
                                          meets_betti_prior)
from nnunet_topo.paths import defined_label_values, reading
from nnunet_topo.summary_io import EvaluationError, ignore_label_of, load_json_arg, write_json_atomic
from nnunet_topo.topology_spec import format_betti_set, reference_spec, rule_structures, spec_from_dataset_json
from nnunet_topo.violations import violation_maps_numpy


def check_rules_on_folder(labels_folder: str, dataset_json: Union[str, os.PathLike, dict],
                          show_progress: bool = True) -> dict:
    """Check the reference label maps of a dataset against its own topology spec: every rule and every prior.

    For every case: per rule the number of violating voxels and the slice indices (along the rule's axis for
    2D rules, along ``betti_2d.axis`` for 3D rules) that hold violations; per 3D Betti prior, the reference Betti
    numbers where they differ from the prior; per per-slice prior (``betti_2d``), the slices whose Betti numbers
    are none of the allowed vectors (a slice meets an allowed set such as ``[[1, 1], [1, 0]]`` when its Betti
    vector is any one of them). A rule that reference labels violate cannot be learned: fix the rule, add
    ``may_touch``, or switch it to ``"mode": "2d"``.

    Sparse references (nnU-Net's ``ignore`` label): an ignored voxel is unknown. A rule violation is counted only
    where both sides of a contact are annotated (:func:`nnunet_topo.topology_spec.reference_spec`); 3D Betti numbers of a
    case with ignored voxels are undefined (listed under ``cases_undefined``, not as differing); per-slice priors
    are checked on fully annotated slices only.

    Returns:
        ``{"num_cases", "rules": {name: {"cases_violating", "cases": {case: {"voxels", "slices", "slice_axis"}}}},
        "betti": {structure: {"prior", "cases_differing", "cases": {case: betti}, "cases_undefined": [case]}},
        "betti_2d": {structure: {"prior", "axis", "cases_differing", "cases": {case: {"slices", "betti"}}}}
        (``prior``: the list of allowed ``[b0, b1]`` vectors, one entry for a single-vector prior),
        "notes": [str] (rules or priors on labels that occur in no reference case: they pass untested),
        "clean": bool}``.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = load_json_arg(dataset_json, "dataset.json")
    if not os.path.isdir(labels_folder):
        raise EvaluationError(f"labels folder not found: {labels_folder}")
    spec = spec_from_dataset_json(dataset_json)
    ignore_label = ignore_label_of(dataset_json)
    check_spec = reference_spec(spec, ignore_label)
    file_ending = dataset_json["file_ending"]
    files = sorted(f for f in os.listdir(labels_folder) if f.endswith(file_ending))
    if not files:
        raise EvaluationError(f"no label files ending in {file_ending!r} in {labels_folder}")
    with reading("reference", os.path.join(labels_folder, files[0])):
        rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(labels_folder, files[0]))()
    defined = defined_label_values(dataset_json)
    axis2d = spec.betti_2d_axis
    report = {"num_cases": len(files),
              "rules": {r.name: {"cases_violating": 0, "cases": {}, "cases_excepted": {}} for r in spec.rules},
              "betti": {name: {"prior": list(p), "cases_differing": 0, "cases": {}, "cases_undefined": []}
                        for name, p in spec.betti.items()},
              "betti_2d": {name: {"prior": [list(v) for v in p], "axis": axis2d, "cases_differing": 0, "cases": {}}
                           for name, p in spec.betti_2d.items()},
              "notes": []}
    seen = set()
    it = files
    if show_progress:
        try:
            from tqdm import tqdm
            it = tqdm(files, desc="checking rules")
        except ImportError:  # pragma: no cover
            pass
    for f in it:
        case = f[: -len(file_ending)]
        seg, _, _ = read_label_map(rw, os.path.join(labels_folder, f), defined, "reference")
        check_pair(seg, seg, (1, 1, 1), (1, 1, 1), ref_name=f, pred_name=f)
        seg = seg.astype(np.int32, copy=False)
        seen.update(int(v) for v in np.unique(seg))
        ignored = seg == ignore_label if ignore_label is not None else None
        sparse = ignored is not None and bool(ignored.any())
        vmaps = violation_maps_numpy(seg, check_spec)
        for rule in spec.rules:
            v = vmaps[rule.name]
            n = int(np.count_nonzero(v))
            if n:
                axis = rule.axis if rule.mode == "2d" else axis2d
                other = tuple(a for a in range(v.ndim) if a != axis)
                slices = np.nonzero(v.any(axis=other))[0].tolist()
                entry = report["rules"][rule.name]
                found = {"voxels": n, "slices": slices, "slice_axis": axis}
                exception = spec.reference_exception(rule.name, case)
                if exception is not None:  # the user's data-level exception (topology.reference_exceptions)
                    entry["cases_excepted"][case] = {**found, "reason": exception.reason}
                    continue
                entry["cases_violating"] += 1
                entry["cases"][case] = found
        for name, prior in spec.betti.items():
            if sparse:
                report["betti"][name]["cases_undefined"].append(case)
                continue
            b = betti_numbers_3d(np.isin(seg, spec.betti_structures[name].label_ids))
            if tuple(b) != tuple(prior):
                report["betti"][name]["cases_differing"] += 1
                report["betti"][name]["cases"][case] = list(b)
        if spec.betti_2d:
            other = tuple(a for a in range(seg.ndim) if a != axis2d)
            annotated = ~ignored.any(axis=other) if sparse else np.ones(seg.shape[axis2d], dtype=bool)
        for name, prior in spec.betti_2d.items():
            mask = np.isin(seg, spec.betti_structures[name].label_ids)
            per_slice = betti_numbers_per_slice(mask, axis=axis2d)
            present = mask.any(axis=other)
            bad = [int(k) for k in np.nonzero(present & annotated)[0] if not meets_betti_prior(per_slice[k], prior)]
            if bad:
                e = report["betti_2d"][name]
                e["cases_differing"] += 1
                e["cases"][case] = {"slices": bad, "betti": [per_slice[k].tolist() for k in bad]}
    report["notes"].extend(_unused_exception_notes(spec, report, [f[: -len(file_ending)] for f in files]))
    ids_of = {s.name: s.label_ids for s in spec.betti_structures.values()}

    def unseen(ids) -> List[str]:
        names = {v: k for k, v in spec.labels.items()}
        return [names.get(int(i), str(i)) for i in ids if int(i) not in seen]
    for rule in spec.rules:
        missing = unseen(sorted({i for s in rule_structures(rule) for i in s.label_ids}))
        if missing:
            report["notes"].append(f"rule {rule.name}: label(s) {missing} occur in no reference case, so the rule "
                                   "passes without being tested")
    for kind, priors in (("Betti prior", spec.betti), ("per-slice Betti prior", spec.betti_2d)):
        for name in priors:
            missing = unseen(ids_of[name])
            if missing:
                report["notes"].append(f"{kind} {name}: label(s) {missing} occur in no reference case")
    report["clean"] = all(e["cases_violating"] == 0 for e in report["rules"].values()) and \
        all(e["cases_differing"] == 0 for e in report["betti"].values()) and \
        all(e["cases_differing"] == 0 for e in report["betti_2d"].values())
    return report


def _unused_exception_notes(spec, report: dict, cases: List[str]) -> List[str]:
    """Notes on ``reference_exceptions`` that except nothing here: a case not in this folder (a typo?), or a case
    that satisfies the rules it is excepted from (the exception can go)."""
    notes, present = [], set(cases)
    for i, e in enumerate(spec.reference_exceptions):
        for case in e.cases:
            if case not in present:
                notes.append(f"topology.reference_exceptions[{i}]: case {case!r} is not among the {len(present)} "
                             "reference cases checked here")
                continue
            rules = e.rules or tuple(report["rules"])
            unneeded = [r for r in rules if case not in report["rules"][r]["cases_excepted"]]
            if unneeded:
                notes.append(f"topology.reference_exceptions[{i}]: case {case!r} satisfies rule(s) "
                             f"{', '.join(unneeded)}; that exception is not needed")
    return notes


#: part of the cache key: a report written by an older version (other keys, other semantics) is recomputed
_RULE_CHECK_VERSION = 4


def cached_rule_check(labels_folder: str, dataset_json: dict, cache_file: str) -> dict:
    """:func:`check_rules_on_folder`, cached in ``cache_file`` under a key of the spec, the labels and the files'
    names and modification times (written atomically; a stale or unreadable cache is recomputed)."""
    import hashlib

    files = sorted(f for f in os.listdir(labels_folder) if f.endswith(dataset_json["file_ending"]))
    key = hashlib.sha1(json.dumps([_RULE_CHECK_VERSION, dataset_json.get("topology"), dataset_json["labels"], files,
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
    write_json_atomic(cache_file, {"key": key, "report": report})
    return report


def reference_violations_message(report: dict) -> str:
    """Why a rule check of reference labels forbids training ("" when every rule holds)."""
    bad = {name: e for name, e in report["rules"].items() if e["cases_violating"]}
    if not bad:
        return ""
    lines = [f"  {name}: violated in {e['cases_violating']}/{report['num_cases']} reference case(s): "
             + ", ".join(f"{c} ({v['voxels']} voxels, slices {v['slices'][:5]})"
                         for c, v in list(e["cases"].items())[:10])
             + (", ..." if len(e["cases"]) > 10 else "") for name, e in bad.items()]
    snippet = ", ".join(json.dumps({"cases": sorted(e["cases"]), "rules": [name], "reason": "..."})
                        for name, e in bad.items())
    return ("the reference labels of this dataset violate topology rules of its dataset.json, so the rules cannot be "
            "learned:\n" + "\n".join(lines) + "\nFix the rules (add \"may_touch\", use \"mode\": \"2d\"; a 2d rule "
            "violated only in the first or last slice of its structures: \"exempt_end_slices\": 1) or the "
            "labels; or, when a few references are imperfect, except those cases from the check in the topology "
            f"block: \"reference_exceptions\": [{snippet}] (documentation/topology_spec.md). "
            "nnUNetv2_topo_check_rules -d DATASET reports every case.")


def reference_exceptions_message(report: dict) -> str:
    """One line per case the check skipped because of ``topology.reference_exceptions`` ("" when none did)."""
    lines = [f"  {name}: {case} ({v['voxels']} voxels, slices {v['slices'][:5]})"
             + (f": {v['reason']}" if v.get("reason") else "")
             for name, e in report["rules"].items() for case, v in e.get("cases_excepted", {}).items()]
    return ("reference cases excepted from the rule check (topology.reference_exceptions); the rules still apply to "
            "their predictions and training patches:\n" + "\n".join(lines)) if lines else ""


def format_rule_report(report: dict) -> str:
    """The report of :func:`check_rules_on_folder` as text (``nnUNetv2_topo_check_rules`` prints it): per rule and
    prior the cases that break it, the notes, and whether everything holds."""
    n = report["num_cases"]
    lines = [f"{n} reference case(s) checked"]
    for name, e in report["rules"].items():
        excepted = e.get("cases_excepted", {})
        lines.append(f"rule {name}: violated in {e['cases_violating']}/{n} case(s)"
                     + (f" (and in {len(excepted)} excepted case(s))" if excepted else ""))
        for case, c in list(e["cases"].items())[:20]:
            lines.append(f"    {case}: {c['voxels']} voxel(s) in slice(s) {c['slices']} (axis {c['slice_axis']})")
        for case, c in excepted.items():
            lines.append(f"    {case}: {c['voxels']} voxel(s) in slice(s) {c['slices']} (axis {c['slice_axis']}), "
                         "excepted by topology.reference_exceptions" + (f": {c['reason']}" if c["reason"] else ""))
    for name, e in report["betti"].items():
        lines.append(f"Betti prior {name} {tuple(e['prior'])}: differs in {e['cases_differing']}/{n} case(s)")
        for case, b in list(e["cases"].items())[:20]:
            lines.append(f"    {case}: reference Betti {tuple(b)}")
        if e.get("cases_undefined"):
            lines.append(f"    not checked in {len(e['cases_undefined'])} sparse case(s) (ignored voxels: the 3D Betti "
                         f"numbers of the reference are unknown), e.g. {e['cases_undefined'][:5]}")
    for name, e in report.get("betti_2d", {}).items():
        prior = format_betti_set(allowed_betti_vectors(e["prior"]))
        lines.append(f"per-slice Betti prior {name} {prior} (axis {e['axis']}): differs in "
                     f"{e['cases_differing']}/{n} case(s)")
        for case, c in list(e["cases"].items())[:20]:
            shown = ", ".join(f"{k}: {tuple(b)}" for k, b in list(zip(c["slices"], c["betti"]))[:8])
            lines.append(f"    {case}: {len(c['slices'])} slice(s) differ ({shown})")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    lines.append("all rules and priors hold on the reference labels" if report["clean"] else
                 "some rules or priors do NOT hold on the reference labels: fix the rules (may_touch, \"mode\": \"2d\") "
                 "or the priors or the labels before training")
    return "\n".join(lines)
