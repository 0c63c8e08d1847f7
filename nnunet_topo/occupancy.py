"""Differentiable inside/outside of closed triangle meshes: generalised winding number and occupancy.

Implements the occupancy function of C. Zhang, Y. Luo, Y. Wu, C. H. Yap, G. Yang, *Topology-Preserving
Loss for Accurate and Anatomically Consistent Cardiac Mesh Reconstruction* (TPM, arXiv:2503.07874),
Eq. 5, and its binary cross-entropy (Eq. 10-11). The sum printed as Eq. 5 omits the normal; we use the
generalised winding number of an oriented surface (A. Jacobson, L. Kavan, O. Sorkine-Hornung, *Robust
inside-outside segmentation using generalized winding numbers*, SIGGRAPH 2013) in two forms:

* ``"exact"`` (default): ``w(p) = sum_f Omega_f(p) / (4 pi)`` with the signed solid angle of triangle
  ``(A, B, C)`` seen from ``p`` (A. Van Oosterom, J. Strackee, IEEE TBME 30(2), 1983)::

      tan(Omega / 2) = a.(b x c) / (|a||b||c| + (a.b)|c| + (b.c)|a| + (c.a)|b|),   a = A - p, ...

  evaluated with ``atan2`` so every quadrant is right. ``w`` is 1 inside a closed, outward-oriented
  mesh, 0 outside, 1/2 on a face, -1 inside an inward-oriented one, and counts nested or
  self-overlapping parts (2 where two shells overlap).
* ``"dipole"``: the one-point-per-vertex quadrature of the same surface integral (the dipole form of
  fast winding numbers, G. Barill et al., SIGGRAPH 2018)::

      w(p) = sum_v m_v . (v - p) / (4 pi |v - p|^3),   m_v = A_v n_v = sum_{f incident to v} area_f n_f / 3

  with ``A_v`` the dual vertex area (one third of the incident face areas) and ``n_v`` the
  area-weighted mean of the incident unit face normals (not re-normalised: this keeps
  ``sum_v m_v = 0`` and ``sum_v m_v v^T = volume * I`` exact, so ``w`` is exact far from the mesh).
  It is accurate where the distance to the surface is large against the edge length, singular at the
  vertices, and neither 0/1 nor bounded close to the surface.

**Gradients.** Both forms are differentiable in the vertex positions (and in the points). For a
*closed* mesh, however, the exact ``w`` is an integer at every point off the surface, so it is locally
constant in the vertex positions: its gradient is zero (up to rounding) and a BCE on it trains nothing.
A training loss needs a smooth occupancy: ``method="dipole"`` with ``smoothing=sigma > 0`` replaces
the kernel ``|r|^-3`` by ``(|r|^2 + sigma^2)^-3/2``. Its exact surface integral is the mesh's indicator
convolved with the normalised Plummer density ``3 sigma^2 / (4 pi (|r|^2 + sigma^2)^(5/2))``: values in
[0, 1], exactly 1/2 on a flat surface, a transition about ``sigma`` wide, and the right gradient
sign (moving the surface outward raises the occupancy everywhere). The vertex quadrature of it is good
when ``sigma`` is at least about the edge length. See ``documentation/occupancy.md``.

**Occupancy** is ``clamp(w, eps, 1 - eps)`` so that the logarithms of a BCE stay finite
(``eps = 1e-4`` bounds a single point's loss by ``-log(1e-4) = 9.2``).

**Cost and memory.** Every (point, face) pair (exact) or (point, vertex) pair (dipole) is evaluated:
no hierarchy. Work is cut into blocks of at most ``chunk_size`` pairs (over meshes of a batch, points,
and faces or vertices); the backward pass recomputes each block instead of storing it, so memory
is bounded by the block size whatever the number of points: in float32 about 100 (exact) / 55 (plain dipole)
bytes per pair in the forward pass and 250 / 130 in the backward pass (1 GB for the default exact block). The
smoothed dipole (the training occupancy) uses :class:`_DipoleWinding`: ``(b, n, V)`` tensors and a closed-form
backward, its blocks kept for the backward when the call is one block.

**Backends.** ``backend="torch"`` (the default) is the chunked torch code above. ``backend="triton"``
runs fused tiled Triton kernels (:mod:`nnunet_topo.occupancy_triton`: the dipole form forward and
backward, the exact form forward only) on CUDA tensors; on CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1``, for tests). ``"auto"`` picks Triton for CUDA tensors when it is
importable, else torch. The default is ``DEFAULT_BACKEND`` unless the environment variable
``NNUNET_TOPO_OCCUPANCY_BACKEND`` names another. It stays ``"torch"`` until a GPU measurement
(``benchmarks/bench_occupancy.py --backends torch triton``) shows the kernels are faster: so far they
are checked against the torch code only on the CPU, through the interpreter.

Coordinates: points and vertices share one frame and unit (voxels or mm); ``w`` is unitless.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from nnunet_topo.faces_cache import once_per_faces
from nnunet_topo.occupancy_triton import DET_TOL  # the in-plane tolerance, shared with the Triton kernels

METHODS: tuple[str, ...] = ("exact", "dipole")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
DEFAULT_CHUNK_SIZE: int = 2 ** 22
DEFAULT_EPS: float = 1e-4
BACKENDS: tuple[str, ...] = ("torch", "triton", "auto")
# Keep "torch" until a GPU run shows the Triton kernels are faster (see the module docstring).
DEFAULT_BACKEND: str = "torch"
BACKEND_ENV_VAR: str = "NNUNET_TOPO_OCCUPANCY_BACKEND"
#: NaN checks of points and vertices without a host synchronisation (``torch._assert_async``: the error surfaces at
#: the next sync) — None: on accelerators only (on the CPU a ValueError at once); True / False: everywhere / nowhere
SYNC_FREE_CHECKS: Optional[bool] = None

_MeshTensors = tuple[Tensor, ...]
# kernel(points (b, n, 3), mesh tensors (b, ...), element slice) -> partial winding numbers (b, n)
_Kernel = Callable[[Tensor, _MeshTensors, slice], Tensor]


# ----------------------------------------------------------------------------------------------------
# kernels: one block of (meshes x points x faces-or-vertices)
# ----------------------------------------------------------------------------------------------------

def _exact_kernel(faces: Tensor) -> _Kernel:
    """Solid-angle kernel over the faces ``faces[k_slice]``; mesh tensors = ``(vertices (b, V, 3),)``.

    Element-major layout ``(faces or vertices, b, [3,] n)``: the per-face gathers pick whole rows (fast
    forward and backward), and the coordinate axis lies before the points (contiguous reductions).
    """

    def kernel(p: Tensor, mesh: _MeshTensors, ks: slice) -> Tensor:
        (v,) = mesh
        f = faces[ks]
        i0, i1, i2 = f[:, 0], f[:, 1], f[:, 2]
        finfo = torch.finfo(p.dtype)
        radius = v.detach().norm(dim=-1).amax(dim=1).view(1, -1, 1)   # (1, b, 1) mesh size (centred)
        vt = v.transpose(0, 1)                                   # (V, b, 3)
        # Per-vertex offsets and distances, shared by the faces around a vertex.
        d = vt.unsqueeze(-1) - p.transpose(1, 2).unsqueeze(0)    # (V, b, 3, n)  vertex - point
        s = (d * d).sum(2)                                       # (V, b, n)     squared distances
        r = s.clamp_min(finfo.tiny).sqrt()                       # clamp: finite gradient at a vertex
        va, vb, vc = vt[i0], vt[i1], vt[i2]                      # (f, b, 3)
        normal2 = torch.linalg.cross(vb - va, vc - va)           # (f, b, 3)  2 * area * unit normal
        # a.(b x c) = N.(A - p) (6 x the signed tetrahedron volume), from the exact offset of one corner.
        det = (d[i0] * normal2.unsqueeze(-1)).sum(2)             # (f, b, n)
        # a.b = (|a|^2 + |b|^2 - |A - B|^2) / 2: no per-pair 3-vector products needed.
        e_ab = ((vb - va) ** 2).sum(-1).unsqueeze(-1)            # (f, b, 1)
        e_bc = ((vc - vb) ** 2).sum(-1).unsqueeze(-1)
        e_ca = ((va - vc) ** 2).sum(-1).unsqueeze(-1)
        sa, sb, sc = s[i0], s[i1], s[i2]                         # (f, b, n)
        la, lb, lc = r[i0], r[i1], r[i2]
        den = la * lb * lc + 0.5 * ((sa + sb - e_ab) * lc + (sb + sc - e_bc) * la + (sc + sa - e_ca) * lb)
        # A point in the plane of a face (|det| within its rounding error) sees the face edge-on: principal
        # value Omega = 0, so w = 1/2 on a face and no atan2(0, 0) (NaN gradient) on edges and corners.
        tol = (DET_TOL * finfo.eps) * normal2.norm(dim=-1).unsqueeze(-1) * (la + radius)
        in_plane = det.abs() <= tol
        det = torch.where(in_plane, 0.0, det)
        den = torch.where(in_plane, 1.0, den)
        # Omega = 2 atan2(det, den); w = sum Omega / (4 pi).
        return torch.atan2(det, den).sum(0) * (1.0 / (2.0 * math.pi))

    return kernel


def _dipole_kernel(smoothing: float) -> _Kernel:
    """Dipole kernel over the vertices ``[k_slice]``; mesh tensors = ``(vertices, moments)``, (b, V, 3)."""
    sigma2 = float(smoothing) ** 2

    def kernel(p: Tensor, mesh: _MeshTensors, ks: slice) -> Tensor:
        vt = mesh[0][:, ks].transpose(0, 1).unsqueeze(-1)       # (k, b, 3, 1)
        mt = mesh[1][:, ks].transpose(0, 1).unsqueeze(-1)
        d = vt - p.transpose(1, 2).unsqueeze(0)                  # (k, b, 3, n)  vertex - point
        s = (d * d).sum(2)                                       # (k, b, n)
        if sigma2 > 0:
            s = s + sigma2
        # floor: keeps s^-1.5 and its derivative finite for a point exactly on a vertex (sigma = 0).
        floor = torch.finfo(p.dtype).tiny ** (1.0 / 3.0)
        num = (d * mt).sum(2)                                    # (k, b, n)
        return (num * s.clamp_min(floor).pow(-1.5)).sum(0) * (1.0 / (4.0 * math.pi))

    return kernel


def _vertex_moments(vertices: Tensor, faces: Tensor) -> Tensor:
    """``m_v = sum_{f incident to v} area_f n_f / 3`` (dual area times area-weighted normal), (B, V, 3)."""
    va, vb, vc = vertices[:, faces[:, 0]], vertices[:, faces[:, 1]], vertices[:, faces[:, 2]]
    third = torch.linalg.cross(vb - va, vc - va) * (1.0 / 6.0)   # (B, F, 3): area_f n_f / 3
    m = torch.zeros_like(vertices)
    for k in range(3):
        m = m.index_add(1, faces[:, k], third)
    return m


# ----------------------------------------------------------------------------------------------------
# chunked evaluation with recomputation in the backward pass
# ----------------------------------------------------------------------------------------------------

def _blocks(size: int, step: int):
    for start in range(0, size, step):
        yield slice(start, min(start + step, size))


def _block_sizes(batch: int, num_points: int, num_elements: int, chunk_size: int) -> tuple[int, int, int]:
    """Block sizes (meshes, points, elements) with at most ``chunk_size`` pairs per block."""
    kb = min(num_elements, chunk_size)
    nb = max(1, min(num_points, chunk_size // kb))
    bb = max(1, min(batch, chunk_size // (kb * nb)))
    return bb, nb, kb


class _ChunkedWinding(torch.autograd.Function):
    """``w[b, n] = sum_k kernel(points[b, n], mesh[b], k)``, evaluated block by block.

    The forward pass keeps no intermediate; the backward pass recomputes one block at a time under
    autograd, so memory stays bounded by the block size. First derivatives only.
    """

    @staticmethod
    def forward(ctx, kernel: _Kernel, num_elements: int, chunk_size: int, points: Tensor,
                *mesh: Tensor) -> Tensor:
        batch, num_points = points.shape[0], points.shape[1]
        bb, nb, kb = _block_sizes(batch, num_points, num_elements, chunk_size)
        out = points.new_zeros(batch, num_points)
        for bs in _blocks(batch, bb):
            mesh_b = tuple(t[bs] for t in mesh)
            for ns in _blocks(num_points, nb):
                p = points[bs, ns]
                for ks in _blocks(num_elements, kb):
                    out[bs, ns] += kernel(p, mesh_b, ks)
        ctx.kernel, ctx.blocks, ctx.num_elements = kernel, (bb, nb, kb), num_elements
        ctx.save_for_backward(points, *mesh)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        points, *mesh = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_points = needs[3]
        need_mesh = needs[4:]
        bb, nb, kb = ctx.blocks
        batch, num_points = points.shape[0], points.shape[1]
        grad_points = torch.zeros_like(points) if need_points else None
        grad_mesh = [torch.zeros_like(t) if n else None for t, n in zip(mesh, need_mesh)]
        with torch.enable_grad(), torch.autocast(device_type=points.device.type, enabled=False):
            for bs in _blocks(batch, bb):
                leaves = tuple(t[bs].detach().requires_grad_(n) for t, n in zip(mesh, need_mesh))
                for ns in _blocks(num_points, nb):
                    p = points[bs, ns].detach().requires_grad_(need_points)
                    g = grad_out[bs, ns]
                    for ks in _blocks(ctx.num_elements, kb):
                        w = ctx.kernel(p, leaves, ks)
                        if w.requires_grad:
                            torch.autograd.backward(w, g)
                    if need_points and p.grad is not None:
                        grad_points[bs, ns] = p.grad
                for gm, leaf in zip(grad_mesh, leaves):
                    if gm is not None and leaf.grad is not None:
                        gm[bs] = leaf.grad
        return (None, None, None, grad_points, *grad_mesh)


class _DipoleWinding(torch.autograd.Function):
    """Smoothed dipole ``w[b, n] = sum_v m_v . d / (4 pi s^1.5)``, ``d = v - p``, ``s = |d|^2 + sigma^2`` (sigma > 0)
    on ``(b, n, V)`` tensors, with a closed-form backward (issue 26: the element-wise :func:`_dipole_kernel` under
    :class:`_ChunkedWinding` built ``(V, b, 3, n)`` tensors and re-ran the forward under autograd in the backward).

    Per block of points (at most ``chunk_size`` (point, vertex) pairs over the batch), ``s`` and ``num = m.d`` are
    built one coordinate at a time (three fused multiply-adds each), and, with ``G = grad_w / (4 pi)``,
    ``A = G s^-1.5``, ``B = 3 G num s^-2.5`` (``dw/ds = -1.5 num s^-2.5``,
    ``ds/dp = -2 d``)::

        dL/dp = sum_v (-A m_v + B d)   = -A m + B v - p sum_v B
        dL/dv = sum_n ( A m_v - B d)   = m sum_n A - v sum_n B + B^T p
        dL/dm = sum_n  A d             = v sum_n A - A^T p

    batched matrix products. When the whole call is one block (the trainers' L_occ: 2048 points x 642 vertices
    x batch 3 is below ``DEFAULT_CHUNK_SIZE``), ``s``, ``s^-1.5`` and ``num`` are kept for the backward instead of
    recomputed: at most three blocks' worth of memory (about 50 MB at ``DEFAULT_CHUNK_SIZE`` in float32).
    The backward's ``B v - p sum_v B`` is an expansion of ``sum_v B d``; its rounding, with the mesh centred
    (:func:`winding_number` does), stays within 1e-5 of the float64 value (measured: 1e-6 to 3e-6 in float32).
    Compared with the element-wise form and a naive loop in tests/test_occupancy_dipole.py.
    """

    @staticmethod
    def _block(p: Tensor, v: Tensor, m: Tensor, sigma2: float):
        """``s``, ``s^-1.5``, ``num`` of points ``p`` (b, n, 3) against every vertex, (b, n, V) each. The offsets
        ``v - p`` are formed one coordinate at a time (exact, as the element-wise kernel; the expansion
        ``|p|^2 + |v|^2 - 2 p.v`` lost 20x the precision near the surface in float32)."""
        s = p.new_full((p.shape[0], p.shape[1], v.shape[1]), sigma2)
        num = torch.zeros_like(s)
        for k in range(3):
            d = v[..., k].unsqueeze(1) - p[..., k].unsqueeze(2)
            s.addcmul_(d, d)
            num.addcmul_(m[..., k].unsqueeze(1).expand_as(d), d)
        return s, s.pow(-1.5), num

    @staticmethod
    def forward(ctx, sigma2: float, chunk_size: int, points: Tensor, vertices: Tensor, moments: Tensor) -> Tensor:
        assert sigma2 > 0, "the smoothed dipole only (sigma > 0)"
        batch, num_points, num_vertices = points.shape[0], points.shape[1], vertices.shape[1]
        step = max(1, chunk_size // max(1, batch * num_vertices))
        out = points.new_empty(batch, num_points)
        kept = None
        for ns in _blocks(num_points, step):
            s, k, num = _DipoleWinding._block(points[:, ns], vertices, moments, sigma2)
            out[:, ns] = (num * k).sum(-1) * (1.0 / (4.0 * math.pi))
            if step >= num_points and any(ctx.needs_input_grad[2:5]):
                kept = (s, k, num)
        ctx.sigma2, ctx.step, ctx.kept = sigma2, step, kept
        ctx.save_for_backward(points, vertices, moments)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        points, vertices, moments = ctx.saved_tensors
        need_p, need_v, need_m = ctx.needs_input_grad[2:5]
        grad_p = torch.empty_like(points) if need_p else None
        sum_a = vertices.new_zeros(vertices.shape[:2] + (1,))
        sum_b = vertices.new_zeros(vertices.shape[:2] + (1,))
        bt_p = torch.zeros_like(vertices)
        at_p = torch.zeros_like(vertices)
        g_all = grad_out * (1.0 / (4.0 * math.pi))
        for ns in _blocks(points.shape[1], ctx.step):
            p = points[:, ns]
            s, k, num = ctx.kept if ctx.kept is not None else _DipoleWinding._block(p, vertices, moments, ctx.sigma2)
            g = g_all[:, ns].unsqueeze(-1)
            a = g * k                                   # (b, n, V)
            b = 3.0 * a * num / s                       # 3 G num s^-2.5
            if need_p:
                grad_p[:, ns] = (-torch.bmm(a, moments) + torch.bmm(b, vertices) - p * b.sum(-1, keepdim=True))
            if need_v or need_m:
                sum_a += a.sum(1).unsqueeze(-1)
                sum_b += b.sum(1).unsqueeze(-1)
                bt_p += torch.bmm(b.transpose(1, 2), p)
                at_p += torch.bmm(a.transpose(1, 2), p)
        ctx.kept = None
        grad_v = moments * sum_a - vertices * sum_b + bt_p if need_v else None
        grad_m = vertices * sum_a - at_p if need_m else None
        return None, None, grad_p, grad_v, grad_m


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _check_options(method: str, chunk_size: int, smoothing: float) -> None:
    _check_method(method)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (points x faces per block), got {chunk_size!r}")
    if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not math.isfinite(smoothing) \
            or smoothing < 0:
        raise ValueError(f"smoothing must be a finite length >= 0 (vertex units), got {smoothing!r}")
    if smoothing > 0 and method != "dipole":
        raise ValueError("smoothing > 0 is implemented for method='dipole' only (the smoothed solid angle of a "
                         "triangle has no closed form); use method='dipole' or smoothing=0")


def _check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None for the default), got {backend!r}")


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``; ``None`` = ``$NNUNET_TOPO_OCCUPANCY_BACKEND``
    if set, else ``DEFAULT_BACKEND``. Raises ValueError if ``"triton"`` cannot run there."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or DEFAULT_BACKEND
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV_VAR}={backend!r}: must be one of {BACKENDS}")
    _check_backend(backend)
    if backend == "torch":
        return "torch"
    from nnunet_topo import occupancy_triton
    if backend == "auto":
        return "triton" if device.type == "cuda" and occupancy_triton.triton_available() else "torch"
    reason = occupancy_triton.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend='triton': {reason}")
    return "triton"


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")


def _check_coordinates(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., {'N' if name == 'points' else 'V'}, 3), "
                         f"got {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")
    if x.numel():
        _require(~torch.isnan(x).any(), f"{name} contains NaN; remove or mask those entries before calling")


def _require(ok: Tensor, message: str) -> None:
    """A data check (``ok``: a 0-d bool tensor): a ValueError at once on the CPU; on accelerators (or with
    ``SYNC_FREE_CHECKS``) ``torch._assert_async``, so a training step does not wait for the device: the check fails
    at the next synchronisation, with this message."""
    if SYNC_FREE_CHECKS is True or (SYNC_FREE_CHECKS is None and ok.device.type != "cpu"):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def _check_faces(faces: Tensor, num_vertices: int, device: torch.device) -> Tensor:
    if not isinstance(faces, Tensor):
        raise TypeError(f"faces must be an integer torch.Tensor of shape (F, 3), got {type(faces).__name__}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3) (one shared triangle list), got {tuple(faces.shape)}")
    if faces.is_floating_point() or faces.is_complex() or faces.dtype == torch.bool:
        raise TypeError(f"faces must hold integer vertex indices, got dtype {faces.dtype}")
    if faces.shape[0] == 0:
        raise ValueError("faces is empty: a mesh needs at least one triangle")
    def check_range():  # template faces are checked once, not every step: min/max read two numbers back
        lo, hi = int(faces.min()), int(faces.max())
        if lo < 0 or hi >= num_vertices:
            raise ValueError(f"faces index vertices in [{lo}, {hi}] but there are {num_vertices} vertices "
                             f"(valid indices 0..{num_vertices - 1})")
        return True

    once_per_faces(faces, "range", num_vertices, check_range)
    return faces.to(device=device, dtype=torch.long)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        if x.dtype == torch.float64:
            dtype = torch.float64
    return dtype


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------

def winding_number(
    points: Tensor,
    vertices: Union[Tensor, Sequence[Tensor]],
    faces: Union[Tensor, Sequence[Tensor]],
    method: str = "exact",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    smoothing: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Generalised winding number of points with respect to oriented triangle meshes (TPM Eq. 5).

    Args:
        points: ``(..., N, 3)`` query points, same frame and unit as ``vertices``. Leading dimensions
            broadcast against those of ``vertices`` (e.g. shared ``(N, 3)`` points for a ``(B, V, 3)``
            batch). Gradients are returned if it requires grad.
        vertices: ``(..., V, 3)`` vertex positions, differentiable. A padded batch may carry vertices
            that no face uses (any finite value): they contribute nothing. Alternatively a sequence of
            ``(V_i, 3)`` tensors, one mesh each, with ``faces`` a sequence of ``(F_i, 3)`` (meshes of
            different topology); then ``points`` is ``(N, 3)`` or ``(M, N, 3)``.
        faces: ``(F, 3)`` integer vertex indices, shared by every mesh of the batch; counter-clockwise
            seen from outside (outward normals, trimesh's convention) gives ``w = 1`` inside.
        method: ``"exact"`` (solid angles, Van Oosterom-Strackee) or ``"dipole"`` (vertex quadrature).
        chunk_size: most (point, face) pairs (exact) or (point, vertex) pairs (dipole) per block; peak
            memory is about 250 bytes per pair (exact, backward; 100 forward) in float32.
        smoothing: ``sigma`` of the smoothed dipole kernel ``(|r|^2 + sigma^2)^-3/2``, in vertex units
            (``method="dipole"`` only; 0 = the plain dipole form). See the module docstring.
        backend: ``"torch"`` (chunked torch), ``"triton"`` (fused Triton kernels; CUDA tensors, or CPU
            tensors under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton for CUDA tensors when importable,
            else torch) or ``None``: ``$NNUNET_TOPO_OCCUPANCY_BACKEND`` if set, else ``DEFAULT_BACKEND``
            (``"torch"``; it stays so until a GPU measurement shows Triton is faster). Triton computes
            the same function in float32 (``chunk_size`` is ignored, memory is O(points + vertices));
            float64 inputs and the exact form with gradients use torch.

    Returns:
        ``(..., N)`` winding numbers (``(M, N)`` for a sequence of meshes) in float32, or float64 when an
        input is float64. Autocast is disabled inside.

    Raises:
        ValueError: bad shapes, NaN coordinates, empty or out-of-range ``faces``, unknown ``method``,
            unknown ``backend`` or ``"triton"`` where it cannot run.
    """
    if isinstance(vertices, (list, tuple)):
        return _winding_number_list(points, vertices, faces, method, chunk_size, smoothing, backend)
    _check_options(method, chunk_size, smoothing)
    _check_backend(backend)
    _check_coordinates("points", points)
    _check_coordinates("vertices", vertices)
    if points.device != vertices.device:
        raise ValueError(f"points ({points.device}) and vertices ({vertices.device}) must be on the same device")
    faces = _check_faces(faces, vertices.shape[-2], vertices.device)
    backend = _resolve_backend(backend, points.device)
    try:
        batch_shape = torch.broadcast_shapes(points.shape[:-2], vertices.shape[:-2])
    except RuntimeError as err:
        raise ValueError(f"leading (batch) dimensions of points {tuple(points.shape)} and vertices "
                         f"{tuple(vertices.shape)} do not broadcast") from err
    num_points, num_vertices = points.shape[-2], vertices.shape[-2]
    dtype = _compute_dtype(points, vertices)
    with torch.autocast(device_type=points.device.type, enabled=False):
        batch = math.prod(batch_shape)
        p = points.to(dtype).expand(*batch_shape, num_points, 3).reshape(batch, num_points, 3)
        v = vertices.to(dtype).expand(*batch_shape, num_vertices, 3).reshape(batch, num_vertices, 3)
        if batch == 0 or num_points == 0:
            return p.new_zeros(*batch_shape, num_points) + 0 * v.sum()
        # Translation invariance: centre each mesh (detached) on the mean of the vertices its faces use (padding
        # ignored) so float32 offsets, and the dipole's |p|^2 + |v|^2 - 2 p.v, keep their precision.
        used = torch.zeros(num_vertices, dtype=v.dtype, device=v.device).index_fill_(0, faces.reshape(-1), 1.0)
        centre = (v.detach() * used.view(1, -1, 1)).sum(dim=1, keepdim=True) / used.sum()
        p, v = p - centre, v - centre
        use_triton = backend == "triton" and dtype == torch.float32
        if method == "exact":
            if use_triton and not (torch.is_grad_enabled() and (p.requires_grad or v.requires_grad)):
                from nnunet_topo.occupancy_triton import exact_winding
                w = exact_winding(p, v, faces)
            else:
                w = _ChunkedWinding.apply(_exact_kernel(faces), faces.shape[0], chunk_size, p, v)
        else:
            m = _vertex_moments(v, faces)
            if use_triton:
                from nnunet_topo.occupancy_triton import dipole_winding
                w = dipole_winding(p, v, m, smoothing)
            elif smoothing > 0:
                w = _DipoleWinding.apply(float(smoothing) ** 2, chunk_size, p, v, m)
            else:  # the plain dipole (a reference, not a training loss): singular at the vertices, element-wise
                w = _ChunkedWinding.apply(_dipole_kernel(0.0), num_vertices, chunk_size, p, v, m)
    return w.reshape(*batch_shape, num_points)


