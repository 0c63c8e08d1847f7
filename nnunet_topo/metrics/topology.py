"""Topological metrics on binary masks and violation counts (numpy in, Python numbers out).

Implements the topology metrics of DESIGN.md section 5:

* Betti numbers of a binary mask in 3D ``(b0, b1, b2)`` and 2D ``(b0, b1)``, also per slice, and the
  Betti error ``sum_k |b_k(pred) - b_k(ref)|`` (Clough et al., "A Topological Loss Function for
  Deep-Learning based Image Segmentation using Persistent Homology", TPAMI 2020).
* Connected-component error in 3D and its slice-wise 2D mean (Fu et al., "Enhancing the topology of
  segmentations with projected pooling", the CCE metric).
* Topology violation score, TVS (TPM, Eq. 13), computed from violating-voxel counts.
* Violation rate VR and slice violation rate SVR (the MIE paper, "Relational Anatomical
  Supervision").

Connectivity (everywhere in this module):
    A mask is read as the union of closed unit cubes (3D) or closed unit squares (2D), one per
    foreground voxel/pixel. The matching digital connectivities are

    * 3D: foreground 26-connected, background 6-connected;
    * 2D: foreground 8-connected, background 4-connected.

    This is exactly the complex of cubical persistent homology in the T-construction (voxels as
    top-dimensional cells, lower cells take the minimum of their cofaces), so ``betti_numbers_3d``
    equals the Betti numbers of ``cripser.computePH_T`` applied to a filtration that is 0 on the
    foreground and 1 on the background (checked in ``tests/test_metrics_topology.py``).

Everything outside the array counts as background: a background region that touches the array
border is *not* a cavity/hole. Nonzero voxels are foreground (any dtype is accepted).

Empty masks have Betti numbers ``(0, 0, 0)`` (3D) or ``(0, 0)`` (2D) and zero components; errors
involving them are computed as usual. Slice averages over a set of slices that is empty are NaN.

Speed: every mask is cropped to its bounding box plus a one-voxel background margin before any
labelling, so the cost scales with the structure, not with the image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cc3d
import numpy as np
from skimage.measure import euler_number

__all__ = [
    "betti_numbers_3d",
    "betti_numbers_2d",
    "betti_numbers_per_slice",
    "betti_error",
    "allowed_betti_vectors",
    "meets_betti_prior",
    "betti_prior_error",
    "count_components_3d",
    "components_per_slice",
    "connected_component_error_3d",
    "connected_component_error_2d",
    "betti_error_2d",
    "topology_violation_score",
    "violation_rates",
    "slice_violation_rate",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _as_mask(mask: np.ndarray, ndim: int | None, name: str = "mask") -> np.ndarray:
    """Returns ``mask != 0`` as a bool array after checking its dimensionality."""
    arr = np.asarray(mask)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}D array, got shape {arr.shape} ({arr.ndim}D).")
    if arr.dtype != np.bool_:
        arr = arr != 0
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("pred", "ref")) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {names[0]} {a.shape} and "
            f"{names[1]} {b.shape}."
        )


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}D array.")
    return axis % ndim


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the nonzero voxels as slices, or None for an empty mask.

    Reduces along one axis at a time on progressively smaller sub-arrays, so a small structure in a
    large image costs about one pass over the image.
    """
    slices: list[slice] = []
    sub = mask
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        hit = np.flatnonzero(sub.any(axis=other)) if other else np.flatnonzero(sub)
        if hit.size == 0:
            return None
        s = slice(int(hit[0]), int(hit[-1]) + 1)
        slices.append(s)
        index = [slice(None)] * mask.ndim
        index[ax] = s
        sub = sub[tuple(index)]
    return tuple(slices)


