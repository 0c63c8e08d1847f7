"""``nnUNetv2_topo_predict_meshes``: segmentations and one surface mesh per mesh structure with a mesh-head model.

Exit codes: 0 all cases meshed; 1 everything written, but some cases got no mesh (listed on stderr and in
``meshes.json``); 2 an error before or during the run (message on stderr)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from nnunet_topo.cli.common import add_model_arguments, exit_on_user_errors, model_folder_from_args
from nnunet_topo.mesh_prediction import MeshPredictionError, predict_meshes_folder
from nnunet_topo.mesh_repair import DEFAULT_GAP_MM, MeshRepairError, format_repair_table, repair_mesh_folder
from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS
from nnunet_topo.paths import check_output


def _set_torch_threads_as_nnunet(device: str) -> None:
    """``nnUNetv2_predict``'s thread settings (all CPU cores on the CPU, one thread next to a GPU)."""
    if device == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
    elif device == "cuda":
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work has started in this process
            pass


def predict_meshes_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``nnUNetv2_topo_predict_meshes`` (arguments as ``nnUNetv2_predict`` where they apply).

    Exit codes: 0 all cases meshed; 1 everything written, but some cases got no mesh (listed on stderr and in
    ``meshes.json``); 2 an error before or during the run (message on stderr)."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_predict_meshes",
        description="Predict the segmentation (as nnUNetv2_predict) and one surface mesh per mesh structure with a "
                    "model trained with a mesh head (nnUNetTrainerMesh/TPM/MIE). The head runs once on the "
                    "patch-size heart ROI centred on the predicted mesh structures. Writes CASE<file_ending>, "
                    "CASE_<structure>.<format> in patient coordinates (ITK/LPS mm, the image's origin, spacing and "
                    "direction) and meshes.json to -o. Cases whose predicted structures do not fit the patch, or "
                    "with none of them, get no mesh (exit code 1 at the end).")
    add_model_arguments(parser, "nnUNetTrainerMesh", "output folder for the segmentations and meshes (never -i)")
    parser.add_argument("--format", default="vtk", choices=[e[1:] for e in SUPPORTED_MESH_EXTENSIONS],
                        help="mesh file format (default vtk)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing mesh and segmentation files in -o")
    parser.add_argument("--roi_from", default=None, metavar="FOLDER",
                        help="take the ROI from these label maps (CASE<file ending>, on the images' grids, e.g. "
                             "corrected segmentations) instead of the model's own segmentation; the network and "
                             "mesh head still run on the image")
    parser.add_argument("--repair", default=None, metavar="FOLDER",
                        help="also repair the meshes (nnUNetv2_topo_repair_meshes: no overlap, inner inside outer, "
                             "with --gap_mm; exactly verified) into this folder (not -i, not inside -o); the "
                             "unrepaired meshes stay in -o")
    parser.add_argument("--gap_mm", type=float, default=None,
                        help="with --repair: the margin between repaired surfaces in mm (default 0.5)")
    args = parser.parse_args(argv)
    if args.gap_mm is not None and args.repair is None:
        parser.error("--gap_mm needs --repair FOLDER")
    with exit_on_user_errors(MeshPredictionError, RuntimeError):  # checks before the model is looked up or loaded
        check_output(args.o, {"input folder": args.i, "--roi_from folder": args.roi_from}, kind="folder")
        if args.repair is not None:
            check_output(args.repair, {"input folder": args.i, "-o folder": args.o}, kind="folder", option="--repair")
        model_folder = model_folder_from_args(args)
        _set_torch_threads_as_nnunet(args.device)
        summary = predict_meshes_folder(model_folder, args.i, args.o, folds=args.f, checkpoint=args.chk,
                                        file_format=args.format, device=args.device, overwrite=args.overwrite,
                                        roi_from=args.roi_from)
    n, failed = len(summary["cases"]), summary["cases_without_mesh"]
    print(f"wrote the segmentations of {n} case(s) and the meshes ({', '.join(summary['structures'])}) of "
          f"{n - len(failed)} to {args.o}")
    if args.repair is not None and n > len(failed):
        with exit_on_user_errors(MeshRepairError, prefix="--repair: "):
            result = repair_mesh_folder(args.o, args.repair, os.path.join(model_folder, "dataset.json"),
                                        DEFAULT_GAP_MM if args.gap_mm is None else args.gap_mm,
                                        overwrite=args.overwrite)
        print(format_repair_table(result))
        failed = failed + [c for c in result["cases_not_repaired"] if c not in failed]
        if result["cases_not_repaired"]:
            print(f"error: {len(result['cases_not_repaired'])} case(s) could not be repaired: "
                  f"{', '.join(result['cases_not_repaired'])} (reasons in {args.repair}/repair.json)", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {n} case(s) got no mesh: {', '.join(failed)} (reasons above and in "
              f"{os.path.join(args.o, 'meshes.json')})", file=sys.stderr)
        raise SystemExit(1)
