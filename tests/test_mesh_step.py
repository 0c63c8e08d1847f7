"""The gradient arithmetic of a mesh-trainer step (nnunet_topo/mesh_step.py) on a small network and head: the mesh
terms reach the backbone by at most ``share * ||∇L_seg||``, the regularisers never, the head's loss scale is undone."""
import numpy as np
import pytest
import torch

from nnunet_topo.mesh_step import add_bounded_feature_gradient, grad_norm, head_backward


def _setup(seed=0):
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv3d(4, 4, 3, padding=1))
    seg_head = torch.nn.Conv3d(4, 2, 1)
    head = torch.nn.Linear(4, 3)
    x = torch.randn(2, 1, 4, 6, 6)
    return backbone, seg_head, head, x


def _step(share, data_w=1.0, reg_w=1.0, mesh_scale=1.0, loss_scale=None):
    backbone, seg_head, head, x = _setup()
    feat = backbone(x)
    l_seg = seg_head(feat).square().mean()
    inp = feat.detach().requires_grad_(share > 0)
    out = head(inp.mean(dim=(2, 3, 4)))  # (B, 3): a stand-in for the vertices
    data = data_w * mesh_scale * (out - 1).square().mean()
    reg = reg_w * out.square().sum()  # a "shape regulariser" of the head's output
    scale = None if loss_scale is None else torch.tensor(loss_scale)
    g_feat = head_backward(data, reg, list(head.parameters()), [inp], scale)
    l_seg.backward(retain_graph=share > 0)
    params = list(backbone.parameters())
    seg_grads = [p.grad.clone() for p in params]
    seg_norm, mesh_norm, factor = add_bounded_feature_gradient(params, [feat], g_feat, share)
    diff = grad_norm([p.grad - g for p, g in zip(params, seg_grads)])
    return dict(diff=diff, seg_norm=seg_norm, mesh_norm=mesh_norm, factor=factor, g_feat=g_feat,
                head_grads=[p.grad.clone() for p in head.parameters()], backbone_grads=[p.grad for p in params])


def _naive_backbone_mesh_grad():
    """The data term's gradient on the backbone by plain autograd through the undetached features."""
    backbone, seg_head, head, x = _setup()
    feat = backbone(x)
    out = head(feat.mean(dim=(2, 3, 4)))
    ((out - 1).square().mean() * 50.0).backward()
    return [p.grad.clone() for p in backbone.parameters()]


@pytest.mark.parametrize("share", [0.05, 0.3])
def test_backbone_gradient_differs_from_lseg_by_at_most_the_share(share):
    r = _step(share, mesh_scale=50.0)  # a mesh gradient far larger than L_seg's: the bound is active
    assert r["mesh_norm"] > share * r["seg_norm"]
    assert r["diff"].item() == pytest.approx(share * r["seg_norm"].item(), rel=1e-5)
    small = _step(share, mesh_scale=1e-4)  # a small mesh gradient passes unscaled
    assert small["factor"].item() == 1.0 and 0 < small["diff"].item() < share * small["seg_norm"].item()


def test_unscaled_mesh_gradient_equals_plain_autograd_through_the_features():
    r = _step(1e9, mesh_scale=50.0, reg_w=0.0)  # the bound inactive: exactly the data term's own gradient
    ref = _naive_backbone_mesh_grad()
    backbone, seg_head, head, x = _setup()
    feat = backbone(x)
    seg_head(feat).square().mean().backward()
    for got, seg, mesh in zip(r["backbone_grads"], [p.grad for p in backbone.parameters()], ref):
        assert torch.allclose(got, seg + mesh, atol=1e-6)


def test_share_zero_and_regularisers_never_reach_the_backbone():
    r = _step(0.0, mesh_scale=50.0)
    assert r["diff"].item() == 0.0 and r["g_feat"] == [None]
    only_reg = _step(0.5, data_w=0.0, reg_w=1.0)  # the regulariser alone: no feature gradient at all
    assert only_reg["diff"].item() == 0.0
    assert only_reg["g_feat"][0] is None or only_reg["g_feat"][0].abs().max().item() == 0.0
    assert any(g.abs().max() > 0 for g in only_reg["head_grads"])  # ... but the head does get it


def test_head_loss_scale_is_undone_for_the_features_and_kept_for_the_head():
    a = _step(0.3, mesh_scale=2.0)
    b = _step(0.3, mesh_scale=2.0, loss_scale=1024.0)
    assert torch.allclose(a["g_feat"][0], b["g_feat"][0], rtol=1e-5, atol=1e-9)
    for ga, gb in zip(a["head_grads"], b["head_grads"]):  # GradScaler.unscale_ divides these later
        assert torch.allclose(ga * 1024.0, gb, rtol=1e-5)


def test_mesh_volume_ratio_is_physical_in_an_anisotropic_patch():
    """A sphere of 9 mm given in the normalised (x, y, z) patch frame of a (20, 40, 48) patch at (4, 1, 0.8) mm,
    against a voxel ball of the same radius: ratio ~1 (the frame conversion keeps orientation and mm scale); a mesh
    of half the radius gives ~1/8; a batch item without the structure is left out; none at all gives NaN."""
    import trimesh

    from nnunet_topo.frames import voxel_to_normalized
    from nnunet_topo.losses.mesh_terms import mesh_volume_ratios

    shape, spacing, centre, r = (20, 40, 48), (4.0, 1.0, 0.8), (19.2, 20.0, 40.0), 9.0  # centre (x, y, z) mm
    ico = trimesh.creation.icosphere(subdivisions=4)
    faces = torch.tensor(ico.faces)

    def mesh(radius):
        v_mm = torch.tensor(ico.vertices * radius + np.asarray(centre), dtype=torch.float32)
        return voxel_to_normalized(v_mm.flip(-1) / torch.tensor(spacing), shape)[None]

    z, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    d = ((z * spacing[0] - centre[2]) ** 2 + (y * spacing[1] - centre[1]) ** 2 + (x * spacing[2] - centre[0]) ** 2)
    ball = (d.sqrt() <= r).long()
    target = torch.stack([ball, torch.zeros_like(ball)])[:, None]  # item 2 has no structure
    meshes = [torch.cat([mesh(r), mesh(r)]), torch.cat([mesh(r / 2), mesh(r / 2)])]
    full, half = mesh_volume_ratios(meshes, [faces, faces], target, [[1], [1]], spacing)
    assert full.item() == pytest.approx(1.0, abs=0.06) and half.item() == pytest.approx(1 / 8, abs=0.01)
    none = mesh_volume_ratios([meshes[0]], [faces], torch.zeros_like(target), [[1]], spacing)[0]
    assert torch.isnan(none)
