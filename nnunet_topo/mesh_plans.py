"""Mesh plans: a configuration whose patch holds the heart ROI of every training case (DESIGN §7).

``nnUNetv2_topo_plan_mesh`` writes a *new* plans file (nnU-Net's ``-p PLANS`` mechanism; the input plans are never
modified): a copy of the input plans plus one configuration (default ``3d_mesh``) for the mesh trainers, stored with
nnU-Net's own ``inherits_from`` mechanism on a parent configuration (default ``3d_fullres``) and with its own
``data_identifier``, so ``nnUNetv2_preprocess -plans_name <o> -c 3d_mesh`` resamples the data at the mesh spacing.

What it computes, and the decisions behind it:

1. **The heart ROI** (:func:`roi_statistics`). For every training case of the *raw* dataset, the bounding box of
   the union of the ``topology.mesh_structures`` labels (:func:`nnunet_topo.roi.structure_box`) and its size in mm
   (:func:`nnunet_topo.roi.box_extent_mm`), in nnU-Net's transposed axis order (the label and its spacing are
   transposed by the plans' ``transpose_forward`` exactly as ``DefaultPreprocessor.run_case_npy`` does). The ROI size
   is the per-axis maximum over the cases plus ``margin_mm`` on each side. Raw labels, read with the reader nnU-Net
   uses for this dataset (``plans_manager.image_reader_writer_class()``), make the ROI independent of nnU-Net's
   crop-to-nonzero and need no preprocessing of the parent configuration: only the fingerprint and the plans
   (``nnUNetv2_plan_and_preprocess -d ID --no_pp``, or ``nnUNetv2_extract_fingerprint -d ID`` followed by
   ``nnUNetv2_plan_experiment -d ID``). One case is in memory at a time (a 512 x 512 x 300 CT label is read as
   float32 by nnU-Net's reader, about 0.3 GB; ``benchmarks/bench_plan_mesh_memory.py`` measures the pass).
2. **The margin**, default 10 mm per side: room for the random shift of training patches around the structures
   (``nnunet_topo.roi.random_window_start`` keeps the box inside the patch) and for nnU-Net's rotation and scaling
   augmentation, which moves the structures' border within the patch.
3. **Spacing and patch** (:func:`plan_mesh_configuration`), always through nnU-Net's own planner (the class the
   input plans name in ``experiment_planner_used``), never a copy of its rules: one uniform call,
   ``planner.get_plans_for_configuration(spacing, roi_voxels, data_identifier, approximate_n_voxels_dataset,
   cache)``, with the ROI voxel shape at that spacing in the place of the median image shape. It starts at the
   parent configuration's spacing (never finer) and accepts the first spacing whose planned patch holds the ROI on
   every axis; otherwise it coarsens the spacing by nnU-Net's own 3d_lowres rule (factor 1.03 per step, the
   anisotropic fine axes first while ``max(spacing) / spacing > 2``, else all axes) and asks the planner again. It
   refuses (with the ROI in mm, the parent spacing and the patch) rather than go beyond 8x the parent spacing on
   any axis. ``approximate_n_voxels_dataset`` (the planner's batch-size cap of 5 % of the dataset) is the median
   case shape at that spacing, from the fingerprint as ``plan_experiment`` computes it, times ``numTraining``.

   Because nnU-Net clips its initial patch to the median shape, and here the median shape is the ROI, the patch
   *shrinks* to the ROI rounded up to the network's stride wherever the ROI at the parent spacing is smaller than
   the parent's planned patch (cine MRI, where the image is little more than the heart): that is intended — a
   smaller patch that still holds the heart, at the parent's spacing, with the batch size the planner gives it.
   ``--patch Z Y X`` (transposed order, like nnU-Net's ``patch_size``) is the largest patch accepted: spacings at
   which the ROI voxels exceed it are skipped without a planner call, and a planned patch larger than it (stride
   rounding) is rejected, so the result never exceeds it. ``--gpu_memory_target`` is handed to the planner's
   constructor (the class default otherwise).
4. **The configuration**: ``{"inherits_from": parent, <the planner's keys that differ from the parent's resolved
   configuration, always data_identifier, spacing, patch_size, batch_size, median_image_size_in_voxels,
   architecture>, "mesh_roi": {...}}``; ``median_image_size_in_voxels`` is the ROI voxel shape (what the planner
   was given). A parent that is a cascade stage (``next_stage``/``previous_stage``) has those set to null here: the
   mesh configuration is no cascade stage. ``mesh_roi`` records ``size_mm``, ``margin_mm``, ``extent_mm_max``,
   ``largest_case`` (per axis), ``num_cases`` (cases with mesh structures), ``cases_without_structures`` (skipped),
   ``parent_configuration``, ``structures``. The file is checked through ``PlansManager`` before it is written
   (atomically).

nnU-Net glue (reads the raw labels and plans with nnU-Net's own classes).
"""
from __future__ import annotations

