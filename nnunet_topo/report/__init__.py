"""Visual QC report of a topology evaluation: one static ``index.html`` with the metric table and per-case figures.

``nnUNetv2_topo_report REF PRED -djfile dataset.json -pfile plans.json -o REPORT_DIR [--mesh_folder M]
[--image_folder IMAGES] [--max_cases N] [--slices_per_case K]`` (and ``nnUNetv2_topo_evaluate_folder ... --report
DIR``) write into ``REPORT_DIR``:

* ``index.html``: the metric table (per case and mean: Dice per label, TVS, violating voxels per rule, Betti error),
  cases sorted worst first (TVS, then Betti error 3D), and per case the figures below; static, no JavaScript,
  relative links only (the folder can be moved or zipped as a whole);
* ``cases/CASE_slices.png``: the K slices with the most violating voxels (image in grey when ``--image_folder`` is
  given, reference and prediction contours per label, violating voxels coloured per rule); a case without
  violations shows the slices where reference and prediction disagree most;
* ``cases/CASE_betti.png``: per-slice Betti numbers ``(b0, b1)`` of the prediction and the reference for every
  structure with a ``betti_2d`` prior, with the prior (every allowed value when a set of vectors is allowed);
* ``cases/CASE_mesh.png`` (with ``--mesh_folder``): the case's meshes rendered offscreen, vertices that penetrate a
  mesh they must not enter (exclusion rules) or leave their outer mesh (inclusion rules) in red;
* ``summary_topology.json``: the evaluator's summary the page shows (the numbers are the evaluator's, computed once,
  :func:`nnunet_topo.evaluation.compute_topology_metrics_on_folder`); ``report.json``: what each figure shows (slice
  axis and indices, violating voxels, penetrating vertices, pixel size, seconds per case).

The violation maps drawn are :func:`nnunet_topo.violations.violation_maps_numpy` of the prediction, the function the
evaluator counts with; their voxel counts are compared with the evaluator's ``violating_voxels`` and a difference is
an error (a page that draws other violations than its table counts would be wrong silently).

Never writes into an input folder: ``REPORT_DIR`` must not be (or lie inside, or contain) the reference, prediction,
mesh or image folder, and an existing ``REPORT_DIR`` is only replaced when an earlier report wrote it.
documentation/qc_report.md describes the page.

One module per step: :mod:`~nnunet_topo.report.inputs` (the folders, their checks, reading),
:mod:`~nnunet_topo.report.slices` (which slices), :mod:`~nnunet_topo.report.figures` (slice and Betti figures),
:mod:`~nnunet_topo.report.mesh_render` (the mesh figure), :mod:`~nnunet_topo.report.html` (the page),
:mod:`~nnunet_topo.report.write` (the whole report); the command is :mod:`nnunet_topo.cli.report`.
"""
from nnunet_topo.report.figures import PANEL_W, allowed_betti_2d, draw_betti, draw_slices
from nnunet_topo.report.html import sort_cases
from nnunet_topo.report.inputs import MARKER, ReportError, check_report_dir, check_report_inputs
from nnunet_topo.report.mesh_render import MAX_RENDER_FACES, penetrating_vertices, render_meshes
from nnunet_topo.report.slices import choose_slices
from nnunet_topo.report.write import write_report, write_report_from_summary

__all__ = [
    "MARKER",
    "MAX_RENDER_FACES",
    "PANEL_W",
    "ReportError",
    "allowed_betti_2d",
    "check_report_dir",
    "check_report_inputs",
    "choose_slices",
    "draw_betti",
    "draw_slices",
    "penetrating_vertices",
    "render_meshes",
    "sort_cases",
    "write_report",
    "write_report_from_summary",
]
