"""Tests of nnunet_topo.violations: hand-counted cases, a naive loop reference, soft == hard, gradients, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnunet_topo.topology_spec import ExclusionRule, InclusionRule, TopologySpec, parse_topology
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


def test_soft_maps_of_a_spec_equal_those_of_single_rules():
    """violation_maps shares masks and dilations between rules; on probabilities the result must not depend on the
    other rules (regression: the dilated forbidden mask of an inclusion with may_touch C was reused for an
    inclusion whose outer region holds C, though max(S_O, S_C) differs from the clamped sum of O ∪ C)."""
    spec = all_rules_spec(26)
    probs = torch.softmax(torch.randn(2, 4, 5, 6, 7, generator=torch.Generator().manual_seed(3)), 1)
    maps = violation_maps(probs, spec, probabilities=True)
    for rule in spec.rules:
        torch.testing.assert_close(maps[rule.name], rule_violation_map(probs, rule, probabilities=True,
                                                                       connectivity=26), rtol=0, atol=0)


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


# ---------------------------------------------------------------------------------------------- exempt end slices
def naive_present_slices(lm: np.ndarray, rule, axis: int) -> list:
    """Per slice along ``axis``: is the rule's structure (inner; A ∪ B) present? ``lm`` is (Z, Y, X) labels."""
    ids = rule.inner.label_ids if isinstance(rule, InclusionRule) else rule.a.label_ids + rule.b.label_ids
    return [bool(np.isin(np.take(lm, i, axis=axis), ids).any()) for i in range(lm.shape[axis])]


def naive_soft_present_slices(probs: np.ndarray, rule, axis: int) -> list:
    """The same for a probability map (C, Z, Y, X): some structure's soft mask (clamped sum) > 0.5 in the slice."""
    structures = [rule.inner] if isinstance(rule, InclusionRule) else [rule.a, rule.b]
    out = []
    for i in range(probs.shape[axis + 1]):
        sl = np.take(probs, i, axis=axis + 1)
        out.append(any(bool((np.minimum(sl[list(s.label_ids)].sum(0), 1.0) > 0.5).any()) for s in structures))
    return out


def naive_exempt(vmap: np.ndarray, present: list, k: int, axis: int) -> np.ndarray:
    """Zero exactly the first k and the last k present slices along ``axis``."""
    idx = [i for i, p in enumerate(present) if p]
    ends = set(idx[:k]) | set(idx[::-1][:k])
    out = vmap.copy()
    for i in ends:
        sl = [slice(None)] * vmap.ndim
        sl[axis] = i
        out[tuple(sl)] = 0
    return out


def random_gappy(rng, shape=(9, 8, 7)):
    """Sparse random labels with gaps: one empty slice per axis and one slice per axis without label 1 (A), so the
    present slices of a structure are not contiguous."""
    lm = random_sparse(rng, shape)
    for axis, n in enumerate(shape):
        sl = [slice(None)] * 3
        sl[axis] = int(rng.integers(2, n - 2))
        lm[tuple(sl)] = 0
        sl[axis] = int(rng.integers(1, n - 1))
        sub = lm[tuple(sl)]
        sub[sub == 1] = 0
    return lm


EXEMPT_RULES = [dict(r, mode="2d", axis=axis, exempt_end_slices=k, name=f"{i} axis {axis} k {k}")
                for i, r in enumerate(NAIVE_RULES) for axis in (0, 1, 2) for k in (1, 2)]


