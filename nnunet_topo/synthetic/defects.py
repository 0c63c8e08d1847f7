"""Planted defects: a valid reference label map changed in a known way (septal hole, bridge, wall hole, extra
component), with the exact metric changes the change causes, for tests of the metrics, the violation maps and the
repair.

The changes are measured with the project's own code: Betti numbers and component counts of
:mod:`nnunet_topo.metrics.topology` (DESIGN §5), violation maps of :func:`nnunet_topo.violations.violation_maps_numpy`
(DESIGN §4), rule names of :mod:`nnunet_topo.topology_spec`; ``tests/test_synthetic.py`` checks them with independent
implementations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunet_topo.metrics.topology import betti_error, betti_numbers_2d, betti_numbers_3d
from nnunet_topo.topology_spec import TopologySpec
from nnunet_topo.synthetic.presets import SeedLike, as_generator
from nnunet_topo.synthetic.reference import resolve_topology, topology_spec
from nnunet_topo.violations import violation_maps_numpy

#: the 26-neighbourhood: violations of a septal defect must lie next to its patch
_S26 = ndimage.generate_binary_structure(3, 3)

DEFECT_KINDS: Tuple[str, ...] = ("septal_hole", "bridge", "wall_hole", "extra_component")


@dataclass
class PlantedDefect:
    """A defect planted by :func:`plant_defect`, with the metric changes it causes.

    Attributes:
        kind: ``"septal_hole"``, ``"bridge"``, ``"wall_hole"`` or ``"extra_component"``.
        structure: the label name whose voxels were added (``septal_hole`` -> LV, ``bridge`` -> RV,
            ``extra_component`` -> the blob's label) or removed (``wall_hole`` -> MYO).
        mask: bool ``(Z, Y, X)``, the voxels whose label changed.
        slices: sorted indices along axis 0 of the slices that contain changed voxels.
        expected: the metric values of the defective label map that differ from the reference's (the
            reference satisfies every rule and prior, see :func:`nnunet_topo.synthetic.reference.check_reference`).
            Keys:

            * ``"betti_3d"``: label name -> new ``(b0, b1, b2)`` (foreground 26-, background 6-connected),
              only labels whose 3D Betti numbers changed;
            * ``"betti_2d_slices"``: label name -> {slice index along axis 0 -> new ``(b0, b1)``} (foreground
              8-, background 4-connected), only (label, slice) pairs that changed;
            * ``"cce_3d"``: label name -> ``|b0(new) - b0(ref)|`` where nonzero;
            * ``"betti_error_3d"``: label name -> ``sum_k |b_k(new) - b_k(ref)|`` where nonzero;
            * ``"violated_rules"``: names (as :func:`nnunet_topo.topology_spec.parse_topology` gives them) of the
              rules the new label map violates, in rule order;
            * ``"violation_slices"``: rule name -> slice indices (axis 0) that contain violating voxels;
            * ``"violation_voxels"``: rule name -> number of violating voxels (DESIGN §4 definition).
    """

    kind: str
    structure: str
    mask: np.ndarray
    slices: Tuple[int, ...]
    expected: Dict[str, Any]


def _require(labels: Mapping[str, int], names: Sequence[str], kind: str) -> None:
    missing = [n for n in names if n not in labels]
    if missing:
        raise ValueError(f"defect {kind!r} needs the labels {list(names)}; missing {missing} "
                         f"(labels given: {sorted(labels)})")


def _septal_candidates(label: np.ndarray, labels: Mapping[str, int], rng: np.random.Generator
                       ) -> List[np.ndarray]:
    """Patches of septal MYO between LV and RV (in-plane, one slice each): the MYO voxels in a disk around the
    midpoint of a closest LV-RV pair of the slice."""
    lv = label == labels["LV"]
    rv = label == labels["RV"]
    myo = label == labels["MYO"]
    out: List[np.ndarray] = []
    slices = [z for z in range(label.shape[0]) if lv[z].any() and rv[z].any()]
    rng.shuffle(slices)
    for z in slices:
        dist, idx = ndimage.distance_transform_edt(~rv[z], return_indices=True)
        d_lv = np.where(lv[z], dist, np.inf)
        dmin = d_lv.min()
        if not np.isfinite(dmin) or dmin > 4.0:
            continue
        cand = np.argwhere(d_lv <= dmin + 1e-6)
        for a in cand[rng.permutation(len(cand))[:4]]:
            b = idx[:, a[0], a[1]]
            mid = (a + b) / 2.0
            rad = float(np.linalg.norm(a - b)) / 2.0 + 0.75
            yy, xx = np.mgrid[0:label.shape[1], 0:label.shape[2]]
            disk = (yy - mid[0]) ** 2 + (xx - mid[1]) ** 2 <= rad ** 2
            m = np.zeros(label.shape, bool)
            m[z] = disk & myo[z]
            if m.any():
                out.append(m)
    return out


def _wall_hole_candidates(label: np.ndarray, labels: Mapping[str, int], rng: np.random.Generator
                          ) -> List[np.ndarray]:
    """Straight cuts through the MYO ring of one slice, from the LV to background (never to another label)."""
    lv = label == labels["LV"]
    myo = label == labels["MYO"]
    Z, Y, X = label.shape
    slices = [z for z in range(Z) if lv[z].any() and betti_numbers_2d(myo[z])[1] >= 1]
    rng.shuffle(slices)
    out: List[np.ndarray] = []
    for z in slices:
        cy, cx = (int(round(v)) for v in ndimage.center_of_mass(lv[z]))
        if not lv[z, cy, cx]:
            continue
        dirs = [(0, 1), (0, -1), (1, 0), (-1, 0)]
        rng.shuffle(dirs)
        width = int(rng.integers(1, 3))
        for dy, dx in dirs:
            m = np.zeros(label.shape, bool)
            ok = True
            for off in range(width):
                oy, ox = (cy + off * dx, cx + off * dy)  # offset perpendicular to the direction
                y, x = oy, ox
                if not (0 <= y < Y and 0 <= x < X) or not lv[z, y, x]:
                    ok = False
                    break
                while 0 <= y < Y and 0 <= x < X and lv[z, y, x]:
                    y, x = y + dy, x + dx
                run = []
                while 0 <= y < Y and 0 <= x < X and myo[z, y, x]:
                    run.append((y, x))
                    y, x = y + dy, x + dx
                if not run or not (0 <= y < Y and 0 <= x < X) or label[z, y, x] != 0:
                    ok = False
                    break
                for yy, xx in run:
                    m[z, yy, xx] = True
            if ok and m.any():
                out.append(m)
    return out


def _blob_candidates(label: np.ndarray, rng: np.random.Generator) -> List[np.ndarray]:
    """A 1x3x3 blob in background with no foreground within +-1 slice and +-3 voxels in-plane of it."""
    Z, Y, X = label.shape
    forbidden = ndimage.binary_dilation(label != 0, np.ones((3, 7, 7), bool))
    free = ~ndimage.binary_dilation(forbidden, np.ones((1, 3, 3), bool))  # blob centres whose blob is free
    free[:, :2] = free[:, -2:] = False  # keep the blob off the array border
    free[:, :, :2] = free[:, :, -2:] = False
    if Z > 2:
        free[0] = free[-1] = False
    pts = np.argwhere(free)
    out: List[np.ndarray] = []
    for i in rng.permutation(len(pts))[:5]:
        z, y, x = pts[i]
        m = np.zeros(label.shape, bool)
        m[z, y - 1:y + 2, x - 1:x + 2] = True
        out.append(m)
    return out


def _effects(before: np.ndarray, after: np.ndarray, labels: Mapping[str, int], spec: TopologySpec) -> Dict[str, Any]:
    """``PlantedDefect.expected`` of the change ``before`` -> ``after`` under ``spec``'s rules."""
    exp: Dict[str, Any] = {"betti_3d": {}, "betti_2d_slices": {}, "cce_3d": {}, "betti_error_3d": {},
                           "violated_rules": [], "violation_slices": {}, "violation_voxels": {}}
    for name, i in labels.items():
        if i == 0:
            continue
        mb, ma = before == i, after == i
        if np.array_equal(mb, ma):
            continue
        b3, a3 = betti_numbers_3d(mb), betti_numbers_3d(ma)
        if a3 != b3:
            exp["betti_3d"][name] = a3
            exp["betti_error_3d"][name] = betti_error(a3, b3)
            if a3[0] != b3[0]:
                exp["cce_3d"][name] = abs(a3[0] - b3[0])
        changed = {}
        for z in np.flatnonzero((mb != ma).any(axis=(1, 2))):
            bb, ab = betti_numbers_2d(mb[z]), betti_numbers_2d(ma[z])
            if ab != bb:
                changed[int(z)] = ab
        if changed:
            exp["betti_2d_slices"][name] = changed
    for n, v in violation_maps_numpy(after, spec).items():
        if v.any():
            exp["violated_rules"].append(n)
            exp["violation_slices"][n] = tuple(int(z) for z in np.flatnonzero(v.any(axis=(1, 2))))
            exp["violation_voxels"][n] = int(v.sum())
    return exp


