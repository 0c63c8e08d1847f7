"""Tests of the mesh losses: targets (TPM Eq. 6-11), L_occ / L_TPM and L_MIE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from nnunet_topo.frames import normalized_to_voxel, voxel_to_normalized
from nnunet_topo.losses.mesh_targets import critical_point_targets, mesh_for_structure, sample_query_points
from nnunet_topo.losses.mie import MIELoss, mix_points
from nnunet_topo.losses.tpm import TPMLoss, occupancy_loss
from nnunet_topo.topology_spec import parse_topology

LABELS = {"background": 0, "LV": 1, "RV": 2, "MYO": 3, "LA": 4}
MESHES = {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV_mesh": ["RV"]}


def make_spec(rules, meshes=MESHES):
    return parse_topology({"labels": LABELS, "topology": {"rules": rules, "mesh_structures": meshes}})


EXCLUSION = {"type": "exclusion", "a": "LV", "b": "RV"}
INCLUSION = {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": "LA"}


def as_dict(points, targets):
    return {tuple(int(c) for c in p): float(t) for p, t in zip(points.tolist(), targets.tolist())}


# ------------------------------------------------------------------------------------------ frames
def test_voxel_normalized_round_trip_and_corners():
    shape = (4, 5, 7)
    idx = torch.tensor([[0, 0, 0], [3, 4, 6], [0, 0, 6], [1.5, 2.0, 3.25]])
    n = voxel_to_normalized(idx, shape)
    assert torch.allclose(n[0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(n[1], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(n[2], torch.tensor([1.0, -1.0, -1.0]))  # x (last array axis) comes first
    assert torch.allclose(normalized_to_voxel(n, shape), idx, atol=1e-6)
    batched = torch.rand(2, 9, 3) * torch.tensor([3.0, 4.0, 6.0])
    assert torch.allclose(normalized_to_voxel(voxel_to_normalized(batched, shape), shape), batched, atol=1e-5)


def test_mm_frame_round_trip_and_orientation():
    from nnunet_topo.frames import mm_to_voxel, normalized_to_mm, voxel_to_mm

    shape, spacing = (4, 5, 7), (5.0, 1.5, 0.5)
    idx = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 6.0], [1.5, 2.0, 3.25]])
    mm = voxel_to_mm(idx, spacing)
    assert torch.allclose(mm[1], torch.tensor([3.0, 6.0, 15.0]))  # (x, y, z) mm = (6 * 0.5, 4 * 1.5, 3 * 5)
    assert torch.allclose(mm_to_voxel(mm, spacing), idx)
    assert torch.allclose(normalized_to_mm(voxel_to_normalized(idx, shape), shape, spacing), mm, atol=1e-5)
    # the map from the normalised frame is a positive scaling: a mesh keeps its orientation (positive volume)
    ico = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    v = normalized_to_mm(torch.tensor(ico.vertices, dtype=torch.float64), shape, spacing).numpy()
    assert trimesh.Trimesh(v, ico.faces, process=False).volume > 0
    with pytest.raises(ValueError, match="three positive voxel sizes"):
        voxel_to_mm(idx, (1.0, 0.0, 1.0))


def test_normalized_frame_matches_grid_sample():
    vol = torch.arange(4 * 5 * 7, dtype=torch.float32).reshape(1, 1, 4, 5, 7)
    idx = torch.tensor([[0, 0, 0], [3, 4, 6], [2, 1, 5], [1, 3, 0]])
    grid = voxel_to_normalized(idx, (4, 5, 7)).view(1, 1, 1, -1, 3)
    sampled = F.grid_sample(vol, grid, align_corners=True).flatten()
    assert torch.allclose(sampled, vol[0, 0, idx[:, 0], idx[:, 1], idx[:, 2]])


# ------------------------------------------------------------------------------------------ mesh_for_structure
def test_mesh_for_structure():
    spec = make_spec([EXCLUSION, INCLUSION])
    ex, inc = spec.rules
    assert mesh_for_structure(spec, ex.a) == "LV_endo"
    assert mesh_for_structure(spec, ex.b) == "RV_mesh"
    assert mesh_for_structure(spec, inc.outer) == "LV_epi"
    assert mesh_for_structure(spec, inc.may_touch) is None


# ------------------------------------------------------------------------------------------ rule-aware targets
def test_exclusion_targets_by_hand():
    # one patch (Z=1, Y=2, X=6); LV=1, RV=2, MYO=3.
    pred = torch.tensor([[[[0, 1, 1, 2, 2, 0],
                           [0, 1, 2, 2, 0, 0]]]])
    ref = torch.tensor([[[[0, 1, 1, 3, 2, 0],
                          [0, 1, 2, 2, 0, 0]]]])
    # violation voxels of pred (LV touching RV, RV touching LV, 6-connectivity), as (y, x):
    #   (0,2) LV next to RV (0,3) and (1,2);  (0,3) RV next to LV (0,2);
    #   (1,1) LV next to RV (1,2);            (1,2) RV next to LV (1,1) and (0,2).
    # Each is a point of BOTH meshes the rule names (TPM Eq. 7, selection by the prediction), target = [ref in mesh]:
    # reference labels there: (0,2) LV, (0,3) MYO (the missing septum: negative for both), (1,1) LV, (1,2) RV.
    out = critical_point_targets(pred, ref, make_spec([EXCLUSION]))
    assert len(out) == 1 and set(out[0]) == set(MESHES)
    assert as_dict(*out[0]["LV_endo"]) == {(0, 0, 2): 1.0, (0, 0, 3): 0.0, (0, 1, 1): 1.0, (0, 1, 2): 0.0}
    assert as_dict(*out[0]["RV_mesh"]) == {(0, 0, 2): 0.0, (0, 0, 3): 0.0, (0, 1, 1): 0.0, (0, 1, 2): 1.0}
    assert out[0]["LV_epi"][0].shape == (0, 3) and out[0]["LV_epi"][1].shape == (0,)  # not named by the rule
    assert out[0]["RV_mesh"][0].dtype == torch.long and out[0]["RV_mesh"][1].dtype == torch.float32


def test_missing_septum_gives_negatives_for_both_meshes():
    """Reference RV RV MYO MYO LV LV, prediction RV RV RV LV LV LV (the septum is missing): the contact voxels have
    reference MYO and must be negatives of the LV and the RV mesh (the one error TPM exists for)."""
    ref = torch.tensor([2, 2, 3, 3, 1, 1]).view(1, 1, 1, 6)
    pred = torch.tensor([2, 2, 2, 1, 1, 1]).view(1, 1, 1, 6)
    out = critical_point_targets(pred, ref, make_spec([EXCLUSION]))[0]
    # contact: RV at x=2 touches LV at x=3; both have reference MYO
    assert as_dict(*out["LV_endo"]) == {(0, 0, 2): 0.0, (0, 0, 3): 0.0}
    assert as_dict(*out["RV_mesh"]) == {(0, 0, 2): 0.0, (0, 0, 3): 0.0}


def test_ignored_voxels_are_never_critical():
    ref = torch.tensor([2, 2, 9, 3, 1, 1]).view(1, 1, 1, 6)  # 9 = ignore label at the contact's RV side
    pred = torch.tensor([2, 2, 2, 1, 1, 1]).view(1, 1, 1, 6)
    out = critical_point_targets(pred, ref, make_spec([EXCLUSION]), ignore_label=9)[0]
    assert as_dict(*out["LV_endo"]) == {(0, 0, 3): 0.0} and as_dict(*out["RV_mesh"]) == {(0, 0, 3): 0.0}


def test_inclusion_with_may_touch_targets_by_hand():
    # inclusion(LV in LV+MYO | may_touch LA); allowed = {LV, MYO, LA}; one patch (Z=1, Y=2, X=7).
    pred = torch.tensor([[[[3, 1, 1, 4, 1, 0, 0],
                           [0, 0, 1, 0, 0, 0, 0]]]])
    ref = torch.tensor([[[[3, 1, 1, 4, 1, 2, 0],
                          [0, 4, 1, 3, 0, 0, 0]]]])
    # violation voxels of pred, as (y, x):
    #   inner voxels touching a forbidden voxel: (0,1) [below: (1,1) bg], (0,4) [(0,5), (1,4) bg], (1,2) [(1,1), (1,3)]
    #   forbidden voxels touched by inner:       (0,5), (1,1), (1,3), (1,4)
    # reference labels: (0,1) LV, (0,4) LV, (1,2) LV, (0,5) RV, (1,1) LA, (1,3) MYO, (1,4) bg.
    # (1,1) has the reference of the allowed opening LA: never penalised. Every other voxel is a point of the inner
    # mesh LV_endo (target [ref in LV]) and of the outer mesh LV_epi (target [ref in LV, MYO]).
    out = critical_point_targets(pred, ref, make_spec([INCLUSION]))
    assert as_dict(*out[0]["LV_endo"]) == {(0, 0, 1): 1.0, (0, 0, 4): 1.0, (0, 1, 2): 1.0, (0, 0, 5): 0.0,
                                           (0, 1, 3): 0.0, (0, 1, 4): 0.0}
    assert as_dict(*out[0]["LV_epi"]) == {(0, 0, 1): 1.0, (0, 0, 4): 1.0, (0, 1, 2): 1.0, (0, 0, 5): 0.0,
                                          (0, 1, 3): 1.0, (0, 1, 4): 0.0}
    assert out[0]["RV_mesh"][0].shape == (0, 3)


def test_both_rules_deduplicate_and_batch():
    pred = torch.tensor([[[[0, 1, 1, 2, 2, 0],
                           [0, 1, 2, 2, 0, 0]]]])
    ref = torch.tensor([[[[0, 1, 1, 3, 2, 0],
                          [0, 1, 2, 2, 0, 0]]]])
    spec = make_spec([EXCLUSION, INCLUSION])
    out = critical_point_targets(torch.cat([pred, ref]), torch.cat([ref, ref]), spec)
    assert len(out) == 2
    for mesh, structure in spec.mesh_structures.items():
        p, t = out[0][mesh]
        assert len(set(map(tuple, p.tolist()))) == p.shape[0]  # no duplicates
        ids = torch.tensor(structure.label_ids)
        assert torch.equal(t, torch.isin(ref[0][p[:, 0], p[:, 1], p[:, 2]], ids).float())
    # the exclusion result of the first item is contained in the result of both rules
    assert {(0, 0, 2), (0, 0, 3), (0, 1, 1), (0, 1, 2)} <= set(as_dict(*out[0]["RV_mesh"]))
    # item 2 (pred = ref), by hand, (y, x): LV at (0,1), (0,2), (1,1); RV at (1,2), (0,4); MYO at (0,3).
    # exclusion: (0,2) and (1,1) LV touch RV (1,2); (1,2) RV touches LV -> points of LV_endo and RV_mesh.
    # inclusion (allowed LV, MYO, LA): (0,1) touches bg (0,0); (0,2) touches RV (1,2); (1,1) touches bg (1,0)
    #   and RV (1,2); forbidden voxels touched: (0,0) bg, (1,0) bg, (1,2) RV -> points of LV_endo and LV_epi.
    assert as_dict(*out[1]["LV_endo"]) == {(0, 0, 0): 0.0, (0, 0, 1): 1.0, (0, 0, 2): 1.0, (0, 1, 0): 0.0,
                                           (0, 1, 1): 1.0, (0, 1, 2): 0.0}
    assert as_dict(*out[1]["LV_epi"]) == {(0, 0, 0): 0.0, (0, 0, 1): 1.0, (0, 0, 2): 1.0, (0, 1, 0): 0.0,
                                          (0, 1, 1): 1.0, (0, 1, 2): 0.0}
    assert as_dict(*out[1]["RV_mesh"]) == {(0, 0, 2): 0.0, (0, 1, 1): 0.0, (0, 1, 2): 1.0}


def test_2d_mode_ignores_contacts_across_slices():
    pred = torch.tensor([[[[1]], [[2]]]])  # (B=1, Z=2, Y=1, X=1): LV above RV
    ref = torch.tensor([[[[2]], [[1]]]])
    spec = make_spec([EXCLUSION])
    out3 = critical_point_targets(pred, ref, spec, mode="3d")
    assert as_dict(*out3[0]["LV_endo"]) == {(0, 0, 0): 0.0, (1, 0, 0): 1.0}
    assert as_dict(*out3[0]["RV_mesh"]) == {(0, 0, 0): 1.0, (1, 0, 0): 0.0}
    out2 = critical_point_targets(pred, ref, spec, mode="2d")  # slices along axis 0: no in-plane contact
    assert all(p.shape[0] == 0 for p, _ in out2[0].values())
    out2x = critical_point_targets(pred, ref, spec, mode="2d", axis=2)  # slices along x: the contact is in plane
    assert as_dict(*out2x[0]["LV_endo"]) == {(0, 0, 0): 0.0, (1, 0, 0): 1.0}


def test_critical_point_targets_bad_inputs():
    spec = make_spec([EXCLUSION])
    a = torch.zeros(1, 2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        critical_point_targets(a, torch.zeros(1, 2, 3, 5, dtype=torch.long), spec)
    with pytest.raises(ValueError, match="mode"):
        critical_point_targets(a, a, spec, mode="4d")
    with pytest.raises(ValueError, match="channel"):
        critical_point_targets(a[:, None], a[:, None], spec)
    with pytest.raises(TypeError, match="integer"):
        critical_point_targets(a.float(), a, spec)


# ------------------------------------------------------------------------------------------ query points
def test_sample_query_points_targets_and_surface():
    ref = torch.zeros(2, 6, 7, 8, dtype=torch.long)
    ref[0, 2:4, 2:5, 3:6] = 1
    ref[0, 1, 1, 1] = 3
    # item 1: no LV at all -> surface points fall back to uniform ones
    g = torch.Generator().manual_seed(0)
    pts, tgt = sample_query_points(ref, [1, 3], 50, 200, g)
    assert pts.shape == (2, 250, 3) and tgt.shape == (2, 250) and pts.dtype == torch.float32
    hi = torch.tensor([5.0, 6.0, 7.0])
    assert bool((pts >= 0).all()) and bool((pts <= hi).all())
    nearest = pts.round().long()
    for b in range(2):
        lab = ref[b][nearest[b, :, 0], nearest[b, :, 1], nearest[b, :, 2]]
        assert torch.equal(tgt[b], torch.isin(lab, torch.tensor([1, 3])).float())
    # near-surface points of item 0 lie within 0.5 voxel (per axis) of a boundary voxel, and both sides occur
    surf = pts[0, 50:]
    box_lo, box_hi = torch.tensor([2.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 5.0])
    dist_box = torch.maximum(box_lo - 1 - surf, surf - box_hi - 1).clamp(min=0).amax(dim=1)
    near_extra = (surf - torch.tensor([1.0, 1.0, 1.0])).abs().amax(dim=1) <= 1.5
    assert bool(((dist_box <= 0.5 + 1e-6) | near_extra).all())
    assert 0 < float(tgt[0, 50:].mean()) < 1
    assert float(tgt[1].sum()) == 0.0
    # reproducible with the same generator seed
    pts2, _ = sample_query_points(ref, [1, 3], 50, 200, torch.Generator().manual_seed(0))
    assert torch.equal(pts, pts2)


def test_sample_query_points_bad_inputs():
    ref = torch.zeros(1, 3, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="num_uniform"):
        sample_query_points(ref, [1], -1, 2)
    with pytest.raises(ValueError, match="structure_ids"):
        sample_query_points(ref, [], 1, 2)
    with pytest.raises(ValueError, match="channel"):
        sample_query_points(ref[:, None], [1], 1, 2)


# ------------------------------------------------------------------------------------------ occupancy loss
def sphere_in_normalized_frame(shape, centre_zyx, radius_vox, subdivisions=2):
    """An outward icosphere built in voxel (x, y, z) coordinates, converted to the normalised frame."""
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius_vox)
    xyz = m.vertices + np.asarray(centre_zyx, dtype=float)[::-1]
    zyx = torch.tensor(xyz[:, ::-1].copy(), dtype=torch.float32)
    return voxel_to_normalized(zyx, shape), torch.tensor(m.faces, dtype=torch.long)


def test_occupancy_loss_against_manual_bce():
    shape = (9, 11, 13)
    verts, faces = sphere_in_normalized_frame(shape, (4, 5, 6), 3.0)
    mesh = trimesh.Trimesh(verts.double().numpy(), faces.numpy(), process=False)
    assert mesh.is_winding_consistent and mesh.volume > 0  # the frame change kept the orientation outward
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(2, 300, 3, generator=g) * 2 - 1
    # inside/outside by hand in voxel space; keep points away from the surface, where the exact winding number
    # is 0/1 and the inscribed polyhedron differs from the sphere by < 0.2 voxel
    r = (normalized_to_voxel(pts, shape) - torch.tensor([4.0, 5.0, 6.0])).norm(dim=-1)
    keep = (r - 3.0).abs() > 0.4
    pts = torch.stack([pts[b][keep[b]][:200] for b in range(2)])
    inside = torch.stack([(r[b][keep[b]][:200] < 3.0).float() for b in range(2)])
    targets = (torch.rand(2, 200, generator=g) > 0.5).float()
    eps = 1e-3
    o = inside.clamp(eps, 1 - eps)
    manual = -(targets * torch.log(o) + (1 - targets) * torch.log(1 - o)).mean()
    v = verts.expand(2, -1, -1).clone().requires_grad_(True)
    loss = occupancy_loss(v, faces, pts, targets, method="exact", eps=eps)
    assert torch.allclose(loss, manual, atol=1e-4)
    loss.backward()
    assert torch.isfinite(v.grad).all()


def test_occupancy_loss_empty_is_graph_connected_zero():
    verts, faces = sphere_in_normalized_frame((8, 8, 8), (3.5, 3.5, 3.5), 2.0, subdivisions=1)
    v = verts[None].clone().requires_grad_(True)
    loss = occupancy_loss(v, faces, torch.zeros(1, 0, 3), torch.zeros(1, 0))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_occupancy_loss_bad_shapes():
    verts, faces = sphere_in_normalized_frame((8, 8, 8), (3.5, 3.5, 3.5), 2.0, subdivisions=1)
    v = verts[None]
    with pytest.raises(ValueError, match="targets"):
        occupancy_loss(v, faces, torch.zeros(1, 5, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch size"):
        occupancy_loss(v, faces, torch.zeros(2, 5, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="points_norm"):
        occupancy_loss(v, faces, torch.zeros(1, 5, 2), torch.zeros(1, 5))


# ------------------------------------------------------------------------------------------ TPM / MIE modules
SHAPE = (8, 10, 12)


def toy_batch(seed=0, violate=True):
    """Reference: LV ball inside a MYO shell, RV beside it; prediction = reference with a septum hole."""
    z, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij")
    r_lv = ((z - 3.5) ** 2 + (y - 4.5) ** 2 + (x - 4) ** 2).sqrt()
    ref = torch.zeros(SHAPE, dtype=torch.long)
    ref[r_lv <= 3.2] = 3
    ref[r_lv <= 2.2] = 1
    ref[(((z - 3.5) ** 2 + (y - 4.5) ** 2 + (x - 8.5) ** 2).sqrt() <= 2.2) & (ref == 0)] = 2
    pred = ref.clone()
    if violate:
        pred[2:5, 3:6, 5:8] = torch.where(pred[2:5, 3:6, 5:8] == 3, torch.tensor(1), pred[2:5, 3:6, 5:8])
        pred[3, 4, 7] = 2
    ref_b = torch.stack([ref, ref])[:, None]
    logits = F.one_hot(torch.stack([pred, ref]), 5).permute(0, 4, 1, 2, 3).float() * 4.0
    logits = logits + 0.1 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    if not violate:
        logits = F.one_hot(torch.stack([ref, ref]), 5).permute(0, 4, 1, 2, 3).float() * 4.0
    return logits.requires_grad_(True), ref_b


def toy_meshes(names):
    meshes, faces = [], []
    radius = {"LV_endo": 2.2, "LV_epi": 3.2, "RV_mesh": 2.2}
    centre = {"LV_endo": (3.5, 4.5, 4.0), "LV_epi": (3.5, 4.5, 4.0), "RV_mesh": (3.5, 4.5, 8.5)}
    for n in names:
        v, f = sphere_in_normalized_frame(SHAPE, centre[n], radius[n] * 1.1, subdivisions=1)
        meshes.append(v.expand(2, -1, -1).clone().requires_grad_(True))
        faces.append(f)
    return meshes, faces


NAMES = ["LV_endo", "LV_epi", "RV_mesh"]


@pytest.mark.filterwarnings("ignore:method='exact'")
@pytest.mark.parametrize("method,smoothing", [("exact", 0.0), ("dipole", 0.3)])
def test_tpm_forward_backward(method, smoothing):
    spec = make_spec([EXCLUSION, INCLUSION])
    logits, ref = toy_batch()
    meshes, faces = toy_meshes(NAMES)
    loss_fn = TPMLoss(spec, NAMES, method=method, num_uniform=64, num_surface=64, smoothing=smoothing)
    out = loss_fn(meshes, faces, logits, ref, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"occ", "tpm", "total"}
    assert all(torch.isfinite(t) and t.ndim == 0 for t in out.values())
    assert float(out["tpm"].detach()) > 0  # the septum hole gives critical points
    assert torch.allclose(out["total"], out["occ"] + 0.5 * out["tpm"])
    out["total"].backward()
    for v in meshes:
        assert v.grad is not None and torch.isfinite(v.grad).all()
    if method == "dipole":
        assert all(float(v.grad.abs().sum()) > 0 for v in meshes)
    assert logits.grad is None  # no gradient through the argmax


@pytest.mark.filterwarnings("ignore:method='exact'")
def test_tpm_without_violations_is_the_occupancy_loss():
    """No critical point: L_TPM (one BCE over standard + critical points, TPM Eq. 10-12) is L_occ itself; without
    standard points either, a graph-connected zero (DDP needs one)."""
    spec = make_spec([EXCLUSION, INCLUSION])
    logits, ref = toy_batch(violate=False)
    meshes, faces = toy_meshes(NAMES)
    loss = TPMLoss(spec, NAMES, num_uniform=8, num_surface=8, mesh_critical_points=False)
    out = loss(meshes, faces, logits, ref)
    assert sum(loss.last_counts.values()) == 0
    assert float(out["tpm"].detach()) == float(out["occ"].detach()) > 0 and out["tpm"].requires_grad
    out = TPMLoss(spec, NAMES, num_uniform=0, num_surface=0, mesh_critical_points=False)(meshes, faces, logits, ref)
    assert float(out["tpm"].detach()) == 0.0 and out["tpm"].requires_grad
    out["tpm"].backward()
    assert all(v.grad is not None and float(v.grad.abs().sum()) == 0.0 for v in meshes)


@pytest.mark.filterwarnings("ignore:method='exact'")
def test_tpm_max_critical_points_subsamples():
    spec = make_spec([EXCLUSION, INCLUSION])
    logits, ref = toy_batch()
    meshes, faces = toy_meshes(NAMES)
    out = TPMLoss(spec, NAMES, num_uniform=0, num_surface=0, max_critical_points=1)(meshes, faces, logits, ref)
    assert torch.isfinite(out["tpm"]) and float(out["occ"].detach()) == 0.0


@pytest.mark.filterwarnings("ignore:method='exact'")
@pytest.mark.parametrize("method,smoothing", [("exact", 0.0), ("dipole", 0.3)])
def test_mie_forward_backward(method, smoothing):
    spec = make_spec([EXCLUSION, INCLUSION])
    logits, ref = toy_batch()
    names = ["LV_endo", "RV_mesh"]
    meshes, faces = toy_meshes(names)
    loss_fn = MIELoss(spec, names, method=method, num_points=100, lambda_lap=0.1, smoothing=smoothing)
    out = loss_fn(meshes, faces, logits, ref, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"mie", "laplacian", "total"}
    assert all(torch.isfinite(t) and t.ndim == 0 for t in out.values())
    assert float(out["laplacian"].detach()) > 0
    assert torch.allclose(out["total"], out["mie"] + 0.1 * out["laplacian"])
    assert 0 < loss_fn.last_num_critical <= 2 * 2 * 20
    out["total"].backward()
    for v in meshes:
        assert torch.isfinite(v.grad).all() and float(v.grad.abs().sum()) > 0  # Laplacian term at least


def test_rho_mix_counts():
    """round(rho N) critical points first (distinct voxels of the mask, target [ref ∈ region]), random points after;
    an item with fewer critical voxels takes them all and fills up with random points."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 6, 8, 8, dtype=torch.bool)
    mask[0, 1:5, 2:7, 1:7] = True  # 120 critical voxels
    mask[1, 2, 3, 3:8] = True  # 5
    ref = torch.zeros(2, 6, 8, 8, dtype=torch.long)
    ref[:, :, :, :4] = 1  # target 1 where x < 4
    rnd = torch.rand(2, 300, 3, generator=g) * 5
    rnd_t = torch.full((2, 300), 0.5)  # random targets 0.5: tell them apart
    for n, rho in [(100, 0.2), (256, 0.2), (37, 0.2), (100, 0.0), (100, 1.0)]:
        p, t, k = mix_points(mask, ref, [1], rnd[:, :n], rnd_t[:, :n], rho, g)
        want = round(rho * n)
        assert p.shape == (2, n, 3) and t.shape == (2, n) and k.tolist() == [min(want, 120), min(want, 5)]
        for b in range(2):
            is_crit = t[b, :want] != 0.5  # the first round(rho N) slots: critical, or random where none is left
            crit = p[b, :want][is_crit].long()
            assert int(is_crit.sum()) == int(k[b]) and len({tuple(q) for q in crit.tolist()}) == int(k[b])
            assert bool(mask[b][tuple(crit.T)].all())
            assert torch.equal(t[b, :want][is_crit], (crit[:, 2] < 4).float())  # [ref ∈ region] there
            assert bool((t[b, want:] == 0.5).all())  # the rest are random points
    with pytest.raises(ValueError, match="rho"):
        mix_points(mask, ref, [1], rnd, rnd_t, 1.5)


