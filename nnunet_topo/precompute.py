"""``nnUNetv2_topo_precompute``: the work every fold job of a cross-validation would repeat, done once before them.

A fold job (``nnUNetv2_train D C FOLD -tr T -p P``) builds its trainer, and an nnunet-topo trainer's constructor

* checks the topology rules on the reference labels (``nnUNetTrainerTopoBase._check_rules_on_reference``; cached
  in the preprocessed folder by :func:`nnunet_topo.rule_check.cached_rule_check`, but five folds starting together
  would all compute it);
* for the mesh trainers, streams every preprocessed case to build the templates (unless the model folder's
  ``plans.json`` holds them) and the heart-ROI boxes (``nnUNetTrainerMesh._setup_templates``; the boxes cached by
  :mod:`nnunet_topo.roi_cache`);

and nnU-Net's ``do_split`` writes ``splits_final.json`` when it is missing (five folds starting together race to
write the same file). :func:`precompute` builds the trainer exactly as ``nnUNetv2_train`` does
(``nnunetv2.run.run_training.get_trainer_from_args``, fold 0, on the CPU; no network is built), which does the
first two, calls ``do_split``, and writes the model folder's ``plans.json`` and ``dataset.json`` as nnU-Net's
``on_train_start`` writes them, so that every fold job finds the templates there. A ``plans.json`` or
``dataset.json`` already in the model folder is never replaced: identical, it is left as it is; different (a model
trained with other plans or templates), the command refuses. The log file the trainer's constructor opens in
``fold_0`` is removed again (its lines are printed). examples/cluster/ runs it before the SLURM array of folds.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import time
from typing import List

__all__ = ["PrecomputeError", "precompute"]


class PrecomputeError(ValueError):
    """Bad arguments (dataset, plans, configuration, trainer) or a model folder that would be overwritten."""


def _file_state(path: str):
    """What tells whether a file was (re)written: its modification time and size, None when absent."""
    return (os.stat(path).st_mtime_ns, os.stat(path).st_size) if os.path.isfile(path) else None


def _trainer_class(name: str):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every folder it searches
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise PrecomputeError(
            f"-tr {name}: nnU-Net finds no trainer of that name (nnUNet_extTrainer="
            f"{os.environ.get('nnUNet_extTrainer', '')!r}); check the name, and export "
            'nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)" (plus the folder of your own subclasses)') from None


def _check_inputs(dataset: str, configuration: str, trainer: str, plans: str):
    """``(dataset name, trainer class, the configuration's dict)``, after the checks whose failure would be a
    traceback in ``nnUNetv2_train``."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_topo.paths import read_json

    for var in (nnUNet_preprocessed, nnUNet_results):
        if not var.is_set():
            raise PrecomputeError(f"{var.env_var_name} is not set; export it as for nnUNetv2_train "
                                  "(examples/cluster/env.sh)")
    try:
        name = maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError):
        raise PrecomputeError(f"-d {dataset}: no such dataset in nnUNet_preprocessed ({nnUNet_preprocessed.get()}) "
                              "or nnUNet_raw; run nnUNetv2_plan_and_preprocess for it first") from None
    base = os.path.join(nnUNet_preprocessed.get(), name)
    plans_file = os.path.join(base, plans + ".json")
    if not os.path.isfile(plans_file):
        found = sorted(f[:-5] for f in os.listdir(base) if f.endswith(".json") and "Plans" in f and
                       not f.startswith("nnunet_topo_")) if os.path.isdir(base) else []
        raise PrecomputeError(f"-p {plans}: no {plans_file} (plans here: {', '.join(found) or 'none'}); plan "
                              "first (nnUNetv2_plan_and_preprocess, nnUNetv2_topo_plan_mesh)")
    plans_dict = read_json(plans_file, "plans")
    if configuration not in plans_dict.get("configurations", {}):
        raise PrecomputeError(f"-c {configuration}: not a configuration of {plans_file} (it has "
                              f"{', '.join(plans_dict.get('configurations', {}))})")
    data = os.path.join(base, PlansManager(plans_dict).get_configuration(configuration).data_identifier)
    if not os.path.isdir(data):
        raise PrecomputeError(f"-c {configuration}: not preprocessed ({data} is missing); run nnUNetv2_preprocess -d "
                              f"{dataset} -plans_name {plans} -c {configuration} first")
    read_json(os.path.join(base, "dataset.json"), "dataset.json")
    return name, _trainer_class(trainer), PlansManager(plans_dict).get_configuration(configuration).configuration


