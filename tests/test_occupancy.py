"""Tests of nnunet_topo.occupancy: winding numbers against trimesh, a naive loop, gradcheck, BCE, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from skimage.measure import marching_cubes

from occupancy_bce_module import OccupancyBCELoss

from nnunet_topo.occupancy import (
    occupancy,
    occupancy_bce,
    winding_number,
)

# ----------------------------------------------------------------------------------------------------
# meshes and helpers
# ----------------------------------------------------------------------------------------------------


def two_balls_mesh() -> trimesh.Trimesh:
    """Non-convex closed mesh: marching cubes of the union of two overlapping balls (outward faces)."""
    g = np.linspace(-1.5, 1.5, 36)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    sdf = np.minimum(np.sqrt((x - 0.45) ** 2 + y ** 2 + z ** 2) - 0.7, np.sqrt((x + 0.45) ** 2 + y ** 2 + z ** 2) - 0.6)
    verts, faces, _, _ = marching_cubes(sdf, 0.0, spacing=(g[1] - g[0],) * 3)
    mesh = trimesh.Trimesh(verts + g[0], faces)
    assert mesh.is_watertight and mesh.volume > 0
    return mesh


def hollow_sphere_mesh() -> trimesh.Trimesh:
    """Shell between radii 0.5 and 1 (inner sphere inward-oriented): a closed mesh with a cavity."""
    outer = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
    inner = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    inner.invert()
    return trimesh.util.concatenate([outer, inner])


MESHES = {
    "icosphere": lambda: trimesh.creation.icosphere(subdivisions=3, radius=1.0),
    "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=32,
                                            minor_sections=16),
    "box": lambda: trimesh.creation.box(extents=(1.0, 2.0, 0.6)),
    "two_balls": two_balls_mesh,
    "hollow_sphere": hollow_sphere_mesh,
}


def to_torch(mesh: trimesh.Trimesh, dtype=torch.float32):
    return torch.tensor(np.asarray(mesh.vertices), dtype=dtype), torch.tensor(np.asarray(mesh.faces), dtype=torch.long)


def octahedron(dtype=torch.float64):
    v = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=dtype)
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return v, f


class BruteForceBoxTree:
    """Stand-in for the rtree index trimesh builds over triangle bounding boxes (rtree is not installed).

    Only the broad phase of trimesh's ray test is replaced; the ray-triangle tests and the parity logic of
    ``Trimesh.contains`` are trimesh's own.
    """

    def __init__(self, bounds):
        self.boxes = np.asarray(bounds, dtype=np.float64)          # (n, 6) interleaved [min, max]
        self.bounds = np.concatenate([self.boxes[:, :3].min(0), self.boxes[:, 3:].max(0)])

    def intersection(self, query):
        q = np.asarray(query, dtype=np.float64)
        hit = np.all(self.boxes[:, :3] <= q[3:], axis=1) & np.all(self.boxes[:, 3:] >= q[:3], axis=1)
        return np.nonzero(hit)[0].tolist()


@pytest.fixture
def trimesh_contains(monkeypatch):
    """``mesh.contains(points)`` through trimesh's ray test, with a brute-force broad phase."""
    try:
        import rtree  # noqa: F401
    except ImportError:
        monkeypatch.setattr(trimesh.util, "bounds_tree", lambda bounds: BruteForceBoxTree(bounds))

    def contains(mesh, points):
        return np.asarray(mesh.contains(points), dtype=bool)

    return contains


def points_off_surface(mesh, n, margin, seed=0):
    """Uniform points in the padded bounding box, at least ``margin`` from the surface."""
    rng = np.random.default_rng(seed)
    lo, hi = mesh.bounds[0] - 0.3, mesh.bounds[1] + 0.3
    pts = rng.uniform(lo, hi, size=(n, 3))
    _, dist, _ = trimesh.proximity.closest_point_naive(mesh, pts)
    return pts[dist > margin]


