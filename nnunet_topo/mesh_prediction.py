"""Mesh prediction with a trained mesh model on the heart ROI: one surface file per structure, in patient coordinates.

DESIGN §7 ("Where the mesh fits: the heart ROI", "Export"). A mesh describes a whole structure, and the head was
trained on patch-size windows centred on the mesh structures, so at inference it sees the same window. Per case,
:func:`predict_meshes_folder`

1. runs nnU-Net's sliding-window prediction of the whole preprocessed case with the same model
   (``nnUNetPredictor.predict_logits_from_preprocessed_data``, ``nnUNetv2_predict``'s default settings) and writes
   the segmentation exactly as ``nnUNetv2_predict`` does (``export_prediction_from_logits``, same file name);
2. takes the label map in the preprocessed frame (argmax of those logits: nnU-Net's label before resampling) and the
   box of the mesh structures' labels, the largest connected component of each (:func:`mesh_roi`,
   :func:`nnunet_topo.roi.largest_component_box`);
3. cuts the patch-size window centred on that box (:func:`nnunet_topo.roi.centered_window_start`,
   :func:`nnunet_topo.roi.crop_to_window`, filled with 0 outside the case as nnU-Net pads);
4. runs network + head once on that crop (``forward_with_meshes``, :func:`predict_meshes_in_roi`) and maps the
   vertices back to world coordinates;
5. with several folds (``-f 0 1 2 3 4``; the folds must share the templates, :func:`check_fold_templates`): steps 1-3
   use nnU-Net's ensemble (the folds' logits averaged), step 4 runs once per fold on the same crop, and each mesh is
   the per-vertex mean of the folds' world vertices with the per-vertex spread in mm (:func:`ensemble_meshes`,
   ``SPREAD_DEFINITION``), written as VTK point data ``spread_mm`` (``documentation/mesh_output.md``).

A case whose predicted mesh structures span more voxels than the patch (:class:`RoiDoesNotFitError`) or that has
none of them (:class:`EmptyPredictionError`) gets no mesh and a clear message; its segmentation is still written.
A mesh is never fitted to a rescaled view of the case.

Frames (see ``documentation/meshes.md`` and ``documentation/mesh_output.md``):

* normalised crop frame: ``(x, y, z)`` in ``[-1, 1]`` of the ``(1, C, *patch_size)`` network input (the
  ``grid_sample`` frame, ``align_corners=True``; what the head predicts)
  -> crop index ``(z, y, x)`` (:func:`nnunet_topo.frames.normalized_to_index` with the patch size)
  -> preprocessed index (``+ roi.start``; the window may reach outside the array, the map is the same)
  -> original image index (:func:`preprocessed_to_original_index`: undo resampling, add nnU-Net's crop offset
  ``bbox_used_for_cropping``, undo ``transpose_forward``)
  -> world ``(x, y, z)`` mm, ITK/LPS (:func:`nnunet_topo.frames.index_to_world` with
  :meth:`nnunet_topo.frames.ImageGeometry.from_nnunet_properties`).

nnU-Net's preprocessing order is transpose -> crop -> resample (``DefaultPreprocessor.run_case_npy``), so the
crop bounding box, ``shape_after_cropping_and_before_resampling`` and the ROI (start, size, box) are in the
*transposed* axis order.

nnU-Net glue (``nnunetv2`` is imported inside the functions that need it); the console script
``nnUNetv2_topo_predict_meshes`` is :mod:`nnunet_topo.cli.predict_meshes`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import trimesh
from torch import nn

from nnunet_topo.frames import ImageGeometry, index_to_world, normalized_to_index, preprocessed_index_to_original
from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS, export_mesh
from nnunet_topo.roi import Box, RoiError, box_extent_mm, centered_window_start, check_box_fits, crop_to_window, \
    largest_component_box

__all__ = [
    "MeshPredictionError",
    "NoMeshError",
    "RoiDoesNotFitError",
    "EmptyPredictionError",
    "MeshRoi",
    "preprocessed_shape",
    "preprocessed_to_original_index",
    "check_mesh_network",
    "mesh_roi",
    "predict_meshes_in_roi",
    "predict_meshes_case",
    "check_fold_templates",
    "ensemble_meshes",
    "SPREAD_NAME",
    "predict_meshes_folder",
]

NO_MESH_HEAD = "this model has no mesh head; train with nnUNetTrainerMesh/TPM/MIE"
ROI_FRAME = ("preprocessed voxel index (z, y, x) after nnU-Net's transpose_forward, crop and resampling; "
             "window [start, start + size), box [lo, hi) of the predicted mesh structures")


class MeshPredictionError(ValueError):
    """Bad input to mesh prediction (folders, model without mesh head, broken meshes)."""


class NoMeshError(MeshPredictionError):
    """This case gets no mesh (its prediction does not allow one); :func:`predict_meshes_folder` records the message
    in ``meshes.json`` and goes on with the other cases. ``box`` is the predicted structures' box (or None)."""

    def __init__(self, message: str, box: Optional[Box] = None) -> None:
        super().__init__(message)
        self.box = box


