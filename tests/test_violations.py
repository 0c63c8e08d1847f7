"""Tests of nnunet_topo.violations: hand-counted cases, a naive loop reference, soft == hard, gradients, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnunet_topo.rules import ExclusionRule, InclusionRule, TopologySpec, parse_topology
from nnunet_topo.violations import (
    dilate,
    rule_violation_map,
    structure_mask,
    violation_crops_numpy,
    violation_maps,
    violation_maps_numpy,
)

LABELS = {"background": 0, "A": 1, "B": 2, "C": 3}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_spec(rules, connectivity=6, labels=LABELS) -> TopologySpec:
    return parse_topology({"labels": dict(labels), "topology": {"connectivity": connectivity, "rules": list(rules)}})


def one_rule(rule: dict, connectivity=6):
    spec = make_spec([rule], connectivity)
    return spec, spec.rules[0]


def hard_map(lm: np.ndarray, rule: dict, connectivity=6) -> np.ndarray:
    """Violation map of one rule on one case via the batched torch API, checked against the numpy API."""
    spec, r = one_rule(rule, connectivity)
    t = violation_maps(torch.from_numpy(lm)[None].long(), spec)[r.name][0].numpy()
    n = violation_maps_numpy(lm, spec)[r.name]
    np.testing.assert_array_equal(t.astype(bool), n)
    return n


def one_hot(lm: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, *spatial) -> (B, C, *spatial)."""
    return torch.nn.functional.one_hot(lm.long(), num_classes).movedim(-1, 1).to(dtype)


EXCL_AB = {"type": "exclusion", "a": "A", "b": "B"}
INCL_A = {"type": "inclusion", "inner": "A", "outer": ["A", "B"]}
INCL_A_MAY_C = {"type": "inclusion", "inner": "A", "outer": ["A", "B"], "may_touch": "C"}


# ---------------------------------------------------------------------------------------------- hand-built cases
def cubes_face_to_face():
    lm = np.zeros((4, 4, 6), np.int64)
    lm[1:3, 1:3, 1:3] = 1
    lm[1:3, 1:3, 3:5] = 2
    return lm


def voxels(shape, *pairs):
    """Label map with the given (index, label) voxels set."""
    lm = np.zeros(shape, np.int64)
    for idx, label in pairs:
        lm[idx] = label
    return lm


def shell(hole_label=None, hole=(2, 2, 1)):
    """A = [2:4]^3 inside a B shell [1:5]^3; optionally one shell voxel replaced by ``hole_label``."""
    lm = np.zeros((6, 6, 6), np.int64)
    lm[1:5, 1:5, 1:5] = 2
    lm[2:4, 2:4, 2:4] = 1
    if hole_label is not None:
        lm[hole] = hole_label
    return lm


def border_cut():
    """A touches the z=0 image border; B encloses it everywhere else."""
    lm = np.full((4, 5, 5), 2, np.int64)
    lm[0:2, 1:4, 1:4] = 1
    lm[3] = 0  # background beyond B, not touching A
    return lm


