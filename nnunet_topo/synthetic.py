"""Synthetic multi-chamber heart phantoms, written as nnU-Net v2 raw datasets (DESIGN §9).

Two presets (see ``documentation/synthetic_data.md`` for the geometry, the intensity model and the
topology each preset guarantees):

* ``"acdc"`` — short-axis cine-MRI-like stacks, labels ``background 0, RV 1, MYO 2, LV 3`` (ACDC's order),
  anisotropic spacing (6–10 mm between slices, 1.3–1.8 mm in-plane). The LV is a tapered elliptic cylinder
  along Z, the MYO a ring around it on every LV slice (free wall 2–3 voxels, septum 1–2 voxels), the RV a
  crescent wrapped around the septal side.
* ``"wholeheart"`` — CT-like, near-isotropic (0.9–1.5 mm), labels ``background 0, LV 1, MYO 2, RV 3, LA 4,
  RA 5, AO 6``: an ellipsoidal LV cavity in a MYO shell that opens only into the LA (mitral) and the AO
  (aortic), the RV crescent beside a thin septum, LA/RA above the ventricles, the AO a tube leaving the LV.

Geometry is built in two steps so that thin walls can never alias away: the *cavities* are rasterised
from smooth implicit shapes (ellipses/ellipsoids/a capsule, randomly deformed by a low-frequency
displacement field, rotated, scaled and placed), and every wall is then made by *discrete* morphology
on the voxel grid (the MYO is a dilation of the LV; the RV is kept out of the ``t``-fold 6-connected
dilation of the LV, so the septum is exactly ``t`` voxels at its thinnest). Every phantom checks its own
reference against the rules and Betti priors of its ``topology`` block (:func:`check_reference`) and is
redrawn if a check fails.

:func:`plant_defect` plants known defects (septal hole, bridge, wall hole, extra component) into a
reference and returns the metric changes they cause, for tests of the metrics and violation maps.

Array conventions (``documentation/architecture.md``): arrays are ``(Z, Y, X)`` as SimpleITK returns
them; ``spacing`` is in the same order, in mm. ``origin`` and ``direction`` follow SimpleITK's own
convention (physical ``(x, y, z)`` order; ``direction`` is the row-major 3x3 matrix whose *columns* are
the directions of the index axes i, j, k = X, Y, Z) — the same split nnU-Net's ``SimpleITKIO`` uses.

This module does not import nnU-Net; SimpleITK is used only to write images.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "PRESETS",
    "Preset",
    "Phantom",
    "PlantedDefect",
    "DEFECT_KINDS",
    "make_phantom",
    "embed_phantom",
    "topology_block",
    "labels_for",
    "rule_name",
    "check_reference",
    "plant_defect",
    "save_phantom",
    "write_dataset",
]

Shape3 = Tuple[int, int, int]
SeedLike = Union[int, np.random.Generator]

#: marker written into dataset.json; ``write_dataset(..., overwrite=True)`` only replaces folders carrying it
_MARKER_KEY = "nnunet_topo_synthetic"
#: how many fresh random draws :func:`make_phantom` tries before it gives up
_MAX_ATTEMPTS = 8


# ================================================================================================ presets
@dataclass(frozen=True)
class Preset:
    """Static description of a phantom preset.

    Attributes:
        name: preset key (``"acdc"`` or ``"wholeheart"``).
        labels: nnU-Net ``labels`` (name -> id, background 0).
        channel_name: nnU-Net ``channel_names["0"]`` (``"MRI"`` or ``"CT"``); decides nnU-Net's normalisation.
        default_shape: default array shape ``(Z, Y, X)`` in voxels.
        min_shape: smallest supported shape ``(Z, Y, X)``.
        spacing_range: ``(low, high)`` in mm per axis ``(Z, Y, X)``; Y and X are always equal.
        dataset_name: default dataset name (``Dataset{ID:03d}_{name}``).
        case_prefix: prefix of case identifiers (``{prefix}_{index:03d}``).
        description: one line for dataset.json.
    """

    name: str
    labels: Dict[str, int]
    channel_name: str
    default_shape: Shape3
    min_shape: Shape3
    spacing_range: Tuple[Tuple[float, float], Tuple[float, float], Tuple[float, float]]
    dataset_name: str
    case_prefix: str
    description: str


PRESETS: Dict[str, Preset] = {
    "acdc": Preset(
        name="acdc",
        labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3},
        channel_name="MRI",
        default_shape=(10, 64, 64),
        min_shape=(6, 32, 32),
        spacing_range=((6.0, 10.0), (1.3, 1.8), (1.3, 1.8)),
        dataset_name="SynthACDC",
        case_prefix="acdc",
        description="Synthetic short-axis cine-MRI-like heart phantoms (ACDC label order: RV, MYO, LV)",
    ),
    "wholeheart": Preset(
        name="wholeheart",
        labels={"background": 0, "LV": 1, "MYO": 2, "RV": 3, "LA": 4, "RA": 5, "AO": 6},
        channel_name="CT",
        default_shape=(48, 64, 64),
        min_shape=(32, 40, 40),
        spacing_range=((0.9, 1.5), (0.9, 1.4), (0.9, 1.4)),
        dataset_name="SynthWholeHeart",
        case_prefix="heart",
        description="Synthetic whole-heart CT-like phantoms (LV, MYO, RV, LA, RA, AO)",
    ),
}

_TOPOLOGY: Dict[str, Dict[str, Any]] = {
    "acdc": {
        "connectivity": 6,
        "rules": [
            {"type": "exclusion", "a": "LV", "b": "RV"},
            {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "mode": "2d", "axis": 0},
        ],
        # MYO is a stack of rings open at base and apex: a thick tube, one tunnel -> (1, 1, 0)
        "betti": {"LV": [1, 0, 0], "MYO": [1, 1, 0], "RV": [1, 0, 0]},
        "betti_2d": {"axis": 0, "LV": [1, 0], "MYO": [1, 1]},
        "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]},
        # the RV touches the MYO (no voxel rule between them can hold) but its mesh must not enter the LV
        # epicardial mesh; the LV cavity's mesh lies inside it (both hold on every reference by construction:
        # disjoint label sets, resp. LV a subset of LV+MYO)
        "mesh_rules": [
            {"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]},
            {"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"},
        ],
    },
    "wholeheart": {
        "connectivity": 6,
        "rules": [
            {"type": "exclusion", "a": "LV", "b": "RV"},
            {"type": "exclusion", "a": "LA", "b": "RA"},
            {"type": "exclusion", "a": "LV", "b": "RA"},
            {"type": "exclusion", "a": "RV", "b": "LA"},
            {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": ["LA", "AO"]},
        ],
        # MYO is a shell around the LV with two separate openings (mitral, aortic): one tunnel -> (1, 1, 0)
        "betti": {"LV": [1, 0, 0], "MYO": [1, 1, 0], "RV": [1, 0, 0], "LA": [1, 0, 0], "RA": [1, 0, 0],
                  "AO": [1, 0, 0]},
        "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"], "LA": ["LA"],
                            "RA": ["RA"], "AO": ["AO"]},
        "mesh_rules": [
            {"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]},
            {"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"},
        ],
    },
}


def _check_preset(preset: Any) -> Preset:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown phantom preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]


def labels_for(preset: str) -> Dict[str, int]:
    """nnU-Net ``labels`` of a preset (a fresh dict, name -> id, background 0)."""
    return dict(_check_preset(preset).labels)


def topology_block(preset: str) -> Dict[str, Any]:
    """The ``topology`` block a preset writes into dataset.json (a fresh deep copy; JSON-serialisable).

    See ``documentation/topology_spec.md`` for the keys and ``documentation/synthetic_data.md`` for why these
    rules and priors hold on every phantom of the preset.
    """
    _check_preset(preset)
    return copy.deepcopy(_TOPOLOGY[preset])


# ================================================================================================ data classes
@dataclass
class Phantom:
    """One synthetic case.

    Attributes:
        image: float32 array ``(Z, Y, X)``; MRI arbitrary units (``acdc``) or Hounsfield-like units
            (``wholeheart``).
        label: uint8 array ``(Z, Y, X)`` of label ids (see :attr:`labels`).
        spacing: voxel size in mm, array order ``(Z, Y, X)``.
        origin: physical position of voxel ``[0, 0, 0]`` in mm, SimpleITK order ``(x, y, z)``.
        direction: 9 floats, row-major 3x3, SimpleITK convention (columns = directions of index axes X, Y, Z).
        preset: preset name.
        labels: label name -> id.
        params: the random geometry/intensity parameters that were drawn (for inspection and docs).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    preset: str = ""
    labels: Dict[str, int] = field(default_factory=dict)
    params: Dict[str, Any] = field(default_factory=dict)


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
            reference satisfies every rule and prior, see :func:`check_reference`). Keys:

            * ``"betti_3d"``: label name -> new ``(b0, b1, b2)`` (foreground 26-, background 6-connected),
              only labels whose 3D Betti numbers changed;
            * ``"betti_2d_slices"``: label name -> {slice index along axis 0 -> new ``(b0, b1)``} (foreground
              8-, background 4-connected), only (label, slice) pairs that changed;
            * ``"cce_3d"``: label name -> ``|b0(new) - b0(ref)|`` where nonzero;
            * ``"betti_error_3d"``: label name -> ``sum_k |b_k(new) - b_k(ref)|`` where nonzero;
            * ``"violated_rules"``: names (``rules.py`` convention, see :func:`rule_name`) of the rules the
              new label map violates, in rule order;
            * ``"violation_slices"``: rule name -> slice indices (axis 0) that contain violating voxels;
            * ``"violation_voxels"``: rule name -> number of violating voxels (DESIGN §4 definition).
    """

    kind: str
    structure: str
    mask: np.ndarray
    slices: Tuple[int, ...]
    expected: Dict[str, Any]


# ================================================================================================ rule helpers
def _names(x: Union[str, Sequence[str]]) -> List[str]:
    return [x] if isinstance(x, str) else [str(n) for n in x]


def rule_name(rule: Mapping[str, Any]) -> str:
    """Name of a rule dict, in the convention of :mod:`nnunet_topo.rules`.

    ``exclusion(LV,RV)``, ``inclusion(LV in LV+MYO)``, ``inclusion(LV in LV+MYO | may_touch LA+AO)``; label
    lists are joined with ``"+"``; a rule with ``"mode": "2d"`` gets the suffix `` [2d axis k]``; an explicit
    ``"name"`` wins.
    """
    if "name" in rule:
        return str(rule["name"])
    if rule["type"] == "exclusion":
        name = f"exclusion({'+'.join(_names(rule['a']))},{'+'.join(_names(rule['b']))})"
    elif rule["type"] == "inclusion":
        name = f"inclusion({'+'.join(_names(rule['inner']))} in {'+'.join(_names(rule['outer']))}"
        if rule.get("may_touch"):
            name += f" | may_touch {'+'.join(_names(rule['may_touch']))}"
        name += ")"
    else:
        raise ValueError(f"unknown rule type {rule['type']!r}; expected 'exclusion' or 'inclusion'")
    if rule.get("mode", "3d") == "2d":
        name += f" [2d axis {int(rule.get('axis', 0))}]"
    return name


def _kernel(connectivity: int, mode: str = "3d", axis: int = 0) -> np.ndarray:
    """3x3x3 structuring element: 6/26-neighbourhood, or its in-plane 4/8 part for 2d rules."""
    k = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    if mode == "2d":
        keep = np.zeros((3, 3, 3), dtype=bool)
        idx = [slice(None)] * 3
        idx[axis] = 1
        keep[tuple(idx)] = True
        k = k & keep
    return k


def _region(label: np.ndarray, names: Sequence[str], labels: Mapping[str, int]) -> np.ndarray:
    return np.isin(label, [labels[n] for n in names])


def _rule_violation(label: np.ndarray, rule: Mapping[str, Any], labels: Mapping[str, int],
                    connectivity: int = 6) -> np.ndarray:
    """Violating voxels of one rule (DESIGN §4; zero padding outside the array; ``exempt_end_slices`` honoured),
    bool ``(Z, Y, X)``."""
    return _without_end_slices(_rule_contacts(label, rule, labels, connectivity), label, rule, labels)


def _rule_contacts(label: np.ndarray, rule: Mapping[str, Any], labels: Mapping[str, int],
                   connectivity: int = 6) -> np.ndarray:
    k = _kernel(connectivity, rule.get("mode", "3d"), int(rule.get("axis", 0)))
    if rule["type"] == "exclusion":
        a = _region(label, _names(rule["a"]), labels)
        b = _region(label, _names(rule["b"]), labels)
        return (a & ndimage.binary_dilation(b, k)) | (b & ndimage.binary_dilation(a, k))
    inner = _region(label, _names(rule["inner"]), labels)
    allowed = _region(label, _names(rule["outer"]) + _names(rule.get("may_touch", [])), labels)
    outside = ~allowed
    return (inner & ndimage.binary_dilation(outside, k)) | (ndimage.binary_dilation(inner, k) & outside)


def _without_end_slices(v: np.ndarray, label: np.ndarray, rule: Mapping[str, Any],
                        labels: Mapping[str, int]) -> np.ndarray:
    """``v`` with the rule's ``exempt_end_slices`` (2d rules) cleared: the first and last k slices along its axis
    in which its structures (inner; a and b) are present (same meaning as :mod:`nnunet_topo.violations`)."""
    k = int(rule.get("exempt_end_slices", 0))
    if not k or rule.get("mode", "3d") != "2d":
        return v
    axis = int(rule.get("axis", 0))
    names = _names(rule["inner"]) if rule["type"] == "inclusion" else _names(rule["a"]) + _names(rule["b"])
    present = np.flatnonzero(_region(label, names, labels).any(axis=tuple(d for d in range(3) if d != axis)))
    idx = [slice(None)] * 3
    idx[axis] = np.concatenate([present[:k], present[-k:]]).astype(np.intp)
    v = v.copy()
    v[tuple(idx)] = False
    return v


# ================================================================================================ topology helpers
_S6 = ndimage.generate_binary_structure(3, 1)
_S26 = ndimage.generate_binary_structure(3, 3)
_S4_2D = ndimage.generate_binary_structure(2, 1)
_S8_2D = ndimage.generate_binary_structure(2, 2)


def _euler_closed_cubes(m: np.ndarray) -> int:
    """Euler characteristic V - E + F - C of the union of closed unit cubes of a bool ``(Z, Y, X)`` array."""
    p = np.pad(m, 1)
    c = int(m.sum())
    # faces normal to axis a: shared by the 2 voxels on either side along a
    f = int((p[1:] | p[:-1])[:, 1:-1, 1:-1].sum() + (p[:, 1:] | p[:, :-1])[1:-1, :, 1:-1].sum()
            + (p[:, :, 1:] | p[:, :, :-1])[1:-1, 1:-1, :].sum())
    # edges parallel to axis a: shared by the 4 voxels around it in the other two axes
    q01 = p[1:, 1:] | p[1:, :-1] | p[:-1, 1:] | p[:-1, :-1]  # around edges parallel to axis 2
    q02 = p[1:, :, 1:] | p[1:, :, :-1] | p[:-1, :, 1:] | p[:-1, :, :-1]  # parallel to axis 1
    q12 = p[:, 1:, 1:] | p[:, 1:, :-1] | p[:, :-1, 1:] | p[:, :-1, :-1]  # parallel to axis 0
    e = int(q01[:, :, 1:-1].sum() + q02[:, 1:-1, :].sum() + q12[1:-1, :, :].sum())
    v = int((q01[:, :, 1:] | q01[:, :, :-1]).sum())
    return v - e + f - c


def _betti_3d(mask: np.ndarray) -> Tuple[int, int, int]:
    """(b0, b1, b2) of a 3D mask: foreground 26-, background 6-connected; outside the array is background."""
    if not mask.any():
        return (0, 0, 0)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    m = np.pad(mask[box], 1)
    _, b0 = ndimage.label(m, _S26)
    _, nbg = ndimage.label(~m, _S6)
    b2 = nbg - 1
    b1 = b0 + b2 - _euler_closed_cubes(m)
    return (int(b0), int(b1), int(b2))


def _betti_2d(mask2d: np.ndarray) -> Tuple[int, int]:
    """(b0, b1) of a 2D mask: foreground 8-, background 4-connected; outside the array is background."""
    if not mask2d.any():
        return (0, 0)
    m = np.pad(mask2d, 1)
    _, b0 = ndimage.label(m, _S8_2D)
    _, nbg = ndimage.label(~m, _S4_2D)
    return (int(b0), int(nbg - 1))


def _betti_2d_slices(mask: np.ndarray) -> List[Tuple[int, int]]:
    return [_betti_2d(mask[z]) for z in range(mask.shape[0])]


def _resolve_topology(labels: Mapping[str, int], topology: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if topology is not None:
        return dict(topology)
    for name, p in PRESETS.items():
        if dict(labels) == p.labels:
            return topology_block(name)
    raise ValueError(
        f"labels {dict(labels)} match no preset ({', '.join(sorted(PRESETS))}); pass topology=<the dataset.json "
        "'topology' block> so the rules are known")


def check_reference(label: np.ndarray, preset: str, topology: Optional[Mapping[str, Any]] = None,
                    labels: Optional[Mapping[str, int]] = None) -> List[str]:
    """Check a reference label map against a topology block; return the problems (empty list: all good).

    Checks: only known label ids; every labelled structure present; no voxel of any rule's violation map;
    3D Betti numbers equal the ``betti`` priors; on every slice along the ``betti_2d`` axis where a
    structure is present its 2D Betti numbers equal the ``betti_2d`` prior (one of its vectors, for an allowed
    set); no foreground on the array border (so nothing is cut by the field of view).

    Args:
        label: integer ``(Z, Y, X)`` label map.
        preset: preset whose labels/topology are used unless given explicitly.
        topology: a ``topology`` block (default: the preset's, :func:`topology_block`).
        labels: name -> id (default: the preset's).

    Returns:
        One human-readable line per problem.
    """
    labels = dict(labels) if labels is not None else labels_for(preset)
    topo = dict(topology) if topology is not None else topology_block(preset)
    conn = int(topo.get("connectivity", 6))
    problems: List[str] = []
    unknown = sorted(set(np.unique(label).tolist()) - set(labels.values()))
    if unknown:
        problems.append(f"unknown label ids {unknown}")
    for name, i in labels.items():
        if i != 0 and not (label == i).any():
            problems.append(f"{name} is absent")
    for rule in topo.get("rules", []):
        n = int(_rule_violation(label, rule, labels, conn).sum())
        if n:
            problems.append(f"{rule_name(rule)}: {n} violating voxels")
    for name, prior in topo.get("betti", {}).items():
        b = _betti_3d(_region(label, _names(name), labels))
        if list(b) != list(prior):
            problems.append(f"3D Betti numbers of {name} are {b}, prior {tuple(prior)}")
    b2d = dict(topo.get("betti_2d", {}))
    axis = int(b2d.pop("axis", 0))
    for name, prior in b2d.items():
        # one vector [b0, b1] or an allowed set [[b0, b1], ...]: a slice must match one of them
        allowed = [tuple(v) for v in prior] if prior and isinstance(prior[0], (list, tuple)) else [tuple(prior)]
        m = np.moveaxis(_region(label, _names(name), labels), axis, 0)
        bad = [(z, b) for z, b in enumerate(_betti_2d_slices(m)) if b != (0, 0) and tuple(b) not in allowed]
        if bad:
            shown = " or ".join(str(v) for v in allowed)
            problems.append(f"2D Betti numbers of {name} differ from the prior {shown} on slices "
                            f"{[z for z, _ in bad]} (axis {axis}): {[b for _, b in bad]}")
    fg = label != 0
    border = fg[[0, -1]].any() or fg[:, [0, -1]].any() or fg[:, :, [0, -1]].any()
    if border:
        problems.append("foreground touches the array border")
    return problems


# ============================================================================================== small geometry helpers
def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")


def _disk(radius: float) -> np.ndarray:
    """In-plane disk structuring element of shape ``(1, 2r+1, 2r+1)``."""
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy ** 2 + xx ** 2 <= radius ** 2 + 1e-9)[None]


def _ball(radius: float) -> np.ndarray:
    r = int(math.floor(radius))
    zz, yy, xx = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return zz ** 2 + yy ** 2 + xx ** 2 <= radius ** 2 + 1e-9


_CROSS_2D = ndimage.generate_binary_structure(2, 1)[None]  # (1, 3, 3) in-plane 4-neighbourhood


def _dilate(mask: np.ndarray, structure: np.ndarray, iterations: int = 1) -> np.ndarray:
    if iterations <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure, iterations=iterations)


def _largest_component(mask: np.ndarray, structure: np.ndarray = _S6) -> np.ndarray:
    lab, n = ndimage.label(mask, structure)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def _smooth_noise(rng: np.random.Generator, shape: Shape3, sigma: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise ``(Z, Y, X)``."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (n - n.mean()) / (n.std() + 1e-8)


def _fourier_field(rng: np.random.Generator, coords: Sequence[np.ndarray], fmax: Sequence[float],
                   amplitude: float, n_modes: int = 3) -> np.ndarray:
    """A smooth random scalar field: sum of ``n_modes`` plane waves, ``|field| <= amplitude``.

    Args:
        coords: broadcastable coordinate arrays (one per dimension).
        fmax: largest frequency (cycles per coordinate unit) per dimension.
        amplitude: bound of the field.
    """
    out = 0.0
    for _ in range(n_modes):
        phase = rng.uniform(0, 2 * math.pi)
        arg = phase
        for c, f in zip(coords, fmax):
            arg = arg + 2 * math.pi * rng.uniform(-f, f) * c
        out = out + (amplitude / n_modes) * rng.uniform(0.5, 1.0) * np.sin(arg)
    return out


def _rotation(axis: Sequence[float], angle: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit ``axis`` by ``angle`` radians."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator, min_angle_deg: float = 10.0) -> np.ndarray:
    """A uniformly random proper rotation, at least ``min_angle_deg`` away from the identity."""
    while True:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        angle = math.degrees(math.acos(np.clip((np.trace(q) - 1) / 2, -1, 1)))
        if angle >= min_angle_deg:
            return q


def _place(lo: np.ndarray, hi: np.ndarray, lower: np.ndarray, upper: np.ndarray,
           rng: np.random.Generator) -> Optional[np.ndarray]:
    """A random centre so that ``[centre + lo, centre + hi]`` lies in ``[lower, upper]`` (None if impossible)."""
    low = lower - lo
    high = upper - hi
    if np.any(high < low):
        return None
    return rng.uniform(low, high)


# ================================================================================================ acdc
def _acdc_geometry(rng: np.random.Generator, shape: Shape3) -> Tuple[np.ndarray, Dict[str, Any]]:
    Z, Y, X = shape
    lab = PRESETS["acdc"].labels
    n_inplane = min(Y, X)
    w_wall = int(rng.integers(2, 4))  # free wall 2-3 voxels
    t_sep = int(rng.integers(1, 3))  # septum 1-2 voxels at its thinnest
    theta = rng.uniform(0, 2 * math.pi)  # septal direction (LV -> RV) in the (Y, X) plane
    ecc = rng.uniform(0.0, 0.12)
    taper = rng.uniform(0.45, 0.6)  # apex radius / base radius
    power = rng.uniform(1.5, 2.5)  # radius profile r(t) = r0 (1 - (1 - taper) t^p), t = 0 base .. 1 apex
    dfac, afac, bfac = rng.uniform(0.7, 0.9), rng.uniform(1.0, 1.25), rng.uniform(1.5, 1.9)
    r0 = n_inplane * rng.uniform(0.11, 0.14)

    z_base = 1
    n_lv = Z - 2 - (int(rng.integers(0, 2)) if Z >= 8 else 0)
    n_rv = int(min(n_lv, max(2, round(n_lv * rng.uniform(0.6, 0.85)))))
    drift = rng.uniform(-0.35, 0.35, size=2)  # LV centre drift per slice (long-axis tilt), voxels

    e = np.array([math.cos(theta), math.sin(theta)])  # septal axis u in (y, x)
    eperp = np.array([-math.sin(theta), math.cos(theta)])  # v
    centre = None
    for _ in range(30):  # shrink until the heart fits
        amp = 0.15 * r0
        u_lo, u_hi = -(r0 * (1 + ecc) + w_wall + 1), r0 * (dfac + afac) + 1
        v_ext = max(r0 * bfac, r0 * (1 + ecc) + w_wall + 1)
        corners = np.array([u * e + v * eperp for u in (u_lo, u_hi) for v in (-v_ext, v_ext)])
        dz = drift * (n_lv - 1)
        lo = corners.min(0) + np.minimum(dz, 0)
        hi = corners.max(0) + np.maximum(dz, 0)
        margin = 1.5 + amp
        centre = _place(lo, hi, np.full(2, margin), np.array([Y - 1, X - 1], float) - margin, rng)
        if centre is not None:
            break
        r0 *= 0.93
    if centre is None:
        raise RuntimeError(f"acdc phantom does not fit into shape {shape}")
    if r0 < 3.0:
        raise RuntimeError(f"shape {shape} is too small for an acdc phantom (LV radius {r0:.1f} < 3 voxels)")

    zi = np.arange(Z, dtype=float)[:, None, None]
    yi = np.arange(Y, dtype=float)[None, :, None]
    xi = np.arange(X, dtype=float)[None, None, :]
    wl = 1.0 / (3.0 * r0)  # displacement wavelength >= 3 r0
    fz = 0.04
    dy = _fourier_field(rng, (zi, yi, xi), (fz, wl, wl), 0.15 * r0)
    dx = _fourier_field(rng, (zi, yi, xi), (fz, wl, wl), 0.15 * r0)

    k = zi - z_base  # LV slice index (0 at the base)
    in_lv = (k >= 0) & (k < n_lv)
    t = np.clip(k / max(n_lv - 1, 1), 0, 1)
    r = np.maximum(r0 * (1 - (1 - taper) * t ** power), 2.0)
    cy = centre[0] + drift[0] * k
    cx = centre[1] + drift[1] * k
    py = yi + dy - cy
    px = xi + dx - cx
    u = py * e[0] + px * e[1]
    v = py * eperp[0] + px * eperp[1]
    lv = in_lv & ((u / (r * (1 + ecc))) ** 2 + (v / (r * (1 - ecc))) ** 2 <= 1.0)

    # RV crescent candidate: an ellipse on the septal side that overlaps the LV, so that after removing the
    # LV neighbourhood it wraps around the septum; it shrinks (lam) towards its apical end.
    in_rv = (k >= 0) & (k < n_rv)
    half = max((n_rv - 1) / 2.0, 1.0)
    lam = 1.0 - 0.2 * np.clip((k - half) / half, 0, 1)
    rvc = in_rv & (((u - dfac * r) / (afac * r * lam)) ** 2 + (v / (bfac * r * lam)) ** 2 <= 1.0)

    # Walls by discrete morphology. The RV stays out of the t_sep-fold in-plane 4-dilation of the LV (a septum
    # of exactly t_sep voxels at its thinnest) and out of the 4-dilated LV of the neighbouring slices (3D
    # 6-exclusion). The MYO of a slice also covers the 4-dilated LV of its neighbours, so consecutive MYO rings
    # overlap (face to face) in a closed ring around both LV cross-sections: the stack is one tube, b1 = 1,
    # with no extra tunnels where the LV tapers. The septum stays thin where the LV does not taper (the base).
    lv_nb = np.zeros_like(lv)
    lv_nb[:-1] |= lv[1:]
    lv_nb[1:] |= lv[:-1]
    lv_nb = _dilate(lv_nb, _CROSS_2D)
    rv = rvc & ~_dilate(lv, _CROSS_2D, t_sep) & ~lv_nb
    rv = _largest_component(rv, _S6)
    myo = (_dilate(lv, _disk(w_wall)) | (lv_nb & in_lv)) & ~lv & ~rv
    # in-plane pockets enclosed by the MYO other than the LV (single RV voxels at the crescent tips) -> MYO
    for z in np.flatnonzero(lv.any(axis=(1, 2))):
        comp, _ = ndimage.label(np.pad(~myo[z], 1, constant_values=True), _S4_2D)
        keep = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1], comp[1:-1, 1:-1][lv[z]]]))
        pocket = ((comp > 0) & ~np.isin(comp, keep))[1:-1, 1:-1]
        myo[z] |= pocket
        rv[z] &= ~pocket
    # drop MYO bits cut off from the ring by the RV (they would be extra 2D components)
    lab2d = np.zeros_like(myo)
    for z in range(Z):
        if myo[z].any():
            comp, n = ndimage.label(myo[z], _S8_2D)
            touching = np.unique(comp[_dilate(lv[z][None], _CROSS_2D)[0] & myo[z]])
            lab2d[z] = np.isin(comp, touching[touching > 0])
    myo = lab2d

    label = np.zeros(shape, dtype=np.uint8)
    label[myo] = lab["MYO"]
    label[rv] = lab["RV"]
    label[lv] = lab["LV"]
    params = dict(w_wall=w_wall, t_sep=t_sep, theta_rad=theta, r0_vox=float(r0), taper=taper, ecc=ecc,
                  lv_slices=(z_base, z_base + n_lv - 1), rv_slices=(z_base, z_base + n_rv - 1))
    return label, params


# ================================================================================================ wholeheart
# canonical layout in units of the LV short radius R; u: LV -> RV (septal axis), v: anterior, w: apex -> base
_WH_LAYOUT = {
    "LV": dict(c=(0.0, 0.0, 0.0), s=(1.0, 0.92, 1.55)),
    "LA": dict(c=(-0.25, -0.4, 1.75), s=(0.72, 0.6, 0.72)),
    "RV": dict(c=(1.0, 0.15, 0.05), s=(1.1, 1.25, 1.2)),
    "RA": dict(c=(1.35, -0.35, 1.8), s=(0.68, 0.6, 0.7)),
    "AO": dict(p0=(0.35, 0.4, 0.8), d=(0.15, 0.45, 1.0), w_end=2.1, r=0.27),
}
_WH_BOX = np.array([[-1.05, 2.15], [-1.15, 1.45], [-1.6, 2.4]])  # canonical bounding box (u, v, w), units of R


def _ellipsoid(q: Sequence[np.ndarray], c: Sequence[float], s: Sequence[float]) -> np.ndarray:
    return sum(((qi - ci) / si) ** 2 for qi, ci, si in zip(q, c, s)) <= 1.0


def _capsule(q: Sequence[np.ndarray], p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    d = p1 - p0
    t = sum((qi - p0[i]) * d[i] for i, qi in enumerate(q)) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return sum((qi - (p0[i] + t * d[i])) ** 2 for i, qi in enumerate(q)) <= radius ** 2


def _wholeheart_geometry(rng: np.random.Generator, shape: Shape3,
                         spacing: Tuple[float, float, float]) -> Tuple[np.ndarray, Dict[str, Any]]:
    Z, Y, X = shape
    lab = PRESETS["wholeheart"].labels
    sp = np.asarray(spacing, float)

    # orientation: spin about the long axis, then tilt the long axis away from +Z (array axis 0)
    spin = rng.uniform(0, 2 * math.pi)
    tilt = math.radians(rng.uniform(0, 20))
    az = rng.uniform(0, 2 * math.pi)
    m0 = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # columns u, v, w in (z, y, x)
    rot = _rotation((0.0, math.cos(az), math.sin(az)), tilt) @ _rotation((1.0, 0.0, 0.0), spin) @ m0

    jit = {k: rng.uniform(0.92, 1.08, size=3) for k in ("LV", "LA", "RV", "RA")}
    deform_amp = 0.07
    corners = np.array([[a, b, c] for a in _WH_BOX[0] for b in _WH_BOX[1] for c in _WH_BOX[2]])
    ext = corners @ rot.T  # (8, 3) physical offsets per unit R, mm
    size_mm = (np.asarray(shape) - 1) * sp
    margin_mm = 4.0 * sp  # the MYO wall (<= 3 voxels) + 1 voxel of background
    r_fit = np.min((size_mm - 2 * margin_mm) / ((ext.max(0) - ext.min(0)) * (1 + deform_amp)))
    if r_fit <= 0:
        raise RuntimeError(f"shape {shape} is too small for a wholeheart phantom")
    R = r_fit * rng.uniform(0.9, 1.0)  # mm
    r_vox = R / sp.mean()
    if r_vox < 3.5:
        raise RuntimeError(f"shape {shape} is too small for a wholeheart phantom (LV radius {r_vox:.1f} voxels)")
    w_wall = 3 if (r_vox >= 6.0 and rng.uniform() < 0.5) else 2
    t_sep = int(rng.integers(1, 3))
    lo = ext.min(0) * R * (1 + deform_amp)
    hi = ext.max(0) * R * (1 + deform_amp)
    centre = _place(lo, hi, margin_mm, size_mm - margin_mm, rng)
    if centre is None:  # cannot happen given r_fit, kept as a guard
        raise RuntimeError(f"wholeheart phantom does not fit into shape {shape}")

    pz = (np.arange(Z) * sp[0] - centre[0])[:, None, None]
    py = (np.arange(Y) * sp[1] - centre[1])[None, :, None]
    px = (np.arange(X) * sp[2] - centre[2])[None, None, :]
    q = [(rot[0, i] * pz + rot[1, i] * py + rot[2, i] * px) / R for i in range(3)]  # canonical coords (R)
    fmax = (1 / 3.0, 1 / 3.0, 1 / 3.0)
    q = [qi + _fourier_field(rng, q, fmax, deform_amp) for qi in q]

    def ell(key: str) -> np.ndarray:
        spec = _WH_LAYOUT[key]
        return _ellipsoid(q, spec["c"], np.asarray(spec["s"]) * jit[key])

    ao = _WH_LAYOUT["AO"]
    p0 = np.asarray(ao["p0"], float)
    d = np.asarray(ao["d"], float)
    d = d / d[2]
    p1 = p0 + d * (ao["w_end"] - p0[2])
    ao_r = max(ao["r"] * rng.uniform(0.9, 1.1), 1.6 * sp.max() / R)

    lv = ell("LV")
    aor = _capsule(q, p0, p1, ao_r)
    ball2 = _ball(2)
    # LA keeps 2 voxels from the AO, so the mitral and aortic openings of the MYO shell are separate
    la = ell("LA") & ~lv & ~_dilate(aor, ball2)
    ao_m = aor & ~lv
    # RV and RA keep out of the 26-neighbourhood of the LV (then t_sep - 1 more 6-steps for the RV): a MYO
    # layer that is only 6-thick around corners would add spurious tunnels to the MYO
    lv_26 = _dilate(lv, _S26)
    rv = ell("RV") & ~_dilate(lv_26, _S6, t_sep - 1) & ~_dilate(la, _S6) & ~ao_m
    rv = _largest_component(rv)
    ra = ell("RA") & ~lv_26 & ~_dilate(la, _S6, 2) & ~ao_m & ~rv
    ra = _largest_component(ra)
    myo = _dilate(lv, _ball(w_wall)) & ~lv & ~la & ~ao_m & ~rv & ~ra
    # Let the RV grow (geodesically, w_wall steps) into the MYO it may occupy: this removes thin MYO arches
    # left over the cavity where its ellipsoid grazes the wall (each arch is a spurious MYO tunnel). (The same
    # for the RA made more RA tunnels than it removed MYO ones; the self-check redraws those rare cases.)
    rv_ok = myo & ~_dilate(lv_26, _S6, t_sep - 1) & ~_dilate(la, _S6)
    for _ in range(w_wall):
        rv |= _dilate(rv, _S6) & rv_ok
    myo &= ~rv
    # keep only the MYO components that touch the LV
    comp, n = ndimage.label(myo, _S26)
    touching = np.unique(comp[_dilate(lv, _S6) & myo])
    myo = np.isin(comp, touching[touching > 0])

    label = np.zeros(shape, dtype=np.uint8)
    label[myo] = lab["MYO"]
    label[ra] = lab["RA"]
    label[rv] = lab["RV"]
    label[la] = lab["LA"]
    label[ao_m] = lab["AO"]
    label[lv] = lab["LV"]
    params = dict(w_wall=w_wall, t_sep=t_sep, R_mm=float(R), R_vox=float(r_vox), tilt_deg=math.degrees(tilt),
                  spin_rad=spin, axes_zyx=rot.tolist())
    return label, params


# ================================================================================================ intensities
def _acdc_image(rng: np.random.Generator, label: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
    """bSSFP-like intensities (arbitrary units): bright blood, dark myocardium, textured body, air outside."""
    Z, Y, X = label.shape
    lab = PRESETS["acdc"].labels
    zi = np.arange(Z)[:, None, None]
    yi = np.arange(Y)[None, :, None]
    xi = np.arange(X)[None, None, :]
    # body: a large ellipse, tissue texture and blobs (lung dark, fat bright, liver grey)
    by, bx = rng.uniform(0.42, 0.55) * Y, rng.uniform(0.42, 0.55) * X
    body = ((yi - Y / 2 + rng.uniform(-2, 2)) / by) ** 2 + ((xi - X / 2 + rng.uniform(-2, 2)) / bx) ** 2 <= 1
    tissue = 0.32 + 0.08 * _smooth_noise(rng, label.shape, (0.7, 4.0, 4.0))
    for _ in range(int(rng.integers(5, 10))):
        c = rng.uniform([0, 0, 0], [Z, Y, X])
        rr = rng.uniform([1.0, 3.0, 3.0], [3.0, 0.25 * Y, 0.25 * X])
        val = rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.6, 0.85), rng.uniform(0.35, 0.5)])
        blob = ((zi - c[0]) / rr[0]) ** 2 + ((yi - c[1]) / rr[1]) ** 2 + ((xi - c[2]) / rr[2]) ** 2 <= 1
        tissue = np.where(blob, val, tissue)
    # the body always contains the heart with a margin of tissue
    heart = ndimage.distance_transform_edt(~(label != 0).any(axis=0)) <= 0.1 * min(Y, X)
    img = np.where(np.broadcast_to(body | heart[None], label.shape), tissue, 0.02)
    blood = rng.uniform(0.85, 1.0)
    vals = {"LV": blood, "RV": blood * rng.uniform(0.9, 1.0), "MYO": rng.uniform(0.22, 0.32)}
    for name, val in vals.items():
        img = np.where(label == lab[name], val, img)
    blur = (rng.uniform(0.2, 0.4), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9))
    img = ndimage.gaussian_filter(img, blur)
    bias_amp = rng.uniform(0.1, 0.2)
    img = img * np.exp(bias_amp * _smooth_noise(rng, label.shape, (Z / 2, Y / 3, X / 3)))
    noise = rng.uniform(0.03, 0.06)
    scale = rng.uniform(300, 800)
    img = (img + rng.normal(0, noise, label.shape)) * scale
    return img.astype(np.float32), dict(blood=blood, myo=vals["MYO"], blur_vox=blur, bias_amp=bias_amp,
                                        noise_rel=noise, scale=scale)


def _ct_image(rng: np.random.Generator, label: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Contrast-CT-like intensities in HU: enhanced left heart, less enhanced right heart, textured chest."""
    Z, Y, X = label.shape
    lab = PRESETS["wholeheart"].labels
    zi = np.arange(Z)[:, None, None]
    yi = np.arange(Y)[None, :, None]
    xi = np.arange(X)[None, None, :]
    img = 40.0 + 35.0 * _smooth_noise(rng, label.shape, (4.0, 4.0, 4.0))
    for _ in range(int(rng.integers(6, 12))):
        c = rng.uniform([0, 0, 0], [Z, Y, X])
        rr = rng.uniform(3.0, 0.3 * min(Z, Y, X), size=3)
        val = rng.choice([rng.uniform(-850, -600), rng.uniform(-120, -60), rng.uniform(20, 80)])
        blob = ((zi - c[0]) / rr[0]) ** 2 + ((yi - c[1]) / rr[1]) ** 2 + ((xi - c[2]) / rr[2]) ** 2 <= 1
        img = np.where(blob, val, img)
    left = rng.uniform(280, 420)
    right = left * rng.uniform(0.7, 0.95)
    vals = {"LV": left, "LA": left * rng.uniform(0.92, 1.0), "AO": left * rng.uniform(0.97, 1.05),
            "RV": right, "RA": right * rng.uniform(0.95, 1.05), "MYO": rng.uniform(90, 140)}
    for name, val in vals.items():
        img = np.where(label == lab[name], val, img)
    blur = float(rng.uniform(0.5, 0.9))
    img = ndimage.gaussian_filter(img, blur)
    bias_amp = rng.uniform(0.02, 0.05)
    img = (img + 1000.0) * np.exp(bias_amp * _smooth_noise(rng, label.shape, (Z / 3, Y / 3, X / 3))) - 1000.0
    noise = rng.uniform(12, 30)
    img = img + rng.normal(0, noise, label.shape)
    return img.astype(np.float32), dict(blood_left=left, blood_right=right, myo=vals["MYO"], blur_vox=blur,
                                        bias_amp=bias_amp, noise_hu=noise)


# ================================================================================================ make_phantom
def _check_shape(preset: Preset, shape: Optional[Sequence[int]]) -> Shape3:
    if shape is None:
        return preset.default_shape
    try:
        s = tuple(int(v) for v in shape)
        ok = len(s) == 3 and all(isinstance(v, Integral) and not isinstance(v, bool) for v in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"shape must be three integers (Z, Y, X), got {shape!r}")
    if any(a < b for a, b in zip(s, preset.min_shape)):
        raise ValueError(f"shape {s} is too small for the {preset.name!r} preset; the minimum is "
                         f"{preset.min_shape} (Z, Y, X), the default {preset.default_shape}")
    return s  # type: ignore[return-value]


def make_phantom(preset: str, seed: SeedLike, shape: Optional[Sequence[int]] = None, *,
                 oblique: bool = False) -> Phantom:
    """Draw one synthetic heart phantom (image + reference label map).

    Deterministic for an int ``seed``; with a ``Generator`` it consumes that generator. The reference is
    checked against the preset's rules and priors (:func:`check_reference`); a failing draw is replaced by a
    new one (a few times) before giving up.

    Args:
        preset: ``"acdc"`` or ``"wholeheart"`` (see :data:`PRESETS`).
        seed: int seed or numpy Generator.
        shape: ``(Z, Y, X)`` in voxels (default: the preset's ``default_shape``; at least ``min_shape``).
        oblique: if True, ``direction`` is a random rotation (at least 10 degrees from the identity) instead
            of the identity. The arrays are the same; only the image-to-patient transform changes.

    Returns:
        A :class:`Phantom`: image float32 ``(Z, Y, X)``, label uint8 ``(Z, Y, X)``, spacing ``(Z, Y, X)`` mm,
        origin ``(x, y, z)`` mm and direction (SimpleITK convention).

    Raises:
        ValueError: unknown preset or bad shape.
        RuntimeError: no valid phantom after several draws (should not happen at supported sizes).
    """
    p = _check_preset(preset)
    shp = _check_shape(p, shape)
    rng = _rng(seed)
    problems: List[str] = []
    for attempt in range(_MAX_ATTEMPTS):
        (zlo, zhi), (ylo, yhi), _ = p.spacing_range
        s_in = float(np.round(rng.uniform(ylo, yhi), 3))
        if p.name == "acdc":
            spacing = (float(np.round(rng.uniform(zlo, zhi), 3)), s_in, s_in)
        else:
            spacing = (float(np.round(np.clip(s_in * rng.uniform(0.9, 1.15), zlo, zhi), 3)), s_in, s_in)
        if p.name == "acdc":
            label, params = _acdc_geometry(rng, shp)
        else:
            label, params = _wholeheart_geometry(rng, shp, spacing)
        problems = check_reference(label, p.name)
        if not problems:
            break
    else:
        raise RuntimeError(f"could not draw a valid {preset!r} phantom of shape {shp} in {_MAX_ATTEMPTS} "
                           f"attempts; last problems: {problems}")
    if p.name == "acdc":
        image, iparams = _acdc_image(rng, label)
    else:
        image, iparams = _ct_image(rng, label)
    size_mm = np.asarray(shp[::-1], float) * np.asarray(spacing[::-1])  # (x, y, z)
    origin = tuple(float(v) for v in np.round(-size_mm / 2 + rng.uniform(-20, 20, 3), 3))
    direction = tuple(np.eye(3).ravel().tolist())
    if oblique:
        direction = tuple(float(v) for v in _random_rotation(rng).ravel())
    params = dict(params, attempts=attempt + 1, **iparams)
    return Phantom(image=image, label=label, spacing=spacing, origin=origin,  # type: ignore[arg-type]
                   direction=direction, preset=p.name, labels=dict(p.labels), params=params)


# ================================================================================================ defects
DEFECT_KINDS: Tuple[str, ...] = ("septal_hole", "bridge", "wall_hole", "extra_component")


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
    slices = [z for z in range(Z) if lv[z].any() and _betti_2d(myo[z])[1] >= 1]
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


def _effects(before: np.ndarray, after: np.ndarray, labels: Mapping[str, int],
             topology: Mapping[str, Any]) -> Dict[str, Any]:
    conn = int(topology.get("connectivity", 6))
    exp: Dict[str, Any] = {"betti_3d": {}, "betti_2d_slices": {}, "cce_3d": {}, "betti_error_3d": {},
                           "violated_rules": [], "violation_slices": {}, "violation_voxels": {}}
    for name, i in labels.items():
        if i == 0:
            continue
        mb, ma = before == i, after == i
        if np.array_equal(mb, ma):
            continue
        b3, a3 = _betti_3d(mb), _betti_3d(ma)
        if a3 != b3:
            exp["betti_3d"][name] = a3
            exp["betti_error_3d"][name] = sum(abs(x - y) for x, y in zip(a3, b3))
            if a3[0] != b3[0]:
                exp["cce_3d"][name] = abs(a3[0] - b3[0])
        changed = {}
        for z in np.flatnonzero((mb != ma).any(axis=(1, 2))):
            bb, ab = _betti_2d(mb[z]), _betti_2d(ma[z])
            if ab != bb:
                changed[int(z)] = ab
        if changed:
            exp["betti_2d_slices"][name] = changed
    for rule in topology.get("rules", []):
        v = _rule_violation(after, rule, labels, conn)
        if v.any():
            n = rule_name(rule)
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

    The exact new metric values are in ``PlantedDefect.expected`` (computed on the new map with this
    module's own topology code; the tests check them with independent implementations).

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
    topo = _resolve_topology(labels, topology)
    gen = _rng(rng)
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

    target = {"septal_hole": "LV", "bridge": "RV", "wall_hole": None, "extra_component": structure}[kind]
    if kind in ("septal_hole", "bridge"):
        candidates = _septal_candidates(label, labels, gen)
    elif kind == "wall_hole":
        candidates = _wall_hole_candidates(label, labels, gen)
    else:
        candidates = _blob_candidates(label, gen)

    exc_lv_rv = rule_name({"type": "exclusion", "a": "LV", "b": "RV"})
    for mask in candidates:
        new = label.copy()
        new[mask] = 0 if target is None else labels[target]
        exp = _effects(label, new, labels, topo)
        near = ndimage.binary_dilation(mask, _S26)
        if kind in ("septal_hole", "bridge"):
            v = _rule_violation(new, {"type": "exclusion", "a": "LV", "b": "RV"}, labels,
                                int(topo.get("connectivity", 6)))
            if exc_lv_rv not in exp["violated_rules"] or (v & ~near).any():
                continue
        elif kind == "wall_hole":
            z = int(np.flatnonzero(mask.any(axis=(1, 2)))[0])
            before = _betti_2d(label[z] == labels["MYO"])
            after = exp["betti_2d_slices"].get("MYO", {}).get(z)
            if after != (before[0], before[1] - 1) or not exp["violated_rules"]:
                continue
        else:
            b = _betti_3d(label == labels[structure])
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


# ================================================================================================ writing
def _sitk_image(array: np.ndarray, ph: Phantom):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in ph.spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in ph.origin))
    img.SetDirection(tuple(float(d) for d in ph.direction))
    return img


def save_phantom(ph: Phantom, image_path: Union[str, os.PathLike], label_path: Union[str, os.PathLike]) -> None:
    """Write a phantom's image (float32) and label (uint8) with its spacing, origin and direction."""
    import SimpleITK as sitk

    sitk.WriteImage(_sitk_image(ph.image, ph), os.fspath(image_path), useCompression=True)
    sitk.WriteImage(_sitk_image(ph.label.astype(np.uint8), ph), os.fspath(label_path), useCompression=True)


def _json_dumps(obj: Any, indent: int = 0) -> str:
    """JSON with 2-space indentation, but lists of scalars on one line (readable topology blocks)."""
    pad, pad2 = " " * indent, " " * (indent + 2)
    flat = isinstance(obj, dict) and all(
        not isinstance(v, (dict, list, tuple)) or (isinstance(v, (list, tuple))
                                                   and not any(isinstance(x, (dict, list, tuple)) for x in v))
        for v in obj.values())
    if flat and len(json.dumps(obj)) <= 100:  # e.g. a rule: one line
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_json_dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, dict) and obj:
        items = [f"{pad2}{json.dumps(str(k))}: {_json_dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(pad2 + _json_dumps(v, indent + 2) for v in obj) + "\n" + pad + "]"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(json.dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def _is_ours(folder: pathlib.Path) -> bool:
    try:
        with open(folder / "dataset.json", "r", encoding="utf-8") as f:
            return _MARKER_KEY in json.load(f)
    except (OSError, ValueError):
        return False