def plain(rule):
    """The same rule without the exemption."""
    import dataclasses
    return dataclasses.replace(rule, exempt_end_slices=0)


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("seed", [20, 21, 22])
def test_exempt_end_slices_against_naive_reference(connectivity, seed):
    rng = np.random.default_rng(seed)
    lms = np.stack([random_gappy(rng), random_gappy(rng)])  # a batch: the ends are per item
    spec = make_spec(EXEMPT_RULES, connectivity)
    torch_maps = violation_maps(torch.from_numpy(lms), spec)
    exempted_somewhere = violated_elsewhere = 0
    for b in range(2):
        lm = lms[b]
        numpy_maps = violation_maps_numpy(lm, spec)
        crops = violation_crops_numpy(lm, spec)
        for rule in spec.rules:
            full = naive_rule_map(lm, rule, connectivity)
            expected = naive_exempt(full, naive_present_slices(lm, rule, rule.axis), rule.exempt_end_slices, rule.axis)
            exempted_somewhere += int(full.sum() > expected.sum())
            violated_elsewhere += int(expected.any())
            np.testing.assert_array_equal(torch_maps[rule.name][b].numpy().astype(bool), expected, err_msg=rule.name)
            np.testing.assert_array_equal(numpy_maps[rule.name], expected, err_msg=rule.name)
            box, crop = crops[rule.name]
            pasted = np.zeros(lm.shape, bool)
            if crop.size:
                pasted[box] = crop
            np.testing.assert_array_equal(pasted, expected, err_msg=rule.name)
            single = rule_violation_map(torch.from_numpy(lm)[None], rule, probabilities=False,
                                        connectivity=connectivity)
            np.testing.assert_array_equal(single[0].numpy().astype(bool), expected, err_msg=rule.name)
    assert exempted_somewhere > 5 and violated_elsewhere > 5  # the cases test both sides


@pytest.mark.parametrize("connectivity", [6, 26])
def test_exempt_end_slices_on_probabilities(connectivity):
    rng = np.random.default_rng(23)
    lms = np.stack([random_gappy(rng), random_gappy(rng)])
    spec = make_spec(EXEMPT_RULES, connectivity)
    # near one-hot with noise: some structure voxels fall below 0.5, some slices hold a structure only softly
    logits = 3.0 * one_hot(torch.from_numpy(lms), 4, torch.float64) + torch.from_numpy(
        rng.normal(scale=1.5, size=(2, 4) + lms.shape[1:]))
    probs = torch.softmax(logits, 1).requires_grad_()
    maps = violation_maps(probs, spec, probabilities=True)
    p_np = probs.detach().numpy()
    differs = 0
    for rule in spec.rules:
        unexempted = rule_violation_map(probs, plain(rule), probabilities=True, connectivity=connectivity)
        expected = np.stack([naive_exempt(unexempted[b].detach().numpy(),
                                          naive_soft_present_slices(p_np[b], rule, rule.axis),
                                          rule.exempt_end_slices, rule.axis) for b in range(2)])
        np.testing.assert_array_equal(maps[rule.name].detach().numpy(), expected, err_msg=rule.name)
        differs += int(not np.array_equal(expected, unexempted.detach().numpy()))
        # the checked mask is a constant: the gradient is the one of the unexempted map restricted to checked slices
        keep = torch.from_numpy((expected != 0) | (unexempted.detach().numpy() == 0))
        weights = torch.from_numpy(rng.random(lms.shape))
        (g,) = torch.autograd.grad((maps[rule.name] * weights).sum(), probs, retain_graph=True)
        (g_ref,) = torch.autograd.grad((unexempted * weights * keep).sum(), probs, retain_graph=True)
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert differs > 10
    # on one-hot probabilities the soft maps equal the hard ones
    hard = violation_maps(torch.from_numpy(lms), spec)
    soft = violation_maps(one_hot(torch.from_numpy(lms), 4), spec, probabilities=True)
    for name in hard:
        torch.testing.assert_close(soft[name], hard[name], rtol=0, atol=0)


