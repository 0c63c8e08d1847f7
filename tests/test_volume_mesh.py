"""Tetrahedral meshes for simulation (issue 25 item 3): tet quality against naive references, the wall of two nested
spheres against the analytic shell, its surface tags, the VTU read back by meshio, one case through the real console
script (cut plane, label volumes, a case without meshes), and every refusal with the inputs byte-identical."""
import hashlib
import json
import math
import os
import subprocess

import meshio
import numpy as np
import pytest
import SimpleITK as sitk
import trimesh

from conftest import nnunet_cli
from nnunet_topo.ftetwild import FTetWildError, _in_child, tetrahedralize
from nnunet_topo.mesh_io import export_mesh
from nnunet_topo.metrics.tet_quality import (boundary_triangles, tet_dihedral_angles_deg, tet_quality,
                                             tet_signed_volumes)
from nnunet_topo.cli.volume_mesh import volume_mesh_entry
from nnunet_topo.volume_mesh import (SURFACE_TAGS, CutPlane, VolumeMeshError, volume_mesh, wall_surface, write_vtu)

R_OUT, R_IN = 10.0, 7.0
SHELL = 4 / 3 * math.pi * (R_OUT ** 3 - R_IN ** 3)
DATASET = {"name": "Spheres", "labels": {"background": 0, "LV": 1, "MYO": 2}, "file_ending": ".nii.gz",
           "channel_names": {"0": "MRI"}, "numTraining": 1,
           "topology": {"mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"]},
                        "mesh_rules": [{"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"}]}}


def sphere(r, centre=(0.0, 0.0, 0.0), sub=3):
    m = trimesh.creation.icosphere(sub, radius=r)
    m.apply_translation(centre)
    return m


# ---------------------------------------------------------------------------------------------------- tet quality

def _naive_dihedral(p):
    """Dihedral angles of one tetrahedron by a different route: at edge (i, j), the angle between the two other
    vertices projected onto the plane perpendicular to the edge."""
    out = []
    for i in range(4):
        for j in range(i + 1, 4):
            k, m = [x for x in range(4) if x not in (i, j)]
            e = (p[j] - p[i]) / np.linalg.norm(p[j] - p[i])
            a, b = p[k] - p[i], p[m] - p[i]
            a, b = a - (a @ e) * e, b - (b @ e) * e
            out.append(math.degrees(math.acos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))
    return sorted(out)


def test_dihedral_angles_against_known_tets_and_a_naive_loop():
    regular = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    corner = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    rng = np.random.default_rng(0)
    pts = np.concatenate([regular, corner, rng.normal(size=(40, 3))])
    tets = np.concatenate([[[0, 1, 2, 3]], [[4, 5, 6, 7]], 8 + np.arange(40).reshape(10, 4)])
    ang = tet_dihedral_angles_deg(pts, tets)
    assert ang[0] == pytest.approx([math.degrees(math.acos(1 / 3))] * 6)
    assert sorted(ang[1]) == pytest.approx([math.degrees(math.acos(1 / math.sqrt(3)))] * 3 + [90.0] * 3)
    for t, row in zip(tets, ang):
        assert sorted(row) == pytest.approx(_naive_dihedral(pts[t]), abs=1e-7)
    # orientation: the angles do not depend on the vertex order, the signed volume does
    assert np.sort(tet_dihedral_angles_deg(pts, tets[:, [1, 0, 2, 3]]), axis=1) == pytest.approx(np.sort(ang, axis=1))
    assert tet_signed_volumes(corner, [[0, 1, 2, 3]])[0] == pytest.approx(1 / 6)
    assert tet_signed_volumes(corner, [[1, 0, 2, 3]])[0] == pytest.approx(-1 / 6)
    q = tet_quality(corner, [[1, 0, 2, 3]])
    assert q["inverted_tets"] == 1 and q["tets"] == 1