class RoiDoesNotFitError(NoMeshError):
    """The predicted mesh structures of a case span more voxels than the patch the head sees."""


class EmptyPredictionError(NoMeshError):
    """The predicted segmentation of a case contains none of the mesh structures' labels."""


@dataclass(frozen=True)
class MeshRoi:
    """The patch-size window the head runs on, in the preprocessed frame (transposed array order, voxels).

    Attributes:
        start: first voxel of the window per axis (may be negative or reach past the array: zero padding).
        size: the window size = the configuration's patch size.
        box: ``(lo, hi)`` half-open box of the predicted mesh structures (inside the window).
    """

    start: Tuple[int, ...]
    size: Tuple[int, ...]
    box: Box
    #: voxels of the mesh-structure labels outside each structure's largest connected component (not in the box)
    ignored_voxels: int = 0

    def to_dict(self) -> dict:
        """``{"start": [...], "size": [...], "box": [lo, hi], "ignored_voxels": n}`` (``roi`` of ``meshes.json``)."""
        return {"start": [int(s) for s in self.start], "size": [int(s) for s in self.size],
                "box": [[int(v) for v in self.box[0]], [int(v) for v in self.box[1]]],
                "ignored_voxels": int(self.ignored_voxels)}


# ----------------------------------------------------------------------------------------------------
# preprocessed (network) frame -> original image index
# ----------------------------------------------------------------------------------------------------

def _target_spacing(properties: Mapping[str, Any], plans_manager, configuration_manager) -> Tuple[list, list]:
    """``(original spacing, target spacing)``, both in the transposed axis order (as nnU-Net's preprocessor)."""
    tf = list(plans_manager.transpose_forward)
    original = [float(properties["spacing"][i]) for i in tf]
    target = [float(s) for s in configuration_manager.spacing]
    if len(target) < len(original):  # 2d configurations keep the spacing between slices (nnU-Net's convention)
        target = [original[0]] + target
    return original, target