@pytest.mark.filterwarnings("ignore:method='exact'")
def test_mie_uses_2d_detection():
    # LV directly above RV in the next slice (axis 0): a 3D contact, not a 2D one
    spec = make_spec([EXCLUSION])
    pred = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    pred[0, 1, 1:3, 1:3] = 1
    pred[0, 2, 1:3, 1:3] = 2
    ref = pred.clone()
    logits = F.one_hot(pred, 5).permute(0, 4, 1, 2, 3).float()
    v, f = sphere_in_normalized_frame((4, 4, 4), (1.5, 1.5, 1.5), 1.0, subdivisions=1)
    loss_fn = MIELoss(spec, ["LV_endo"], num_points=10)
    loss_fn([v[None]], [f], logits, ref[:, None])
    assert loss_fn.last_num_critical == 0
    # in 3D, the 4 + 4 contact voxels are points of both meshes of the rule (LV_endo and RV_mesh)
    assert sum(p.shape[0] for p, _ in critical_point_targets(pred, ref, spec)[0].values()) == 16


@pytest.mark.filterwarnings("ignore:method='exact'")
def test_module_bad_inputs():
    spec = make_spec([EXCLUSION, INCLUSION])
    with pytest.raises(ValueError, match="unknown mesh name 'LV'.*LV_endo"):
        TPMLoss(spec, ["LV"])
    with pytest.raises(ValueError, match="unknown mesh name"):
        MIELoss(spec, ["LV_endo", "nope"])
    with pytest.raises(ValueError, match="mesh_names is empty"):
        TPMLoss(spec, [])
    with pytest.raises(ValueError, match="rho"):
        MIELoss(spec, ["LV_endo"], rho=2.0)
    with pytest.raises(ValueError, match="method"):
        TPMLoss(spec, ["LV_endo"], method="fast")
    with pytest.raises(ValueError, match="smoothing > 0 needs method='dipole'"):
        TPMLoss(spec, ["LV_endo"], smoothing=0.1)
    with pytest.raises(TypeError, match="True or False.*replaces the count mesh_candidates"):
        TPMLoss(spec, ["LV_endo"], mesh_critical_points=1024)
    with pytest.raises(TypeError, match="mesh_critical_points must be True or False.*its None is False here"):
        MIELoss(spec, ["LV_endo"], mesh_critical_points=None)
    with pytest.warns(UserWarning, match="zero vertex gradients"):
        MIELoss(spec, ["LV_endo"], method="exact")
    logits, ref = toy_batch()
    meshes, faces = toy_meshes(NAMES)
    loss_fn = TPMLoss(spec, NAMES, num_uniform=4, num_surface=4)
    with pytest.raises(ValueError, match="does not match seg_logits"):
        loss_fn(meshes, faces, logits, ref[..., :-1])
    with pytest.raises(ValueError, match=r"\(B, 1, Z, Y, X\)"):
        loss_fn(meshes, faces, logits, ref[:, 0])
    with pytest.raises(ValueError, match="expected 3 meshes"):
        loss_fn(meshes[:2], faces[:2], logits, ref)
    with pytest.raises(ValueError, match=r"meshes\[0\]"):
        loss_fn([meshes[0][:1]] + meshes[1:], faces, logits, ref)
    with pytest.raises(ValueError, match=r"seg_logits"):
        loss_fn(meshes, faces, logits[:, :, 0], ref)


