"""Plans whose patch covers every preprocessed case: what the mesh trainers and semi-supervised priors need.

A mesh describes a whole structure, so the training patch must contain it (DESIGN §7). nnU-Net plans patches for
its GPU memory target, which for small cropped volumes is usually the whole volume, but not always. This module
writes a *new* plans file (nnU-Net's own ``-p PLANS`` mechanism; the original plans are never modified) in which
one configuration's patch size is the per-axis maximum of the preprocessed case shapes, rounded up to a multiple
of the network's total stride. The data identifier is kept, so nnU-Net reuses the preprocessed data as is; the
network architecture (stages, kernels, strides) is unchanged, only the patch grows. The batch size is kept; a
larger patch needs more GPU memory: check it.

nnU-Net glue (reads the preprocessed folder and plans with nnU-Net's own classes).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from nnunet_topo.paths import InputReadError, OutputPathError, check_output, read_json
from nnunet_topo.summary_io import write_json_atomic


def preprocessed_cases(preprocessed_dataset_folder: str) -> Iterator[Tuple[str, Any, Any]]:
    """``(identifier, data (C, Z, Y, X), seg (1, Z, Y, X))`` of every preprocessed case of one configuration folder,
    sorted by identifier, one case at a time (nnU-Net's dataset class; arrays as it loads them, often memory-mapped).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if not os.path.isdir(preprocessed_dataset_folder):
        raise FileNotFoundError(f"preprocessed data not found: {preprocessed_dataset_folder} "
                                "(run nnUNetv2_plan_and_preprocess for this configuration first)")
    cls = infer_dataset_class(preprocessed_dataset_folder)
    ids = sorted(cls.get_identifiers(preprocessed_dataset_folder))
    if not ids:
        raise FileNotFoundError(f"no preprocessed cases in {preprocessed_dataset_folder}")
    ds = cls(preprocessed_dataset_folder, ids)
    for i in ids:
        data, seg, _, _ = ds.load_case(i)
        yield i, data, seg


def preprocessed_shapes(preprocessed_dataset_folder: str) -> List[tuple]:
    """Spatial shapes of every preprocessed case of one configuration folder."""
    return [tuple(int(s) for s in data.shape[1:]) for _, data, _ in preprocessed_cases(preprocessed_dataset_folder)]


def saved_configuration(model_folder: Optional[str], configuration: str) -> dict:
    """The ``configuration`` dict of the ``plans.json`` in a model folder (``{}`` when there is none or it cannot
    be read): what a run being continued (``--c``, ``--val``) was trained with, or what ``nnUNetv2_topo_precompute``
    wrote for the folds. A file that is not valid JSON is read again for up to 2 s: the fold jobs of a cluster array
    start together, and nnU-Net's ``on_train_start`` of one rewrites the file (not atomically) while another reads."""
    path = os.path.join(model_folder, "plans.json") if model_folder else None
    if path is None or not os.path.isfile(path):
        return {}
    for _ in range(10):
        try:
            with open(path) as f:
                return json.load(f)["configurations"].get(configuration, {})
        except ValueError:  # half written? another fold's nnU-Net on_train_start rewrites it (not atomically)
            time.sleep(0.2)
        except (OSError, KeyError, TypeError, AttributeError):
            return {}
    return {}


def whole_volume_patch(shapes: List[tuple], strides: List[List[int]]) -> List[int]:
    """Per-axis maximum of ``shapes`` rounded up to a multiple of the product of the network strides."""
    total = np.prod(np.array(strides), axis=0).astype(int)
    biggest = np.max(np.array(shapes), axis=0)
    return [int(math.ceil(b / t) * t) for b, t in zip(biggest, total)]


def derived_plans(dataset: str, plans_identifier: str, output_identifier: str, overwrite: bool,
                  missing_hint: str = "") -> Tuple[str, str, dict]:
    """``(input path, output path, input plans dict)`` of a plans file derived from another one in the dataset's
    preprocessed folder (nnU-Net's ``-p PLANS`` mechanism): refuses an output identifier equal to the input one (the
    input is never modified), a missing input (``missing_hint`` says how to make it) and an existing output unless
    ``overwrite``."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if output_identifier == plans_identifier:
        raise ValueError("the output plans identifier (-o) must differ from the input one (-p): the input is never "
                         "modified")
    base = os.path.join(os.fspath(nnUNet_preprocessed), maybe_convert_to_dataset_name(dataset))
    src = os.path.join(base, plans_identifier + ".json")
    dst = os.path.join(base, output_identifier + ".json")
    if not output_identifier or os.sep in output_identifier or "/" in output_identifier or \
            output_identifier in (".", ".."):
        raise OutputPathError(f"-o {output_identifier}: not a plans identifier (a file name without folder and "
                              "without .json); name it e.g. nnUNetPlansMine")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"plans not found: {src}" + (f" ({missing_hint})" if missing_hint else ""))
    # the preprocessed folder's own files are inputs too (-o dataset would replace its dataset.json)
    check_output(dst, {"input plans": src, "dataset.json": os.path.join(base, "dataset.json"),
                       "dataset fingerprint": os.path.join(base, "dataset_fingerprint.json"),
                       "gt_segmentations folder": os.path.join(base, "gt_segmentations")},
                 kind="file", extensions=(".json",), overwrite=overwrite, option=f"-o {output_identifier} ->")
    plans = read_json(src, "plans file")
    if not isinstance(plans.get("configurations"), dict):
        raise InputReadError(f"cannot read plans file {src}: no 'configurations' table (not an nnU-Net plans file; "
                             "rerun nnUNetv2_plan_and_preprocess)")
    return src, dst, plans


def write_whole_volume_plans(dataset: str, configuration: str = "3d_fullres", plans_identifier: str = "nnUNetPlans",
                             output_identifier: str = "nnUNetPlansWholeVolume", overwrite: bool = False) -> str:
    """Write ``<output_identifier>.json`` next to the plans; returns its path. Never modifies the input plans."""
    src, dst, plans = derived_plans(dataset, plans_identifier, output_identifier, overwrite)
    base = os.path.dirname(src)
    if configuration not in plans["configurations"]:
        raise ValueError(f"configuration {configuration!r} not in {src}; it has {sorted(plans['configurations'])}")
    conf = plans["configurations"][configuration]
    if "patch_size" not in conf or "data_identifier" not in conf:
        raise ValueError(f"configuration {configuration!r} inherits its patch from another one; use that one")
    shapes = preprocessed_shapes(os.path.join(base, conf["data_identifier"]))
    strides = conf["architecture"]["arch_kwargs"]["strides"]
    patch = whole_volume_patch(shapes, strides)
    patch = [max(int(p), int(q)) for p, q in zip(patch, conf["patch_size"])]
    conf["patch_size"] = patch
    plans["plans_name"] = output_identifier
    write_json_atomic(dst, plans, indent=4)
    return dst
