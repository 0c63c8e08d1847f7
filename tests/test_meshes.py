"""Tests of nnunet_topo.frames, nnunet_topo.surfaces and nnunet_topo.mesh_io: coordinate frames, meshes from
label maps, export and import.

Independent references: SimpleITK's own index <-> physical point transforms, what
``torch.nn.functional.grid_sample`` actually samples, nnU-Net's image readers for the geometry, and
a plain numpy generalised winding number (triangle solid angles, Van Oosterom & Strackee) for
inside/outside tests (trimesh's ``contains`` needs rtree/embree, which are not installed).
"""

from __future__ import annotations

import os
import warnings

import meshio
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import trimesh
from scipy import ndimage
from scipy.spatial.transform import Rotation

from nnunet_topo.frames import ImageGeometry, index_to_normalized, index_to_world, normalized_to_index, world_to_index
from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS, export_mesh, read_mesh
from nnunet_topo.surfaces import MeshBuildError, mesh_from_mask, structure_meshes

IMPROPER = np.diag([1.0, -1.0, 1.0])  # a reflection (det = -1): flips the winding if ignored


def random_geometry(seed: int, improper: bool = False) -> ImageGeometry:
    rng = np.random.default_rng(seed)
    d = Rotation.random(random_state=seed).as_matrix()
    if improper:
        d = d @ IMPROPER
    return ImageGeometry(rng.uniform(0.4, 3.0, 3), rng.uniform(-200, 200, 3), d)


def ellipsoid(shape=(26, 30, 34), radii=(9.0, 11.0, 13.0), centre=None) -> np.ndarray:
    centre = np.asarray(shape) / 2.0 - 0.3 if centre is None else np.asarray(centre)
    g = np.indices(shape, dtype=float)
    r = sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return r <= 1.0


def torus(shape=(20, 40, 40), big=11.0, small=4.5) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=float)
    z, y, x = z - shape[0] / 2 + 0.5, y - shape[1] / 2 + 0.5, x - shape[2] / 2 + 0.5
    return (np.sqrt(y**2 + x**2) - big) ** 2 + z**2 <= small**2