def naive_winding_number(points, vertices, faces):
    """Python loop over points and faces, Van Oosterom-Strackee with atan2, float64."""
    out = []
    for p in points.tolist():
        total = 0.0
        for f in faces.tolist():
            a, b, c = (np.asarray(vertices[i].tolist()) - np.asarray(p) for i in f)
            la, lb, lc = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(c)
            det = np.dot(a, np.cross(b, c))
            den = la * lb * lc + np.dot(a, b) * lc + np.dot(b, c) * la + np.dot(c, a) * lb
            total += 2.0 * math.atan2(det, den)
        out.append(total / (4.0 * math.pi))
    return torch.tensor(out, dtype=torch.float64)


def naive_dipole(points, vertices, faces, smoothing=0.0):
    """Loop form of the dipole sum with m_v = sum_f area_f n_f / 3."""
    v = vertices.double()
    m = torch.zeros_like(v)
    for f in faces.tolist():
        n2 = torch.linalg.cross(v[f[1]] - v[f[0]], v[f[2]] - v[f[0]])
        for i in f:
            m[i] += n2 / 6.0
    out = []
    for p in points.double():
        d = v - p
        s = (d * d).sum(-1) + smoothing ** 2
        out.append(((d * m).sum(-1) / s ** 1.5).sum() / (4 * math.pi))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------
# agreement with trimesh
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MESHES))
def test_exact_agrees_with_trimesh_contains(name, trimesh_contains):
    mesh = MESHES[name]()
    pts = points_off_surface(mesh, 1500, margin=0.02, seed=1)
    inside = trimesh_contains(mesh, pts)
    assert 0.05 < inside.mean() < 0.95, "the sample should hold both inside and outside points"
    v, f = to_torch(mesh)
    w = winding_number(torch.tensor(pts, dtype=torch.float32), v, f)
    np.testing.assert_array_equal((w > 0.5).numpy(), inside)
    # away from the surface the exact winding number is an integer to float32 precision
    assert torch.allclose(w, w.round(), atol=1e-4)


def test_dipole_agrees_with_trimesh_on_fine_sphere(trimesh_contains):
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=1.0)          # 10242 vertices, 20480 faces
    # the polyhedron lies within 2e-4 of the unit sphere: the analytic distance filters the points
    pts = np.random.default_rng(2).uniform(-1.3, 1.3, size=(1500, 3))
    pts = pts[np.abs(np.linalg.norm(pts, axis=1) - 1.0) > 0.01]
    inside = trimesh_contains(mesh, pts)
    v, f = to_torch(mesh)
    w = winding_number(torch.tensor(pts, dtype=torch.float32), v, f, method="dipole")
    agreement = ((w > 0.5).numpy() == inside).mean()
    assert agreement >= 0.99, agreement


def test_analytic_sphere_inside_outside_and_face_centres():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    v, f = to_torch(mesh)
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=1)
    inside = dirs * torch.rand(200, 1, generator=g) * 0.95
    outside = dirs * (1.05 + 3 * torch.rand(200, 1, generator=g))
    w_in, w_out = winding_number(inside, v, f), winding_number(outside, v, f)
    assert torch.allclose(w_in, torch.ones_like(w_in), atol=1e-5)
    assert torch.allclose(w_out, torch.zeros_like(w_out), atol=1e-5)
    centres = torch.tensor(mesh.triangles_center[::7], dtype=torch.float32)
    w_face = winding_number(centres, v, f)
    assert torch.allclose(w_face, torch.full_like(w_face, 0.5), atol=1e-5)
    # flipping the orientation flips the sign
    w_flip = winding_number(inside, v, f.flip(1))
    assert torch.allclose(w_flip, -w_in, atol=1e-5)
    assert torch.allclose(winding_number(inside, v, f.flip(1), method="dipole"),
                          -winding_number(inside, v, f, method="dipole"), atol=1e-5)


