"""The smoothed dipole by matrix products with a closed-form backward (occupancy._DipoleWinding, issue 26) against
the element-wise kernel it replaces (occupancy._dipole_kernel under _ChunkedWinding, autograd backward) and a naive
per-point loop: values and gradients to 1e-5 relative on random meshes and points, near faces and vertices too."""
import math

import pytest
import torch
import trimesh

from nnunet_topo.occupancy import _ChunkedWinding, _dipole_kernel, _DipoleWinding, _vertex_moments, winding_number


def _random_mesh(seed: int, dtype, subdivisions: int = 2, radius: float = 30.0):
    """A perturbed icosphere (closed, outward), mm-like size, centred near the origin."""
    g = torch.Generator().manual_seed(seed)
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v = torch.tensor(m.vertices, dtype=dtype)
    v = v * (1.0 + 0.15 * torch.rand(v.shape[0], 1, generator=g, dtype=dtype))
    v = v * torch.tensor([1.0, 0.8, 1.3], dtype=dtype)
    return v, torch.tensor(m.faces, dtype=torch.long)


def _points(v, f, seed, dtype):
    """Random points in the box, points 0.01-1 mm off face centres (both sides) and off vertices."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = v.min(0).values - 5, v.max(0).values + 5
    rnd = lo + (hi - lo) * torch.rand(200, 3, generator=g, dtype=dtype)
    tri = v[f]
    normal = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=1)
    k = torch.randperm(f.shape[0], generator=g)[:60]
    off = (10 ** (-2 + 2 * torch.rand(60, 1, generator=g, dtype=dtype))) * torch.sign(torch.randn(60, 1, generator=g))
    near_faces = tri[k].mean(1) + off * normal[k]
    j = torch.randperm(v.shape[0], generator=g)[:40]
    near_vertices = v[j] + 0.05 * torch.randn(40, 3, generator=g, dtype=dtype)
    return torch.cat([rnd, near_faces, near_vertices])


def _naive(points, vertices, faces, sigma):
    """One point at a time: sum_v m_v . (v - p) / (4 pi (|v - p|^2 + sigma^2)^1.5)."""
    m = _vertex_moments(vertices.unsqueeze(0), faces)[0]
    out = []
    for p in points:
        d = vertices - p
        s = (d * d).sum(-1) + sigma ** 2
        out.append(((d * m).sum(-1) * s.pow(-1.5)).sum() / (4 * math.pi))
    return torch.stack(out)


def _elementwise(points, vertices, faces, sigma):
    """The replaced path: the element-wise kernel, autograd through its recomputation (centred as winding_number)."""
    c = vertices.detach().mean(0)
    p, v = (points - c).unsqueeze(0), (vertices - c).unsqueeze(0)
    m = _vertex_moments(v, faces)
    return _ChunkedWinding.apply(_dipole_kernel(sigma), v.shape[1], 2 ** 22, p, v, m)[0]


def _value_and_grads(fn, points, vertices, faces, sigma, weights):
    p = points.clone().requires_grad_()
    v = vertices.clone().requires_grad_()
    w = fn(p, v, faces, sigma)
    (w * weights).sum().backward()
    return w.detach(), p.grad, v.grad


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype,sigma", [(torch.float64, 1.5), (torch.float64, 4.5), (torch.float32, 1.5),
                                         (torch.float32, 4.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matrix_product_dipole_equals_elementwise_and_naive(dtype, sigma, seed):
    v, f = _random_mesh(seed, dtype)
    pts = _points(v, f, seed, dtype)
    weights = torch.randn(pts.shape[0], generator=torch.Generator().manual_seed(seed + 10), dtype=dtype)

    def new(p, vv, ff, s):
        return winding_number(p, vv, ff, method="dipole", smoothing=s)

    got = _value_and_grads(new, pts, v, f, sigma, weights)
    old = _value_and_grads(_elementwise, pts, v, f, sigma, weights)
    for name, a, b in zip(("w", "dL/dp", "dL/dv"), got, old):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    if dtype == torch.float64:  # the loop in float64 is the reference of both
        ref = _value_and_grads(_naive, pts, v, f, sigma, weights)
        for name, a, b in zip(("w", "dL/dp", "dL/dv"), got, ref):
            assert _rel(a, b) < 1e-10, (name, _rel(a, b))


def test_blocks_equal_one_block_and_batch_equals_per_mesh():
    """Many small blocks (recomputed in the backward) = one block (kept); a batch = its meshes one by one."""
    meshes = [_random_mesh(s, torch.float64, subdivisions=1, radius=10.0) for s in (3, 4)]
    f = meshes[0][1]
    v = torch.stack([m[0] for m in meshes])
    g = torch.Generator().manual_seed(5)
    pts = 12 * torch.randn(2, 97, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 97, generator=g, dtype=torch.float64)

    def run(vv, pp, chunk, ww=weights):
        vv, pp = vv.clone().requires_grad_(), pp.clone().requires_grad_()
        w = winding_number(pp, vv, f, method="dipole", smoothing=2.0, chunk_size=chunk)
        (w * ww).sum().backward()
        return w.detach(), vv.grad, pp.grad

    one = run(v, pts, 2 ** 22)
    for chunk in (1, 50, 1000):
        for a, b in zip(run(v, pts, chunk), one):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for i in range(2):
        single = run(v[i:i + 1], pts[i:i + 1], 2 ** 22, weights[i:i + 1])
        for a, b in zip(single, one):
            torch.testing.assert_close(a[0], b[i], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", [2 ** 22, 40])
def test_gradcheck_closed_form_backward(chunk):
    """torch.autograd.gradcheck of the closed-form backward in points, vertices and moments (finite differences)."""
    v, f = _random_mesh(6, torch.float64, subdivisions=0, radius=1.0)
    g = torch.Generator().manual_seed(7)
    v = v.unsqueeze(0).requires_grad_()
    m = _vertex_moments(v.detach(), f).requires_grad_()
    p = (1.2 * torch.randn(1, 9, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda pp, vv, mm: _DipoleWinding.apply(0.3 ** 2, chunk, pp, vv, mm), (p, v, m))


def test_no_gradient_requested_keeps_nothing_and_matches():
    v, f = _random_mesh(8, torch.float32, subdivisions=1, radius=10.0)
    pts = 15 * torch.randn(50, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = winding_number(pts, v, f, method="dipole", smoothing=1.0)
    b = winding_number(pts, v.clone().requires_grad_(), f, method="dipole", smoothing=1.0).detach()
    torch.testing.assert_close(a, b)


def test_faces_are_checked_once_and_again_after_an_in_place_change():
    from nnunet_topo import faces_cache

    v, f = _random_mesh(10, torch.float32, subdivisions=0, radius=1.0)
    pts = torch.zeros(1, 3)
    winding_number(pts, v, f, method="dipole", smoothing=0.5)
    assert (id(f), "range") in faces_cache._CACHE
    f[0, 0] = v.shape[0] + 3  # the same tensor, changed: checked again
    with pytest.raises(ValueError, match="faces index vertices"):
        winding_number(pts, v, f, method="dipole", smoothing=0.5)
    f[0, 0] = 0
    with pytest.raises(ValueError, match="faces index vertices"):  # the same faces, fewer vertices
        winding_number(pts, v[:5], f, method="dipole", smoothing=0.5)


def test_smoothed_dipole_step_has_no_host_sync(monkeypatch):
    """Forward and backward of the training occupancy record none of the ops that read a device value back to the
    host (nnunet_topo.voxelize.HostSyncRecorder) once the faces are checked; NaN is still caught (asynchronously)."""
    from nnunet_topo import occupancy
    from nnunet_topo.voxelize import HostSyncRecorder

    monkeypatch.setattr(occupancy, "SYNC_FREE_CHECKS", True)
    v, f = _random_mesh(11, torch.float32, subdivisions=1, radius=10.0)
    pts = 12 * torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(12))
    verts = v.expand(2, -1, -1).clone().requires_grad_()
    winding_number(pts, verts, f, method="dipole", smoothing=1.0)  # checks the faces once

    with HostSyncRecorder() as rec:
        w = winding_number(pts, verts, f, method="dipole", smoothing=1.0)
        w.square().sum().backward()
    assert rec.syncs == [], rec.syncs
    assert any("_assert_async" in op for op in rec.ops), rec.ops[:20]
    with pytest.raises(RuntimeError, match="vertices contains NaN"):
        winding_number(pts, torch.full_like(verts, float("nan")), f, method="dipole", smoothing=1.0)
