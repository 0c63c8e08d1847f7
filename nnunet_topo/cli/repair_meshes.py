"""``nnUNetv2_topo_repair_meshes``: move the fewest mesh vertices so that the mesh rules hold, verified exactly
(:mod:`nnunet_topo.mesh_repair`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.mesh_repair import DEFAULT_GAP_MM, MeshRepairError, format_repair_table, repair_mesh_folder
from nnunet_topo.topology_spec import TopologySpecError
from nnunet_topo.summary_io import EvaluationError


def repair_meshes_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``nnUNetv2_topo_repair_meshes``. Exit codes: 0 every case repaired; 1 some could not be
    (named on stderr and in repair.json, their meshes not written); 2 bad input."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_repair_meshes",
        description="Move the fewest mesh vertices the least distance so that no two meshes of a mesh_exclusion "
                    "rule overlap and every inner mesh of a mesh_inclusion rule lies inside its outer mesh, with a "
                    "gap; verified exactly (mesh booleans, triangle-to-triangle gap, no self-intersection). The "
                    "input meshes are never touched. Writes the repaired meshes, meshes.json and repair.json "
                    "(displacements and violating volumes before/after per case).")
    parser.add_argument("-i", required=True, help="mesh folder (nnUNetv2_topo_predict_meshes output, or files "
                                                  "CASE_<structure>.vtk/.vtp/.ply/.obj/.stl)")
    parser.add_argument("-o", required=True, help="output folder (not inside -i)")
    parser.add_argument("-djfile", required=True, help="the dataset.json with the topology block (mesh rules)")
    parser.add_argument("--gap_mm", type=float, default=DEFAULT_GAP_MM,
                        help=f"margin between repaired surfaces in mm (default {DEFAULT_GAP_MM})")
    parser.add_argument("--rings", type=int, default=2,
                        help="neighbourhood (edges) over which a vertex's displacement is smoothed out (default 2)")
    parser.add_argument("--tangled", choices=("remesh", "refuse"), default="remesh",
                        help="a mesh that crosses itself and cannot be untangled by small moves: 'remesh' rebuilds "
                             "it as the boundary of the volume it encloses (winding number > 0; its vertex order "
                             "and count change, per-vertex data come from the nearest input vertex), 'refuse' "
                             "reports its case as not repaired (default remesh)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in -o")
    parser.add_argument("--continue_repair", action="store_true",
                        help="finish an interrupted run: the cases its -o/repair_progress.json records are kept, "
                             "the others repaired (same -i, --gap_mm, --rings and --tangled)")
    args = parser.parse_args(argv)
    with exit_on_user_errors(MeshRepairError, TopologySpecError, EvaluationError):
        if not os.path.isfile(args.djfile):
            raise MeshRepairError(f"dataset.json not found: {args.djfile}")
        result = repair_mesh_folder(args.i, args.o, args.djfile, args.gap_mm, args.rings, args.overwrite,
                                    tangled=args.tangled, resume=args.continue_repair)
    print(format_repair_table(result))
    failed = result["cases_not_repaired"]
    if failed:
        print(f"error: {len(failed)} case(s) could not be repaired: {', '.join(failed)} (reasons in "
              f"{os.path.join(args.o, 'repair.json')})", file=sys.stderr)
        raise SystemExit(1)