def embed_phantom(ph: Phantom, canvas: Sequence[int], rng: SeedLike,
                  spacing: Optional[Sequence[float]] = None) -> Phantom:
    """The phantom placed off-centre in a larger ``canvas`` ``(Z, Y, X)`` (an image much larger than the heart, as
    a CT scan is): the heart block goes at a random offset in one corner region (the low third of every axis's free
    room, or the high third, per axis at random), the rest is background with the phantom's background intensity
    statistics (median and standard deviation of its label-0 voxels, Gaussian noise); label 0 outside. ``spacing``
    ``(z, y, x)`` mm replaces the phantom's voxel size (the arrays are unchanged; e.g. a coarse middle axis gives
    nnU-Net a non-identity ``transpose_forward``). The origin is moved so the heart stays where it was in world
    space (up to the new spacing)."""
    rng = _rng(rng)
    canvas = tuple(int(c) for c in canvas)
    shape = ph.label.shape
    if len(canvas) != 3 or any(c < s for c, s in zip(canvas, shape)):
        raise ValueError(f"canvas {list(canvas)} must be 3 sizes >= the phantom's shape {list(shape)}")
    offset = []
    for c, s in zip(canvas, shape):
        room = c - s
        third = room // 3
        lo = int(rng.integers(0, third + 1))
        offset.append(lo if rng.random() < 0.5 else room - lo)
    bg = ph.image[ph.label == 0]
    med, sd = (float(np.median(bg)), float(np.std(bg))) if bg.size else (0.0, 1.0)
    image = (med + sd * rng.standard_normal(canvas)).astype(np.float32)
    label = np.zeros(canvas, np.uint8)
    sl = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    image[sl] = ph.image
    label[sl] = ph.label
    sp = tuple(float(v) for v in (ph.spacing if spacing is None else spacing))
    d = np.asarray(ph.direction, float).reshape(3, 3)
    shift_xyz = np.asarray(offset[::-1], float) * np.asarray(sp[::-1])
    origin = tuple(float(v) for v in np.asarray(ph.origin, float) - d @ shift_xyz)
    params = dict(ph.params, canvas=list(canvas), heart_offset=offset)
    return Phantom(image=image, label=label, spacing=sp, origin=origin, direction=ph.direction,  # type: ignore
                   preset=ph.preset, labels=dict(ph.labels), params=params)


