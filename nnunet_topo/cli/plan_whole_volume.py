"""``nnUNetv2_topo_plan_whole_volume``: a plans file whose patch covers every preprocessed case."""
from __future__ import annotations

import argparse
import json
from typing import List, Optional

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.plans import write_whole_volume_plans


def whole_volume_plans_entry(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_plan_whole_volume",
        description="Write a new plans file whose patch covers every preprocessed case of one configuration (for the "
                    "mesh trainers and nnUNetTrainerBettiSemi), then train with -p <output>. The data is reused; the "
                    "original plans are not modified.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="input plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", default="nnUNetPlansWholeVolume", help="output plans identifier")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    with exit_on_user_errors(ValueError, FileNotFoundError, FileExistsError, RuntimeError):
        path = write_whole_volume_plans(args.d, args.c, args.p, args.o, args.overwrite)
    with open(path) as f:
        patch = json.load(f)["configurations"][args.c]["patch_size"]
    print(f"wrote {path} ({args.c} patch {patch}); train with: nnUNetv2_train {args.d} {args.c} FOLD -tr TRAINER "
          f"-p {args.o}")