def _winding_number_list(points, vertices, faces, method, chunk_size, smoothing, backend=None) -> Tensor:
    if len(vertices) == 0:
        raise ValueError("vertices is an empty sequence: give at least one mesh")
    if isinstance(faces, Tensor):
        faces = [faces] * len(vertices)
    if not isinstance(faces, (list, tuple)) or len(faces) != len(vertices):
        raise ValueError(f"a sequence of {len(vertices)} vertex tensors needs a sequence of as many face tensors "
                         "(or one shared (F, 3) tensor)")
    _check_coordinates("points", points)
    if points.ndim == 2:
        per_mesh = [points] * len(vertices)
    elif points.ndim == 3 and points.shape[0] == len(vertices):
        per_mesh = list(points.unbind(0))
    else:
        raise ValueError(f"with a sequence of {len(vertices)} meshes, points must be (N, 3) or "
                         f"({len(vertices)}, N, 3), got {tuple(points.shape)}")
    out = []
    for p, v, f in zip(per_mesh, vertices, faces):
        if not isinstance(v, Tensor) or v.ndim != 2:
            raise ValueError("each mesh of a sequence must be a (V_i, 3) tensor")
        out.append(winding_number(p, v, f, method=method, chunk_size=chunk_size, smoothing=smoothing,
                                  backend=backend))
    return torch.stack(out)