def _crop_pad(mask: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray | None:
    """Crops a bool mask to its bounding box and pads one background voxel on each side.

    Args:
        mask: bool array of any dimensionality.
        axes: the axes to crop and pad (default all). Other axes are kept whole.

    Returns:
        A C-contiguous bool array, or None if the mask is empty.
    """
    box = _bbox(mask)
    if box is None:
        return None
    axes = range(mask.ndim) if axes is None else axes
    index = [slice(None)] * mask.ndim
    pad = [(0, 0)] * mask.ndim
    for ax in axes:
        index[ax] = box[ax]
        pad[ax] = (1, 1)
    return np.ascontiguousarray(np.pad(mask[tuple(index)], pad))


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected-component labels and count of a bool mask with cc3d.

    The mask is passed as a zero-copy ``uint8`` view: cc3d 4.1.1 mislabels *bool* 2D images with
    8-connectivity (stray labels in background pixels and a wrong count; 3D and ``uint8`` input are
    fine, checked against ``scipy.ndimage.label`` on thousands of random images).
    """
    labels, n = cc3d.connected_components(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=connectivity, return_N=True
    )
    return labels, int(n)


# ----------------------------------------------------------------------------------------------
# Betti numbers
# ----------------------------------------------------------------------------------------------


def betti_numbers_3d(mask: np.ndarray) -> tuple[int, int, int]:
    """Betti numbers of a 3D binary mask.

    The mask is read as the union of closed unit cubes of its foreground voxels: foreground
    26-connected, background 6-connected (the pair matching cubical persistence with voxels as
    top-dimensional cells).

    * ``b0``: number of 26-connected foreground components.
    * ``b2``: number of cavities, i.e. 6-connected background components that do not reach the
      outside of the array (the array is padded with one voxel of background, so anything touching
      the border is outside).
    * ``b1``: number of tunnels/handles, ``b1 = b0 + b2 - chi`` with ``chi`` the Euler
      characteristic of the union of closed cubes (``skimage.measure.euler_number`` with
      ``connectivity=3``, i.e. the vertex - edge + face - cube count of that complex).

    Args:
        mask: array of shape ``(Z, Y, X)``; nonzero voxels are foreground.

    Returns:
        ``(b0, b1, b2)`` as Python ints; ``(0, 0, 0)`` for an empty mask.

    Raises:
        ValueError: if ``mask`` is not 3D.
    """
    m = _crop_pad(_as_mask(mask, 3))
    if m is None:
        return (0, 0, 0)
    _, b0 = _label(m, 26)
    _, n_bg = _label(~m, 6)
    # The padded margin is a single background component (the outside); the others are cavities.
    b2 = n_bg - 1
    chi = int(euler_number(m, connectivity=3))
    b1 = int(b0) + b2 - chi
    return (int(b0), int(b1), int(b2))


def _euler_per_slice(m: np.ndarray) -> np.ndarray:
    """Euler characteristic of each 2D slice ``m[s]`` as a union of closed unit squares.

    Args:
        m: bool array ``(S, Y, X)`` whose slices have a background margin of one pixel on each side
            (so every lattice vertex/edge touching the margin-free interior is counted once).

    Returns:
        int64 array ``(S,)``: ``V - E + F`` per slice.
    """
    faces = m.sum(axis=(1, 2), dtype=np.int64)
    edges_y = m[:, 1:, :] | m[:, :-1, :]  # lattice edges parallel to X, between pixel rows
    edges_x = m[:, :, 1:] | m[:, :, :-1]  # lattice edges parallel to Y, between pixel columns
    verts = edges_y[:, :, 1:] | edges_y[:, :, :-1]  # lattice vertices: any of the 4 pixels
    n_edges = edges_y.sum(axis=(1, 2), dtype=np.int64) + edges_x.sum(axis=(1, 2), dtype=np.int64)
    n_verts = verts.sum(axis=(1, 2), dtype=np.int64)
    return n_verts - n_edges + faces


def _components_per_slice_padded(m: np.ndarray) -> np.ndarray:
    """8-connected component count of each slice of a margin-padded ``(S, Y, X)`` bool array.

    The slices are stacked into one 2D image of shape ``(S * Y, X)``. The first and last row of
    every slice are background (the margin), so two slices are separated by two background rows and
    no 8-connected component can cross from one slice into the next: one 2D labelling gives the
    components of all slices at once.
    """
    s, y, x = m.shape
    labels, n = _label(m.reshape(s * y, x), 8)
    counts = np.zeros(s, dtype=np.int64)
    if n == 0:
        return counts
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    slice_of_label = np.zeros(n + 1, dtype=np.int64)
    slice_of_label[flat[idx]] = idx // (y * x)  # every label lies in exactly one slice
    counts += np.bincount(slice_of_label[1:], minlength=s)
    return counts


def _prepare_slices(mask: np.ndarray, axis: int) -> tuple[np.ndarray | None, int, int]:
    """Moves ``axis`` first, crops to the foreground bounding box and pads the in-plane margin.

    Returns:
        ``(m, start, n_slices)``: ``m`` is the cropped ``(S', Y', X')`` bool array (None when the
        mask is empty) whose slice ``i`` is slice ``start + i`` of the input, and ``n_slices`` is
        the number of slices of the input along ``axis``.
    """
    arr = _as_mask(mask, 3)
    axis = _normalise_axis(axis, 3)
    arr = np.moveaxis(arr, axis, 0)
    n_slices = arr.shape[0]
    box = _bbox(arr)
    if box is None:
        return None, 0, n_slices
    m = np.ascontiguousarray(np.pad(arr[box], ((0, 0), (1, 1), (1, 1))))
    return m, box[0].start, n_slices


def components_per_slice(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Number of 8-connected foreground components in every 2D slice of a 3D mask.

    Args:
        mask: array ``(Z, Y, X)``; nonzero voxels are foreground.
        axis: the axis along which slices are taken (0 for the ``(Y, X)`` planes).

    Returns:
        int64 array of shape ``(mask.shape[axis],)``.
    """
    m, start, n_slices = _prepare_slices(mask, axis)
    out = np.zeros(n_slices, dtype=np.int64)
    if m is not None:
        out[start:start + m.shape[0]] = _components_per_slice_padded(m)
    return out


def betti_numbers_per_slice(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """2D Betti numbers ``(b0, b1)`` of every slice of a 3D mask.

    Each slice is read as a union of closed unit squares: foreground 8-connected, background
    4-connected. ``b0`` is the number of 8-connected foreground components, ``b1`` the number of
    holes (4-connected background components enclosed in the slice), computed as ``b0 - chi`` from
    a vectorised vertex/edge/face count of the Euler characteristic ``chi``. All slices are
    labelled in one call (see ``_components_per_slice_padded``); there is no per-slice Python loop.

    Args:
        mask: array ``(Z, Y, X)``; nonzero voxels are foreground.
        axis: the axis along which slices are taken.

    Returns:
        int64 array of shape ``(mask.shape[axis], 2)``, row ``s`` = ``(b0, b1)`` of slice ``s``;
        empty slices give ``(0, 0)``.

    Raises:
        ValueError: if ``mask`` is not 3D or ``axis`` is out of range.
    """
    m, start, n_slices = _prepare_slices(mask, axis)
    out = np.zeros((n_slices, 2), dtype=np.int64)
    if m is None:
        return out
    b0 = _components_per_slice_padded(m)
    chi = _euler_per_slice(m)
    out[start:start + m.shape[0], 0] = b0
    out[start:start + m.shape[0], 1] = b0 - chi
    return out


def betti_numbers_2d(mask: np.ndarray) -> tuple[int, int]:
    """Betti numbers of a 2D binary mask (foreground 8-connected, background 4-connected).

    Args:
        mask: array of shape ``(Y, X)``; nonzero pixels are foreground.

    Returns:
        ``(b0, b1)``: the number of 8-connected foreground components and the number of holes
        (4-connected background components not touching the array border); ``(0, 0)`` if empty.

    Raises:
        ValueError: if ``mask`` is not 2D.
    """
    m = _as_mask(mask, 2)
    b = betti_numbers_per_slice(m[None], axis=0)[0]
    return (int(b[0]), int(b[1]))


def betti_error(pred: Sequence[int], ref: Sequence[int]) -> int:
    """Betti error ``sum_k |pred_k - ref_k|`` (Clough et al.).

    Args:
        pred: Betti numbers of the prediction, e.g. ``(b0, b1, b2)``.
        ref: Betti numbers of the reference or a prior, same length.

    Returns:
        The error as a Python int.

    Raises:
        ValueError: if the two sequences have different lengths.
    """
    pred, ref = list(pred), list(ref)
    if len(pred) != len(ref):
        raise ValueError(
            f"pred and ref Betti vectors must have the same length, got {pred} and {ref}."
        )
    return int(sum(abs(int(p) - int(r)) for p, r in zip(pred, ref)))


def allowed_betti_vectors(prior) -> tuple[tuple[int, ...], ...]:
    """A prior as its allowed set: one Betti vector ``(b0, b1)`` gives ``((b0, b1),)``; a set of vectors (a sequence
    of sequences, e.g. the ``betti_2d`` prior ``((1, 1), (1, 0))`` of :attr:`nnunet_topo.topology_spec.TopologySpec.betti_2d`)
    is returned as a tuple of int tuples.

    Raises:
        ValueError: an empty set.
    """
    items = list(prior)
    if not items:
        raise ValueError("a Betti prior must be a vector or a non-empty set of vectors, got an empty sequence.")
    if all(isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, (str, bytes)) for v in items):
        return tuple(tuple(int(b) for b in v) for v in items)
    return (tuple(int(b) for b in items),)


def meets_betti_prior(betti: Sequence[int], prior) -> bool:
    """Whether Betti numbers ``betti`` meet a prior: equal to the vector, or to one vector of an allowed set."""
    b = tuple(int(v) for v in betti)
    return b in allowed_betti_vectors(prior)


def betti_prior_error(betti: Sequence[int], prior) -> int:
    """Betti error against a prior: :func:`betti_error` for one vector; for an allowed set, the minimum of
    :func:`betti_error` over its vectors (the distance to the nearest allowed topology; 0 iff
    :func:`meets_betti_prior`)."""
    return min(betti_error(betti, v) for v in allowed_betti_vectors(prior))


# ----------------------------------------------------------------------------------------------
# connected-component errors
# ----------------------------------------------------------------------------------------------


def count_components_3d(mask: np.ndarray) -> int:
    """Number of 26-connected foreground components of a 3D mask (0 for an empty mask).

    Args:
        mask: array ``(Z, Y, X)``; nonzero voxels are foreground.
    """
    m = _crop_pad(_as_mask(mask, 3))
    if m is None:
        return 0
    return _label(m, 26)[1]


def connected_component_error_3d(pred_mask: np.ndarray, ref_mask: np.ndarray) -> int:
    """3D connected-component error ``|#cc(pred) - #cc(ref)|`` (Fu et al.), 26-connectivity.

    Args:
        pred_mask: predicted mask ``(Z, Y, X)``.
        ref_mask: reference mask, same shape.

    Returns:
        The error as a Python int (0 when both masks are empty).

    Raises:
        ValueError: if the shapes differ or the masks are not 3D.
    """
    pred, ref = _as_mask(pred_mask, 3, "pred_mask"), _as_mask(ref_mask, 3, "ref_mask")
    _check_same_shape(pred, ref, ("pred_mask", "ref_mask"))
    return abs(count_components_3d(pred) - count_components_3d(ref))


def _slice_nonempty(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(i for i in range(mask.ndim) if i != axis)
    return mask.any(axis=other)


def connected_component_error_2d(pred_mask: np.ndarray, ref_mask: np.ndarray, axis: int = 0) -> float:
    """Mean slice-wise 2D connected-component error (Fu et al.), 8-connectivity in plane.

    ``mean_s |#cc2d(pred[s]) - #cc2d(ref[s])|`` over the slices ``s`` (along ``axis``) in which the
    prediction or the reference has foreground. Slices empty in both are left out, so the value
    does not depend on how much empty image surrounds the structure.

    Args:
        pred_mask: predicted mask ``(Z, Y, X)``.
        ref_mask: reference mask, same shape.
        axis: the slice axis.

    Returns:
        The mean error (components per slice) as a float; NaN when both masks are empty (no slice
        to average over).

    Raises:
        ValueError: if the shapes differ, the masks are not 3D or ``axis`` is out of range.
    """
    pred, ref = _as_mask(pred_mask, 3, "pred_mask"), _as_mask(ref_mask, 3, "ref_mask")
    _check_same_shape(pred, ref, ("pred_mask", "ref_mask"))
    ax = _normalise_axis(axis, 3)
    cp = components_per_slice(pred, ax)
    cr = components_per_slice(ref, ax)
    considered = (cp > 0) | (cr > 0)
    if not considered.any():
        return math.nan
    return float(np.abs(cp - cr)[considered].mean())


def betti_error_2d(pred_mask: np.ndarray, ref_mask: np.ndarray, axis: int = 0) -> float:
    """Mean slice-wise 2D Betti error.

    ``mean_s (|b0(pred[s]) - b0(ref[s])| + |b1(pred[s]) - b1(ref[s])|)`` over the slices in which
    the prediction or the reference has foreground (2D connectivity as in
    ``betti_numbers_per_slice``).

    Args:
        pred_mask: predicted mask ``(Z, Y, X)``.
        ref_mask: reference mask, same shape.
        axis: the slice axis.

    Returns:
        The mean error as a float; NaN when both masks are empty.

    Raises:
        ValueError: if the shapes differ, the masks are not 3D or ``axis`` is out of range.
    """
    pred, ref = _as_mask(pred_mask, 3, "pred_mask"), _as_mask(ref_mask, 3, "ref_mask")
    _check_same_shape(pred, ref, ("pred_mask", "ref_mask"))
    ax = _normalise_axis(axis, 3)
    bp = betti_numbers_per_slice(pred, ax)
    br = betti_numbers_per_slice(ref, ax)
    # A non-empty slice has b0 >= 1, so b0 > 0 is the same as "has foreground".
    considered = (bp[:, 0] > 0) | (br[:, 0] > 0)
    if not considered.any():
        return math.nan
    return float(np.abs(bp - br).sum(axis=1)[considered].mean())


# ----------------------------------------------------------------------------------------------
# violation-based scores
# ----------------------------------------------------------------------------------------------


def _check_count(name: str, value: int) -> int:
    v = int(value)
    if v != value or v < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}.")
    return v


def topology_violation_score(
    violating_voxels: Mapping[str, int], reference_foreground_voxels: int
) -> dict:
    """Topology violation score on label maps (TPM, Eq. 13).

    ``TVS_rule = v_rule / R`` and ``TVS_total = sum_rule v_rule / R`` where ``v_rule`` is the number
    of voxels that violate the rule (``nnunet_topo.violations``) and ``R`` is the number of
    reference foreground voxels (the sum of the reference volumes). A voxel that violates two rules
    is counted once per rule, as in the paper's sum of intersections and outside-enclosing volumes.
    Multiply by the voxel volume on both sides and nothing changes: the score is unitless.

    Args:
        violating_voxels: ``{rule_name: number of violating voxels}``.
        reference_foreground_voxels: number of foreground voxels in the reference.

    Returns:
        ``{"per_rule": {rule_name: float}, "total": float}``. If ``reference_foreground_voxels`` is
        0 every value is NaN: the score is a fraction of the reference volume and is undefined
        without a reference structure (even with no violations).

    Raises:
        ValueError: if a count is negative or not an integer.
    """
    ref = _check_count("reference_foreground_voxels", reference_foreground_voxels)
    counts = {str(k): _check_count(f"violating_voxels[{k!r}]", v) for k, v in violating_voxels.items()}
    if ref == 0:
        return {"per_rule": {k: math.nan for k in counts}, "total": math.nan}
    return {
        "per_rule": {k: v / ref for k, v in counts.items()},
        "total": sum(counts.values()) / ref,
    }


def violation_rates(case_violations: Sequence[Mapping[str, int]]) -> dict:
    """Violation rate VR over a set of cases (MIE paper).

    ``VR_rule`` is the share of cases with at least one voxel violating the rule; ``VR_any`` the
    share of cases violating at least one rule.

    Args:
        case_violations: one ``{rule_name: number of violating voxels}`` per case; every case must
            name the same rules.

    Returns:
        ``{"per_rule": {rule_name: float}, "any": float, "num_cases": int}``; with no cases the
        rates are NaN.

    Raises:
        ValueError: if cases name different rules or a count is negative.
    """
    cases = list(case_violations)
    if not cases:
        return {"per_rule": {}, "any": math.nan, "num_cases": 0}
    names = [str(k) for k in cases[0]]
    for i, case in enumerate(cases):
        if set(map(str, case)) != set(names):
            raise ValueError(
                f"case {i} names rules {sorted(map(str, case))}, but case 0 names {sorted(names)}; "
                "every case must report every rule (use 0 for no violation)."
            )
    rows = []
    for i, case in enumerate(cases):
        by_name = {str(k): v for k, v in case.items()}
        rows.append([_check_count(f"case {i}, rule {k!r}", by_name[k]) for k in names])
    table = np.array(rows, dtype=np.int64).reshape(len(cases), len(names))
    violated = table > 0
    return {
        "per_rule": {k: float(violated[:, j].mean()) for j, k in enumerate(names)},
        "any": float(violated.any(axis=1).mean()),
        "num_cases": len(cases),
    }


def slice_violation_rate(
    violation_map: np.ndarray, axis: int = 0, considered: np.ndarray | None = None
) -> float:
    """Slice violation rate SVR of one case (MIE paper).

    The share of slices along ``axis`` that contain at least one violating voxel. With
    ``considered`` (e.g. the union of reference and predicted foreground of the structures a rule
    involves), only slices in which ``considered`` has a nonzero voxel count, in the numerator and
    in the denominator.

    Args:
        violation_map: array ``(Z, Y, X)`` (any ``ndim >= 2``); nonzero = violating voxel.
        axis: the slice axis.
        considered: optional mask of the same shape selecting the slices to consider.

    Returns:
        The rate in ``[0, 1]``; NaN if no slice is considered.

    Raises:
        ValueError: if the shapes differ, the map has fewer than 2 dimensions or ``axis`` is out of
            range.
    """
    vm = _as_mask(violation_map, None, "violation_map")
    if vm.ndim < 2:
        raise ValueError(f"violation_map must have at least 2 dimensions, got shape {vm.shape}.")
    ax = _normalise_axis(axis, vm.ndim)
    has_violation = _slice_nonempty(vm, ax)
    if considered is None:
        keep = np.ones_like(has_violation)
    else:
        cm = _as_mask(considered, None, "considered")
        _check_same_shape(vm, cm, ("violation_map", "considered"))
        keep = _slice_nonempty(cm, ax)
    n = int(keep.sum())
    if n == 0:
        return math.nan
    return float((has_violation & keep).sum() / n)
