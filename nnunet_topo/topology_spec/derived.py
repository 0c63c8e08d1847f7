"""The spec as one consumer needs it: in the axis order of nnU-Net's preprocessed patches (the trainers,
:func:`spec_in_patch_frame`), for checking a sparse reference (the rule check, :func:`reference_spec`), and the
Betti priors of single labels keyed by label id (the losses, :func:`label_priors`). Rule names are always kept."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

from nnunet_topo.topology_spec.model import IGNORE_LABEL_NAME, InclusionRule, Rule, Structure, TopologySpec


def label_priors(spec: TopologySpec) -> Tuple[Dict[int, Tuple[int, ...]], Dict[int, Tuple[Tuple[int, ...], ...]]]:
    """The Betti priors of single labels, keyed by label id: ``(priors_3d, priors_2d)``.

    ``priors_3d[c]`` is one vector ``(b0, b1, b2)``; ``priors_2d[c]`` the allowed set of per-slice vectors, a tuple
    of ``(b0, b1)`` tuples (as :attr:`TopologySpec.betti_2d`; :class:`nnunet_topo.losses.betti.BettiPriorLoss`
    takes either form). Losses act on one probability channel per label, so priors of regions (several labels)
    are left out here; the evaluator still reports them.
    """
    def single(priors, convert):
        return {int(spec.betti_structures[n].label_ids[0]): convert(v) for n, v in priors.items()
                if len(spec.betti_structures[n].label_ids) == 1}

    def vector(v):
        return tuple(int(b) for b in v)
    return (single(spec.betti, vector),
            single(spec.betti_2d, lambda allowed: tuple(vector(v) for v in allowed)))


def spec_in_patch_frame(spec: TopologySpec, transpose_forward: Sequence[int]) -> TopologySpec:
    """The spec with every slice axis (of 2d rules, of 3d rules' ``axis`` attribute, which MIE uses for its
    slice-wise detection, and ``betti_2d_axis``) mapped from the image's array order to the order of nnU-Net's
    preprocessed arrays (the plans' ``transpose_forward``: preprocessed axis ``k`` is image axis
    ``transpose_forward[k]``). Rule names are kept, so logs and evaluation still match the dataset.json rules.

    Every trainer that applies rules to preprocessed patches calls this once; evaluation on images (original
    order) uses the spec as parsed."""
    order = [int(a) for a in transpose_forward]
    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"transpose_forward must be a permutation of (0, 1, 2), got {list(transpose_forward)}")

    def mapped(axis: int) -> int:
        return order.index(int(axis))

    rules = tuple(dataclasses.replace(r, axis=mapped(r.axis)) for r in spec.rules)
    return dataclasses.replace(spec, rules=rules, betti_2d_axis=mapped(spec.betti_2d_axis))


def reference_spec(spec: TopologySpec, ignore_label: Optional[int]) -> TopologySpec:
    """The spec for checking rules on a *sparse* reference (nnU-Net's ``ignore`` label = unknown voxels).

    An ignored voxel is unknown, never a forbidden neighbour: every inclusion rule may touch it (its id joins
    ``may_touch``), so a violation is counted only where both sides of the contact are annotated. Exclusions need
    no change (an ignored voxel belongs to neither structure). Rule names are kept. ``ignore_label=None``: the
    spec itself.
    """
    if ignore_label is None:
        return spec
    ignore = int(ignore_label)

    def widened(r: Rule) -> Rule:
        if not isinstance(r, InclusionRule):
            return r
        m = r.may_touch
        names, ids = (m.label_names, m.label_ids) if m is not None else ((), ())
        return dataclasses.replace(r, may_touch=Structure(m.name if m is not None else IGNORE_LABEL_NAME,
                                                          names + (IGNORE_LABEL_NAME,), ids + (ignore,)))
    return dataclasses.replace(spec, rules=tuple(widened(r) for r in spec.rules))
