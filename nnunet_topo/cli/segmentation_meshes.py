"""``python -m nnunet_topo.cli.segmentation_meshes``: marching-cubes surfaces of a folder of segmentations, written
as ``nnUNetv2_topo_predict_meshes`` writes a mesh head's (:mod:`nnunet_topo.segmentation_meshes`).

    python -m nnunet_topo.cli.segmentation_meshes -i SEGMENTATIONS -o MESHES -djfile dataset.json --format vtp
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from nnunet_topo.cli.common import print_error, user_errors
from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS
from nnunet_topo.segmentation_meshes import SegmentationMeshError, mesh_segmentation_folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nnunet_topo.cli.segmentation_meshes``. Exit codes as ``nnUNetv2_topo_predict_meshes``: 0 every
    case meshed, 1 some cases got no mesh (listed on stderr and in meshes.json), 2 bad input."""
    p = argparse.ArgumentParser(
        prog="python -m nnunet_topo.cli.segmentation_meshes",
        description="Marching-cubes surfaces of every mesh structure of every label map in -i, written as "
                    "nnUNetv2_topo_predict_meshes writes its meshes (CASE_<structure>.<format> in world mm, "
                    "meshes.json), so nnUNetv2_topo_evaluate_folder --mesh_folder evaluates them.")
    p.add_argument("-i", required=True, help="folder of label maps CASE<file_ending> (e.g. nnU-Net's predictions)")
    p.add_argument("-o", required=True, help="output folder for the meshes and meshes.json (not -i)")
    p.add_argument("-djfile", required=True, help="dataset.json (labels, file_ending, topology.mesh_structures)")
    p.add_argument("--format", default="vtp", choices=[e[1:] for e in SUPPORTED_MESH_EXTENSIONS],
                   help="mesh file format (default vtp)")
    p.add_argument("--smoothing_iterations", type=int, default=0,
                   help="Taubin smoothing step pairs (default 0: the raw marching-cubes surface)")
    p.add_argument("--overwrite", action="store_true", help="replace existing mesh files in -o")
    a = p.parse_args(argv)
    try:
        summary = mesh_segmentation_folder(a.i, a.o, a.djfile, file_format=a.format,
                                           smoothing_iterations=a.smoothing_iterations, overwrite=a.overwrite)
    except user_errors(SegmentationMeshError, ValueError, FileNotFoundError) as e:
        return print_error(e)
    n, failed = len(summary["cases"]), summary["cases_without_mesh"]
    print(f"wrote the meshes ({', '.join(summary['structures'])}) of {n - len(failed)} of {n} case(s) to {a.o}")
    if failed:
        print(f"error: {len(failed)} of {n} case(s) got no mesh: {', '.join(failed)} (in "
              f"{os.path.join(a.o, 'meshes.json')})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