def plant_defect(label: np.ndarray, kind: str, labels: Mapping[str, int], rng: SeedLike, *,
                 structure: Optional[str] = None, topology: Optional[Mapping[str, Any]] = None
                 ) -> Tuple[np.ndarray, PlantedDefect]:
    """Plant a defect with known effect into a (valid) reference label map.

    Kinds:

    * ``"septal_hole"``: a small in-plane patch of septal MYO between LV and RV (one slice) becomes LV, so the
      LV touches the RV (``exclusion(LV,RV)`` is violated next to the patch; the LV then also touches a
      non-MYO label, so the LV-in-LV+MYO inclusion is violated there too).
    * ``"bridge"``: the same patch becomes RV.
    * ``"wall_hole"``: a straight 1–2 voxel wide cut through the MYO ring of one slice, from the LV to the
      background, is set to background: the LV touches the background in-plane, the slice's MYO goes from
      ``(1, 1)`` to ``(1, 0)`` and the LV-in-LV+MYO inclusion is violated on that slice. In 3D, a cut between
      two intact wall slices is a window in the wall: MYO's b1 grows by one.
    * ``"extra_component"``: a 1x3x3 blob of ``structure`` (default: a random foreground label) in background,
      at least 3 voxels in-plane and one slice away from any foreground: that label's b0 grows by one
      (CCE 3D = 1). An LV blob also violates the LV inclusion (it touches background).

    The exact new metric values are in ``PlantedDefect.expected`` (computed on the new map with
    :mod:`nnunet_topo.metrics.topology` and :mod:`nnunet_topo.violations`; the tests check them with independent
    implementations).

    Args:
        label: integer ``(Z, Y, X)`` reference label map (not modified).
        kind: one of :data:`DEFECT_KINDS`.
        labels: name -> id; needs ``LV``, ``MYO``, ``RV`` (except ``extra_component``).
        rng: int seed or numpy Generator (picks the location).
        structure: label of the extra component (``extra_component`` only).
        topology: the ``topology`` block whose rules are evaluated (default: the preset whose labels match).

    Returns:
        ``(new_label, defect)``; ``new_label`` has ``label``'s dtype.

    Raises:
        ValueError: unknown kind/structure, missing labels, or no place for the defect in this label map.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; valid kinds: {', '.join(DEFECT_KINDS)}")
    label = np.asarray(label)
    if label.ndim != 3 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer array (Z, Y, X), got {label.dtype} {label.shape}")
    labels = dict(labels)
    topo = resolve_topology(labels, topology)
    gen = as_generator(rng)
    if kind in ("septal_hole", "bridge", "wall_hole"):
        _require(labels, ("LV", "MYO", "RV"), kind)
    fg_names = [n for n, i in labels.items() if i != 0]
    if kind == "extra_component":
        if structure is None:
            structure = str(gen.choice(fg_names))
        elif structure not in fg_names:
            raise ValueError(f"unknown structure {structure!r} for an extra component; choose one of {fg_names}")
    elif structure is not None:
        raise ValueError(f"structure= is only used by 'extra_component', not by {kind!r}")
    spec = topology_spec(labels, topo)

    target = {"septal_hole": "LV", "bridge": "RV", "wall_hole": None, "extra_component": structure}[kind]
    if kind in ("septal_hole", "bridge"):
        candidates = _septal_candidates(label, labels, gen)
    elif kind == "wall_hole":
        candidates = _wall_hole_candidates(label, labels, gen)
    else:
        candidates = _blob_candidates(label, gen)

    septum = None
    if kind in ("septal_hole", "bridge"):  # the LV-RV exclusion, whether or not the topology block has it
        septum = topology_spec(labels, {"connectivity": spec.connectivity,
                                        "rules": [{"type": "exclusion", "a": "LV", "b": "RV"}]})
    for mask in candidates:
        new = label.copy()
        new[mask] = 0 if target is None else labels[target]
        exp = _effects(label, new, labels, spec)
        near = ndimage.binary_dilation(mask, _S26)
        if kind in ("septal_hole", "bridge"):
            ((exc_lv_rv, v),) = violation_maps_numpy(new, septum).items()
            if exc_lv_rv not in exp["violated_rules"] or (v & ~near).any():
                continue
        elif kind == "wall_hole":
            z = int(np.flatnonzero(mask.any(axis=(1, 2)))[0])
            before = betti_numbers_2d(label[z] == labels["MYO"])
            after = exp["betti_2d_slices"].get("MYO", {}).get(z)
            if after != (before[0], before[1] - 1) or not exp["violated_rules"]:
                continue
        else:
            b = betti_numbers_3d(label == labels[structure])
            if exp["betti_3d"].get(structure) != (b[0] + 1, b[1], b[2]):
                continue
        slices = tuple(int(z) for z in np.flatnonzero(mask.any(axis=(1, 2))))
        struct = {"septal_hole": "LV", "bridge": "RV", "wall_hole": "MYO"}.get(kind, structure)
        return new, PlantedDefect(kind=kind, structure=str(struct), mask=mask, slices=slices, expected=exp)
    raise ValueError(f"found no place for a {kind!r} defect in this label map (it needs "
                     + {"septal_hole": "LV and RV within 4 voxels in-plane",
                        "bridge": "LV and RV within 4 voxels in-plane",
                        "wall_hole": "a slice where the MYO ring separates the LV from background",
                        "extra_component": "free background away from all structures"}[kind] + ")")