def test_overlapping_shells_count_twice():
    a = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
    b = a.copy()
    b.apply_translation([0.8, 0.0, 0.0])
    v, f = to_torch(trimesh.util.concatenate([a, b]))
    w = winding_number(torch.tensor([[0.4, 0.0, 0.0], [-0.6, 0.0, 0.0], [3.0, 0.0, 0.0]]), v, f)
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 0.0]), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# reference loop, chunking, batching
# ----------------------------------------------------------------------------------------------------


def test_vectorised_exact_equals_naive_loop_on_closed_and_open_meshes():
    g = torch.Generator().manual_seed(3)
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=1), dtype=torch.float64)
    pts = torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(winding_number(pts, v, f), naive_winding_number(pts, v, f), atol=1e-12, rtol=0)
    # an open triangle soup: non-integer values
    soup_v = torch.randn(15, 3, generator=g, dtype=torch.float64)
    soup_f = torch.arange(15).view(5, 3)
    torch.testing.assert_close(winding_number(pts, soup_v, soup_f), naive_winding_number(pts, soup_v, soup_f),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_vectorised_dipole_equals_naive_loop(smoothing):
    g = torch.Generator().manual_seed(4)
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=1), dtype=torch.float64)
    pts = torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(winding_number(pts, v, f, method="dipole", smoothing=smoothing),
                               naive_dipole(pts, v, f, smoothing), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["exact", "dipole"])
@pytest.mark.parametrize("chunk_size", [1, 7, 100, 1000])
def test_chunked_equals_unchunked_values_and_gradients(method, chunk_size):
    v0, f = to_torch(trimesh.creation.icosphere(subdivisions=1), dtype=torch.float64)   # 80 faces, 42 vertices
    g = torch.Generator().manual_seed(5)
    verts = (v0.expand(3, -1, -1) + 0.05 * torch.randn(3, *v0.shape, generator=g, dtype=torch.float64))
    pts = 1.5 * torch.randn(3, 23, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 23, generator=g, dtype=torch.float64)

    def run(cs):
        vv = verts.clone().requires_grad_()
        pp = pts.clone().requires_grad_()
        w = winding_number(pp, vv, f, method=method, chunk_size=cs)
        (w * weights).sum().backward()
        return w.detach(), vv.grad, pp.grad

    ref = run(2 ** 30)
    got = run(chunk_size)     # chunk_size < 80 also splits the faces (exact) or vertices (dipole)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", ["exact", "dipole"])
def test_batched_equals_per_mesh_loop_and_broadcasts(method):
    v0, f = to_torch(trimesh.creation.icosphere(subdivisions=2))
    g = torch.Generator().manual_seed(6)
    verts = torch.stack([v0 * 0.8, v0 + 0.2, v0 * torch.tensor([1.2, 0.7, 1.0])])     # (3, V, 3)
    pts = 1.3 * torch.randn(3, 50, 3, generator=g)
    batched = winding_number(pts, verts, f, method=method)
    assert batched.shape == (3, 50)
    loop = torch.stack([winding_number(pts[b], verts[b], f, method=method) for b in range(3)])
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    # shared points broadcast against a batch of meshes, and extra leading dimensions
    shared = winding_number(pts[0], verts, f, method=method)
    torch.testing.assert_close(shared, torch.stack([winding_number(pts[0], verts[b], f, method=method)
                                                    for b in range(3)]), atol=1e-5, rtol=0)
    nested = winding_number(pts.view(3, 1, 50, 3), verts.view(1, 3, -1, 3), f, method=method)
    assert nested.shape == (3, 3, 50)
    torch.testing.assert_close(nested[1, 1], batched[1], atol=1e-5, rtol=0)


