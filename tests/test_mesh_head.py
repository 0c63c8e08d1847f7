"""Tests for nnunet_topo.mesh_head: templates, graph ops, head, network wrapper."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_topo.mesh_head import (
    ChebConv,
    GraphConv,
    MeshAugmentedNetwork,
    MeshHead,
    Template,
    axis_angle_to_matrix,
    mesh_edges,
    normalized_adjacency,
    sample_features,
    scaled_laplacian,
    sphere_template,
    template_from_masks,
    torus_template,
)
from nnunet_topo.losses.mesh_regularisers import edge_length_loss, edge_lengths, laplacian_smoothing_loss
from nnunet_topo.metrics.mesh import laplacian_smoothness_energy
from nnunet_topo.metrics.topology import betti_numbers_3d

SHAPE = (24, 40, 36)


def _voxel_volume(shape):
    return float(np.prod([2.0 / (n - 1) for n in shape]))


def _ellipsoid(shape=SHAPE, c=(11, 20, 17), r=(7, 12, 10)):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1


def _tube(shape=SHAPE):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    rr = np.sqrt((yy - 20) ** 2 + (xx - 18) ** 2)
    return (rr >= 6) & (rr <= 10) & (zz >= 3) & (zz <= 20)


def _ring(shape=SHAPE):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return (np.sqrt((yy - 20) ** 2 + (xx - 18) ** 2) - 10) ** 2 + (zz - 12) ** 2 <= 16


def _check_closed(t: Template, genus: int):
    m = t.to_trimesh()
    assert m.is_watertight and m.is_winding_consistent
    assert m.euler_number == 2 - 2 * genus
    assert t.volume() > 0


# ---------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subdivisions,nv", [(0, 12), (2, 162), (3, 642)])
def test_sphere_template(subdivisions, nv):
    t = sphere_template(subdivisions, radius=0.5)
    assert t.num_vertices == nv and t.genus == 0
    _check_closed(t, 0)
    assert t.vertices.dtype == np.float32 and t.faces.dtype == np.int64
    if subdivisions >= 2:
        assert t.volume() == pytest.approx(4 / 3 * np.pi * 0.125, rel=0.05)


def test_torus_template():
    t = torus_template(0.5, 0.2, 24, 12, axis=(1.0, 1.0, 0.0))
    assert t.num_vertices == 24 * 12 and t.genus == 1
    _check_closed(t, 1)
    polygon = 24 / (2 * np.pi) * np.sin(2 * np.pi / 24) * 12 / (2 * np.pi) * np.sin(2 * np.pi / 12)
    assert t.volume() == pytest.approx(2 * np.pi * 0.5 * np.pi * 0.04 * polygon, rel=0.01)
    with pytest.raises(ValueError):
        torus_template(0.2, 0.5)


def test_template_dict_round_trip_json():
    t = torus_template(name="MYO")
    t2 = Template.from_dict(json.loads(json.dumps(t.to_dict())))
    assert t2 == t and t2.name == "MYO" and t2.genus == 1
    with pytest.raises(ValueError):
        Template.from_dict({"name": "x"})


@pytest.mark.parametrize("subdivisions", [2, 3])
def test_template_from_masks_sphere(subdivisions):
    masks = [_ellipsoid(c=(11 + d, 20, 17 - d)) for d in (0, 1, -1)]
    t = template_from_masks(masks, subdivisions=subdivisions, name="LV")
    assert t.num_vertices == 10 * 4**subdivisions + 2 and t.genus == 0 and t.name == "LV"
    _check_closed(t, 0)
    mean = np.mean(masks, axis=0) >= 0.5
    assert t.volume() == pytest.approx(mean.sum() * _voxel_volume(SHAPE), rel=0.05)
    assert np.all(np.abs(t.vertices) <= 1.0 + 1e-6)


def _template_dice(t, mask, spacing=(1.0, 1.0, 1.0)):
    """Dice of a template (voxelised by exact winding numbers at the voxel centres, in mm) against a mask."""
    from nnunet_topo.frames import normalized_to_index
    from nnunet_topo.occupancy import winding_number

    sp = np.asarray(spacing)
    v_mm = normalized_to_index(t.vertices.astype(np.float64), mask.shape) * sp  # (z, y, x) mm
    pts = np.argwhere(np.ones(mask.shape, bool)).astype(np.float64) * sp
    # (z, y, x) order reverses the orientation of the (x, y, z) template: flip the faces
    w = winding_number(torch.from_numpy(pts), torch.from_numpy(v_mm), torch.from_numpy(t.faces[:, ::-1].copy()))
    inside = (w.numpy() > 0.5).reshape(mask.shape)
    return 2 * float((inside & mask).sum()) / float(inside.sum() + mask.sum())


def test_template_from_masks_frame():
    # An off-centre ball: the template's centroid must be the mask centroid in grid_sample's (x, y, z).
    m = _ellipsoid(c=(8, 25, 12), r=(5, 5, 5))
    t = template_from_masks([m], subdivisions=2)
    idx = np.argwhere(m).mean(0)  # (z, y, x)
    expected = [2 * idx[2] / (SHAPE[2] - 1) - 1, 2 * idx[1] / (SHAPE[1] - 1) - 1, 2 * idx[0] / (SHAPE[0] - 1) - 1]
    np.testing.assert_allclose(t.to_trimesh().center_mass, expected, atol=0.02)  # the template's volume centroid
    # the vertices lie on the mask's boundary: sampling the (trilinear) mask there gives values around the 0.5
    # level, within a fraction of a voxel (the isosurface of the smoothed mask, decimated, is not exactly the 0.5
    # level of the binary mask's trilinear interpolation, as the old shrink-wrapped sphere was)
    vol = torch.from_numpy(m.astype(np.float32))[None, None]
    vals = sample_features([vol], torch.from_numpy(t.vertices)[None])[0, :, 0]
    assert abs(float(vals.mean()) - 0.5) < 0.05 and float((vals - 0.5).abs().mean()) < 0.25


@pytest.mark.parametrize("maker", [_tube, _ring])
def test_template_from_masks_torus(maker):
    m = maker()
    t = template_from_masks([m, m], name="MYO", torus_sections=(24, 12))
    assert t.genus == 1 and t.num_vertices == 24 * 12
    _check_closed(t, 1)
    # the fit matches the voxel volume (the cross-section is rescaled for the polygon)
    assert t.volume() == pytest.approx(m.sum() * _voxel_volume(SHAPE), rel=0.005)


def test_template_from_masks_errors():
    with pytest.raises(ValueError, match="at least one"):
        template_from_masks([])
    with pytest.raises(ValueError, match="same shape"):
        template_from_masks([np.ones((4, 4, 4)), np.ones((4, 4, 5))])
    with pytest.raises(ValueError, match="empty"):
        template_from_masks([np.zeros((8, 8, 8))])
    two = np.zeros((10, 10, 20), bool)
    two[2:5, 2:5, 2:5] = two[2:5, 2:5, 12:15] = True
    with pytest.raises(ValueError, match="Betti"):
        template_from_masks([two])



def test_template_from_masks_needs_no_star_shape():
    """Genus 0 but not star-shaped from the centroid (a U shape, like a crescent RV around the septum): the
    isosurface template follows it (the shrink-wrapped sphere of earlier versions could not)."""
    u = np.zeros((10, 30, 30), bool)
    u[3:7, 3:27, 3:7] = u[3:7, 3:27, 23:27] = u[3:7, 23:27, 3:27] = True
    t = template_from_masks([u], subdivisions=2)
    assert t.genus == 0 and t.num_vertices == 162
    _check_closed(t, 0)
    assert _template_dice(t, u) >= 0.85


# ---------------------------------------------------------------------------------------------
# graph ops vs dense naive implementations
# ---------------------------------------------------------------------------------------------


def _dense_adjacency(faces, nv):
    a = np.zeros((nv, nv))
    for f in faces.tolist():
        for i in range(3):
            p, q = f[i], f[(i + 1) % 3]
            a[p, q] = a[q, p] = 1
    return a


def test_normalized_adjacency_dense():
    t = sphere_template(1)
    faces = torch.from_numpy(t.faces)
    nv = t.num_vertices + 1  # one isolated vertex
    a = _dense_adjacency(t.faces, nv) + np.eye(nv)
    d = np.diag(a.sum(1) ** -0.5)
    ref = d @ a @ d
    adj = normalized_adjacency(faces, nv)
    assert adj.is_sparse
    np.testing.assert_allclose(adj.to_dense().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(adj.to_dense().numpy(), adj.to_dense().numpy().T)
    lap = scaled_laplacian(faces, nv).to_dense().numpy()
    a0 = _dense_adjacency(t.faces, nv)
    deg = a0.sum(1)
    dinv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    np.testing.assert_allclose(lap, -dinv[:, None] * a0 * dinv[None, :], atol=1e-6)
    e = mesh_edges(faces)
    assert e.shape[0] == int(a0.sum() / 2) and bool((e[:, 0] < e[:, 1]).all())


def test_graphconv_and_chebconv_vs_dense():
    torch.manual_seed(0)
    t = sphere_template(1)
    faces = torch.from_numpy(t.faces)
    nv = t.num_vertices
    x = torch.randn(2, nv, 5, dtype=torch.float32)
    gc = GraphConv(5, 4)
    with torch.no_grad():
        gc.bias.normal_()
    adj = normalized_adjacency(faces, nv)
    ad = adj.to_dense()
    out = gc(x, adj)
    ref = torch.stack([ad @ x[b] @ gc.weight + gc.bias for b in range(2)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert gc.weight.grad is not None and gc.weight.grad.abs().sum() > 0

    cc = ChebConv(5, 4, K=3)
    lap = scaled_laplacian(faces, nv)
    ld = lap.to_dense()
    out = cc(x, lap)
    ref = []
    for b in range(2):
        t0, t1 = x[b], ld @ x[b]
        t2 = 2 * ld @ t1 - t0
        ref.append(t0 @ cc.weight[0] + t1 @ cc.weight[1] + t2 @ cc.weight[2] + cc.bias)
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        gc(torch.randn(2, nv, 3), adj)


def _naive_laplacian(v, faces):
    nbrs = {}
    for f in faces.tolist():
        for i in range(3):
            p, q = f[i], f[(i + 1) % 3]
            nbrs.setdefault(p, set()).add(q)
            nbrs.setdefault(q, set()).add(p)
    total, count = 0.0, 0
    for b in range(v.shape[0]):
        for i, n in nbrs.items():
            mean = sum(v[b, j] for j in n) / len(n)
            total += float(((v[b, i] - mean) ** 2).sum())
            count += 1
    return total / count


def _naive_edge(v, faces, ref=None):
    edges = sorted({tuple(sorted((f[i], f[(i + 1) % 3]))) for f in faces.tolist() for i in range(3)})
    total, count = 0.0, 0
    for b in range(v.shape[0]):
        for k, (p, q) in enumerate(edges):
            length = float(np.linalg.norm(v[b, p] - v[b, q]))
            target = 0.0 if ref is None else float(ref[k])
            total += (length - target) ** 2
            count += 1
    return total / count


def test_regularisers_vs_naive():
    torch.manual_seed(1)
    t = sphere_template(1)
    faces = torch.from_numpy(t.faces)
    v = torch.from_numpy(t.vertices)[None].repeat(2, 1, 1) + 0.05 * torch.randn(2, t.num_vertices, 3)
    v.requires_grad_(True)
    lap = laplacian_smoothing_loss(v, faces)
    assert lap.item() == pytest.approx(_naive_laplacian(v.detach().numpy(), t.faces), rel=1e-5)
    assert lap.item() == pytest.approx(float(laplacian_smoothness_energy(v.detach()[0], faces).item() / 2
                                              + laplacian_smoothness_energy(v.detach()[1], faces).item() / 2), rel=1e-5)
    ref = edge_lengths(torch.from_numpy(t.vertices), mesh_edges(faces))
    e0 = edge_length_loss(v, faces)
    e1 = edge_length_loss(v, faces, ref)
    assert e0.item() == pytest.approx(_naive_edge(v.detach().numpy(), t.faces), rel=1e-5)
    assert e1.item() == pytest.approx(_naive_edge(v.detach().numpy(), t.faces, ref.numpy()), rel=1e-5)
    (lap + e0 + e1).backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    # the template itself: zero edge loss against its own lengths
    assert edge_length_loss(torch.from_numpy(t.vertices), faces, ref).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        edge_length_loss(v, faces, ref[:-1])


def test_regularisers_empty_graph_connected_zero():
    v = torch.randn(2, 5, 3, requires_grad=True)
    empty = torch.zeros((0, 3), dtype=torch.long)
    for fn in (laplacian_smoothing_loss, edge_length_loss):
        out = fn(v, empty)
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
    with pytest.raises(ValueError):
        laplacian_smoothing_loss(v, torch.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# head
# ---------------------------------------------------------------------------------------------


def test_axis_angle_to_matrix():
    torch.manual_seed(0)
    w = torch.randn(10, 3)
    r = axis_angle_to_matrix(w)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3).expand(10, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(r @ w[..., None], w[..., None], atol=1e-5, rtol=0)  # the axis is fixed
    z = torch.zeros(3, requires_grad=True)
    rz = axis_angle_to_matrix(z)
    assert torch.equal(rz, torch.eye(3))
    rz[0, 1].backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # 90 degrees about z maps x to y
    r90 = axis_angle_to_matrix(torch.tensor([0.0, 0.0, np.pi / 2]))
    torch.testing.assert_close(r90 @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def _head_inputs(b=2):
    torch.manual_seed(0)
    feats = [torch.randn(b, 8, 3, 5, 5), torch.randn(b, 4, 6, 10, 10)]
    bottleneck = torch.randn(b, 16, 2, 3, 3)
    return feats, bottleneck


def _templates():
    return [sphere_template(2, radius=0.4, name="LV"), torus_template(0.5, 0.15, 16, 8, name="MYO")]


def test_head_identity_at_init_and_gradients():
    templates = _templates()
    head = MeshHead(templates, [8, 4], 16, hidden_features=16, num_blocks=2)
    feats, bottleneck = _head_inputs()
    out = head(feats, bottleneck)
    assert len(out) == 2
    for t, v in zip(templates, out):
        assert v.shape == (2, t.num_vertices, 3) and v.dtype == torch.float32
        assert torch.equal(v, torch.from_numpy(t.vertices).expand(2, -1, -1))
    # a loss on the vertices reaches the zero-initialised last layers, then everything
    target = [v.detach() + 0.1 for v in out]
    loss = sum(((v - tv) ** 2).mean() for v, tv in zip(out, target))
    loss.backward()
    assert head.alignment[-1].weight.grad.abs().sum() > 0
    for blocks in head.blocks:
        assert blocks[-1].out.weight.grad.abs().sum() > 0
    # after one optimiser step everything gets gradients
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    feats = [f.requires_grad_(True) for f in feats]
    out = head(feats, bottleneck)
    sum(((v - tv) ** 2).mean() for v, tv in zip(out, target)).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_head_alignment_transform():
    t = sphere_template(1, radius=0.3, center=(0.1, -0.2, 0.3))
    head = MeshHead([t], [4], 8, num_blocks=0)
    with torch.no_grad():
        # translation (1st structure: outputs 6:9) via the bias only
        head.alignment[-1].bias[6:9] = torch.tensor([0.1, 0.2, -0.1])
        head.alignment[-1].bias[0:3] = float(np.log(2.0))  # isotropic scale 2
    out = head([torch.randn(1, 4, 4, 4, 4)], torch.randn(1, 8, 2, 2, 2))[0][0]
    tv = torch.from_numpy(t.vertices)
    c = tv.mean(0)
    torch.testing.assert_close(out, c + 2 * (tv - c) + torch.tensor([0.1, 0.2, -0.1]), atol=1e-6, rtol=0)


def test_head_input_errors():
    head = MeshHead(_templates(), [8, 4], 16)
    feats, bottleneck = _head_inputs()
    with pytest.raises(ValueError):
        head(feats[:1], bottleneck)
    with pytest.raises(ValueError):
        head(feats, bottleneck[:, :5])
    with pytest.raises(ValueError):
        MeshHead([sphere_template(1), sphere_template(1)], [8], 16)


def test_head_state_dict_round_trip():
    templates = _templates()
    head = MeshHead(templates, [8, 4], 16)
    sd = head.state_dict()
    assert "template_vertices_0" in sd and "_extra_state" in sd
    rebuilt = MeshHead.templates_from_state_dict(sd)
    assert rebuilt == templates
    other = MeshHead(rebuilt, [8, 4], 16)
    other.load_state_dict(sd, strict=True)
    feats, bottleneck = _head_inputs()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    other.load_state_dict(head.state_dict(), strict=True)
    for a, b in zip(head(feats, bottleneck), other(feats, bottleneck)):
        assert torch.equal(a, b)
    wrong = MeshHead([sphere_template(2, name="RV"), templates[1]], [8, 4], 16)
    with pytest.raises(ValueError, match="structures"):
        wrong.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# network wrapper around a real PlainConvUNet
# ---------------------------------------------------------------------------------------------


def _unet(deep_supervision: bool, n_stages: int = 3):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        input_channels=1,
        n_stages=n_stages,
        features_per_stage=[4, 8, 16, 16][:n_stages],
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=[1, 2, 2, 2][:n_stages],
        n_conv_per_stage=1,
        num_classes=3,
        n_conv_per_stage_decoder=1,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )


def _equal(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("deep_supervision,n_stages", [(False, 3), (True, 3), (True, 4)])
def test_network_wrapper_outputs_identical(deep_supervision, n_stages):
    torch.manual_seed(0)
    bare = _unet(deep_supervision, n_stages)
    net = _unet(deep_supervision, n_stages)
    net.load_state_dict(bare.state_dict())
    wrapped = MeshAugmentedNetwork(net, _templates(), hidden_features=16)
    bare.eval()
    wrapped.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref = bare(x)
        out = wrapped(x)
        seg, meshes = wrapped.forward_with_meshes(x)
    assert _equal(out, ref) and _equal(seg, ref)
    assert isinstance(out, list) == deep_supervision
    assert [tuple(m.shape) for m in meshes] == [(2, t.num_vertices, 3) for t in _templates()]
    for t, m in zip(_templates(), meshes):  # untrained head -> templates
        assert torch.equal(m, torch.from_numpy(t.vertices).expand(2, -1, -1))
    assert wrapped._captured is None
    # nnU-Net's set_deep_supervision_enabled reaches network.decoder.deep_supervision
    assert wrapped.decoder is net.decoder and wrapped.encoder is net.encoder
    wrapped.decoder.deep_supervision = not deep_supervision
    assert net.decoder.deep_supervision == (not deep_supervision)


def test_network_wrapper_gradients_and_stage_selection():
    torch.manual_seed(0)
    net = _unet(True, 4)
    wrapped = MeshAugmentedNetwork(net, _templates(), decoder_stages=[-1, 1], hidden_features=16)
    assert wrapped.decoder_stage_indices == [2, 1]
    assert wrapped.mesh_head.decoder_channels == [4, 8]
    x = torch.randn(1, 1, 16, 16, 16)
    seg, meshes = wrapped.forward_with_meshes(x)
    loss = seg[0].mean() + sum((m - 0.1).pow(2).mean() for m in meshes)
    loss.backward()
    assert wrapped.mesh_head.alignment[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        MeshAugmentedNetwork(_unet(False), _templates(), decoder_stages=[5])


def test_network_wrapper_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = MeshAugmentedNetwork(_unet(False), _templates(), hidden_features=16)
    with torch.no_grad():
        for p in a.mesh_head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = a.state_dict()
    assert any(k.startswith("network.encoder.") for k in sd) and any(k.startswith("mesh_head.") for k in sd)
    assert not any(k.startswith("encoder.") or k.startswith("decoder.") for k in sd)  # no duplicate keys
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    templates = MeshHead.templates_from_state_dict(loaded, "mesh_head.")
    assert templates == _templates()
    b = MeshAugmentedNetwork(_unet(False), templates, hidden_features=16)
    b.load_state_dict(loaded, strict=True)
    a.eval()
    b.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        sa, ma = a.forward_with_meshes(x)
        sb, mb = b.forward_with_meshes(x)
    assert torch.equal(sa, sb) and all(torch.equal(p, q) for p, q in zip(ma, mb))
    assert not all(torch.equal(m, torch.from_numpy(t.vertices)[None]) for m, t in zip(ma, templates))


# ---------------------------------------------------------------------------------------------- placement
def test_solid_moments_of_an_icosphere_against_the_ball():
    from nnunet_topo.mesh_head.head import solid_moments

    t = sphere_template(4, radius=0.5, center=(0.1, -0.2, 0.3))
    c, std = solid_moments(t.vertices, t.faces)
    np.testing.assert_allclose(c, [0.1, -0.2, 0.3], atol=1e-5)
    np.testing.assert_allclose(std, np.sqrt(0.5 ** 2 / 5), rtol=0.02)  # a ball: var = r^2 / 5 per axis
    with pytest.raises(ValueError):
        solid_moments(t.vertices, t.faces[:, ::-1])  # inward wound: negative volume


def test_head_segmentation_guided_placement():
    """The template moves to the centroid, volume and per-axis extent of the segmentation's hard mask (no gradient
    into it), stays put where the structure is absent, and a missing segmentation is a clear error (more in
    test_placement.py)."""
    from nnunet_topo.surfaces import signed_volume
    from nnunet_topo.mesh_head.head import solid_moments

    t = sphere_template(3, radius=0.3, name="LV")
    head = MeshHead([t], [4], 8, num_blocks=0, structure_channels=[[1, 2]])
    shape = (20, 24, 28)
    mask = torch.from_numpy(_ellipsoid(shape, c=(8, 14, 10), r=(5, 6, 8)))
    logits = torch.full((2, 3) + shape, -20.0)
    logits[:, 0] = 20.0
    logits[0, 0][mask] = -20.0
    logits[0, 2][mask] = 20.0  # case 0: the structure (channel 2 of the region [1, 2]); case 1: background only
    logits.requires_grad_(True)
    feats, bottleneck = [torch.randn(2, 4, 5, 6, 7)], torch.randn(2, 8, 2, 2, 2)
    live = head(feats, bottleneck, logits)[0]
    live.sum().backward()
    assert logits.grad is None  # placed without gradient: the mesh losses cannot move the segmentation through it
    out = live.detach()
    idx = np.argwhere(mask.numpy()).astype(float)  # (z, y, x)
    norm = 2 * idx[:, ::-1] / (np.array(shape[::-1]) - 1) - 1  # (x, y, z)
    c, std = solid_moments(out[0].numpy(), t.faces)
    np.testing.assert_allclose(c, norm.mean(0), atol=1e-3)
    # the size comes from the volume, the proportions from the std ratios: for a round template on an ellipsoid
    # mask both give the mask's per-axis extent (up to the voxelisation), and the volume exactly
    np.testing.assert_allclose(std, norm.std(0), rtol=0.01)
    np.testing.assert_allclose(signed_volume(out[0].numpy(), t.faces), mask.sum().item() * _voxel_volume(shape),
                               rtol=1e-4)
    torch.testing.assert_close(out[1], torch.from_numpy(t.vertices))  # nothing segmented: the template
    with pytest.raises(ValueError, match="segmentation"):
        head(feats, bottleneck)
    with pytest.raises(ValueError, match="C>=3"):
        head(feats, bottleneck, logits[:, :2])
    with pytest.raises(ValueError, match="structure_channels"):
        MeshHead([t], [4], 8, structure_channels=[[]])


def _crescents(n=5, shape=(16, 48, 48), spacing=(2.0, 1.0, 1.0), seed=0):
    """Crescent RVs: a ball minus the (larger, offset) epicardial ball of the LV it wraps, with jitter."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing)], indexing="ij")
    masks = []
    for _ in range(n):
        j = rng.uniform(-1.5, 1.5, 3)
        s = rng.uniform(0.95, 1.05)
        rv = (z - 15 - j[0]) ** 2 + (y - 24 - j[1]) ** 2 + (x - 18 - j[2]) ** 2 <= (12 * s) ** 2
        lv = (z - 15 - j[0]) ** 2 + (y - 24 - j[1]) ** 2 + (x - 23 - j[2]) ** 2 <= (11.5 * s) ** 2
        masks.append(rv & ~lv)
    return masks


