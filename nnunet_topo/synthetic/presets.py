"""The phantom presets: what each preset is (labels, shapes, voxel sizes, names), the ``topology`` block it ships
in dataset.json, and the checks of the arguments that pick a phantom (preset name, shape, seed).

Two presets, ``"acdc"`` (short-axis cine-MRI-like, labels ``background 0, RV 1, MYO 2, LV 3``) and
``"wholeheart"`` (CT-like, ``background 0, LV 1, MYO 2, RV 3, LA 4, RA 5, AO 6``); why their rules and Betti priors
hold on every phantom is in ``documentation/synthetic_data.md``, the keys of the block in
``documentation/topology_spec.md``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

Shape3 = Tuple[int, int, int]
SeedLike = Union[int, np.random.Generator]


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


def check_preset(preset: Any) -> Preset:
    """The :class:`Preset` of a preset name; ``ValueError`` naming the valid presets for anything else."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown phantom preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]


def labels_for(preset: str) -> Dict[str, int]:
    """nnU-Net ``labels`` of a preset (a fresh dict, name -> id, background 0)."""
    return dict(check_preset(preset).labels)


def topology_block(preset: str) -> Dict[str, Any]:
    """The ``topology`` block a preset writes into dataset.json (a fresh deep copy; JSON-serialisable).

    See ``documentation/topology_spec.md`` for the keys and ``documentation/synthetic_data.md`` for why these
    rules and priors hold on every phantom of the preset.
    """
    check_preset(preset)
    return copy.deepcopy(_TOPOLOGY[preset])


def check_shape(preset: Preset, shape: Optional[Sequence[int]]) -> Shape3:
    """``shape`` as three ints ``(Z, Y, X)`` (the preset's default for None); ``ValueError`` if malformed or below the
    preset's minimum."""
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


def as_generator(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator: ``seed`` itself if it is one, else ``default_rng(seed)`` for an int (``TypeError`` else)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")