def test_boundary_triangles_are_the_unshared_faces_oriented_outward():
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], float)
    tets = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])
    tets[1] = tets[1] if tet_signed_volumes(pts, tets[1:])[0] > 0 else tets[1][[1, 0, 2, 3]]
    tri, owner = boundary_triangles(tets)
    assert len(tri) == 6 and sorted(owner.tolist()) == [0, 0, 0, 1, 1, 1]
    assert not any(set(t) == {1, 2, 3} for t in tri.tolist())  # the shared face is inside
    # outward: the divergence theorem gives the enclosed volume with a positive sign
    a, b, c = (pts[tri[:, i]] for i in range(3))
    assert np.einsum("ij,ij->i", np.cross(a, b), c).sum() / 6 == pytest.approx(tet_signed_volumes(pts, tets).sum())


# ---------------------------------------------------------------------------------------------------- fTetWild guard

def test_ftetwild_refuses_bad_input_and_survives_its_own_crash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = sphere(5.0, sub=1)
    v, f = np.array(m.vertices), np.array(m.faces)
    nan = v.copy()
    nan[0] = np.nan
    for args, text in (((nan, f, 1.0), "non-finite"), ((v, f + 100, 1.0), "face indices"),
                       ((v, f, 0.0), "edge_mm"), ((v, f[:, :2], 1.0), "faces")):
        with pytest.raises(FTetWildError, match=text):
            tetrahedralize(*args)
    with pytest.raises(FTetWildError, match="no tetrahedra"):  # a flat, doubled triangle encloses nothing
        tetrahedralize(v[:3], np.array([[0, 1, 2], [0, 2, 1]]), 1.0, threads=1)
    # an out-of-range face index past the checks segfaults fTetWild: the child dies, the caller gets an error
    with pytest.raises(FTetWildError, match="crashed"):
        _in_child(v, np.where(f == 0, 10 ** 6, f), 1.0, 1e-3, 1)
    assert os.listdir(tmp_path) == []  # fTetWild's __tracked_surface.stl stays in its scratch folder


# ---------------------------------------------------------------------------------------------------- wall

