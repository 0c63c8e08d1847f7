"""``nnUNetv2_topo_make_synthetic``: write a synthetic multi-chamber heart dataset as an nnU-Net raw dataset."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors, fail
from nnunet_topo.synthetic import PRESETS, write_dataset


def make_synthetic_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_make_synthetic",
        description="Write a synthetic multi-chamber heart dataset (images, labels, dataset.json with a 'topology' "
                    "block) as an nnU-Net raw dataset. Refuses to touch an existing dataset ID unless --overwrite.")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset ID (1-999)")
    parser.add_argument("--preset", default="acdc", choices=sorted(PRESETS),
                        help="acdc: short-axis MRI (RV, MYO, LV; anisotropic); wholeheart: CT (LV, MYO, RV, LA, RA, "
                             "AO)")
    parser.add_argument("-n", "--num_training", type=int, default=10, help="training cases (>= 5), default 10")
    parser.add_argument("--num_test", type=int, default=4, help="test cases (imagesTs + labelsTs), default 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="volume shape in voxels (default: the preset's)")
    parser.add_argument("--name", default=None, help="dataset name (default SynthACDC / SynthWholeHeart)")
    parser.add_argument("--oblique", action="store_true", help="random non-identity image directions")
    parser.add_argument("--canvas", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="place each heart off-centre in a larger image of this size (CT-like cases much larger "
                             "than the heart)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="voxel size in mm for every case instead of the preset's random one")
    parser.add_argument("-o", "--raw_root", default=None, help="folder to write into (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this ID")
    args = parser.parse_args(argv)
    raw_root = args.raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        fail("no output folder: set nnUNet_raw (as for nnU-Net) or pass -o FOLDER")
    with exit_on_user_errors(ValueError, FileExistsError):
        path = write_dataset(raw_root, args.dataset_id, preset=args.preset, num_training=args.num_training,
                             num_test=args.num_test, seed=args.seed, shape=tuple(args.shape) if args.shape else None,
                             name=args.name, oblique=args.oblique, overwrite=args.overwrite, canvas=args.canvas,
                             spacing=args.spacing)
    print(f"wrote {path}")
