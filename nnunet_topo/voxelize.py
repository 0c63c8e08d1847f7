"""Exact voxelisation of closed triangle meshes on a regular grid by signed ray crossings, in torch.

For a closed mesh the generalised winding number at a point (the solid-angle sum of
:func:`nnunet_topo.occupancy.winding_number`, TPM Eq. 5, C. Zhang et al., arXiv:2503.07874) equals the signed count
of the surface crossings of any ray from it. :func:`grid_winding_number` counts them for every point of a regular
grid at once, along the grid's **last axis** (X, the ray runs towards ``+x``): for every grid line ``(z, y)`` and
every triangle, a 2D point-in-triangle test of the line in the triangle's projection on ``(z, y)`` and, on a hit, the
crossing's position along the line, which is scattered (``+1`` where the surface leaves along ``+x``, ``-1`` where it
enters) into the line's cell; a reversed cumulative sum turns the crossings into winding numbers. The lines run
``RAY_JITTER`` grid units (an irrational ratio) beside the grid points so that none passes exactly through an edge
or a vertex of a mesh, where the 2D test would count a crossing twice or not at all; each edge is evaluated from its
endpoints in one canonical order, so the two triangles of a shared edge see bitwise opposite values and a line
close to the edge is counted by exactly one of them (rounding cannot let it slip between them or hit both).
Inside = winding number > 0 (the exact test ``w > 1/2``).

Why: the mesh source of TPM's critical points (:func:`nnunet_topo.losses.mesh_targets.mesh_violation_masks`) needs
inside/outside of every patch voxel for every mesh at every training step. This is the torch twin of the numpy
``_ColumnCrossings`` of :mod:`nnunet_topo.mesh_evaluation` (which this module's tests take as the reference, with the
exact solid-angle winding number), written so that it runs on any device **without a host synchronisation**: it
evaluates every (triangle, line) pair densely, so no tensor size depends on the data (no ``nonzero``, boolean-mask
indexing, ``unique``, ``.item()``); a pair that misses adds 0. The numpy version instead visits only the lines in each
triangle's bounding box, which needs data-dependent sizes.

Cost: O(B x F x Z x Y) elementwise work and scatter-adds (F faces) plus O(B x Z x Y x X) for the sums, in float64
(float32 cannot hold the 1e-6 jitter next to coordinates of tens of voxels), in chunks of faces of at most
``_MAX_PAIRS`` (triangle, line) pairs (22 bytes of work buffers each, ~46 MB, allocated once per call). A 642-vertex
mesh (1280 faces) on a 20 x 56 x 64 patch: 1.4 M pairs per batch item (documentation/benchmarks.md, "Mesh source by
exact voxelisation").

:data:`HOST_SYNC_OPS` lists the aten operators that wait for the device (their output size or value goes to the
host); :class:`HostSyncRecorder` records them under a dispatch mode, so that a test on the CPU can show that code
has none.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["voxelize", "grid_winding_number", "HOST_SYNC_OPS", "HostSyncRecorder", "is_host_sync", "RAY_JITTER"]

#: offset (grid units) of the ray lines from the grid points along the first two axes; irrational ratio, so that no
#: line passes through an edge or a vertex of a mesh (shared with :class:`nnunet_topo.mesh_evaluation._ColumnCrossings`)
RAY_JITTER = (1e-6 * math.sqrt(2.0) / 2, 1e-6 * (math.sqrt(5.0) - 1) / 2)

#: at most this many (batch item x triangle x line) pairs per chunk of faces (at least one face per chunk); their
#: work buffers (22 bytes a pair) are allocated once per call and reused by every chunk
_MAX_PAIRS = 2 ** 21

#: aten operators that synchronise with the device: the host needs their result (a value: ``.item()``, ``int()``,
#: ``float()``, ``bool()`` of a tensor all reach ``_local_scalar_dense``; or an output size that depends on the data:
#: ``nonzero``, ``unique``, ``masked_select``, ``repeat_interleave`` with tensor repeats, ``bincount``). Names are
#: matched against the operator (``aten::nonzero``) or the operator with its overload
#: (``aten::repeat_interleave.Tensor``; ``repeat_interleave`` with an int count has no sync). Boolean-mask indexing
#: (``x[mask]``, ``x[mask] = v``) also synchronises but dispatches as ``aten::index.Tensor``/``aten::index_put_``
#: with a bool index, which :func:`is_host_sync` checks separately. Not seen by a dispatch mode on the CPU:
#: ``Tensor.tolist()`` and copies between host and device (``.cpu()``, ``torch.tensor(data, device="cuda")``), which
#: wait for the device too; on a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches them.
HOST_SYNC_OPS: Tuple[str, ...] = (
    "aten::nonzero",
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::masked_select",
    "aten::unique_dim",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::repeat_interleave.Tensor",
    "aten::repeat_interleave.self_Tensor",
    "aten::repeat_interleave.Tensor_out",
    "aten::bincount",
)

_MASK_INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")


def is_host_sync(func: Any, args: Sequence[Any] = ()) -> bool:
    """Whether the aten operator ``func`` (an ``OpOverload``, as a dispatch mode sees it) called with ``args``
    synchronises with the device: listed in :data:`HOST_SYNC_OPS`, or indexing with a boolean mask."""
    packet, full = func._schema.name, func.name()
    if packet in HOST_SYNC_OPS or full in HOST_SYNC_OPS:
        return True
    if packet in _MASK_INDEX_OPS and len(args) > 1:
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
    return False


class HostSyncRecorder(TorchDispatchMode):
    """Dispatch mode that records every aten operator called inside it (``ops``) and those that synchronise with
    the device (``syncs``, :func:`is_host_sync`). Usage::

        with HostSyncRecorder() as rec:
            voxelize(v, f, shape)
        assert rec.syncs == []
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        if is_host_sync(func, args):
            self.syncs.append(func.name())
        return func(*args, **(kwargs or {}))


