"""The gradient arithmetic of a mesh-trainer step (nnunet_topo/mesh_step.py) on a small network and head: the mesh
terms reach the backbone by at most ``share * ||∇L_seg||``, the regularisers never, the head's loss scale is undone."""
import numpy as np
import pytest
import torch

from nnunet_topo.mesh_step import (ShareEstimate, add_bounded_feature_gradient, backward_with_predicted_share,
                                  grad_norm, head_backward)


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


def _predicted(share, factor=None, loss_scale=None, mesh_scale=50.0):
    """One predicted step on the toy setup: ``backward_with_predicted_share`` with ``factor`` (default: what an exact
    step on the same batch and weights measured, through :class:`ShareEstimate`)."""
    exact = _step(share, mesh_scale=mesh_scale)
    est = ShareEstimate(every=3, margin=1.0)
    assert est.exact_due()
    est.record_exact(exact["seg_norm"], exact["mesh_norm"], grad_norm(exact["g_feat"]))
    assert not est.exact_due()
    backbone, seg_head, head, x = _setup()
    feat = backbone(x)
    l_seg = seg_head(feat).square().mean()
    inp = feat.detach().requires_grad_(True)
    out = head(inp.mean(dim=(2, 3, 4)))
    g_feat = head_backward(mesh_scale * (out - 1).square().mean(), out.square().sum(), list(head.parameters()),
                           [inp])
    c = est.predicted_factor(share, grad_norm(g_feat)) if factor is None else torch.tensor(factor)
    s = None if loss_scale is None else torch.tensor(loss_scale)
    backward_with_predicted_share(l_seg, [feat], g_feat, c, s)
    grads = [p.grad.clone() / (1.0 if loss_scale is None else loss_scale) for p in backbone.parameters()]
    return exact, c, grads


def test_one_backward_with_a_factor_equals_lseg_plus_that_factor_times_plain_autograd():
    """The predicted step's single backward = L_seg's gradient + factor x the data term's gradient by plain autograd
    through the undetached features (independent of mesh_step), also under a GradScaler-like loss scale."""
    backbone, seg_head, _, x = _setup()
    seg_head(backbone(x)).square().mean().backward()
    seg = [p.grad.clone() for p in backbone.parameters()]
    ref = _naive_backbone_mesh_grad()
    for scale in (None, 512.0):
        _, _, grads = _predicted(0.3, factor=0.37, loss_scale=scale)
        for got, a, b in zip(grads, seg, ref):
            assert torch.allclose(got, a + 0.37 * b, rtol=1e-5, atol=1e-6)


def test_predicted_step_on_the_measured_batch_keeps_the_bound_exactly():
    """Same batch and weights as the exact step: the predicted factor is the exact one, so the backbone's gradient
    differs from L_seg's by exactly share x ||∇L_seg|| (active bound) -- what the prediction is for."""
    share = 0.05
    exact, c, grads = _predicted(share)
    assert c.item() == pytest.approx(exact["factor"].item(), rel=1e-5) and c.item() < 1.0
    backbone, seg_head, _, x = _setup()
    seg_head(backbone(x)).square().mean().backward()
    diff = grad_norm([g - p.grad for g, p in zip(grads, backbone.parameters())])
    assert diff.item() == pytest.approx(share * exact["seg_norm"].item(), rel=1e-4)
    # a feature gradient twice as large on a predicted step gets half the factor (the bound follows ||g||); the
    # default margin gives the mesh 1/1.5 of that
    est = ShareEstimate(every=4)
    est.record_exact(torch.tensor(2.0), torch.tensor(30.0), torch.tensor(3.0))  # gain 10
    assert est.predicted_factor(0.1, torch.tensor(1.0)).item() == pytest.approx(0.1 / 1.5 * 2.0 / 10.0)
    assert est.predicted_factor(0.1, torch.tensor(2.0)).item() == pytest.approx(0.1 / 1.5 * 2.0 / 20.0)
    assert est.predicted_factor(0.1, torch.tensor(1e-6)).item() == 1.0  # never above 1 (a small gradient passes)


def test_share_estimate_is_exact_every_k_steps_and_until_it_has_a_usable_measurement():
    est = ShareEstimate(every=3)
    pattern = []
    for step in range(8):
        due = est.exact_due()
        pattern.append(due)
        if due:  # step 0 and 1: no mesh gradient yet (a head whose last layers start at zero): measured again
            usable = step >= 2
            est.record_exact(torch.tensor(1.0), torch.tensor(2.0 if usable else 0.0), torch.tensor(1.0))
        else:
            est.predicted_factor(0.1, torch.tensor(1.0))
    assert pattern == [True, True, True, False, False, True, False, False]
    nan = ShareEstimate(every=3)  # a non-finite L_seg norm (a GradScaler overflow) is not an estimate either
    nan.record_exact(torch.tensor(float("inf")), torch.tensor(2.0), torch.tensor(1.0))
    assert nan.exact_due() and nan.gain is None
    assert ShareEstimate(every=1).exact_due()


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
