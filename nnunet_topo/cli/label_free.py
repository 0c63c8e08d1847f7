"""``python -m nnunet_topo.cli.label_free``: the measures of predictions that need no reference, for a test set
whose labels are kept elsewhere (:mod:`nnunet_topo.label_free`).

    python -m nnunet_topo.cli.label_free PREDICTIONS -djfile dataset.json [--mesh_folder MESHES] -o label_free.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from nnunet_topo.cli.common import print_error, user_errors
from nnunet_topo.label_free import label_free_folder
from nnunet_topo.summary_io import EvaluationError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nnunet_topo.cli.label_free``: exit code 0, or 2 on bad input."""
    p = argparse.ArgumentParser(
        prog="python -m nnunet_topo.cli.label_free",
        description="Measures of predicted segmentations (and meshes) that need no reference: rule violations, 3D "
                    "and per-slice Betti priors, lacking labels, cases meshed, mesh overlaps. For test sets whose "
                    "labels are kept elsewhere.")
    p.add_argument("pred_folder", help="folder of predicted label maps CASE<file_ending>")
    p.add_argument("-djfile", required=True, help="dataset.json of the model (labels, file_ending, topology)")
    p.add_argument("--mesh_folder", default=None, help="folder with meshes.json and the predicted meshes")
    p.add_argument("-o", default=None, help="output .json (default: pred_folder/label_free.json)")
    a = p.parse_args(argv)
    out = a.o or os.path.join(a.pred_folder, "label_free.json")
    try:
        r = label_free_folder(a.pred_folder, a.djfile, mesh_folder=a.mesh_folder, output_file=out)
    except user_errors(EvaluationError, ValueError, FileNotFoundError) as e:
        return print_error(e)
    print(json.dumps(r["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
