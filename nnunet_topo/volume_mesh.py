"""Tetrahedral meshes for simulation: ``nnUNetv2_topo_volume_mesh`` (issue 25 item 3).

Cardiac simulations (tissue mechanics, electrophysiology) run on volume meshes of the myocardium with tagged
boundaries (endocardial and epicardial surfaces, the basal cut), not on surfaces. Per case of a mesh folder
(``nnUNetv2_topo_predict_meshes`` or ``nnUNetv2_topo_repair_meshes`` output: ``CASE_<structure><ext>`` in world mm),
:func:`volume_mesh_folder` writes

* a tetrahedral mesh of every selected **mesh structure** (``topology.mesh_structures``: the volume its closed surface
  encloses, e.g. the LV blood pool of ``LV_endo``), and
* one of every **wall**: for each mesh inclusion rule in force (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`,
  ``inner`` inside ``outer``), the volume inside ``outer`` and outside ``inner`` (e.g. the LV myocardium between
  LV_endo and LV_epi), named ``OUTER-INNER``; its surface is ``outer − inner`` by a manifold3d boolean, optionally
  cut by a plane (``trim_by_plane``: the open base of the ventricle).

Mesher: **fTetWild** (Hu et al., *Fast Tetrahedral Meshing in the Wild*, SIGGRAPH 2020) through **pytetwild**
(both MPL-2.0), with an ideal edge length in mm (fTetWild's ``--lr`` given absolutely). fTetWild guarantees
positively oriented tetrahedra and a boundary within an *envelope* of the input surface (``epsilon``, by default
1e-3 of the bounding-box diagonal): the boundary may move by up to that distance and is re-triangulated. Both are
measured here per mesh (inverted tetrahedra, boundary deviation both ways), never assumed. fTetWild runs in a child
process in a scratch folder (:mod:`nnunet_topo.ftetwild`: it writes a debug file into its working directory, and a
crash must not take the command down). TetGen (AGPL-3.0) is not used: a plugin that users embed should not pull an
AGPL dependency.

Surface tags (``SURFACE_TAGS``): every boundary triangle of the tetrahedral mesh takes the tag of the nearest
triangle of the surface that was meshed (distance from the triangle's centroid, exact point-triangle distances,
:func:`nnunet_topo.metrics.mesh.closest_points_on_surface`), and each triangle of that surface knows where it came
from (manifold3d keeps the original mesh of every output triangle: ``run_original_id``): the inner mesh
(endocardial), the outer mesh (epicardial), the cutting plane (basal). A structure's tetrahedral mesh has one tag,
``boundary``.

Refusals (:class:`VolumeMeshError`, exit code 2, before anything is written): an input mesh that is not a closed,
outward oriented 2-manifold without self-intersections (:func:`nnunet_topo.mesh_booleans.mesh_invalid_reason`), a
wall whose inner mesh is not inside its outer mesh (exact volume of ``inner − outer`` above ``1e-6`` of the inner
volume), a needed structure missing for a case. Those need ``nnUNetv2_topo_repair_meshes`` first.

Output per case: ``CASE_<mesh>.vtu`` (VTK XML UnstructuredGrid written by meshio: block 1 ``tetra`` with cell data
``region`` = 1, block 2 ``triangle`` = the boundary, outward oriented, with ``surface_tag``; ``region`` 0 on the
triangles and ``surface_tag`` 0 on the tetrahedra), and ``volume_meshes.json`` with the quality figures
(``documentation/mesh_output.md``, "Volume meshes for simulation").
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_topo.mesh_booleans import common_origin, manifold_of

__all__ = ["SURFACE_TAGS", "REPAIR_HINT", "VolumeMeshError", "CutPlane", "Wall", "TetMesh", "walls_in_force",
           "wall_surface", "structure_surface", "volume_mesh", "write_vtu", "volume_mesh_folder",
           "format_volume_mesh_table"]

#: ``surface_tag`` codes of the boundary triangles (0: not a boundary triangle, i.e. the tetrahedra's own value)
SURFACE_TAGS = {"endocardial": 1, "epicardial": 2, "basal": 3, "boundary": 4}
#: ``region`` of the tetrahedra (0 on the boundary triangles)
REGION = 1
REPAIR_HINT = "repair first: nnUNetv2_topo_repair_meshes"
#: a wall's inner mesh may reach outside its outer mesh by at most this fraction of its own volume (float noise)
INCLUSION_TOLERANCE = 1e-6
MESHES_JSON = "meshes.json"
OUTPUT_JSON = "volume_meshes.json"


class VolumeMeshError(ValueError):
    """Bad input for volume meshing (invalid or intersecting surfaces, missing structures, bad options)."""


@dataclass(frozen=True)
class CutPlane:
    """A plane that cuts the walls; the part on the side the normal points *away from* is kept (``normal`` is the
    outward normal of the cut face, e.g. pointing from the apex towards the atria for a basal cut).

    Attributes:
        point: a point on the plane, world mm ``(x, y, z)``.
        normal: unit normal ``(x, y, z)``.
    """

    point: Tuple[float, float, float]
    normal: Tuple[float, float, float]

    @classmethod
    def from_numbers(cls, values: Sequence[float], where: str = "--cut_plane") -> "CutPlane":
        """``[x, y, z, nx, ny, nz]`` -> plane (the normal is normalised)."""
        try:
            v = np.asarray([float(x) for x in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise VolumeMeshError(f"{where}: expected 6 numbers X Y Z NX NY NZ, got {values!r}") from None
        if v.shape != (6,) or not np.isfinite(v).all():
            raise VolumeMeshError(f"{where}: expected 6 finite numbers X Y Z NX NY NZ, got {list(values)!r}")
        n = np.linalg.norm(v[3:])
        if n == 0:
            raise VolumeMeshError(f"{where}: the normal (NX NY NZ) is zero; give the direction the cut face faces")
        return cls(tuple(v[:3].tolist()), tuple((v[3:] / n).tolist()))

    def signed_distance(self, xyz: np.ndarray) -> np.ndarray:
        """``(N,)`` signed distances (mm) of ``(N, 3)`` points; ``<= 0`` on the kept side."""
        return (np.asarray(xyz, np.float64) - np.asarray(self.point)) @ np.asarray(self.normal)

    def to_dict(self) -> dict:
        return {"point": list(self.point), "normal": list(self.normal),
                "kept": "the side the normal points away from"}


@dataclass(frozen=True)
class Wall:
    """The volume inside mesh ``outer`` and outside mesh ``inner`` (one mesh inclusion rule), named ``OUTER-INNER``."""

    inner: str
    outer: str
    rule: str

    @property
    def name(self) -> str:
        return f"{self.outer}-{self.inner}"


@dataclass
class TetMesh:
    """A tetrahedral mesh with its tagged boundary and quality figures.

    Attributes:
        points: ``(N, 3)`` float64 world mm.
        tets: ``(T, 4)`` int64, VTK order (positive signed volume when valid).
        triangles: ``(F, 3)`` int64 boundary triangles, outward oriented.
        tags: ``(F,)`` int32 ``SURFACE_TAGS`` codes of ``triangles``.
        quality: the figures of :func:`volume_mesh` (JSON-ready).
    """

    points: np.ndarray
    tets: np.ndarray
    triangles: np.ndarray
    tags: np.ndarray
    quality: Dict[str, Any] = field(default_factory=dict)


def walls_in_force(spec) -> List[Wall]:
    """One :class:`Wall` per distinct ``(inner, outer)`` pair of the mesh inclusion rules in force (openings
    ``may_touch`` are not honoured: the wall is ``outer − inner``; cut it open with a plane)."""
    from nnunet_topo.topology_spec import MeshInclusionRule, mesh_rules_in_force

    walls: Dict[Tuple[str, str], Wall] = {}
    for rule in mesh_rules_in_force(spec)[0]:
        if isinstance(rule, MeshInclusionRule) and (rule.inner, rule.outer) not in walls:
            walls[(rule.inner, rule.outer)] = Wall(rule.inner, rule.outer, rule.name)
    return list(walls.values())


# ----------------------------------------------------------------------------------------------------
# surfaces to mesh
# ----------------------------------------------------------------------------------------------------

def _manifold(mesh, origin: np.ndarray):
    """An *original* manifold3d solid of a trimesh (its own id in every product's ``run_original_id``), in
    coordinates shifted by ``-origin`` (:func:`nnunet_topo.mesh_booleans.manifold_of`)."""
    return manifold_of(mesh, origin).as_original()


def _surface_of(solid, origin: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vertices (V, 3) world mm, faces (F, 3), original id per face)`` of a manifold3d solid."""
    g = solid.to_mesh64()
    v = np.asarray(g.vert_properties, np.float64)[:, :3] + origin
    f = np.asarray(g.tri_verts, np.int64)
    ids = np.asarray(g.run_original_id, np.int64)
    bounds = np.asarray(g.run_index, np.int64) // 3
    per_face = np.repeat(ids, np.diff(bounds)) if len(ids) else np.zeros(0, np.int64)
    return v, f, per_face


def structure_surface(mesh) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The surface of a structure's volume mesh: the mesh itself, every face tagged ``boundary``.

    Returns:
        ``(vertices, faces, face tags, enclosed volume mm³)`` (volume by manifold3d)."""
    origin = np.asarray(mesh.vertices, np.float64).min(axis=0)
    solid = _manifold(mesh, origin)
    v, f, _ = _surface_of(solid, origin)
    return v, f, np.full(len(f), SURFACE_TAGS["boundary"], np.int32), float(solid.volume())


def wall_surface(inner, outer, cut: Optional[CutPlane] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The closed surface of the wall ``outer − inner`` (manifold3d boolean), cut by ``cut`` if given.

    Args:
        inner, outer: closed world-space trimeshes (mm), ``inner`` inside ``outer`` (checked by the caller).
        cut: keep the part on the side the plane's normal points away from.

    Returns:
        ``(vertices (V, 3), faces (F, 3), tag per face, enclosed volume mm³)``: faces from ``inner`` are
        ``endocardial``, from ``outer`` ``epicardial``, from the plane ``basal``.

    Raises:
        VolumeMeshError: nothing of the wall is left (the plane keeps none of it, or the meshes coincide).
    """
    origin = common_origin([inner, outer])
    a, b = _manifold(outer, origin), _manifold(inner, origin)
    solid = a - b
    if cut is not None:
        n = np.asarray(cut.normal, np.float64)
        # manifold3d keeps the side the normal points to, at distance offset from the (shifted) origin
        solid = solid.trim_by_plane((-n).tolist(), float(-n @ (np.asarray(cut.point) - origin)))
    if solid.is_empty() or solid.volume() <= 0:
        raise VolumeMeshError("the wall has no volume" + (" on the kept side of the cut plane" if cut else ""))
    v, f, ids = _surface_of(solid, origin)
    tags = np.full(len(f), SURFACE_TAGS["basal"], np.int32)
    tags[ids == a.original_id()] = SURFACE_TAGS["epicardial"]
    tags[ids == b.original_id()] = SURFACE_TAGS["endocardial"]
    return v, f, tags, float(solid.volume())


# ----------------------------------------------------------------------------------------------------
# one volume mesh
# ----------------------------------------------------------------------------------------------------

def _deviation(points: np.ndarray, triangles: np.ndarray, src_v: np.ndarray, src_f: np.ndarray) -> Dict[str, float]:
    """How far fTetWild moved the boundary: distances (mm) from the tetrahedral mesh's boundary vertices to the input
    surface and from the input surface's vertices to the boundary (exact point-triangle distances)."""
    from nnunet_topo.metrics.mesh import point_to_surface_distance

    on_boundary = np.unique(triangles)
    out = point_to_surface_distance(points[on_boundary], (src_v, src_f))
    back = point_to_surface_distance(src_v[np.unique(src_f)], (points, triangles))
    return {"tet_to_surface_max": float(out.max()), "tet_to_surface_mean": float(out.mean()),
            "surface_to_tet_max": float(back.max()), "surface_to_tet_mean": float(back.mean())}


def volume_mesh(vertices: np.ndarray, faces: np.ndarray, face_tags: np.ndarray, edge_mm: float,
                envelope_mm: Optional[float] = None, threads: int = 0) -> TetMesh:
    """Tetrahedralise a closed surface whose faces carry ``SURFACE_TAGS`` codes; tag and measure the result.

    Each boundary triangle of the tetrahedral mesh takes the tag of the surface face nearest to its centroid.
    ``quality``: :func:`nnunet_topo.metrics.tet_quality.tet_quality` (tets, points, min/mean dihedral angle in
    degrees, inverted tets, volume, mean edge length), ``boundary_triangles`` per tag name, ``envelope_mm`` and
    ``boundary_deviation_mm`` (:func:`_deviation`), ``mesher_seconds`` (wall clock, with the child process's start)
    and ``mesher_cpu_seconds`` (fTetWild's CPU time, all its threads).
    """
    from nnunet_topo.ftetwild import FTetWildError, tetrahedralize
    from nnunet_topo.metrics.mesh import closest_points_on_surface
    from nnunet_topo.metrics.tet_quality import boundary_triangles, tet_quality

    t0 = time.time()
    try:
        points, tets, envelope, cpu = tetrahedralize(vertices, faces, edge_mm, envelope_mm, threads)
    except FTetWildError as e:
        raise VolumeMeshError(str(e)) from e
    seconds = time.time() - t0
    triangles, _ = boundary_triangles(tets)
    src_tags = np.asarray(face_tags, np.int32)
    if len(np.unique(src_tags)) == 1:
        tags = np.full(len(triangles), src_tags[0], np.int32)
    else:
        centroids = points[triangles].mean(axis=1)
        tags = src_tags[closest_points_on_surface(centroids, (vertices, faces))[2]]
    quality = tet_quality(points, tets)
    quality["boundary_triangles"] = {name: int((tags == code).sum()) for name, code in SURFACE_TAGS.items()
                                     if (tags == code).any() or (src_tags == code).any()}
    quality["envelope_mm"] = envelope
    quality["boundary_deviation_mm"] = _deviation(points, triangles, np.asarray(vertices, np.float64),
                                                  np.asarray(faces, np.int64))
    quality["mesher_seconds"] = round(seconds, 2)
    quality["mesher_cpu_seconds"] = round(cpu, 2)
    return TetMesh(points, tets, triangles, tags, quality)


def write_vtu(path: Union[str, os.PathLike], mesh: TetMesh) -> None:
    """Write ``mesh`` as a VTK XML UnstructuredGrid (``.vtu``, meshio, zlib-compressed binary): cell block
    ``tetra`` (cell data ``region`` = 1, ``surface_tag`` = 0) then ``triangle`` (the boundary: ``region`` = 0,
    ``surface_tag`` = its ``SURFACE_TAGS`` code). Readable by meshio, VTK and ParaView."""
    import meshio

    nt, nf = len(mesh.tets), len(mesh.triangles)
    out = meshio.Mesh(
        mesh.points, [("tetra", mesh.tets.astype(np.int64)), ("triangle", mesh.triangles.astype(np.int64))],
        cell_data={"region": [np.full(nt, REGION, np.int32), np.zeros(nf, np.int32)],
                   "surface_tag": [np.zeros(nt, np.int32), mesh.tags.astype(np.int32)]})
    meshio.write(os.fspath(path), out, file_format="vtu")


# ----------------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------------

def _find_cases(folder: str, structures: Sequence[str]) -> Tuple[Dict[str, Dict[str, str]], Dict[str, str]]:
    """``({case: {structure: file name}}, {case: why it has no meshes})`` of a mesh folder: from its
    ``meshes.json`` where present (cases recorded with an error or without files are returned as skipped), else
    from the file names ``CASE_<structure><ext>``."""
    from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS
    from nnunet_topo.paths import InputReadError, read_json

    index = os.path.join(folder, MESHES_JSON)
    cases: Dict[str, Dict[str, str]] = {}
    skipped: Dict[str, str] = {}
    if os.path.isfile(index):
        table = read_json(index, MESHES_JSON).get("cases")
        if not isinstance(table, dict):
            raise InputReadError(f"cannot read {MESHES_JSON} {index}: no 'cases' table")
        for case, entry in table.items():
            files = entry.get("files") if isinstance(entry, dict) else None
            if not files:
                reason = entry.get("error") if isinstance(entry, dict) else None
                skipped[case] = f"no meshes in the input ({MESHES_JSON}: {reason or 'no files'})"
                continue
            cases[case] = {str(s): str(fn) for s, fn in files.items()}
        return cases, skipped
    by_length = sorted(structures, key=len, reverse=True)
    for fname in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(fname)
        if ext.lower() not in SUPPORTED_MESH_EXTENSIONS:
            continue
        s = next((s for s in by_length if stem.endswith("_" + s) and len(stem) > len(s) + 1), None)
        if s is None:
            continue
        case = stem[: -len(s) - 1]
        if s in cases.setdefault(case, {}):
            raise VolumeMeshError(f"case {case}: two meshes of {s} in {folder} ({cases[case][s]}, {fname}); keep one")
        cases[case][s] = fname
    return cases, skipped


def _label_volumes(path: str, rw, dataset_json: Mapping, label_sets: Mapping[str, Sequence[int]],
                   cut_for: Mapping[str, Optional[CutPlane]]) -> Dict[str, float]:
    """``{mesh: mm³}``: voxels of each label set in the label map (nnU-Net's reader), times the voxel volume; for a
    mesh with a cut plane (``cut_for``) only the voxels whose centres lie on the kept side."""
    from nnunet_topo.frames import ImageGeometry, index_to_world
    from nnunet_topo.paths import check_label_values, defined_label_values, reading

    with reading("label map", path):
        seg, props = rw.read_seg(path)
        geometry = ImageGeometry.from_nnunet_properties(props)
    seg = np.asarray(seg)
    seg = seg[0] if seg.ndim == 4 else seg
    check_label_values(seg, defined_label_values(dataset_json), path)
    voxel = abs(float(np.linalg.det(geometry.index_to_world_matrix)))
    out = {}
    for name, ids in label_sets.items():
        mask = np.isin(seg, list(ids))
        cut = cut_for.get(name)
        if cut is not None:
            xyz = index_to_world(np.argwhere(mask).astype(np.float64), geometry)
            count = int((cut.signed_distance(xyz) <= 0).sum())
        else:
            count = int(mask.sum())
        out[name] = count * voxel
    return out


def _percent(a: float, b: Optional[float]) -> Optional[float]:
    return None if b is None or b <= 0 else 100.0 * (a - b) / b


def volume_mesh_folder(input_folder: str, output_folder: str, dataset_json: Union[str, os.PathLike, dict],
                       edge_mm: float = 1.5, structures: Optional[Sequence[str]] = None, walls: bool = True,
                       labels_folder: Optional[str] = None,
                       cut_plane: Optional[Union[CutPlane, Mapping[str, CutPlane]]] = None,
                       envelope_mm: Optional[float] = None, threads: int = 0, overwrite: bool = False,
                       show_progress: bool = True) -> dict:
    """Tetrahedral meshes of the structures and walls of every case of a mesh folder (module docstring).

    Args:
        input_folder: ``CASE_<structure><ext>`` meshes (world mm) and, where present, their ``meshes.json``.
        output_folder: where ``CASE_<mesh>.vtu`` and ``volume_meshes.json`` go (never inside an input).
        dataset_json: the dataset's dataset.json (path or dict): ``topology.mesh_structures`` and the mesh rules;
            ``labels`` and ``file_ending`` for ``labels_folder``.
        edge_mm: ideal tetrahedron edge length, mm.
        structures: the mesh structures to mesh (default: all of ``mesh_structures``; ``[]``: walls only).
        walls: also mesh the wall of every mesh inclusion rule in force (:func:`walls_in_force`).
        labels_folder: label maps ``CASE<file_ending>`` of the same cases (e.g. nnU-Net's segmentations, which
            ``nnUNetv2_topo_predict_meshes`` writes beside the meshes): each volume is also compared with the voxel
            volume of its labels (a wall: the labels of ``outer`` that are not labels of ``inner``).
        cut_plane: one plane for every case, or ``{case: plane}`` (cases not listed are not cut); cuts the walls
            only (the structures stay closed), and the label volume of a cut wall counts the voxels on the kept
            side.
        envelope_mm: fTetWild's envelope in mm (default: 1e-3 of each surface's bounding-box diagonal).
        threads: fTetWild's threads (0: all cores).
        overwrite: replace the files of a non-empty output folder.

    Returns:
        The ``volume_meshes.json`` dict: ``{"input_folder", "edge_mm", "mesher", "surface_tags", "cell_data",
        "cut_plane", "frame", "cases": {CASE: {"files": {mesh: file}, "quality": {mesh: {...}}, "seconds"}},
        "cases_without_mesh": {CASE: reason}}``.

    Raises:
        VolumeMeshError: bad options, a missing structure, an invalid or intersecting surface (before any output).
        nnunet_topo.paths.OutputPathError, InputReadError, UndefinedLabelError: see :mod:`nnunet_topo.paths`.
    """
    from nnunet_topo.mesh_io import read_mesh
    from nnunet_topo.mesh_booleans import exact_violating_volume_mm3, mesh_invalid_reason
    from nnunet_topo.ftetwild import pytetwild_version
    from nnunet_topo.paths import check_output, read_json, reading
    from nnunet_topo.topology_spec import TopologySpecError, parse_topology

    if not (edge_mm > 0 and math.isfinite(edge_mm)):
        raise VolumeMeshError(f"--edge_mm must be a positive number of mm, got {edge_mm}")
    if envelope_mm is not None and not (envelope_mm > 0 and math.isfinite(envelope_mm)):
        raise VolumeMeshError(f"--envelope_mm must be a positive number of mm, got {envelope_mm}")
    if not os.path.isdir(input_folder):
        raise VolumeMeshError(f"-i {input_folder}: no such folder")
    dj_path = None if isinstance(dataset_json, dict) else os.fspath(dataset_json)
    check_output(output_folder, {"input folder": input_folder, "--labels folder": labels_folder,
                                 "dataset.json": dj_path}, kind="folder", overwrite=overwrite)
    if dj_path is not None:
        if not os.path.isfile(dj_path):
            raise VolumeMeshError(f"-djfile {dj_path}: no such file")
        dataset_json = read_json(dj_path, "dataset.json")
    try:
        spec = parse_topology(dataset_json)
    except TopologySpecError as e:
        raise VolumeMeshError(f"dataset.json: {e}") from e
    all_structures = list(spec.mesh_structures)
    if not all_structures:
        raise VolumeMeshError("dataset.json's topology block defines no mesh_structures; nothing to mesh")
    chosen = all_structures if structures is None else list(structures)
    unknown = [s for s in chosen if s not in spec.mesh_structures]
    if unknown:
        raise VolumeMeshError(f"--structures {unknown}: not mesh structures of dataset.json "
                              f"(topology.mesh_structures: {all_structures})")
    wall_list = walls_in_force(spec) if walls else []
    if not chosen and not wall_list:
        raise VolumeMeshError("nothing to mesh: no structures selected and no walls (dataset.json has no mesh "
                              "inclusion rule in force, or --no_walls)")
    needed = list(dict.fromkeys(chosen + [m for w in wall_list for m in (w.inner, w.outer)]))

    cases, skipped = _find_cases(input_folder, all_structures)
    if not cases and not skipped:
        raise VolumeMeshError(f"-i {input_folder}: no meshes CASE_<structure><ext> of the structures "
                              f"{all_structures} and no {MESHES_JSON}")
    planes: Dict[str, Optional[CutPlane]] = {}
    if isinstance(cut_plane, Mapping):
        extra = sorted(set(cut_plane) - set(cases) - set(skipped))
        if extra:
            raise VolumeMeshError(f"cut planes given for case(s) {extra} that {input_folder} does not have "
                                  f"(cases: {sorted(cases)[:10]})")
        planes = {c: cut_plane.get(c) for c in cases}
    else:
        planes = {c: cut_plane for c in cases}
    missing = [f"case {c}: no mesh of {s}" for c, files in cases.items() for s in needed if s not in files]
    if missing:
        raise VolumeMeshError(f"{'; '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} in {input_folder} "
                              f"(needed: {needed})")

    rw, file_ending = None, None
    label_sets: Dict[str, Tuple[int, ...]] = {s: tuple(spec.mesh_structures[s].label_ids) for s in chosen}
    for w in wall_list:
        label_sets[w.name] = tuple(sorted(set(spec.mesh_structures[w.outer].label_ids)
                                          - set(spec.mesh_structures[w.inner].label_ids)))
    if labels_folder is not None:
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

        if not os.path.isdir(labels_folder):
            raise VolumeMeshError(f"--labels {labels_folder}: no such folder")
        file_ending = dataset_json.get("file_ending")
        if not file_ending:
            raise VolumeMeshError("dataset.json has no file_ending; --labels needs it to find CASE<file_ending>")
        lacking = [c for c in cases if not os.path.isfile(os.path.join(labels_folder, c + file_ending))]
        if lacking:
            raise VolumeMeshError(f"--labels {labels_folder}: no label map for case(s) "
                                  f"{[c + file_ending for c in lacking[:5]]}")
        first = os.path.join(labels_folder, next(iter(cases)) + file_ending)
        rw = determine_reader_writer_from_dataset_json(dataset_json, first, verbose=False)()

    # read and check every surface before anything is written
    loaded: Dict[str, Dict[str, Any]] = {}
    problems: List[str] = []
    for case, files in cases.items():
        loaded[case], invalid = {}, set()
        for s in needed:
            path = os.path.join(input_folder, files[s])
            with reading("mesh", path):
                loaded[case][s] = read_mesh(path)
            reason = mesh_invalid_reason(loaded[case][s])
            if reason:
                invalid.add(s)
                problems.append(f"case {case}: {s} ({files[s]}) {reason}")
        for w in wall_list:
            if w.inner in invalid or w.outer in invalid:
                continue
            inner, outer = loaded[case][w.inner], loaded[case][w.outer]
            out = exact_violating_volume_mm3(inner, [outer], exclusion=False, check=False)
            if out > INCLUSION_TOLERANCE * abs(float(inner.volume)):
                problems.append(f"case {case}: {w.inner} is not inside {w.outer} ({out:.4g} mm³ of {w.inner} lies "
                                f"outside {w.outer}; wall {w.name})")
    if problems:
        raise VolumeMeshError(f"cannot volume-mesh surfaces that are not closed, intersect themselves or each other: "
                              f"{'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}; {REPAIR_HINT}")

    os.makedirs(output_folder, exist_ok=True)
    summary: dict = {
        "input_folder": os.path.abspath(input_folder),
        "labels_folder": None if labels_folder is None else os.path.abspath(labels_folder),
        "edge_mm": float(edge_mm),
        "envelope_mm": "fTetWild default: 1e-3 of the surface's bounding-box diagonal" if envelope_mm is None
        else float(envelope_mm),
        "mesher": f"fTetWild via pytetwild {pytetwild_version()} (MPL-2.0)",
        "frame": "world (x, y, z) mm, as the input meshes",
        "surface_tags": dict(SURFACE_TAGS),
        "cell_data": {"region": f"{REGION} on the tetra block, 0 on the triangle block",
                      "surface_tag": "SURFACE_TAGS code on the triangle block (the boundary), 0 on the tetra block"},
        "structures": chosen,
        "walls": {w.name: {"inner": w.inner, "outer": w.outer, "rule": w.rule} for w in wall_list},
        "cut_plane": (cut_plane.to_dict() if isinstance(cut_plane, CutPlane) else
                      {c: p.to_dict() for c, p in cut_plane.items()} if cut_plane else None),
        "cases": {},
        "cases_without_mesh": dict(skipped),
    }
    it: Sequence = list(cases)
    if show_progress:
        from tqdm import tqdm
        it = tqdm(it, desc="volume meshes")
    for case in it:
        t0 = time.time()
        plane = planes.get(case)
        label_mm3 = {} if labels_folder is None else _label_volumes(
            os.path.join(labels_folder, case + file_ending), rw, dataset_json, label_sets,
            {w.name: plane for w in wall_list})
        jobs = [(s, "structure", structure_surface(loaded[case][s]), None) for s in chosen]
        for w in wall_list:
            try:
                surface = wall_surface(loaded[case][w.inner], loaded[case][w.outer], plane)
            except VolumeMeshError as e:
                raise VolumeMeshError(f"case {case}: wall {w.name}: {e}") from e
            jobs.append((w.name, "wall", surface, w))
        files, quality = {}, {}
        for name, kind, (v, f, tags, surface_volume), w in jobs:
            try:
                tm = volume_mesh(v, f, tags, edge_mm, envelope_mm, threads)
            except VolumeMeshError as e:
                raise VolumeMeshError(f"case {case}: {name}: {e}") from e
            fname = f"{case}_{name}.vtu"
            write_vtu(os.path.join(output_folder, fname), tm)
            q = {"kind": kind, **({"inner": w.inner, "outer": w.outer} if w else {}), **tm.quality,
                 "surface_volume_mm3": surface_volume,
                 "volume_vs_surface_percent": _percent(tm.quality["volume_mm3"], surface_volume)}
            if kind == "wall":
                q["cut"] = plane is not None
            if name in label_mm3:
                q["label_volume_mm3"] = label_mm3[name]
                q["volume_vs_labels_percent"] = _percent(tm.quality["volume_mm3"], label_mm3[name])
            files[name], quality[name] = fname, q
        summary["cases"][case] = {"files": files, "quality": quality, "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(output_folder, OUTPUT_JSON), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def format_volume_mesh_table(summary: dict) -> str:
    """The quality figures of ``volume_meshes.json`` as a text table, one row per case and mesh."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = (f"{'case':<16} {'mesh':<18} {'tets':>8} {'min dih°':>8} {'mean dih°':>9} {'inverted':>8} "
            f"{'vs surface %':>12} {'vs labels %':>11} {'max dev mm':>10} {'mesher s':>8} {'cpu s':>6}")
    rows = [head, "-" * len(head)]
    for case, entry in summary["cases"].items():
        for name, q in entry["quality"].items():
            dev = q["boundary_deviation_mm"]
            rows.append(f"{case:<16} {name:<18} {q['tets']:>8d} {num(q['min_dihedral_deg'], '.1f'):>8} "
                        f"{num(q['mean_dihedral_deg'], '.1f'):>9} {q['inverted_tets']:>8d} "
                        f"{num(q['volume_vs_surface_percent'], '+.2f'):>12} "
                        f"{num(q.get('volume_vs_labels_percent'), '+.2f'):>11} "
                        f"{max(dev['tet_to_surface_max'], dev['surface_to_tet_max']):>10.3f} "
                        f"{q['mesher_seconds']:>8.1f} {q['mesher_cpu_seconds']:>6.1f}")
    for case, reason in summary["cases_without_mesh"].items():
        rows.append(f"{case:<16} skipped: {reason}")
    return "\n".join(rows)