def test_padded_vertices_and_list_of_meshes():
    sphere_v, sphere_f = to_torch(trimesh.creation.icosphere(subdivisions=2, radius=0.5))
    torus_v, torus_f = to_torch(trimesh.creation.torus(1.0, 0.35, major_sections=24, minor_sections=12))
    pts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    # padded vertices that no face uses change nothing (any finite value)
    padded = torch.cat([sphere_v, torch.full((17, 3), 123.0)])
    for method in ("exact", "dipole"):
        torch.testing.assert_close(winding_number(pts, padded, sphere_f, method=method),
                                   winding_number(pts, sphere_v, sphere_f, method=method))
    w = winding_number(pts, [sphere_v, torus_v], [sphere_f, torus_f])
    assert w.shape == (2, 3)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), atol=1e-5, rtol=0)
    w2 = winding_number(torch.stack([pts, pts]), [sphere_v, torus_v], [sphere_f, torus_f])
    torch.testing.assert_close(w2, w)


def test_large_coordinates_keep_precision():
    """Patient coordinates far from the origin: the per-mesh centring keeps float32 accurate."""
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=30.0)
    v, f = to_torch(mesh, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    pts = torch.nn.functional.normalize(torch.randn(300, 3, generator=g, dtype=torch.float64), dim=1) \
        * (30.0 + 0.05 * torch.randn(300, 1, generator=g, dtype=torch.float64))
    offset = torch.tensor([-150.0, 210.0, 480.0], dtype=torch.float64)
    ref = winding_number(pts, v, f)
    got = winding_number((pts + offset).float(), (v + offset).float(), f)
    assert (got.double() - ref).abs().max() < 1e-3


# ----------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------


def test_gradcheck_exact_on_open_mesh():
    v, f = octahedron()
    open_f = f[:-2]                                           # two faces removed: an open surface
    g = torch.Generator().manual_seed(8)
    v = (v + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64)).requires_grad_()
    pts = torch.tensor([[0.1, 0.2, -0.1], [0.3, -0.9, -0.8], [1.5, 0.4, 0.2]], dtype=torch.float64,
                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda vv, pp: winding_number(pp, vv, open_f), (v, pts))
    assert torch.autograd.gradcheck(lambda vv, pp: winding_number(pp, vv, open_f, chunk_size=5), (v, pts))


@pytest.mark.parametrize("smoothing", [0.0, 0.4])
def test_gradcheck_dipole_on_closed_mesh(smoothing):
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=0), dtype=torch.float64)
    pts = torch.tensor([[0.1, 0.2, -0.1], [0.0, 0.3, 0.4], [1.6, 0.4, 0.2], [-0.5, -1.5, 0.3]],
                       dtype=torch.float64, requires_grad=True)
    v = v.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda vv, pp: winding_number(pp, vv, f, method="dipole", smoothing=smoothing), (v, pts))
    assert torch.autograd.gradcheck(
        lambda vv: occupancy_bce(pts.detach(), vv, f, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64),
                                 method="dipole", smoothing=smoothing), (v,))


