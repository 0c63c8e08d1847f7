"""Heart-ROI helpers against naive references (numpy argwhere, explicit loops)."""
import numpy as np
import pytest

from nnunet_topo.roi import (RoiError, box_extent_mm, centered_window_start, check_box_fits, crop_to_window,
                             random_window_start, structure_box, window_contains)


def test_structure_box_matches_argwhere():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lab = np.zeros((9, 13, 11), np.uint8)
        pts = rng.integers(0, [9, 13, 11], size=(rng.integers(1, 6), 3))
        for p in pts:
            lab[tuple(p)] = rng.integers(1, 4)
        lab[0, 0, 0] = 7  # a label that is not asked for
        box = structure_box(lab[None], [1, 2, 3])
        idx = np.argwhere(np.isin(lab, [1, 2, 3]))
        assert box == (tuple(idx.min(0)), tuple(idx.max(0) + 1))
    assert structure_box(np.zeros((3, 3, 3)), [1]) is None


def test_extent_and_fit():
    box = ((2, 3, 4), (5, 13, 6))
    assert box_extent_mm(box, (10, 1.5, 2)) == (30.0, 15.0, 4.0)
    check_box_fits(box, (3, 10, 2), "c")
    with pytest.raises(RoiError, match="case c7.*\\[3, 10, 2\\].*\\[3, 9, 2\\]"):
        check_box_fits(box, (3, 9, 2), "c7")


def test_windows_contain_the_box():
    rng = np.random.default_rng(1)
    for _ in range(200):
        lo = rng.integers(-5, 20, 3)
        size = rng.integers(1, 10, 3)
        patch = size + rng.integers(0, 6, 3)
        box = (tuple(lo), tuple(lo + size))
        assert window_contains(centered_window_start(box, patch), patch, box)
        s = random_window_start(box, patch, rng)
        assert window_contains(s, patch, box)
    # every admissible start is drawn (uniform over [hi - patch, lo])
    starts = {random_window_start(((5,), (8,)), (6,), rng) for _ in range(300)}
    assert starts == {(2,), (3,), (4,), (5,)}
    with pytest.raises(RoiError):
        random_window_start(((0,), (8,)), (6,), rng)


def test_crop_to_window_against_padding():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 7, 8, 9)).astype(np.float32)
    for _ in range(50):
        start = rng.integers(-6, 9, 3)
        patch = rng.integers(1, 12, 3)
        out = crop_to_window(a, start, patch, fill=-3)
        assert out.shape == (2, *patch) and out.dtype == a.dtype
        big = np.pad(a, [(0, 0)] + [(20, 20)] * 3, constant_values=-3)
        sl = tuple(slice(s + 20, s + 20 + p) for s, p in zip(start, patch))
        np.testing.assert_array_equal(out, big[(slice(None),) + sl])


def test_largest_component_box_ignores_islands_of_a_structure():
    from nnunet_topo.roi import largest_component_box

    lab = np.zeros((12, 30, 30), np.uint8)
    lab[2:6, 3:10, 3:10] = 1          # structure A
    lab[2:6, 10:14, 3:10] = 2         # structure B, touching A
    lab[11, 29, 29] = 1               # a stray voxel of A far away
    lab[0, 25:27, 0:2] = 2            # a small island of B
    lab[8:10, 20:28, 20:28] = 3       # structure C, separate from A and B: its own largest component counts
    box, ignored = largest_component_box(lab[None], {"A": [1], "B": [2], "AB": [1, 2], "C": [3]})
    assert box == ((2, 3, 3), (10, 28, 28)) and ignored == 1 + 4 + 5  # A's voxel, B's island, both in AB
    box, ignored = largest_component_box(lab, {"A": [1]})
    assert box == ((2, 3, 3), (6, 10, 10)) and ignored == 1
    assert largest_component_box(lab, {"D": [7]}) == (None, 0)
    # diagonal neighbours are one component (26-connectivity)
    d = np.zeros((3, 3, 3), np.uint8)
    d[0, 0, 0] = d[1, 1, 1] = 1
    assert largest_component_box(d, {"A": [1]}) == (((0, 0, 0), (2, 2, 2)), 0)
