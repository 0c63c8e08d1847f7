"""The torch ray-crossing voxeliser (nnunet_topo.voxelize) against the numpy ``_ColumnCrossings`` and the exact
solid-angle winding number; the mesh source of TPM's critical points (``mesh_violation_masks``) against every patch
voxel tested naively; and no host synchronisation in either."""
import numpy as np
import pytest
import torch
import trimesh

import nnunet_topo.voxelize as voxelize_module
from nnunet_topo.frames import voxel_to_mm
from nnunet_topo.losses.mesh_targets import mesh_violation_masks
from nnunet_topo.mesh_evaluation import _ColumnCrossings
from nnunet_topo.occupancy import winding_number
from nnunet_topo.topology_spec import MeshExclusionRule, mesh_rule_meshes, mesh_rules_in_force, parse_topology
from nnunet_topo.voxelize import HOST_SYNC_OPS, HostSyncRecorder, grid_winding_number, voxelize

SHAPE = (11, 16, 14)  # (Z, Y, X)


def make_mesh(kind: str) -> trimesh.Trimesh:
    if kind == "icosphere":
        return trimesh.creation.icosphere(subdivisions=2, radius=4.0)
    if kind == "box":
        return trimesh.creation.box(extents=(5.0, 6.0, 7.0))
    return trimesh.creation.torus(major_radius=4.0, minor_radius=1.6, major_sections=24, minor_sections=12)


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """A rotation times axis scalings in [0.7, 1.3] and a mild shear: determinant > 0 (keeps the orientation)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    shear = np.eye(3) + np.triu(rng.uniform(-0.2, 0.2, size=(3, 3)), 1)
    return q @ np.diag(rng.uniform(0.7, 1.3, size=3)) @ shear


def placements(mesh: trimesh.Trimesh, shape, rng: np.random.Generator) -> np.ndarray:
    """(4, V, 3) grid coordinates (z, y, x): two placements inside the grid, one across a corner (partly outside),
    one wholly outside."""
    hi = np.asarray(shape, float) - 1
    centres = [rng.uniform(0.35, 0.65, 3) * hi, rng.uniform(0.3, 0.7, 3) * hi,
               np.array([0.5, hi[1] + 0.3, -0.7]), np.array([-20.0, 0.5 * hi[1], 0.5 * hi[2]])]
    return np.stack([mesh.vertices @ random_affine(rng).T + c for c in centres])


# ------------------------------------------------------------------------------------------ against numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["icosphere", "box", "torus"])
def test_equals_numpy_column_crossings(kind, dtype):
    mesh = make_mesh(kind)
    rng = np.random.default_rng({"icosphere": 0, "box": 1, "torus": 2}[kind])
    for _ in range(2):  # two batches of random placements
        v = torch.tensor(placements(mesh, SHAPE, rng), dtype=dtype)
        faces = torch.tensor(mesh.faces)
        got_w = grid_winding_number(v, faces, SHAPE)
        got = voxelize(v, faces, SHAPE)
        assert got.shape == (4,) + SHAPE and got.dtype == torch.bool and got_w.dtype == torch.int64
        for b in range(v.shape[0]):
            cc = _ColumnCrossings(v[b].double().numpy(), mesh.faces, SHAPE)  # the same (rounded) vertices
            np.testing.assert_array_equal(got_w[b].numpy(), cc.winding(0, SHAPE[0]))
            np.testing.assert_array_equal(got[b].numpy(), cc.inside(0, SHAPE[0]))
        assert int(got[0].sum()) > 10 and int(got[2].sum()) > 0  # inside; across the corner
        assert int(got[3].sum()) == 0  # wholly outside the grid


def test_chunks_of_faces_give_the_same_result(monkeypatch):
    mesh = make_mesh("torus")
    v = torch.tensor(placements(mesh, SHAPE, np.random.default_rng(5)))
    faces = torch.tensor(mesh.faces)
    whole = grid_winding_number(v, faces, SHAPE)
    monkeypatch.setattr(voxelize_module, "_MAX_PAIRS", 4 * SHAPE[0] * SHAPE[1] * 7)  # 7 faces per chunk, ragged end
    assert torch.equal(grid_winding_number(v, faces, SHAPE), whole)


def test_orientation_and_known_box():
    """An axis-aligned box (faces parallel to the lines included): inside iff strictly within its bounds; reversed
    faces give winding -1, which ``orientation=-1`` turns back into inside."""
    lo, hi = np.array([2.3, 3.6, 1.2]), np.array([7.7, 11.1, 9.4])
    box = trimesh.creation.box(bounds=np.stack([lo, hi]))
    v = torch.tensor(box.vertices)[None]
    faces = torch.tensor(box.faces)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    expected = np.all((grid > lo) & (grid < hi), axis=-1)
    np.testing.assert_array_equal(voxelize(v, faces, SHAPE)[0].numpy(), expected)
    flipped = faces[:, [0, 2, 1]]
    assert int(grid_winding_number(v, flipped, SHAPE).min()) == -1
    assert not bool(voxelize(v, flipped, SHAPE).any())
    np.testing.assert_array_equal(voxelize(v, flipped, SHAPE, orientation=-1)[0].numpy(), expected)


def test_empty_faces_and_bad_inputs():
    v = torch.zeros(2, 4, 3)
    assert not bool(voxelize(v, torch.zeros(0, 3, dtype=torch.long), SHAPE).any())
    with pytest.raises(ValueError, match=r"\(B, V, 3\).*\[None\]"):
        voxelize(v[0], torch.zeros(1, 3, dtype=torch.long), SHAPE)
    with pytest.raises(TypeError, match="floating-point"):
        voxelize(v.long(), torch.zeros(1, 3, dtype=torch.long), SHAPE)
    with pytest.raises(TypeError, match="integer"):
        voxelize(v, torch.zeros(1, 3), SHAPE)
    with pytest.raises(ValueError, match="shape"):
        voxelize(v, torch.zeros(1, 3, dtype=torch.long), SHAPE[:2])
    with pytest.raises(ValueError, match="orientation"):
        voxelize(v, torch.zeros(1, 3, dtype=torch.long), SHAPE, orientation=0)


# ------------------------------------------------------------------------------------------ against solid angles
@pytest.mark.parametrize("kind", ["icosphere", "box", "torus"])
def test_equals_exact_winding_number_at_every_grid_point(kind):
    shape = (7, 10, 9)
    mesh = make_mesh(kind)
    v = torch.tensor(placements(mesh, shape, np.random.default_rng(7))[:3] * 0.7)  # smaller grid: scale down
    faces = torch.tensor(mesh.faces)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
    w = winding_number(grid.reshape(-1, 3), v, faces, method="exact").reshape((3,) + shape)
    assert bool(((w - w.round()).abs() < 1e-6).all())  # no grid point on a surface
    assert torch.equal(voxelize(v, faces, shape), w > 0.5)
    assert int((w > 0.5).sum()) > 10


# ------------------------------------------------------------------------------------------ mesh_violation_masks
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "AO": 4}
SPEC = parse_topology({"labels": LABELS, "topology": {
    "rules": [{"type": "exclusion", "a": ["LV", "MYO"], "b": "RV"},
              {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": "AO"}],
    "mesh_rules": [{"type": "mesh_exclusion", "meshes": ["RV", "LV_endo"]}],
    "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"], "AO": ["AO"]}}})
NAMES = ["LV_endo", "LV_epi", "RV", "AO"]
PATCH, SPACING = (12, 30, 26), (4.0, 1.5, 2.0)  # (Z, Y, X), (z, y, x) mm


def scene():
    """Per batch item, in the patch's physical frame (x, y, z) mm: LV_epi and RV overlap (exclusion), LV_endo pokes
    out of LV_epi (inclusion) where an AO mesh (its allowed opening) covers part of the poke-out, and LV_endo
    overlaps RV (the mesh rule). Item 1 is shifted so that RV leaves the patch."""
    centre = np.array([(s - 1) * h for s, h in zip(PATCH, SPACING)])[::-1] / 2
    epi = np.array([-4.0, 0.0, 0.0])
    out_dir = np.array([4.0, -6.0, 0.0]) / np.hypot(4.0, 6.0)
    parts = {"LV_endo": (epi + np.array([4.0, -6.0, 0.0]), 8.0), "LV_epi": (epi, 12.0),
             "RV": (np.array([13.0, 0.0, 0.0]), 10.0), "AO": (epi + 13.0 * out_dir, 4.0)}
    sphere = trimesh.creation.icosphere(subdivisions=2)
    meshes, faces = [], []
    for name in NAMES:
        offset, radius = parts[name]
        items = [sphere.vertices * radius + centre + offset + shift
                 for shift in (np.zeros(3), np.array([8.0, 1.3, 5.0]))]
        meshes.append(torch.tensor(np.stack(items), dtype=torch.float32))
        faces.append(torch.tensor(sphere.faces))
    return meshes, faces


def naive_violation_masks(meshes_mm, faces, spec, shape, spacing, openings=True):
    """The candidate scheme with every patch voxel as a candidate: every voxel centre against every mesh by the
    exact solid-angle winding number (> 1/2), then the rule logic."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    pts = voxel_to_mm(grid, spacing).double()
    by_name = dict(zip(NAMES, zip(meshes_mm, faces)))
    inside = {}
    for name, (v, f) in by_name.items():
        w = winding_number(pts, v.double(), f, method="exact")
        assert bool(((w - w.round()).abs() < 1e-4).all())  # no voxel centre on a surface
        inside[name] = (w > 0.5).reshape((v.shape[0],) + tuple(shape))
    out = {}
    for rule in mesh_rules_in_force(spec)[0]:
        first, second = mesh_rule_meshes(rule)
        if isinstance(rule, MeshExclusionRule):
            out[rule.name] = inside[first] & inside[second]
        else:
            mask = inside[first] & ~inside[second]
            for m in (rule.may_touch if openings else ()):
                mask = mask & ~inside[m]
            out[rule.name] = mask
    return out