def test_exact_gradient_vanishes_on_closed_mesh():
    """Documented property: off the surface the exact w of a closed mesh is locally constant."""
    v, f = octahedron()
    v = v.clone().requires_grad_()
    pts = torch.tensor([[0.1, 0.2, -0.1], [1.5, 0.4, 0.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda vv: winding_number(pts, vv, f), (v,))
    winding_number(pts, v, f).sum().backward()
    assert v.grad.abs().max() < 1e-12


def smoothed_ball_indicator(rho: float, radius: float, sigma: float) -> float:
    """Ball indicator convolved with the Plummer density 3 s^2 / (4 pi (t^2 + s^2)^(5/2)), at distance rho."""
    t = np.linspace(1e-9, 60.0 * (radius + sigma), 400_001)
    if rho == 0:
        frac = (t < radius).astype(float)
    else:    # fraction of the sphere |x - p| = t inside the ball
        frac = np.clip((radius ** 2 - (rho - t) ** 2) / (4 * rho * t), 0.0, 1.0)
        frac[t + rho <= radius] = 1.0
    density = 3 * sigma ** 2 * t ** 2 / (t ** 2 + sigma ** 2) ** 2.5
    return float(np.trapezoid(density * frac, t))


def test_smoothed_dipole_is_a_smooth_occupancy():
    sigma = 0.1
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    v, f = to_torch(mesh, dtype=torch.float64)
    r_eff = (3 * mesh.volume / (4 * math.pi)) ** (1 / 3)
    # the vertex quadrature approximates the Plummer-smoothed indicator of the ball
    rhos = [0.0, 0.5, 0.9, 1.0, 1.1, 1.5]
    pts = torch.tensor([[rho * 0.6, rho * 0.8, 0.0] for rho in rhos], dtype=torch.float64)
    w = winding_number(pts, v, f, method="dipole", smoothing=sigma)
    expected = torch.tensor([smoothed_ball_indicator(rho, r_eff, sigma) for rho in rhos], dtype=torch.float64)
    torch.testing.assert_close(w, expected, atol=5e-3, rtol=0)
    assert 0.4 < w[3] < 0.5            # a bit under 1/2 on a curved (convex) surface
    # a radial profile: monotone and within [0, 1]
    r = torch.linspace(0.0, 2.0, 81, dtype=torch.float64)
    prof = winding_number(torch.stack([0.6 * r, 0.8 * r, 0 * r], 1), v, f, method="dipole", smoothing=sigma)
    assert (prof.diff() <= 1e-6).all() and prof.min() > -1e-3 and prof.max() < 1 + 1e-3
    # moving the surface outward (inflating) raises the occupancy of a point near it
    vv = v.clone().requires_grad_()
    near = torch.tensor([[1.05, 0.0, 0.0]], dtype=torch.float64)
    winding_number(near, vv, f, method="dipole", smoothing=sigma).sum().backward()
    inflate = torch.nn.functional.normalize(v, dim=1)
    assert (vv.grad * inflate).sum() > 0


def test_no_nan_gradient_on_vertices_edges_and_faces():
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=1), dtype=torch.float32)
    edge_mid = (v[f[0, 0]] + v[f[0, 1]]) / 2
    face_centre = v[f[3]].mean(0)
    pts = torch.stack([v[0], v[5], edge_mid, face_centre])
    for method in ("exact", "dipole"):
        vv = v.clone().requires_grad_()
        pp = pts.clone().requires_grad_()
        w = winding_number(pp, vv, f, method=method)
        assert torch.isfinite(w).all()
        w.sum().backward()
        assert torch.isfinite(vv.grad).all() and torch.isfinite(pp.grad).all()


# ----------------------------------------------------------------------------------------------------
# occupancy and BCE
# ----------------------------------------------------------------------------------------------------


def test_occupancy_clamps_and_bce_matches_manual():
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=2), dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    verts = torch.stack([v, 1.3 * v]).requires_grad_()
    pts = 1.2 * torch.randn(2, 40, 3, generator=g, dtype=torch.float64)
    targets = (torch.rand(2, 40, generator=g) > 0.5).double()
    weights = torch.rand(2, 40, generator=g, dtype=torch.float64)
    eps = 1e-3
    o = occupancy(pts, verts, f, method="dipole", eps=eps)
    assert o.min() >= eps and o.max() <= 1 - eps
    w = winding_number(pts, verts, f, method="dipole")
    manual_o = w.clamp(eps, 1 - eps)
    manual = -(targets * manual_o.log() + (1 - targets) * (1 - manual_o).log())
    for reduction, expect in (("mean", (manual * weights).mean()), ("sum", (manual * weights).sum()),
                              ("none", manual * weights)):
        got = occupancy_bce(pts, verts, f, targets, method="dipole", eps=eps, weights=weights, reduction=reduction)
        torch.testing.assert_close(got, expect)
    torch.testing.assert_close(occupancy_bce(pts, verts, f, targets, method="dipole", eps=eps), manual.mean())
    # equals torch's BCE on the clamped occupancy
    torch.testing.assert_close(occupancy_bce(pts, verts, f, targets, eps=eps),
                               torch.nn.functional.binary_cross_entropy(occupancy(pts, verts, f, eps=eps), targets))
    module = OccupancyBCELoss(method="dipole", eps=eps, reduction="sum")
    torch.testing.assert_close(module(pts, verts, f, targets, weights), (manual * weights).sum())
    module(pts, verts, f, targets).backward()
    assert verts.grad is not None and torch.isfinite(verts.grad).all()