def test_ignored_query_points_carry_no_weight():
    """Occupancy query points on ignored voxels (sparse reference) get weight 0: their target is unknown."""
    from nnunet_topo.losses.tpm import known_weights

    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 4, (2, 3, 5, 6), generator=g)
    ref[0, 1] = 9  # an ignored slice
    ref[1, :, 2, 3] = 9
    pts = torch.rand(2, 500, 3, generator=g) * torch.tensor([2.0, 4.0, 5.0])  # continuous voxel coordinates
    w = known_weights(ref, pts, 9)
    nearest = pts.round().long()
    b = torch.arange(2)[:, None].expand(-1, 500)
    expected = (ref[b, nearest[..., 0], nearest[..., 1], nearest[..., 2]] != 9).float()
    assert torch.equal(w, expected) and (w == 0).any() and (w == 1).any()
    assert known_weights(ref, pts, None) is None


# ------------------------------------------------------------------------------------------ exempt end slices
STACK = (7, 9, 12)


def stack_batch(defect_slice=None):
    """A short-axis stack along axis 0: LV inside a MYO ring on slices 1..5, RV beside it. The prediction equals
    the reference except in ``defect_slice``, where the LV opens to the background and touches the RV."""
    ref = torch.zeros(STACK, dtype=torch.long)
    ref[1:6, 1:8, 1:8] = 3
    ref[1:6, 3:6, 3:6] = 1
    ref[1:6, 2:7, 9:11] = 2
    pred = ref.clone()
    if defect_slice is not None:
        pred[defect_slice, 4, 1:3] = 1  # LV through the ring to the background (inclusion)
        pred[defect_slice, 4, 6:9] = 1  # LV through the ring to the RV (exclusion)
    logits = F.one_hot(pred[None], 5).permute(0, 4, 1, 2, 3).float() * 4.0
    return logits, ref[None, None]


