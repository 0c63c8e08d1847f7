"""Betti prior loss (Clough et al., IEEE TPAMI 2020, Eq. 3-4).

Implements the topological loss of J. R. Clough, N. Byrne, I. Oksuz, V. A. Zimmer, J. A. Schnabel,
A. P. King, "A Topological Loss Function for Deep-Learning based Image Segmentation using
Persistent Homology", IEEE TPAMI 44(12), 2022 (online 2020), Eq. 3-4: for every class ``c`` and
homology dimension ``k``, the bars of the super-level persistence diagram of the class probability
map (``nnunet_topo.persistence``) are sorted by persistence ``|b_l - d_l|``, longest first, and with
the target Betti number ``beta*_k``::

    L_k = sum_{l <= beta*_k} (1 - |b_l - d_l|^2)  +  sum_{l > beta*_k} |b_l - d_l|^2      (l 1-based)

The first term makes the ``beta*_k`` longest bars as long as possible (persistence 1: a feature
that exists from ``p = 1`` down to ``p = 0``), the second removes every other bar. If the diagram
has fewer than ``beta*_k`` bars, each missing bar contributes 1 (its persistence is 0) and has no
gradient: nothing in the map can be pushed to create it. Zero-length bars are not in the diagram;
including them would change neither the value nor the gradient.

Reduction: ``L = (1/B) sum_b sum_c sum_k L_k`` (summed over classes, dimensions and, in the
slice-wise mode, slices; averaged over the batch).

Allowed sets: a prior may be a set of Betti vectors instead of one (e.g. the myocardium is a ring
``(1, 1)`` in mid-ventricular slices but an open "C" ``(1, 0)`` in basal ones:
``{c: ((1, 1), (1, 0))}``). Each target unit (sample, class[, slice]) then costs the **minimum** over
the allowed vectors ``beta*`` of ``sum_k L_k(beta*)``: the unit is pushed towards the nearest allowed
topology and never towards the others (a sum or mean over the set would ask for both a hole and no hole
at once). The minimum is taken on the current diagram values; its gradient is that of the minimising
vector's loss (ties: the first vector listed), so the loss is continuous and differentiable almost
everywhere, like the diagram pairing itself. One vector is the 1-element set: values unchanged.

Gradients reach exactly the birth and death voxels of the bars (the diagram indexes the live
probability tensor): ``dL/dp[birth_l] = -/+ 2 (b_l - d_l)`` and ``dL/dp[death_l] = +/- 2 (b_l - d_l)``
for bars inside/outside the first ``beta*_k``.

Targets (DESIGN section 6): a training *patch* cuts structures (a ring cut by the patch border is
an arc, ``b1 = 0``), so a whole-organ prior is wrong on patches. ``BettiPriorLoss(target="patch")``
takes the Betti numbers of the reference patch itself; ``target="prior"`` uses dataset priors and is
meant for inputs that show the whole structure (whole-volume configurations, test-time refinement).

Downsampling (``downsample=f``): max-pooling with window = stride = ``f`` (``ceil_mode``), applied
to the probability map and, identically, to the one-hot reference before its Betti numbers are
computed, so targets and prediction live on the same grid. Max-pooling is used because for a
super-level filtration it is exact in a useful sense: ``{maxpool(p) >= t}`` is the super-level set
``{p >= t}`` dilated by the window and subsampled, so thin structures (one voxel wide) keep their
full probability and stay connected, and the full persistence range ``[0, 1]`` stays reachable.
Average pooling would scale a one-voxel-thick ring down to ``p <= 1/f^d`` and break it; min-pooling
would erase it. The price of max-pooling is that gaps and holes narrower than the window close and
close components merge; because the reference is pooled the same way, the target counts them
closed/merged too, so the loss never asks for features the grid cannot show. Gradients of the
pooled map flow to the arg-max voxel of each window.

Slice-wise mode (``slice_axis``): each slice along that spatial axis of a 3D map is a 2D image with
2D Betti numbers ``(b0, b1)`` (8-connected foreground, 4-connected background), e.g. a myocardium
ring prior ``(1, 1)`` on short-axis slices. Downsampling then pools in-plane only. Which slices
count:

* with a prior (``Mapping`` target, ``target="prior"``): the slices in which the class's
  probability exceeds ``presence_threshold`` (0.5) somewhere, i.e. where the current prediction
  contains the structure; the prior says what the structure should look like where it is, not
  on which slices it is;
* with reference targets (``target="patch"``): the slices where the reference contains the class
  (target = the reference slice's Betti numbers) **and** the slices where the reference does not
  but the prediction does (probability above ``presence_threshold``; target ``(0, 0)``, which
  removes spurious blobs). Slices empty in both are skipped (nothing to penalise, and they save
  the persistence computation).

Sparse references (``ignore_label``, nnU-Net's ``ignore`` label = unknown voxels), ``"patch"`` mode:
a *target unit* is (sample, class), or (sample, class, slice) in slice mode. A unit whose reference
region (the patch; the slice) holds an ignored voxel on the loss grid (a pooled cell is ignored if
any of its voxels is) has undefined label targets: part of the structure may hide in the unknown
voxels, and counting them as background would ask for broken rings and split structures. Such a
unit gets the dataset prior ``priors[c]`` (of length ``maxdim + 1``) when the structure is *in view*:
the class is in the unit's known reference voxels or in the prediction (pooled probability above
``presence_threshold``), and neither touches the unit's border (any face of the patch; in slice
mode the in-plane border of the slice). Otherwise it is skipped. Ignored voxels are never
background in any target; units without ignored voxels keep their label targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_topo.metrics.topology import betti_numbers_2d, betti_numbers_3d, betti_numbers_per_slice
from nnunet_topo.persistence import check_maxdim, map_persistence_pairs

__all__ = ["betti_prior_loss", "BettiPriorLoss", "betti_downsample_for_patch", "betti_targets_from_labels",
           "max_pool_downsample"]

_TARGET_MODES = ("patch", "prior")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _normalise_slice_axis(slice_axis: int | None, spatial_dims: int) -> int | None:
    if slice_axis is None:
        return None
    if not _is_int(slice_axis):
        raise TypeError(f"slice_axis must be an int or None, got {slice_axis!r}.")
    if spatial_dims != 3:
        raise ValueError(
            f"slice_axis needs 3D maps (B, C, X, Y, Z); got {spatial_dims} spatial dimensions."
        )
    if not -3 <= slice_axis < 3:
        raise ValueError(f"slice_axis must be a spatial axis in [-3, 2], got {slice_axis}.")
    return int(slice_axis) % 3


def _check_probabilities(p: Tensor, name: str = "probabilities") -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}.")
    if p.ndim not in (4, 5):
        raise ValueError(f"{name} must be (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(p.shape)}.")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {p.dtype}.")
    if p.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(p.shape)}.")


def _check_class_ids(class_ids: Sequence[int], num_channels: int | None = None) -> list[int]:
    if isinstance(class_ids, (str, bytes)) or _is_int(class_ids) or class_ids is None:
        raise TypeError(f"class_ids must be a sequence of label ids, got {class_ids!r}.")
    ids = list(class_ids)
    if not ids:
        raise ValueError("class_ids must name at least one class.")
    for c in ids:
        if not _is_int(c) or c < 0:
            raise ValueError(f"class ids must be non-negative ints, got {c!r} in {ids}.")
        if num_channels is not None and c >= num_channels:
            raise ValueError(
                f"unknown class id {c}: the probability map has {num_channels} channels "
                f"(valid ids 0..{num_channels - 1})."
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids must be unique, got {ids}.")
    return [int(c) for c in ids]


def _check_prior_vector(c, vec, length: int | None) -> tuple[int, ...]:
    if isinstance(vec, (str, bytes)) or not isinstance(vec, (Sequence, np.ndarray, Tensor)):
        raise TypeError(f"prior of class {c} must be a sequence of Betti numbers, got {vec!r}.")
    vals = [v.item() if isinstance(v, (Tensor, np.ndarray)) else v for v in vec]
    if not all(_is_int(v) and v >= 0 for v in vals):
        raise ValueError(f"prior of class {c} must hold non-negative ints, got {list(vals)!r}.")
    if length is not None and len(vals) != length:
        raise ValueError(
            f"prior of class {c} has {len(vals)} Betti numbers {tuple(vals)}, expected {length} "
            f"(b0..b{length - 1}); in 3D give (b0, b1, b2), in 2D or per slice (b0, b1), or set "
            "maxdim to constrain fewer dimensions."
        )
    return tuple(int(v) for v in vals)


def _is_vector_like(v) -> bool:
    if isinstance(v, (str, bytes)):
        return False
    if isinstance(v, (np.ndarray, Tensor)):
        return v.ndim >= 1
    return isinstance(v, Sequence)


def _check_prior_set(c, value, length: int | None) -> tuple[tuple[int, ...], ...]:
    """A prior as its allowed set: one vector ``(b0, b1[, b2])`` -> a 1-element set; a non-empty sequence of
    distinct vectors of one length -> the set (order kept)."""
    if _is_set(value):
        vecs = tuple(_check_prior_vector(c, v, length) for v in value)
        if len({len(v) for v in vecs}) > 1:
            raise ValueError(f"the allowed Betti vectors of class {c} differ in length: {list(vecs)}.")
        if len(set(vecs)) != len(vecs):
            raise ValueError(f"the allowed Betti vectors of class {c} must be distinct, got {list(vecs)}.")
        return vecs
    if _is_vector_like(value) and len(value) == 0:
        raise ValueError(
            f"prior of class {c} is empty: give a Betti vector (b0, b1[, b2]) or a non-empty set of them, "
            "e.g. ((1, 1), (1, 0))."
        )
    return (_check_prior_vector(c, value, length),)


def _is_set(value) -> bool:
    """Whether a prior value is an allowed set (a sequence of vectors), not one vector."""
    return _is_vector_like(value) and len(value) > 0 and all(_is_vector_like(v) for v in value)


class _CandidateTargets:
    """Internal targets with an allowed set per unit: int64 ``(B, K[, S], M, length)``; a candidate row of -1 is
    no candidate, a unit without candidates is skipped."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _pad_sets(sets: Sequence[tuple[tuple[int, ...], ...]], length: int) -> np.ndarray:
    """``(K, M, length)`` int64 of K allowed sets, padded with -1 rows to the largest set size M."""
    m = max((len(v) for v in sets), default=1)
    out = np.full((len(sets), m, length), -1, dtype=np.int64)
    for k, vecs in enumerate(sets):
        for j, v in enumerate(vecs):
            out[k, j] = v
    return out