def _check_inputs(vertices_grid: Tensor, faces: Tensor, shape: Sequence[int]) -> Tuple[int, int, int]:
    if not isinstance(vertices_grid, Tensor) or not vertices_grid.is_floating_point():
        raise TypeError(f"vertices_grid must be a floating-point tensor, got {type(vertices_grid).__name__}"
                        + (f" of dtype {vertices_grid.dtype}" if isinstance(vertices_grid, Tensor) else ""))
    if vertices_grid.ndim != 3 or vertices_grid.shape[-1] != 3:
        hint = " (add the batch dimension with [None])" if vertices_grid.ndim == 2 else ""
        raise ValueError(f"vertices_grid must have shape (B, V, 3), got {tuple(vertices_grid.shape)}{hint}")
    if not isinstance(faces, Tensor) or faces.is_floating_point() or faces.dtype == torch.bool:
        raise TypeError("faces must be an integer tensor of vertex indices (F, 3)")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be the grid shape (Z, Y, X) with sizes >= 1, got {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def grid_winding_number(vertices_grid: Tensor, faces: Tensor, shape: Sequence[int], orientation: int = 1) -> Tensor:
    """Integer winding numbers of closed meshes at every point of a regular grid (signed ray crossings along X).

    Args:
        vertices_grid: ``(B, V, 3)`` vertices in the grid's index coordinates ``(z, y, x)``: grid point
            ``(i, j, k)`` sits at ``(i, j, k)``, e.g. voxel centres
            (:func:`nnunet_topo.frames.mm_to_voxel`).
            Parts of a mesh outside the grid are fine (crossings beyond either end of a line count as there).
            Finite values; no check (it would synchronise).
        faces: ``(F, 3)`` integer vertex indices, shared by the batch, of a closed mesh; all within ``[0, V)``
            (not checked, for the same reason); on the vertices' device (else a copy, which synchronises).
        shape: grid shape ``(Z, Y, X)``.
        orientation: ``+1`` if the faces are counter-clockwise seen from outside in the ``(z, y, x)`` coordinates
            above, ``-1`` if they are so in a frame with the opposite handedness, such as the physical ``(x, y, z)``
            frame of the losses whose order the index frame reverses (the sign of the map's determinant).

    Returns:
        ``(B, Z, Y, X)`` int64 winding numbers (1 inside a closed, outward-oriented mesh, 0 outside), on the
        vertices' device.
    """
    Z, Y, X = _check_inputs(vertices_grid, faces, shape)
    if orientation not in (1, -1):
        raise ValueError(f"orientation must be +1 or -1, got {orientation!r}")
    device = vertices_grid.device
    v = vertices_grid.detach().to(torch.float64)
    f = faces.to(device=device, dtype=torch.long)
    batch, lines = v.shape[0], Z * Y
    acc = torch.zeros(batch * lines * (X + 1), dtype=torch.int32, device=device)
    if f.shape[0] == 0 or batch == 0:
        return acc.view(batch, Z, Y, X + 1)[..., 1:].to(torch.int64)
    # the lines (z + jz, y + jy), and the flat accumulator index of each line's cell 0: (B, 1, Z, Y)
    lz = torch.arange(Z, dtype=torch.float64, device=device) + RAY_JITTER[0]
    ly = torch.arange(Y, dtype=torch.float64, device=device) + RAY_JITTER[1]
    base = (torch.arange(batch * lines, device=device) * (X + 1)).view(batch, 1, Z, Y)
    chunk = min(f.shape[0], max(1, _MAX_PAIRS // (batch * lines)))
    pairs = batch * chunk * lines  # work buffers, reused by every chunk (fresh allocations cost more on the CPU)
    work = {"e": torch.empty(pairs, dtype=torch.float64, device=device),
            "hit": torch.empty(pairs, dtype=torch.bool, device=device),
            "pos": torch.empty(pairs, dtype=torch.bool, device=device),
            "m": torch.empty(pairs, dtype=torch.long, device=device),
            "value": torch.empty(pairs, dtype=torch.int32, device=device)}
    for f0 in range(0, f.shape[0], chunk):
        acc.scatter_add_(0, *_crossings(v, f[f0:f0 + chunk], lz, ly, base, X, orientation, work))
    # winding(k) = sum of the crossings beyond point k = sum over cells m > k
    tail = acc.view(batch, Z, Y, X + 1).flip(-1).cumsum(-1, dtype=torch.int64).flip(-1)
    return tail[..., 1:]


def _crossings(v: Tensor, f: Tensor, lz: Tensor, ly: Tensor, base: Tensor, X: int, orientation: int,
               work: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """Flat accumulator indices and signed crossings ``(B * Fc * Z * Y,)`` of the faces ``f`` (Fc, 3) with every
    line (views of the buffers in ``work``); a pair that misses adds 0. ``lz`` ``(Z,)`` and ``ly`` ``(Y,)`` are the
    lines' coordinates, ``base`` ``(B, 1, Z, Y)`` the flat index of each line's cell 0."""
    size = (v.shape[0], f.shape[0], lz.shape[0], ly.shape[0])
    n = size[0] * size[1] * size[2] * size[3]
    e, hit, pos, m, value = (work[k][:n].view(size) for k in ("e", "hit", "pos", "m", "value"))
    corner = v[:, f]  # (B, Fc, 3 corners, 3 coordinates)
    a, b, c = corner.unbind(2)
    # twice the signed area of the projection on (z, y): > 0 where the outward normal points along +x
    area2 = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
    s = torch.sign(area2)  # 0 for triangles parallel to the lines: they cross none (the jitter avoids their edges)

    def outer(along_z: Tensor, along_y: Tensor) -> Tensor:  # (B, Fc, Z) + (B, Fc, Y) -> e (B, Fc, Z, Y)
        return torch.add(along_z.unsqueeze(-1), along_y.unsqueeze(-2), out=e)

    for k in range(3):  # edge k runs from corner k + 1 to corner k + 2, the opposite of corner k
        i_p, i_q = f[:, (k + 1) % 3], f[:, (k + 2) % 3]
        flip = (i_p > i_q).view(1, -1, 1)  # canonical order: from the lower vertex index, so that both triangles
        p = torch.where(flip, corner[:, :, (k + 2) % 3], corner[:, :, (k + 1) % 3])  # of an edge agree bitwise
        q = torch.where(flip, corner[:, :, (k + 1) % 3], corner[:, :, (k + 2) % 3])
        # (q - p) x (L - p) on (z, y), times the triangle's side sign (exact: +-1)
        side = (s * torch.where(flip[..., 0], -1.0, 1.0)).unsqueeze(-1)
        outer((p[..., 1] - q[..., 1]).unsqueeze(-1) * side * (lz - p[..., 0:1]),
              (q[..., 0] - p[..., 0]).unsqueeze(-1) * side * (ly - p[..., 1:2]))
        if k == 0:
            torch.gt(e, 0, out=hit)
        else:
            hit.logical_and_(torch.gt(e, 0, out=pos))
    # the crossing's x on the triangle's plane n . (P - a) = 0
    nrm = torch.linalg.cross(b - a, c - a)  # nrm[..., 2] == area2
    safe = torch.where(s != 0, nrm[..., 2], 1.0)
    x_cross = outer(a[..., 2:3] - (nrm[..., 0] / safe).unsqueeze(-1) * (lz - a[..., 0:1]),
                    -(nrm[..., 1] / safe).unsqueeze(-1) * (ly - a[..., 1:2]))
    # a crossing at x counts for the grid points k < x: cell m = ceil(x) = number of points below it, in [0, X];
    # clamped to the ceil of the triangle's own x range too (robust when it is nearly parallel to the lines)
    lo = torch.minimum(torch.minimum(a[..., 2], b[..., 2]), c[..., 2]).ceil().clamp(0, X)[..., None, None]
    hi = torch.maximum(torch.maximum(a[..., 2], b[..., 2]), c[..., 2]).ceil().clamp(0, X)[..., None, None]
    torch.clamp(x_cross.ceil_(), lo, hi, out=x_cross)
    m.copy_(x_cross).add_(base)
    sign = (s.to(torch.int32) * orientation)[..., None, None]
    torch.mul(hit, sign, out=value)
    return m.view(-1), value.view(-1)


def voxelize(vertices_grid: Tensor, faces: Tensor, shape: Sequence[int], orientation: int = 1) -> Tensor:
    """Inside/outside of closed meshes at every point of a regular grid: ``winding number > 0``
    (:func:`grid_winding_number`; exact, equal to ``winding_number(method="exact") > 1/2`` off the surface).

    Args:
        vertices_grid: ``(B, V, 3)`` vertices in grid index coordinates ``(z, y, x)`` (voxel centres at integers).
        faces: ``(F, 3)`` integer vertex indices of a closed mesh, shared by the batch.
        shape: grid shape ``(Z, Y, X)``.
        orientation: ``-1`` when the faces are outward-oriented in a frame of reversed axis order, such as the
            physical ``(x, y, z)`` frame (:func:`grid_winding_number`); ``+1`` in ``(z, y, x)`` itself.

    Returns:
        ``(B, Z, Y, X)`` bool, on the vertices' device; no host synchronisation.
    """
    return grid_winding_number(vertices_grid, faces, shape, orientation) > 0