import json
import math
import os
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_topo import roi
from nnunet_topo.paths import read_json
from nnunet_topo.plans import derived_plans
from nnunet_topo.summary_io import to_builtin, write_json_atomic

__all__ = ["MeshPlansError", "RoiStatistics", "mesh_structure_labels", "roi_statistics", "roi_voxels",
           "coarsen_spacing", "median_shape_at_spacing", "find_planner_class", "plan_mesh_configuration",
           "mesh_configuration", "write_mesh_plans", "round_mm"]

SPACING_INCREASE_FACTOR = 1.03  # nnU-Net's 3d_lowres step (ExperimentPlanner.plan_experiment)
MAX_SPACING_FACTOR = 8.0  # never coarser than 8x the parent spacing on any axis
MAX_STEPS = 400  # a safety net; the 8x limit ends the search first (at most ~3 x log(8)/log(1.03) steps)
ALWAYS_STORED = ("data_identifier", "spacing", "patch_size", "batch_size", "median_image_size_in_voxels",
                 "architecture")


class MeshPlansError(ValueError):
    """The heart ROI cannot be planned (no mesh structures, no case has them, or no spacing fits)."""


@dataclass(frozen=True)
class RoiStatistics:
    """The heart ROI over the training cases, in nnU-Net's transposed axis order.

    Attributes:
        size_mm: ROI size (mm) = ``extent_mm_max + 2 * margin_mm`` per axis.
        margin_mm: margin (mm) added on each side.
        extent_mm_max: per-axis maximum over the cases of the mesh structures' box size (mm).
        largest_case: per axis, the case with that maximum (the first one on ties, cases sorted by name).
        num_cases: cases that contain at least one mesh-structure voxel (those that define the ROI).
        cases_without_structures: training cases without any mesh-structure voxel (skipped).
        structures: the mesh structure names (``topology.mesh_structures``, in file order).
        label_ids: the union of their label ids (sorted).
        extents_mm: case -> its box size (mm), for the cases with structures.
    """

    size_mm: Tuple[float, ...]
    margin_mm: float
    extent_mm_max: Tuple[float, ...]
    largest_case: Tuple[str, ...]
    num_cases: int
    cases_without_structures: Tuple[str, ...]
    structures: Tuple[str, ...]
    label_ids: Tuple[int, ...]
    extents_mm: Dict[str, Tuple[float, ...]]

    def as_json(self, parent_configuration: str) -> dict:
        """The ``mesh_roi`` entry of the mesh configuration."""
        return {"size_mm": [float(v) for v in self.size_mm], "margin_mm": float(self.margin_mm),
                "extent_mm_max": [float(v) for v in self.extent_mm_max],
                "largest_case": [str(c) for c in self.largest_case], "num_cases": int(self.num_cases),
                "cases_without_structures": [str(c) for c in self.cases_without_structures],
                "parent_configuration": str(parent_configuration), "structures": [str(s) for s in self.structures]}


