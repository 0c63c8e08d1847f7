"""Mesh-level rules of the topology spec (issue 21 item 4): ``mesh_exclusion`` (two meshes must not overlap, contact
allowed) and ``mesh_inclusion`` (one mesh inside another): parsing, validation, the rules in force, and their use by
L_TPM's mesh-source critical points and the mesh TVS.

The must-show case: an RV mesh pushed 3 mm into the LV epicardial mesh (not into LV_endo) over a correct
segmentation. With ``mesh_exclusion(RV, LV_epi)`` it gives mesh critical points and a positive mesh TVS; with the
voxel rules alone (the spec before mesh rules existed) it gives neither: the voxel rules reach the meshes only as
LV_endo vs RV and LV_endo inside LV_epi, which this RV mesh does not break.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from nnunet_topo.frames import normalized_to_mm, voxel_to_mm, voxel_to_normalized
from nnunet_topo.losses.tpm import TPMLoss
from nnunet_topo.mesh_evaluation import evaluate_mesh_case
from nnunet_topo.frames import ImageGeometry
from nnunet_topo.occupancy import winding_number
from nnunet_topo.topology_spec import (MeshExclusionRule, MeshInclusionRule, TopologySpecError, describe, mesh_rules_in_force,
                               parse_topology)
from nnunet_topo.synthetic import topology_block

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
MESH_RULES = [{"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]},
              {"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"}]


def topo(**extra):
    block = {"rules": [{"type": "exclusion", "a": "LV", "b": "RV"},
                       {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "mode": "2d", "axis": 0}],
             "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]}}
    block.update(extra)
    return {"labels": LABELS, "topology": block}


# ------------------------------------------------------------------------------------------ parsing
def test_parse_mesh_rules():
    spec = parse_topology(topo(mesh_rules=MESH_RULES))
    assert spec.mesh_rules == (MeshExclusionRule("mesh_exclusion(RV,LV_epi)", "RV", "LV_epi"),
                               MeshInclusionRule("mesh_inclusion(LV_endo in LV_epi)", "LV_endo", "LV_epi"))
    named = parse_topology(topo(mesh_rules=[{"type": "mesh_exclusion", "meshes": ["LV_endo", "RV"], "name": "septum"}]))
    assert named.mesh_rules[0].name == "septum"
    assert parse_topology(topo()).mesh_rules == ()
    text = describe(spec)
    assert "mesh_exclusion(RV,LV_epi): RV and LV_epi must not overlap" in text
    assert "exclusion(LV,RV): LV_endo and RV must not overlap (from the voxel rule)" in text


@pytest.mark.parametrize("mesh_rules,match", [
    ([{"type": "mesh_exclusion", "meshes": ["RV", "LV_ep"]}],
     r"mesh_rules\[0\] \(mesh_exclusion\)\.meshes\[1\]: unknown mesh structure 'LV_ep'.*Did you mean 'LV_epi'"),
    ([{"type": "mesh_inclusion", "inner": "LV", "outer": "LV_epi"}],
     r"\.inner: unknown mesh structure 'LV'.*'LV' is a label, not a mesh structure; its mesh is 'LV_endo'"),
    ([{"type": "mesh_inclusion", "inner": "MYO", "outer": "LV_epi"}],
     r"unknown mesh structure 'MYO'.*no mesh structure has its labels MYO"),
    ([{"type": "mesh_exclusion", "meshes": ["LV_endo", "LV_epi"]}], r"share label\(s\) 'LV'.*mesh_inclusion"),
    ([{"type": "mesh_exclusion", "meshes": ["RV", "RV"]}], "names the same mesh twice"),
    ([{"type": "mesh_exclusion", "meshes": ["RV"]}], "exactly two mesh structure names"),
    ([{"type": "mesh_exclusion", "meshes": "RV"}], "exactly two mesh structure names"),
    ([{"type": "mesh_inclusion", "inner": "LV_epi", "outer": "LV_endo"}],
     r"outer='LV_endo' \(LV\) must contain every label of inner='LV_epi'.*missing 'MYO'"),
    ([{"type": "mesh_inclusion", "inner": "RV", "outer": "RV"}], "names the same mesh twice"),
    ([{"type": "exclusion", "meshes": ["RV", "LV_epi"]}],
     r"unknown mesh rule type 'exclusion'.*put it in topology\.rules"),
    ([{"type": "mesh_exclusion", "mesh": ["RV", "LV_epi"]}], r"unknown key 'mesh'.*Did you mean 'meshes'"),
    ([{"type": "mesh_inclusion", "inner": "LV_endo"}], "missing required key 'outer'"),
    ([{"meshes": ["RV", "LV_epi"]}], "missing required key 'type'"),
    ([MESH_RULES[0], MESH_RULES[0]], r"rule name 'mesh_exclusion\(RV,LV_epi\)' is used twice"),
    ([{"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"], "name": "exclusion(LV,RV)"}],
     r"already used by topology\.rules\[0\]"),
    ([{"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"], "name": ""}], "name must be a non-empty string"),
    ({"type": "mesh_exclusion"}, "must be a list"),
    (["RV"], "each mesh rule must be a dict"),
])
def test_mesh_rule_errors_name_the_offender(mesh_rules, match):
    with pytest.raises(TopologySpecError, match=match):
        parse_topology(topo(mesh_rules=mesh_rules))


def test_mesh_rules_need_mesh_structures():
    block = topo(mesh_rules=MESH_RULES)
    del block["topology"]["mesh_structures"]
    with pytest.raises(TopologySpecError, match="topology.mesh_structures is empty"):
        parse_topology(block)


def test_mesh_rules_in_force():
    """Voxel rules whose structures are mesh structures are read on the meshes under their own names (as before
    mesh rules existed); a voxel rule whose check a mesh rule already states is left out (counted once)."""
    rules, not_on_meshes = mesh_rules_in_force(parse_topology(topo()))
    assert rules == (MeshExclusionRule("exclusion(LV,RV)", "LV_endo", "RV"),
                     MeshInclusionRule("inclusion(LV in LV+MYO) [2d axis 0]", "LV_endo", "LV_epi"))
    assert not_on_meshes == {}
    rules, not_on_meshes = mesh_rules_in_force(parse_topology(topo(mesh_rules=MESH_RULES)))
    assert [r.name for r in rules] == ["mesh_exclusion(RV,LV_epi)", "mesh_inclusion(LV_endo in LV_epi)",
                                       "exclusion(LV,RV)"]
    assert "same check as 'mesh_inclusion(LV_endo in LV_epi)'" in not_on_meshes["inclusion(LV in LV+MYO) [2d axis 0]"]
    # a voxel rule on a structure without a mesh
    spec = parse_topology({"labels": LABELS, "topology": {"rules": [{"type": "exclusion", "a": "LV", "b": "RV"}],
                                                          "mesh_structures": {"LV_endo": ["LV"]}}})
    rules, not_on_meshes = mesh_rules_in_force(spec)
    assert rules == () and "['RV'] have no mesh structure" in not_on_meshes["exclusion(LV,RV)"]


@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
def test_presets_state_the_septum_for_meshes(preset):
    block = topology_block(preset)
    labels = {"acdc": LABELS, "wholeheart": {"background": 0, "LV": 1, "MYO": 2, "RV": 3, "LA": 4, "RA": 5,
                                             "AO": 6}}[preset]
    spec = parse_topology({"labels": labels, "topology": block})
    names = [r.name for r in mesh_rules_in_force(spec)[0]]
    assert "mesh_exclusion(RV,LV_epi)" in names and "mesh_inclusion(LV_endo in LV_epi)" in names


# ------------------------------------------------------------------------------------------ the must-show case
SHAPE = (24, 48, 80)           # (Z, Y, X)
SPACING = (2.0, 1.0, 1.0)      # (z, y, x) mm
LV_C, RV_C = (28.0, 24.0, 22.0), (54.5, 24.0, 22.0)   # (x, y, z) mm
R_ENDO, R_EPI, R_RV = 10.0, 16.0, 10.0
PUSH = 3.0                     # mm of the RV mesh inside the LV epicardial mesh


def reference():
    """LV ball (10 mm) in a 6 mm MYO shell; the RV ball (10 mm) touches the shell on the right: the septum."""
    z, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij")
    zm, ym, xm = z * SPACING[0], y * SPACING[1], x * SPACING[2]
    d_lv = ((xm - LV_C[0]) ** 2 + (ym - LV_C[1]) ** 2 + (zm - LV_C[2]) ** 2).sqrt()
    d_rv = ((xm - RV_C[0]) ** 2 + (ym - RV_C[1]) ** 2 + (zm - RV_C[2]) ** 2).sqrt()
    ref = torch.zeros(SHAPE, dtype=torch.long)
    ref[d_lv <= R_EPI] = LABELS["MYO"]
    ref[d_lv <= R_ENDO] = LABELS["LV"]
    ref[(d_rv <= R_RV) & (ref == 0)] = LABELS["RV"]
    return ref


def world_meshes(subdivisions=3):
    """Icospheres in mm: LV_endo and LV_epi on the reference, the RV moved PUSH mm into LV_epi (its nearest point
    is then 3 mm from LV_endo, so it does not enter LV_endo)."""
    rv_centre = (LV_C[0] + R_EPI + R_RV - PUSH,) + RV_C[1:]
    out = {}
    for name, centre, radius in (("LV_endo", LV_C, R_ENDO), ("LV_epi", LV_C, R_EPI), ("RV", rv_centre, R_RV)):
        ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
        out[name] = trimesh.Trimesh(ico.vertices + np.asarray(centre), ico.faces, process=False)
    return out


def lens_volume(r1, r2, d):
    """Volume of the intersection of two balls of radii r1, r2 at distance d."""
    return math.pi * (r1 + r2 - d) ** 2 * (d * d + 2 * d * r2 - 3 * r2 * r2 + 2 * d * r1 + 6 * r1 * r2
                                            - 3 * r1 * r1) / (12 * d)


def patch_meshes(subdivisions=3):
    """The same meshes in the normalised patch frame of the loss, (1, V, 3) each, and their faces."""
    names, meshes, faces = ["LV_endo", "LV_epi", "RV"], [], []
    world = world_meshes(subdivisions)
    for name in names:
        m = world[name]
        v_mm = torch.tensor(m.vertices, dtype=torch.float32)  # world = patch frame here (origin 0, identity)
        meshes.append(voxel_to_normalized(v_mm.flip(-1) / torch.tensor(SPACING), SHAPE)[None].clone())
        faces.append(torch.tensor(m.faces))
    return names, meshes, faces


@pytest.mark.parametrize("with_mesh_rules", [True, False])
def test_rv_pushed_into_lv_epi_gives_mesh_critical_points_only_with_the_mesh_rule(with_mesh_rules):
    spec = parse_topology(topo(**({"mesh_rules": MESH_RULES[:1]} if with_mesh_rules else {})))
    ref = reference()
    names, meshes, faces = patch_meshes()
    logits = F.one_hot(ref[None], 4).permute(0, 4, 1, 2, 3).float() * 5.0  # a correct segmentation
    loss = TPMLoss(spec, names, method="dipole", smoothing=1.0, spacing=SPACING, num_uniform=64, num_surface=64)
    meshes_mm = [normalized_to_mm(v, SHAPE, SPACING) for v in meshes]
    critical = loss.critical_points(meshes_mm, faces, logits, ref[None])
    assert loss.last_counts["prediction"] == 0
    out = loss(meshes, faces, logits, ref[None, None], generator=torch.Generator().manual_seed(0))
    if not with_mesh_rules:  # the bug before mesh rules: nothing sees this penetration
        assert loss.last_counts["meshes"] == 0
        assert float(out["tpm"].detach()) == float(out["occ"].detach())
        return
    assert loss.last_counts["meshes"] > 20
    assert critical[0]["LV_endo"][0].shape[0] == 0  # the rule names RV and LV_epi only
    idx, t_rv = critical[0]["RV"]
    idx_epi, t_epi = critical[0]["LV_epi"]
    assert torch.equal(idx, idx_epi) and idx.shape[0] > 10
    pts = voxel_to_mm(idx, SPACING).double()
    for i in (1, 2):  # every point lies inside LV_epi and RV (exact winding number)
        assert bool((winding_number(pts, meshes_mm[i][0].double(), faces[i]) > 0.5).all())
    labels = ref[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert bool((labels == LABELS["MYO"]).float().mean() > 0.9)  # the septum: reference MYO
    # targets [reference ∈ region(mesh)]: negatives for the RV mesh, positives for LV_epi (MYO is part of it)
    assert torch.equal(t_rv, (labels == LABELS["RV"]).float()) and float(t_rv.mean()) < 0.1
    assert torch.equal(t_epi, torch.isin(labels, torch.tensor([2, 3])).float()) and float(t_epi.mean()) > 0.9
    assert float(out["tpm"].detach()) != float(out["occ"].detach())


def test_l_tpm_pushes_the_rv_mesh_out_of_lv_epi():
    """A few steps of L_TPM (critical points only) on the mesh rule's points shrink the RV–LV_epi overlap."""
    spec = parse_topology(topo(mesh_rules=MESH_RULES[:1]))
    ref = reference()
    names, meshes, faces = patch_meshes(subdivisions=2)  # 320 faces: the exact candidate test is the cost
    meshes = [m.requires_grad_(True) for m in meshes]
    logits = F.one_hot(ref[None], 4).permute(0, 4, 1, 2, 3).float() * 5.0
    loss = TPMLoss(spec, names, method="dipole", smoothing=1.0, spacing=SPACING, num_uniform=0, num_surface=0,
                   max_critical_points=256)
    # (x, y, z) mm, 0.5 mm grid over the lens (x 41..44 mm, radius < 8 mm around the centre line)
    grid = torch.stack(torch.meshgrid(torch.arange(38.25, 47.0, 0.5), torch.arange(14.25, 34.0, 0.5),
                                      torch.arange(12.25, 32.0, 0.5), indexing="ij"), -1).reshape(-1, 3).double()

    def overlap():
        inside = [winding_number(grid, normalized_to_mm(meshes[i][0].detach().double(), SHAPE, SPACING), faces[i])
                  > 0.5 for i in (1, 2)]
        return float((inside[0] & inside[1]).sum()) * 0.125  # mm^3

    before = overlap()
    assert before > 50
    opt = torch.optim.Adam(meshes, lr=0.003)  # normalised units: about 0.12 mm in x per step
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        out = loss(meshes, faces, logits, ref[None, None], generator=gen)
        opt.zero_grad()
        out["tpm"].backward()
        opt.step()
    after = overlap()
    assert after < 0.5 * before, (before, after)  # measured: 138 -> 45 mm^3 in 12 steps


