"""TPM does its job (issue 9): it catches membrane penetration, from the label map *and* from the meshes, in mm.

Two balls (LV, RV) separated by a wall (MYO) in an anisotropic patch (2 x 1 x 1 mm); the predicted meshes are
pushed into each other over a *correct* segmentation, which is the case that L_TPM with label-map critical points
alone never sees. Overlap volumes are measured with exact winding numbers on a 1 mm grid (an independent check of
inside/outside, not the loss's own smoothed occupancy).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from nnunet_topo.frames import normalized_to_mm, voxel_to_mm, voxel_to_normalized
from nnunet_topo.losses.mesh_targets import critical_point_targets
from nnunet_topo.losses.mie import MIELoss
from nnunet_topo.losses.tpm import TPMLoss, critical_bce
from nnunet_topo.occupancy import winding_number
from nnunet_topo.topology_spec import parse_topology, spec_in_patch_frame

LABELS = {"background": 0, "LV": 1, "RV": 2, "MYO": 3}
SPEC = parse_topology({"labels": LABELS, "topology": {"rules": [{"type": "exclusion", "a": "LV", "b": "RV"}],
                                                      "mesh_structures": {"LV": ["LV"], "RV": ["RV"]}}})
SHAPE = (16, 24, 32)
SPACING = (2.0, 1.0, 1.0)
NAMES = ["LV", "RV"]


def reference():
    """LV ball at x = 10 mm, RV ball at x = 22 mm (radius 5 mm), each in a 2 mm MYO wall: the septum."""
    z, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij")
    zm, ym, xm = z * SPACING[0], y * SPACING[1], x * SPACING[2]
    d_lv = ((zm - 15) ** 2 + (ym - 12) ** 2 + (xm - 10) ** 2).sqrt()
    d_rv = ((zm - 15) ** 2 + (ym - 12) ** 2 + (xm - 22) ** 2).sqrt()
    ref = torch.zeros(SHAPE, dtype=torch.long)
    ref[(d_lv <= 7) | (d_rv <= 7)] = 3
    ref[d_lv <= 5] = 1
    ref[d_rv <= 5] = 2
    return ref[None]


def sphere(center_mm_xyz, radius_mm, shape=SHAPE, spacing=SPACING, subdivisions=2):
    """Icosphere given in mm, returned in the normalised frame of a patch (shape, spacing), and its faces."""
    ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius_mm)
    v_mm = torch.tensor(ico.vertices + np.asarray(center_mm_xyz), dtype=torch.float32)
    return voxel_to_normalized(v_mm.flip(-1) / torch.tensor(spacing), shape), torch.tensor(ico.faces)


def penetrating_meshes():
    """LV and RV spheres pushed into each other across the septum (centres 6 mm apart, radius 6.5 mm)."""
    (vl, fl), (vr, fr) = sphere((13.0, 12.0, 15.0), 6.5), sphere((19.0, 12.0, 15.0), 6.5)
    return [vl[None].clone(), vr[None].clone()], [fl, fr]


GRID = torch.stack(torch.meshgrid(torch.arange(0.0, 32.0), torch.arange(0.0, 24.0), torch.arange(0.0, 32.0),
                                  indexing="ij"), -1).reshape(-1, 3).to(torch.float64)  # (x, y, z) mm, 1 mm grid


def overlap_mm3(meshes, faces):
    inside = [winding_number(GRID, normalized_to_mm(v[0].detach().double(), SHAPE, SPACING), f) > 0.5
              for v, f in zip(meshes, faces)]
    return float((inside[0] & inside[1]).sum())  # 1 mm^3 per grid point


def correct_logits(ref):
    return F.one_hot(ref, 4).permute(0, 4, 1, 2, 3).float() * 5.0


def test_penetrating_meshes_over_a_correct_segmentation_give_critical_points():
    ref = reference()
    meshes, faces = penetrating_meshes()
    loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=1.0, spacing=SPACING, num_uniform=0, num_surface=0)
    critical = loss.critical_points([normalized_to_mm(v, SHAPE, SPACING) for v in meshes], faces,
                                    correct_logits(ref), ref)
    assert loss.last_counts["prediction"] == 0  # the segmentation is right: label-map source finds nothing
    assert loss.last_counts["meshes"] > 20
    for name in NAMES:
        idx, t = critical[0][name]
        assert 2 * idx.shape[0] == loss.last_counts["meshes"]  # (voxel, mesh) pairs: each voxel is a point of both
        pts = voxel_to_mm(idx, SPACING).double()
        for v, f in zip(meshes, faces):  # each point lies inside both meshes (exact winding number)
            assert bool((winding_number(pts, normalized_to_mm(v[0].double(), SHAPE, SPACING), f) > 0.5).all())
        labels = ref[0][idx[:, 0], idx[:, 1], idx[:, 2]]
        assert torch.equal(t, (labels == LABELS[name]).float())
    # the overlap straddles the septum: most points have reference MYO and are negatives for both meshes
    assert float((critical[0]["LV"][1] == 0).float().mean()) > 0.5
    # without the mesh source, TPM would see nothing here: no critical point, so L_TPM (one BCE over the standard
    # and the critical points, TPM Eq. 10-12) is just the occupancy BCE over the standard points
    off = TPMLoss(SPEC, NAMES, method="dipole", smoothing=1.0, spacing=SPACING, mesh_critical_points=False)
    out = off(meshes, faces, correct_logits(ref), ref[:, None])
    assert sum(off.last_counts.values()) == 0
    assert float(out["tpm"]) == float(out["occ"])


def _optimise(loss, steps, key):
    ref = reference()
    meshes, faces = penetrating_meshes()
    meshes = [m.requires_grad_(True) for m in meshes]
    opt = torch.optim.Adam(meshes, lr=0.005)  # normalised units: about 0.08 mm in x per step
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = loss(meshes, faces, correct_logits(ref), ref[:, None], generator=gen)
        opt.zero_grad()
        out[key].backward()
        opt.step()
    return overlap_mm3(meshes, faces)


def test_tpm_alone_removes_the_penetration():
    before = overlap_mm3(*penetrating_meshes())
    assert before > 300
    loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=1.0, spacing=SPACING, num_uniform=0, num_surface=0,
                   max_critical_points=256)
    after = _optimise(loss, 40, "tpm")
    assert after <= 0.1 * before, (before, after)  # >= 90 % of the overlap volume removed


def test_tpm_adds_to_the_occupancy_loss():
    """Same steps, same number of query points per mesh (384): L_occ + L_TPM removes more overlap than L_occ."""
    before = overlap_mm3(*penetrating_meshes())
    occ_only = TPMLoss(SPEC, NAMES, method="dipole", smoothing=1.0, spacing=SPACING, num_uniform=256,
                       num_surface=128, lambda_tp=0.0, mesh_critical_points=False)
    with_tpm = TPMLoss(SPEC, NAMES, method="dipole", smoothing=1.0, spacing=SPACING, num_uniform=128,
                       num_surface=128, lambda_tp=1.0, max_critical_points=128)
    left_occ = _optimise(occ_only, 20, "total")
    left_tpm = _optimise(with_tpm, 20, "total")
    assert left_tpm < left_occ < before, (before, left_occ, left_tpm)
    # measured: 395 -> 81 mm^3 (L_occ) vs 395 -> 44 mm^3 (L_occ + L_TPM weighted as TPM Eq. 10-12: one BCE over
    # the 256 standard points and the <= 128 critical points; 35 mm^3 with the former mean over critical points)
    assert left_tpm < 0.6 * left_occ


@pytest.mark.parametrize("smoothing", [1.0, 2.0])
def test_occupancy_is_physical_not_normalised(smoothing):
    """The same physical mesh at the same physical points gives the same smoothed occupancy BCE in an anisotropic
    patch (4 x 1 x 1 mm) and in an isotropic one (1 mm), and the same as the dipole winding number evaluated
    directly in mm (tolerance 1e-4 relative, float32): the smoothing is a length in mm."""
    centre, radius = (20.0, 19.0, 18.0), 9.0
    aniso, iso = ((10, 40, 40), (4.0, 1.0, 1.0)), ((37, 40, 40), (1.0, 1.0, 1.0))
    pts_mm = torch.tensor([[20.0, 19.0, 8.0], [20.0, 19.0, 28.0], [29.0, 19.0, 16.0], [12.0, 10.0, 20.0],
                           [20.0, 27.0, 24.0]])  # (x, y, z) mm; z a multiple of 4: voxel centres in both patches
    targets = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    values = []
    for shape, spacing in (aniso, iso):
        v, f = sphere((centre[0], centre[1], centre[2]), radius, shape, spacing, subdivisions=3)
        idx = (pts_mm.flip(-1) / torch.tensor(spacing)).round().long()
        s, n = critical_bce(normalized_to_mm(v[None], shape, spacing), f, [idx], [targets], spacing, "dipole",
                            smoothing=smoothing)
        assert n == 5
        values.append(float(s))
    ico = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    w = winding_number(pts_mm, torch.tensor(ico.vertices + np.asarray(centre), dtype=torch.float32),
                       torch.tensor(ico.faces), method="dipole", smoothing=smoothing).clamp(1e-4, 1 - 1e-4)
    direct = float(F.binary_cross_entropy(w, targets, reduction="sum"))
    assert values[0] == pytest.approx(values[1], rel=1e-4) and values[0] == pytest.approx(direct, rel=1e-4)


def test_2d_rules_follow_transpose_forward():
    """A CT-like case: the image's slice axis is 2, nnU-Net transposes with transpose_forward (2, 0, 1). The
    rule's 2D contacts must be found on the same voxels in the preprocessed (transposed) patch as in the image."""
    labels = {"background": 0, "LV": 1, "RV": 2}
    spec = parse_topology({"labels": labels, "topology": {
        "rules": [{"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 2}],
        "mesh_structures": {"LV": ["LV"], "RV": ["RV"]}}})
    img = torch.zeros(5, 6, 7, dtype=torch.long)
    img[1:3, 2, 3] = 1
    img[1:3, 3, 3] = 2  # in-plane contact for slices along image axis 2 (neighbours along axis 1)
    img[4, 2, 1] = 1
    img[4, 2, 2] = 2  # contact along axis 2 itself: across slices, not a 2D violation
    tf = (2, 0, 1)
    patch = img.permute(*tf)  # nnU-Net: data.transpose([0, *[i + 1 for i in transpose_forward]])
    expected = critical_point_targets(img[None], img[None], spec)[0]
    got = critical_point_targets(patch[None], patch[None], spec_in_patch_frame(spec, tf))[0]
    wrong = critical_point_targets(patch[None], patch[None], spec)[0]  # axis not mapped: other slices
    for name in ("LV", "RV"):
        exp = {tuple(int(p[k]) for k in tf) for p in expected[name][0].tolist()}  # image index -> patch index
        assert exp and {tuple(p) for p in got[name][0].tolist()} == exp
        assert {tuple(p) for p in wrong[name][0].tolist()} != exp
    # MIE (every rule slice-wise) uses the mapped axis of the same spec
    mie = MIELoss(spec_in_patch_frame(spec, tf), ["LV", "RV"], method="dipole", smoothing=1.0, num_points=8,
                  mesh_critical_points=False)
    v, f = sphere((3.0, 3.0, 3.0), 2.0, tuple(patch.shape), (1.0, 1.0, 1.0), subdivisions=1)
    logits = F.one_hot(patch[None], 3).permute(0, 4, 1, 2, 3).float()
    mie([v[None], v[None]], [f, f], logits, patch[None, None])
    # 4 contact voxels (2 LV, 2 RV), points of both meshes; per mesh round(0.2 * 8) = 2 are mixed in, 2 meshes
    assert mie.last_num_critical == 2 * 2