def mesh_structure_labels(dataset_json: Mapping) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """``(mesh structure names, sorted union of their label ids)`` from dataset.json's ``topology`` block.

    Raises:
        MeshPlansError: no ``topology`` block or no ``mesh_structures`` in it (the message says what to add).
        TopologySpecError: an invalid ``topology`` block.
    """
    from nnunet_topo.topology_spec import parse_topology

    example = '"topology": {"mesh_structures": {"LV_epi": ["LV", "MYO"], "RV": ["RV"]}}'
    if "topology" not in dataset_json:
        raise MeshPlansError("dataset.json has no 'topology' block, so no mesh structures to plan the heart ROI for; "
                             f"add one with 'mesh_structures' (label names of your dataset), e.g. {example} "
                             "(documentation/topology_spec.md)")
    spec = parse_topology(dataset_json)
    if not spec.mesh_structures:
        raise MeshPlansError("dataset.json's 'topology' block has no 'mesh_structures'; add the closed structures "
                             f"the mesh head predicts, e.g. {example} (documentation/topology_spec.md)")
    names = tuple(spec.mesh_structures)
    ids = tuple(sorted({int(i) for s in spec.mesh_structures.values() for i in s.label_ids}))
    return names, ids


def roi_statistics(raw_dataset_folder: str, dataset_json: Mapping, plans: Mapping, margin_mm: float = 10.0,
                   show_progress: bool = False) -> RoiStatistics:
    """The heart ROI of the training labels of a raw nnU-Net dataset, one case in memory at a time.

    Args:
        raw_dataset_folder: ``$nnUNet_raw/DatasetXXX_Name``.
        dataset_json: its dataset.json content (``topology.mesh_structures`` names the structures).
        plans: an nnU-Net plans dict (``transpose_forward`` and ``image_reader_writer`` are used).
        margin_mm: margin added on each side of the largest extent, mm (>= 0).
        show_progress: a progress bar over the cases.

    Returns:
        :class:`RoiStatistics` (transposed axis order, mm).

    Raises:
        MeshPlansError: no mesh structures in dataset.json, no training case, or no case with any of them.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    margin_mm = float(margin_mm)
    if not math.isfinite(margin_mm) or margin_mm < 0:
        raise ValueError(f"margin_mm must be a finite number >= 0, got {margin_mm}")
    names, label_ids = mesh_structure_labels(dataset_json)
    pm = PlansManager(dict(plans))
    tf = [int(i) for i in pm.transpose_forward]
    reader = pm.image_reader_writer_class()
    cases = get_filenames_of_train_images_and_targets(raw_dataset_folder, deepcopy(dict(dataset_json)))
    if not cases:
        raise MeshPlansError(f"no training cases found in {raw_dataset_folder}")
    ids = sorted(cases)
    it = ids
    if show_progress:
        from tqdm import tqdm
        it = tqdm(ids, desc="heart ROI (raw labels)")
    extents: Dict[str, Tuple[float, ...]] = {}
    without: List[str] = []
    for case in it:
        seg, props = reader.read_seg(cases[case]["label"])  # (1, ...) and props["spacing"], nnU-Net's axis order
        seg_t = seg.transpose([0, *[i + 1 for i in tf]])  # as DefaultPreprocessor.run_case_npy
        spacing_t = [float(props["spacing"][i]) for i in tf]
        box = roi.structure_box(seg_t, label_ids)
        del seg, seg_t, props
        if box is None:
            without.append(case)
        else:
            extents[case] = roi.box_extent_mm(box, spacing_t)
    if not extents:
        raise MeshPlansError(f"none of the {len(ids)} training cases in {raw_dataset_folder} contains any voxel of "
                             f"the mesh structures {list(names)} (label ids {list(label_ids)}); check "
                             "topology.mesh_structures in dataset.json")
    with_ = sorted(extents)
    table = np.array([extents[c] for c in with_], dtype=np.float64)  # (cases, 3)
    arg = np.argmax(table, axis=0)  # first maximum per axis
    ext_max = tuple(float(v) for v in table.max(axis=0))
    return RoiStatistics(size_mm=tuple(e + 2 * margin_mm for e in ext_max), margin_mm=margin_mm,
                         extent_mm_max=ext_max, largest_case=tuple(with_[int(a)] for a in arg),
                         num_cases=len(with_), cases_without_structures=tuple(without), structures=names,
                         label_ids=label_ids, extents_mm=extents)


def roi_voxels(size_mm: Sequence[float], spacing: Sequence[float]) -> np.ndarray:
    """ROI voxels per axis at ``spacing``: ``ceil(size_mm / spacing)`` (1e-6 voxel tolerance for float noise)."""
    return np.array([int(math.ceil(s / p - 1e-6)) for s, p in zip(size_mm, spacing)], dtype=np.int64)


def coarsen_spacing(spacing: Sequence[float], factor: float = SPACING_INCREASE_FACTOR) -> np.ndarray:
    """One step of nnU-Net's 3d_lowres spacing search (``ExperimentPlanner.plan_experiment``): multiply the axes
    finer than half the coarsest one by ``factor`` while there are such axes, else all axes."""
    s = np.array(spacing, dtype=np.float64)
    fine = (s.max() / s) > 2
    if np.any(fine):
        s[fine] *= factor
    else:
        s *= factor
    return s


def median_shape_at_spacing(fingerprint: Mapping, spacing_transposed: Sequence[float],
                            transpose_forward: Sequence[int]) -> np.ndarray:
    """Median case shape (transposed order) after resampling to ``spacing_transposed``, from the fingerprint's
    ``spacings`` and ``shapes_after_crop`` (original order), as ``ExperimentPlanner.plan_experiment`` computes it."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    tf = [int(i) for i in transpose_forward]
    target = np.empty(len(tf), dtype=np.float64)
    target[tf] = np.asarray(spacing_transposed, dtype=np.float64)  # back to the original axis order
    shapes = [compute_new_shape(shp, sp, target) for sp, shp in
              zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    return np.median(shapes, 0)[tf]


def find_planner_class(name: str) -> type:
    """The experiment planner class named ``name`` (nnU-Net's own lookup); ``ExperimentPlanner`` with a printed note
    when it is not found."""
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      "nnunetv2.experiment_planning") if name else None
    if cls is None:
        print(f"note: experiment planner {name!r} (experiment_planner_used in the plans) not found in "
              "nnunetv2.experiment_planning; using ExperimentPlanner")
        cls = ExperimentPlanner
    return cls