def _set_loss_values(job_pairs, candidates: np.ndarray) -> np.ndarray:
    """Loss value of one unit for each candidate target vector ``(M, length)``, from its persistence pairs:
    ``L_k(beta) = beta + sum_l pers_l^2 - 2 sum_{l <= beta} pers_l^2`` (bars sorted longest first)."""
    values = np.zeros(len(candidates), dtype=np.float64)
    for dim, pr in enumerate(job_pairs):
        pers2 = (np.asarray(pr.births, np.float64) - np.asarray(pr.deaths, np.float64)) ** 2
        prefix = np.concatenate([[0.0], np.cumsum(pers2)])
        beta = candidates[:, dim]
        values += beta + prefix[-1] - 2.0 * prefix[np.minimum(beta, len(pers2))]
    return values


def max_pool_downsample(x: Tensor, factor: int, slice_axis: int | None = None) -> Tensor:
    """Max-pools the spatial axes of ``(B, C, *spatial)`` by ``factor`` (window = stride, ceil mode).

    Args:
        x: ``(B, C, X, Y)`` or ``(B, C, X, Y, Z)`` float tensor.
        factor: integer downsampling factor (1 returns ``x`` unchanged).
        slice_axis: spatial axis that is *not* pooled (slice-wise mode), or None.

    Returns:
        ``(B, C, ceil(X / f), ...)`` tensor.
    """
    if not _is_int(factor) or factor < 1:
        raise ValueError(f"downsample must be an int >= 1, got {factor!r}.")
    if factor == 1:
        return x
    sd = x.ndim - 2
    kernel = [int(factor)] * sd
    if slice_axis is not None:
        kernel[slice_axis] = 1
    pool = F.max_pool3d if sd == 3 else F.max_pool2d
    return pool(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


#: pooled voxels per map the trainers aim at by default: a 32^3 map costs cripser about 20-40 ms (benchmarks.md)
DEFAULT_MAX_POOLED_VOXELS = 32 ** 3


def betti_downsample_for_patch(patch_size: Sequence[int], max_voxels: int = DEFAULT_MAX_POOLED_VOXELS,
                               slice_axis: int | None = None) -> int:
    """The smallest max-pooling factor whose pooled map of ``patch_size`` has at most ``max_voxels`` voxels.

    The persistence cost grows with the voxels of the pooled map (and its extrema), so bounding the pooled size
    bounds the CPU time per step whatever the planned patch: a 128^3 CT patch gets factor 4, the ACDC patch
    10 x 256 x 224 factor 3, the 10 x 64 x 64 demo patch factor 2 (the former fixed default). With ``slice_axis``
    that axis is not pooled (slice-wise losses pool in-plane only).
    """
    sizes = [int(n) for n in patch_size]
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"patch_size must be positive ints, got {patch_size!r}.")
    if not _is_int(max_voxels) or max_voxels < 1:
        raise ValueError(f"max_voxels must be a positive int, got {max_voxels!r}.")
    f = 1
    while True:
        pooled = 1
        for a, n in enumerate(sizes):
            pooled *= n if a == slice_axis else -(-n // f)
        if pooled <= max_voxels or f >= max(sizes):
            return f
        f += 1


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------


def _pooled_masks(target: Tensor, ids: Sequence[int], factor: int, ax: int | None) -> Tensor:
    """``(B, K, *grid)`` bool: the masks ``target == ids[k]`` max-pooled onto the loss grid."""
    masks = torch.cat([(target == c) for c in ids], dim=1).float()  # (B, K, *spatial)
    return max_pool_downsample(masks, factor, ax) > 0.5


def betti_targets_from_labels(
    target: Tensor,
    class_ids: Sequence[int],
    downsample: int = 1,
    slice_axis: int | None = None,
    maxdim: int | None = None,
) -> Tensor:
    """Betti numbers of each class in a reference label map, on the (downsampled) loss grid.

    Every class mask ``target == c`` is max-pooled exactly like the probability map in
    :class:`BettiPriorLoss` (``max_pool_downsample``) and then measured with
    ``nnunet_topo.metrics.topology`` (foreground 26-/8-connected, background 6-/4-connected; outside
    the patch is background, so a ring cut by the patch border is an arc with ``b1 = 0``).

    Args:
        target: ``(B, 1, X, Y, Z)`` or ``(B, 1, X, Y)`` label map (nnU-Net's target; any dtype).
        class_ids: label ids to measure.
        downsample: integer max-pooling factor (1 = full resolution).
        slice_axis: with a 3D target, measure 2D Betti numbers of every slice along this spatial
            axis (pooling in-plane only).
        maxdim: keep Betti numbers ``0..maxdim`` only (default: all).

    Returns:
        int64 CPU tensor ``(B, K, ndim)`` (``K = len(class_ids)``, ``ndim`` = spatial dims, or
        ``maxdim + 1``), or ``(B, K, S, 2)`` per slice with ``slice_axis`` (``(0, 0)`` for slices
        without the class).

    Raises:
        ValueError: if ``target`` is not ``(B, 1, *spatial)`` with 2 or 3 spatial dims.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    if target.ndim not in (4, 5) or target.shape[1] != 1:
        raise ValueError(
            f"target must be a label map (B, 1, X, Y[, Z]), got shape {tuple(target.shape)}."
        )
    ids = _check_class_ids(class_ids)
    sd = target.ndim - 2
    ax = _normalise_slice_axis(slice_axis, sd)
    n = 2 if ax is not None else sd
    md = check_maxdim(maxdim, n)
    masks = _pooled_masks(target, ids, downsample, ax).cpu().numpy()
    B, K = masks.shape[:2]
    if ax is not None:
        out = np.zeros((B, K, masks.shape[2 + ax], 2), dtype=np.int64)
        for b in range(B):
            for k in range(K):
                out[b, k] = betti_numbers_per_slice(masks[b, k], axis=ax)
    else:
        fn = betti_numbers_3d if sd == 3 else betti_numbers_2d
        out = np.zeros((B, K, sd), dtype=np.int64)
        for b in range(B):
            for k in range(K):
                out[b, k] = fn(masks[b, k])
    return torch.from_numpy(out[..., : md + 1].copy())


def _targets_from_mapping(
    target_betti: Mapping, class_ids, num_channels: int, length: int
) -> tuple[list[int], np.ndarray]:
    """Class ids and their allowed sets ``(K, M, length)`` (padded with -1 rows)."""
    keys = list(target_betti.keys())
    ids = _check_class_ids(keys, num_channels)
    if class_ids is not None:
        wanted = _check_class_ids(class_ids, num_channels)
        if set(wanted) != set(ids):
            raise ValueError(
                f"class_ids {wanted} do not match the classes of target_betti {ids}; leave "
                "class_ids out when passing a mapping."
            )
    sets = [_check_prior_set(c, target_betti[c], length) for c in ids]
    return ids, _pad_sets(sets, length)


def _targets_from_tensor(
    target_betti: Tensor, class_ids, batch: int, num_channels: int, length: int, n_slices: int | None
) -> tuple[list[int], np.ndarray]:
    if class_ids is None:
        raise ValueError(
            "a tensor target_betti (B, K, ...) needs class_ids naming the label id of each of its K "
            "rows."
        )
    ids = _check_class_ids(class_ids, num_channels)
    if target_betti.is_floating_point() or target_betti.is_complex() or target_betti.dtype == torch.bool:
        raise TypeError(f"target_betti must be an integer tensor, got dtype {target_betti.dtype}.")
    expected = (batch, len(ids)) + ((n_slices,) if n_slices is not None else ()) + (length,)
    if tuple(target_betti.shape) != expected:
        layout = "(B, K, S, maxdim + 1)" if n_slices is not None else "(B, K, maxdim + 1)"
        raise ValueError(
            f"target_betti must have shape {layout} = {expected}, got {tuple(target_betti.shape)}."
        )
    t = target_betti.detach().cpu().numpy().astype(np.int64)
    neg = t < 0
    if (neg.any(-1) & ~neg.all(-1)).any():
        raise ValueError(
            "target_betti rows must be all non-negative (a target) or all negative (skip); got a "
            "row mixing both."
        )
    return ids, t


# ----------------------------------------------------------------------------------------------
# functional loss
# ----------------------------------------------------------------------------------------------


def betti_prior_loss(
    probabilities: Tensor,
    target_betti: Mapping[int, Sequence[int]] | Tensor,
    class_ids: Sequence[int] | None = None,
    maxdim: int | None = None,
    slice_axis: int | None = None,
    num_workers: int | None = None,
    executor: str = "thread",
    presence_threshold: float = 0.5,
) -> Tensor:
    """Betti prior loss of Clough et al. (TPAMI 2020, Eq. 3-4) on probability maps.

    Args:
        probabilities: ``(B, C, X, Y, Z)`` or ``(B, C, X, Y)`` class probabilities (softmax output),
            channel ``c`` = label id ``c``. Computed in float32 (float64 input stays float64).
        target_betti: either ``{class id: (b0, b1[, b2])}`` applied to every sample (and, with
            ``slice_axis``, to every slice where the class is present, see the module docstring;
            a value may also be a non-empty set of distinct vectors ``((1, 1), (1, 0))``, and the loss
            of each unit is then the minimum over the set, see "Allowed sets" there), or an integer
            tensor of per-sample targets ``(B, K, maxdim + 1)`` (per slice:
            ``(B, K, S, maxdim + 1)``) whose rows follow ``class_ids``; an all-negative row means
            "no target" and is skipped.
        class_ids: label ids of the rows of a tensor ``target_betti`` (required then); with a
            mapping, optional and must equal its keys.
        maxdim: highest homology dimension; default spatial dims - 1 (2D maps and slices: 1).
            Every target vector must have ``maxdim + 1`` entries.
        slice_axis: spatial axis (of a 3D map) along which the map is cut into 2D slices, or None.
        num_workers: CPU workers for the persistence computations (None = ``os.cpu_count()``).
        executor: ``"thread"`` (default) or ``"process"``, see ``nnunet_topo.persistence``.
        presence_threshold: with a mapping and ``slice_axis``, a slice gets the prior when the
            class probability exceeds this somewhere in it.

    Returns:
        Scalar tensor ``(1/B) sum_{b, c, k[, slice]} L_k``, connected to the graph of
        ``probabilities`` (a zero that keeps the graph when there is nothing to penalise).

    Raises:
        ValueError: bad shapes, NaN/inf, unknown class ids, target vectors of the wrong length.
        TypeError: non-tensor or non-floating input, non-integer targets.
    """
    return _betti_prior_loss(
        probabilities, target_betti, class_ids, maxdim, slice_axis, num_workers, executor,
        presence_threshold, check_finite=True,
    )


def _betti_prior_loss(
    probabilities, target_betti, class_ids, maxdim, slice_axis, num_workers, executor,
    presence_threshold, check_finite: bool, also_present: np.ndarray | None = None,
) -> Tensor:
    """``betti_prior_loss``; ``check_finite=False`` when the caller has checked its input already."""
    _check_probabilities(probabilities)
    device_type = probabilities.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        p = probabilities if probabilities.dtype == torch.float64 else probabilities.float()
        if check_finite and not bool(torch.isfinite(p.detach()).all()):
            raise ValueError("probabilities contain NaN or inf.")
        B, C = p.shape[:2]
        spatial = tuple(p.shape[2:])
        ax = _normalise_slice_axis(slice_axis, len(spatial))
        n = 2 if ax is not None else len(spatial)
        md = check_maxdim(maxdim, n)
        length = md + 1
        n_slices = spatial[ax] if ax is not None else None

        # ---- targets: ids (K,), tb (B, K[, S], M, length): M candidate vectors per unit (an allowed set),
        #      all-negative rows = no candidate; a unit without candidates is skipped
        if isinstance(target_betti, _CandidateTargets):
            ids, tb = _check_class_ids(class_ids, C), target_betti.array
        elif isinstance(target_betti, Tensor):
            ids, tb = _targets_from_tensor(target_betti, class_ids, B, C, length, n_slices)
            tb = tb[..., None, :]
        elif isinstance(target_betti, Mapping):
            ids, sets = _targets_from_mapping(target_betti, class_ids, C, length)  # (K, M, length)
            if ax is None:
                tb = np.broadcast_to(sets[None], (B,) + sets.shape).copy()
            else:
                other = tuple(2 + a for a in range(3) if a != ax)
                present = (p.detach()[:, ids].amax(dim=other) > presence_threshold).cpu().numpy()
                if also_present is not None:  # slices bound by BettiPriorLoss.fix_presence
                    present = present | also_present
                tb = np.where(present[..., None, None], sets[None, :, None], -1).astype(np.int64)
        else:
            raise TypeError(
                "target_betti must be a mapping {class id: Betti numbers} or an integer tensor, got "
                f"{type(target_betti).__name__}."
            )

        # ---- persistence jobs on the CPU (one float64 copy of the needed channels)
        neg = -p.detach()[:, ids].cpu().numpy().astype(np.float64)  # (B, K, *spatial), widened on the CPU
        active = (tb[..., 0] >= 0).any(-1)  # (B, K[, S])
        jobs, meta = [], []
        for idx in zip(*np.nonzero(active)):
            b, k = int(idx[0]), int(idx[1])
            if ax is None:
                jobs.append(neg[b, k])
                meta.append((b, k, None))
            else:
                s = int(idx[2])
                jobs.append(np.ascontiguousarray(np.take(neg[b, k], s, axis=ax)))
                meta.append((b, k, s))
        zero = p.sum() * 0.0
        if not jobs:
            return zero
        pairs = map_persistence_pairs(jobs, md, num_workers, executor, negated=True)

        # ---- signs and global voxel indices of all bars, then one gather on the live tensor
        vol = int(np.prod(spatial))
        const = 0
        b_idx, d_idx, signs = [], [], []
        for (b, k, s), job_pairs in zip(meta, pairs):
            cands = tb[(b, k) if s is None else (b, k, s)]
            cands = cands[cands[:, 0] >= 0]
            # an allowed set: the unit's loss is the minimum over its vectors, so take the nearest one (first on ties)
            beta = cands[0] if len(cands) == 1 else cands[int(np.argmin(_set_loss_values(job_pairs, cands)))]
            base = (b * C + ids[k]) * vol
            for dim, pr in enumerate(job_pairs):
                nb = len(pr.births)
                const += int(beta[dim])  # sum over the first beta bars of 1, missing bars included
                if nb == 0:
                    continue
                sign = np.where(np.arange(nb) < beta[dim], -1.0, 1.0)
                if s is None:
                    gb, gd = pr.birth_flat, pr.death_flat
                else:
                    gb = _slice_to_volume_index(pr.birth_flat, s, ax, spatial)
                    gd = _slice_to_volume_index(pr.death_flat, s, ax, spatial)
                b_idx.append(gb + base)
                d_idx.append(gd + base)
                signs.append(sign)
        if not b_idx:
            return zero + const / B
        flat = p.reshape(-1)
        dev = p.device
        bi = torch.from_numpy(np.concatenate(b_idx)).to(dev, non_blocking=True)
        di = torch.from_numpy(np.concatenate(d_idx)).to(dev, non_blocking=True)
        sg = torch.from_numpy(np.concatenate(signs)).to(dev, p.dtype, non_blocking=True)
        pers = flat[bi] - flat[di]
        return (const + (sg * pers * pers).sum()) / B + zero


def _slice_to_volume_index(flat2d: np.ndarray, s: int, ax: int, spatial: tuple[int, ...]) -> np.ndarray:
    """C-order index in the 3D volume of the 2D indices ``flat2d`` of slice ``s`` along ``ax``."""
    plane = tuple(n for a, n in enumerate(spatial) if a != ax)
    i, j = np.unravel_index(flat2d, plane)
    coords = [i, j]
    coords.insert(ax, np.full_like(i, s))
    return np.ravel_multi_index(tuple(coords), spatial).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------


class BettiPriorLoss(nn.Module):
    """Betti prior loss on network logits (Clough et al., IEEE TPAMI 2020, Eq. 3-4).

    Args:
        class_ids: label ids the loss acts on (usually not the background).
        priors: ``{class id: (b0, b1[, b2])}`` dataset priors, a value may be an allowed set of
            vectors ``((1, 1), (1, 0))`` (per unit, the loss is the minimum over the set; see the module
            docstring) (``target="prior"``: required, one per class id; in ``"patch"`` mode used only
            for the units of a sparse reference whose label targets are undefined, see
            ``ignore_label``).
        target: ``"patch"`` (default): target Betti numbers from the reference label patch passed
            to ``forward``; ``"prior"``: from ``priors`` (only when the whole structure is in
            view: whole-volume configs, test-time refinement).
        downsample: integer max-pooling factor applied to the probability map and, identically,
            to the reference before persistence (see the module docstring).
        softmax: apply a softmax over channels (the input is logits); False: input is probabilities.
        maxdim: highest homology dimension (default: spatial dims - 1, or 1 per slice).
        num_workers: CPU workers for persistence (None = ``os.cpu_count()``).
        slice_axis: spatial axis of 3D inputs along which 2D slices are taken, or None (3D).
        executor: ``"thread"`` or ``"process"``.
        presence_threshold: probability above which a class counts as present in a slice.
        ignore_label: nnU-Net's ``ignore`` label id (unknown voxels of a sparse reference), or None.
            In ``"patch"`` mode a unit (sample, class[, slice]) whose reference region holds an
            ignored voxel gets ``priors[c]`` if the structure is in view, else no target (see the
            module docstring); ignored voxels are never background.

    Attributes:
        priors: the priors as given (a vector, or a tuple of vectors for an allowed set), or None.
        prior_sets: every prior as its allowed set (a tuple of vectors), or None.
        last_counts: after each forward, ``{"units": target units considered (B * K, per slice
            B * K * S), "prior": units of a sparse reference that used the prior, "skipped": units
            skipped because their label targets were undefined}`` (units skipped because the class
            is absent from a fully annotated slice are not counted); None before the first call.

    Shapes:
        logits: ``(B, C, X, Y, Z)`` or ``(B, C, X, Y)``.
        target: ``(B, 1, *spatial)`` label map (required in ``"patch"`` mode; ignored otherwise).
        output: scalar.
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        priors: Mapping[int, Sequence[int]] | None = None,
        target: str = "patch",
        downsample: int = 1,
        softmax: bool = True,
        maxdim: int | None = None,
        num_workers: int | None = None,
        slice_axis: int | None = None,
        executor: str = "thread",
        presence_threshold: float = 0.5,
        ignore_label: int | None = None,
    ) -> None:
        super().__init__()
        self.class_ids = _check_class_ids(class_ids)
        if ignore_label is not None and (not _is_int(ignore_label) or ignore_label < 0):
            raise ValueError(f"ignore_label must be a non-negative int or None, got {ignore_label!r}.")
        if ignore_label is not None and ignore_label in self.class_ids:
            raise ValueError(f"ignore_label {ignore_label} cannot be one of the class_ids {self.class_ids}.")
        if target not in _TARGET_MODES:
            raise ValueError(f"target must be one of {_TARGET_MODES}, got {target!r}.")
        if not _is_int(downsample) or downsample < 1:
            raise ValueError(f"downsample must be an int >= 1, got {downsample!r}.")
        if executor not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}.")
        if slice_axis is not None and (not _is_int(slice_axis) or not -3 <= slice_axis < 3):
            raise ValueError(f"slice_axis must be a spatial axis in [-3, 2] or None, got {slice_axis!r}.")
        if maxdim is not None and (not _is_int(maxdim) or maxdim < 0 or maxdim > 2):
            raise ValueError(f"maxdim must be 0, 1, 2 or None, got {maxdim!r}.")
        if num_workers is not None and (not _is_int(num_workers) or num_workers < 0):
            raise ValueError(f"num_workers must be a non-negative int or None, got {num_workers!r}.")
        self.target = target
        self.downsample = int(downsample)
        self.softmax = bool(softmax)
        self.maxdim = maxdim
        self.num_workers = num_workers
        self.slice_axis = slice_axis
        self.executor = executor
        self.presence_threshold = float(presence_threshold)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.last_counts: dict[str, int] | None = None
        self.fixed_presence: np.ndarray | None = None
        self.priors: dict[int, tuple] | None = None
        self.prior_sets: dict[int, tuple[tuple[int, ...], ...]] | None = None
        if priors is not None:
            if not isinstance(priors, Mapping):
                raise TypeError(f"priors must be a mapping {{class id: Betti numbers}}, got {priors!r}.")
            unknown = [c for c in priors if c not in self.class_ids]
            if unknown:
                raise ValueError(
                    f"priors name unknown class id(s) {unknown}; class_ids are {self.class_ids}."
                )
            if slice_axis is not None:
                length = 2 if maxdim is None else maxdim + 1
            else:
                length = None if maxdim is None else maxdim + 1
            self.prior_sets = {int(c): _check_prior_set(c, v, length) for c, v in priors.items()}
            # as given: one vector stays a vector, an allowed set a tuple of vectors
            self.priors = {c: (v[0] if not _is_set(priors[c]) else v) for c, v in self.prior_sets.items()}
            lengths = {len(v) for vs in self.prior_sets.values() for v in vs}
            if len(lengths) > 1 or (lengths and not lengths <= {1, 2, 3}):
                raise ValueError(
                    f"all priors must have the same number of Betti numbers (2 in 2D, 3 in 3D), got "
                    f"{self.priors}."
                )
        if target == "prior":
            if self.priors is None:
                raise ValueError('target="prior" needs priors {class id: (b0, b1[, b2])}.')
            missing = [c for c in self.class_ids if c not in self.priors]
            if missing:
                raise ValueError(f"no prior given for class id(s) {missing}; priors: {self.priors}.")

    def forward(self, logits: Tensor, target: Tensor | None = None) -> Tensor:
        """Loss of ``logits (B, C, *spatial)`` against the patch reference or the priors."""
        _check_probabilities(logits, "logits")
        num_channels = logits.shape[1]
        _check_class_ids(self.class_ids, num_channels)
        if self.target == "patch":
            if target is None:
                raise ValueError('target="patch" needs the reference label map (B, 1, *spatial) in forward.')
            if (
                not isinstance(target, Tensor)
                or target.ndim != logits.ndim
                or target.shape[1] != 1
                or target.shape[0] != logits.shape[0]
                or target.shape[2:] != logits.shape[2:]
            ):
                got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
                raise ValueError(
                    f"target must be a label map (B, 1, *spatial) matching logits {tuple(logits.shape)}, "
                    f"got {got}."
                )
        ax = _normalise_slice_axis(self.slice_axis, logits.ndim - 2)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits if logits.dtype == torch.float64 else logits.float()
            if not bool(torch.isfinite(x.detach()).all()):
                raise ValueError("BettiPriorLoss got NaN or inf in its input.")
            probs = torch.softmax(x, dim=1) if self.softmax else x
            pooled = max_pool_downsample(probs, self.downsample, ax)
            if self.target == "patch":
                tb = betti_targets_from_labels(target, self.class_ids, self.downsample, ax, self.maxdim)
                if ax is not None:
                    # reference-empty slices: target (0, 0) only where the prediction shows the class
                    other = tuple(2 + a for a in range(3) if a != ax)
                    present = (
                        pooled.detach()[:, self.class_ids].amax(dim=other) > self.presence_threshold
                    ).cpu()
                    skip = (tb[..., 0] == 0) & ~present
                    tb = tb.masked_fill(skip[..., None], -1)
                counts = {"units": int(np.prod(tb.shape[:-1])), "prior": 0, "skipped": 0}
                if self.ignore_label is not None:
                    tb = self._sparse_targets(target, pooled, tb, ax, counts)
            else:
                expected = None if ax is None else (logits.shape[0], len(self.class_ids), pooled.shape[2 + ax])
                if self.fixed_presence is not None and ax is not None and self.fixed_presence.shape != expected:
                    raise ValueError(f"fixed_presence has shape {self.fixed_presence.shape}, expected (B, K, S) = "
                                     f"{expected}")
                tb = {c: self.priors[c] for c in self.class_ids}
                n_units = logits.shape[0] * len(self.class_ids) * (1 if ax is None else logits.shape[2 + ax])
                counts = {"units": n_units, "prior": 0, "skipped": 0}
            self.last_counts = counts
            # the input was checked for NaN/inf above; softmax and pooling keep it finite
            return _betti_prior_loss(
                pooled, tb, self.class_ids if self.target == "patch" else None, self.maxdim, ax,
                self.num_workers, self.executor, self.presence_threshold, check_finite=False,
                also_present=self.fixed_presence if self.target == "prior" and ax is not None else None,
            )

    def fix_presence(self, logits: Tensor | None) -> None:
        """Per-slice prior mode: bind the priors to the slices where each class is the arg-max somewhere in
        ``logits`` (e.g. the unrefined network's output: its segmentation shows the class there), for every later
        call, besides the slices where its probability exceeds ``presence_threshold`` in the input of that call.
        A slice bound so keeps its prior when the class weakens or was weak from the start (an arg-max class of
        three can have probability 0.4): the b0 >= 1 target pulls it back instead of letting it vanish (which meets
        the prior vacuously). ``None`` returns to per-call presence."""
        if logits is None:
            self.fixed_presence = None
            return
        if self.target != "prior" or self.slice_axis is None:
            raise ValueError("fix_presence applies to per-slice prior mode (target='prior', slice_axis set)")
        ax = _normalise_slice_axis(self.slice_axis, logits.ndim - 2)
        with torch.no_grad():
            seg = logits.detach().argmax(1)
            onehot = torch.stack([(seg == c) for c in self.class_ids], 1).float()  # (B, K, *spatial)
            pooled = max_pool_downsample(onehot, self.downsample, ax)
            other = tuple(2 + a for a in range(3) if a != ax)
            self.fixed_presence = (pooled.amax(dim=other) > 0.5).cpu().numpy()

    def _sparse_targets(self, target: Tensor, pooled: Tensor, tb: Tensor, ax: int | None,
                        counts: dict) -> _CandidateTargets:
        """``tb`` as candidate targets, with the units whose reference region holds ignored voxels set to the
        prior's allowed set (structure in view) or to no candidate (skip); updates ``counts``."""
        ids, f = self.class_ids, self.downsample
        ignored = (max_pool_downsample((target == self.ignore_label).float(), f, ax) > 0.5).cpu().numpy()
        known = _pooled_masks(target, ids, f, ax).cpu().numpy()  # ignored voxels are not the class
        fg = known | (pooled.detach()[:, ids] > self.presence_threshold).cpu().numpy()  # (B, K, *grid)
        grid = fg.shape[2:]
        dims = tuple(2 + a for a in range(len(grid)) if a != ax)  # the unit's region
        border = np.zeros(grid, dtype=bool)
        for a in (a for a in range(len(grid)) if a != ax):
            border[(slice(None),) * a + ([0, grid[a] - 1],)] = True
        undefined = np.broadcast_to(ignored.any(axis=dims), fg.any(axis=dims).shape)  # (B, K[, S])
        in_view = fg.any(axis=dims) & ~(fg & border).any(axis=dims)
        length = tb.shape[-1]
        sets = self.prior_sets or {}
        has = np.array([c in sets and len(sets[c][0]) == length for c in ids])
        vecs = _pad_sets([sets[c] if h else ((-1,) * length,) for c, h in zip(ids, has)], length)  # (K, M, length)
        m = vecs.shape[1]
        shape = (1, len(ids)) + ((1,) if ax is not None else ()) + (m, length)
        use = undefined & in_view & has.reshape(shape[:-2])
        labels = np.full(tuple(tb.shape[:-1]) + (m, length), -1, dtype=np.int64)  # label targets: one candidate
        labels[..., 0, :] = tb.numpy()
        out = np.where(undefined[..., None, None], -1, labels)
        out = np.where(use[..., None, None], vecs.reshape(shape), out)
        counts["prior"], counts["skipped"] = int(use.sum()), int((undefined & ~use).sum())
        return _CandidateTargets(out.astype(np.int64))
