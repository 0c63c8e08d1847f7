"""Tests for nnunet_topo.metrics.geometry: Dice, surface distances, HD95, Chamfer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from nnunet_topo.metrics.geometry import (
    chamfer_distance,
    dice,
    hausdorff_distance_95,
    surface_distances,
)


def cube(shape, start, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def naive_surface_distances(pred, ref, spacing):
    """Brute force: all pairs of surface voxels, whole image, explicit border handling."""
    def surface(m):
        p = np.pad(m, 1)
        er = ndimage.binary_erosion(p, ndimage.generate_binary_structure(m.ndim, 1))
        return (p & ~er)[tuple(slice(1, -1) for _ in m.shape)]

    sp = np.asarray(spacing, float)
    a = np.argwhere(surface(pred)) * sp
    b = np.argwhere(surface(ref)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


# ----------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 0, 0], [0, 1, 1, 0], 0.5),
        ([1, 1, 1, 0], [0, 1, 0, 0], 0.5),
        ([0, 0, 0, 0], [0, 1, 0, 0], 0.0),
        ([1, 0, 0, 0], [0, 0, 0, 0], 0.0),
    ],
)
def test_dice_table(pred, ref, expected):
    assert dice(np.array(pred), np.array(ref)) == pytest.approx(expected)


def test_dice_both_empty_is_nan():
    assert math.isnan(dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))))


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


# ----------------------------------------------------------------------------------------------
# surface distances and HD95
# ----------------------------------------------------------------------------------------------


def test_hd95_offset_cubes_isotropic():
    ref = cube((20, 20, 20), (5, 5, 5), 6)
    pred = cube((20, 20, 20), (5, 5, 8), 6)  # shifted by 3 voxels along X
    # Every surface voxel is within 3 voxels; the far faces are exactly 3 away.
    assert hausdorff_distance_95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hausdorff_distance_95(pred, ref, (1.0, 1.0, 2.0)) == pytest.approx(6.0)


def test_hd95_offset_cubes_anisotropic():
    ref = cube((20, 20, 20), (5, 5, 5), 6)
    pred = cube((20, 20, 20), (7, 5, 5), 6)  # shifted by 2 slices along Z
    spacing = (2.5, 0.7, 0.7)
    # distances along Z are 2 voxels * 2.5 mm
    assert hausdorff_distance_95(pred, ref, spacing) == pytest.approx(5.0)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    n_pr, n_rp = naive_surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(np.sort(d_pr), np.sort(n_pr))
    np.testing.assert_allclose(np.sort(d_rp), np.sort(n_rp))
    assert d_pr.max() == pytest.approx(5.0)


def test_hd95_identical_is_zero():
    m = cube((10, 10, 10), (2, 3, 4), 4)
    assert hausdorff_distance_95(m, m, (1, 2, 3)) == 0.0
    assert chamfer_distance(m, m, (1, 2, 3)) == 0.0


def test_hd95_is_robust_to_one_outlier_voxel():
    ref = cube((30, 30, 30), (5, 5, 5), 10)
    pred = ref.copy()
    pred[28, 28, 28] = True  # one far outlier: max distance large, 95th percentile 0
    d_pr, _ = surface_distances(pred, ref, (1, 1, 1))
    assert d_pr.max() == pytest.approx(math.sqrt(3 * 14**2))
    assert hausdorff_distance_95(pred, ref, (1, 1, 1)) == 0.0


def test_surface_distances_random_against_naive():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred = ndimage.gaussian_filter(rng.standard_normal((14, 15, 16)), 2) > 0.1
        ref = ndimage.gaussian_filter(rng.standard_normal((14, 15, 16)), 2) > 0.1
        spacing = tuple(rng.uniform(0.5, 3.0, 3))
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        n_pr, n_rp = naive_surface_distances(pred, ref, spacing)
        # same C order of surface voxels: compare elementwise
        np.testing.assert_allclose(d_pr, n_pr)
        np.testing.assert_allclose(d_rp, n_rp)
        expected = max(np.percentile(n_pr, 95), np.percentile(n_rp, 95))
        assert hausdorff_distance_95(pred, ref, spacing) == pytest.approx(expected)
        assert chamfer_distance(pred, ref, spacing) == pytest.approx(0.5 * (n_pr.mean() + n_rp.mean()))


def test_surface_distances_match_distance_transform():
    """The k-d tree lookup equals the classic EDT-of-the-other-surface lookup."""
    rng = np.random.default_rng(3)
    pred = ndimage.gaussian_filter(rng.standard_normal((30, 40, 35)), 2.5) > 0.05
    ref = ndimage.gaussian_filter(rng.standard_normal((30, 40, 35)), 2.5) > 0.05
    spacing = (2.0, 0.6, 0.8)
    structure = ndimage.generate_binary_structure(3, 1)
    surf = {}
    for name, m in (("pred", pred), ("ref", ref)):
        p = np.pad(m, 1)
        surf[name] = p & ~ndimage.binary_erosion(p, structure, border_value=0)
    edt_to_ref = ndimage.distance_transform_edt(~surf["ref"], sampling=spacing)[surf["pred"]]
    edt_to_pred = ndimage.distance_transform_edt(~surf["pred"], sampling=spacing)[surf["ref"]]
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(d_pr, edt_to_ref, atol=1e-9)
    np.testing.assert_allclose(d_rp, edt_to_pred, atol=1e-9)


def test_surface_at_array_border():
    """Foreground filling the array: every border voxel is a surface voxel."""
    full = np.ones((4, 4, 4), bool)
    inner = cube((4, 4, 4), (1, 1, 1), 2)
    d_full_to_inner, d_inner_to_full = surface_distances(full, inner, (1, 1, 1))
    assert d_full_to_inner.size == 4**3 - 2**3
    assert d_inner_to_full.size == 8
    np.testing.assert_allclose(d_inner_to_full, 1.0)


def test_2d_input():
    ref = cube((12, 12), (2, 2), 5)
    pred = cube((12, 12), (2, 4), 5)
    assert hausdorff_distance_95(pred, ref, (1.0, 1.5)) == pytest.approx(3.0)


def test_empty_inputs():
    m = cube((8, 8, 8), (2, 2, 2), 3)
    z = np.zeros_like(m)
    for a, b in ((m, z), (z, m), (z, z)):
        assert math.isnan(hausdorff_distance_95(a, b, (1, 1, 1)))
        assert math.isnan(chamfer_distance(a, b, (1, 1, 1)))
        d1, d2 = surface_distances(a, b, (1, 1, 1))
        assert d1.size == 0 and d2.size == 0


@pytest.mark.parametrize(
    "spacing, match",
    [
        ((1.0, 1.0), "one entry per array dimension"),
        ((1.0, 1.0, 1.0, 1.0), "one entry per array dimension"),
        ((1.0, 0.0, 1.0), "positive"),
        ((1.0, -2.0, 1.0), "positive"),
        ((1.0, float("nan"), 1.0), "positive"),
        ((1.0, float("inf"), 1.0), "positive"),
        (1.0, "sequence"),
    ],
)
def test_invalid_spacing(spacing, match):
    m = cube((6, 6, 6), (1, 1, 1), 2)
    with pytest.raises(ValueError, match=match):
        hausdorff_distance_95(m, m, spacing)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(6, 6, 6\).*\(6, 6, 7\)"):
        hausdorff_distance_95(np.zeros((6, 6, 6)), np.zeros((6, 6, 7)), (1, 1, 1))
    with pytest.raises(ValueError, match=r"\(6, 6, 6\).*\(6, 6, 7\)"):
        surface_distances(np.zeros((6, 6, 6)), np.zeros((6, 6, 7)), (1, 1, 1))
