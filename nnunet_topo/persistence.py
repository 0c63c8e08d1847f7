"""Differentiable cubical persistence of probability maps (super-level filtration).

This module computes the persistence diagrams that the Betti prior loss of Clough et al. ("A
Topological Loss Function for Deep-Learning based Image Segmentation using Persistent Homology",
IEEE TPAMI 2020, Section 3) is built on, for 2D and 3D probability maps.

Filtration:
    The *super-level* filtration of a probability map ``p``: voxels enter from high ``p`` to low
    ``p``, so at level ``t`` the complex is the super-level set ``{p >= t}``. Each voxel is a
    top-dimensional cell (the **T-construction**; a lower-dimensional cell enters with the first of
    its incident voxels), i.e. at level ``t`` the complex is the union of closed unit cubes
    (squares in 2D) of the voxels with ``p >= t``. Its Betti numbers are exactly those of
    ``nnunet_topo.metrics.topology.betti_numbers_3d(p >= t)`` (foreground 26-connected,
    background 6-connected; 8/4 in 2D), which the tests check bar by bar.

    It is computed as the sub-level filtration of ``-p`` with ``cripser.computePH_T`` (CubicalRipser
    0.0.37, T-construction) on a float64 CPU copy of the detached map. ``cripser.computePH`` would be
    the V-construction (6-connected foreground) and is *not* used.

cripser's output (verified on random 2D/3D maps, ``tests/test_persistence.py``):
    ``computePH_T(a, maxdim)`` returns a float64 array ``(n, 9)`` with columns
    ``[dim, birth, death, bx, by, bz, dx, dy, dz]``. ``(bx, by[, bz])`` is the index (array axis
    order, ``bz = 0`` for 2D input) of the voxel whose value *is* the birth value, ``a[bx, by, bz]
    == birth``; likewise ``(dx, dy, dz)`` for the death value. Essential (never-dying) classes have
    ``death = DBL_MAX`` and death coordinates ``-1``; on a box (a contractible complex once every
    voxel has entered) there is exactly one, in dimension 0.

Diagrams and gradients:
    The pairs (which voxel creates and which voxel destroys each class) come from the CPU; the
    values are then read by *indexing the live tensor* at those voxels (as torch-topological does):
    ``birth = p[birth voxel]``, ``death = p[death voxel]``. Gradients therefore flow to exactly
    those voxels without a custom autograd function. In the super-level filtration
    ``birth >= death``, and the persistence of a bar is ``birth - death``. The pairing itself is
    piecewise constant in ``p``, so this is the usual (sub)gradient of persistence-based losses.

Conventions:
    * **Essential bar.** The filtration ends at ``min(p)``, where the whole grid has entered (one
      component, no holes). The essential dimension-0 bar is therefore given the death value
      ``min(p)``, gathered from the voxel ``argmin(p)`` (first one in C order), so it has a
      gradient like every other bar. A bar ``(b, d)`` is *alive* on the levels ``d < t <= b``;
      for ``t <= min(p)`` the super-level set is the whole grid (Betti numbers ``(1, 0, 0)``).
    * **Zero-length bars** (``birth == death``, from ties such as saturated plateaus) are dropped.
      They have no persistence and, in the Betti prior loss, no gradient either way.
    * **Order.** Bars of a diagram are sorted by persistence, longest first (stable, ties keep
      cripser's order). The essential bar is a longest one.
    * A constant map has no bars at all (its only bar, the essential one, has length 0).

Speed:
    cripser releases the GIL (measured: a Python thread keeps running with gaps below 10 ms while
    a 96^3 map is computed in another thread), so several maps are computed in a thread pool by
    default; a process pool is available for comparison (``executor="process"``). See
    ``batch_persistence_diagrams`` and ``documentation/betti_loss.md`` for the measurements.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Diagram",
    "PersistencePairs",
    "persistence_pairs",
    "map_persistence_pairs",
    "persistence_diagrams",
    "batch_persistence_diagrams",
    "persistence_workers",
    "check_maxdim",
]

# cripser reports essential deaths as DBL_MAX; anything above this counts as infinite.
_INF_CUTOFF = np.finfo(np.float64).max / 2.0
_EXECUTORS = ("thread", "process")


class Diagram(NamedTuple):
    """Persistence diagram of one homology dimension of one map (super-level filtration).

    Attributes:
        births: ``(n,)`` float tensor, ``p`` at the birth voxel (the higher value), graph-connected
            to ``p``.
        deaths: ``(n,)`` float tensor, ``p`` at the death voxel (``min(p)`` for the essential
            bar), graph-connected to ``p``. ``births - deaths > 0`` is the persistence.
        birth_index: ``(n, ndim)`` int64 tensor, voxel index of each birth (array axis order).
        death_index: ``(n, ndim)`` int64 tensor, voxel index of each death.

    Bars are sorted by persistence, longest first; zero-length bars are left out.
    """

    births: Tensor
    deaths: Tensor
    birth_index: Tensor
    death_index: Tensor


class PersistencePairs(NamedTuple):
    """The CPU part of a diagram: which voxels create and destroy each bar, and their values.

    Attributes:
        birth_flat: ``(n,)`` int64, C-order linear index of the birth voxel in the map.
        death_flat: ``(n,)`` int64, C-order linear index of the death voxel.
        births: ``(n,)`` float64, the map's value at ``birth_flat``.
        deaths: ``(n,)`` float64, the map's value at ``death_flat``.

    Sorted by ``births - deaths`` descending; zero-length bars removed.
    """

    birth_flat: np.ndarray
    death_flat: np.ndarray
    births: np.ndarray
    deaths: np.ndarray


# ----------------------------------------------------------------------------------------------
# CPU part
# ----------------------------------------------------------------------------------------------


def _compute_ph_t(neg: np.ndarray, maxdim: int) -> np.ndarray:
    try:
        import cripser
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "nnunet_topo.persistence needs the 'cripser' package (CubicalRipser); install it with "
            "'pip install cripser'."
        ) from err
    return cripser.computePH_T(neg, maxdim=maxdim)


def check_maxdim(maxdim: int | None, ndim: int) -> int:
    """The highest homology dimension to compute for an ``ndim``-D map: ``maxdim`` checked to lie in
    ``[0, ndim - 1]`` (None: ``ndim - 1``); ValueError otherwise."""
    if maxdim is None:
        return ndim - 1
    if isinstance(maxdim, bool) or not isinstance(maxdim, (int, np.integer)) or not 0 <= maxdim < ndim:
        raise ValueError(
            f"maxdim must be an int in [0, {ndim - 1}] for a {ndim}D map (homology of dimension "
            f">= {ndim} is always trivial), got {maxdim!r}."
        )
    return int(maxdim)


def persistence_pairs(values: np.ndarray, maxdim: int | None = None) -> list[PersistencePairs]:
    """Persistence pairs of the super-level filtration of one 2D/3D map (numpy, no gradients).

    Args:
        values: float array ``(X, Y)`` or ``(X, Y, Z)``, the probability map (finite values).
        maxdim: highest homology dimension (default ``values.ndim - 1``).

    Returns:
        One :class:`PersistencePairs` per dimension ``0..maxdim``.

    Raises:
        ValueError: if the array is not 2D/3D, is empty, or ``maxdim`` is out of range.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"expected a non-empty 2D (X, Y) or 3D (X, Y, Z) map, got shape {arr.shape}.")
    maxdim = check_maxdim(maxdim, arr.ndim)
    return _pairs_from_negated(np.ascontiguousarray(-arr), maxdim)


