"""``nnUNetv2_topo_export``: nnU-Net's model export plus the topology files beside a model
(:mod:`nnunet_topo.export`)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.export import export_model


def export_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description="nnU-Net's nnUNetv2_export_model_to_zip plus the topology files of the model "
                    "(progress_topology.png, validation/summary_topology.json, summary_topology_cv.json). Install the "
                    "archive with nnU-Net's nnUNetv2_install_pretrained_model_from_zip.")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-o", required=True, help="output .zip file (never replaced without --overwrite)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer class")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    parser.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"], help="checkpoints to export")
    parser.add_argument("--not_strict", action="store_true", help="allow missing configurations")
    parser.add_argument("--exp_cv_preds", action="store_true", help="also export the cross-validation predictions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    with exit_on_user_errors(FileExistsError, ValueError):
        added = export_model(args.d, args.o, args.c, args.tr, args.p, args.f, args.chk, not args.not_strict,
                             args.exp_cv_preds, args.overwrite)
    print(f"wrote {args.o} (nnU-Net's export + {len(added)} topology file(s): {', '.join(added) or 'none found'})")
