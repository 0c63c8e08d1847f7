"""Writing a QC report: evaluate once (or take an evaluator summary), then per case read the files, check the
violation maps against the summary's counts, draw the figures, and write ``index.html``, ``report.json`` and
``summary_topology.json``."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional, Union

import numpy as np

from nnunet_topo.summary_io import ignore_label_of, load_json_arg, to_builtin
from nnunet_topo.topology_spec import spec_from_dataset_json
from nnunet_topo.report.figures import draw_betti, draw_slices
from nnunet_topo.report.html import render_page, sort_cases
from nnunet_topo.report.inputs import (CROP_MARGIN, ReportError, as_labels, case_name, check_report_inputs,
                                      foreground_box, image_files, image_slices, prepare_report_dir, read_file)
from nnunet_topo.report.mesh_render import render_meshes
from nnunet_topo.report.slices import choose_slices


def write_report(ref_folder: str, pred_folder: str, dataset_json: Union[str, os.PathLike, dict],
                 plans: Union[str, os.PathLike, dict], report_dir: str, mesh_folder: Optional[str] = None,
                 image_folder: Optional[str] = None, max_cases: Optional[int] = None, slices_per_case: int = 3,
                 num_processes: int = 1, ignore_geometry: bool = False, show_progress: bool = True) -> str:
    """Evaluate ``pred_folder`` against ``ref_folder`` (the evaluator, once; its summary goes to
    ``report_dir/summary_topology.json``, never into an input folder) and write the report. Returns the path of
    ``index.html``. Every reference case needs a prediction (no ``--chill``).

    Raises:
        ReportError / EvaluationError: see the module docstring and the evaluator (missing predictions, shape,
            spacing or geometry mismatch, unknown files, a report folder that is an input).
    """
    from nnunet_topo.evaluation import compute_topology_metrics_on_folder

    check_report_inputs(ref_folder, pred_folder, dataset_json, report_dir, mesh_folder, image_folder, max_cases,
                        slices_per_case, plans=plans)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    plans = load_json_arg(plans, "plans file")
    created = prepare_report_dir(report_dir)
    try:
        summary = compute_topology_metrics_on_folder(
            ref_folder, pred_folder, dataset_json, plans, output_file=os.path.join(report_dir, "summary_topology.json"),
            num_processes=num_processes, chill=False, show_progress=show_progress, mesh_folder=mesh_folder,
            ignore_geometry=ignore_geometry)
    except BaseException:
        if created:
            shutil.rmtree(report_dir, ignore_errors=True)
        raise
    return write_report_from_summary(summary, ref_folder, pred_folder, dataset_json, plans, report_dir,
                                     mesh_folder=mesh_folder, image_folder=image_folder, max_cases=max_cases,
                                     slices_per_case=slices_per_case, show_progress=show_progress, _checked=True)


def write_report_from_summary(summary: dict, ref_folder: str, pred_folder: str,
                              dataset_json: Union[str, os.PathLike, dict], plans: Union[str, os.PathLike, dict],
                              report_dir: str, mesh_folder: Optional[str] = None, image_folder: Optional[str] = None,
                              max_cases: Optional[int] = None, slices_per_case: int = 3, show_progress: bool = True,
                              _checked: bool = False) -> str:
    """The report of an evaluator summary (``compute_topology_metrics_on_folder``'s result, e.g. after
    ``nnUNetv2_topo_evaluate_folder --report DIR``): reads each case's files named in the summary to draw it and
    checks that the violation maps give the summary's voxel counts. Returns the path of ``index.html``."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_topo import __version__
    from nnunet_topo.label_maps import check_geometry, image_geometry
    from nnunet_topo.violations import violation_maps_numpy

    if not _checked:
        check_report_inputs(ref_folder, pred_folder, dataset_json, report_dir, mesh_folder, image_folder, max_cases,
                            slices_per_case, plans=plans)
        prepare_report_dir(report_dir)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    plans = load_json_arg(plans, "plans file")
    spec = spec_from_dataset_json(dataset_json)
    fe = dataset_json["file_ending"]
    entries = list(summary.get("metric_per_case", []))
    if not entries:
        raise ReportError("the summary holds no evaluated case")
    label_ids = [int(i) for i in PlansManager(plans).get_label_manager(dataset_json).foreground_labels]
    label_names = {int(v): k for k, v in spec.labels.items()}
    ignore_label = ignore_label_of(dataset_json)
    rules_in_summary = list(summary.get("rules", [r.name for r in spec.rules]))
    if rules_in_summary != [r.name for r in spec.rules]:
        raise ReportError(f"the summary was computed with the rules {rules_in_summary}, dataset.json has "
                          f"{[r.name for r in spec.rules]}; evaluate again with this dataset.json")
    ref_cases = sorted(f[: -len(fe)] for f in os.listdir(ref_folder) if f.endswith(fe))
    evaluated = [case_name(e, fe) for e in entries]
    not_evaluated = [c for c in ref_cases if c not in set(evaluated)]
    images = image_files(image_folder, fe, ref_cases, evaluated) if image_folder is not None else {}
    ordered = sort_cases(entries)
    n_fig = len(ordered) if max_cases is None else min(int(max_cases), len(ordered))
    rw = None
    has_mesh = mesh_folder is not None and "mesh_mean" in summary
    rows: List[dict] = []
    meta_cases = []
    it = list(enumerate(ordered))
    bar = None
    if show_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n_fig, desc="QC report")
        except ImportError:  # pragma: no cover
            bar = None
    cases_dir = os.path.join(report_dir, "cases")
    for rank, entry in it:
        case = case_name(entry, fe)
        row = {"case": case, "entry": entry, "seconds": 0.0}
        rows.append(row)
        if rank >= n_fig:
            meta_cases.append({"case": case, "rank": rank + 1, "figures": None})
            continue
        if rw is None:  # nnU-Net's reader choice (it reads the example file once; not part of a case's time)
            rw = determine_reader_writer_from_dataset_json(dataset_json, entry["reference_file"], verbose=False)()
        t0 = time.perf_counter()
        ref, ref_props = read_file(rw, entry["reference_file"])
        pred, pred_props = read_file(rw, entry["prediction_file"])
        spacing = [float(s) for s in ref_props["spacing"]]
        if ref.shape != pred.shape:
            raise ReportError(f"shape mismatch: {entry['reference_file']} has shape {ref.shape}, "
                              f"{entry['prediction_file']} has {pred.shape} (the files changed after evaluation?)")
        full_shape = ref.shape
        ref, pred = as_labels(ref), as_labels(pred)
        # everything below runs on the box around the foreground of both (+ a margin of background): the violation
        # maps are exact there (outside an array is no structure), the rest of the image is background in both
        box = foreground_box(ref, pred, CROP_MARGIN, ignore_label)
        origin = [b.start for b in box]
        ref, pred = ref[box], pred[box]
        ignored = (ref == ignore_label) if ignore_label is not None else None
        if ignored is not None and not ignored.any():
            ignored = None
        image = None
        vmaps = violation_maps_numpy(pred, spec)
        counts = {k: int(np.count_nonzero(v)) for k, v in vmaps.items()}
        expected = {k: int(v) for k, v in entry["topology"]["violating_voxels"].items()}
        if counts != expected:
            raise ReportError(f"case {case}: the violation maps of {entry['prediction_file']} count {counts} voxels, "
                              f"the summary says {expected}; the summary belongs to other files or another "
                              "dataset.json; evaluate again")
        slices, selection = choose_slices(vmaps, spec, ref, pred, int(slices_per_case),
                                          None if ignored is None else ~ignored, origin)
        if case in images:  # only the drawn slices of the image are read (inside the box) where the reader can
            image = image_slices(rw, images[case], box, slices, full_shape, spacing, ref_props,
                                  entry["reference_file"], check_geometry, image_geometry)
        figs: Dict[str, dict] = {}
        fn = f"{case}_slices.png"
        w, h = draw_slices(os.path.join(cases_dir, fn), case, slices, ref, pred, vmaps, spec, label_ids,
                           label_names, spacing, image, ignored, origin)
        figs["slices"] = {"file": f"cases/{fn}", "width": w, "height": h, "slices": slices, "selection": selection}
        fn = f"{case}_betti.png"
        (w, h), binfo = draw_betti(os.path.join(cases_dir, fn), case, ref, pred, spec, label_names, label_ids,
                                   ignored, origin, full_shape[int(spec.betti_2d_axis)])
        figs["betti"] = {"file": f"cases/{fn}", "width": w, "height": h, "axis": int(spec.betti_2d_axis),
                         "structures": binfo}
        if has_mesh and entry.get("mesh_files"):
            from nnunet_topo.mesh_evaluation import mesh_tvs_grid_step
            from nnunet_topo.mesh_io import read_mesh

            meshes = {}
            for s, p in entry["mesh_files"].items():
                try:
                    meshes[s] = read_mesh(p)
                except (ValueError, OSError) as err:
                    raise ReportError(f"case {case}, structure {s!r}: cannot read {p}: {err}") from err
            tol = 0.5 * mesh_tvs_grid_step(spacing)
            fn = f"{case}_mesh.png"
            (w, h), minfo = render_meshes(os.path.join(cases_dir, fn), case, meshes, spec, tol,
                                          entry.get("mesh_topology", {}).get("TVS"))
            figs["mesh"] = {"file": f"cases/{fn}", "width": w, "height": h, **minfo}
        row["figures"] = figs
        row["seconds"] = time.perf_counter() - t0
        meta_cases.append({"case": case, "rank": rank + 1, "figures": figs, "seconds": row["seconds"],
                           "shape": list(full_shape), "crop": [[b.start, b.stop] for b in box]})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ctx = {"title": os.path.basename(os.path.normpath(pred_folder)), "ref_folder": os.path.abspath(ref_folder),
           "pred_folder": os.path.abspath(pred_folder),
           "mesh_folder": mesh_folder and os.path.abspath(mesh_folder),
           "image_folder": image_folder and os.path.abspath(image_folder),
           "written": time.strftime("%Y-%m-%d %H:%M:%S"), "version": __version__, "num_with_figures": n_fig,
           "not_evaluated": not_evaluated}
    page = render_page(summary, rows, spec, label_ids, label_names, has_mesh, ctx)
    with open(os.path.join(report_dir, "summary_topology.json"), "w") as f:
        json.dump(to_builtin(summary), f, indent=2, sort_keys=True)
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(to_builtin({"order": "TVS descending, then betti_error_3d descending, then name; undefined TVS last",
                              "cases": meta_cases, "not_evaluated": not_evaluated,
                              "slices_per_case": int(slices_per_case), "max_cases": max_cases}), f, indent=2)
    index = os.path.join(report_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(page)
    return index
