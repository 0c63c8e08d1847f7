"""Mesh prediction with a trained mesh model: one surface file per structure, in patient coordinates.

DESIGN §7 "Export": the mesh head of :class:`nnunet_topo.mesh_head.network.MeshAugmentedNetwork` predicts
vertices in the normalised ``grid_sample`` frame of its input, i.e. of nnU-Net's *preprocessed* array
(transposed by the plans' ``transpose_forward``, cropped to ``bbox_used_for_cropping``, resampled to the
configuration's spacing), padded here to the network's stride. This module maps them back through each of
those steps to the continuous index of the original image and then to world coordinates (mm, ITK/LPS) with
:class:`nnunet_topo.meshes.ImageGeometry`, and writes ``CASE_<structure>.<ext>`` files plus ``meshes.json``.

Frames (see ``documentation/meshes.md`` and ``documentation/mesh_output.md``):

* normalised ``(x, y, z)`` in ``[-1, 1]`` of the *padded* network input (``align_corners=True``)
  -> padded preprocessed index ``(z, y, x)`` (:func:`nnunet_topo.meshes.normalized_to_index`)
  -> preprocessed index (minus the padding before the data)
  -> original image index (:func:`preprocessed_to_original_index`: undo resampling, add the crop offset,
  undo the transpose) -> world (:func:`nnunet_topo.meshes.index_to_world`).

nnU-Net's preprocessing order is transpose -> crop -> resample (``DefaultPreprocessor.run_case_npy``), so the
crop bounding box and ``shape_after_cropping_and_before_resampling`` are in the *transposed* axis order.

nnU-Net glue (``nnunetv2`` is imported inside the functions that need it); :func:`predict_meshes_entry` is the
console script ``nnUNetv2_topo_predict_meshes``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import trimesh
from torch import nn

from nnunet_topo.meshes import SUPPORTED_MESH_EXTENSIONS, ImageGeometry, export_mesh, index_to_world, \
    normalized_to_index

__all__ = [
    "MeshPredictionError",
    "preprocessed_shape",
    "preprocessed_to_original_index",
    "network_input_padding",
    "check_mesh_network",
    "predict_meshes_case",
    "predict_meshes_folder",
    "predict_meshes_entry",
]

NO_MESH_HEAD = "this model has no mesh head; train with nnUNetTrainerMesh/TPM/MIE"


class MeshPredictionError(ValueError):
    """Bad input to mesh prediction (folders, model without mesh head, broken meshes)."""


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
    """Continuous indices of nnU-Net's preprocessed array -> continuous indices of the original image array.

    Undoes, in reverse order, what ``DefaultPreprocessor.run_case_npy`` (nnU-Net 2.8.1) did:

    1. resampling from ``n_orig = shape_after_cropping_and_before_resampling`` to ``n_new`` voxels per axis,
       with nnU-Net's ``align_corners=False`` convention ``i_orig = (i_new + 0.5) * n_orig / n_new - 0.5``
       (``skimage.transform.resize`` and the ``map_coordinates`` path for anisotropic data both use it);
    2. cropping: ``+ bbox_used_for_cropping[k][0]`` (the box is in the transposed order);
    3. ``transpose_forward``: transposed axis ``k`` is original axis ``transpose_forward[k]``.

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
    n_orig = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=np.float64)
    n_new = np.asarray(preprocessed_shape_zyx if preprocessed_shape_zyx is not None else
                       preprocessed_shape(properties, plans_manager, configuration_manager), dtype=np.float64)
    if n_orig.shape != (3,) or n_new.shape != (3,):
        raise ValueError(f"3D shapes expected, got {n_orig.tolist()} and {n_new.tolist()}")
    cropped = (p + 0.5) * (n_orig / n_new) - 0.5
    offset = np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], dtype=np.float64)
    transposed = cropped + offset
    tf = list(plans_manager.transpose_forward)
    original = np.empty_like(transposed)
    original[:, tf] = transposed  # original axis tf[k] <- transposed axis k
    return original


# ----------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------

