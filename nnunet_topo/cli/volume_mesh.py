"""``nnUNetv2_topo_volume_mesh``: tetrahedral meshes for simulation of the mesh structures and the walls between
them (:mod:`nnunet_topo.volume_mesh`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from nnunet_topo.cli.common import exit_on_user_errors
from nnunet_topo.paths import read_json
from nnunet_topo.volume_mesh import OUTPUT_JSON, CutPlane, VolumeMeshError, format_volume_mesh_table, \
    volume_mesh_folder


def _cut_planes_file(path: str) -> Dict[str, CutPlane]:
    raw = read_json(path, "--cut_planes file")
    return {str(c): CutPlane.from_numbers(v if isinstance(v, (list, tuple)) else [v], f"--cut_planes {path}: {c}")
            for c, v in raw.items()}


def volume_mesh_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``nnUNetv2_topo_volume_mesh``.

    Exit codes: 0 every mesh written without inverted tetrahedra; 1 written, but some mesh has inverted tetrahedra
    (listed on stderr; do not simulate on it); 2 an error before or during the run (one line on stderr), nothing
    of the input touched."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_volume_mesh",
        description="Tetrahedral meshes for simulation (fTetWild via pytetwild, MPL-2.0) of the mesh structures and "
                    "of the walls between the inner and outer mesh of every mesh inclusion rule of dataset.json "
                    "(e.g. the LV myocardium between LV_endo and LV_epi, named LV_epi-LV_endo), per case of a mesh "
                    "folder (nnUNetv2_topo_predict_meshes or nnUNetv2_topo_repair_meshes output). Writes "
                    "CASE_<mesh>.vtu (VTK XML UnstructuredGrid: a 'tetra' block with cell data region=1 and a "
                    "'triangle' block, the outward boundary, with cell data surface_tag: 1 endocardial (a wall's "
                    "inner surface), 2 epicardial (its outer surface), 3 basal (the cut), 4 boundary (a "
                    "structure's surface)) and volume_meshes.json with the quality figures (tet count, dihedral "
                    "angles, inverted tets, volume against the surface and the labels, boundary deviation), also "
                    "printed as a table. Refuses surfaces that are open, intersect themselves, or an inner mesh "
                    "that is not inside its outer mesh: repair first with nnUNetv2_topo_repair_meshes. "
                    "Exit code 0: done; 1: some mesh has inverted tetrahedra; 2: bad input (nothing written).")
    parser.add_argument("-i", required=True, metavar="MESHES",
                        help="folder of surface meshes CASE_<structure>.<vtk|vtp|stl|obj|ply> in world mm (with its "
                             "meshes.json if present: then its cases table says which cases have meshes)")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder (never inside an input)")
    parser.add_argument("-djfile", required=True, metavar="dataset.json",
                        help="the dataset.json with the topology block (mesh_structures, mesh rules)")
    parser.add_argument("--edge_mm", type=float, default=1.5,
                        help="ideal tetrahedron edge length in mm (default 1.5; fTetWild refines near the surface "
                             "where its triangles are smaller)")
    parser.add_argument("--structures", nargs="*", default=None, metavar="NAME",
                        help="mesh structures to mesh as volumes (default: all of topology.mesh_structures); "
                             "'--structures' with no name: walls only. A selected structure, or one a wall needs, "
                             "missing for a case is an error")
    parser.add_argument("--walls", dest="walls", action="store_true", default=True,
                        help="mesh the wall of every mesh inclusion rule in force, OUTER minus INNER (default)")
    parser.add_argument("--no_walls", dest="walls", action="store_false", help="no walls, structures only")
    parser.add_argument("--labels", default=None, metavar="SEG_FOLDER",
                        help="label maps CASE<file_ending> of the same cases (e.g. the segmentations "
                             "nnUNetv2_topo_predict_meshes writes beside the meshes): compare each volume with the "
                             "voxel volume of its labels (a wall: labels of OUTER minus those of INNER)")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--cut_plane", nargs=6, type=float, default=None, metavar=("X", "Y", "Z", "NX", "NY", "NZ"),
                     help="cut every wall by the plane through (X, Y, Z) mm with normal (NX, NY, NZ), keeping the side "
                          "the normal points away from (the normal is the outward normal of the basal face); the "
                          "cut faces get surface_tag 3 (basal). Structures stay closed")
    cut.add_argument("--cut_planes", default=None, metavar="JSON",
                     help='per-case planes: a JSON file {"CASE": [X, Y, Z, NX, NY, NZ], ...}; cases not listed are '
                          "not cut")
    parser.add_argument("--envelope_mm", type=float, default=None,
                        help="how far fTetWild may move the boundary, mm (default: fTetWild's 1e-3 of each "
                             "surface's bounding-box diagonal); the measured deviation is in the JSON")
    parser.add_argument("--threads", type=int, default=0, help="fTetWild threads (default 0: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty -o folder")
    args = parser.parse_args(argv)
    with exit_on_user_errors(VolumeMeshError):
        plane: Any = None
        if args.cut_plane is not None:
            plane = CutPlane.from_numbers(args.cut_plane)
        elif args.cut_planes is not None:
            plane = _cut_planes_file(args.cut_planes)
        summary = volume_mesh_folder(args.i, args.o, args.djfile, edge_mm=args.edge_mm, structures=args.structures,
                                     walls=args.walls, labels_folder=args.labels, cut_plane=plane,
                                     envelope_mm=args.envelope_mm, threads=args.threads, overwrite=args.overwrite)
    print(format_volume_mesh_table(summary))
    n = sum(len(e["files"]) for e in summary["cases"].values())
    print(f"wrote {n} volume mesh(es) of {len(summary['cases'])} case(s) and {OUTPUT_JSON} to {args.o}")
    if summary["cases_without_mesh"]:
        print(f"note: {len(summary['cases_without_mesh'])} case(s) without meshes in the input skipped: "
              f"{', '.join(summary['cases_without_mesh'])}", file=sys.stderr)
    bad = [f"{c} {m} ({q['inverted_tets']})" for c, e in summary["cases"].items() for m, q in e["quality"].items()
           if q["inverted_tets"]]
    if bad:
        print(f"error: inverted tetrahedra in {', '.join(bad)}; do not simulate on these meshes", file=sys.stderr)
        raise SystemExit(1)
