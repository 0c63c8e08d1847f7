"""Tests of nnunet_topo.metrics.mesh: surface distances, Chamfer, HD95, Laplacian energy, volume.

References: a naive point-triangle distance (plane projection + the three edge segments, all
triangles), closed-form values on spheres and tetrahedra, and a per-vertex loop for the Laplacian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from nnunet_topo.metrics.mesh import (
    chamfer_distance_mesh,
    hausdorff_distance_95_mesh,
    laplacian_smoothness_energy,
    mesh_volume,
    point_to_surface_distance,
    sample_surface,
    surface_distances_mesh,
)


def sphere(radius: float, subdivisions: int = 4, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    m.apply_translation(centre)
    return m


def naive_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """min over all triangles of: plane distance if the projection is inside, else edge distance."""

    def seg(p, a, b):
        ab = b - a
        t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0, 1)
        return np.linalg.norm(p - (a + t[:, None] * ab), axis=-1)

    a, b, c = (vertices[faces[:, i]] for i in range(3))
    out = []
    for p in points:
        n = np.cross(b - a, c - a)
        nn = np.linalg.norm(n, axis=1)
        n = n / np.maximum(nn, 1e-300)[:, None]
        h = ((p - a) * n).sum(-1)
        q = p - h[:, None] * n
        # barycentric inside test by same-side signs of the sub-triangle normals
        s1 = (np.cross(b - a, q - a) * n).sum(-1)
        s2 = (np.cross(c - b, q - b) * n).sum(-1)
        s3 = (np.cross(a - c, q - c) * n).sum(-1)
        inside = (s1 >= 0) & (s2 >= 0) & (s3 >= 0) & (nn > 0)
        d = np.minimum(np.minimum(seg(p, a, b), seg(p, b, c)), seg(p, c, a))
        d = np.where(inside, np.abs(h), d)
        out.append(d.min())
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------
# point-to-surface distance and sampling
# ----------------------------------------------------------------------------------------------


def test_point_to_surface_distance_matches_naive():
    rng = np.random.default_rng(0)
    m = sphere(5.0, 2)
    # a mesh with triangles of very different sizes (a big triangle plus the sphere)
    v = np.vstack([m.vertices, [[-30, -30, 8], [30, -30, 8], [0, 40, 8]]])
    f = np.vstack([m.faces, [[len(m.vertices), len(m.vertices) + 1, len(m.vertices) + 2]]])
    pts = np.vstack([
        rng.normal(0, 6, (150, 3)),          # around and inside the sphere
        rng.uniform(-35, 35, (100, 3)),      # far, some above the big triangle
        sample_surface((v, f), 50, seed=3),  # on the surface
    ])
    d = point_to_surface_distance(pts, (v, f))
    np.testing.assert_allclose(d, naive_distance(pts, v, f), atol=1e-9)
    assert np.all(d[-50:] < 1e-9)


def test_degenerate_triangles_and_empty_queries():
    v = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [5, 5, 5]], float)
    f = np.array([[0, 1, 2], [3, 3, 3]])  # a sliver (collinear) and a point-triangle
    pts = np.array([[1.5, 1.0, 0.0], [5, 5, 6], [-1, 0, 0]])
    np.testing.assert_allclose(point_to_surface_distance(pts, (v, f)), [1.0, 1.0, 1.0], atol=1e-12)
    assert point_to_surface_distance(np.zeros((0, 3)), (v, f)).shape == (0,)
    with pytest.raises(ValueError, match="without faces"):
        point_to_surface_distance(pts, (v, np.zeros((0, 3), int)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        point_to_surface_distance(np.zeros((3, 2)), (v, f))


def test_sample_surface_is_area_uniform_and_seeded():
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    p1 = sample_surface(box, 40000, seed=5)
    np.testing.assert_array_equal(p1, sample_surface(box, 40000, seed=5))
    assert not np.array_equal(p1, sample_surface(box, 40000, seed=6))
    # share of points on the two 2x4 faces (x = +-0.5) = 16 / 28 of the area
    on_x = np.isclose(np.abs(p1[:, 0]), 0.5)
    assert on_x.mean() == pytest.approx(16 / 28, abs=0.01)
    assert np.all(point_to_surface_distance(p1[:200], box) < 1e-12)
    with pytest.raises(ValueError, match="zero area"):
        sample_surface((np.zeros((3, 3)), np.array([[0, 1, 2]])), 10)
    with pytest.raises(ValueError, match="num_samples"):
        sample_surface(box, 0)


# ----------------------------------------------------------------------------------------------
# Chamfer / HD95
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r1, r2", [(10.0, 13.0), (20.0, 19.0)])
def test_chamfer_and_hd95_of_concentric_spheres(r1, r2):
    a, b = sphere(r1), sphere(r2)
    # icosphere facets lie inside the sphere by at most the sagitta, ~0.005 r here
    tol = 0.01 * max(r1, r2)
    cd = chamfer_distance_mesh(a, b, num_samples=5000)
    assert cd == pytest.approx(abs(r1 - r2), abs=tol)
    assert hausdorff_distance_95_mesh(a, b, num_samples=5000) == pytest.approx(abs(r1 - r2), abs=tol)
    # (nearly) symmetric; different samples on both sides
    assert chamfer_distance_mesh(b, a, num_samples=5000) == pytest.approx(cd, abs=tol)


def test_identical_and_shifted_meshes():
    a = sphere(8.0, 3)
    assert chamfer_distance_mesh(a, a.copy(), num_samples=3000) < 1e-9
    assert hausdorff_distance_95_mesh(a, a.copy(), num_samples=3000) < 1e-9
    # a shifted copy: every directed distance is at most the shift, the mean clearly below it
    b = sphere(8.0, 3, centre=(1.0, 0.0, 0.0))
    d_ab, d_ba = surface_distances_mesh(a, b, num_samples=3000)
    assert d_ab.max() <= 1.0 + 1e-9 and d_ba.max() <= 1.0 + 1e-9
    assert 0.3 < chamfer_distance_mesh(a, b, num_samples=3000) < 0.7
    # seeded: reproducible
    assert chamfer_distance_mesh(a, b, 2000, seed=1) == chamfer_distance_mesh(a, b, 2000, seed=1)


def test_mesh_distances_agree_with_voxel_metrics():
    """Meshes of two label masks vs the voxel-based metrics of metrics.geometry (same definitions)."""
    from nnunet_topo.frames import ImageGeometry
    from nnunet_topo.surfaces import mesh_from_mask
    from nnunet_topo.metrics.geometry import chamfer_distance

    g = np.indices((40, 40, 40), dtype=float) - 19.5
    r = np.sqrt((g**2).sum(0))
    a, b = r <= 12, r <= 16
    geo = ImageGeometry((0.5, 0.5, 0.5), (0, 0, 0), np.eye(3))
    cd_mesh = chamfer_distance_mesh(mesh_from_mask(a, geo), mesh_from_mask(b, geo), num_samples=4000)
    assert cd_mesh == pytest.approx(2.0, abs=0.1)
    assert cd_mesh == pytest.approx(chamfer_distance(a, b, (0.5, 0.5, 0.5)), abs=0.25)


def test_empty_and_malformed_meshes():
    a = sphere(3.0, 2)
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int), process=False)
    assert math.isnan(chamfer_distance_mesh(a, empty))
    assert math.isnan(hausdorff_distance_95_mesh(empty, a))
    flat = (np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], float), np.array([[0, 1, 2]]))  # zero area
    assert math.isnan(chamfer_distance_mesh(a, flat))
    d1, d2 = surface_distances_mesh(empty, a)
    assert d1.size == 0 and d2.size == 0
    with pytest.raises(ValueError, match="NaN"):
        chamfer_distance_mesh(a, (np.array([[0, 0, np.nan], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]])))
    with pytest.raises(ValueError, match="face indices"):
        chamfer_distance_mesh(a, (np.eye(3), np.array([[0, 1, 3]])))
    with pytest.raises(ValueError, match="trimesh"):
        chamfer_distance_mesh(a, "not a mesh")


# ----------------------------------------------------------------------------------------------
# Laplacian smoothness energy
# ----------------------------------------------------------------------------------------------


def naive_laplacian_energy(v: np.ndarray, f: np.ndarray) -> float:
    nbrs = {i: set() for i in range(len(v))}
    for tri in f:
        for i in range(3):
            for j in range(3):
                if i != j:
                    nbrs[int(tri[i])].add(int(tri[j]))
    vals = [np.sum((v[i] - v[sorted(n)].mean(0)) ** 2) for i, n in nbrs.items() if n]
    return float(np.mean(vals))


def test_laplacian_energy_known_values():
    ico = trimesh.creation.icosphere(0)  # regular icosahedron: 12 vertices, 5 neighbours each
    v, f = np.asarray(ico.vertices), np.asarray(ico.faces)
    assert laplacian_smoothness_energy(v, f) == pytest.approx(naive_laplacian_energy(v, f), rel=1e-12)
    # regular tetrahedron: neighbours of v are the other three, v - mean = 4/3 (v - centre)
    t = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    tf = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    assert laplacian_smoothness_energy(t, tf) == pytest.approx(16 / 9 * 3.0)
    # translation invariant, quadratic in scale; unreferenced vertices are left out
    assert laplacian_smoothness_energy(t + 7.0, tf) == pytest.approx(16 / 9 * 3.0)
    assert laplacian_smoothness_energy(2.5 * t, tf) == pytest.approx(2.5**2 * 16 / 9 * 3.0)
    assert laplacian_smoothness_energy(np.vstack([t, [[100, 0, 0]]]), tf) == pytest.approx(16 / 9 * 3.0)


def test_noisy_sphere_has_higher_energy_and_matches_naive():
    s = sphere(10.0, 3)
    v, f = np.asarray(s.vertices), np.asarray(s.faces)
    noisy = v + np.random.default_rng(0).normal(0, 0.3, v.shape)
    e_smooth = laplacian_smoothness_energy(v, f)
    e_noisy = laplacian_smoothness_energy(noisy, f)
    assert e_noisy > 5 * e_smooth
    assert e_noisy == pytest.approx(naive_laplacian_energy(noisy, f), rel=1e-10)


def test_laplacian_energy_torch_matches_numpy_and_has_gradients():
    s = sphere(4.0, 2)
    v = np.asarray(s.vertices) + np.random.default_rng(1).normal(0, 0.1, s.vertices.shape)
    f = np.asarray(s.faces)
    vt = torch.tensor(v, requires_grad=True)
    e = laplacian_smoothness_energy(vt, torch.from_numpy(f))
    assert isinstance(e, torch.Tensor) and e.ndim == 0
    assert e.item() == pytest.approx(laplacian_smoothness_energy(v, f), rel=1e-12)
    e.backward()
    assert vt.grad is not None and torch.isfinite(vt.grad).all() and vt.grad.abs().sum() > 0
    # gradcheck on a small mesh (faces as numpy are accepted too)
    t = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1.2]], dtype=torch.float64, requires_grad=True)
    tf = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    assert torch.autograd.gradcheck(lambda x: laplacian_smoothness_energy(x, tf), (t,))
    # smoothing lowers it: a gradient step reduces the energy
    with torch.no_grad():
        v2 = vt - 0.1 * vt.grad / vt.grad.norm()
    assert laplacian_smoothness_energy(v2, torch.from_numpy(f)) < e
    # float16 input is computed in float32
    assert laplacian_smoothness_energy(vt.detach().half(), torch.from_numpy(f)).dtype == torch.float32


def test_laplacian_energy_batched_and_empty():
    s = sphere(3.0, 1)
    v, f = np.asarray(s.vertices), np.asarray(s.faces)
    batch = np.stack([v, 2 * v, v + 1])
    out = laplacian_smoothness_energy(batch, f)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, [laplacian_smoothness_energy(x, f) for x in batch])
    out_t = laplacian_smoothness_energy(torch.from_numpy(batch), torch.from_numpy(f))
    np.testing.assert_allclose(out_t.numpy(), out)
    # no faces: NaN for the metric (numpy), a graph-connected zero for the regulariser (torch)
    assert math.isnan(laplacian_smoothness_energy(v, np.zeros((0, 3), int)))
    vt = torch.tensor(v, requires_grad=True)
    z = laplacian_smoothness_energy(vt, torch.zeros((0, 3), dtype=torch.long))
    assert z.item() == 0.0
    z.backward()
    assert torch.equal(vt.grad, torch.zeros_like(vt))
    with pytest.raises(ValueError, match=r"\(V, 3\)"):
        laplacian_smoothness_energy(v[:, :2], f)
    with pytest.raises(ValueError, match="face indices"):
        laplacian_smoothness_energy(v, f + len(v))
    with pytest.raises(ValueError, match="integer"):
        laplacian_smoothness_energy(v, f.astype(float))


# ----------------------------------------------------------------------------------------------
# Volume
# ----------------------------------------------------------------------------------------------


def test_mesh_volume():
    box = trimesh.creation.box(extents=(2.0, 3.0, 4.0))
    assert mesh_volume(box) == pytest.approx(24.0)
    inverted = trimesh.Trimesh(box.vertices, box.faces[:, ::-1], process=False)
    assert mesh_volume(inverted) == pytest.approx(-24.0)
    assert mesh_volume(sphere(5.0)) == pytest.approx(4 / 3 * math.pi * 125, rel=0.01)
    open_box = trimesh.Trimesh(box.vertices, box.faces[:-1], process=False)
    assert math.isnan(mesh_volume(open_box))
    assert math.isnan(mesh_volume(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int), process=False)))


def test_laplacian_edge_structure_is_cached_per_faces_tensor_and_rebuilt_after_a_change():
    """laplacian_smoothness_energy builds the faces' edge structure once per faces tensor (nnunet_topo.faces_cache);
    an in-place change of the faces rebuilds it (and range-checks again); a freed tensor leaves no entry."""
    import gc

    from nnunet_topo import faces_cache

    ico = trimesh.creation.icosphere(subdivisions=1)
    v = torch.tensor(ico.vertices, dtype=torch.float32) * 3.0
    f = torch.tensor(ico.faces)
    v_np, f_np = ico.vertices * 3.0, ico.faces
    a = laplacian_smoothness_energy(v, f)
    assert (id(f), "laplacian") in faces_cache._CACHE
    assert float(a) == pytest.approx(float(laplacian_smoothness_energy(v_np, f_np)), rel=1e-6)
    f[[0, 1]] = f[[1, 0]]  # the same triangles, reordered in place: the same energy, recomputed
    assert float(laplacian_smoothness_energy(v, f)) == pytest.approx(float(a), rel=1e-6)
    f[0, 0] = v.shape[0]  # now out of range: checked again
    with pytest.raises(ValueError, match="face indices"):
        laplacian_smoothness_energy(v, f)
    key = (id(f), "laplacian")
    del f
    gc.collect()
    assert key not in faces_cache._CACHE
