"""Tests for nnunet_topo.metrics.topology: known shapes, cubical persistence, hand-computed errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from nnunet_topo.metrics.topology import (
    betti_error,
    betti_error_2d,
    betti_numbers_2d,
    betti_numbers_3d,
    betti_numbers_per_slice,
    components_per_slice,
    connected_component_error_2d,
    connected_component_error_3d,
    count_components_3d,
    slice_violation_rate,
    topology_violation_score,
    violation_rates,
)

cripser = pytest.importorskip("cripser")


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------


def _grid(shape):
    return np.indices(shape, dtype=np.float64)


def ball(shape=(15, 15, 15), center=None, radius=5.0):
    z, y, x = _grid(shape)
    c = [(s - 1) / 2 for s in shape] if center is None else center
    return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2


def torus(shape=(11, 24, 24), center=None, major=7.0, minor=2.5):
    """Solid torus around the Z axis."""
    z, y, x = _grid(shape)
    c = [(s - 1) / 2 for s in shape] if center is None else center
    rho = np.sqrt((y - c[1]) ** 2 + (x - c[2]) ** 2)
    return (rho - major) ** 2 + (z - c[0]) ** 2 <= minor**2


def hollow_sphere(shape=(17, 17, 17)):
    return ball(shape, radius=7.0) & ~ball(shape, radius=4.0)


def two_balls():
    shape = (13, 13, 30)
    return ball(shape, center=(6, 6, 7), radius=4) | ball(shape, center=(6, 6, 22), radius=4)


def two_tori():
    shape = (11, 24, 50)
    return torus(shape, center=(5, 11.5, 12)) | torus(shape, center=(5, 11.5, 37))


def single_voxel():
    m = np.zeros((5, 5, 5), bool)
    m[2, 2, 2] = True
    return m


def diagonal_voxels():
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = m[2, 2, 2] = m[3, 3, 1] = True  # corner-touching chain: one 26-component
    return m


def border_shape():
    """A solid box with a tunnel, cut by the array border on every side."""
    m = np.ones((6, 7, 8), bool)
    m[:, 3, 3] = False  # a tunnel through the whole block along Z: touches the border -> b1 = 1
    return m


def box_with_hidden_cavity_at_border():
    """Cavity enclosed by foreground, foreground touching the border: b2 = 1."""
    m = np.ones((5, 5, 5), bool)
    m[2, 2, 2] = False
    return m


def open_cavity_at_border():
    """A notch that opens onto the array border is not a cavity (outside is background)."""
    m = np.ones((5, 5, 5), bool)
    m[0, 2, 2] = False
    return m


SHAPES_3D = {
    "ball": (ball(), (1, 0, 0)),
    "solid_torus": (torus(), (1, 1, 0)),
    "hollow_sphere": (hollow_sphere(), (1, 0, 1)),
    "two_balls": (two_balls(), (2, 0, 0)),
    "two_tori": (two_tori(), (2, 2, 0)),
    "empty": (np.zeros((6, 6, 6), bool), (0, 0, 0)),
    "single_voxel": (single_voxel(), (1, 0, 0)),
    "diagonal_voxels": (diagonal_voxels(), (1, 0, 0)),
    "full_array": (np.ones((3, 4, 5), bool), (1, 0, 0)),
    "border_tunnel": (border_shape(), (1, 1, 0)),
    "border_cavity": (box_with_hidden_cavity_at_border(), (1, 0, 1)),
    "border_notch": (open_cavity_at_border(), (1, 0, 0)),
}


def disk(shape=(21, 21), radius=6.0, center=None):
    y, x = _grid(shape)
    c = [(s - 1) / 2 for s in shape] if center is None else center
    return (y - c[0]) ** 2 + (x - c[1]) ** 2 <= radius**2


def ring(shape=(21, 21), center=None):
    return disk(shape, 8, center) & ~disk(shape, 5, center)


def _diag_pixels():
    m = np.zeros((4, 4), bool)
    m[1, 1] = m[2, 2] = True
    return m


def _diag_hole():
    """A diamond of 4 pixels: the centre pixel is a 4-connected hole (8-connected foreground)."""
    m = np.zeros((5, 5), bool)
    m[1, 2] = m[2, 1] = m[2, 3] = m[3, 2] = True
    return m


SHAPES_2D = {
    "disk": (disk(), (1, 0)),
    "ring": (ring(), (1, 1)),
    "two_rings": (ring((21, 42), (10, 10)) | ring((21, 42), (10, 31)), (2, 2)),
    "diagonal_pixels": (_diag_pixels(), (1, 0)),
    "diamond_hole": (_diag_hole(), (1, 1)),
    "empty": (np.zeros((5, 5), bool), (0, 0)),
    "border_ring": (np.pad(np.zeros((3, 3), bool), 1, constant_values=True), (1, 1)),
}


# ----------------------------------------------------------------------------------------------
# reference: cubical persistent homology (T-construction) with cripser
# ----------------------------------------------------------------------------------------------


def cripser_betti(fg: np.ndarray) -> tuple[int, ...]:
    """Betti numbers of the foreground from cubical persistence in the T-construction.

    ``cripser.computePH_T`` takes array entries as values of the top-dimensional cells (voxels),
    lower-dimensional cells get the minimum over their cofaces. With the filtration 0 on the
    foreground and 1 on the background, the sublevel set at 0 is the union of closed foreground
    cubes; at 1 it is the whole (contractible) box, so every non-essential bar born at 0 dies at 1.
    Betti_k = number of dimension-k bars born at 0 with death > 0 (the essential H0 bar included).

    Note: ``cripser.computePH(..., top_dim=True)`` is NOT the T-construction: it is the
    V-construction (voxels as vertices, 6-connected foreground) computing only the top dimension
    by Alexander duality; see ``test_cripser_constructions``.
    """
    arr = np.where(fg, 0.0, 1.0)
    ph = cripser.computePH_T(arr, maxdim=fg.ndim - 1)
    betti = [0] * fg.ndim
    for dim, birth, death in ph[:, :3]:
        if birth == 0 and death > 0:
            betti[int(dim)] += 1
    return tuple(betti)


def test_cripser_constructions():
    """Pins down which cripser entry point matches our connectivity (26/6 in 3D)."""
    fg = diagonal_voxels()
    arr = np.where(fg, 0.0, 1.0)
    # T-construction: diagonally touching voxels share a vertex -> one component.
    assert cripser_betti(fg) == (1, 0, 0)
    # V-construction: 6-connected foreground -> three components.
    ph_v = cripser.computePH(arr, maxdim=2)
    assert int(((ph_v[:, 0] == 0) & (ph_v[:, 1] == 0)).sum()) == 3
    # top_dim=True only reports the top dimension (here dim 2) - not a T-construction switch.
    ph_top = cripser.computePH(np.where(hollow_sphere(), 0.0, 1.0), maxdim=2, top_dim=True)
    assert set(ph_top[:, 0].astype(int).tolist()) == {2}


# ----------------------------------------------------------------------------------------------
# Betti numbers: known shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES_3D))
def test_betti_3d_known_shapes(name):
    mask, expected = SHAPES_3D[name]
    assert betti_numbers_3d(mask) == expected
    assert cripser_betti(mask) == expected
    assert count_components_3d(mask) == expected[0]


@pytest.mark.parametrize("name", list(SHAPES_3D))
def test_betti_3d_position_invariant(name):
    """Embedding a shape in a larger array (cropping path) changes nothing."""
    mask, expected = SHAPES_3D[name]
    big = np.zeros(tuple(s + 9 for s in mask.shape), bool)
    big[3:3 + mask.shape[0], 5:5 + mask.shape[1], 2:2 + mask.shape[2]] = mask
    assert betti_numbers_3d(big) == expected
    # and non-bool input
    assert betti_numbers_3d(big.astype(np.uint8) * 7) == expected


@pytest.mark.parametrize("name", list(SHAPES_2D))
def test_betti_2d_known_shapes(name):
    mask, expected = SHAPES_2D[name]
    assert betti_numbers_2d(mask) == expected
    assert cripser_betti(mask) == expected


def test_betti_types():
    b = betti_numbers_3d(torus())
    assert all(type(v) is int for v in b)
    b2 = betti_numbers_2d(ring())
    assert all(type(v) is int for v in b2)


def test_betti_wrong_ndim():
    with pytest.raises(ValueError, match="3D"):
        betti_numbers_3d(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2D"):
        betti_numbers_2d(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="3D"):
        betti_numbers_per_slice(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="axis"):
        betti_numbers_per_slice(np.zeros((4, 4, 4)), axis=3)


# ----------------------------------------------------------------------------------------------
# Betti numbers: random volumes against cripser
# ----------------------------------------------------------------------------------------------


def _random_volumes():
    rng = np.random.default_rng(12345)
    vols = []
    for density in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9):
        for _ in range(5):
            vols.append(rng.random((12, 12, 12)) < density)
    for sigma in (1.0, 1.5, 2.0):
        for _ in range(5):
            field = ndimage.gaussian_filter(rng.standard_normal((18, 18, 18)), sigma)
            vols.append(field > np.quantile(field, rng.uniform(0.3, 0.8)))
    return vols


RANDOM_VOLUMES = _random_volumes()


def test_betti_3d_random_against_cripser():
    assert len(RANDOM_VOLUMES) == 50
    nontrivial = 0
    for i, vol in enumerate(RANDOM_VOLUMES):
        ours = betti_numbers_3d(vol)
        ref = cripser_betti(vol)
        assert ours == ref, f"volume {i}: ours {ours}, cripser {ref}"
        nontrivial += ours[1] > 0 and ours[2] > 0
    assert nontrivial > 10  # the test volumes do exercise b1 and b2


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_betti_per_slice_random_against_cripser(axis):
    for i, vol in enumerate(RANDOM_VOLUMES[::3]):
        ours = betti_numbers_per_slice(vol, axis=axis)
        assert ours.shape == (vol.shape[axis], 2)
        for s in range(vol.shape[axis]):
            sl = np.take(vol, s, axis=axis)
            ref = cripser_betti(sl)
            assert tuple(ours[s]) == ref, f"volume {i}, slice {s}: ours {ours[s]}, cripser {ref}"
            assert tuple(ours[s]) == betti_numbers_2d(sl)
        np.testing.assert_array_equal(components_per_slice(vol, axis=axis), ours[:, 0])


def test_betti_per_slice_known():
    vol = np.zeros((6, 21, 42), bool)
    vol[1] = disk((21, 42), center=(10, 10))
    vol[2] = ring((21, 42), (10, 10)) | ring((21, 42), (10, 31))
    vol[4] = ring((21, 42), (10, 10)) | disk((21, 42), center=(10, 31))
    expected = np.array([[0, 0], [1, 0], [2, 2], [0, 0], [2, 1], [0, 0]])
    np.testing.assert_array_equal(betti_numbers_per_slice(vol, axis=0), expected)
    # along another axis: move the slice axis
    np.testing.assert_array_equal(betti_numbers_per_slice(np.moveaxis(vol, 0, 2), axis=2), expected)
    np.testing.assert_array_equal(betti_numbers_per_slice(np.zeros((3, 4, 5)), axis=1), np.zeros((4, 2)))


def test_per_slice_components_do_not_cross_slices():
    """Foreground on every row of adjacent slices must not merge through the stacking trick."""
    vol = np.zeros((3, 4, 4), bool)
    vol[0, 3, :] = True  # last row of slice 0
    vol[1, 0, :] = True  # first row of slice 1
    vol[2, 0, 0] = vol[2, 3, 3] = True
    np.testing.assert_array_equal(betti_numbers_per_slice(vol, axis=0), [[1, 0], [1, 0], [2, 0]])


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_betti_error():
    assert betti_error((1, 0, 0), (1, 0, 0)) == 0
    assert betti_error((3, 1, 0), (1, 0, 2)) == 5
    assert betti_error([0, 0], [1, 1]) == 2
    with pytest.raises(ValueError, match="same length"):
        betti_error((1, 0), (1, 0, 0))


def test_connected_component_error_3d():
    pred = np.zeros((10, 10, 10), bool)
    ref = np.zeros_like(pred)
    ref[2:5, 2:5, 2:5] = True
    pred[2:5, 2:5, 2:5] = True
    pred[7, 7, 7] = True
    pred[8, 8, 8] = True  # diagonal to (7,7,7): same component
    pred[0, 9, 0] = True
    assert count_components_3d(pred) == 3
    assert connected_component_error_3d(pred, ref) == 2
    assert connected_component_error_3d(ref, pred) == 2
    assert connected_component_error_3d(np.zeros_like(ref), ref) == 1
    assert connected_component_error_3d(np.zeros_like(ref), np.zeros_like(ref)) == 0


def test_connected_component_error_2d():
    pred = np.zeros((5, 6, 6), bool)
    ref = np.zeros_like(pred)
    ref[1, 1:3, 1:3] = True  # slice 1: ref 1, pred 1
    pred[1, 1:3, 1:3] = True
    ref[2, 1, 1] = ref[2, 4, 4] = True  # slice 2: ref 2, pred 0
    pred[3, 0, 0] = pred[3, 0, 2] = pred[3, 1, 1] = True  # slice 3: pred 1 (8-conn), ref 0
    pred[3, 5, 5] = True  # slice 3: pred 2
    # slices 0 and 4 empty in both: left out. errors 0, 2, 2 -> mean 4/3
    assert connected_component_error_2d(pred, ref, axis=0) == pytest.approx(4 / 3)
    # both empty -> NaN; one empty -> mean of the other's counts
    assert math.isnan(connected_component_error_2d(np.zeros_like(ref), np.zeros_like(ref)))
    assert connected_component_error_2d(np.zeros_like(ref), ref) == pytest.approx(1.5)


def test_betti_error_2d():
    vol_r = np.zeros((4, 21, 21), bool)
    vol_p = np.zeros_like(vol_r)
    vol_r[0] = ring()
    vol_p[0] = ring()  # 0
    vol_r[1] = ring()
    vol_p[1] = disk()  # |1-1| + |1-0| = 1
    vol_p[2] = ring()  # ref empty: 1 + 1 = 2
    # slice 3 empty in both: left out. mean (0 + 1 + 2) / 3 = 1
    assert betti_error_2d(vol_p, vol_r, axis=0) == pytest.approx(1.0)
    assert math.isnan(betti_error_2d(np.zeros_like(vol_r), np.zeros_like(vol_r)))


def test_errors_shape_mismatch():
    a, b = np.zeros((3, 4, 5)), np.zeros((3, 4, 6))
    for fn in (connected_component_error_3d, connected_component_error_2d, betti_error_2d):
        with pytest.raises(ValueError, match=r"\(3, 4, 5\).*\(3, 4, 6\)"):
            fn(a, b)


# ----------------------------------------------------------------------------------------------
# violation scores
# ----------------------------------------------------------------------------------------------


def test_topology_violation_score():
    out = topology_violation_score({"LV-RV": 30, "LV in EPI": 10}, 400)
    assert out["per_rule"] == {"LV-RV": pytest.approx(0.075), "LV in EPI": pytest.approx(0.025)}
    assert out["total"] == pytest.approx(0.1)
    zero = topology_violation_score({"a": 0}, 10)
    assert zero == {"per_rule": {"a": 0.0}, "total": 0.0}
    nan = topology_violation_score({"a": 0, "b": 3}, 0)
    assert math.isnan(nan["total"]) and all(math.isnan(v) for v in nan["per_rule"].values())
    assert topology_violation_score({}, 5) == {"per_rule": {}, "total": 0.0}
    with pytest.raises(ValueError, match="non-negative"):
        topology_violation_score({"a": -1}, 10)
    with pytest.raises(ValueError, match="non-negative"):
        topology_violation_score({"a": 1}, -10)


def test_violation_rates():
    cases = [{"x": 0, "y": 0}, {"x": 5, "y": 0}, {"x": 1, "y": 2}, {"y": 0, "x": 0}]
    out = violation_rates(cases)
    assert out["per_rule"] == {"x": 0.5, "y": 0.25}
    assert out["any"] == 0.5
    assert out["num_cases"] == 4
    empty = violation_rates([])
    assert math.isnan(empty["any"]) and empty["per_rule"] == {} and empty["num_cases"] == 0
    with pytest.raises(ValueError, match="every case"):
        violation_rates([{"x": 0}, {"y": 1}])


def test_slice_violation_rate():
    vm = np.zeros((5, 3, 3), bool)
    vm[1, 0, 0] = vm[3, 2, 2] = True
    assert slice_violation_rate(vm) == pytest.approx(2 / 5)
    assert slice_violation_rate(vm, axis=1) == pytest.approx(2 / 3)
    considered = np.zeros_like(vm)
    considered[1:3] = True  # slices 1, 2 considered; slice 3's violation is not counted
    assert slice_violation_rate(vm, axis=0, considered=considered) == pytest.approx(1 / 2)
    assert math.isnan(slice_violation_rate(vm, considered=np.zeros_like(vm)))
    assert slice_violation_rate(np.zeros_like(vm)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        slice_violation_rate(vm, considered=np.zeros((5, 3, 4)))


# A 2D image that cc3d 4.1.1 mislabels when given as a *bool* array with 8-connectivity (it
# reports 2 components but writes labels up to 7 into background pixels); the metrics pass uint8.
CC3D_BOOL_REGRESSION = [
    "...................",
    "........###.....##.",
    ".......####.....##.",
    "......####......##.",
    ".....#####......##.",
    ".....#####.....###.",
    "....######.....###.",
    "...#######....####.",
    "...########..#####.",
    "...########.######.",
    "..#######...######.",
    "..#####......#####.",
    "...###.........###.",
    "...#.............#.",
    "..##............##.",
    ".####..........###.",
    ".####........#####.",
    ".#####......######.",
    ".#####.....#######.",
    "...................",
]


def test_cc3d_bool_2d_regression():
    img = np.array([[c == "#" for c in row] for row in CC3D_BOOL_REGRESSION])
    assert betti_numbers_2d(img) == cripser_betti(img) == (2, 0)
    vol = np.stack([img, img[::-1], img[:, ::-1]])
    np.testing.assert_array_equal(components_per_slice(vol), [2, 2, 2])


def test_components_per_slice_against_scipy():
    rng = np.random.default_rng(7)
    eight = np.ones((3, 3), bool)
    for _ in range(20):
        vol = ndimage.gaussian_filter(rng.standard_normal((9, 23, 31)), 1.2) > rng.uniform(-0.2, 0.4)
        expected = [ndimage.label(s, eight)[1] for s in vol]
        np.testing.assert_array_equal(components_per_slice(vol, axis=0), expected)


# ---------------------------------------------------------------------------------------------- allowed sets
def test_betti_prior_helpers_with_one_vector_and_allowed_sets():
    from nnunet_topo.metrics.topology import allowed_betti_vectors, betti_prior_error, meets_betti_prior

    assert allowed_betti_vectors((1, 1)) == ((1, 1),)
    assert allowed_betti_vectors([[1, 1], [1, 0]]) == ((1, 1), (1, 0))
    assert allowed_betti_vectors(np.array([[1, 1], [1, 0]])) == ((1, 1), (1, 0))
    with pytest.raises(ValueError, match="non-empty"):
        allowed_betti_vectors([])
    ring_or_c = ((1, 1), (1, 0))
    # an open "C" (1, 0) meets {ring, C} but not {ring}; its error to the ring is 1
    assert meets_betti_prior((1, 0), ring_or_c) and meets_betti_prior(np.array([1, 1]), ring_or_c)
    assert not meets_betti_prior((1, 0), ((1, 1),)) and not meets_betti_prior((1, 0), (1, 1))
    assert betti_prior_error((1, 0), ring_or_c) == 0
    assert betti_prior_error((1, 0), (1, 1)) == betti_prior_error((1, 0), ((1, 1),)) == 1
    # the minimum over the set, not the first vector's error nor a mean: (3, 0) is 2 from (1, 0), 3 from (1, 1)
    assert betti_prior_error((3, 0), ring_or_c) == 2
    assert betti_prior_error((3, 2), ring_or_c) == 3
    assert betti_prior_error((0, 0), ((2, 2), (0, 1))) == 1
    with pytest.raises(ValueError, match="same length"):
        betti_prior_error((1, 0), ((1, 0, 0),))
