"""Surface meshes of a folder of segmentations by marching cubes, written as ``nnUNetv2_topo_predict_meshes`` writes
a mesh head's: the alternative a user would try before a mesh head (issue 22: what the learned head buys over it).

For every label map ``CASE<file_ending>`` of the input folder and every mesh structure of the dataset's topology
block (``mesh_structures``, e.g. ACDC's LV_endo = LV, LV_epi = LV+MYO, RV), the closed surface of the structure's
voxels by :func:`nnunet_topo.surfaces.mesh_from_mask` (Lorensen's marching cubes at level 0.5 on the binary mask, the
surface the mesh evaluator builds of a reference structure; optional Taubin smoothing), in world mm (ITK/LPS, the
label map's own geometry from nnU-Net's reader). Output: ``CASE_<structure><ext>`` and ``meshes.json`` with the
``cases`` table of :func:`nnunet_topo.mesh_prediction.predict_meshes_folder`, so that
``nnUNetv2_topo_evaluate_folder --mesh_folder`` (:func:`nnunet_topo.mesh_evaluation.evaluate_mesh_folder`) reads them
as it reads predicted meshes. A case with an empty mesh structure gets no mesh (``"error"``, ``"files": {}``, listed
in ``cases_without_mesh``), as a case the mesh head cannot mesh.

    python -m nnunet_topo.cli.segmentation_meshes -i SEGMENTATIONS -o MESHES -djfile dataset.json --format vtp

nnU-Net glue (its reader) in :func:`mesh_segmentation_folder` only.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Union

import numpy as np

from nnunet_topo.frames import ImageGeometry
from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS, export_mesh
from nnunet_topo.surfaces import MeshBuildError, structure_meshes
from nnunet_topo.topology_spec import TopologySpec, spec_from_dataset_json
from nnunet_topo.summary_io import load_json_arg

__all__ = ["SegmentationMeshError", "mesh_segmentation_folder"]

#: what the meshes are, in meshes.json
SOURCE = ("marching cubes (nnunet_topo.surfaces.mesh_from_mask: Lorensen, level 0.5 on each mesh structure's binary "
          "mask) of the segmentations")


class SegmentationMeshError(ValueError):
    """Bad input (missing folders, no label maps, no mesh structures, existing outputs)."""


def _format(file_format: str) -> str:
    ext = file_format if file_format.startswith(".") else "." + file_format
    if ext.lower() not in SUPPORTED_MESH_EXTENSIONS:
        raise SegmentationMeshError(f"unknown mesh format {file_format!r}; one of {SUPPORTED_MESH_EXTENSIONS}")
    return ext.lower()


def mesh_segmentation_folder(seg_folder: str, output_folder: str, dataset_json: Union[str, os.PathLike, dict],
                             file_format: str = ".vtp", smoothing_iterations: int = 0, overwrite: bool = False,
                             spec: Optional[TopologySpec] = None, show_progress: bool = True) -> dict:
    """Mesh every label map of ``seg_folder`` by marching cubes; write meshes and ``meshes.json`` to ``output_folder``.

    Args:
        seg_folder: label maps ``CASE<file_ending>`` (e.g. nnU-Net's validation outputs, ``nnUNetv2_predict``'s).
        output_folder: where ``CASE_<structure><ext>`` and ``meshes.json`` go (must differ from ``seg_folder``).
        dataset_json: the dataset's dataset.json (path or dict): labels, ``file_ending``, ``topology``.
        file_format: ``vtp`` (default), ``vtk``, ``ply``, ``obj`` or ``stl``.
        smoothing_iterations: Taubin step pairs of :func:`nnunet_topo.surfaces.mesh_from_mask` (0: the raw marching-
            cubes surface, as the evaluator's reference surfaces).
        overwrite: replace existing mesh files (otherwise refused before any work).

    Returns:
        The ``meshes.json`` dict::

            {"source", "segmentation_folder", "format", "structures": [...], "frame", "smoothing_iterations",
             "cases": {CASE: {"files": {structure: file name}, "segmentation": path, "seconds": s}
                       or {"error": message, "files": {}, "segmentation": path, "seconds": s}},
             "cases_without_mesh": [CASE, ...]}

    Raises:
        SegmentationMeshError: folders missing or identical, no label maps, no mesh structures, existing outputs.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ext = _format(file_format)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    if not os.path.isdir(seg_folder):
        raise SegmentationMeshError(f"segmentation folder not found: {seg_folder}")
    if os.path.abspath(seg_folder) == os.path.abspath(output_folder):
        raise SegmentationMeshError("the output folder must differ from the segmentation folder")
    if spec is None:
        spec = spec_from_dataset_json(dataset_json)
    structures: Dict[str, list] = {n: sorted(s.label_ids) for n, s in spec.mesh_structures.items()}
    if not structures:
        raise SegmentationMeshError("the dataset's topology block defines no mesh_structures; nothing to mesh")
    file_ending = dataset_json["file_ending"]
    files = sorted(f for f in os.listdir(seg_folder) if f.endswith(file_ending))
    if not files:
        raise SegmentationMeshError(f"no label maps ending in {file_ending!r} in {seg_folder}")
    cases = [f[: -len(file_ending)] for f in files]
    if not overwrite:
        for case in cases:
            for s in structures:
                p = os.path.join(output_folder, f"{case}_{s}{ext}")
                if os.path.exists(p):
                    raise SegmentationMeshError(f"{p} exists; pass --overwrite to replace it")
    os.makedirs(output_folder, exist_ok=True)
    rw = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(seg_folder, files[0]))()
    summary: dict = {"source": SOURCE, "segmentation_folder": os.path.abspath(seg_folder), "format": ext,
                     "structures": list(structures), "frame": "world (x, y, z) mm, ITK physical space (LPS)",
                     "smoothing_iterations": int(smoothing_iterations), "cases": {}, "cases_without_mesh": []}
    it: Sequence = list(zip(cases, files))
    if show_progress:
        from tqdm import tqdm
        it = tqdm(it, desc="marching cubes")
    for case, fname in it:
        t0 = time.time()
        path = os.path.join(seg_folder, fname)
        seg, props = rw.read_seg(path)
        seg = np.asarray(seg)
        if seg.ndim == 4:
            seg = seg[0]
        geometry = ImageGeometry.from_nnunet_properties(props)
        try:
            meshes = structure_meshes(seg, structures, geometry, smoothing_iterations=smoothing_iterations)
        except MeshBuildError as e:  # an empty structure: no mesh for this case, as the mesh head's prediction
            print(f"no mesh: {case}: {e}", file=sys.stderr)
            summary["cases"][case] = {"error": str(e), "files": {}, "segmentation": os.path.abspath(path),
                                      "seconds": round(time.time() - t0, 2)}
            summary["cases_without_mesh"].append(case)
            continue
        written = {}
        for s, mesh in meshes.items():
            written[s] = f"{case}_{s}{ext}"
            export_mesh(mesh, os.path.join(output_folder, written[s]), overwrite=overwrite)
        summary["cases"][case] = {"files": written, "segmentation": os.path.abspath(path),
                                  "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(output_folder, "meshes.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