def _pairs_from_negated(neg: np.ndarray, maxdim: int) -> list[PersistencePairs]:
    """Pairs from ``neg = -p`` (float64, C-contiguous); runs in worker threads/processes."""
    ph = _compute_ph_t(neg, maxdim)
    nd = neg.ndim
    shape = neg.shape
    out: list[PersistencePairs] = []
    dims = ph[:, 0].astype(np.int64) if ph.size else np.zeros(0, np.int64)
    argmin_p = int(np.argmax(neg))  # argmin of p (first in C order)
    min_p = -float(neg.reshape(-1)[argmin_p])
    for k in range(maxdim + 1):
        rows = ph[dims == k]
        bcoord = rows[:, 3:3 + nd].astype(np.int64)
        dcoord = rows[:, 6:6 + nd].astype(np.int64)
        births = -rows[:, 1]
        essential = rows[:, 2] >= _INF_CUTOFF
        bflat = np.ravel_multi_index(tuple(bcoord.T), shape) if len(rows) else np.zeros(0, np.int64)
        dflat = np.full(len(rows), argmin_p, dtype=np.int64)
        finite = ~essential
        if finite.any():
            dflat[finite] = np.ravel_multi_index(tuple(dcoord[finite].T), shape)
        deaths = np.where(essential, min_p, -rows[:, 2])
        pers = births - deaths
        keep = pers > 0
        order = np.argsort(-pers[keep], kind="stable")
        out.append(
            PersistencePairs(
                birth_flat=np.asarray(bflat, dtype=np.int64)[keep][order],
                death_flat=dflat[keep][order],
                births=births[keep][order],
                deaths=deaths[keep][order],
            )
        )
    return out