def write_dataset(raw_root: Union[str, os.PathLike], dataset_id: int, preset: str = "acdc",
                  num_training: int = 10, num_test: int = 4, seed: int = 0,
                  shape: Optional[Sequence[int]] = None, name: Optional[str] = None, oblique: bool = False,
                  overwrite: bool = False, canvas: Optional[Sequence[int]] = None,
                  spacing: Optional[Sequence[float]] = None) -> pathlib.Path:
    """Write a synthetic nnU-Net v2 raw dataset ``raw_root/Dataset{ID:03d}_{name}/``.

    Layout: ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``, ``imagesTs/``, ``labelsTs/`` (test
    references, for evaluation) and ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
    ``file_ending``, the preset's ``topology`` block, a description saying the data are synthetic, and the
    generator settings under ``"nnunet_topo_synthetic"``). Case ``i`` (training first, then test) is drawn
    with seed ``(seed, i)``, so a case does not depend on how many others are written. The folder is built
    under a temporary name and renamed at the end, so a crash never leaves a half-written dataset behind.

    Args:
        raw_root: the nnU-Net raw folder (``$nnUNet_raw``); created if missing.
        dataset_id: 1..999.
        preset: ``"acdc"`` or ``"wholeheart"``.
        num_training: training cases (>= 5: nnU-Net's 5-fold cross-validation needs five).
        num_test: test cases (>= 0) in ``imagesTs``/``labelsTs``.
        seed: base seed.
        shape: ``(Z, Y, X)`` of every case (default: the preset's default shape).
        name: dataset name (default ``SynthACDC`` / ``SynthWholeHeart``); letters, digits, ``-`` and ``_``.
        oblique: give every case a random non-identity direction matrix.
        canvas: ``(Z, Y, X)``: place each phantom off-centre in an image of this size (:func:`embed_phantom`;
            CT-like cases much larger than the heart).
        spacing: ``(z, y, x)`` mm for every case instead of the preset's random voxel size.
        overwrite: replace an existing dataset with this ID, if it was written by this function (its
            dataset.json carries the ``"nnunet_topo_synthetic"`` marker). Nothing else is ever deleted.

    Returns:
        Path of the dataset folder.

    Raises:
        FileExistsError: a ``Dataset{ID:03d}_*`` folder exists and ``overwrite`` is False, or it exists but
            was not written by this generator, or it has another name (nnU-Net needs unique IDs).
        ValueError: bad arguments (the message says which and what is allowed).
    """
    p = _check_preset(preset)
    if not isinstance(dataset_id, Integral) or isinstance(dataset_id, bool) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999 (nnU-Net's Dataset{{ID:03d}} naming), "
                         f"got {dataset_id!r}")
    if not isinstance(num_training, Integral) or isinstance(num_training, bool) or num_training < 5:
        raise ValueError(f"num_training must be an integer >= 5: nnU-Net's default 5-fold cross-validation "
                         f"split needs at least 5 training cases, got {num_training!r}")
    if not isinstance(num_test, Integral) or isinstance(num_test, bool) or num_test < 0:
        raise ValueError(f"num_test must be an integer >= 0, got {num_test!r}")
    if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shp = _check_shape(p, shape)
    name = p.dataset_name if name is None else name
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '-' and '_', got {name!r}")

    root = pathlib.Path(raw_root)
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    target = root / folder_name
    existing = sorted(root.glob(f"Dataset{int(dataset_id):03d}_*")) if root.is_dir() else []
    for ex in existing:
        if not overwrite:
            raise FileExistsError(
                f"{ex} already exists (dataset ID {int(dataset_id):03d} is taken). Pass overwrite=True "
                f"(--overwrite on the command line) to replace it, or choose another dataset_id.")
        if ex.name != folder_name:
            raise FileExistsError(
                f"{ex} already uses dataset ID {int(dataset_id):03d} under another name; nnU-Net needs unique IDs "
                f"and overwrite only replaces a synthetic dataset named {folder_name}. Remove or rename {ex} "
                "yourself, or choose another dataset_id.")
        if not _is_ours(ex):
            raise FileExistsError(
                f"{ex} exists but was not written by nnunet_topo.synthetic (no {_MARKER_KEY!r} key in its "
                "dataset.json); refusing to delete it even with overwrite=True. Remove it yourself or choose "
                "another dataset_id.")

    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=root))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        cases = []
        for i in range(num_training + num_test):
            case = f"{p.case_prefix}_{i:03d}"
            rng = np.random.default_rng((int(seed), i))
            ph = make_phantom(p.name, rng, shp, oblique=oblique)
            if canvas is not None or spacing is not None:
                ph = embed_phantom(ph, shp if canvas is None else canvas, rng, spacing)
            split = "Tr" if i < num_training else "Ts"
            save_phantom(ph, tmp / f"images{split}" / f"{case}_0000.nii.gz", tmp / f"labels{split}" / f"{case}.nii.gz")
            cases.append(case)
        dataset_json = {
            "name": name,
            "description": p.description + " generated by nnunet_topo.synthetic; synthetic data, no patient data.",
            "reference": "synthetic phantom (nnunet_topo.synthetic), not a clinical dataset",
            "licence": "CC0 (synthetic)",
            "channel_names": {"0": p.channel_name},
            "labels": dict(p.labels),
            "numTraining": int(num_training),
            "numTest": int(num_test),
            "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": "SimpleITKIO",
            "topology": topology_block(p.name),
            _MARKER_KEY: {"preset": p.name, "seed": int(seed), "shape": list(shp), "oblique": bool(oblique),
                          "canvas": None if canvas is None else [int(c) for c in canvas],
                          "spacing": None if spacing is None else [float(v) for v in spacing],
                          "training_cases": cases[:num_training], "test_cases": cases[num_training:]},
        }
        with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
            f.write(_json_dumps(dataset_json) + "\n")
        if target.exists():  # overwrite=True and checked above: it is ours
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
