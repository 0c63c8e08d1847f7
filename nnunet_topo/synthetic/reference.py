"""The self-check of a reference label map: does it meet the rules and Betti priors of its ``topology`` block?

Every phantom is checked before it is returned (:func:`nnunet_topo.synthetic.phantom.make_phantom` redraws a failing
one). The check uses the project's own code, so a phantom is valid exactly when the evaluator and the losses would
say so: the rule semantics (DESIGN §4, zero padding outside the array, ``exempt_end_slices``) of
:func:`nnunet_topo.violations.violation_crops_numpy`, the rule names and prior parsing of
:func:`nnunet_topo.topology_spec.parse_topology`, and the Betti numbers (DESIGN §5; foreground 26-/background
6-connected in 3D, 8-/4- in 2D, outside the array background) of :mod:`nnunet_topo.metrics.topology`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from nnunet_topo.metrics.topology import betti_numbers_3d, betti_numbers_per_slice
from nnunet_topo.topology_spec import Structure, TopologySpec, parse_topology
from nnunet_topo.synthetic.presets import PRESETS, labels_for, topology_block
from nnunet_topo.violations import violation_crops_numpy


def topology_spec(labels: Mapping[str, int], topology: Mapping[str, Any]) -> TopologySpec:
    """The parsed, validated spec of a ``topology`` block over nnU-Net ``labels``
    (:func:`nnunet_topo.topology_spec.parse_topology`; ``TopologySpecError``, a ``ValueError``, for an invalid
    block)."""
    return parse_topology({"labels": dict(labels), "topology": dict(topology)})


def structure_mask(label: np.ndarray, structure: Structure) -> np.ndarray:
    """bool ``label.shape``: the voxels of a structure (the union of its labels)."""
    return np.isin(label, structure.label_ids)


def resolve_topology(labels: Mapping[str, int], topology: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``topology`` itself (a shallow copy), or else the block of the preset whose labels are ``labels``."""
    if topology is not None:
        return dict(topology)
    for name, p in PRESETS.items():
        if dict(labels) == p.labels:
            return topology_block(name)
    raise ValueError(
        f"labels {dict(labels)} match no preset ({', '.join(sorted(PRESETS))}); pass topology=<the dataset.json "
        "'topology' block> so the rules are known")


def _names(x: Union[str, Sequence[str]]) -> List[str]:
    return [x] if isinstance(x, str) else [str(n) for n in x]


def rule_name(rule: Mapping[str, Any]) -> str:
    """Name of a rule dict, as :func:`nnunet_topo.topology_spec.parse_topology` names it.

    ``exclusion(LV,RV)``, ``inclusion(LV in LV+MYO)``, ``inclusion(LV in LV+MYO | may_touch LA+AO)``; label
    lists are joined with ``"+"``; a rule with ``"mode": "2d"`` gets the suffix `` [2d axis k]``; an explicit
    ``"name"`` wins. The rule is parsed on its own, with every name it mentions taken as a label.

    Raises:
        ValueError: an invalid rule (:class:`nnunet_topo.topology_spec.TopologySpecError`, the message says why).
    """
    names = [n for key in ("a", "b", "inner", "outer", "may_touch") if key in rule for n in _names(rule[key])]
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(dict.fromkeys(names))}}
    return topology_spec(labels, {"rules": [dict(rule)]}).rules[0].name


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

    Raises:
        ValueError: an invalid topology block (:class:`nnunet_topo.topology_spec.TopologySpecError`).
    """
    labels = dict(labels) if labels is not None else labels_for(preset)
    topo = dict(topology) if topology is not None else topology_block(preset)
    spec = topology_spec(labels, topo)
    problems: List[str] = []
    unknown = sorted(set(np.unique(label).tolist()) - set(labels.values()))
    if unknown:
        problems.append(f"unknown label ids {unknown}")
    for name, i in labels.items():
        if i != 0 and not (label == i).any():
            problems.append(f"{name} is absent")
    for name, (_, crop) in violation_crops_numpy(label, spec).items():
        n = int(crop.sum())
        if n:
            problems.append(f"{name}: {n} violating voxels")
    for name, prior in spec.betti.items():
        b = betti_numbers_3d(structure_mask(label, spec.betti_structures[name]))
        if b != prior:
            problems.append(f"3D Betti numbers of {name} are {b}, prior {prior}")
    axis = spec.betti_2d_axis
    for name, allowed in spec.betti_2d.items():
        # the prior is an allowed set of (b0, b1) vectors: a slice where the structure is present must match one
        per_slice = betti_numbers_per_slice(structure_mask(label, spec.betti_structures[name]), axis)
        bad = [(z, (int(b[0]), int(b[1]))) for z, b in enumerate(per_slice)]
        bad = [(z, b) for z, b in bad if b != (0, 0) and b not in allowed]
        if bad:
            shown = " or ".join(str(v) for v in allowed)
            problems.append(f"2D Betti numbers of {name} differ from the prior {shown} on slices "
                            f"{[z for z, _ in bad]} (axis {axis}): {[b for _, b in bad]}")
    fg = label != 0
    border = fg[[0, -1]].any() or fg[:, [0, -1]].any() or fg[:, :, [0, -1]].any()
    if border:
        problems.append("foreground touches the array border")
    return problems