_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}


def _process_pool(num_workers: int) -> ProcessPoolExecutor:
    """A cached process pool (forkserver start method: safe in a process that uses CUDA/threads)."""
    pool = _PROCESS_POOLS.get(num_workers)
    if pool is None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool = ProcessPoolExecutor(num_workers, mp_context=ctx)
        _PROCESS_POOLS[num_workers] = pool
    return pool


@atexit.register
def _shutdown_pools() -> None:  # pragma: no cover - interpreter exit
    for pool in _PROCESS_POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _PROCESS_POOLS.clear()


def _resolve_workers(num_workers: int | None, n_jobs: int) -> int:
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int or None, got {num_workers!r}.")
    return max(1, min(num_workers, n_jobs))


def persistence_workers(reserved: int = 0) -> int:
    """Threads for persistence that leave ``reserved`` cores to others (nnU-Net's data-augmentation workers and the
    main process): ``max(1, usable cores - reserved)``, usable cores from the process's CPU affinity."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - int(reserved))


def map_persistence_pairs(
    arrays: Sequence[np.ndarray],
    maxdim: int,
    num_workers: int | None = None,
    executor: str = "thread",
    negated: bool = False,
) -> list[list[PersistencePairs]]:
    """Persistence pairs of many maps, computed in parallel on the CPU.

    Args:
        arrays: maps, each 2D or 3D float64 (the probability map ``p``, or ``-p`` with
            ``negated=True``).
        maxdim: highest homology dimension (the same for all maps; must be valid for each).
        num_workers: parallel workers; ``None`` = ``os.cpu_count()``; ``0`` or ``1`` runs serially
            in the calling thread. Never more workers than maps.
        executor: ``"thread"`` (default; cripser releases the GIL) or ``"process"`` (a cached
            forkserver pool; maps and pairs are pickled).
        negated: the arrays already hold ``-p``.

    Returns:
        ``out[i][k]``: the pairs of map ``i`` in dimension ``k``.
    """
    if executor not in _EXECUTORS:
        raise ValueError(f"executor must be one of {_EXECUTORS}, got {executor!r}.")
    negs = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        check_maxdim(maxdim, a.ndim)
        negs.append(np.ascontiguousarray(a if negated else -a))
    if not negs:
        return []
    workers = _resolve_workers(num_workers, len(negs))
    if workers == 1:
        return [_pairs_from_negated(a, maxdim) for a in negs]
    pool: Executor
    if executor == "thread":
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(_pairs_from_negated, negs, [maxdim] * len(negs)))
    pool = _process_pool(workers)
    return list(pool.map(_pairs_from_negated, negs, [maxdim] * len(negs)))


# ----------------------------------------------------------------------------------------------
# torch part
# ----------------------------------------------------------------------------------------------


def _check_map_tensor(p: Tensor, name: str = "p") -> Tensor:
    """Finite floating tensor, half precision promoted to float32 (differentiably)."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}.")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point probability map, got dtype {p.dtype}.")
    if p.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(p.shape)}.")
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    if not bool(torch.isfinite(p.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf; persistence needs finite values.")
    return p


def _gather_diagrams(
    flat: Tensor, pairs: Sequence[PersistencePairs], shape: tuple[int, ...]
) -> list[Diagram]:
    """Index the live flattened map ``flat`` at the pairs' voxels (one gather per dimension)."""
    out = []
    for pr in pairs:
        bi = torch.from_numpy(pr.birth_flat).to(flat.device)
        di = torch.from_numpy(pr.death_flat).to(flat.device)
        bcoord = torch.from_numpy(np.stack(np.unravel_index(pr.birth_flat, shape), axis=1).astype(np.int64))
        dcoord = torch.from_numpy(np.stack(np.unravel_index(pr.death_flat, shape), axis=1).astype(np.int64))
        out.append(Diagram(flat[bi], flat[di], bcoord.to(flat.device), dcoord.to(flat.device)))
    return out


def persistence_diagrams(p: Tensor, maxdim: int | None = None) -> list[Diagram]:
    """Persistence diagrams of the super-level filtration of one probability map.

    Args:
        p: ``(X, Y, Z)`` or ``(X, Y)`` float tensor, a single map (any device; may require grad).
            float16/bfloat16 are promoted to float32 (autocast-safe); float64 stays float64.
        maxdim: highest homology dimension, default ``p.ndim - 1`` (``(b0, b1, b2)`` in 3D).

    Returns:
        ``[Diagram for k in 0..maxdim]``; births/deaths are gathered from ``p`` (gradients flow to
        the birth and death voxels), indices are ``(n, p.ndim)`` on ``p.device``.

    Raises:
        ValueError: if ``p`` is not 2D/3D (the message names the shape), contains NaN/inf, or
            ``maxdim`` is out of range.
        TypeError: if ``p`` is not a floating-point tensor.
    """
    p = _check_map_tensor(p)
    if p.ndim not in (2, 3):
        raise ValueError(
            f"p must be a single 2D (X, Y) or 3D (X, Y, Z) map, got shape {tuple(p.shape)}; use "
            "batch_persistence_diagrams for (B, C, *spatial) batches."
        )
    maxdim = check_maxdim(maxdim, p.ndim)
    neg = -p.detach().cpu().numpy().astype(np.float64)  # copy in its own dtype, widen on the CPU
    pairs = _pairs_from_negated(np.ascontiguousarray(neg), maxdim)
    return _gather_diagrams(p.reshape(-1), pairs, tuple(p.shape))


def batch_persistence_diagrams(
    p: Tensor,
    classes: Sequence[int],
    num_workers: int | None = None,
    maxdim: int | None = None,
    executor: str = "thread",
) -> list[list[list[Diagram]]]:
    """Persistence diagrams for every sample and selected class of a batch, computed in parallel.

    The batch is copied to the CPU once (float64, detached); the ``B * len(classes)`` maps are
    computed in parallel by ``map_persistence_pairs``; the diagrams then index the live tensor.

    Parallelism (measured, see ``documentation/betti_loss.md``): cripser releases the GIL (a
    Python thread keeps running with < 10 ms gaps during a 1.8 s call), so a thread pool (default)
    runs the maps concurrently without pickling. A process pool (``executor="process"``) pickles
    each map and its pairs and pays a one-off start-up of 4.7-5.7 s (forkserver; the worker imports
    torch). Loss forward+backward on (2, 4, 64, 64, 64), 6 maps, on the 2-vCPU development VM:
    serial 0.96-1.00 s, 2 threads 0.99-1.13 s, 2 processes 1.24 s; with downsample 2: serial
    0.34 s, threads 0.23 s, processes 0.23 s. That VM has no real parallel capacity (two busy
    pure-Python processes run 0.94-1.02x as fast as one), so the choice rests on the GIL
    measurement and on the absence of pickling and start-up costs.

    Args:
        p: ``(B, C, X, Y, Z)`` or ``(B, C, X, Y)`` float tensor of probability maps.
        classes: channel indices to compute, each in ``[0, C)``.
        num_workers: parallel workers, ``None`` = ``os.cpu_count()``; ``0``/``1`` = serial.
        maxdim: highest homology dimension, default the number of spatial dims minus 1.
        executor: ``"thread"`` or ``"process"``.

    Returns:
        ``out[b][i][k]``: the :class:`Diagram` of sample ``b``, class ``classes[i]``, dimension ``k``.

    Raises:
        ValueError: on a wrong shape, NaN/inf, a class index outside ``[0, C)`` or a bad ``maxdim``.
    """
    p = _check_map_tensor(p)
    if p.ndim not in (4, 5):
        raise ValueError(
            f"p must be a batch (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(p.shape)}."
        )
    classes = _check_classes(classes, p.shape[1])
    spatial = tuple(p.shape[2:])
    maxdim = check_maxdim(maxdim, len(spatial))
    neg = -p.detach().cpu().numpy().astype(np.float64)  # copy in its own dtype, widen on the CPU
    jobs = [neg[b, c] for b in range(p.shape[0]) for c in classes]
    pairs = map_persistence_pairs(jobs, maxdim, num_workers, executor, negated=True)
    out: list[list[list[Diagram]]] = []
    it = iter(pairs)
    for b in range(p.shape[0]):
        row = []
        for c in classes:
            row.append(_gather_diagrams(p[b, c].reshape(-1), next(it), spatial))
        out.append(row)
    return out


def _check_classes(classes: Sequence[int], num_channels: int) -> list[int]:
    if isinstance(classes, (int, np.integer)):
        raise TypeError(f"classes must be a sequence of channel indices, got the int {classes!r}.")
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_channels:
            raise ValueError(
                f"class index {c!r} is not a channel of a map with {num_channels} channels "
                f"(valid: 0..{num_channels - 1})."
            )
        out.append(int(c))
    return out