def winding_number(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Generalised winding number (sum of signed solid angles / 4 pi), plain numpy."""
    tri = vertices[faces]  # (F, 3, 3)
    out = np.empty(len(points))
    for s in range(0, len(points), chunk):
        p = points[s : s + chunk]
        a = tri[None, :, 0, :] - p[:, None, :]
        b = tri[None, :, 1, :] - p[:, None, :]
        c = tri[None, :, 2, :] - p[:, None, :]
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        det = np.einsum("pfi,pfi->pf", a, np.cross(b, c))
        den = (la * lb * lc + np.einsum("pfi,pfi->pf", a, b) * lc + np.einsum("pfi,pfi->pf", b, c) * la
               + np.einsum("pfi,pfi->pf", c, a) * lb)
        out[s : s + chunk] = (2.0 * np.arctan2(det, den)).sum(axis=1) / (4 * np.pi)
    return out


# ----------------------------------------------------------------------------------------------
# ImageGeometry
# ----------------------------------------------------------------------------------------------


def test_geometry_validation_and_equality():
    g = ImageGeometry((1, 2, 3), (4, 5, 6), np.eye(3).ravel())  # 9-tuple like SimpleITK
    assert g.spacing_xyz == (1.0, 2.0, 3.0) and g.direction.shape == (3, 3)
    assert g == ImageGeometry((1, 2, 3), (4, 5, 6), np.eye(3)) and hash(g) == hash(ImageGeometry((1, 2, 3), (4, 5, 6), np.eye(3)))
    assert g != ImageGeometry((1, 2, 3.5), (4, 5, 6), np.eye(3))
    assert g.voxel_volume == pytest.approx(6.0)
    with pytest.raises(ValueError, match="read-only"):
        g.direction[0, 0] = 2.0
    for bad in [dict(spacing_xyz=(1, 0, 1)), dict(spacing_xyz=(1, -1, 1)), dict(spacing_xyz=(1, np.nan, 1)),
                dict(spacing_xyz=(1, 1)), dict(origin_xyz=(0, np.inf, 0)), dict(direction=np.zeros((3, 3))),
                dict(direction=np.eye(2))]:
        kw = dict(spacing_xyz=(1, 1, 1), origin_xyz=(0, 0, 0), direction=np.eye(3)) | bad
        with pytest.raises(ValueError):
            ImageGeometry(**kw)


def test_geometry_from_sitk_and_2d_rejected():
    img = sitk.Image(5, 6, 7, sitk.sitkUInt8)
    d = Rotation.random(random_state=3).as_matrix()
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(d.ravel().tolist())
    g = ImageGeometry.from_sitk(img)
    assert g.spacing_xyz == (0.5, 0.7, 2.0) and g.origin_xyz == (10.0, -20.0, 30.0)
    np.testing.assert_allclose(g.direction, d, atol=1e-12)
    with pytest.raises(ValueError, match="3D"):
        ImageGeometry.from_sitk(sitk.Image(5, 6, sitk.sitkUInt8))
    with pytest.raises(ValueError, match="sitk_stuff"):
        ImageGeometry.from_nnunet_properties({"spacing": [1, 1, 1]})


# ----------------------------------------------------------------------------------------------
# Coordinate frames
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("improper", [False, True])
def test_index_world_round_trip(improper):
    g = random_geometry(1, improper)
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-5, 60, (200, 3))
    xyz = index_to_world(ijk, g)
    np.testing.assert_allclose(world_to_index(xyz, g), ijk, atol=1e-9)
    # the formula of the docstring, written out in (x, y, z) index order
    ref = np.asarray(g.origin_xyz) + (g.direction @ (np.asarray(g.spacing_xyz)[:, None] * ijk[:, ::-1].T)).T
    np.testing.assert_allclose(xyz, ref, atol=1e-9)
    # the homogeneous affine agrees too
    homog = np.c_[ijk[:, ::-1], np.ones(len(ijk))] @ g.affine.T
    np.testing.assert_allclose(homog[:, :3], xyz, atol=1e-9)
    # torch: same numbers, differentiable, leading dimensions kept
    t = torch.tensor(ijk.reshape(20, 10, 3), requires_grad=True)
    xyz_t = index_to_world(t, g)
    assert xyz_t.shape == (20, 10, 3)
    np.testing.assert_allclose(xyz_t.detach().numpy().reshape(-1, 3), xyz, atol=1e-9)
    xyz_t.sum().backward()
    np.testing.assert_allclose(t.grad[0, 0].numpy(), g.index_to_world_matrix.sum(axis=0)[::-1], atol=1e-12)
    np.testing.assert_allclose(world_to_index(torch.tensor(xyz), g).numpy(), ijk, atol=1e-9)
    # integer indices are accepted
    np.testing.assert_allclose(index_to_world(np.array([[1, 2, 3]]), g), index_to_world(np.array([[1.0, 2.0, 3.0]]), g))
    with pytest.raises(ValueError, match="shape"):
        index_to_world(np.zeros((4, 2)), g)


@pytest.mark.parametrize("improper", [False, True])
def test_index_to_world_matches_simpleitk(improper):
    g = random_geometry(7, improper)
    img = sitk.Image(8, 9, 10, sitk.sitkUInt8)
    img.SetSpacing(g.spacing_xyz)
    img.SetOrigin(g.origin_xyz)
    img.SetDirection(g.direction.ravel().tolist())
    assert ImageGeometry.from_sitk(img) == g or np.allclose(ImageGeometry.from_sitk(img).direction, g.direction)
    rng = np.random.default_rng(1)
    ijk = rng.uniform(-2, 12, (50, 3))  # (z, y, x)
    xyz = index_to_world(ijk, g)
    for p_zyx, w in zip(ijk, xyz):
        ref = img.TransformContinuousIndexToPhysicalPoint(p_zyx[::-1].tolist())  # SimpleITK index = (x, y, z)
        np.testing.assert_allclose(w, ref, atol=1e-9)
        back = img.TransformPhysicalPointToContinuousIndex(w.tolist())
        np.testing.assert_allclose(world_to_index(w[None], g)[0], np.asarray(back)[::-1], atol=1e-9)
    # and a voxel of the numpy array is the voxel SimpleITK addresses
    arr = np.zeros((10, 9, 8), np.uint8)
    arr[3, 5, 6] = 1
    img2 = sitk.GetImageFromArray(arr)
    img2.CopyInformation(img)
    assert img2[6, 5, 3] == 1
    np.testing.assert_allclose(index_to_world(np.array([[3, 5, 6]]), g)[0], img2.TransformIndexToPhysicalPoint((6, 5, 3)))


@pytest.mark.parametrize("shape", [(5, 7, 9), (4, 1, 6), (6, 8)])
def test_index_to_normalized_matches_grid_sample(shape):
    # a volume whose channels are its own (z, y, x) index: trilinear sampling of a linear function is exact
    grids = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    vol = torch.from_numpy(grids)[None]  # (1, D, *shape)
    rng = np.random.default_rng(2)
    ijk = rng.uniform(0, 1, (40, len(shape))) * (np.asarray(shape) - 1)
    grid = index_to_normalized(ijk, shape)
    assert np.all(np.abs(grid) <= 1 + 1e-12)
    g = torch.from_numpy(np.ascontiguousarray(grid)).reshape((1, 40) + (1,) * (len(shape) - 1) + (len(shape),))
    sampled = torch.nn.functional.grid_sample(vol, g, mode="bilinear", align_corners=True)
    sampled = sampled.reshape(len(shape), 40).T.numpy()
    np.testing.assert_allclose(sampled, ijk, atol=1e-9)
    # corners: -1 is the first voxel centre, +1 the last, in reversed order
    first_last = index_to_normalized(np.array([[0] * len(shape), [s - 1 for s in shape]], float), shape)
    expect = np.array([[-1.0 if s > 1 else 0.0 for s in shape[::-1]], [1.0 if s > 1 else 0.0 for s in shape[::-1]]])
    np.testing.assert_allclose(first_last, expect)
    # inverse, numpy and torch
    np.testing.assert_allclose(normalized_to_index(grid, shape), ijk, atol=1e-12)
    t = torch.tensor(ijk, requires_grad=True)
    nt = index_to_normalized(t, shape)
    np.testing.assert_allclose(nt.detach().numpy(), grid, atol=1e-12)
    np.testing.assert_allclose(normalized_to_index(nt, shape).detach().numpy(), ijk, atol=1e-12)
    nt.sum().backward()
    assert t.grad is not None


def test_grid_sample_on_features_at_world_points():
    """World point -> index -> normalised -> grid_sample reads the voxel value at that point."""
    g = random_geometry(4)
    shape = (6, 7, 8)
    vol = np.random.default_rng(3).random(shape)
    idx = np.array([[1, 2, 3], [5, 6, 7], [0, 0, 0], [2, 6, 1]])
    world = index_to_world(idx, g)
    grid = index_to_normalized(world_to_index(world, g), shape)
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(vol)[None, None], torch.from_numpy(np.ascontiguousarray(grid)).view(1, 4, 1, 1, 3),
        align_corners=True,
    ).view(4).numpy()
    np.testing.assert_allclose(out, vol[tuple(idx.T)], atol=1e-9)


# ----------------------------------------------------------------------------------------------
# nnU-Net readers -> geometry
# ----------------------------------------------------------------------------------------------


def write_label_image(path, label: np.ndarray, g: ImageGeometry) -> None:
    img = sitk.GetImageFromArray(label.astype(np.uint8))
    img.SetSpacing(g.spacing_xyz)
    img.SetOrigin(g.origin_xyz)
    img.SetDirection(g.direction.ravel().tolist())
    sitk.WriteImage(img, str(path))


def test_geometry_from_nnunet_readers(tmp_path):
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    g = random_geometry(5)
    label = np.zeros((12, 14, 16), np.uint8)
    label[3:8, 4:11, 2:9] = 1
    label[9, 1, 14] = 2
    path = tmp_path / "case.nii.gz"
    write_label_image(path, label, g)

    seg, props = SimpleITKIO().read_seg(str(path))
    gs = ImageGeometry.from_nnunet_properties(props)
    np.testing.assert_allclose(gs.spacing_xyz, g.spacing_xyz, rtol=1e-6)
    np.testing.assert_allclose(gs.origin_xyz, g.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(gs.direction, g.direction, atol=1e-6)

    # NibabelIO: same voxel -> same world point
    seg_n, props_n = NibabelIO().read_seg(str(path))
    assert np.array_equal(seg_n[0], seg[0])
    gn = ImageGeometry.from_nnunet_properties(props_n)
    pts = np.array([[0, 0, 0], [11, 13, 15], [9, 1, 14]], float)
    np.testing.assert_allclose(index_to_world(pts, gn), index_to_world(pts, gs), atol=1e-3)

    # SimpleITKIOWithReorient: a permuted/flipped array, but each labelled voxel is at the same place
    seg_r, props_r = SimpleITKIOWithReorient().read_seg(str(path))
    gr = ImageGeometry.from_nnunet_properties(props_r)
    w_orig = index_to_world(np.argwhere(seg[0] == 2).astype(float), gs)
    w_reor = index_to_world(np.argwhere(seg_r[0] == 2).astype(float), gr)
    np.testing.assert_allclose(w_reor, w_orig, atol=1e-3)
    # the meshes of both arrays coincide
    m_o = mesh_from_mask(seg[0] == 1, gs)
    m_r = mesh_from_mask(seg_r[0] == 1, gr)
    assert m_r.volume == pytest.approx(m_o.volume, rel=1e-6)
    np.testing.assert_allclose(np.sort(m_r.vertices, axis=0), np.sort(m_o.vertices, axis=0), atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Meshes overlay their label maps in world space
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "geometry",
    [
        ImageGeometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
        ImageGeometry((0.9, 1.3, 2.5), (-120.0, 35.5, 410.0), np.eye(3)),
        random_geometry(11),
        random_geometry(12, improper=True),
    ],
    ids=["identity", "identity-anisotropic", "oblique", "oblique-improper"],
)
def test_exported_mesh_overlays_label_map(tmp_path, geometry):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    label = np.zeros((26, 30, 34), np.uint8)
    label[ellipsoid()] = 3
    label[2:5, 2:6, 28:33] = 1  # another label, not part of the structure
    path = tmp_path / "ref.nii.gz"
    write_label_image(path, label, geometry)
    seg, props = SimpleITKIO().read_seg(str(path))
    seg = seg[0]
    g = ImageGeometry.from_nnunet_properties(props)
    meshes = structure_meshes(seg, {"blob": [3]}, g)
    mask = seg == 3

    label_volume = mask.sum() * g.voxel_volume
    vtk = read_mesh(export_mesh(meshes["blob"], tmp_path / "blob.vtk"))
    stl = read_mesh(export_mesh(meshes["blob"], tmp_path / "blob.stl"))
    for mesh in (vtk, stl):
        assert mesh.is_watertight and mesh.is_winding_consistent
        # (a) volume of the mesh ~ labelled volume (marching cubes cuts the voxel corners: ~1-2 % less)
        assert mesh.volume > 0
        assert mesh.volume == pytest.approx(label_volume, rel=0.03)
    # the STL (float32, unshared corners) holds the same surface
    np.testing.assert_allclose(np.sort(stl.vertices, axis=0), np.sort(vtk.vertices, axis=0), atol=1e-4)
    v, f = np.asarray(vtk.vertices), np.asarray(vtk.faces)
    # (b) points inside the mesh fall into labelled voxels
    rng = np.random.default_rng(0)
    lo, hi = vtk.bounds
    cand = rng.uniform(lo, hi, (1500, 3))
    inside = cand[winding_number(cand, v, f) > 0.5]
    assert len(inside) > 300
    vox = np.rint(world_to_index(inside, g)).astype(int)
    assert np.all((vox >= 0) & (vox < np.asarray(seg.shape)))
    hit = seg[tuple(vox.T)] == 3
    assert hit.mean() >= 0.95, hit.mean()
    # (c) centres of voxels deep inside the label lie inside the mesh, those outside do not
    deep = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 3))
    centres = index_to_world(np.argwhere(deep)[::5].astype(float), g)
    assert winding_number(centres, v, f).min() > 0.5
    outside = ~ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 3))
    centres = index_to_world(np.argwhere(outside)[::29].astype(float), g)
    assert winding_number(centres, v, f).max() < 0.5


def test_mesh_without_geometry_is_index_space_xyz():
    mask = ellipsoid((14, 16, 18), (4, 5, 6))
    m0 = mesh_from_mask(mask)
    m1 = mesh_from_mask(mask, ImageGeometry.identity())
    np.testing.assert_array_equal(m0.vertices, m1.vertices)
    np.testing.assert_array_equal(m0.faces, m1.faces)
    # vertices are (x, y, z)_index: the mesh's centroid is the mask's centroid reversed
    np.testing.assert_allclose(m0.center_mass, np.argwhere(mask).mean(axis=0)[::-1], atol=0.05)


# ----------------------------------------------------------------------------------------------
# Mesh properties: closed, outward, topology
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("improper", [False, True])
def test_outward_closed_and_border_touching(improper):
    g = random_geometry(21, improper)
    mask = np.zeros((10, 12, 14), bool)
    mask[0:6, 3:12, 5:14] = True  # touches three array borders
    m = mesh_from_mask(mask, g)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0
    # outward: normals at the vertices point away from the centroid on this convex box
    away = np.einsum("ij,ij->i", m.face_normals, m.triangles_center - m.center_mass)
    assert np.all(away > 0)
    # a box of n voxels: the marching-cubes box is n - 1 voxel wide with bevelled edges
    assert 0.6 * mask.sum() * g.voxel_volume < m.volume < mask.sum() * g.voxel_volume


def genus(mesh: trimesh.Trimesh) -> int:
    chi = len(mesh.vertices) - len(mesh.edges_unique) + len(mesh.faces)
    assert chi % 2 == 0
    return (2 * mesh.body_count - chi) // 2


def test_torus_has_genus_one_and_sphere_zero():
    t = mesh_from_mask(torus(), random_geometry(2))
    assert t.is_watertight and t.body_count == 1 and t.euler_number == 0 and genus(t) == 1
    s = mesh_from_mask(ellipsoid((20, 20, 20), (7, 7, 7)))
    assert s.euler_number == 2 and genus(s) == 0
    two = mesh_from_mask(np.concatenate([torus(), torus()], axis=0))  # two separate tori
    assert two.body_count == 2 and two.euler_number == 0 and genus(two) == 2


def test_hollow_sphere_has_inner_shell_facing_the_cavity():
    outer = ellipsoid((24, 24, 24), (10, 10, 10))
    inner = ellipsoid((24, 24, 24), (5, 5, 5))
    shell = outer & ~inner
    m = mesh_from_mask(shell)
    assert m.body_count == 2 and m.is_watertight and m.euler_number == 4
    v_outer = mesh_from_mask(outer).volume
    v_inner = mesh_from_mask(inner).volume
    assert m.volume == pytest.approx(v_outer - v_inner, rel=0.02)
    # a point in the cavity is outside the solid, a point in the wall inside
    w = winding_number(np.array([[11.7, 11.7, 11.7], [11.7, 11.7, 19.2]]), m.vertices, m.faces)
    assert abs(w[0]) < 1e-6 and w[1] == pytest.approx(1.0, abs=1e-6)


def test_lorensen_is_closed_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        mask = rng.random(tuple(rng.integers(3, 10, 3))) < rng.uniform(0.1, 0.9)
        if not mask.any():
            continue
        m = mesh_from_mask(mask)
        assert m.is_watertight and m.is_winding_consistent and m.volume > 0
    # voxels touching only along an edge or at a corner become separate bodies
    for other in [(1, 1, 0), (1, 1, 1)]:
        mask = np.zeros((2, 2, 2), bool)
        mask[0, 0, 0] = mask[other] = True
        m = mesh_from_mask(mask)
        assert m.body_count == 2 and m.is_watertight


def test_lewiner_either_closed_or_mesh_build_error():
    rng = np.random.default_rng(0)
    raised = 0
    for _ in range(20):
        mask = rng.random((8, 9, 10)) < 0.5
        try:
            m = mesh_from_mask(mask, method="lewiner")
            assert m.is_watertight
        except MeshBuildError as exc:
            assert "watertight" in str(exc)
            raised += 1
    assert raised > 0  # noise masks have edge-touching voxels that lewiner joins non-manifoldly


def test_mesh_build_errors():
    with pytest.raises(MeshBuildError, match="empty"):
        mesh_from_mask(np.zeros((4, 5, 6), bool))
    assert issubclass(MeshBuildError, ValueError)
    with pytest.raises(ValueError, match="3D"):
        mesh_from_mask(np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="smoothing_iterations"):
        mesh_from_mask(np.ones((2, 2, 2), bool), smoothing_iterations=-1)
    with pytest.raises(ValueError, match="method"):
        mesh_from_mask(np.ones((2, 2, 2), bool), method="dual")


def test_non_finite_vertices_raise(monkeypatch):
    import nnunet_topo.surfaces as meshes_mod

    def broken(ijk, geometry):
        out = ijk[:, ::-1].copy()
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(meshes_mod, "index_to_world", broken)
    with pytest.raises(MeshBuildError, match="non-finite"):
        mesh_from_mask(np.ones((2, 2, 2), bool), ImageGeometry.identity())


def test_smoothing_keeps_closed_surface_and_volume():
    from nnunet_topo.metrics.mesh import laplacian_smoothness_energy

    g = random_geometry(8)
    mask = ellipsoid()
    raw = mesh_from_mask(mask, g)
    smooth = mesh_from_mask(mask, g, smoothing_iterations=10)
    assert smooth.is_watertight and smooth.volume > 0
    assert len(smooth.vertices) == len(raw.vertices)
    np.testing.assert_array_equal(smooth.faces, raw.faces)
    assert smooth.volume == pytest.approx(raw.volume, rel=0.02)
    assert laplacian_smoothness_energy(smooth.vertices, smooth.faces) < 0.3 * laplacian_smoothness_energy(raw.vertices, raw.faces)
    # uniform-weight Taubin smoothing commutes with the affine index -> world map
    idx_smooth = mesh_from_mask(mask, None, smoothing_iterations=10)
    ijk = idx_smooth.vertices[:, ::-1]
    np.testing.assert_allclose(index_to_world(ijk, g), smooth.vertices, atol=1e-8)


def test_decimation_needs_fast_simplification():
    mask = ellipsoid((14, 16, 18), (4, 5, 6))
    try:
        import fast_simplification  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="fast-simplification"):
            mesh_from_mask(mask, target_faces=100)
    else:
        m = mesh_from_mask(mask, target_faces=100)
        assert m.is_watertight and m.volume > 0 and len(m.faces) <= 150
    # a target above the face count is a no-op, no package needed
    m = mesh_from_mask(mask, target_faces=10**6)
    assert len(m.faces) == len(mesh_from_mask(mask).faces)


# ----------------------------------------------------------------------------------------------
# structure_meshes
# ----------------------------------------------------------------------------------------------


def test_structure_meshes_regions_and_empty():
    label = np.zeros((24, 24, 24), np.uint8)
    outer = ellipsoid((24, 24, 24), (9, 9, 9))
    inner = ellipsoid((24, 24, 24), (5, 5, 5))
    label[outer] = 2  # MYO
    label[inner] = 3  # LV
    g = random_geometry(9)
    ms = structure_meshes(label, {"LV_endo": [3], "LV_epi": [2, 3], "MYO": 2}, g)
    assert list(ms) == ["LV_endo", "LV_epi", "MYO"]
    assert ms["LV_epi"].body_count == 1 and ms["MYO"].body_count == 2
    assert ms["LV_epi"].volume == pytest.approx(mesh_from_mask(outer, g).volume)
    assert ms["MYO"].volume == pytest.approx(ms["LV_epi"].volume - ms["LV_endo"].volume, rel=0.02)
    with pytest.raises(MeshBuildError, match="'RV'"):
        structure_meshes(label, {"LV_endo": [3], "RV": [1]}, g)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ms = structure_meshes(label, {"LV_endo": [3], "RV": [1]}, g, skip_empty=True)
    assert list(ms) == ["LV_endo"] and any("RV" in str(w.message) for w in rec)
    with pytest.raises(ValueError, match="no label ids"):
        structure_meshes(label, {"X": []}, g)
    with pytest.raises(ValueError, match="integers"):
        structure_meshes(label, {"X": ["LV"]}, g)


# ----------------------------------------------------------------------------------------------
# Export / import
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", SUPPORTED_MESH_EXTENSIONS)
def test_export_read_round_trip(tmp_path, ext):
    m = mesh_from_mask(torus(), random_geometry(3), smoothing_iterations=3)
    path = export_mesh(m, tmp_path / "sub" / f"torus{ext}")
    assert isinstance(path, str) and os.path.isfile(path)
    r = read_mesh(path)
    assert r.is_watertight and genus(r) == 1
    assert r.volume == pytest.approx(m.volume, rel=1e-6)
    if ext == ".stl":  # STL stores triangle corners (float32); merged again on reading
        assert len(r.vertices) == len(m.vertices) and len(r.faces) == len(m.faces)
    else:  # vertex order and faces preserved
        tol = {".ply": 1e-4}.get(ext, 1e-7)  # PLY via trimesh stores float32
        np.testing.assert_allclose(r.vertices, m.vertices, atol=tol * (1 + np.abs(m.vertices).max()))
        np.testing.assert_array_equal(r.faces, m.faces)


def test_export_refuses_to_overwrite_and_unknown_extension(tmp_path):
    m = mesh_from_mask(ellipsoid((10, 10, 10), (3, 3, 3)))
    p = export_mesh(m, str(tmp_path / "a.vtk"))
    before = open(p, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_mesh(mesh_from_mask(np.ones((2, 2, 2), bool)), p)
    assert open(p, "rb").read() == before
    export_mesh(mesh_from_mask(np.ones((2, 2, 2), bool)), p, overwrite=True)
    assert len(read_mesh(p).vertices) != len(m.vertices)
    with pytest.raises(ValueError, match=r"\.vtk.*\.vtp.*\.ply.*\.obj.*\.stl"):
        export_mesh(m, tmp_path / "a.off")
    with pytest.raises(ValueError, match="supported"):
        read_mesh(tmp_path / "a.nii.gz")
    with pytest.raises(FileNotFoundError):
        read_mesh(tmp_path / "missing.ply")
    # upper-case extensions are fine
    assert read_mesh(export_mesh(m, tmp_path / "b.PLY")).is_watertight
    bad = trimesh.Trimesh(np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]]), process=False)
    with pytest.raises(ValueError, match="non-finite"):
        export_mesh(bad, tmp_path / "bad.stl")


def test_vtk_file_layout(tmp_path):
    """The legacy VTK file is binary POLYDATA with big-endian doubles and int32 polygon lists."""
    m = mesh_from_mask(np.ones((1, 1, 1), bool))  # an octahedron: 6 vertices, 8 faces
    p = export_mesh(m, tmp_path / "o.vtk")
    data = open(p, "rb").read()
    head = data.split(b"\n", 5)
    assert head[0] == b"# vtk DataFile Version 4.2" and head[2] == b"BINARY" and head[3] == b"DATASET POLYDATA"
    assert head[4] == b"POINTS 6 double"
    pts = np.frombuffer(head[5][: 6 * 3 * 8], dtype=">f8").reshape(6, 3)
    np.testing.assert_array_equal(pts, m.vertices)
    rest = head[5][6 * 3 * 8 :]
    assert rest.startswith(b"\nPOLYGONS 8 32\n")
    polys = np.frombuffer(rest[len(b"\nPOLYGONS 8 32\n") :][: 32 * 4], dtype=">i4").reshape(8, 4)
    assert np.all(polys[:, 0] == 3)
    np.testing.assert_array_equal(polys[:, 1:], m.faces)


def test_read_other_vtk_flavours(tmp_path):
    m = mesh_from_mask(np.ones((1, 1, 1), bool))
    v, f = np.asarray(m.vertices), np.asarray(m.faces)
    # ASCII legacy 4.2 with attribute data after the geometry
    ascii_path = tmp_path / "ascii.vtk"
    with open(ascii_path, "w") as fh:
        fh.write("# vtk DataFile Version 3.0\nhand written\nASCII\nDATASET POLYDATA\n")
        fh.write(f"POINTS {len(v)} float\n" + "\n".join(" ".join(repr(float(x)) for x in row) for row in v) + "\n")
        fh.write(f"POLYGONS {len(f)} {4 * len(f)}\n" + "\n".join("3 " + " ".join(map(str, row)) for row in f) + "\n")
        fh.write(f"POINT_DATA {len(v)}\nSCALARS s float 1\nLOOKUP_TABLE default\n" + " ".join("0" * len(v)) + "\n")
    r = read_mesh(ascii_path)
    np.testing.assert_allclose(r.vertices, v, atol=1e-6)
    np.testing.assert_array_equal(r.faces, f)
    # VTK 5.1 (what VTK >= 9 writes): OFFSETS + CONNECTIVITY
    p51 = tmp_path / "v51.vtk"
    with open(p51, "w") as fh:
        fh.write("# vtk DataFile Version 5.1\nvtk output\nASCII\nDATASET POLYDATA\n")
        fh.write(f"POINTS {len(v)} double\n" + " ".join(repr(float(x)) for x in v.ravel()) + "\n")
        fh.write("METADATA\nINFORMATION 0\n\n")  # as VTK 9 writes after arrays
        fh.write("VERTICES 1 0\nOFFSETS vtktypeint64\n0\nCONNECTIVITY vtktypeint64\n\n")  # an empty section
        fh.write(f"POLYGONS {len(f) + 1} {3 * len(f)}\nOFFSETS vtktypeint64\n" + " ".join(str(3 * k) for k in range(len(f) + 1)))
        fh.write("\nCONNECTIVITY vtktypeint64\n" + " ".join(map(str, f.ravel())) + "\n")
    r = read_mesh(p51)
    np.testing.assert_allclose(r.vertices, v)
    np.testing.assert_array_equal(r.faces, f)
    # UNSTRUCTURED_GRID (what meshio writes) is read through meshio
    pug = tmp_path / "ug.vtk"
    meshio.write(str(pug), meshio.Mesh(v, [("triangle", f)]))
    r = read_mesh(pug)
    np.testing.assert_allclose(r.vertices, v)
    np.testing.assert_array_equal(r.faces, f)
    # quads are refused
    pq = tmp_path / "quad.vtk"
    meshio.write(str(pq), meshio.Mesh(v[:4], [("quad", np.array([[0, 1, 2, 3]]))]))
    with pytest.raises(ValueError, match="triangle"):
        read_mesh(pq)