def plan_mesh_configuration(planner: Any, parent_spacing: Sequence[float], roi_size_mm: Sequence[float],
                            data_identifier: str, transpose_forward: Sequence[int],
                            patch: Optional[Sequence[int]] = None, max_factor: float = MAX_SPACING_FACTOR,
                            max_steps: int = MAX_STEPS, verbose: bool = False) -> dict:
    """The planner's configuration dict at the finest spacing (from ``parent_spacing`` up) whose patch holds the ROI.

    Args:
        planner: an nnU-Net experiment planner instance (its ``get_plans_for_configuration`` and
            ``dataset_fingerprint`` are used).
        parent_spacing: the parent configuration's spacing (mm, transposed order): the finest spacing tried.
        roi_size_mm: ROI size (mm, transposed order).
        data_identifier: the new configuration's data identifier.
        transpose_forward: the plans' ``transpose_forward``.
        patch: largest accepted patch (voxels, transposed order), or None.
        max_factor: refuse beyond this multiple of the parent spacing on any axis.
        max_steps: refuse after this many coarsening steps.
        verbose: print each rejected spacing.

    Returns:
        The planner's dict (numpy values as the planner returns them); ``patch_size >= roi_voxels(roi_size_mm,
        spacing)`` on every axis, and ``<= patch`` when given.

    Raises:
        MeshPlansError: no spacing within ``max_factor`` (or ``max_steps``) fits; the message has the ROI (mm), the
            parent spacing and the patch.
    """
    parent = np.asarray(parent_spacing, dtype=np.float64)
    size = [float(v) for v in roi_size_mm]
    cap = None if patch is None else np.asarray([int(p) for p in patch], dtype=np.int64)
    num_training = float(planner.dataset_json["numTraining"])
    spacing = parent.copy()
    cache: dict = {}
    last = coarsest = None
    for _ in range(max_steps):
        if np.any(spacing > max_factor * parent * (1 + 1e-9)):
            break
        n = roi_voxels(size, spacing)
        coarsest = (spacing.copy(), n)
        if cap is None or np.all(n <= cap):
            median = median_shape_at_spacing(planner.dataset_fingerprint, spacing, transpose_forward)
            n_vox = float(np.prod(median, dtype=np.float64) * num_training)
            plan = planner.get_plans_for_configuration(spacing.copy(), n.copy(), data_identifier, n_vox, cache)
            ps = np.asarray(plan["patch_size"], dtype=np.int64)
            last = (spacing.copy(), n, ps)
            if np.all(ps >= n) and (cap is None or np.all(ps <= cap)):
                return plan
            if verbose:
                print(f"spacing {round_mm(spacing)}: ROI {n.tolist()} voxels, planned patch {ps.tolist()}: coarser")
        spacing = coarsen_spacing(spacing)
    what = f"the patch limit --patch {cap.tolist()}" if cap is not None else "the planned patch"
    if last is not None:
        tried = (f"; at spacing {round_mm(last[0])} mm the ROI is {last[1].tolist()} voxels and the planned patch "
                 f"{last[2].tolist()}")
    else:
        tried = f"; at spacing {round_mm(coarsest[0])} mm the ROI is still {coarsest[1].tolist()} voxels"
    raise MeshPlansError(
        f"the heart ROI of {round_mm(size)} mm does not fit {what} at any spacing up to {max_factor:g}x the parent "
        f"spacing {round_mm(parent)} mm{tried}. Lower --margin_mm, allow a larger --patch, or raise "
        "--gpu_memory_target")


