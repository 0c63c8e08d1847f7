"""``nnUNetv2_topo_precompute``: once, before the fold jobs, what every fold job would repeat
(:mod:`nnunet_topo.precompute`)."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.precompute import PrecomputeError, precompute
from nnunet_topo.topology_spec import TopologySpecError


def precompute_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_precompute",
        description="Do once what every fold job of nnUNetv2_train would repeat, before the folds start (e.g. a SLURM "
                    "array; examples/cluster/): builds the trainer as nnUNetv2_train does (fold 0, CPU, no network), "
                    "which checks the topology rules on the reference labels (cached) and, for the mesh trainers, "
                    "builds the templates and the heart-ROI boxes (cached); writes nnU-Net's splits_final.json if "
                    "missing and the model folder's plans.json and dataset.json as nnUNetv2_train would. Never "
                    "replaces a model folder's plans.json or dataset.json that differs.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres or 3d_mesh")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer, as given to nnUNetv2_train")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    args = parser.parse_args(argv)
    with exit_on_user_errors(PrecomputeError, TopologySpecError, RuntimeError):
        done = precompute(args.d, args.c, args.tr, args.p)
    print(f"nnUNetv2_topo_precompute: {done['model_folder']}")
    for key in ("rule_check", "templates", "roi_boxes", "splits"):
        print(f"  {key.replace('_', ' ')}: {done[key]}")
    written = ", ".join(os.path.basename(p) for p in done["written"])
    print(f"  model folder: {'wrote ' + written if written else 'nothing to write (up to date or not needed)'}")
    print(f"done in {done['seconds']:.1f} s; the fold jobs of this model reuse it")