def _model_files_to_write(trainer) -> List[tuple]:
    """``[(path, content)]`` of the model folder files to write; refuses when one exists with other content."""
    from nnunet_topo.mesh_head.network import TEMPLATES_KEY
    from nnunet_topo.paths import read_json

    out = []
    for fname, content in (("plans.json", trainer.plans_manager.plans), ("dataset.json", trainer.dataset_json)):
        path = os.path.join(trainer.output_folder_base, fname)
        new = json.loads(json.dumps(content))
        if not os.path.isfile(path):
            out.append((path, content))
            continue
        old = read_json(path, fname)
        if old == new:
            continue
        conf = trainer.configuration_name
        if fname == "plans.json":
            old_c, new_c = old.get("configurations", {}).get(conf, {}), new["configurations"][conf]
            keys = sorted(k for k in set(old_c) | set(new_c) if old_c.get(k) != new_c.get(k))
            what = "other mesh templates" if TEMPLATES_KEY in keys else \
                f"other settings of {conf!r} ({', '.join(keys[:5])})" if keys else "other global plans settings"
        else:
            what = "another dataset.json"
        raise PrecomputeError(
            f"{path} holds {what} than this training would use (a model trained with other plans, data or templates?):"
            f" it is never replaced. Train into a new model folder (another plans identifier or trainer name), or "
            f"remove {path} if no fold of this model was trained with it")
    return out


def precompute(dataset: str, configuration: str, trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans") -> dict:
    """Build the trainer of ``nnUNetv2_train dataset configuration 0 -tr trainer -p plans`` on the CPU and keep
    what every fold reuses (see the module docstring).

    Returns ``{"model_folder", "rule_check", "templates", "roi_boxes", "splits", "written", "seconds"}``: the model
    folder, words saying what was done for each piece, the files written into the model folder and the time taken.
    Raises :class:`PrecomputeError` (bad arguments, a model folder file that would change), ``TopologySpecError`` (a
    rule the reference labels break, a spec error) and ``RuntimeError`` (templates or boxes that cannot be built)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_topo.mesh_head.network import stored_templates
    from nnunet_topo.plans import saved_configuration
    from nnunet_topo.roi_cache import roi_boxes_and_crops, roi_cache_file
    from nnunet_topo.roi_loader import MeshROISampling
    from nnunet_topo.summary_io import write_json_atomic

    start = time.perf_counter()
    name, _, conf = _check_inputs(dataset, configuration, trainer, plans)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    base = os.path.join(nnUNet_preprocessed.get(), name)
    model_folder = get_output_folder(name, trainer, plans, configuration)
    fold0 = os.path.join(model_folder, "fold_0")
    created = [d for d in (os.path.dirname(model_folder), model_folder, fold0) if not os.path.isdir(d)]
    logs_before = set(glob.glob(os.path.join(fold0, "training_log_*.txt")))
    rule_cache, splits = os.path.join(base, "nnunet_topo_reference_check.json"), os.path.join(base, "splits_final.json")
    roi_cache = roi_cache_file(os.path.join(base, conf["data_identifier"]))
    before = {p: _file_state(p) for p in (rule_cache, splits, roi_cache)}
    templates = ("reused from the model folder's plans.json"
                 if stored_templates(saved_configuration(model_folder, configuration)) else
                 f"reused from {plans}.json" if stored_templates(conf) else "built from the training labels")
    wandb = os.environ.pop("nnUNet_wandb_enabled", None)  # building a trainer here must not open a W&B run
    try:
        tr = get_trainer_from_args(str(dataset), configuration, 0, trainer, plans, device=torch.device("cpu"))
        if isinstance(tr, MeshROISampling) and tr.mesh_boxes is None:  # nnUNetTrainerMeshROI: the boxes only
            _, tr.mesh_boxes = roi_boxes_and_crops(tr.preprocessed_dataset_folder, tr.mesh_structure_label_ids(),
                                                   tr.configuration_manager.patch_size, trainer, configuration,
                                                   crop=False, log=print)
        tr.do_split()
        to_write = _model_files_to_write(tr) if hasattr(tr, "mesh_templates") else []
        for path, content in to_write:  # as nnU-Net's on_train_start writes them (save_json: indent 4, unsorted)
            write_json_atomic(path, content, sort_keys=False, indent=4)
    finally:
        if wandb is not None:
            os.environ["nnUNet_wandb_enabled"] = wandb
        for log in set(glob.glob(os.path.join(fold0, "training_log_*.txt"))) - logs_before:
            os.remove(log)  # the log file the trainer's constructor opened; its lines went to stdout
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only folders this command created, and only when empty

    rules = getattr(tr, "require_rules_hold_on_reference", False) and getattr(tr, "topology_spec", None) is not None \
        and bool(tr.topology_spec.rules)
    if not rules:
        rule_check = "none (no rules to check)"
    elif not os.path.isfile(rule_cache):
        rule_check = "skipped (no gt_segmentations in the preprocessed folder)"
    else:
        rule_check = "computed" if _file_state(rule_cache) != before[rule_cache] else "cached"
    boxes = "computed" if _file_state(roi_cache) != before[roi_cache] else "cached"
    return {
        "model_folder": model_folder,
        "rule_check": rule_check,
        "templates": templates if hasattr(tr, "mesh_templates") else "none (this trainer has no mesh templates)",
        "roi_boxes": f"{boxes} for {len(tr.mesh_boxes)} case(s)" if isinstance(tr, MeshROISampling) else
        "none (no ROI sampling)",
        "splits": "created" if before[splits] is None and os.path.isfile(splits) else "exists",
        "written": [p for p, _ in to_write],
        "seconds": time.perf_counter() - start,
    }