def test_mesh_violation_masks_equal_every_voxel_tested_naively():
    meshes, faces = scene()
    got = mesh_violation_masks(meshes, faces, NAMES, SPEC, PATCH, SPACING)
    expected = naive_violation_masks(meshes, faces, SPEC, PATCH, SPACING)
    names = [r.name for r in mesh_rules_in_force(SPEC)[0]]
    assert sorted(got) == sorted(expected) == sorted(names) and len(names) == 3
    for name in names:
        assert got[name].shape == (2,) + PATCH and got[name].dtype == torch.bool
        assert torch.equal(got[name], expected[name]), name
        assert int(got[name][0].sum()) > 5, name  # every rule is broken in item 0
    # the opening matters: without AO the inclusion would have more violation voxels
    inclusion = next(r.name for r in mesh_rules_in_force(SPEC)[0] if not isinstance(r, MeshExclusionRule))
    without = naive_violation_masks(meshes, faces, SPEC, PATCH, SPACING, openings=False)[inclusion]
    assert int(without.sum()) > int(got[inclusion].sum()) > 0
    # a rule whose mesh is not predicted is not evaluated; an opening without a mesh is left out of the rule
    part = mesh_violation_masks(meshes[:3], faces[:3], NAMES[:3], SPEC, PATCH, SPACING)
    assert sorted(part) == sorted(names) and torch.equal(part[inclusion], without)
    assert mesh_violation_masks(meshes[1:2], faces[1:2], NAMES[1:2], SPEC, PATCH, SPACING) == {}