def test_wall_of_two_nested_spheres(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    v, f, tags, surface_volume = wall_surface(sphere(R_IN), sphere(R_OUT))
    tm = volume_mesh(v, f, tags, edge_mm=1.5, threads=1)
    assert os.listdir(cwd) == []  # fTetWild's debug file __tracked_surface.stl stays in its scratch folder
    q = tm.quality
    assert q["volume_mm3"] == pytest.approx(SHELL, rel=0.02)
    assert q["volume_mm3"] == pytest.approx(surface_volume, rel=2e-3)  # fTetWild's envelope changes little
    assert q["inverted_tets"] == 0 and (tet_signed_volumes(tm.points, tm.tets) > 0).all()
    assert q["min_dihedral_deg"] > 0
    assert q["boundary_deviation_mm"]["surface_to_tet_max"] <= q["envelope_mm"] * 1.01
    assert set(q["boundary_triangles"]) == {"endocardial", "epicardial"}
    path = tmp_path / "wall.vtu"
    write_vtu(path, tm)
    back = meshio.read(path)
    assert [b.type for b in back.cells] == ["tetra", "triangle"]
    assert len(back.cells[0].data) == q["tets"]
    region, stag = back.cell_data["region"], back.cell_data["surface_tag"]
    assert (region[0] == 1).all() and (region[1] == 0).all() and (stag[0] == 0).all()
    r = np.linalg.norm(back.points[back.cells[1].data].mean(axis=1), axis=1)  # triangle centroids
    endo, epi = stag[1] == SURFACE_TAGS["endocardial"], stag[1] == SURFACE_TAGS["epicardial"]
    assert endo.sum() > 100 and epi.sum() > 100 and (endo | epi).all()
    # a flat triangle's centroid lies inside the sphere by at most its sagitta (< 0.1 mm here)
    assert np.abs(r[endo] - R_IN).max() < 0.1 and np.abs(r[epi] - R_OUT).max() < 0.1


def test_cut_plane_api():
    assert CutPlane.from_numbers([0, 0, 3, 0, 0, 2]).normal == (0.0, 0.0, 1.0)
    with pytest.raises(VolumeMeshError, match="normal"):
        CutPlane.from_numbers([0, 0, 3, 0, 0, 0])
    with pytest.raises(VolumeMeshError, match="no volume"):  # the kept side holds none of the wall
        wall_surface(sphere(R_IN, sub=2), sphere(R_OUT, sub=2), CutPlane.from_numbers([0, 0, -20, 0, 0, 1]))


# ---------------------------------------------------------------------------------------------------- folder / CLI

def _tree_hash(root):
    out = {}
    for d, _, files in os.walk(root):
        for fn in files:
            p = os.path.join(d, fn)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _mesh_folder(root, inner=None, outer=None, skip_outer=False, with_json=True):
    """A predict_meshes-like folder: case A's two meshes, meshes.json (case B recorded without meshes), and the
    label map of case A (LV ball r 7, MYO shell to r 10, 0.5 mm voxels) beside them as predict_meshes writes it."""
    root.mkdir(parents=True)
    files = {"LV_endo": "A_LV_endo.vtk", "LV_epi": "A_LV_epi.vtk"}
    export_mesh(inner if inner is not None else sphere(R_IN), root / files["LV_endo"])
    if skip_outer:
        del files["LV_epi"]
    else:
        export_mesh(outer if outer is not None else sphere(R_OUT), root / files["LV_epi"])
    if with_json:
        (root / "meshes.json").write_text(json.dumps({
            "format": ".vtk", "structures": ["LV_endo", "LV_epi"],
            "cases": {"A": {"files": files, "segmentation": "A.nii.gz"},
                      "B": {"error": "no predicted LV_epi", "files": {}, "segmentation": "B.nii.gz"}},
            "cases_without_mesh": ["B"]}))
    n, h = 48, 0.5
    zyx = (np.indices((n, n, n)).transpose(1, 2, 3, 0) - (n - 1) / 2) * h
    r = np.linalg.norm(zyx, axis=-1)
    seg = np.where(r <= R_IN, 1, np.where(r <= R_OUT, 2, 0)).astype(np.uint8)
    img = sitk.GetImageFromArray(seg)
    img.SetSpacing((h, h, h))
    img.SetOrigin((-(n - 1) / 2 * h,) * 3)
    sitk.WriteImage(img, str(root / "A.nii.gz"))
    return root


@pytest.fixture
def dataset_json(tmp_path):
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps(DATASET))
    return p


