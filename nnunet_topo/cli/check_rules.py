"""``nnUNetv2_topo_check_rules``: which reference cases of a raw dataset violate which topology rule.

Exit code 0: all rules hold; 1: some do not; 2: bad input."""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors, fail
from nnunet_topo.rule_check import check_rules_on_folder, format_rule_report
from nnunet_topo.summary_io import EvaluationError
from nnunet_topo.paths import check_output
from nnunet_topo.topology_spec import TopologySpecError


def check_rules_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_check_rules",
        description="Report which reference cases (labelsTr) of a raw nnU-Net dataset violate which topology rule of "
                    "its dataset.json, with voxel counts and slice indices, and where the reference Betti numbers "
                    "differ from the priors. Exit code 0: all hold; 1: some do not; 2: bad input.")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("-d", "--dataset", help="dataset ID or name under $nnUNet_raw")
    g.add_argument("--folder", help="path of a raw dataset folder (with dataset.json and labelsTr)")
    parser.add_argument("-o", "--output", default=None,
                        help="also write the report as JSON to this file (.json; never dataset.json, a label file or "
                             "a file inside labelsTr)")
    args = parser.parse_args(argv)
    if args.folder:
        folder = args.folder
    else:
        if not os.environ.get("nnUNet_raw"):
            fail("nnUNet_raw is not set; set it or pass --folder")
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        with exit_on_user_errors(RuntimeError):
            name = maybe_convert_to_dataset_name(args.dataset)
        folder = os.path.join(os.environ["nnUNet_raw"], name)
    labels, dj = os.path.join(folder, "labelsTr"), os.path.join(folder, "dataset.json")
    with exit_on_user_errors(TopologySpecError, EvaluationError):
        if args.output is not None:  # before any work
            check_output(args.output, {"labels folder": labels, "dataset.json": dj}, kind="file",
                         extensions=(".json",))
        report = check_rules_on_folder(labels, dj)
    print(format_rule_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    raise SystemExit(0 if report["clean"] else 1)
