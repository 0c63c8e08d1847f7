"""Console entry points (thin: parse arguments, call one API function, print)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, Union

from nnunet_topo.paths import USER_ERRORS, check_output


def _fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def trainer_path_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Print the value for ``nnUNet_extTrainer`` (the existing value plus our trainer folder, no duplicates)."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_trainer_path",
        description="Print the value to export as nnUNet_extTrainer so that nnU-Net finds the nnunet-topo trainers: "
                    'export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)". Keeps folders already listed there.')
    parser.add_argument("--only", action="store_true", help="print only our folder, ignore the current value")
    args = parser.parse_args(argv)
    from nnunet_topo.trainers import TRAINER_DIR

    current = [] if args.only else [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if TRAINER_DIR not in current:
        current.append(TRAINER_DIR)
    print(os.pathsep.join(current))


def make_synthetic_entry(argv: Optional[Sequence[str]] = None) -> None:
    from nnunet_topo import synthetic

    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_make_synthetic",
        description="Write a synthetic multi-chamber heart dataset (images, labels, dataset.json with a 'topology' "
                    "block) as an nnU-Net raw dataset. Refuses to touch an existing dataset ID unless --overwrite.")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset ID (1-999)")
    parser.add_argument("--preset", default="acdc", choices=sorted(synthetic.PRESETS),
                        help="acdc: short-axis MRI (RV, MYO, LV; anisotropic); wholeheart: CT (LV, MYO, RV, LA, RA, AO)")
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
        _fail("no output folder: set nnUNet_raw (as for nnU-Net) or pass -o FOLDER")
    try:
        path = synthetic.write_dataset(raw_root, args.dataset_id, preset=args.preset, num_training=args.num_training,
                                       num_test=args.num_test, seed=args.seed,
                                       shape=tuple(args.shape) if args.shape else None, name=args.name,
                                       oblique=args.oblique, overwrite=args.overwrite, canvas=args.canvas,
                                       spacing=args.spacing)
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    print(f"wrote {path}")


def check_rules_entry(argv: Optional[Sequence[str]] = None) -> None:
    from nnunet_topo.rule_check import check_rules_on_folder, format_rule_report
    from nnunet_topo.summary_io import EvaluationError
    from nnunet_topo.topology_spec import TopologySpecError

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
            _fail("nnUNet_raw is not set; set it or pass --folder")
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        try:
            name = maybe_convert_to_dataset_name(args.dataset)
        except RuntimeError as e:
            _fail(str(e))
        folder = os.path.join(os.environ["nnUNet_raw"], name)
    labels, dj = os.path.join(folder, "labelsTr"), os.path.join(folder, "dataset.json")
    try:
        if args.output is not None:  # before any work
            check_output(args.output, {"labels folder": labels, "dataset.json": dj}, kind="file",
                         extensions=(".json",))
        report = check_rules_on_folder(labels, dj)
    except (TopologySpecError, EvaluationError, *USER_ERRORS) as e:
        _fail(str(e))
    print(format_rule_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    raise SystemExit(0 if report["clean"] else 1)


def evaluate_folder_entry(argv: Optional[Sequence[str]] = None) -> None:
    from nnunet_topo.evaluation import (EvaluationError, check_summary_output, compute_topology_metrics_on_folder,
                                        format_table)
    from nnunet_topo.topology_spec import TopologySpecError

    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_evaluate_folder",
        description="Like nnUNetv2_evaluate_folder, plus topology metrics (TVS, Betti errors, CCE, violation rates, "
                    "HD95). Writes summary_topology.json in nnU-Net's summary format and prints a table.")
    parser.add_argument("gt_folder", help="folder with reference segmentations")
    parser.add_argument("pred_folder", help="folder with predicted segmentations")
    parser.add_argument("-djfile", required=True, help="dataset.json file (its 'topology' block holds the rules)")
    parser.add_argument("-pfile", required=True, help="plans.json file")
    parser.add_argument("-o", default=None, help="output file (default: pred_folder/summary_topology.json)")
    parser.add_argument("-np", type=int, default=1, help="number of processes (default 1)")
    parser.add_argument("--chill", action="store_true",
                        help="do not fail if pred_folder lacks some cases of gt_folder")
    parser.add_argument("--mesh_folder", default=None,
                        help="folder with predicted meshes (meshes.json / CASE_<structure>.<ext> from "
                             "nnUNetv2_topo_predict_meshes); adds mesh Dice, Chamfer, HD95, smoothness and mesh TVS")
    parser.add_argument("--ignore_geometry", action="store_true",
                        help="evaluate voxel by voxel even where origin or direction of a prediction differ from its "
                             "reference (default: such a case is an error; with this flag a warning)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="also write the visual QC report (DIR/index.html, as nnUNetv2_topo_report) from this "
                             "evaluation; DIR must not be an input folder")
    parser.add_argument("--report_image_folder", default=None, metavar="IMAGES",
                        help="with --report: images (imagesTs-style CASE_0000<file_ending>) drawn under the contours")
    args = parser.parse_args(argv)
    output = args.o or os.path.join(args.pred_folder, "summary_topology.json")
    try:  # the evaluator's output guard before any work (compute_topology_metrics_on_folder repeats it)
        check_summary_output(output, args.gt_folder, args.pred_folder, args.mesh_folder, args.djfile, args.pfile,
                             **{"report image folder": args.report_image_folder})
    except USER_ERRORS as e:
        _fail(str(e))
    if args.report is not None:  # the checks that need no evaluation, before it
        from nnunet_topo.report import check_report_inputs
        try:
            check_report_inputs(args.gt_folder, args.pred_folder, args.djfile, args.report,
                                mesh_folder=args.mesh_folder, image_folder=args.report_image_folder,
                                plans=args.pfile, option="--report")
            check_output(args.report, {"-o summary": output}, kind="folder", option="--report")
        except (TopologySpecError, EvaluationError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
    elif args.report_image_folder is not None:
        _fail("--report_image_folder needs --report DIR")
    try:
        summary = compute_topology_metrics_on_folder(args.gt_folder, args.pred_folder, args.djfile, args.pfile,
                                                     output_file=args.o, num_processes=args.np, chill=args.chill,
                                                     mesh_folder=args.mesh_folder,
                                                     ignore_geometry=args.ignore_geometry)
    except (TopologySpecError, EvaluationError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    print(format_table(summary))
    print(f"wrote {args.o or os.path.join(args.pred_folder, 'summary_topology.json')}")
    if args.report is not None:
        from nnunet_topo.report import write_report_from_summary
        try:
            index = write_report_from_summary(summary, args.gt_folder, args.pred_folder, args.djfile, args.pfile,
                                              args.report, mesh_folder=args.mesh_folder,
                                              image_folder=args.report_image_folder)
        except (TopologySpecError, EvaluationError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
        print(f"wrote {index}")


def add_model_arguments(parser: argparse.ArgumentParser, default_trainer: str, output_help: str) -> None:
    """The arguments that name a trained model and its inputs, as nnUNetv2_predict spells them."""
    parser.add_argument("-i", required=True, help="input folder with images (nnU-Net naming, CASE_0000.nii.gz)")
    parser.add_argument("-o", required=True, help=output_help)
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", default=default_trainer, help=f"trainer of the model (default {default_trainer})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=None,
                        help="folds of the model, e.g. -f 0 1 2 3 4 or -f all; several folds are an ensemble, as in "
                             "nnUNetv2_predict (default: every fold_N folder of the model folder with the checkpoint "
                             "-chk)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")


def resolve_folds(model_folder: str, folds, checkpoint: str = "checkpoint_final.pth") -> List[Union[int, str]]:
    """The folds to use, as ``nnUNetPredictor.initialize_from_trained_model_folder`` takes them.

    ``folds`` None (the default of ``-f``): every ``fold_N`` folder of ``model_folder`` that holds ``checkpoint``
    (as ``nnUNetPredictor.auto_detect_available_folds``, which also skips ``fold_all``). Otherwise a fold or a
    sequence of folds: integers, or ``"all"`` (the model trained on all cases). Raises ``ValueError`` naming the
    missing folder or checkpoint, a fold that is neither an integer nor ``all``, a repeated fold, or no fold found.
    """
    if folds is None:
        found = []
        if os.path.isdir(model_folder):
            for d in os.listdir(model_folder):
                if d.startswith("fold_") and d != "fold_all" and d[5:].isdigit() and \
                        os.path.isfile(os.path.join(model_folder, d, checkpoint)):
                    found.append(int(d[5:]))
        if not found:
            raise ValueError(f"no fold_N folder with {checkpoint} in {model_folder}; train a fold first, pass -f (e.g. "
                             "-f all), or choose the checkpoint with -chk")
        return sorted(found)
    if isinstance(folds, (str, int)):
        folds = [folds]
    out: List[Union[int, str]] = []
    for f in folds:
        text = str(f).strip()
        if text != "all" and not text.lstrip("-").isdigit():
            raise ValueError(f"fold {f!r} is neither an integer nor 'all'")
        fold: Union[int, str] = "all" if text == "all" else int(text)
        if fold in out:
            raise ValueError(f"fold {fold} is given twice in {list(folds)}")
        folder = os.path.join(model_folder, f"fold_{fold}")
        if not os.path.isdir(folder):
            raise ValueError(f"fold {fold}: no folder {folder}; train that fold first or leave it out of -f")
        if not os.path.isfile(os.path.join(folder, checkpoint)):
            raise ValueError(f"fold {fold}: no checkpoint {checkpoint} in {folder} (unfinished training? pass -chk "
                             "checkpoint_best.pth or checkpoint_latest.pth, or leave the fold out of -f)")
        out.append(fold)
    if not out:
        raise ValueError("no fold given")
    return out


def model_folder_from_args(args) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(maybe_convert_to_dataset_name(args.d), args.tr, args.p, args.c)


def refine_entry(argv: Optional[Sequence[str]] = None) -> None:
    from nnunet_topo.refine import DEFAULT_LAMBDA, RefinementError, format_refinement_summary, refine_folder
    from nnunet_topo.topology_spec import TopologySpecError

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
    try:  # before the model is looked up or loaded
        check_output(args.o, {"input folder": args.i}, kind="folder")
        model_folder = model_folder_from_args(args)
        summary = refine_folder(model_folder, args.i, args.o, folds=args.f, checkpoint=args.chk, steps=args.steps,
                                lr=args.lr, lam=args.lam, downsample=args.downsample, use_2d=not args.no_2d,
                                device=args.device, overwrite=args.overwrite,
                                keep_present=not args.no_keep_present)
    except (RefinementError, TopologySpecError, RuntimeError, *USER_ERRORS) as e:
        _fail(str(e))
    print(format_refinement_summary(summary))
    print(f"wrote {args.o}")