def occupancy(
    points: Tensor,
    vertices: Union[Tensor, Sequence[Tensor]],
    faces: Union[Tensor, Sequence[Tensor]],
    method: str = "exact",
    eps: float = DEFAULT_EPS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    smoothing: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Occupancy ``clamp(w, eps, 1 - eps)`` of points in meshes (TPM Eq. 5), ready for a BCE.

    Args:
        points, vertices, faces, method, chunk_size, smoothing, backend: as in :func:`winding_number`.
        eps: clamp margin in (0, 0.5); keeps ``log(o)`` and ``log(1 - o)`` finite (>= log(eps)).
            The clamp has zero gradient where ``w`` lies outside ``[eps, 1 - eps]``.

    Returns:
        ``(..., N)`` occupancy in ``[eps, 1 - eps]`` (float32, or float64 for float64 inputs).
    """
    _check_eps(eps)
    return winding_number(points, vertices, faces, method, chunk_size, smoothing, backend).clamp(eps, 1.0 - eps)


def occupancy_bce(
    points: Tensor,
    vertices: Union[Tensor, Sequence[Tensor]],
    faces: Union[Tensor, Sequence[Tensor]],
    targets: Tensor,
    method: str = "exact",
    eps: float = DEFAULT_EPS,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    smoothing: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Binary cross-entropy of mesh occupancy against inside/outside targets (TPM Eq. 10-11).

    ``l = -weights * (t log(o) + (1 - t) log(1 - o))`` with ``o = occupancy(points, vertices, faces)``.

    Args:
        points, vertices, faces, method, eps, chunk_size, smoothing, backend: as in :func:`occupancy`.
        targets: ``(..., N)`` in [0, 1] (1 = the point belongs to the structure), the shape of the
            occupancy; soft targets are accepted.
        weights: optional per-point weights broadcastable to the occupancy shape (e.g. 0 for padded
            query points); not normalised.
        reduction: ``"mean"`` (mean of the weighted per-point losses over all entries, as
            ``torch.nn.functional.binary_cross_entropy``), ``"sum"`` or ``"none"``.

    Returns:
        Scalar (or ``(..., N)`` for ``"none"``) float32 tensor, float64 for float64 inputs. With no
        points it is a zero connected to the graph of ``vertices`` (``"none"``: an empty tensor).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    o = occupancy(points, vertices, faces, method=method, eps=eps, chunk_size=chunk_size, smoothing=smoothing,
                  backend=backend)
    if targets.shape != o.shape:
        raise ValueError(f"targets must have the occupancy's shape {tuple(o.shape)} (batch..., N), "
                         f"got {tuple(targets.shape)}")
    t = targets.to(device=o.device, dtype=o.dtype)
    if t.numel():  # NaN fails both comparisons
        _require(((t >= 0) & (t <= 1)).all(),
                 "targets must lie in [0, 1] (1 = inside the structure) and contain no NaN")
    loss = -(t * torch.log(o) + (1.0 - t) * torch.log1p(-o))
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
        try:
            torch.broadcast_shapes(weights.shape, o.shape)
        except RuntimeError as err:
            raise ValueError(f"weights {tuple(weights.shape)} do not broadcast to the occupancy shape "
                             f"{tuple(o.shape)}") from err
        loss = loss * weights.to(device=o.device, dtype=o.dtype)
    if reduction == "none":
        return loss
    if loss.numel() == 0:
        return loss.sum() * 0.0  # connected to the vertices' graph (winding_number keeps it for N = 0)
    return loss.mean() if reduction == "mean" else loss.sum()
