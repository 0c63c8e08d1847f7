"""Fused Triton kernels for the generalised winding number of :mod:`nnunet_topo.occupancy`.

Two kernels, both tiled over (points x vertices) or (points x faces) and accumulating in float32:

* **dipole** (``w(p) = sum_v m_v.(v - p) / (4 pi (|v - p|^2 + sigma^2)^(3/2))``), forward and backward
  with hand-derived gradients. Forward: one program per (mesh, block of points), looping over vertex
  tiles. Backward: the gradient wrt the points is one program per (mesh, block of points) looping over
  vertex tiles; the gradients wrt the vertex positions ``v`` and the moments ``m`` are one program per
  (mesh, block of vertices) looping over point tiles. No atomics: when there are too few output blocks
  to fill the GPU, the loop is cut into contiguous ranges ("splits", a third grid axis), each program
  writes its partial sums to its own slice of a ``(splits, ...)`` buffer and torch adds the slices
  (:func:`_split`); deterministic for a given device and shape. :class:`TritonDipoleWinding` wraps the
  kernels in an autograd function; the moments ``m`` are computed from the vertices in torch by the
  caller, so the gradient through ``m`` stays in torch autograd.
* **exact** (Van Oosterom-Strackee solid angle), forward only: one program per (mesh, block of
  points[, split]), looping over face tiles and gathering the three corners of each face. ``atan2`` is a
  Cephes-style polynomial (:func:`_atan2`, about 2e-7 relative error): ``libdevice.atan2`` does not run
  under the Triton interpreter (``TRITON_INTERPRET=1``), and one code path for the interpreter and the
  GPU means the kernel the tests check is the kernel the GPU runs. Gradients of the exact form are
  left to the torch implementation (they vanish on closed meshes anyway).

The kernels reproduce the arithmetic of the torch kernels of :mod:`nnunet_topo.occupancy` (same
formulas, same in-plane tolerance, same clamps; IEEE-rounded ``sqrt_rn``/``div_rn``), so they differ
from it only by summation order and float32 rounding. Callers centre the meshes first (done by
:func:`nnunet_topo.occupancy.winding_number`). Only float32 is implemented; the caller falls back to
torch for float64. This module imports without Triton installed: :func:`triton_available` says whether
the kernels exist.

Not run on a GPU yet (checked through the interpreter, and compiled for sm_90a without a GPU): the
block sizes below are untuned, and
:func:`nnunet_topo.occupancy.winding_number` keeps ``backend="torch"`` as its default until a GPU run
(``benchmarks/bench_occupancy.py --backends torch triton``) shows the kernels are faster.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

try:  # pragma: no cover - exercised by the import-without-triton test
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as err:  # ImportError, or a broken installation
    triton = None
    tl = None
    _IMPORT_ERROR = err

#: In-plane tolerance of the exact (solid-angle) kernels, torch (:mod:`nnunet_topo.occupancy`) and Triton alike:
#: ``|a.(b x c)|`` below ``DET_TOL * machine eps * |N| * (|a| + mesh radius)`` counts as "in the face's plane".
#: Defined here, where the kernels need nothing from the torch module, which imports it.
DET_TOL: float = 8.0

# Tile sizes (points x elements, powers of two). Untuned: no GPU has run them yet. Chosen so that
# ptxas (sm_90a, 4 warps) reports no register spills: dipole 64 x 32 uses 146 (forward), 191 (point
# gradient) and 150 (vertex gradient) registers, exact 32 x 32 uses 96; 64 x 64 spills in all four.
DIPOLE_BLOCK_N: int = 64
DIPOLE_BLOCK_V: int = 32
EXACT_BLOCK_N: int = 32
EXACT_BLOCK_F: int = 32
NUM_WARPS: int = 4
# Default tiles under the Triton interpreter (CPU tests), which costs per tile rather than per element:
# 3-5x faster there. The GPU tiles above are exercised explicitly by the tests.
INTERPRETER_BLOCK_N: int = 64
INTERPRETER_BLOCK_K: int = 128

_INV_4PI: float = 1.0 / (4.0 * math.pi)
_INV_2PI: float = 1.0 / (2.0 * math.pi)
_FLOAT32_TINY: float = float(torch.finfo(torch.float32).tiny)
_FLOAT32_EPS: float = float(torch.finfo(torch.float32).eps)
# Same floor as the torch dipole kernel: keeps s^-1.5 finite for a point on a vertex (sigma = 0).
_DIPOLE_FLOOR: float = _FLOAT32_TINY ** (1.0 / 3.0)


def triton_available() -> bool:
    """Whether Triton imported (the kernels exist). Says nothing about a GPU being present."""
    return triton is not None


def interpreter_active() -> bool:
    """Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # another Triton layout: trust the variable
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(_dipole_forward_kernel, InterpretedFunction)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` if the kernels can run on tensors of ``device``, else why not (for an error message)."""
    if triton is None:
        return f"Triton is not importable ({_IMPORT_ERROR!r}); install triton or use backend='torch'"
    if device.type == "cuda":
        return None
    if interpreter_active():
        return None
    return (f"the Triton kernels run on CUDA tensors (got {device.type}); on the CPU they run only under the "
            "Triton interpreter (set TRITON_INTERPRET=1 before triton is imported, slow, for tests), "
            "otherwise use backend='torch'")


if triton is not None:

    @triton.jit
    def _load3(base, idx, mask):
        """The three coordinates of rows ``idx`` of a contiguous ``(rows, 3)`` float tensor at ``base`` (0 where
        masked)."""
        return (tl.load(base + idx * 3 + 0, mask=mask, other=0.0), tl.load(base + idx * 3 + 1, mask=mask, other=0.0),
                tl.load(base + idx * 3 + 2, mask=mask, other=0.0))

    @triton.jit
    def _atan2(y, x):
        """float32 ``atan2(y, x)``: octant reduction to ``|z| <= tan(pi/8)`` and Cephes' atanf polynomial."""
        ax = tl.abs(x)
        ay = tl.abs(y)
        mx = tl.maximum(ax, ay)
        mn = tl.minimum(ax, ay)
        t = tl.div_rn(mn, tl.where(mx > 0.0, mx, 1.0))                  # in [0, 1]
        big = t > 0.41421356237309503                                  # tan(pi / 8)
        z = tl.where(big, tl.div_rn(t - 1.0, t + 1.0), t)              # |z| <= tan(pi / 8)
        z2 = z * z
        p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2
             - 3.33329491539e-1) * z2 * z + z
        a = tl.where(big, p + 0.78539816339744831, p)                  # atan(t) in [0, pi/4]
        a = tl.where(ay > ax, 1.5707963267948966 - a, a)               # [0, pi/2]
        a = tl.where(x < 0.0, 3.1415926535897932 - a, a)               # [0, pi]
        return tl.where(y < 0.0, -a, a)

    @triton.jit
    def _dipole_forward_kernel(p_ptr, v_ptr, m_ptr, w_ptr, B, N, V, V_PER_SPLIT, sigma2, floor, scale,
                               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Partial sums ``w[split, b, n]`` over the vertices ``[split * V_PER_SPLIT, ...)``.

        Grid (point blocks, B, splits)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        pb = p_ptr + b * N * 3
        vb = v_ptr + b * V * 3
        mb = m_ptr + b * V * 3
        px, py, pz = _load3(pb, offs_n, mask_n)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        v_start = split * V_PER_SPLIT
        v_end = tl.minimum(V, v_start + V_PER_SPLIT)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_end
            vx, vy, vz = _load3(vb, offs_v, mask_v)
            mx, my, mz = _load3(mb, offs_v, mask_v)
            dx = vx[None, :] - px[:, None]                             # (BLOCK_N, BLOCK_V)  vertex - point
            dy = vy[None, :] - py[:, None]
            dz = vz[None, :] - pz[:, None]
            s = tl.maximum(dx * dx + dy * dy + dz * dz + sigma2, floor)
            inv = tl.div_rn(1.0, s * tl.sqrt_rn(s))                    # s^-3/2
            num = dx * mx[None, :] + dy * my[None, :] + dz * mz[None, :]
            acc += tl.sum(tl.where(mask_v[None, :], num * inv, 0.0), axis=1)
        tl.store(w_ptr + (split * B + b) * N + offs_n, acc * scale, mask=mask_n)

    @triton.jit
    def _dipole_backward_points_kernel(p_ptr, v_ptr, m_ptr, g_ptr, gp_ptr, B, N, V, V_PER_SPLIT, sigma2, floor,
                                       scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Partial point gradients ``gp[split, b, n, :]``: grid (n-blocks, B, splits over the vertices)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        pb = p_ptr + b * N * 3
        vb = v_ptr + b * V * 3
        mb = m_ptr + b * V * 3
        px, py, pz = _load3(pb, offs_n, mask_n)
        g = tl.load(g_ptr + b * N + offs_n, mask=mask_n, other=0.0)
        ax = tl.zeros([BLOCK_N], dtype=tl.float32)
        ay = tl.zeros([BLOCK_N], dtype=tl.float32)
        az = tl.zeros([BLOCK_N], dtype=tl.float32)
        v_start = split * V_PER_SPLIT
        v_end = tl.minimum(V, v_start + V_PER_SPLIT)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_end
            vx, vy, vz = _load3(vb, offs_v, mask_v)
            mx, my, mz = _load3(mb, offs_v, mask_v)
            dx = vx[None, :] - px[:, None]
            dy = vy[None, :] - py[:, None]
            dz = vz[None, :] - pz[:, None]
            s_raw = dx * dx + dy * dy + dz * dz + sigma2
            s = tl.maximum(s_raw, floor)
            inv = tl.div_rn(1.0, s * tl.sqrt_rn(s))
            num = dx * mx[None, :] + dy * my[None, :] + dz * mz[None, :]
            # d(num s^-3/2)/dd = m s^-3/2 - 3 num s^-5/2 d  (no s-term where the floor clamps, as in torch)
            c2 = tl.where(s_raw >= floor, tl.div_rn(-3.0 * num * inv, s), 0.0)
            c2 = tl.where(mask_v[None, :], c2, 0.0)
            c1 = tl.where(mask_v[None, :], inv, 0.0)
            ax += tl.sum(mx[None, :] * c1 + dx * c2, axis=1)
            ay += tl.sum(my[None, :] * c1 + dy * c2, axis=1)
            az += tl.sum(mz[None, :] * c1 + dz * c2, axis=1)
        f = -g * scale                                                 # d = v - p: dd/dp = -I
        gpb = gp_ptr + (split * B + b) * N * 3
        tl.store(gpb + offs_n * 3 + 0, ax * f, mask=mask_n)
        tl.store(gpb + offs_n * 3 + 1, ay * f, mask=mask_n)
        tl.store(gpb + offs_n * 3 + 2, az * f, mask=mask_n)

    @triton.jit
    def _dipole_backward_vertices_kernel(p_ptr, v_ptr, m_ptr, g_ptr, gv_ptr, gm_ptr, B, N, V, N_PER_SPLIT, sigma2,
                                         floor, scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Partial vertex and moment gradients ``gv, gm [split, b, v, :]``: grid (v-blocks, B, splits over points)."""
        pid_v = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        pb = p_ptr + b * N * 3
        vb = v_ptr + b * V * 3
        mb = m_ptr + b * V * 3
        vx, vy, vz = _load3(vb, offs_v, mask_v)
        mx, my, mz = _load3(mb, offs_v, mask_v)
        gvx = tl.zeros([BLOCK_V], dtype=tl.float32)
        gvy = tl.zeros([BLOCK_V], dtype=tl.float32)
        gvz = tl.zeros([BLOCK_V], dtype=tl.float32)
        gmx = tl.zeros([BLOCK_V], dtype=tl.float32)
        gmy = tl.zeros([BLOCK_V], dtype=tl.float32)
        gmz = tl.zeros([BLOCK_V], dtype=tl.float32)
        n_start = split * N_PER_SPLIT
        n_end = tl.minimum(N, n_start + N_PER_SPLIT)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_end
            px, py, pz = _load3(pb, offs_n, mask_n)
            g = tl.load(g_ptr + b * N + offs_n, mask=mask_n, other=0.0)   # 0 for masked points
            dx = vx[None, :] - px[:, None]                             # (BLOCK_N, BLOCK_V)
            dy = vy[None, :] - py[:, None]
            dz = vz[None, :] - pz[:, None]
            s_raw = dx * dx + dy * dy + dz * dz + sigma2
            s = tl.maximum(s_raw, floor)
            inv = tl.div_rn(1.0, s * tl.sqrt_rn(s))
            num = dx * mx[None, :] + dy * my[None, :] + dz * mz[None, :]
            c1 = g[:, None] * inv
            c2 = tl.where(s_raw >= floor, tl.div_rn(-3.0 * num * c1, s), 0.0)
            gmx += tl.sum(dx * c1, axis=0)
            gmy += tl.sum(dy * c1, axis=0)
            gmz += tl.sum(dz * c1, axis=0)
            gvx += tl.sum(mx[None, :] * c1 + dx * c2, axis=0)
            gvy += tl.sum(my[None, :] * c1 + dy * c2, axis=0)
            gvz += tl.sum(mz[None, :] * c1 + dz * c2, axis=0)
        gvb = gv_ptr + (split * B + b) * V * 3
        gmb = gm_ptr + (split * B + b) * V * 3
        tl.store(gvb + offs_v * 3 + 0, gvx * scale, mask=mask_v)
        tl.store(gvb + offs_v * 3 + 1, gvy * scale, mask=mask_v)
        tl.store(gvb + offs_v * 3 + 2, gvz * scale, mask=mask_v)
        tl.store(gmb + offs_v * 3 + 0, gmx * scale, mask=mask_v)
        tl.store(gmb + offs_v * 3 + 1, gmy * scale, mask=mask_v)
        tl.store(gmb + offs_v * 3 + 2, gmz * scale, mask=mask_v)

    @triton.jit
    def _exact_forward_kernel(p_ptr, v_ptr, f_ptr, radius_ptr, w_ptr, B, N, V, F, F_PER_SPLIT, tol_factor, tiny,
                              scale, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
        """Partial sums ``w[split, b, n]`` over the faces ``[split * F_PER_SPLIT, ...)``.

        Grid (point blocks, B, splits)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        pb = p_ptr + b * N * 3
        vb = v_ptr + b * V * 3
        px, py, pz = _load3(pb, offs_n, mask_n)
        radius = tl.load(radius_ptr + b)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        f_start = split * F_PER_SPLIT
        f_end = tl.minimum(F, f_start + F_PER_SPLIT)
        for f0 in range(f_start, f_end, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < f_end
            i0 = tl.load(f_ptr + offs_f * 3 + 0, mask=mask_f, other=0)
            i1 = tl.load(f_ptr + offs_f * 3 + 1, mask=mask_f, other=0)
            i2 = tl.load(f_ptr + offs_f * 3 + 2, mask=mask_f, other=0)
            ax_, ay_, az_ = _load3(vb, i0, mask_f)
            bx_, by_, bz_ = _load3(vb, i1, mask_f)
            cx_, cy_, cz_ = _load3(vb, i2, mask_f)
            # Per-face quantities, as in the torch kernel: N = (B - A) x (C - A), squared edge lengths.
            ux = bx_ - ax_
            uy = by_ - ay_
            uz = bz_ - az_
            wx = cx_ - ax_
            wy = cy_ - ay_
            wz = cz_ - az_
            nx = uy * wz - uz * wy
            ny = uz * wx - ux * wz
            nz = ux * wy - uy * wx
            nlen = tl.sqrt_rn(nx * nx + ny * ny + nz * nz)
            e_ab = ux * ux + uy * uy + uz * uz
            e_bc = (cx_ - bx_) * (cx_ - bx_) + (cy_ - by_) * (cy_ - by_) + (cz_ - bz_) * (cz_ - bz_)
            e_ca = wx * wx + wy * wy + wz * wz
            # Offsets corner - point, (BLOCK_N, BLOCK_F).
            dax = ax_[None, :] - px[:, None]
            day = ay_[None, :] - py[:, None]
            daz = az_[None, :] - pz[:, None]
            dbx = bx_[None, :] - px[:, None]
            dby = by_[None, :] - py[:, None]
            dbz = bz_[None, :] - pz[:, None]
            dcx = cx_[None, :] - px[:, None]
            dcy = cy_[None, :] - py[:, None]
            dcz = cz_[None, :] - pz[:, None]
            det = dax * nx[None, :] + day * ny[None, :] + daz * nz[None, :]   # a.(b x c) = N.(A - p)
            sa = dax * dax + day * day + daz * daz
            sb = dbx * dbx + dby * dby + dbz * dbz
            sc = dcx * dcx + dcy * dcy + dcz * dcz
            la = tl.sqrt_rn(tl.maximum(sa, tiny))
            lb = tl.sqrt_rn(tl.maximum(sb, tiny))
            lc = tl.sqrt_rn(tl.maximum(sc, tiny))
            den = la * lb * lc + 0.5 * ((sa + sb - e_ab[None, :]) * lc + (sb + sc - e_bc[None, :]) * la
                                        + (sc + sa - e_ca[None, :]) * lb)
            # A point in the plane of the face (|det| within its rounding error) sees it edge-on: Omega = 0.
            tol = tol_factor * nlen[None, :] * (la + radius)
            keep = (tl.abs(det) > tol) & mask_f[None, :]
            omega_half = _atan2(tl.where(keep, det, 0.0), tl.where(keep, den, 1.0))
            acc += tl.sum(tl.where(keep, omega_half, 0.0), axis=1)
        tl.store(w_ptr + (split * B + b) * N + offs_n, acc * scale, mask=mask_n)


def _target_programs(device: torch.device) -> int:
    """Programs to aim for per launch: a few per SM on a GPU; a handful under the interpreter (enough to
    exercise the split path in the tests, few enough to keep it quick)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


_SM_COUNTS: dict = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = int(torch.cuda.get_device_properties(index).multi_processor_count)
    return _SM_COUNTS[index]


def _split(outer_programs: int, inner: int, block: int, device: torch.device,
           splits: Optional[int] = None) -> tuple[int, int]:
    """``(number of splits, elements per split)`` of the inner (looped) axis.

    A launch has ``outer_programs`` programs (output blocks x meshes); when that is too few to fill the
    GPU (e.g. the vertex-gradient kernel: 2562 vertices = 81 blocks of 32 for one mesh), the inner loop is
    cut into ``splits`` contiguous ranges of whole tiles, each program writes its partial sums to its own
    slice of a ``(splits, ...)`` buffer, and torch sums the slices: no atomics, deterministic for a given
    device and shape.
    """
    tiles = max(1, -(-inner // block))
    if splits is None:
        splits = -(-_target_programs(device) // max(1, outer_programs))
    splits = max(1, min(int(splits), tiles))
    tiles_per_split = -(-tiles // splits)
    return -(-tiles // tiles_per_split), tiles_per_split * block


def _blocks(block_n: Optional[int], block_k: Optional[int], default_n: int, default_k: int) -> tuple[int, int]:
    """Tile sizes: the given ones (powers of two), else the GPU defaults, or INTERPRETER_BLOCK_* under the
    interpreter (fewer, larger tiles: it pays per tile, not per element)."""
    if interpreter_active():
        default_n, default_k = INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_K
    out = (default_n if block_n is None else block_n, default_k if block_k is None else block_k)
    for name, b in zip(("block_n", "block_k"), out):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1):
            raise ValueError(f"{name} must be a positive power of two (a Triton tile size), got {b!r}")
    return out


def _check_launch(*xs: Tensor) -> None:
    reason = unavailable_reason(xs[0].device)
    if reason is not None:
        raise ValueError(reason)
    for x in xs:
        if x.dtype != torch.float32:
            raise TypeError(f"the Triton kernels take float32 tensors, got {x.dtype}")


class _DeviceGuard:
    """``torch.cuda.device(d)`` for CUDA tensors (Triton launches on the current device), else nothing."""

    def __init__(self, device: torch.device) -> None:
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _reduce(partial: Tensor) -> Tensor:
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def dipole_forward(points: Tensor, vertices: Tensor, moments: Tensor, smoothing: float,
                   block_n: Optional[int] = None, block_v: Optional[int] = None,
                   splits: Optional[int] = None) -> Tensor:
    """Dipole winding numbers ``(B, N)`` of points ``(B, N, 3)``; vertices and moments ``(B, V, 3)``, float32.

    ``splits``: cut the vertex loop into this many ranges (default: enough programs to fill the device).
    """
    _check_launch(points, vertices, moments)
    block_n, block_v = _blocks(block_n, block_v, DIPOLE_BLOCK_N, DIPOLE_BLOCK_V)
    p, v, m = points.contiguous(), vertices.contiguous(), moments.contiguous()
    batch, n, nv = p.shape[0], p.shape[1], v.shape[1]
    if batch == 0 or n == 0:
        return p.new_zeros(batch, n)
    blocks_n = triton.cdiv(n, block_n)
    ns, per = _split(blocks_n * batch, nv, block_v, p.device, splits)
    w = torch.empty(ns, batch, n, device=p.device, dtype=torch.float32)
    with _DeviceGuard(p.device):
        _dipole_forward_kernel[(blocks_n, batch, ns)](
            p, v, m, w, batch, n, nv, per, float(smoothing) ** 2, _DIPOLE_FLOOR, _INV_4PI,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return _reduce(w)


def dipole_backward(points: Tensor, vertices: Tensor, moments: Tensor, smoothing: float, grad_w: Tensor,
                    need_points: bool = True, need_mesh: bool = True,
                    block_n: Optional[int] = None, block_v: Optional[int] = None,
                    splits: Optional[int] = None):
    """Gradients ``(d/dpoints, d/dvertices, d/dmoments)`` of ``sum(grad_w * w)``; ``None`` where not needed.

    ``d/dvertices`` is the derivative wrt the ``v`` of ``v - p`` only (``m`` held fixed); the caller's
    autograd adds the part through ``m(vertices)``. ``splits`` as in :func:`dipole_forward` (for both
    kernels: the point kernel splits its vertex loop, the vertex kernel its point loop).
    """
    _check_launch(points, vertices, moments, grad_w)
    block_n, block_v = _blocks(block_n, block_v, DIPOLE_BLOCK_N, DIPOLE_BLOCK_V)
    p, v, m, g = points.contiguous(), vertices.contiguous(), moments.contiguous(), grad_w.contiguous()
    batch, n, nv = p.shape[0], p.shape[1], v.shape[1]
    sigma2 = float(smoothing) ** 2
    gp = gv = gm = None
    if batch == 0 or n == 0:
        return (torch.zeros_like(p) if need_points else None,
                torch.zeros_like(v) if need_mesh else None, torch.zeros_like(m) if need_mesh else None)
    with _DeviceGuard(p.device):
        if need_points:
            blocks_n = triton.cdiv(n, block_n)
            ns, per = _split(blocks_n * batch, nv, block_v, p.device, splits)
            gp = torch.empty(ns, batch, n, 3, device=p.device, dtype=torch.float32)
            _dipole_backward_points_kernel[(blocks_n, batch, ns)](
                p, v, m, g, gp, batch, n, nv, per, sigma2, _DIPOLE_FLOOR, _INV_4PI,
                BLOCK_N=block_n, BLOCK_V=block_v, num_warps=NUM_WARPS)
            gp = _reduce(gp)
        if need_mesh:
            blocks_v = triton.cdiv(nv, block_v)
            ns, per = _split(blocks_v * batch, n, block_n, p.device, splits)
            gv = torch.empty(ns, batch, nv, 3, device=p.device, dtype=torch.float32)
            gm = torch.empty_like(gv)
            _dipole_backward_vertices_kernel[(blocks_v, batch, ns)](
                p, v, m, g, gv, gm, batch, n, nv, per, sigma2, _DIPOLE_FLOOR, _INV_4PI,
                BLOCK_N=block_n, BLOCK_V=block_v, num_warps=NUM_WARPS)
            gv, gm = _reduce(gv), _reduce(gm)
    return gp, gv, gm


class TritonDipoleWinding(torch.autograd.Function):
    """Autograd wrapper of the dipole kernels: ``w = TritonDipoleWinding.apply(points, vertices, moments,
    smoothing, block_n, block_v, splits)`` with ``(B, N, 3)``, ``(B, V, 3)``, ``(B, V, 3)`` float32 tensors,
    ``w (B, N)``.

    Backward returns the gradients wrt ``points``, ``vertices`` (as the ``v`` of ``v - p``) and ``moments``;
    compute ``moments`` from the vertices under torch autograd to get the full vertex gradient.
    First derivatives only.
    """

    @staticmethod
    def forward(ctx, points: Tensor, vertices: Tensor, moments: Tensor, smoothing: float,
                block_n: Optional[int] = None, block_v: Optional[int] = None,
                splits: Optional[int] = None) -> Tensor:
        ctx.smoothing, ctx.launch = float(smoothing), (block_n, block_v, splits)
        ctx.save_for_backward(points, vertices, moments)
        return dipole_forward(points, vertices, moments, smoothing, block_n, block_v, splits)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_w: Tensor):
        points, vertices, moments = ctx.saved_tensors
        need_p, need_v, need_m = ctx.needs_input_grad[:3]
        block_n, block_v, splits = ctx.launch
        gp, gv, gm = dipole_backward(points, vertices, moments, ctx.smoothing, grad_w.to(torch.float32),
                                     need_points=need_p, need_mesh=need_v or need_m,
                                     block_n=block_n, block_v=block_v, splits=splits)
        return gp, (gv if need_v else None), (gm if need_m else None), None, None, None, None


def dipole_winding(points: Tensor, vertices: Tensor, moments: Tensor, smoothing: float,
                   block_n: Optional[int] = None, block_v: Optional[int] = None,
                   splits: Optional[int] = None) -> Tensor:
    """Differentiable dipole winding numbers ``(B, N)`` (see :class:`TritonDipoleWinding`)."""
    return TritonDipoleWinding.apply(points, vertices, moments, smoothing, block_n, block_v, splits)


def exact_winding(points: Tensor, vertices: Tensor, faces: Tensor,
                  block_n: Optional[int] = None, block_f: Optional[int] = None,
                  splits: Optional[int] = None) -> Tensor:
    """Exact (solid-angle) winding numbers ``(B, N)``, forward only (no autograd graph).

    ``points (B, N, 3)`` and ``vertices (B, V, 3)`` float32, centred per mesh (as ``winding_number``
    does); ``faces (F, 3)`` integer indices shared by the batch, assumed in range. ``splits`` cuts the
    face loop (default: enough programs to fill the device).
    """
    _check_launch(points, vertices)
    block_n, block_f = _blocks(block_n, block_f, EXACT_BLOCK_N, EXACT_BLOCK_F)
    p, v = points.detach().contiguous(), vertices.detach().contiguous()
    f = faces.to(device=p.device, dtype=torch.int32).contiguous()
    batch, n, nv, nf = p.shape[0], p.shape[1], v.shape[1], f.shape[0]
    if batch == 0 or n == 0:
        return p.new_zeros(batch, n)
    radius = v.norm(dim=-1).amax(dim=1).contiguous()            # (B,) mesh size, as the torch kernel
    blocks_n = triton.cdiv(n, block_n)
    ns, per = _split(blocks_n * batch, nf, block_f, p.device, splits)
    w = torch.empty(ns, batch, n, device=p.device, dtype=torch.float32)
    with _DeviceGuard(p.device):
        _exact_forward_kernel[(blocks_n, batch, ns)](
            p, v, f, radius, w, batch, n, nv, nf, per, DET_TOL * _FLOAT32_EPS, _FLOAT32_TINY, _INV_2PI,
            BLOCK_N=block_n, BLOCK_F=block_f, num_warps=NUM_WARPS)
    return _reduce(w)