def test_bce_without_points_is_a_graph_connected_zero():
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=1))
    v = v.clone().requires_grad_()
    loss = occupancy_bce(torch.zeros(0, 3), v, f, torch.zeros(0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    assert winding_number(torch.zeros(2, 0, 3), v.detach().expand(2, -1, -1), f).shape == (2, 0)


def test_autocast_and_half_inputs_compute_in_float32():
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=2))
    pts = torch.tensor([[0.0, 0.1, 0.2], [2.0, 0.0, 0.0]])
    ref = winding_number(pts, v, f)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = winding_number(pts, v, f)
        loss = occupancy_bce(pts, v, f, torch.tensor([1.0, 0.0]), method="dipole")
    assert got.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    assert winding_number(pts.half(), v.half(), f).dtype == torch.float32
    assert winding_number(pts.double(), v, f).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    v, f = to_torch(trimesh.creation.icosphere(subdivisions=3))
    pts = 1.3 * torch.randn(500, 3)
    for method in ("exact", "dipole"):
        cpu = winding_number(pts, v, f, method=method)
        gpu = winding_number(pts.cuda(), v.cuda(), f.cuda(), method=method)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

_V, _F = octahedron(torch.float32)
_P = torch.zeros(4, 3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(faces=_F + 1), ValueError, "index vertices"),
    (dict(faces=_F - 1), ValueError, "index vertices"),
    (dict(faces=torch.zeros(0, 3, dtype=torch.long)), ValueError, "empty"),
    (dict(faces=_F[:, :2]), ValueError, r"\(F, 3\)"),
    (dict(faces=_F.float()), TypeError, "integer"),
    (dict(points=torch.zeros(4, 2)), ValueError, "points"),
    (dict(vertices=_V[:, :2]), ValueError, "vertices"),
    (dict(points=torch.tensor([[0.0, float("nan"), 0.0]])), ValueError, "NaN"),
    (dict(vertices=torch.cat([_V[:-1], torch.tensor([[float("nan"), 0.0, 0.0]])])), ValueError, "NaN"),
    (dict(method="fast"), ValueError, "method"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(smoothing=0.5), ValueError, "dipole"),
    (dict(method="dipole", smoothing=-1.0), ValueError, "smoothing"),
    (dict(points=torch.zeros(2, 4, 3), vertices=_V.expand(3, -1, -1)), ValueError, "broadcast"),
    (dict(points=torch.zeros(4, 3, dtype=torch.long)), TypeError, "floating"),
])
def test_winding_number_rejects_bad_input(kwargs, error, match):
    args = dict(points=_P, vertices=_V, faces=_F)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        winding_number(**args)


def test_occupancy_and_bce_reject_bad_input():
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="eps"):
        occupancy(_P, _V, _F, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        occupancy(_P, _V, _F, eps=0.5)
    with pytest.raises(ValueError, match="targets"):
        occupancy_bce(_P, _V, _F, torch.zeros(5))
    with pytest.raises(ValueError, match="targets"):
        occupancy_bce(_P, _V, _F, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="reduction"):
        occupancy_bce(_P, _V, _F, t, reduction="max")
    with pytest.raises(ValueError, match="weights"):
        occupancy_bce(_P, _V, _F, t, weights=torch.ones(3))
    with pytest.raises(ValueError, match="method"):
        OccupancyBCELoss(method="winding")
    with pytest.raises(ValueError, match="reduction"):
        OccupancyBCELoss(reduction="avg")
    with pytest.raises(ValueError, match="sequence"):
        winding_number(_P, [_V, _V], [_F])
    with pytest.raises(ValueError, match="empty"):
        winding_number(_P, [], [])