# ------------------------------------------------------------------------------------------ host synchronisation
def test_no_host_sync():
    """Neither the voxeliser nor the mesh source of the critical points calls an operator that waits for the
    device (checked on the CPU by recording the aten operators)."""
    meshes, faces = scene()
    grid_vertices = meshes[0].flip(-1)
    with HostSyncRecorder() as rec:
        voxelize(grid_vertices, faces[0], PATCH, orientation=-1)
        mesh_violation_masks(meshes, faces, NAMES, SPEC, PATCH, SPACING)
    assert "aten::scatter_add_" in rec.ops and "aten::cumsum" in rec.ops
    assert rec.syncs == []
    assert "aten::lift_fresh" not in rec.ops  # no tensor built from host data (a host-to-device copy on a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    """On a GPU, CUDA's own sync check (host-to-device copies included) finds none; the result equals the CPU's."""
    meshes, faces = scene()
    expected = mesh_violation_masks(meshes, faces, NAMES, SPEC, PATCH, SPACING)
    meshes_gpu, faces_gpu = [m.cuda() for m in meshes], [f.cuda() for f in faces]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = mesh_violation_masks(meshes_gpu, faces_gpu, NAMES, SPEC, PATCH, SPACING)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(got[k].cpu(), expected[k]) for k in expected)


def test_host_sync_recorder_sees_syncs():
    for name in HOST_SYNC_OPS:  # every entry names an existing aten operator (and overload)
        packet, _, overload = name.split("::")[1].partition(".")
        assert getattr(torch.ops.aten, packet).overloads() and (not overload or overload in
                                                               getattr(torch.ops.aten, packet).overloads())
    x = torch.arange(6.0)
    mask = x > 2
    calls = [lambda: x.sum().item(), lambda: bool(mask.any()), lambda: x[mask], lambda: x.nonzero(),
             lambda: torch.unique(x), lambda: x.repeat_interleave(torch.full((6,), 2)), lambda: x.masked_fill(mask, 0)
             .index_put_((mask,), torch.tensor(1.0))]
    for call in calls:
        with HostSyncRecorder() as rec:
            call()
        assert rec.syncs, call
    with HostSyncRecorder() as rec:  # no sync: an int repeat count, integer indexing, a where
        x.repeat_interleave(2), x[torch.arange(3)], torch.where(mask, x, 0.0)
    assert rec.syncs == [] and rec.ops
