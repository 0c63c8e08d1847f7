"""``nnUNetv2_topo_evaluate_folder``: nnUNetv2_evaluate_folder plus the topology metrics (and the QC report)."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors, fail
from nnunet_topo.evaluation import (EvaluationError, check_summary_output, compute_topology_metrics_on_folder,
                                    format_table)
from nnunet_topo.paths import check_output
from nnunet_topo.report import check_report_inputs, write_report_from_summary
from nnunet_topo.topology_spec import TopologySpecError

#: what the evaluation and the report refuse as bad input (exit code 2)
INPUT_ERRORS = (TopologySpecError, EvaluationError, ValueError, FileNotFoundError)


def evaluate_folder_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_evaluate_folder",
        description="Like nnUNetv2_evaluate_folder, plus topology metrics (TVS, Betti errors, CCE, violation rates, "
                    "HD95). Writes summary_topology.json in nnU-Net's summary format and prints a table.")
    parser.add_argument("gt_folder", help="folder with reference segmentations")
    parser.add_argument("pred_folder", help="folder with predicted segmentations")
    parser.add_argument("-djfile", required=True, help="dataset.json file (its 'topology' block holds the rules)")
    parser.add_argument("-pfile", required=True, help="plans.json file")
    parser.add_argument("-o", default=None, help="output file (default: pred_folder/summary_topology.json)")
    parser.add_argument("-np", type=int, default=1, help="number of processes (default 1)")
    parser.add_argument("--chill", action="store_true",
                        help="do not fail if pred_folder lacks some cases of gt_folder")
    parser.add_argument("--mesh_folder", default=None,
                        help="folder with predicted meshes (meshes.json / CASE_<structure>.<ext> from "
                             "nnUNetv2_topo_predict_meshes); adds mesh Dice, Chamfer, HD95, smoothness and mesh TVS")
    parser.add_argument("--ignore_geometry", action="store_true",
                        help="evaluate voxel by voxel even where origin or direction of a prediction differ from its "
                             "reference (default: such a case is an error; with this flag a warning)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="also write the visual QC report (DIR/index.html, as nnUNetv2_topo_report) from this "
                             "evaluation; DIR must not be an input folder")
    parser.add_argument("--report_image_folder", default=None, metavar="IMAGES",
                        help="with --report: images (imagesTs-style CASE_0000<file_ending>) drawn under the contours")
    args = parser.parse_args(argv)
    output = args.o or os.path.join(args.pred_folder, "summary_topology.json")
    with exit_on_user_errors():  # the evaluator's output guard before any work (the evaluator repeats it)
        check_summary_output(output, args.gt_folder, args.pred_folder, args.mesh_folder, args.djfile, args.pfile,
                             **{"report image folder": args.report_image_folder})
    if args.report is not None:  # the checks that need no evaluation, before it
        with exit_on_user_errors(*INPUT_ERRORS):
            check_report_inputs(args.gt_folder, args.pred_folder, args.djfile, args.report,
                                mesh_folder=args.mesh_folder, image_folder=args.report_image_folder,
                                plans=args.pfile, option="--report")
            check_output(args.report, {"-o summary": output}, kind="folder", option="--report")
    elif args.report_image_folder is not None:
        fail("--report_image_folder needs --report DIR")
    with exit_on_user_errors(*INPUT_ERRORS):
        summary = compute_topology_metrics_on_folder(args.gt_folder, args.pred_folder, args.djfile, args.pfile,
                                                     output_file=args.o, num_processes=args.np, chill=args.chill,
                                                     mesh_folder=args.mesh_folder,
                                                     ignore_geometry=args.ignore_geometry)
    print(format_table(summary))
    print(f"wrote {output}")
    if args.report is not None:
        with exit_on_user_errors(*INPUT_ERRORS):
            index = write_report_from_summary(summary, args.gt_folder, args.pred_folder, args.djfile, args.pfile,
                                              args.report, mesh_folder=args.mesh_folder,
                                              image_folder=args.report_image_folder)
        print(f"wrote {index}")
