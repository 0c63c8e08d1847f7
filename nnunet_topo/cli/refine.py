"""``nnUNetv2_topo_refine``: test-time topological refinement of a trained model's predictions (Clough et al.)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from nnunet_topo.cli.common import add_model_arguments, exit_on_user_errors, model_folder_from_args
from nnunet_topo.paths import check_output
from nnunet_topo.refine import DEFAULT_LAMBDA, RefinementError, format_refinement_summary, refine_folder
from nnunet_topo.topology_spec import TopologySpecError


def refine_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_refine",
        description="Test-time topological refinement (Clough et al.): for each image, fine-tune a copy of the trained "
                    "network so its output meets the dataset's Betti priors (dataset.json 'betti' and 'betti_2d') while "
                    "staying close to its own prediction. Writes refined segmentations and refinement_summary.json to "
                    "-o (never into -i; existing files only with --overwrite).")
    add_model_arguments(parser, "nnUNetTrainer", "output folder for the refined segmentations")
    parser.add_argument("--steps", type=int, default=30, help="Adam steps per case (default 30)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--lam", type=float, default=DEFAULT_LAMBDA,
                        help=f"weight of the topology loss against the fidelity (squared probability difference "
                             f"summed over classes, mean over voxels; Clough et al.) (default {DEFAULT_LAMBDA:g}, "
                             "Clough's range 0.005-0.02)")
    parser.add_argument("--downsample", type=int, default=1, help="max-pool factor before persistence (default 1)")
    parser.add_argument("--no_2d", action="store_true", help="ignore the per-slice (betti_2d) priors")
    parser.add_argument("--no_keep_present", action="store_true",
                        help="apply the per-slice priors to the slices where a class is present at each step (a weak "
                             "structure may then vanish); default: to the slices where the unrefined prediction "
                             "shows it, so it is kept")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in -o")
    args = parser.parse_args(argv)
    # the output check before the model is looked up or loaded
    with exit_on_user_errors(RefinementError, TopologySpecError, RuntimeError):
        check_output(args.o, {"input folder": args.i}, kind="folder")
        model_folder = model_folder_from_args(args)
        summary = refine_folder(model_folder, args.i, args.o, folds=args.f, checkpoint=args.chk, steps=args.steps,
                                lr=args.lr, lam=args.lam, downsample=args.downsample, use_2d=not args.no_2d,
                                device=args.device, overwrite=args.overwrite,
                                keep_present=not args.no_keep_present)
    print(format_refinement_summary(summary))
    print(f"wrote {args.o}")
