"""``nnUNetv2_topo_report``: evaluate predictions and write the static visual QC report (documentation/qc_report.md)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.mesh_evaluation import MeshEvaluationError
from nnunet_topo.report import write_report
from nnunet_topo.topology_spec import TopologySpecError
from nnunet_topo.summary_io import EvaluationError


def report_entry(argv: Optional[Sequence[str]] = None) -> None:
    """``nnUNetv2_topo_report``."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_report",
        description="Evaluate predictions as nnUNetv2_topo_evaluate_folder does and write a static visual QC report "
                    "(REPORT_DIR/index.html, no server needed): the metric table, cases sorted worst first (TVS, "
                    "then Betti error), per case the slices with the most violating voxels, per-slice Betti numbers "
                    "against the priors and (with --mesh_folder) a render of the meshes with penetrating vertices "
                    "in red. Never writes into an input folder.")
    parser.add_argument("ref_folder", help="folder with reference segmentations (e.g. labelsTs)")
    parser.add_argument("pred_folder", help="folder with predicted segmentations")
    parser.add_argument("-djfile", required=True, help="dataset.json file (its 'topology' block holds the rules)")
    parser.add_argument("-pfile", required=True, help="plans.json file")
    parser.add_argument("-o", required=True, metavar="REPORT_DIR",
                        help="report folder (new, or one an earlier report wrote; never an input folder)")
    parser.add_argument("--mesh_folder", default=None,
                        help="folder with predicted meshes (nnUNetv2_topo_predict_meshes output): mesh metrics and a "
                             "mesh render per case")
    parser.add_argument("--image_folder", default=None,
                        help="images (imagesTs-style CASE_0000<file_ending>) drawn in grey under the contours")
    parser.add_argument("--max_cases", type=int, default=None,
                        help="figures for the N worst cases only (the table lists all)")
    parser.add_argument("--slices_per_case", type=int, default=3, help="slices drawn per case (default 3)")
    parser.add_argument("-np", type=int, default=1, help="processes for the evaluation (default 1)")
    parser.add_argument("--ignore_geometry", action="store_true",
                        help="evaluate even where origin or direction of a prediction differ from its reference")
    args = parser.parse_args(argv)
    with exit_on_user_errors(TopologySpecError, EvaluationError, MeshEvaluationError, FileNotFoundError):
        index = write_report(args.ref_folder, args.pred_folder, args.djfile, args.pfile, args.o,
                             mesh_folder=args.mesh_folder, image_folder=args.image_folder, max_cases=args.max_cases,
                             slices_per_case=args.slices_per_case, num_processes=args.np,
                             ignore_geometry=args.ignore_geometry)
    print(f"wrote {index}")
