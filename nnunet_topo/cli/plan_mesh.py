"""``nnUNetv2_topo_plan_mesh``: a plans file with a mesh configuration whose patch holds the heart ROI."""
from __future__ import annotations

import argparse
import json
from typing import List, Optional

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.mesh_plans import round_mm, write_mesh_plans


def plan_mesh_entry(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_plan_mesh",
        description="Write a new plans file with a mesh configuration whose patch holds the heart ROI (the largest "
                    "box of the topology.mesh_structures over the raw training labels, plus a margin) at the finest "
                    "spacing nnU-Net's planner allows, starting at the parent configuration's spacing. Needs only "
                    "the fingerprint and plans (nnUNetv2_plan_and_preprocess -d ID --no_pp). The input plans are "
                    "not modified.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="3d_fullres", help="parent configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="input plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", default="nnUNetPlansMesh", help="output plans identifier (default nnUNetPlansMesh)")
    parser.add_argument("--name", default="3d_mesh", help="name of the new configuration (default 3d_mesh)")
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="largest accepted patch in voxels (nnU-Net's transposed axis order); a coarser spacing "
                             "is chosen until the ROI fits it")
    parser.add_argument("--margin_mm", type=float, default=10.0,
                        help="margin around the largest ROI on each side, mm (default 10: room for the random shift "
                             "of training patches and for rotation/scaling augmentation)")
    parser.add_argument("--gpu_memory_target", type=float, default=None,
                        help="GPU memory target in GB for nnU-Net's planner (default: the planner class default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output plans file")
    args = parser.parse_args(argv)
    with exit_on_user_errors(ValueError, FileNotFoundError, FileExistsError, RuntimeError):
        path = write_mesh_plans(args.d, args.c, args.p, args.o, args.name, args.patch, args.margin_mm,
                                args.gpu_memory_target, args.overwrite, show_progress=True)
    with open(path) as f:
        plans = json.load(f)
    conf = plans["configurations"][args.name]
    r = conf["mesh_roi"]
    print(f"wrote {path}: configuration {args.name} (inherits from {args.c})")
    print(f"  spacing {round_mm(conf['spacing'])} mm, patch {conf['patch_size']}, batch size {conf['batch_size']}")
    print(f"  heart ROI {round_mm(r['size_mm'])} mm = largest extent {round_mm(r['extent_mm_max'])} mm + 2 x "
          f"{r['margin_mm']:g} mm ({r['num_cases']} cases; without mesh structures: "
          f"{r['cases_without_structures'] or 'none'})")
    print("next:")
    print(f"  nnUNetv2_preprocess -d {args.d} -plans_name {args.o} -c {args.name}")
    print(f"  nnUNetv2_train {args.d} {args.name} FOLD -tr nnUNetTrainerTPM -p {args.o}")