HAND_CASES = [
    # (id, label map, rule, connectivity, expected number of violating voxels)
    ("face contact 6", cubes_face_to_face(), EXCL_AB, 6, 8),
    ("face contact 26", cubes_face_to_face(), EXCL_AB, 26, 8),
    ("edge contact 6", voxels((3, 4, 4), ((1, 1, 1), 1), ((1, 2, 2), 2)), EXCL_AB, 6, 0),
    ("edge contact 26", voxels((3, 4, 4), ((1, 1, 1), 1), ((1, 2, 2), 2)), EXCL_AB, 26, 2),
    ("corner contact 6", voxels((4, 4, 4), ((1, 1, 1), 1), ((2, 2, 2), 2)), EXCL_AB, 6, 0),
    ("corner contact 26", voxels((4, 4, 4), ((1, 1, 1), 1), ((2, 2, 2), 2)), EXCL_AB, 26, 2),
    ("separated by one voxel 26", voxels((3, 3, 5), ((1, 1, 1), 1), ((1, 1, 3), 2)), EXCL_AB, 26, 0),
    ("region vs label", voxels((3, 3, 5), ((1, 1, 1), 1), ((1, 1, 2), 3), ((1, 1, 3), 2)),
     {"type": "exclusion", "a": ["A", "C"], "b": "B"}, 6, 2),
    ("closed shell", shell(), INCL_A, 6, 0),
    ("closed shell 26", shell(), INCL_A, 26, 0),
    ("hole in shell 6", shell(0), INCL_A, 6, 2),
    ("hole in shell 26", shell(0), INCL_A, 26, 5),  # the hole voxel + the 4 inner voxels around it
    ("inner pokes out 6", shell(1), INCL_A, 6, 2),  # the poking voxel + the background voxel it touches
    ("foreign label in shell", shell(3), INCL_A, 6, 2),
    ("may_touch suppresses", shell(3), INCL_A_MAY_C, 6, 0),
    ("may_touch suppresses 26", shell(3), INCL_A_MAY_C, 26, 0),
    ("may_touch does not cover background", shell(0), INCL_A_MAY_C, 6, 2),
    ("cut by border: inclusion", border_cut(), INCL_A, 6, 0),
    ("cut by border: inclusion 26", border_cut(), INCL_A, 26, 0),
    ("inner alone fills the image", np.ones((2, 3, 3), np.int64), INCL_A, 26, 0),
    ("empty structures", np.zeros((3, 3, 3), np.int64), EXCL_AB, 26, 0),
    # 2D mode: only in-plane contacts of slices along `axis` count
    ("through-plane contact, 3d", voxels((4, 3, 3), ((1, 1, 1), 1), ((2, 1, 1), 2)), EXCL_AB, 6, 2),
    ("through-plane contact, 2d axis 0", voxels((4, 3, 3), ((1, 1, 1), 1), ((2, 1, 1), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 0}, 6, 0),
    ("through-plane contact, 2d axis 0, 8-conn", voxels((4, 3, 3), ((1, 1, 1), 1), ((2, 1, 1), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 0}, 26, 0),
    ("z-contact in-plane for axis 1", voxels((4, 3, 3), ((1, 1, 1), 1), ((2, 1, 1), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 1}, 6, 2),
    ("in-plane contact, 2d axis 0", voxels((3, 3, 4), ((1, 1, 1), 1), ((1, 1, 2), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 0}, 6, 2),
    ("in-plane diagonal, 4-conn", voxels((3, 4, 4), ((1, 1, 1), 1), ((1, 2, 2), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 0}, 6, 0),
    ("in-plane diagonal, 8-conn", voxels((3, 4, 4), ((1, 1, 1), 1), ((1, 2, 2), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 0}, 26, 2),
    ("yx-diagonal is not in-plane for axis 1", voxels((3, 4, 4), ((1, 1, 1), 1), ((1, 2, 2), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 1}, 26, 0),
    ("zy-diagonal in-plane for axis 2", voxels((4, 4, 3), ((1, 1, 1), 1), ((2, 2, 1), 2)),
     {**EXCL_AB, "mode": "2d", "axis": 2}, 26, 2),
    ("hole in shell, 2d axis 0 (hole along x)", shell(0), {**INCL_A, "mode": "2d", "axis": 0}, 6, 2),
    ("hole in shell, 2d axis 2 (hole through-plane)", shell(0), {**INCL_A, "mode": "2d", "axis": 2}, 6, 0),
    ("hole in shell, 2d axis 0, 8-conn", shell(0), {**INCL_A, "mode": "2d", "axis": 0}, 26, 3),
]


@pytest.mark.parametrize("lm, rule, connectivity, expected", [c[1:] for c in HAND_CASES],
                         ids=[c[0] for c in HAND_CASES])
def test_hand_counted(lm, rule, connectivity, expected):
    assert int(hard_map(lm, rule, connectivity).sum()) == expected


def test_exact_voxels_face_contact():
    m = hard_map(cubes_face_to_face(), EXCL_AB, 6)
    expected = np.zeros_like(m)
    expected[1:3, 1:3, 2:4] = True
    np.testing.assert_array_equal(m, expected)


def test_exact_voxels_hole_in_shell():
    m = hard_map(shell(0), INCL_A, 6)
    assert set(zip(*np.nonzero(m))) == {(2, 2, 1), (2, 2, 2)}


# ---------------------------------------------------------------------------------------------- naive reference
def naive_offsets(connectivity, mode, axis, spatial_dims=3):
    free = list(range(3)) if mode == "3d" else [d for d in range(3) if d != axis]
    if spatial_dims == 2:
        free = [1, 2]
    out = []
    for o in itertools.product((-1, 0, 1), repeat=3):
        if o == (0, 0, 0) or any(o[d] for d in range(3) if d not in free):
            continue
        if connectivity == 6 and sum(map(abs, o)) != 1:
            continue
        out.append(o)
    return out


def naive_rule_map(lm: np.ndarray, rule, connectivity: int) -> np.ndarray:
    """Explicit loops over voxels and neighbour offsets; lm is (Z, Y, X)."""
    offs = naive_offsets(connectivity, rule.mode, rule.axis)
    shape = lm.shape
    lab = lm.tolist()
    out = np.zeros(shape, bool)

    def neighbours(p):
        for o in offs:
            q = (p[0] + o[0], p[1] + o[1], p[2] + o[2])
            if all(0 <= q[d] < shape[d] for d in range(3)):
                yield q

    def val(q):
        return lab[q[0]][q[1]][q[2]]

    for p in itertools.product(*map(range, shape)):
        v = val(p)
        if isinstance(rule, ExclusionRule):
            a, b = rule.a.label_ids, rule.b.label_ids
            out[p] = (v in a and any(val(q) in b for q in neighbours(p))) or \
                     (v in b and any(val(q) in a for q in neighbours(p)))
        else:
            allowed = set(rule.outer.label_ids) | set(rule.may_touch.label_ids if rule.may_touch else ())
            inner = rule.inner.label_ids
            out[p] = (v in inner and any(val(q) not in allowed for q in neighbours(p))) or \
                     (v not in allowed and any(val(q) in inner for q in neighbours(p)))
    return out


NAIVE_RULES = [
    EXCL_AB,
    {"type": "exclusion", "a": ["A", "C"], "b": "B"},
    INCL_A,
    INCL_A_MAY_C,
    {"type": "inclusion", "inner": ["A", "C"], "outer": ["C", "B", "A"]},
]
NAIVE_MODES = [{"mode": "3d"}, {"mode": "2d", "axis": 0}, {"mode": "2d", "axis": 1}, {"mode": "2d", "axis": 2}]


def all_rules_spec(connectivity):
    rules = [{**r, **m} for r in NAIVE_RULES for m in NAIVE_MODES]
    return make_spec(rules, connectivity)


def random_dense(rng, shape=(6, 7, 8)):
    return rng.choice(4, size=shape, p=[0.5, 0.2, 0.2, 0.1]).astype(np.int64)


def random_sparse(rng, shape=(9, 10, 11)):
    """Labels confined to random, overlapping sub-boxes of a random region, so the numpy path really crops."""
    lm = np.zeros(shape, np.int64)
    region_lo = [int(rng.integers(0, n - 4)) for n in shape]
    for label in (1, 2, 3):
        lo = [int(rng.integers(r, r + 3)) for r in region_lo]
        hi = [int(rng.integers(l + 2, min(l + 5, n) + 1)) for l, n in zip(lo, shape)]
        sub = lm[tuple(slice(l, h) for l, h in zip(lo, hi))]
        sub[rng.random(sub.shape) < 0.6] = label
    return lm


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("kind, seed", [("dense", 0), ("dense", 1), ("sparse", 2), ("sparse", 3), ("sparse", 4)])
def test_against_naive_reference(connectivity, kind, seed):
    rng = np.random.default_rng(seed)
    lm = random_dense(rng) if kind == "dense" else random_sparse(rng)
    spec = all_rules_spec(connectivity)
    torch_maps = violation_maps(torch.from_numpy(lm)[None], spec)
    numpy_maps = violation_maps_numpy(lm, spec)
    for rule in spec.rules:
        expected = naive_rule_map(lm, rule, connectivity)
        np.testing.assert_array_equal(torch_maps[rule.name][0].numpy().astype(bool), expected, err_msg=rule.name)
        np.testing.assert_array_equal(numpy_maps[rule.name], expected, err_msg=rule.name)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_2d_inputs_against_naive(connectivity):
    rng = np.random.default_rng(5)
    lm2 = rng.choice(4, size=(2, 7, 8), p=[0.5, 0.2, 0.2, 0.1])  # (B, Y, X)
    spec = make_spec([{**r, "mode": "2d"} for r in NAIVE_RULES], connectivity)
    maps = violation_maps(torch.from_numpy(lm2), spec, spatial_dims=2)
    for rule in spec.rules:
        for b in range(2):
            expected = naive_rule_map(lm2[b][None], rule, connectivity)[0]  # one slice along axis 0
            np.testing.assert_array_equal(maps[rule.name][b].numpy().astype(bool), expected)
            np.testing.assert_array_equal(violation_maps_numpy(lm2[b], spec)[rule.name], expected)


# ---------------------------------------------------------------------------------------------- soft, batch, dtypes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("connectivity", [6, 26])
def test_soft_equals_hard_on_one_hot(device, connectivity):
    rng = np.random.default_rng(7)
    lm = torch.from_numpy(np.stack([random_dense(rng), random_sparse(rng, (6, 7, 8))])).to(device)
    spec = all_rules_spec(connectivity)
    hard = violation_maps(lm, spec)
    for dtype in (torch.float32, torch.float64):
        soft = violation_maps(one_hot(lm, 4, dtype), spec, probabilities=True)
        for name in hard:
            assert soft[name].dtype == dtype
            torch.testing.assert_close(soft[name], hard[name].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_per_sample(device):
    rng = np.random.default_rng(8)
    lm = torch.from_numpy(np.stack([random_dense(rng), random_dense(rng)])).to(device)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(2, 4, 6, 7, 8))).to(device), dim=1)
    spec = all_rules_spec(26)
    for seg, prob in ((lm, False), (probs, True)):
        batch = violation_maps(seg, spec, probabilities=prob)
        for b in range(2):
            single = violation_maps(seg[b:b + 1], spec, probabilities=prob)
            for name in batch:
                torch.testing.assert_close(batch[name][b:b + 1], single[name], rtol=0, atol=0)


def test_output_types_and_ranges():
    rng = np.random.default_rng(9)
    lm = torch.from_numpy(random_dense(rng))[None]
    spec = all_rules_spec(6)
    for name, m in violation_maps(lm.to(torch.uint8), spec).items():
        assert m.dtype == torch.float32 and m.shape == lm.shape
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    probs = torch.softmax(torch.randn(1, 4, 6, 7, 8), dim=1)
    for m in violation_maps(probs, spec, probabilities=True).values():
        assert m.shape == lm.shape and float(m.min()) >= 0 and float(m.max()) <= 1
    assert violation_maps(lm, make_spec([])) == {}


def test_rule_violation_map_and_structure_mask():
    lm = torch.from_numpy(shell(0))[None]
    spec, rule = one_rule(INCL_A)
    assert rule_violation_map(lm, rule, probabilities=False).sum() == 2
    assert rule_violation_map(lm, rule, probabilities=False, connectivity=26).sum() == 5
    p = one_hot(lm, 4)
    assert rule_violation_map(p, rule, probabilities=True, connectivity=26).sum() == 5
    m = structure_mask(lm, spec.structure(["A", "B"]), probabilities=False)
    assert m.dtype == torch.float32 and int(m.sum()) == 4 ** 3 - 1
    torch.testing.assert_close(structure_mask(p, spec.structure(["A", "B"]), probabilities=True), m)
    probs = torch.full((1, 4, 2, 2, 2), 0.4)
    assert float(structure_mask(probs, spec.structure(["A", "B", "C"]), probabilities=True).max()) == 1.0


def test_numpy_crops_and_float_input():
    rng = np.random.default_rng(10)
    lm = random_sparse(rng, (12, 13, 14))
    spec = all_rules_spec(6)
    full = violation_maps_numpy(lm, spec)
    crops = violation_crops_numpy(lm, spec)
    assert list(crops) == list(full) == list(spec.rule_names)
    for name, (box, crop) in crops.items():
        pasted = np.zeros(lm.shape, bool)
        pasted[box] = crop
        np.testing.assert_array_equal(pasted, full[name])
        assert full[name].dtype == bool and full[name].sum() == crop.sum()
    for name, m in violation_maps_numpy(lm.astype(np.float32), spec).items():
        np.testing.assert_array_equal(m, full[name])
    empty = violation_crops_numpy(np.zeros((3, 4, 5), np.uint8), spec)
    for box, crop in empty.values():
        assert crop.size == 0 and all(s == slice(0, 0) for s in box)


# ---------------------------------------------------------------------------------------------- dilate
@pytest.mark.parametrize("shape, connectivity, slice_axis, expected", [
    ((5, 5, 5), 6, None, 7),
    ((5, 5, 5), 26, None, 27),
    ((5, 5, 5), 4, 0, 5),
    ((5, 5, 5), 8, 1, 9),
    ((5, 5), 4, None, 5),
    ((5, 5), 8, None, 9),
])
def test_dilate_counts(shape, connectivity, slice_axis, expected):
    x = torch.zeros((1,) + shape)
    x[(0,) + (2,) * len(shape)] = 1
    for mask in (x, x.bool()):
        d = dilate(mask, connectivity, slice_axis)
        assert d.dtype == mask.dtype and d.shape == mask.shape and int(d.sum()) == expected
    corner = torch.zeros((1,) + shape, dtype=torch.bool)
    corner[(0,) + (0,) * len(shape)] = True
    assert int(dilate(corner, connectivity, slice_axis).sum()) < expected  # zero padding: nothing wraps around


def test_dilate_slice_axis_is_in_plane():
    x = torch.zeros(1, 3, 3, 3, dtype=torch.bool)
    x[0, 1, 1, 1] = True
    d = dilate(x, 8, slice_axis=2)
    assert d[0, :, :, 1].all() and not d[0, :, :, 0].any() and not d[0, :, :, 2].any()


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("rule, connectivity", [
    ({"type": "exclusion", "a": ["A", "C"], "b": "B"}, 6),
    ({"type": "exclusion", "a": "A", "b": "B", "mode": "2d", "axis": 1}, 26),
    (INCL_A_MAY_C, 26),
    ({**INCL_A, "mode": "2d", "axis": 0}, 6),
])
def test_gradcheck(rule, connectivity):
    _, r = one_rule(rule, connectivity)
    g = torch.Generator().manual_seed(0)
    # random values in (0.02, 0.32): no ties of the max operations, region sums stay below the clamp at 1
    p = (0.02 + 0.3 * torch.rand(1, 4, 3, 3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: rule_violation_map(x, r, probabilities=True, connectivity=connectivity), (p,), eps=1e-6, atol=1e-5)


def test_gradients_flow_from_softmax():
    logits = torch.randn(2, 4, 5, 6, 7, requires_grad=True)
    maps = violation_maps(torch.softmax(logits, 1), all_rules_spec(6), probabilities=True)
    sum(m.sum() for m in maps.values()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- ill inputs
SPEC = make_spec([EXCL_AB, {**INCL_A_MAY_C, "mode": "2d", "axis": 0}])
SPEC_3D_ONLY = make_spec([EXCL_AB])
ILL = [
    # (id, callable, exception, message regex)
    ("float label map", lambda: violation_maps(torch.zeros(1, 3, 3, 3), SPEC), TypeError, "integer tensors"),
    ("bool label map", lambda: violation_maps(torch.zeros(1, 3, 3, 3, dtype=torch.bool), SPEC), TypeError,
     "integer tensors"),
    ("int probabilities", lambda: violation_maps(torch.zeros(1, 4, 3, 3, 3, dtype=torch.long), SPEC,
                                                 probabilities=True), TypeError, "floating point"),
    ("no batch dim", lambda: violation_maps(torch.zeros(3, 3, 3, dtype=torch.long), SPEC), ValueError,
     r"\(B, Z, Y, X\).*seg\[None\]"),
    ("label map with channel", lambda: violation_maps(torch.zeros(1, 1, 3, 3, 3, dtype=torch.long), SPEC),
     ValueError, r"\(B, Z, Y, X\)"),
    ("probabilities without channel", lambda: violation_maps(torch.zeros(1, 3, 3, 3), SPEC, probabilities=True),
     ValueError, r"\(B, C, Z, Y, X\)"),
    ("too few channels", lambda: violation_maps(torch.zeros(1, 3, 3, 3, 3), SPEC, probabilities=True),
     ValueError, "label id 3 is out of range.*C=3"),
    ("NaN", lambda: violation_maps(torch.full((1, 4, 2, 2, 2), float("nan")), SPEC, probabilities=True),
     ValueError, "NaN"),
    ("logits", lambda: violation_maps(torch.randn(1, 4, 2, 2, 2) * 5, SPEC, probabilities=True), ValueError,
     "softmax"),
    ("not a tensor", lambda: violation_maps(np.zeros((1, 2, 2, 2), np.int64), SPEC), TypeError, "torch.Tensor"),
    ("3d rule on 2d input", lambda: violation_maps(torch.zeros(1, 3, 3, dtype=torch.long), SPEC_3D_ONLY,
                                                   spatial_dims=2), ValueError, r"mode '3d'.*2 spatial dims"),
    ("spatial_dims", lambda: violation_maps(torch.zeros(1, 3, 3, dtype=torch.long), SPEC, spatial_dims=1),
     ValueError, "spatial_dims must be 2 or 3"),
    ("rule connectivity", lambda: rule_violation_map(torch.zeros(1, 3, 3, 3, dtype=torch.long), SPEC.rules[0],
                                                     probabilities=False, connectivity=4), ValueError, "6 or 26"),
    ("bad axis in hand-built rule", lambda: rule_violation_map(
        torch.zeros(1, 3, 3, 3, dtype=torch.long), ExclusionRule("x", SPEC.rules[0].a, SPEC.rules[0].b, "2d", 3),
        probabilities=False), ValueError, "axis must be 0, 1 or 2"),
    ("bad mode in hand-built rule", lambda: rule_violation_map(
        torch.zeros(1, 3, 3, 3, dtype=torch.long), ExclusionRule("x", SPEC.rules[0].a, SPEC.rules[0].b, "2D", 0),
        probabilities=False), ValueError, "mode must be"),
    ("not a rule", lambda: rule_violation_map(torch.zeros(1, 3, 3, 3, dtype=torch.long), "exclusion",
                                              probabilities=False), TypeError, "ExclusionRule"),
    ("dilate int", lambda: dilate(torch.zeros(1, 3, 3, 3, dtype=torch.long), 6), TypeError, "float or bool"),
    ("dilate 3d with 4", lambda: dilate(torch.zeros(1, 3, 3, 3), 4), ValueError, "slice_axis"),
    ("dilate slice with 6", lambda: dilate(torch.zeros(1, 3, 3, 3), 6, slice_axis=0), ValueError, "4 or 8"),
    ("dilate bad slice axis", lambda: dilate(torch.zeros(1, 3, 3, 3), 4, slice_axis=3), ValueError, "slice_axis"),
    ("dilate 2d with 6", lambda: dilate(torch.zeros(1, 3, 3), 6), ValueError, "4 or 8"),
    ("dilate 2d with slice axis", lambda: dilate(torch.zeros(1, 3, 3), 4, slice_axis=0), ValueError,
     "only meaningful for 3D"),
    ("dilate rank", lambda: dilate(torch.zeros(3, 3), 4), ValueError, r"\(B, Z, Y, X\) or \(B, Y, X\)"),
    ("numpy bool", lambda: violation_maps_numpy(np.zeros((2, 2, 2), bool), SPEC), TypeError, "integer label ids"),
    ("numpy non-integer float", lambda: violation_maps_numpy(np.full((2, 2, 2), 0.5), SPEC), ValueError,
     "non-integer"),
    ("numpy rank", lambda: violation_maps_numpy(np.zeros((1, 2, 2, 2), np.int64), SPEC), ValueError,
     r"\(Z, Y, X\)"),
    ("numpy 3d rule on 2d case", lambda: violation_maps_numpy(np.zeros((2, 2), np.int64), SPEC_3D_ONLY),
     ValueError, "mode '3d'"),
    ("numpy tensor", lambda: violation_maps_numpy(torch.zeros(2, 2, 2), SPEC), TypeError, "numpy array"),
]


@pytest.mark.parametrize("fn, exc, pattern", [c[1:] for c in ILL], ids=[c[0] for c in ILL])
def test_ill_inputs(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_inclusion_rule_object_roundtrip():
    # rules built by hand (not parsed) work too
    spec, r = one_rule(INCL_A_MAY_C)
    rule = InclusionRule("x", r.inner, r.outer, r.may_touch, "3d", 0)
    lm = torch.from_numpy(shell(3))[None]
    assert rule_violation_map(lm, rule, probabilities=False).sum() == 0
