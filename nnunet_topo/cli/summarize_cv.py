"""``nnUNetv2_topo_summarize_cv``: the topology validation of a cross-validation, per fold and pooled."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors, model_folder_from_args
from nnunet_topo.cv_summary import CV_SUMMARY_NAME, CVSummaryError, format_cv_table, summarize_cv
from nnunet_topo.topology_spec import TopologySpecError
from nnunet_topo.summary_io import EvaluationError


def summarize_cv_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_summarize_cv",
        description="Summarize the topology validation of a cross-validation: per fold and pooled over all "
                    "validation cases of all folds. Reads fold_k/validation/summary_topology.json (computes it "
                    "where only nnU-Net's validation outputs exist), writes summary_topology_cv.json in the model "
                    "folder and prints a table.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-tr", required=True, help="trainer, e.g. nnUNetTrainerTPM")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", type=int, nargs="+", default=None,
                        help="folds (default: every fold_<k> folder of the model folder)")
    parser.add_argument("--chill", action="store_true",
                        help="summarize the folds that have validation outputs, list the others as missing")
    args = parser.parse_args(argv)
    with exit_on_user_errors(RuntimeError):  # dataset not found, nnUNet_results unset
        model_folder = model_folder_from_args(args)
    with exit_on_user_errors(CVSummaryError, EvaluationError, TopologySpecError):
        summary = summarize_cv(model_folder, folds=args.f, chill=args.chill)
    print(format_cv_table(summary))
    print(f"wrote {os.path.join(model_folder, CV_SUMMARY_NAME)}")