def basal_stack(axis=0, defect_slice=1):
    """A 'short-axis stack' along ``axis``: A (cavity) inside a B ring on slices 1..5, C (other cavity) beside it;
    in ``defect_slice`` A opens to the background (inclusion violated) and touches C (exclusion violated)."""
    lm = np.zeros((7, 9, 12), np.int64)
    lm[1:6, 1:8, 1:8] = 2
    lm[1:6, 3:6, 3:6] = 1
    lm[1:6, 2:7, 9:11] = 3
    lm[defect_slice, 4, 1:3] = 1   # through the ring to the background at x = 0
    lm[defect_slice, 4, 6:9] = 1   # through the ring to C at x = 9
    return np.moveaxis(lm, 0, axis)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_exempt_end_slices_keeps_middle_violations(axis):
    rules = [{"type": "inclusion", "inner": "A", "outer": ["A", "B"], "mode": "2d", "axis": axis},
             {"type": "exclusion", "a": "A", "b": "C", "mode": "2d", "axis": axis}]
    names = [f"inclusion(A in A+B) [2d axis {axis}]", f"exclusion(A,C) [2d axis {axis}]"]
    for defect, k, reported in [(1, 0, True), (1, 1, False), (5, 1, False), (3, 1, True), (2, 1, True),
                                (2, 2, False), (4, 2, False), (3, 2, True)]:
        lm = basal_stack(axis, defect)
        spec = make_spec([dict(r, exempt_end_slices=k) for r in rules]) if k else make_spec(rules)
        for maps in (violation_maps_numpy(lm, spec),
                     {n: m[0].numpy() for n, m in violation_maps(torch.from_numpy(lm)[None], spec).items()}):
            for name in names:
                assert bool(maps[name].any()) == reported, (defect, k, name)
                if reported:
                    other = tuple(d for d in range(3) if d != axis)
                    assert np.nonzero(maps[name].any(axis=other))[0].tolist() == [defect]


def test_exempt_end_slices_crop_holds_the_whole_structures():
    """An exclusion's crop is (box(A)+1) ∩ (box(B)+1); with exempt end slices the end slices must be those of the
    whole array, also where A lies outside that crop in plane (here: in slices 0 and 1)."""
    lm = np.zeros((7, 12, 12), np.int64)
    lm[0:2, 0, 0] = 1          # A far from B: outside the crop of (box(A)+1) ∩ (box(B)+1) in plane
    lm[2:6, 8:10, 6:8] = 1     # A beside B
    lm[2:5, 8:10, 8:10] = 2    # B touches A in slices 2, 3, 4
    lm[6, 0, 0] = 1
    spec = make_spec([{**EXCL_AB, "mode": "2d", "axis": 0, "exempt_end_slices": 1}])
    name = spec.rule_names[0]
    expected = naive_exempt(naive_rule_map(lm, spec.rules[0], 6), naive_present_slices(lm, spec.rules[0], 0), 1, 0)
    assert expected[2].any() and expected[4].any()  # A is present in slices 0..6: slice 2 is no end slice
    np.testing.assert_array_equal(violation_maps_numpy(lm, spec)[name], expected)
    box, crop = violation_crops_numpy(lm, spec)[name]
    assert box[0] == slice(0, 7) and box[1].start == 0  # the crop holds every voxel of A and B
    np.testing.assert_array_equal(crop, expected[box])
    np.testing.assert_array_equal(violation_maps(torch.from_numpy(lm)[None], spec)[name][0].numpy().astype(bool),
                                  expected)


def test_exempt_end_slices_ill_rules():
    spec, r = one_rule({**EXCL_AB, "mode": "2d", "exempt_end_slices": 1})
    lm3 = torch.zeros(1, 3, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="has exempt_end_slices=1, which needs the slice stack"):
        violation_maps(torch.zeros(1, 3, 3, dtype=torch.long), spec, spatial_dims=2)
    with pytest.raises(ValueError, match="has exempt_end_slices=1, which needs the slice stack"):
        violation_maps_numpy(np.zeros((3, 3), np.int64), spec)
    import dataclasses
    with pytest.raises(ValueError, match="exempt_end_slices=1 needs mode '2d'"):
        rule_violation_map(lm3, dataclasses.replace(r, mode="3d"), probabilities=False)
    with pytest.raises(ValueError, match="exempt_end_slices must be an integer >= 0"):
        rule_violation_map(lm3, dataclasses.replace(r, exempt_end_slices=-1), probabilities=False)