@pytest.mark.parametrize("with_mesh_rules", [True, False])
def test_rv_pushed_into_lv_epi_gives_a_positive_mesh_tvs_only_with_the_mesh_rule(with_mesh_rules):
    spec = parse_topology(topo(**({"mesh_rules": MESH_RULES} if with_mesh_rules else {})))
    geometry = ImageGeometry(SPACING[::-1], (0.0, 0.0, 0.0), np.eye(3))
    ref = reference().numpy().astype(np.uint8)
    topo_out = evaluate_mesh_case(ref, geometry, world_meshes(), spec, num_samples=500)["mesh_topology"]
    if not with_mesh_rules:  # the voxel rules read on the meshes: LV_endo vs RV, LV_endo inside LV_epi, both hold
        assert topo_out["evaluated_rules"] == ["exclusion(LV,RV)", "inclusion(LV in LV+MYO) [2d axis 0]"]
        assert topo_out["TVS"] == 0.0
        return
    name = "mesh_exclusion(RV,LV_epi)"
    assert set(topo_out["evaluated_rules"]) == {name, "mesh_inclusion(LV_endo in LV_epi)", "exclusion(LV,RV)"}
    assert "inclusion(LV in LV+MYO) [2d axis 0]" in topo_out["skipped_rules"]  # the mesh inclusion states it
    volume = topo_out["violating_volume_mm3"][name]
    assert volume == pytest.approx(lens_volume(R_EPI, R_RV, R_EPI + R_RV - PUSH), rel=0.15)
    total = topo_out["reference_volume_sum_mm3"]
    assert topo_out["TVS"] == pytest.approx(volume / total) and topo_out["TVS"] > 0
    assert topo_out["TVS_per_rule"][name] == topo_out["TVS"]