def stack_spec(k):
    extra = {"exempt_end_slices": k} if k else {}
    return make_spec([{**EXCLUSION, "mode": "2d", "axis": 0, **extra},
                      {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "mode": "2d", "axis": 0, **extra}])


def stack_meshes(names):
    centre = {"LV_endo": (3.0, 4.0, 4.0), "LV_epi": (3.0, 4.0, 4.0), "RV_mesh": (3.0, 4.5, 9.5)}
    radius = {"LV_endo": 1.8, "LV_epi": 3.3, "RV_mesh": 1.6}
    meshes, faces = [], []
    for n in names:
        v, f = sphere_in_normalized_frame(STACK, centre[n], radius[n], subdivisions=1)
        meshes.append(v[None].clone().requires_grad_(True))
        faces.append(f)
    return meshes, faces


def run_loss(kind, k, defect_slice):
    logits, ref = stack_batch(defect_slice)
    meshes, faces = stack_meshes(NAMES)
    if kind == "tpm":  # label-map critical points only (the mesh source checks overlaps, see mesh_losses.md)
        loss_fn = TPMLoss(stack_spec(k), NAMES, method="dipole", smoothing=0.5, num_uniform=16, num_surface=16,
                          mesh_critical_points=False)
    else:
        loss_fn = MIELoss(stack_spec(k), NAMES, method="dipole", smoothing=0.5, num_points=64,
                          mesh_critical_points=False)
    out = loss_fn(meshes, faces, logits, ref, generator=torch.Generator().manual_seed(0))
    out["total"].backward()
    critical = loss_fn.last_counts["prediction"]
    return {key: t.detach() for key, t in out.items()}, [v.grad.clone() for v in meshes], critical


