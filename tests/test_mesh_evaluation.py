"""Mesh evaluation: Dice by occupancy, Chamfer/HD95, mesh TVS with known overlap volumes, folder reading."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import trimesh

from nnunet_topo.mesh_evaluation import (
    MeshEvaluationError,
    evaluate_mesh_case,
    evaluate_mesh_folder,
    merge_mesh_summary,
    voxelize_mesh,
)
from nnunet_topo.frames import ImageGeometry, index_to_world
from nnunet_topo.mesh_io import export_mesh
from nnunet_topo.surfaces import mesh_from_mask
from nnunet_topo.topology_spec import parse_topology

LABELS = {"background": 0, "A": 1, "B": 2, "I": 3, "O": 4}
DATASET_JSON = {
    "labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "numTraining": 1,
    "topology": {
        "rules": [{"type": "exclusion", "a": "A", "b": "B"},
                  {"type": "inclusion", "inner": "I", "outer": ["I", "O"]}],
        "mesh_structures": {"A": ["A"], "B": ["B"], "I": ["I"], "outer": ["I", "O"]},
    },
}
SPEC = parse_topology(DATASET_JSON)
SHAPE = (10, 24, 30)
# spacing (x, y, z) = (0.5, 1, 2) mm, a rotated direction
_c, _s = math.cos(0.4), math.sin(0.4)
OBLIQUE = ImageGeometry((0.5, 1.0, 2.0), (10.0, -5.0, 3.0), np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1.0]]))
AXIS = ImageGeometry((0.5, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def box_mesh(lo_zyx, hi_zyx, geometry):
    """Closed box whose faces lie on voxel boundaries: contains exactly the voxel centres lo..hi (inclusive)."""
    lo = np.asarray(lo_zyx, float) - 0.5
    hi = np.asarray(hi_zyx, float) + 0.5
    b = trimesh.creation.box(bounds=[lo[::-1], hi[::-1]])  # (x, y, z) index frame
    world = index_to_world(np.asarray(b.vertices)[:, ::-1], geometry)
    m = trimesh.Trimesh(world, np.asarray(b.faces), process=False)
    if m.volume < 0:
        m = trimesh.Trimesh(world, np.asarray(b.faces)[:, ::-1], process=False)
    return m


def reference():
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:6, 2:8, 2:10] = LABELS["A"]
    ref[2:6, 10:16, 2:10] = LABELS["B"]
    ref[1:9, 4:20, 14:28] = LABELS["O"]
    ref[3:7, 8:16, 18:24] = LABELS["I"]
    return ref


@pytest.mark.parametrize("geometry", [AXIS, OBLIQUE])
def test_voxelize_box_exact(geometry):
    occ = voxelize_mesh(box_mesh((1, 2, 3), (4, 9, 12), geometry), SHAPE, geometry)
    expected = np.zeros(SHAPE, bool)
    expected[1:5, 2:10, 3:13] = True
    assert np.array_equal(occ, expected)


@pytest.mark.parametrize("geometry", [AXIS, OBLIQUE])
def test_tvs_known_overlaps(geometry):
    ref = reference()
    vv = geometry.voxel_volume
    meshes = {
        # A and B overlap in 2 x 3 x 4 = 24 voxels (z 3..4, y 6..8, x 5..8)
        "A": box_mesh((2, 2, 2), (4, 8, 8), geometry),
        "B": box_mesh((3, 6, 5), (6, 14, 9), geometry),
        # O spans z 1..8, y 4..19, x 14..27; I sticks out in x 24..25 over z 3..6, y 8..15: 4 * 8 * 2 = 64 voxels
        "outer": box_mesh((1, 4, 14), (8, 19, 23), geometry),
        "I": box_mesh((3, 8, 18), (6, 15, 25), geometry),
    }
    res = evaluate_mesh_case(ref, geometry, meshes, SPEC, num_samples=2000)
    topo = res["mesh_topology"]
    ex, inc = SPEC.rules[0].name, SPEC.rules[1].name
    # the overlaps are measured on a 0.5 mm world grid (the finest spacing): exact for boxes aligned with it, a
    # quadrature within a few percent for the rotated boxes (the exact volumes are 24 and 64 voxels)
    rel = 1e-9 if geometry is AXIS else 0.06
    assert topo["grid_mm"] == 0.5
    assert topo["violating_volume_mm3"][ex] == pytest.approx(24 * vv, rel=rel)
    assert topo["violating_volume_mm3"][inc] == pytest.approx(64 * vv, rel=rel)
    # TVS (TPM Eq. 13): over the sum of the mesh structures' reference volumes, A + B + I + outer (= I + O), so I
    # counts twice; the value over the reference foreground is TVS_over_foreground
    fg = np.count_nonzero(ref) * vv
    volumes = {m: np.count_nonzero(np.isin(ref, ids)) * vv for m, ids in
               (("A", [1]), ("B", [2]), ("I", [3]), ("outer", [3, 4]))}
    total = sum(volumes.values())
    assert total == pytest.approx(fg + volumes["I"])
    assert topo["reference_volumes_mm3"] == pytest.approx(volumes) and topo["reference_volume_sum_mm3"] == total
    assert topo["TVS"] == pytest.approx((24 + 64) * vv / total, rel=rel)
    assert topo["TVS_per_rule"][ex] == pytest.approx(24 * vv / total, rel=rel)
    assert sum(topo["TVS_per_rule"].values()) == pytest.approx(topo["TVS"])
    assert topo["reference_foreground_mm3"] == pytest.approx(fg)
    assert topo["TVS_over_foreground"] == pytest.approx((24 + 64) * vv / fg, rel=rel)
    assert topo["TVS_over_foreground_per_rule"][ex] == pytest.approx(24 * vv / fg, rel=rel)
    assert topo["TVS_over_foreground"] == pytest.approx(topo["TVS"] * total / fg)
    assert topo["skipped_rules"] == {} and topo["missing_structures"] == []
    # box volume = voxel count * voxel volume (3 x 7 x 7 voxels); Dice against the reference box 4 x 6 x 8
    a = res["mesh_metrics"]["A"]
    assert a["volume_mm3"] == pytest.approx(3 * 7 * 7 * vv)
    pred = np.zeros(SHAPE, bool)
    pred[2:5, 2:9, 2:9] = True
    refA = ref == LABELS["A"]
    inter = np.count_nonzero(pred & refA)
    assert a["Dice"] == pytest.approx(2 * inter / (pred.sum() + refA.sum()))
    assert a["n_inside"] == pred.sum()


def test_mesh_tvs_sees_a_penetration_thinner_than_a_slice():
    """10 mm slices: two meshes overlapping by 3 mm between two slice centres. Voxelised at the reference voxel
    centres they do not overlap at all; the 1 mm grid of the mesh TVS measures the 3 mm slab."""
    geometry = ImageGeometry((1.0, 1.0, 10.0), (0.0, 0.0, 0.0), np.eye(3))
    shape = (6, 20, 20)
    ref = np.zeros(shape, np.uint8)
    ref[1:3, 5:15, 5:15] = LABELS["A"]
    ref[3:5, 5:15, 5:15] = LABELS["B"]
    # world z: A spans 5 .. 26.5 mm, B spans 23.5 .. 45 mm (slice centres at 0, 10, 20, 30, 40, 50 mm)
    a = trimesh.creation.box(bounds=[(4.5, 4.5, 5.0), (14.5, 14.5, 26.5)])
    b = trimesh.creation.box(bounds=[(4.5, 4.5, 23.5), (14.5, 14.5, 45.0)])
    voxel_overlap = voxelize_mesh(a, shape, geometry) & voxelize_mesh(b, shape, geometry)
    assert not voxel_overlap.any()
    res = evaluate_mesh_case(ref, geometry, {"A": a, "B": b}, SPEC, num_samples=500)
    topo = res["mesh_topology"]
    assert topo["grid_mm"] == 1.0
    assert topo["violating_volume_mm3"][SPEC.rules[0].name] == pytest.approx(10 * 10 * 3.0)


def test_rules_without_meshes_are_skipped():
    ref = reference()
    meshes = {"A": box_mesh((2, 2, 2), (4, 8, 8), AXIS), "outer": box_mesh((1, 4, 14), (8, 19, 27), AXIS)}
    topo = evaluate_mesh_case(ref, AXIS, meshes, SPEC, num_samples=500)["mesh_topology"]
    assert set(topo["skipped_rules"]) == {r.name for r in SPEC.rules}
    assert "B" in topo["skipped_rules"][SPEC.rules[0].name]
    assert math.isnan(topo["TVS"])
    assert sorted(topo["missing_structures"]) == ["B", "I"]


def test_unknown_mesh_name():
    with pytest.raises(MeshEvaluationError, match="not mesh structures"):
        evaluate_mesh_case(reference(), AXIS, {"LV": box_mesh((1, 1, 1), (2, 2, 2), AXIS)}, SPEC)


@pytest.mark.parametrize("geometry", [AXIS, OBLIQUE])
def test_perfect_meshes(geometry):
    ref = reference()
    meshes = {n: mesh_from_mask(np.isin(ref, s.label_ids), geometry) for n, s in SPEC.mesh_structures.items()}
    res = evaluate_mesh_case(ref, geometry, meshes, SPEC, num_samples=3000)
    for n, m in res["mesh_metrics"].items():
        assert m["Dice"] == pytest.approx(1.0), n
        assert m["Chamfer_mm"] < 1e-6 and m["HD95_mm"] < 1e-6, n
        assert m["laplacian_energy_mm2"] > 0
        assert m["volume_mm3"] == pytest.approx(m["volume_ref_mm3"], rel=0.1)
    # the reference obeys its rules: no overlap, inner inside outer
    assert res["mesh_topology"]["TVS"] == 0.0


def _write_ref(folder, case, ref, geometry):
    img = sitk.GetImageFromArray(ref)
    img.SetSpacing(geometry.spacing_xyz)
    img.SetOrigin(geometry.origin_xyz)
    img.SetDirection(tuple(geometry.direction.ravel()))
    sitk.WriteImage(img, str(folder / f"{case}.nii.gz"))


def test_folder(tmp_path):
    ref_dir, mesh_dir = tmp_path / "ref", tmp_path / "meshes"
    ref_dir.mkdir()
    ref = reference()
    _write_ref(ref_dir, "c1", ref, OBLIQUE)
    for n, s in SPEC.mesh_structures.items():
        export_mesh(mesh_from_mask(np.isin(ref, s.label_ids), OBLIQUE), mesh_dir / f"c1_{n}.vtk")
    out = tmp_path / "mesh_summary.json"
    summary = evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, num_samples=1000,
                                   output_file=str(out), show_progress=False)
    assert json.loads(out.read_text())["mesh_topology_mean"]["num_cases"] == 1
    case = summary["metric_per_case"][0]
    assert case["case"] == "c1"
    assert all(m["Dice"] == pytest.approx(1.0) for m in case["mesh_metrics"].values())
    assert summary["mesh_mean"]["A"]["Chamfer_mm"] < 1e-6
    assert summary["mesh_topology_mean"]["TVS"] == 0.0
    # merge into a summary_topology.json-like dict
    topo_summary = {"metric_per_case": [{"reference_file": str(ref_dir / "c1.nii.gz"), "metrics": {}}],
                    "mean": {}}
    merged = merge_mesh_summary(topo_summary, summary)
    assert "mesh_metrics" in merged["metric_per_case"][0] and "mesh_mean" in merged
    # meshes.json listing is used when present
    (mesh_dir / "meshes.json").write_text(json.dumps(
        {"cases": {"c1": {"files": {n: f"c1_{n}.vtk" for n in SPEC.mesh_structures}}}}))
    assert evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, num_samples=500,
                                show_progress=False)["metric_per_case"][0]["case"] == "c1"
    # a second reference case without meshes: error unless chill
    _write_ref(ref_dir, "c2", ref, OBLIQUE)
    (mesh_dir / "meshes.json").unlink()
    with pytest.raises(MeshEvaluationError, match=r"have no meshes.*chill"):
        evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, num_samples=500, show_progress=False)
    s = evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, num_samples=500, chill=True,
                             show_progress=False)
    assert [c["case"] for c in s["metric_per_case"]] == ["c1"]
    # a case the mesh prediction gave no mesh (its error in meshes.json): missing, with the reason; --chill skips it
    (mesh_dir / "meshes.json").write_text(json.dumps(
        {"cases": {"c1": {"files": {n: f"c1_{n}.vtk" for n in SPEC.mesh_structures}},
                   "c2": {"error": "case c2: the predicted mesh structures span [9, 9, 9] voxels", "files": {}}}}))
    with pytest.raises(MeshEvaluationError, match=r"have no meshes.*\['c2'\].*meshes.json says why: c2: case c2"):
        evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, num_samples=500, show_progress=False)
    s = evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, num_samples=500, chill=True,
                             show_progress=False)
    assert [c["case"] for c in s["metric_per_case"]] == ["c1"]


def test_folder_missing_mesh_file(tmp_path):
    ref_dir, mesh_dir = tmp_path / "ref", tmp_path / "meshes"
    ref_dir.mkdir()
    ref = reference()
    _write_ref(ref_dir, "c1", ref, AXIS)
    for n, s in SPEC.mesh_structures.items():
        if n != "B":
            export_mesh(mesh_from_mask(np.isin(ref, s.label_ids), AXIS), mesh_dir / f"c1_{n}.ply")
    with pytest.raises(MeshEvaluationError, match=r"case c1: no mesh file for structure 'B'"):
        evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, show_progress=False)
    # listed in meshes.json but not on disk
    (mesh_dir / "meshes.json").write_text(json.dumps(
        {"cases": {"c1": {"files": {n: f"c1_{n}.ply" for n in SPEC.mesh_structures}}}}))
    with pytest.raises(MeshEvaluationError, match=r"case c1, structure 'B': mesh file not found"):
        evaluate_mesh_folder(str(ref_dir), str(mesh_dir), DATASET_JSON, show_progress=False)
    with pytest.raises(MeshEvaluationError, match="no mesh files"):
        empty = tmp_path / "empty"
        empty.mkdir()
        evaluate_mesh_folder(str(ref_dir), str(empty), DATASET_JSON, show_progress=False)


def test_sparse_reference_mesh_metrics():
    """Sparse reference (every other slice ignored): mesh Dice over annotated voxels, no Chamfer/HD95 against a
    surface that is not known, and the TVS volume is not shrunk (ignored voxels inside the meshes are filled in)."""
    ignore = 9
    dense = reference()
    ref = dense.copy()
    ref[1::2] = ignore
    meshes = {"A": box_mesh((2, 2, 2), (5, 7, 9), AXIS), "B": box_mesh((2, 10, 2), (5, 15, 9), AXIS),
              "outer": box_mesh((1, 4, 14), (8, 19, 27), AXIS), "I": box_mesh((3, 8, 18), (6, 15, 23), AXIS)}
    res = evaluate_mesh_case(ref, AXIS, meshes, SPEC, num_samples=500, ignore_label=ignore)
    a = res["mesh_metrics"]["A"]
    assert a["Dice"] == pytest.approx(1.0) and a["n_ref"] == np.count_nonzero(ref == LABELS["A"])
    assert math.isnan(a["Chamfer_mm"]) and math.isnan(a["HD95_mm"])
    assert "sparse reference" in res["mesh_topology"]["notes"]["A"]
    vv = AXIS.voxel_volume
    assert res["mesh_topology"]["reference_foreground_mm3"] == pytest.approx(np.count_nonzero(dense) * vv)
    dense_res = evaluate_mesh_case(dense, AXIS, meshes, SPEC, num_samples=500)
    assert res["mesh_topology"]["TVS"] == pytest.approx(dense_res["mesh_topology"]["TVS"])


# ---- the ray-crossing occupancy against the exact solid-angle winding number (the naive reference) ----

def _lumpy_meshes():
    """A randomly deformed sphere, and one self-intersecting mesh of two overlapping spheres (winding 2 inside
    both), one of them with inward faces (winding -1: outside by the w > 1/2 test)."""
    rng = np.random.default_rng(3)
    s = trimesh.creation.icosphere(subdivisions=3, radius=6.0)
    s.vertices = s.vertices * (1 + 0.25 * rng.standard_normal((len(s.vertices), 1)).clip(-2, 2) * 0.5)
    lump = trimesh.Trimesh(s.vertices + [20.0, 3.0, -4.0], s.faces, process=False)
    a = trimesh.creation.icosphere(subdivisions=2, radius=5.0)
    b = trimesh.creation.icosphere(subdivisions=2, radius=4.0)
    two = trimesh.util.concatenate([trimesh.Trimesh(a.vertices + [18.0, 2.0, -3.0], a.faces),
                                    trimesh.Trimesh(b.vertices + [22.0, 4.0, -3.0], b.faces)])
    inverted = trimesh.Trimesh(a.vertices + [19.0, 1.0, -5.0], a.faces[:, ::-1], process=False)
    return {"lumpy": lump, "two_overlapping": two, "inverted": inverted}


def _naive_inside(mesh, pts):
    import torch
    from nnunet_topo.occupancy import winding_number
    w = winding_number(torch.from_numpy(np.asarray(pts, np.float64)), torch.from_numpy(mesh.vertices.copy()),
                       torch.from_numpy(mesh.faces.astype(np.int64)))
    return w.numpy() > 0.5


@pytest.mark.parametrize("name", ["lumpy", "two_overlapping", "inverted"])
@pytest.mark.parametrize("geometry", [OBLIQUE, AXIS, ImageGeometry((1.0, 0.7, 1.3), (5.0, -6.0, -12.0),
                                                                   np.diag([1.0, -1.0, 1.0]))])
def test_voxelize_matches_solid_angle_winding(name, geometry):
    """Every voxel centre of an oblique / mirrored grid: the crossing count and the solid-angle sum agree."""
    shape = (16, 30, 40)
    mesh = _lumpy_meshes()[name].copy()  # moved to the grid's centre, scaled to about half its extent
    centre = index_to_world(np.array([[7.5, 14.5, 19.5]]), geometry)[0]
    mesh.vertices = (mesh.vertices - [20.0, 3.0, -4.0]) * 0.8 + centre
    occ = voxelize_mesh(mesh, shape, geometry)
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    ref = _naive_inside(mesh, index_to_world(zyx, geometry)).reshape(shape)
    assert ref.sum() > 50 or name == "inverted"
    assert np.array_equal(occ, ref), f"{np.count_nonzero(occ != ref)} voxels differ"


def test_violating_volume_matches_naive_grid():
    """The mesh-TVS volumes against the naive evaluation: solid-angle winding at every cell centre of the box."""
    from nnunet_topo.mesh_evaluation import violating_volume_mm3
    m = _lumpy_meshes()
    first, other = m["lumpy"], m["two_overlapping"]
    h = 0.7
    lo = np.maximum(first.bounds[0], other.bounds[0])
    hi = np.minimum(first.bounds[1], other.bounds[1])
    n = np.ceil((hi - lo) / h).astype(int)
    pts = np.stack(np.meshgrid(*[lo[k] + (np.arange(n[k]) + 0.5) * h for k in range(3)], indexing="ij"),
                   -1).reshape(-1, 3)
    naive_excl = np.count_nonzero(_naive_inside(first, pts) & _naive_inside(other, pts)) * h ** 3
    assert naive_excl > 100
    assert violating_volume_mm3(first, [other], True, h) == pytest.approx(naive_excl, abs=1e-9)
    lo, hi = first.bounds
    n = np.ceil((hi - lo) / h).astype(int)
    pts = np.stack(np.meshgrid(*[lo[k] + (np.arange(n[k]) + 0.5) * h for k in range(3)], indexing="ij"),
                   -1).reshape(-1, 3)
    naive_incl = np.count_nonzero(_naive_inside(first, pts) & ~_naive_inside(other, pts)
                                  & ~_naive_inside(m["inverted"], pts)) * h ** 3
    assert naive_incl > 100
    assert violating_volume_mm3(first, [other, m["inverted"]], False, h) == pytest.approx(naive_incl, abs=1e-9)
