"""``nnUNetv2_topo_trainer_path``: the value of ``nnUNet_extTrainer`` that lets nnU-Net find the topology trainers."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_topo.trainers import TRAINER_DIR


def trainer_path_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Print the value for ``nnUNet_extTrainer`` (the existing value plus our trainer folder, no duplicates)."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_trainer_path",
        description="Print the value to export as nnUNet_extTrainer so that nnU-Net finds the nnunet-topo trainers: "
                    'export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)". Keeps folders already listed there.')
    parser.add_argument("--only", action="store_true", help="print only our folder, ignore the current value")
    args = parser.parse_args(argv)
    current = [] if args.only else [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if TRAINER_DIR not in current:
        current.append(TRAINER_DIR)
    print(os.pathsep.join(current))