def test_one_case_through_the_console_script(tmp_path, dataset_json):
    inp = _mesh_folder(tmp_path / "meshes")
    before = _tree_hash(inp)
    out = tmp_path / "volumes"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [nnunet_cli("nnUNetv2_topo_volume_mesh"), "-i", inp, "-o", out, "-djfile", dataset_json, "--edge_mm", 2,
            "--labels", inp, "--cut_plane", 0, 0, 3, 0, 0, 1, "--structures", "LV_endo", "--threads", 1]
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(cwd) == []
    assert "skipped: B" in proc.stderr
    assert "LV_epi-LV_endo" in proc.stdout and "min dih" in proc.stdout
    assert _tree_hash(inp) == before
    summary = json.loads((out / "volume_meshes.json").read_text())
    assert summary["cases_without_mesh"] == {"B": "no meshes in the input (meshes.json: no predicted LV_epi)"}
    entry = summary["cases"]["A"]
    assert set(entry["files"]) == {"LV_endo", "LV_epi-LV_endo"}
    for name, q in entry["quality"].items():
        assert q["inverted_tets"] == 0 and q["min_dihedral_deg"] > 0, name
        assert abs(q["volume_vs_surface_percent"]) < 0.5, name
        assert abs(q["volume_vs_labels_percent"]) < 4, name  # 0.5 mm voxels against icospheres
    assert entry["quality"]["LV_endo"]["volume_mm3"] == pytest.approx(4 / 3 * math.pi * R_IN ** 3, rel=0.02)
    wall = entry["quality"]["LV_epi-LV_endo"]
    assert wall["cut"] and set(wall["boundary_triangles"]) == {"endocardial", "epicardial", "basal"}
    back = meshio.read(out / entry["files"]["LV_epi-LV_endo"])
    tri, tags = back.cells[1].data, back.cell_data["surface_tag"][1]
    basal = back.points[tri[tags == SURFACE_TAGS["basal"]]]
    assert len(basal) > 20 and np.abs(basal[..., 2] - 3.0).max() < 0.05  # on the plane, within the envelope
    assert back.points[:, 2].max() < 3.05  # nothing kept beyond the cut
    r = np.linalg.norm(basal[..., :2], axis=-1)
    # the ring between the spheres' circles at z = 3 (icosphere chords lie inside the circles)
    assert r.min() > math.sqrt(R_IN ** 2 - 9) - 0.1 and r.max() < math.sqrt(R_OUT ** 2 - 9) + 0.05
    structure = meshio.read(out / entry["files"]["LV_endo"])
    assert set(np.unique(structure.cell_data["surface_tag"][1])) == {SURFACE_TAGS["boundary"]}


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        volume_mesh_entry([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def _open(m):
    return trimesh.Trimesh(m.vertices, m.faces[1:], process=False)


def _self_intersecting():
    a, b = sphere(R_OUT, sub=2), sphere(4.0, (9.0, 0, 0), sub=2)
    return trimesh.Trimesh(np.concatenate([a.vertices, b.vertices]),
                           np.concatenate([a.faces, b.faces + len(a.vertices)]), process=False)


@pytest.mark.parametrize("case, offenders", [
    ("open mesh", ["case A", "LV_epi", "A_LV_epi.vtk", "not a closed", "nnUNetv2_topo_repair_meshes"]),
    ("self-intersecting", ["case A", "LV_epi", "intersects itself", "nnUNetv2_topo_repair_meshes"]),
    ("inner pokes out", ["case A", "LV_endo is not inside LV_epi", "nnUNetv2_topo_repair_meshes"]),
    ("missing structure", ["case A", "no mesh of LV_epi"]),
    ("missing structure, no meshes.json", ["case A", "no mesh of LV_epi"]),
    ("existing output", ["exists and is not empty", "--overwrite"]),
    ("output inside input", ["lies inside the input folder"]),
])
def test_refusals(tmp_path, dataset_json, capsys, case, offenders):
    kw = {"open mesh": dict(outer=_open(sphere(R_OUT, sub=2))),
          "self-intersecting": dict(outer=_self_intersecting()),
          "inner pokes out": dict(inner=sphere(R_IN, (4.0, 0, 0), sub=2), outer=sphere(R_OUT, sub=2)),
          "missing structure": dict(skip_outer=True),
          "missing structure, no meshes.json": dict(skip_outer=True, with_json=False)}.get(case, {})
    inp = _mesh_folder(tmp_path / "meshes", **kw)
    before = _tree_hash(inp)
    out = tmp_path / "volumes"
    if case == "existing output":
        out.mkdir()
        (out / "old.vtu").write_text("keep me")
    if case == "output inside input":
        out = inp / "volumes"
    code, err = _run(["-i", inp, "-o", out, "-djfile", dataset_json, "--threads", "1"], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in offenders:
        assert text in err, (text, err)
    assert _tree_hash(inp) == before
    if case == "existing output":
        assert (out / "old.vtu").read_text() == "keep me" and os.listdir(out) == ["old.vtu"]
    elif case != "output inside input":
        assert not out.exists()


def test_refusals_of_options(tmp_path, dataset_json, capsys):
    inp = _mesh_folder(tmp_path / "meshes")
    for extra, text in ((["--structures", "RV"], "--structures ['RV']"),
                        (["--structures", "--no_walls"], "nothing to mesh"),
                        (["--edge_mm", "0"], "--edge_mm")):
        code, err = _run(["-i", inp, "-o", tmp_path / "v", "-djfile", dataset_json, *extra], capsys)
        assert code == 2 and text in err, err