def test_crescent_rv_gets_a_crescent_template():
    from nnunet_topo.mesh_head.label_templates import align_centroids, ellipsoid_template

    spacing = (2.0, 1.0, 1.0)
    masks = align_centroids(_crescents(spacing=spacing))
    mean = np.mean(masks, axis=0) >= 0.5
    assert all(tuple(betti_numbers_3d(m)) == (1, 0, 0) for m in masks)
    centroid = np.round(np.argwhere(mean).mean(0)).astype(int)
    assert not mean[tuple(centroid)]  # a crescent: its centroid lies outside it (not star-shaped)
    t = template_from_masks(masks, subdivisions=3, name="RV", spacing=spacing)
    _check_closed(t, 0)
    assert t.num_vertices == 642
    dice = _template_dice(t, mean, spacing)
    ellipsoid = _template_dice(ellipsoid_template(masks, 3, "RV"), mean, spacing)
    print(f"crescent RV template: mesh Dice {dice:.3f} against the mean mask (moment-fitted ellipsoid: "
          f"{ellipsoid:.3f})")
    assert dice >= 0.85 and dice > ellipsoid + 0.1


def test_templates_of_synthetic_hearts_are_closed_outward_and_of_the_prior_genus():
    """All mesh structures of the synthetic short-axis preset (7 mm slices), through the trainers' own helper:
    closed, outward, the genus of the spec's Betti prior, and no ellipsoid fallback (the RV is a crescent)."""
    from nnunet_topo import synthetic as syn
    from nnunet_topo.mesh_head.label_templates import templates_from_label_maps
    from nnunet_topo.topology_spec import parse_topology

    phantoms = [syn.make_phantom("acdc", s) for s in range(4)]
    dj = {"labels": syn.labels_for("acdc"), "topology": syn.topology_block("acdc")}
    spec = parse_topology(dj)
    patch = np.max([p.label.shape for p in phantoms], axis=0)
    notes = []
    structures = {n: s.label_ids for n, s in spec.mesh_structures.items()}
    templates = templates_from_label_maps([p.label for p in phantoms], structures, patch, 3, log=notes.append,
                                          spacing=phantoms[0].spacing)
    assert [t.name for t in templates] == list(structures)
    for t in templates:
        _check_closed(t, t.genus)
        assert t.genus == 0  # the mesh structures of the preset are closed chambers / epicardium
    assert not [n for n in notes if "ellipsoid" in n], notes