@pytest.mark.parametrize("kind", ["tpm", "mie"])
def test_mesh_losses_ignore_exempt_end_slice_violations(kind):
    clean, clean_grads, clean_crit = run_loss(kind, 1, None)
    assert clean_crit == 0
    # a defect in the basal (first LV) slice: counted with k = 0, ignored with k = 1 (loss and gradients equal the
    # case without a defect)
    base_k0, _, crit_k0 = run_loss(kind, 0, 1)
    base_k1, grads_k1, crit_k1 = run_loss(kind, 1, 1)
    apex_k1, apex_grads, apex_crit = run_loss(kind, 1, 5)
    assert crit_k0 > 0 and crit_k1 == 0 and apex_crit == 0
    for out, grads in ((base_k1, grads_k1), (apex_k1, apex_grads)):
        for key in clean:
            torch.testing.assert_close(out[key], clean[key], rtol=0, atol=0)
        for g, g0 in zip(grads, clean_grads):
            torch.testing.assert_close(g, g0, rtol=0, atol=0)
    assert float(base_k0["total"]) != float(clean["total"])
    # a defect in a middle slice is still a critical point with k = 1, exactly as with k = 0
    mid_k0, mid_grads_k0, mid_crit_k0 = run_loss(kind, 0, 3)
    mid_k1, mid_grads_k1, mid_crit_k1 = run_loss(kind, 1, 3)
    assert mid_crit_k1 == mid_crit_k0 > 0
    for key in mid_k0:
        torch.testing.assert_close(mid_k1[key], mid_k0[key], rtol=0, atol=0)
    for g, g0 in zip(mid_grads_k1, mid_grads_k0):
        torch.testing.assert_close(g, g0, rtol=0, atol=0)
    assert float(mid_k1["total"]) != float(clean["total"])
    if kind == "tpm":  # no critical point: L_TPM is L_occ; the mid-slice defect's critical points change it
        assert float(base_k1["tpm"]) == float(base_k1["occ"]) and float(mid_k1["tpm"]) != float(mid_k1["occ"])


def test_critical_points_skip_exempt_end_slices_in_both_modes():
    logits, ref = stack_batch(1)
    pred = logits.argmax(1)
    for mode in ("3d", "2d"):  # TPM evaluates rules as written, MIE slice-wise: 2d rules are the same in both
        for k, expected in ((0, True), (1, False), (2, False)):
            out = critical_point_targets(pred, ref[:, 0], stack_spec(k), mode=mode)
            assert any(p.shape[0] > 0 for p, _ in out[0].values()) == expected, (mode, k)
    logits, ref = stack_batch(2)  # the second LV slice: an end slice only for k >= 2
    for k, expected in ((1, True), (2, False)):
        out = critical_point_targets(logits.argmax(1), ref[:, 0], stack_spec(k), mode="2d")
        assert any(p.shape[0] > 0 for p, _ in out[0].values()) == expected, k