def preprocessed_shape(properties: Mapping[str, Any], plans_manager, configuration_manager) -> Tuple[int, ...]:
    """Spatial shape of nnU-Net's preprocessed array for these properties (``compute_new_shape``, transposed order)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    original, target = _target_spacing(properties, plans_manager, configuration_manager)
    shape = properties["shape_after_cropping_and_before_resampling"]
    return tuple(int(s) for s in compute_new_shape(shape, original, target))


def preprocessed_to_original_index(points_zyx: np.ndarray, properties: Mapping[str, Any], plans_manager,
                                   configuration_manager,
                                   preprocessed_shape_zyx: Optional[Sequence[int]] = None) -> np.ndarray:
    """Continuous indices of nnU-Net's preprocessed array -> continuous indices of the original image array
    (:func:`nnunet_topo.frames.preprocessed_index_to_original`, which undoes nnU-Net's transpose, crop and
    resampling; ``skimage.transform.resize`` and the ``map_coordinates`` path for anisotropic data both use its
    ``align_corners=False`` convention), read from the case's properties and the model's plans.

    Args:
        points_zyx: ``(N, 3)`` continuous indices into the preprocessed (unpadded) array, array order.
        properties: nnU-Net's data properties of the case (from ``preprocessor.run_case``): ``spacing``,
            ``shape_after_cropping_and_before_resampling``, ``bbox_used_for_cropping``.
        plans_manager, configuration_manager: nnU-Net's managers of the model.
        preprocessed_shape_zyx: the preprocessed spatial shape ``n_new``; default: recomputed as nnU-Net does
            (:func:`preprocessed_shape`). Pass ``data.shape[1:]`` when you have the array.

    Returns:
        ``(N, 3)`` float64 continuous indices ``(z, y, x)`` into the original image array (the array that
        nnU-Net's reader returns, whose geometry is ``ImageGeometry.from_nnunet_properties(properties)``).
    """
    p = np.asarray(points_zyx, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points_zyx must be (N, 3), got shape {p.shape}")
    n_new = (preprocessed_shape_zyx if preprocessed_shape_zyx is not None else
             preprocessed_shape(properties, plans_manager, configuration_manager))
    return preprocessed_index_to_original(p, properties["shape_after_cropping_and_before_resampling"], n_new,
                                          [b[0] for b in properties["bbox_used_for_cropping"]],
                                          plans_manager.transpose_forward)


# ----------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------

def check_mesh_network(network: nn.Module) -> nn.Module:
    """The :class:`MeshAugmentedNetwork` (``torch.compile`` unwrapped), or :class:`MeshPredictionError`."""
    from nnunet_topo.mesh_head.network import MeshAugmentedNetwork, unwrap_network

    net = unwrap_network(network)
    if not isinstance(net, MeshAugmentedNetwork):
        raise MeshPredictionError(f"{NO_MESH_HEAD} (the network is a {type(net).__name__}, not a "
                                  "MeshAugmentedNetwork)")
    return net


def _structure_names(net: nn.Module) -> List[str]:
    return [t.name for t in net.templates()]


def _check_structure_names(structures: Mapping[str, Sequence[int]], names: Sequence[str], where: str) -> None:
    if set(structures) != set(names):
        raise MeshPredictionError(
            f"{where}: the mesh structures {list(structures)} are not the structures of the model's templates "
            f"{list(names)}; pass the dataset's topology.mesh_structures of the dataset the model was trained on")


def _fmt_mm(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "] mm"


def mesh_roi(segmentation: np.ndarray, structures: Mapping[str, Sequence[int]], patch_size: Sequence[int],
             spacing: Optional[Sequence[float]] = None, case: str = "case") -> MeshRoi:
    """The patch-size window centred on the box of the mesh structures in ``segmentation``: the union of the boxes of
    each structure's largest connected component (:func:`nnunet_topo.roi.largest_component_box`; a mesh structure is
    one closed surface, so other islands of its labels are spurious for the ROI; their voxel count is recorded).

    Args:
        segmentation: ``(Z, Y, X)`` (or ``(1, Z, Y, X)``) integer label map in nnU-Net's preprocessed frame (the
            predicted labels before resampling; transposed order).
        structures: ``{mesh structure name: label ids}``; the box is that of the voxels with any of the ids.
        patch_size: the configuration's patch size (voxels, same axis order).
        spacing: the configuration's spacing (mm, same order), only for the sizes in mm of the error message.
        case: case name for messages.

    Returns:
        :class:`MeshRoi` with ``start = roi.centered_window_start(box, patch_size)``.

    Raises:
        EmptyPredictionError: none of the labels is predicted.
        RoiDoesNotFitError: the box spans more voxels than ``patch_size`` on some axis (message: case, box size in
            voxels and mm, patch in voxels and mm, what to do).
    """
    seg = np.asarray(segmentation)
    if seg.ndim == 4 and seg.shape[0] == 1:
        seg = seg[0]
    patch = tuple(int(p) for p in patch_size)
    if seg.ndim != len(patch):
        raise MeshPredictionError(f"case {case}: segmentation of shape {seg.shape} does not match the "
                                  f"{len(patch)}D patch {list(patch)}")
    ids = sorted({int(i) for v in structures.values() for i in v})
    if not ids:
        raise MeshPredictionError(f"case {case}: no label ids for the mesh structures {list(structures)}")
    desc = ", ".join(f"{n}: labels {sorted(int(i) for i in v)}" for n, v in structures.items())
    box, ignored = largest_component_box(seg, structures)
    if box is None:
        raise EmptyPredictionError(
            f"case {case}: empty prediction: the predicted segmentation contains none of the mesh structures' labels "
            f"({desc}), so there is no heart ROI to run the mesh head on; no mesh is written")
    mm = ""
    if spacing is not None:
        patch_mm = [p * float(s) for p, s in zip(patch, spacing)]
        mm = (f" (at the configuration spacing {[round(float(s), 4) for s in spacing]}: the box spans "
              f"{_fmt_mm(box_extent_mm(box, spacing))}, the patch {_fmt_mm(patch_mm)})")
    try:
        check_box_fits(box, patch, case, what="the predicted mesh structures",
                       advice=f"Box {list(box[0])}..{list(box[1])} in the preprocessed frame{mm}. The mesh head "
                              "sees one patch, so no mesh is written rather than a rescaled one. Either the "
                              "prediction has spurious voxels of these labels connected to the heart (check the "
                              "segmentation; separate islands are already ignored), or the heart ROI of this case is larger than the model's: plan a mesh "
                              "configuration with a larger patch or margin (nnUNetv2_topo_plan_mesh) and retrain")
    except RoiError as e:
        raise RoiDoesNotFitError(str(e), box) from e
    return MeshRoi(centered_window_start(box, patch), patch, box, ignored)


def predict_meshes_in_roi(network: nn.Module, data: np.ndarray, roi: MeshRoi, properties: Mapping[str, Any],
                          plans_manager, configuration_manager, device: str | torch.device = "cpu",
                          case: str = "case") -> Dict[str, trimesh.Trimesh]:
    """Run network + head once on the ROI crop of one preprocessed case and return world meshes.

    Args:
        network: a :class:`MeshAugmentedNetwork` (weights loaded; put in eval mode here).
        data: ``(C, Z, Y, X)`` preprocessed image (``preprocessor.run_case``), transposed order.
        roi: the window (:func:`mesh_roi`); ``roi.size`` must be the configuration's patch size.
        properties: nnU-Net data properties of the case (with ``sitk_stuff`` or ``nibabel_stuff`` for the geometry).
        plans_manager, configuration_manager: the model's managers (patch size, stride, transpose, spacing).
        device: where to run the network.
        case: case name for error messages.

    Returns:
        ``{structure name: trimesh.Trimesh}`` in world coordinates ``(x, y, z)`` mm, faces wound outward, in the
        order of the network's templates.

    Raises:
        MeshPredictionError: no mesh head; a patch that is not a multiple of the network's stride; a mesh with
            NaN/inf vertices or zero volume (names case and structure).
    """
    net = check_mesh_network(network)
    data = np.asarray(data)
    if data.ndim != 4:
        raise MeshPredictionError(f"case {case}: expected preprocessed data (C, Z, Y, X), got shape {data.shape}")
    patch = tuple(int(p) for p in configuration_manager.patch_size)
    if tuple(int(s) for s in roi.size) != patch:
        raise MeshPredictionError(f"case {case}: the ROI size {list(roi.size)} is not the patch size {list(patch)}")
    strides = np.prod(np.array(configuration_manager.pool_op_kernel_sizes), axis=0).astype(int).tolist()
    if any(p % s for p, s in zip(patch, strides)):
        raise MeshPredictionError(f"the patch size {list(patch)} is not a multiple of the network's total stride "
                                  f"{strides}; check the plans")
    geometry = ImageGeometry.from_nnunet_properties(properties)
    shape = tuple(int(s) for s in data.shape[1:])
    crop = crop_to_window(data, roi.start, patch, fill=0)  # nnU-Net pads with 0 (data loader, sliding window)
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None].to(dev)
    net.to(dev).eval()
    with torch.no_grad():
        _, verts = net.forward_with_meshes(x)
    names = _structure_names(net)
    if len(verts) != len(names):
        raise MeshPredictionError(f"case {case}: the mesh head returned {len(verts)} meshes for {len(names)} "
                                  "templates")
    start = np.asarray(roi.start, dtype=np.float64)
    out: Dict[str, trimesh.Trimesh] = {}
    for s, (name, v) in enumerate(zip(names, verts)):
        v = v.detach().double().cpu().numpy()
        if v.ndim == 3:
            v = v[0]
        if not np.all(np.isfinite(v)):
            raise MeshPredictionError(f"case {case}, structure {name!r}: the mesh head predicted NaN/inf vertices")
        idx = normalized_to_index(v, patch) + start  # crop index -> preprocessed index
        orig = preprocessed_to_original_index(idx, properties, plans_manager, configuration_manager, shape)
        world = index_to_world(orig, geometry)
        faces = net.mesh_head.template_faces(s).detach().cpu().numpy().astype(np.int64)
        mesh = trimesh.Trimesh(world, faces, process=False)
        if not np.all(np.isfinite(mesh.vertices)):
            raise MeshPredictionError(f"case {case}, structure {name!r}: non-finite world coordinates (check the "
                                      "image geometry)")
        vol = float(mesh.volume)
        if not math.isfinite(vol) or vol == 0:
            raise MeshPredictionError(f"case {case}, structure {name!r}: the predicted mesh encloses no volume "
                                      f"(signed volume {vol})")
        if vol < 0:  # the frame maps may reverse orientation (axis reversal, transpose, improper directions)
            mesh = trimesh.Trimesh(mesh.vertices, faces[:, ::-1].copy(), process=False)
        out[name] = mesh
    return out


def predict_meshes_case(network: nn.Module, data: np.ndarray, properties: Mapping[str, Any], plans_manager,
                        configuration_manager, segmentation: Optional[np.ndarray] = None,
                        structures: Optional[Mapping[str, Sequence[int]]] = None,
                        device: str | torch.device = "cpu", case: str = "case") -> Dict[str, trimesh.Trimesh]:
    """Meshes of one preprocessed case: the heart ROI of ``segmentation`` (:func:`mesh_roi`), then network + head
    once on that crop (:func:`predict_meshes_in_roi`).

    Args:
        network: a :class:`MeshAugmentedNetwork` (weights loaded).
        data: ``(C, Z, Y, X)`` preprocessed image (``preprocessor.run_case``), transposed order.
        properties: its nnU-Net data properties.
        plans_manager, configuration_manager: the model's managers.
        segmentation: ``(Z, Y, X)`` integer label map of the case in the same preprocessed frame (the prediction:
            argmax of nnU-Net's logits). Required.
        structures: ``{mesh structure name: label ids}`` for the network's templates (any order; the folder tool
            reads it from the dataset's ``topology.mesh_structures``). Required.
        device: where to run the network.
        case: case name for messages.

    Returns:
        ``{structure name: trimesh.Trimesh}`` in world coordinates ``(x, y, z)`` mm, faces wound outward.

    Raises:
        TypeError: ``segmentation`` or ``structures`` missing.
        EmptyPredictionError, RoiDoesNotFitError: the case gets no mesh (both are :class:`NoMeshError`).
        MeshPredictionError: no mesh head; structures that are not the templates'; shapes that do not match; broken
            meshes.
    """
    net = check_mesh_network(network)
    if segmentation is None:
        raise TypeError("predict_meshes_case needs segmentation=, the predicted (Z, Y, X) label map of the case in the "
                        "preprocessed frame: the mesh head runs on the patch-size window centred on the predicted mesh "
                        "structures (DESIGN §7), never on the whole case")
    if structures is None:
        raise TypeError("predict_meshes_case needs structures={mesh structure name: label ids}, e.g. "
                        "{n: s.label_ids for n, s in nnunet_topo.topology_spec.parse_topology(dataset_json)"
                        ".mesh_structures.items()}")
    _check_structure_names(structures, _structure_names(net), f"case {case}")
    seg = np.asarray(segmentation)
    seg_shape = seg.shape[1:] if seg.ndim == 4 and seg.shape[0] == 1 else seg.shape
    if np.ndim(data) != 4 or tuple(seg_shape) != tuple(np.shape(data)[1:]):
        raise MeshPredictionError(f"case {case}: segmentation of shape {seg.shape} does not match the preprocessed "
                                  f"data (C, Z, Y, X) of shape {np.shape(data)}")
    roi = mesh_roi(seg, structures, configuration_manager.patch_size, configuration_manager.spacing, case=case)
    return predict_meshes_in_roi(network, data, roi, properties, plans_manager, configuration_manager, device=device,
                                 case=case)


# ----------------------------------------------------------------------------------------------------
# fold ensembles
# ----------------------------------------------------------------------------------------------------

SPREAD_NAME = "spread_mm"
SPREAD_DEFINITION = ("per vertex v: sqrt(mean over the K folds of |x_k(v) - mean_k x_k(v)|^2), x_k(v) the world "
                     "position (mm) of template vertex v predicted by fold k; the RMS distance of the folds' vertices "
                     "to the ensemble vertex")


def mesh_model_from_checkpoints(predictor, model_folder: str, folds: Sequence[Any], checkpoint: str
                                ) -> Tuple[nn.Module, List[dict]]:
    """``(network + head, [per-fold state dict of it])`` for a model folder of a mesh trainer.

    ``predictor`` (initialised from the model folder) holds nnU-Net's network and each fold's ``network_weights``;
    the head of each fold is read from its checkpoint's ``HEAD_STATE_KEY`` entry (the head rides beside nnU-Net's
    network, ``mesh_head/network.py``) and composed with the network as a :class:`MeshAugmentedNetwork` whose state
    dict is ``network.<nnU-Net keys>`` + ``mesh_head.<head keys>``.

    Raises:
        MeshPredictionError: a checkpoint without a mesh head, a head of an older format (models of nnunet-topo
            before the passenger head are refused, never given other meshes), or head settings other than the
            model folder's plans.json.
    """
    from nnunet_topo.mesh_checkpoint import head_entry
    from nnunet_topo.mesh_head.network import HEAD_KEY, HEAD_STATE_KEY, mesh_network_from_configuration

    conf = predictor.configuration_manager.configuration
    params = []
    for fold, net_weights in zip(folds, predictor.list_of_parameters):
        path = os.path.join(model_folder, f"fold_{fold}", checkpoint)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if HEAD_STATE_KEY not in ckpt and not any(k.startswith("mesh_head.") for k in ckpt.get("network_weights", {})):
            raise MeshPredictionError(f"fold {fold}: {NO_MESH_HEAD} (its checkpoint has no mesh head)")
        try:  # the trainers' own check: older format refused, same settings as the model folder's plans.json
            entry = head_entry(ckpt, path, conf.get(HEAD_KEY), required=True)
        except RuntimeError as e:
            raise MeshPredictionError(str(e)) from e
        params.append({**{f"network.{k}": v for k, v in net_weights.items()},
                       **{f"mesh_head.{k}": v for k, v in entry["state_dict"].items()}})
    try:  # composed with nnU-Net's network itself, not its torch.compile wrapper (nnUNet_compile=1): the one forward
        # per case that makes the meshes runs eager, nnU-Net's sliding window its compiled network (same weights)
        network = mesh_network_from_configuration(predictor.network, conf)
    except RuntimeError as e:
        raise MeshPredictionError(f"{NO_MESH_HEAD} ({e})") from e
    return network, params


def _mesh_head_prefix(state_dict: Mapping[str, Any]) -> Optional[str]:
    keys = [k for k in state_dict if k.endswith("mesh_head._extra_state")]
    return keys[0][: -len("_extra_state")] if len(keys) == 1 else None


def check_fold_templates(list_of_parameters: Sequence[Mapping[str, Any]], folds: Sequence[Any]) -> None:
    """Refuse a fold ensemble whose checkpoints carry different mesh templates.

    Vertex ``v`` of one structure is averaged over the folds, which is meaningful only if every fold deforms the
    same template (same names, genera, faces and template vertices; the templates are buffers of each checkpoint's
    state dict, ``mesh_head.template_vertices_<s>`` / ``template_faces_<s>``). Identical ``plans.json`` means
    identical templates, but a checkpoint copied from another run may differ.

    Raises:
        MeshPredictionError: a checkpoint without mesh head, or templates that differ (names the folds, the
            structure and what differs, and what to do).
    """
    from nnunet_topo.mesh_head.head import MeshHead

    ref = None
    for fold, params in zip(folds, list_of_parameters):
        prefix = _mesh_head_prefix(params)
        if prefix is None:
            raise MeshPredictionError(f"fold {fold}: {NO_MESH_HEAD} (its checkpoint has no mesh head weights)")
        templates = MeshHead.templates_from_state_dict(params, prefix)
        if ref is None:
            ref = (fold, templates)
            continue
        f0, t0 = ref
        why = None
        if [t.name for t in templates] != [t.name for t in t0]:
            why = f"structures {[t.name for t in t0]} vs {[t.name for t in templates]}"
        else:
            for a, b in zip(t0, templates):
                if a.genus != b.genus:
                    why = f"structure {a.name!r}: genus {a.genus} vs {b.genus}"
                elif a.faces.shape != b.faces.shape or not np.array_equal(a.faces, b.faces):
                    why = f"structure {a.name!r}: faces differ ({len(a.faces)} vs {len(b.faces)} triangles)"
                elif a.vertices.shape != b.vertices.shape or not np.allclose(a.vertices, b.vertices, rtol=0,
                                                                                atol=1e-6):
                    why = f"structure {a.name!r}: template vertices differ"
                if why:
                    break
        if why:
            raise MeshPredictionError(
                f"folds {f0} and {fold} have different mesh templates ({why}); a fold ensemble averages vertex by "
                "vertex and needs the same templates in every fold. Use folds trained with the same plans.json "
                "(same nnUNetv2_topo_plan_mesh run), or predict with one fold (-f)")


def ensemble_meshes(per_fold: Sequence[Mapping[str, trimesh.Trimesh]], case: str = "case"
                    ) -> Tuple[Dict[str, trimesh.Trimesh], Dict[str, np.ndarray]]:
    """Per-vertex mean and spread of the folds' world meshes of one case (same template, so vertex ``v`` corresponds).

    Args:
        per_fold: K >= 1 dicts ``{structure: mesh}`` (world mm), one per fold, e.g. from :func:`predict_meshes_in_roi`
            with each fold's weights on the same ROI; the same structures and vertex counts in each.
        case: case name for messages.

    Returns:
        ``(meshes, spread)``: ``meshes[s]`` has the mean vertices ``(V, 3)`` (mm) and the first fold's faces, wound
        outward (flipped if the mean mesh's signed volume is negative); ``spread[s]`` is ``(V,)`` mm,
        ``sqrt(mean_k |x_k - mean|^2)`` (population RMS, 0 for K = 1).

    Raises:
        MeshPredictionError: no folds, different structures or vertex counts, a mean mesh with no volume.
    """
    if not per_fold:
        raise MeshPredictionError("ensemble_meshes needs at least one fold's meshes")
    names = list(per_fold[0])
    meshes: Dict[str, trimesh.Trimesh] = {}
    spread: Dict[str, np.ndarray] = {}
    for name in names:
        if any(list(m) != names for m in per_fold):
            raise MeshPredictionError(f"case {case}: the folds predicted different structures")
        stack = np.stack([np.asarray(m[name].vertices, np.float64) for m in per_fold
                          if len(m[name].vertices) == len(per_fold[0][name].vertices)])
        if len(stack) != len(per_fold):
            raise MeshPredictionError(f"case {case}, structure {name!r}: the folds' meshes have different vertex "
                                      "counts (different templates)")
        mean = stack.mean(0)
        spread[name] = np.sqrt(((stack - mean) ** 2).sum(-1).mean(0))
        faces = np.asarray(per_fold[0][name].faces, np.int64)
        mesh = trimesh.Trimesh(mean, faces, process=False)
        vol = float(mesh.volume)
        if not math.isfinite(vol) or vol == 0:
            raise MeshPredictionError(f"case {case}, structure {name!r}: the fold-mean mesh encloses no volume")
        if vol < 0:
            mesh = trimesh.Trimesh(mean, faces[:, ::-1].copy(), process=False)
        meshes[name] = mesh
    return meshes, spread


# ----------------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------------

def _check_format(file_format: str) -> str:
    ext = file_format if file_format.startswith(".") else "." + file_format
    ext = ext.lower()
    if ext not in SUPPORTED_MESH_EXTENSIONS:
        raise MeshPredictionError(f"unknown mesh format {file_format!r}; choose one of {SUPPORTED_MESH_EXTENSIONS}")
    return ext


def _mesh_structures_of(dataset_json: Mapping, names: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``{name: label ids}`` of the dataset's ``topology.mesh_structures``, in the order of the templates ``names``."""
    from nnunet_topo.topology_spec import TopologySpecError, parse_topology

    try:
        mesh = parse_topology(dataset_json).mesh_structures
    except TopologySpecError as e:
        raise MeshPredictionError(f"the model's dataset.json: {e}") from e
    if set(mesh) != set(names):
        raise MeshPredictionError(
            f"the model's templates are for the mesh structures {list(names)}, but its dataset.json's "
            f"topology.mesh_structures are {list(mesh)}; the model folder's dataset.json must be the one it was "
            "trained with")
    return {n: tuple(int(i) for i in mesh[n].label_ids) for n in names}


def predict_meshes_folder(model_folder: str, input_folder: str, output_folder: str,
                          folds: Optional[Sequence[Any]] = None, checkpoint: str = "checkpoint_final.pth",
                          file_format: str = ".vtk", device: str = "cuda", overwrite: bool = False,
                          show_progress: bool = True, roi_from: Optional[str] = None) -> dict:
    """Segment and mesh every case of ``input_folder`` (nnU-Net raw images, ``CASE_0000.nii.gz``...).

    ``roi_from``: a folder of label maps ``CASE<file_ending>`` on the images' grids (e.g. corrected segmentations)
    from which the ROI is taken instead of from the model's own segmentation (which is still written); the network
    and mesh head run on the image as always. Each label map goes through nnU-Net's preprocessing with its image
    (``preprocessor.run_case(images, label)``), so it lands in the same preprocessed frame; a missing file is an
    error before any work.

    ``folds``: one fold, several (an ensemble, as ``nnUNetv2_predict -f 0 1 2 3 4``), ``"all"``, or None for every
    ``fold_N`` folder with ``checkpoint`` (:func:`nnunet_topo.model_folder.resolve_folds`). With several folds the
    segmentation is nnU-Net's ensemble (the folds' logits averaged by ``predict_logits_from_preprocessed_data``), the
    ROI is that of the ensemble segmentation, every fold's network + head runs on that same ROI crop, and each mesh
    is the per-vertex mean of the folds' world vertices (:func:`ensemble_meshes`; the folds must share the templates,
    :func:`check_fold_templates`) with the per-vertex spread (``SPREAD_DEFINITION``, mm) written as point data
    ``spread_mm`` into ``.vtk``/``.vtp`` files, or as ``CASE_<structure>_spread.npy`` ``(V,)`` float64 next to
    ``.ply``/``.obj``/``.stl`` files. One fold: the fold's mesh, no spread (nothing written, no spread keys).

    Per case: nnU-Net's sliding-window prediction of the whole case with the model (``nnUNetPredictor`` with
    ``nnUNetv2_predict``'s defaults: tile step 0.5, Gaussian weighting, mirroring along the checkpoint's
    ``inference_allowed_mirroring_axes``, which the mesh trainers leave empty), the segmentation written as
    ``output_folder/CASE<file_ending>`` exactly as ``nnUNetv2_predict`` writes it, then the heart ROI of the predicted
    labels in the preprocessed frame and one forward of network + head on it (module docstring). Writes
    ``output_folder/CASE_<structure><ext>`` (world mm, LPS) and ``output_folder/meshes.json``::

        {"model_folder", "folds": [0, 1, ...], "checkpoint", "format", "structures": [...], "frame", "roi_frame",
         "spread": SPREAD_DEFINITION (ensembles only),
         "cases": {CASE: {"files": {structure: file name}, "segmentation": file name,
                          "roi": {"start": [...], "size": [...], "box": [lo, hi]}, "seconds": s,
                          ensembles only: "spread_mm": {structure: {"max": mm, "mean": mm}},
                          "spread_files": {structure: .npy file name} (ply/obj/stl only)}},
         "cases_without_mesh": [CASE, ...]}

    A case whose predicted mesh structures do not fit the patch, or with none of them, gets no mesh files: a message
    on stderr and ``"cases": {CASE: {"error": message, "files": {}, "segmentation": file name, "seconds": s}}``;
    the other cases go on. Never writes into ``input_folder``; refuses, before any work, to replace an existing
    mesh or segmentation file unless ``overwrite``.

    Returns:
        The ``meshes.json`` dict.

    Raises:
        MeshPredictionError: folders missing/identical, no images, a model without mesh head, a region-based model,
            templates that are not the dataset's mesh structures, existing outputs, a broken mesh.
    """
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_topo.paths import check_output

    ext = _check_format(file_format)
    if not os.path.isdir(input_folder):
        raise MeshPredictionError(f"input folder not found: {input_folder}")
    if not os.path.isdir(model_folder):
        raise MeshPredictionError(f"model folder not found: {model_folder} (train first, or check -d/-c/-tr/-p)")
    # never into, above or through a symlink to an input folder (paths resolved)
    check_output(output_folder, {"input folder": input_folder, "--roi_from folder": roi_from}, kind="folder")
    from nnunet_topo.model_folder import resolve_folds

    try:
        folds = resolve_folds(model_folder, folds, checkpoint)
    except ValueError as e:
        raise MeshPredictionError(str(e)) from e
    ensemble = len(folds) > 1
    dev = torch.device(device)
    # nnUNetv2_predict's defaults (perform_everything_on_device: nnU-Net turns it off on non-CUDA devices)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, tuple(folds), checkpoint_name=checkpoint)
    network, fold_parameters = mesh_model_from_checkpoints(predictor, model_folder, folds, checkpoint)
    net = check_mesh_network(network)
    check_fold_templates(fold_parameters, folds)  # before any fold's weights are loaded
    plans_manager, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    if predictor.label_manager.has_regions:
        raise MeshPredictionError("this model is region-based (dataset.json 'regions_class_order'); the mesh trainers "
                                  "do not support regions, so mesh prediction does not either")
    names = _structure_names(net)
    structures = _mesh_structures_of(dj, names)
    file_ending = dj["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(input_folder, file_ending)
    if not cases:
        raise MeshPredictionError(f"no images ending in _0000{file_ending} in {input_folder}")
    case_names = [os.path.basename(files[0])[: -len(f"_0000{file_ending}")] for files in cases]
    if roi_from is not None:
        missing = [c for c in case_names if not os.path.isfile(os.path.join(roi_from, c + file_ending))]
        if missing:
            raise MeshPredictionError(f"--roi_from {roi_from}: no label map for {len(missing)} case(s), e.g. "
                                      f"{[c + file_ending for c in missing[:3]]}")
    # refuse early, before any work, if a file would be overwritten
    if not overwrite:
        for name in case_names:
            sidecars = [f"{name}_{s}_spread.npy" for s in names] if ensemble and ext not in (".vtk", ".vtp") else []
            for fname in [f"{name}_{s}{ext}" for s in names] + sidecars + [name + file_ending]:
                p = os.path.join(output_folder, fname)
                if os.path.exists(p):
                    raise MeshPredictionError(f"{p} exists; pass --overwrite to replace it")
    os.makedirs(output_folder, exist_ok=True)
    preprocessor = cm.preprocessor_class(verbose=False)
    summary: dict = {"model_folder": os.path.abspath(model_folder), "folds": list(folds), "checkpoint": checkpoint,
                     "format": ext, "structures": names, "frame": "world (x, y, z) mm, ITK physical space (LPS)",
                     "roi_frame": ROI_FRAME, "roi_from": "prediction" if roi_from is None else os.path.abspath(roi_from),
                     "cases": {}, "cases_without_mesh": []}
    if ensemble:
        summary["spread"] = SPREAD_DEFINITION
    it = list(zip(case_names, cases))
    if show_progress:
        from tqdm import tqdm
        it = tqdm(it, desc="predicting segmentations and meshes")
    for name, files in it:
        t0 = time.time()
        roi_file = None if roi_from is None else os.path.join(roi_from, name + file_ending)
        data, roi_seg, props = preprocessor.run_case(files, roi_file, plans_manager, cm, dj)
        # as nnUNetv2_predict (data iterator -> predict_from_data_iterator): all loaded folds averaged
        x = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        logits = predictor.predict_logits_from_preprocessed_data(x).cpu().detach().numpy()
        seg_pre = predictor.label_manager.convert_logits_to_segmentation(logits)  # argmax, preprocessed frame
        seg_file = name + file_ending
        export_prediction_from_logits(logits, props, cm, plans_manager, dj, os.path.join(output_folder, name),
                                      save_probabilities=False)
        del logits
        try:
            # without a label file nnU-Net's run_case returns its nonzero mask as seg: used only with roi_from
            roi = mesh_roi(seg_pre if roi_file is None else roi_seg[0], structures, cm.patch_size, cm.spacing,
                           case=name)
        except NoMeshError as e:
            print(f"no mesh: {e}", file=sys.stderr)
            summary["cases"][name] = {"error": str(e), "files": {}, "segmentation": seg_file,
                                      "seconds": round(time.time() - t0, 2)}
            summary["cases_without_mesh"].append(name)
            continue
        # every fold's network + head on the same ROI (that of the ensemble segmentation)
        per_model = []
        for params in fold_parameters:
            net.load_state_dict(params)
            per_model.append(predict_meshes_in_roi(network, data, roi, props, plans_manager, cm, device=dev,
                                                   case=name))
        if ensemble:
            meshes, spread = ensemble_meshes(per_model, case=name)
        else:
            meshes, spread = per_model[0], {}
        written, spread_files, spread_stats = {}, {}, {}
        for s, mesh in meshes.items():
            fname = f"{name}_{s}{ext}"
            vtk_data = {SPREAD_NAME: spread[s]} if ensemble and ext in (".vtk", ".vtp") else None
            export_mesh(mesh, os.path.join(output_folder, fname), overwrite=overwrite, point_data=vtk_data)
            written[s] = fname
            if ensemble:
                spread_stats[s] = {"max": float(spread[s].max()), "mean": float(spread[s].mean())}
                if vtk_data is None:
                    spread_files[s] = f"{name}_{s}_spread.npy"
                    np.save(os.path.join(output_folder, spread_files[s]), spread[s])
        entry = {"files": written, "segmentation": seg_file, "roi": roi.to_dict()}
        if ensemble:
            entry["spread_mm"] = spread_stats
            if spread_files:
                entry["spread_files"] = spread_files
        summary["cases"][name] = {**entry, "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(output_folder, "meshes.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
