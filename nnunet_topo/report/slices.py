"""Which slices of a case the QC report draws (:func:`choose_slices`): the most violating voxels, else the most
disagreement between reference and prediction, else the most foreground."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_topo.topology_spec import TopologySpec


def label_mask(arr: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    return arr == ids[0] if len(ids) == 1 else np.isin(arr, ids)


def _slice_axis(rule, spec: TopologySpec) -> int:
    """The slice axis of a rule: its own for a 2d rule, ``betti_2d.axis`` (0 unless set) for a 3d rule, as the
    evaluator's SVR and ``nnUNetv2_topo_check_rules`` take them."""
    return int(rule.axis) if rule.mode == "2d" else int(spec.betti_2d_axis)


def per_slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return np.count_nonzero(mask, axis=other) if mask.size else np.zeros(mask.shape[axis], np.int64)


def choose_slices(vmaps: Mapping[str, np.ndarray], spec: TopologySpec, reference: np.ndarray,
                  prediction: np.ndarray, k: int = 3, known: Optional[np.ndarray] = None,
                  origin: Sequence[int] = (0, 0, 0)) -> Tuple[List[dict], str]:
    """The ``k`` slices to draw: ``[{"axis", "index", "violating", "per_rule", "disagreement", "reason"}]``, first the
    slices with the most violating voxels (per axis, the sum over the rules whose slice axis it is; ties: lower
    index), then, to fill up to ``k`` (or for a case without violations), the slices along ``betti_2d.axis`` where
    reference and prediction disagree in most voxels, then (prediction = reference) the slices with the most
    foreground. Returns ``(slices, selection)`` with selection ``"violations"``, ``"disagreement"``,
    ``"foreground"`` or ``"empty"`` (the criterion of the first slice). ``origin``: the index of the arrays' first
    voxel in the whole image when they are a crop (the returned indices are the whole image's)."""
    axis0 = int(spec.betti_2d_axis)
    scores: Dict[int, np.ndarray] = {}
    for rule in spec.rules:
        if rule.name not in vmaps:
            continue
        a = _slice_axis(rule, spec)
        c = per_slice_counts(vmaps[rule.name], a)
        scores[a] = scores.get(a, 0) + c
    cands = []
    for a, c in scores.items():
        for i in np.flatnonzero(c):
            cands.append((-int(c[i]), a, int(i)))
    cands.sort()
    chosen: List[Tuple[int, int, str]] = [(a, i, "violations") for _, a, i in cands[:k]]
    diff = reference != prediction
    if known is not None:
        diff &= known
    dis = per_slice_counts(diff, axis0)
    taken = {(a, i) for a, i, _ in chosen}
    if len(chosen) < k:
        order = sorted((-int(dis[i]), int(i)) for i in np.flatnonzero(dis))
        for _, i in order:
            if len(chosen) >= k:
                break
            if (axis0, i) not in taken:
                chosen.append((axis0, i, "disagreement"))
                taken.add((axis0, i))
    if len(chosen) < k:
        ref_fg = reference != 0 if known is None else (reference != 0) & known
        fg = per_slice_counts(ref_fg | (prediction != 0), axis0)
        for _, i in sorted((-int(fg[i]), int(i)) for i in np.flatnonzero(fg)):
            if len(chosen) >= k:
                break
            if (axis0, i) not in taken:
                chosen.append((axis0, i, "foreground"))
                taken.add((axis0, i))
    if not chosen:
        chosen = [(axis0, reference.shape[axis0] // 2, "empty")]
    out = []
    for a, i, why in chosen:
        per_rule = {name: int(np.count_nonzero(np.take(v, i, axis=a))) for name, v in vmaps.items()}
        out.append({"axis": int(a), "index": int(i) + int(origin[a]), "violating": int(sum(per_rule.values())),
                    "per_rule": per_rule,
                    "disagreement": int(np.count_nonzero(np.take(diff, i, axis=a))), "reason": why})
    return out, chosen[0][2]