def network_input_padding(shape_zyx: Sequence[int], strides: Sequence[int],
                          patch_size: Optional[Sequence[int]] = None) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(padded shape, padding before the data)``: each axis padded (centred) to at least ``patch_size`` and to a
    multiple of the network's total stride."""
    padded, before = [], []
    for k, (s, m) in enumerate(zip(shape_zyx, strides)):
        t = max(int(s), int(patch_size[k]) if patch_size is not None else 0)
        t = int(math.ceil(t / int(m)) * int(m))
        padded.append(t)
        before.append((t - int(s)) // 2)
    return tuple(padded), tuple(before)


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


def predict_meshes_case(network: nn.Module, data: np.ndarray, properties: Mapping[str, Any], plans_manager,
                        configuration_manager, device: str | torch.device = "cpu",
                        case: str = "case") -> Dict[str, trimesh.Trimesh]:
    """Run the mesh head once on one whole preprocessed case and return world meshes.

    Args:
        network: a :class:`MeshAugmentedNetwork` (weights loaded; put in eval mode here).
        data: ``(C, Z, Y, X)`` preprocessed image (``preprocessor.run_case``), transposed order.
        properties: its nnU-Net data properties (with ``sitk_stuff`` or ``nibabel_stuff`` for the geometry).
        plans_manager, configuration_manager: the model's managers (stride, patch size, transpose, spacing).
        device: where to run the network.
        case: case name for error messages.

    Returns:
        ``{structure name: trimesh.Trimesh}`` in world coordinates ``(x, y, z)`` mm, faces wound outward.

    Raises:
        MeshPredictionError: no mesh head; a mesh with NaN/inf vertices or zero volume (names case and structure).
    """
    net = check_mesh_network(network)
    data = np.asarray(data)
    if data.ndim != 4:
        raise MeshPredictionError(f"case {case}: expected preprocessed data (C, Z, Y, X), got shape {data.shape}")
    geometry = ImageGeometry.from_nnunet_properties(properties)
    strides = np.prod(np.array(configuration_manager.pool_op_kernel_sizes), axis=0).astype(int).tolist()
    shape = tuple(int(s) for s in data.shape[1:])
    padded, before = network_input_padding(shape, strides, configuration_manager.patch_size)
    pads = []
    for s, t, b in zip(shape, padded, before):
        pads.append((b, t - s - b))
    flat = [v for pb in reversed(pads) for v in pb]
    dev = torch.device(device)
    x = torch.nn.functional.pad(torch.from_numpy(data.astype(np.float32, copy=False))[None], flat).to(dev)
    network.eval()
    with torch.no_grad():
        _, verts = net.forward_with_meshes(x)
    names = _structure_names(net)
    if len(verts) != len(names):
        raise MeshPredictionError(f"case {case}: the mesh head returned {len(verts)} meshes for {len(names)} "
                                  "templates")
    out: Dict[str, trimesh.Trimesh] = {}
    for s, (name, v) in enumerate(zip(names, verts)):
        v = v.detach().double().cpu().numpy()
        if v.ndim == 3:
            v = v[0]
        if not np.all(np.isfinite(v)):
            raise MeshPredictionError(f"case {case}, structure {name!r}: the mesh head predicted NaN/inf vertices")
        idx = normalized_to_index(v, padded) - np.asarray(before, dtype=np.float64)
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


# ----------------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------------

def _check_format(file_format: str) -> str:
    ext = file_format if file_format.startswith(".") else "." + file_format
    ext = ext.lower()
    if ext not in SUPPORTED_MESH_EXTENSIONS:
        raise MeshPredictionError(f"unknown mesh format {file_format!r}; choose one of {SUPPORTED_MESH_EXTENSIONS}")
    return ext


def predict_meshes_folder(model_folder: str, input_folder: str, output_folder: str, fold: str = "0",
                          checkpoint: str = "checkpoint_final.pth", file_format: str = ".vtk", device: str = "cuda",
                          overwrite: bool = False, show_progress: bool = True) -> dict:
    """Predict meshes for every case of ``input_folder`` (nnU-Net raw images, ``CASE_0000.nii.gz``...).

    Writes ``output_folder/CASE_<structure><ext>`` (world mm, LPS) and ``output_folder/meshes.json``::

        {"model_folder", "fold", "checkpoint", "format", "structures": [...],
         "cases": {CASE: {"files": {structure: file name}, "seconds": s}}}

    Never writes into ``input_folder``; refuses to replace an existing mesh file unless ``overwrite``.

    Raises:
        MeshPredictionError: folders missing/identical, no images, a model without mesh head, a broken mesh.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    ext = _check_format(file_format)
    if not os.path.isdir(input_folder):
        raise MeshPredictionError(f"input folder not found: {input_folder}")
    if not os.path.isdir(model_folder):
        raise MeshPredictionError(f"model folder not found: {model_folder} (train first, or check -d/-c/-tr/-p)")
    if os.path.abspath(output_folder) == os.path.abspath(input_folder):
        raise MeshPredictionError("the output folder must differ from the input folder (inputs are never "
                                  "overwritten)")
    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=dev,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (fold,), checkpoint_name=checkpoint)
    network = predictor.network
    net = check_mesh_network(network)
    net.load_state_dict(predictor.list_of_parameters[0])
    net.to(dev)
    plans_manager, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    file_ending = dj["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(input_folder, file_ending)
    if not cases:
        raise MeshPredictionError(f"no images ending in _0000{file_ending} in {input_folder}")
    names = _structure_names(net)
    os.makedirs(output_folder, exist_ok=True)
    preprocessor = cm.preprocessor_class(verbose=False)
    summary: dict = {"model_folder": os.path.abspath(model_folder), "fold": str(fold), "checkpoint": checkpoint,
                     "format": ext, "structures": names, "frame": "world (x, y, z) mm, ITK physical space (LPS)",
                     "cases": {}}
    # refuse early, before any work, if a file would be overwritten
    case_names = [os.path.basename(files[0])[: -len(f"_0000{file_ending}")] for files in cases]
    if not overwrite:
        for name in case_names:
            for s in names:
                p = os.path.join(output_folder, f"{name}_{s}{ext}")
                if os.path.exists(p):
                    raise MeshPredictionError(f"{p} exists; pass --overwrite to replace it")
    it = list(zip(case_names, cases))
    if show_progress:
        from tqdm import tqdm
        it = tqdm(it, desc="predicting meshes")
    for name, files in it:
        t0 = time.time()
        data, _, props = preprocessor.run_case(files, None, plans_manager, cm, dj)
        meshes = predict_meshes_case(network, data, props, plans_manager, cm, device=dev, case=name)
        written = {}
        for s, mesh in meshes.items():
            fname = f"{name}_{s}{ext}"
            export_mesh(mesh, os.path.join(output_folder, fname), overwrite=overwrite)
            written[s] = fname
        summary["cases"][name] = {"files": written, "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(output_folder, "meshes.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def predict_meshes_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``nnUNetv2_topo_predict_meshes`` (arguments as ``nnUNetv2_predict`` where they apply)."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_predict_meshes",
        description="Predict one surface mesh per mesh structure with a model trained with a mesh head "
                    "(nnUNetTrainerMesh/TPM/MIE). Writes CASE_<structure>.<format> in patient coordinates "
                    "(ITK/LPS mm, the image's origin, spacing and direction) and meshes.json to -o.")
    from nnunet_topo.cli import add_model_arguments, model_folder_from_args

    add_model_arguments(parser, "nnUNetTrainerMesh", "output folder for the meshes (never -i)")
    parser.add_argument("--format", default="vtk", choices=[e[1:] for e in SUPPORTED_MESH_EXTENSIONS],
                        help="mesh file format (default vtk)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing mesh files in -o")
    args = parser.parse_args(argv)
    try:
        model_folder = model_folder_from_args(args)
        summary = predict_meshes_folder(model_folder, args.i, args.o, fold=args.f, checkpoint=args.chk,
                                        file_format=args.format, device=args.device, overwrite=args.overwrite)
    except (MeshPredictionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote meshes of {len(summary['cases'])} case(s) ({', '.join(summary['structures'])}) to {args.o}")