def round_mm(v: Sequence[float]) -> List[float]:
    """Lengths in mm rounded to 3 decimals (µm), for messages."""
    return [round(float(x), 3) for x in v]


def mesh_configuration(planned: Mapping, parent_resolved: Mapping, parent: str, mesh_roi: Mapping) -> dict:
    """The stored mesh configuration: ``inherits_from`` the parent, the planner's keys that differ from the parent's
    resolved configuration (always those of ``ALWAYS_STORED``), cascade links cleared, and ``mesh_roi``."""
    new, old = to_builtin(planned), to_builtin(parent_resolved)
    conf: Dict[str, Any] = {"inherits_from": parent}
    for k, v in new.items():
        if k in ALWAYS_STORED or k not in old or old[k] != v:
            conf[k] = v
    for k in ("next_stage", "previous_stage"):
        if old.get(k) is not None:
            conf[k] = None
    conf["mesh_roi"] = to_builtin(mesh_roi)
    return conf


def write_mesh_plans(dataset: str, configuration: str = "3d_fullres", plans_identifier: str = "nnUNetPlans",
                     output_identifier: str = "nnUNetPlansMesh", name: str = "3d_mesh",
                     patch: Optional[Sequence[int]] = None, margin_mm: float = 10.0,
                     gpu_memory_target: Optional[float] = None, overwrite: bool = False,
                     show_progress: bool = False) -> str:
    """Write ``$nnUNet_preprocessed/DatasetXXX/<output_identifier>.json``: the input plans plus the mesh
    configuration ``name``; returns its path. Never modifies the input plans.

    Args:
        dataset: dataset ID or name.
        configuration: the parent configuration (its spacing is the finest tried; ``inherits_from``).
        plans_identifier: the input plans (``-p``).
        output_identifier: the new plans (must differ from the input).
        name: the new configuration's name (must not exist in the input plans).
        patch: largest accepted patch (voxels, transposed order), or None.
        margin_mm: ROI margin per side (mm).
        gpu_memory_target: GPU memory target (GB) for the planner; None keeps the planner class default.
        overwrite: replace an existing output file.
        show_progress: progress bar over the cases and a line per rejected spacing.

    Raises:
        ValueError (MeshPlansError, TopologySpecError), FileNotFoundError, FileExistsError, RuntimeError: with the
        fix in the message.
    """
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if patch is not None:
        patch = [int(p) for p in patch]
        if len(patch) != 3 or any(p < 1 for p in patch):
            raise ValueError(f"--patch needs 3 positive sizes (Z Y X, transposed order), got {patch}")
    if gpu_memory_target is not None and not (float(gpu_memory_target) > 0):
        raise ValueError(f"--gpu_memory_target must be > 0 GB, got {gpu_memory_target}")
    dataset_name = maybe_convert_to_dataset_name(dataset)
    src, dst, plans = derived_plans(dataset, plans_identifier, output_identifier, overwrite,
                                    f"run nnUNetv2_plan_and_preprocess -d {dataset} --no_pp, or "
                                    "nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment, first")
    if configuration not in plans["configurations"]:
        raise ValueError(f"configuration {configuration!r} not in {src}; it has {sorted(plans['configurations'])}")
    if name in plans["configurations"]:
        raise ValueError(f"configuration {name!r} already exists in {src}; choose another --name")
    parent_resolved = PlansManager(deepcopy(plans)).get_configuration(configuration).configuration
    if len(parent_resolved.get("patch_size", [])) != 3:
        raise ValueError(f"configuration {configuration!r} is not 3d; the mesh configuration needs a 3d parent "
                         "(e.g. -c 3d_fullres)")
    raw_folder = os.path.join(os.fspath(nnUNet_raw), dataset_name)
    dj_path = os.path.join(raw_folder, "dataset.json")
    if not os.path.isfile(dj_path):
        raise FileNotFoundError(f"raw dataset.json not found: {dj_path} (the heart ROI is measured on the raw "
                                "training labels; set nnUNet_raw)")
    dataset_json = read_json(dj_path, "dataset.json")

    stats = roi_statistics(raw_folder, dataset_json, plans, margin_mm, show_progress)

    cls = find_planner_class(plans.get("experiment_planner_used", ""))
    kwargs: Dict[str, Any] = {"plans_name": output_identifier,
                              "preprocessor_name": parent_resolved.get("preprocessor_name", "DefaultPreprocessor")}
    if gpu_memory_target is not None:
        kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target)
    planner = cls(dataset_name, **kwargs)
    planned = plan_mesh_configuration(planner, parent_resolved["spacing"], stats.size_mm,
                                      planner.generate_data_identifier(name), plans["transpose_forward"], patch,
                                      verbose=show_progress)

    conf = mesh_configuration(planned, parent_resolved, configuration, stats.as_json(configuration))
    new_plans = deepcopy(plans)
    new_plans["plans_name"] = output_identifier
    new_plans["configurations"][name] = conf
    new_plans = to_builtin(new_plans)
    cm = PlansManager(json.loads(json.dumps(new_plans))).get_configuration(name)  # what nnU-Net will read back
    want = to_builtin(planned)
    if list(cm.patch_size) != want["patch_size"] or list(cm.spacing) != want["spacing"]:
        raise RuntimeError(f"the written configuration {name!r} resolves to patch {cm.patch_size} and spacing "
                           f"{cm.spacing}, not the planned {want['patch_size']} / {want['spacing']}")
    write_json_atomic(dst, new_plans, indent=4)
    return dst
