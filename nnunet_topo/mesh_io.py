"""Triangle-mesh files: write and read VTK legacy (``.vtk``), VTK XML PolyData (``.vtp``), PLY, OBJ and STL.

Implements the "Export" item of DESIGN.md section 7 (meshes in patient coordinates, one file per structure):
:func:`export_mesh` / :func:`read_mesh` for the geometry and :func:`read_point_data` for per-vertex scalars
(e.g. ``spread_mm``) of ``.vtk``/``.vtp`` files. VTK legacy and VTP are written and parsed here (meshio writes no
PolyData); PLY/OBJ/STL go through trimesh. See ``documentation/meshes.md``. No nnU-Net import here.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import numpy as np
import trimesh

__all__ = [
    "SUPPORTED_MESH_EXTENSIONS",
    "export_mesh",
    "read_mesh",
    "read_point_data",
]

#: File extensions accepted by :func:`export_mesh` and :func:`read_mesh` (lower case).
SUPPORTED_MESH_EXTENSIONS = (".vtk", ".vtp", ".ply", ".obj", ".stl")


def _extension(path: str) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in SUPPORTED_MESH_EXTENSIONS:
        raise ValueError(
            f"unsupported mesh file extension {ext!r} in {str(path)!r}; supported: "
            f"{', '.join(SUPPORTED_MESH_EXTENSIONS)}."
        )
    return ext


def _mesh_arrays(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(
            f"expected a triangle mesh with (V, 3) vertices and (F, 3) faces, got "
            f"{vertices.shape} and {faces.shape}."
        )
    if not np.all(np.isfinite(vertices)):
        raise ValueError("the mesh has non-finite vertex coordinates; refusing to write it.")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError("the mesh has face indices outside its vertex array.")
    return vertices, faces


def _check_point_data(point_data: Mapping[str, Any] | None, n_vertices: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, values in (point_data or {}).items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (n_vertices,):
            raise ValueError(f"point data {name!r} must be one value per vertex, shape ({n_vertices},), got "
                             f"{arr.shape}.")
        if not name or any(c.isspace() for c in name) or any(c in name for c in "<>&\"'"):
            raise ValueError(f"point data name {name!r} must be non-empty without spaces or XML characters.")
        out[name] = arr
    return out


def _write_vtk_legacy(path: str, vertices: np.ndarray, faces: np.ndarray,
                      point_data: Mapping[str, np.ndarray] | None = None) -> None:
    """Legacy VTK 4.2 POLYDATA, binary (big-endian float64 points, int32 polygon lists; point data as
    ``POINT_DATA`` float64 ``SCALARS``)."""
    if len(faces) and 4 * len(faces) >= 2**31:
        raise ValueError("mesh too large for a legacy VTK file (int32 indices).")
    polys = np.concatenate([np.full((len(faces), 1), 3, np.int64), faces], axis=1)
    with open(path, "wb") as f:
        f.write(b"# vtk DataFile Version 4.2\n")
        f.write(b"nnunet-topo surface mesh, world coordinates in mm SPACE=LPS\n")
        f.write(b"BINARY\n")
        f.write(b"DATASET POLYDATA\n")
        f.write(f"POINTS {len(vertices)} double\n".encode())
        f.write(vertices.astype(">f8").tobytes())
        f.write(b"\n")
        f.write(f"POLYGONS {len(faces)} {polys.size}\n".encode())
        f.write(polys.astype(">i4").tobytes())
        f.write(b"\n")
        if point_data:
            f.write(f"POINT_DATA {len(vertices)}\n".encode())
            for name, values in point_data.items():
                f.write(f"SCALARS {name} double 1\nLOOKUP_TABLE default\n".encode())
                f.write(np.asarray(values, np.float64).astype(">f8").tobytes())
                f.write(b"\n")


def _write_vtp(path: str, vertices: np.ndarray, faces: np.ndarray,
               point_data: Mapping[str, np.ndarray] | None = None) -> None:
    """VTK XML PolyData, ASCII (17 significant digits, so float64 coordinates round-trip); point data as Float64
    ``PointData`` arrays (before ``Points``, the order of the VTK XML format)."""
    pd = ""
    if point_data:
        arrays = "".join(
            f'        <DataArray type="Float64" Name="{name}" NumberOfComponents="1" format="ascii">\n'
            f"          {' '.join(repr(float(v)) for v in values)}\n"
            "        </DataArray>\n"
            for name, values in point_data.items())
        pd = f'      <PointData Scalars="{next(iter(point_data))}">\n{arrays}      </PointData>\n'
    pts = " ".join(repr(float(v)) for v in vertices.ravel())
    conn = " ".join(str(int(i)) for i in faces.ravel())
    offs = " ".join(str(3 * (k + 1)) for k in range(len(faces)))
    text = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
        "  <PolyData>\n"
        f'    <Piece NumberOfPoints="{len(vertices)}" NumberOfVerts="0" NumberOfLines="0" '
        f'NumberOfStrips="0" NumberOfPolys="{len(faces)}">\n'
        f"{pd}"
        "      <Points>\n"
        '        <DataArray type="Float64" Name="Points" NumberOfComponents="3" format="ascii">\n'
        f"          {pts}\n"
        "        </DataArray>\n"
        "      </Points>\n"
        "      <Polys>\n"
        '        <DataArray type="Int64" Name="connectivity" format="ascii">\n'
        f"          {conn}\n"
        "        </DataArray>\n"
        '        <DataArray type="Int64" Name="offsets" format="ascii">\n'
        f"          {offs}\n"
        "        </DataArray>\n"
        "      </Polys>\n"
        "    </Piece>\n"
        "  </PolyData>\n"
        "</VTKFile>\n"
    )
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike, overwrite: bool = False,
                point_data: Mapping[str, Any] | None = None) -> str:
    """Write a triangle mesh; the format follows the file extension.

    * ``.vtk``: legacy VTK 4.2 ``POLYDATA`` (binary), written here: surface meshes are VTK
      PolyData (readable by ParaView, 3D Slicer, VTK's ``vtkPolyDataReader``, pyvista). meshio
      5.3 writes only ``UNSTRUCTURED_GRID`` datasets, which some surface tools do not accept, and
      has no ``.vtp`` support at all.
    * ``.vtp``: VTK XML PolyData (ASCII), written here.
    * ``.ply`` / ``.obj`` / ``.stl``: through trimesh (binary PLY, OBJ without normals, binary STL).

    Vertex order is preserved by every format but STL (which stores each triangle's corners and
    loses vertex sharing; :func:`read_mesh` merges them again). Coordinates are written as
    given: for meshes from :func:`nnunet_topo.surfaces.mesh_from_mask` with a geometry, ITK physical coordinates in mm
    (LPS for medical images), which 3D Slicer (>= 4.11) assumes for mesh files by default.

    Args:
        mesh: the mesh (``vertices (V, 3)``, ``faces (F, 3)``).
        path: output file; missing parent folders are created.
        overwrite: replace an existing file; by default an existing file is an error.
        point_data: ``{name: (V,) values}``, one scalar per vertex (e.g. ``spread_mm``), written as VTK point data
            (float64) into ``.vtk``/``.vtp`` files and read back by :func:`read_point_data`; other formats refuse it
            (``ValueError``).

    Returns:
        The path written, as a string.

    Raises:
        ValueError: unknown extension (the message lists the supported ones), or an invalid mesh.
        FileExistsError: the file exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    vertices, faces = _mesh_arrays(mesh)
    pdata = _check_point_data(point_data, len(vertices))
    if pdata and ext not in (".vtk", ".vtp"):
        raise ValueError(f"point data ({', '.join(pdata)}) is written only into .vtk/.vtp files, not {ext}.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if ext == ".vtk":
        _write_vtk_legacy(path, vertices, faces, pdata)
    elif ext == ".vtp":
        _write_vtp(path, vertices, faces, pdata)
    else:
        plain = trimesh.Trimesh(vertices, faces, process=False)
        kwargs = {"include_normals": False} if ext == ".obj" else {}
        plain.export(path, file_type=ext[1:], **kwargs)
    return path


def _read_vtk_legacy(path: str, point_data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Legacy VTK POLYDATA (versions <= 4.2 and 5.1, ASCII or binary); triangles only.

    Other legacy datasets (``UNSTRUCTURED_GRID``) are read with meshio. If ``point_data`` is a dict, the
    ``POINT_DATA`` ``SCALARS`` arrays are stored in it (``{name: (V,) or (V, k)}``); other attributes are skipped.
    """
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n", 4)
    if len(lines) < 5 or not lines[0].startswith(b"# vtk DataFile Version"):
        raise ValueError(f"{path} is not a legacy VTK file (no '# vtk DataFile Version' header).")
    mode = lines[2].strip().upper()
    dataset = lines[3].strip().upper()
    if dataset != b"DATASET POLYDATA":
        import meshio

        m = meshio.read(path)
        tri = [c.data for c in m.cells if c.type == "triangle"]
        others = sorted({c.type for c in m.cells if c.type != "triangle"})
        if others or not tri:
            raise ValueError(f"{path}: expected a triangle surface, found cells {others or 'none'}.")
        return np.asarray(m.points, np.float64), np.concatenate(tri).astype(np.int64)
    if mode not in (b"ASCII", b"BINARY"):
        raise ValueError(f"{path}: unknown legacy VTK data mode {mode!r}.")
    binary = mode == b"BINARY"
    body = lines[4]
    pos = 0
    vtk_types = {
        "float": "f4", "double": "f8", "int": "i4", "long": "i8", "vtktypeint64": "i8",
        "vtktypeint32": "i4", "unsigned_int": "u4", "unsigned_long": "u8", "short": "i2",
    }

    def raw_line() -> bytes | None:
        nonlocal pos
        if pos >= len(body):
            return None
        end = body.find(b"\n", pos)
        end = len(body) if end < 0 else end
        line = body[pos:end].strip()
        pos = end + 1
        return line

    def next_line() -> list[str]:
        while True:
            line = raw_line()
            if line is None:
                return []
            if line:
                return line.decode().split()

    def read_values(count: int, vtk_type: str) -> np.ndarray:
        nonlocal pos
        dt = np.dtype(vtk_types[vtk_type.lower()])
        if binary:
            nbytes = count * dt.itemsize
            arr = np.frombuffer(body, dtype=dt.newbyteorder(">"), count=count, offset=pos)
            pos += nbytes
            return arr.astype(dt.newbyteorder("="))
        out: list[str] = []
        while len(out) < count:
            toks = next_line()
            if not toks:
                raise ValueError(f"{path}: unexpected end of file.")
            out.extend(toks)
        return np.asarray(out[:count], dtype=dt)

    version_51 = lines[0].strip().endswith(b"5.1")
    points = None
    faces = None
    while True:
        toks = next_line()
        if not toks:
            break
        key = toks[0].upper()
        if key == "POINTS":
            points = read_values(3 * int(toks[1]), toks[2]).reshape(-1, 3).astype(np.float64)
        elif key == "POLYGONS":
            n_a, n_b = int(toks[1]), int(toks[2])
            nxt = next_line() if version_51 else None
            if nxt and nxt[0].upper() == "OFFSETS":  # VTK 5.1: offsets + connectivity
                offsets = read_values(n_a, nxt[1]).astype(np.int64)
                conn_hdr = next_line()
                conn = read_values(n_b, conn_hdr[1]).astype(np.int64)
                if not np.all(np.diff(offsets) == 3):
                    raise ValueError(f"{path}: only triangle polygons are supported.")
                faces = conn.reshape(-1, 3)
            else:
                if nxt:
                    raise ValueError(f"{path}: cannot parse POLYGONS section.")
                lst = read_values(n_b, "int").astype(np.int64).reshape(n_a, -1) if n_a else None
                if lst is not None and (lst.shape[1] != 4 or np.any(lst[:, 0] != 3)):
                    raise ValueError(f"{path}: only triangle polygons are supported.")
                faces = lst[:, 1:] if lst is not None else np.zeros((0, 3), np.int64)
        elif key == "METADATA":  # VTK >= 9 writes these after arrays; a blank line ends them
            while raw_line():
                pass
        elif key in ("VERTICES", "LINES", "TRIANGLE_STRIPS"):
            if int(toks[2]) > 0:
                raise ValueError(f"{path}: {key} cells are not supported (triangle surfaces only).")
            if version_51:  # empty section: OFFSETS (one 0) and an empty CONNECTIVITY
                hdr = next_line()
                read_values(int(toks[1]), hdr[1])
                next_line()
        elif key == "POINT_DATA" and point_data is not None and points is not None:
            n_pts = int(toks[1])
            while True:
                hdr = next_line()
                if not hdr or hdr[0].upper() != "SCALARS":
                    break  # other attributes (VECTORS, FIELD, CELL_DATA...) are not read
                ncomp = int(hdr[3]) if len(hdr) > 3 else 1
                lut = next_line()
                if not lut or lut[0].upper() != "LOOKUP_TABLE":
                    raise ValueError(f"{path}: SCALARS {hdr[1]} without LOOKUP_TABLE.")
                vals = read_values(n_pts * ncomp, hdr[2]).astype(np.float64)
                point_data[hdr[1]] = vals if ncomp == 1 else vals.reshape(n_pts, ncomp)
            break
        elif key in ("POINT_DATA", "CELL_DATA", "FIELD"):
            break  # attribute data follows the geometry; not needed
        else:
            raise ValueError(f"{path}: unexpected legacy VTK section {key!r}.")
    if points is None or faces is None:
        raise ValueError(f"{path}: no POINTS or no POLYGONS section.")
    return points, faces


def _read_vtp(path: str, point_data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """VTK XML PolyData with ASCII data arrays (as written by :func:`export_mesh`); ``PointData`` arrays into
    ``point_data`` if it is a dict."""
    root = ET.parse(path).getroot()
    if root.get("type") != "PolyData":
        raise ValueError(f"{path}: not a VTK XML PolyData file (type={root.get('type')!r}).")
    piece = root.find("PolyData/Piece")
    if piece is None:
        raise ValueError(f"{path}: no PolyData/Piece element.")

    def array(elem: ET.Element | None, what: str) -> np.ndarray:
        if elem is None:
            raise ValueError(f"{path}: missing {what}.")
        if elem.get("format", "ascii") != "ascii":
            raise ValueError(
                f"{path}: {what} is stored as {elem.get('format')!r}; only ASCII .vtp files are "
                "read (convert with ParaView/meshio, or use .vtk/.ply)."
            )
        return np.asarray((elem.text or "").split(), dtype=np.float64)

    points = array(piece.find("Points/DataArray"), "Points").reshape(-1, 3)
    polys = {e.get("Name"): e for e in piece.findall("Polys/DataArray")}
    conn = array(polys.get("connectivity"), "Polys connectivity").astype(np.int64)
    offsets = array(polys.get("offsets"), "Polys offsets").astype(np.int64)
    if len(offsets) and not np.all(np.diff(np.concatenate([[0], offsets])) == 3):
        raise ValueError(f"{path}: only triangle polygons are supported.")
    for kind in ("Verts", "Lines", "Strips"):
        if int(piece.get(f"NumberOf{kind}", "0")) > 0:
            raise ValueError(f"{path}: {kind} cells are not supported (triangle surfaces only).")
    if point_data is not None:
        for elem in piece.findall("PointData/DataArray"):
            vals = array(elem, f"PointData {elem.get('Name')}")
            ncomp = int(elem.get("NumberOfComponents", "1"))
            point_data[elem.get("Name")] = vals if ncomp == 1 else vals.reshape(-1, ncomp)
    return points, conn.reshape(-1, 3)


def read_point_data(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The per-vertex scalar arrays of a ``.vtk`` (legacy ``POINT_DATA SCALARS``) or ``.vtp`` (``PointData``) file,
    e.g. ``{"spread_mm": (V,)}`` as written by :func:`export_mesh`; ``{}`` when there are none.

    Raises:
        ValueError: another extension (other formats carry no point data here), or a malformed file.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if ext not in (".vtk", ".vtp"):
        raise ValueError(f"{path}: point data is read from .vtk/.vtp files only.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no mesh file at {path}.")
    out: dict[str, np.ndarray] = {}
    (_read_vtk_legacy if ext == ".vtk" else _read_vtp)(path, out)
    return out


def read_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Read a triangle mesh written by :func:`export_mesh` (or a compatible file).

    ``.vtk``: legacy POLYDATA (ASCII or binary, versions 4.2 and 5.1) is parsed here, other legacy
    datasets with triangle cells through meshio; ``.vtp``: ASCII VTK XML PolyData only;
    ``.ply``/``.obj``/``.stl``: trimesh. The vertex order of the file is kept (no merging), except
    for STL, whose duplicated triangle corners are merged into shared vertices.

    Returns:
        ``trimesh.Trimesh`` (``process=False``).

    Raises:
        ValueError: unknown extension, or a file that is not a triangle surface.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no mesh file at {path}.")
    if ext == ".vtk":
        vertices, faces = _read_vtk_legacy(path)
    elif ext == ".vtp":
        vertices, faces = _read_vtp(path)
    else:
        loaded = trimesh.load(path, file_type=ext[1:], force="mesh", process=False)
        if ext == ".stl":
            loaded.merge_vertices()
        vertices, faces = np.asarray(loaded.vertices), np.asarray(loaded.faces)
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"{path}: face indices outside the vertex array.")
    return trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=False)
