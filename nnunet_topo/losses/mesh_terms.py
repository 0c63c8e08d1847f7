"""Pieces of the mesh trainers' objective that are not a loss of their own: the default dipole smoothing, and the
mesh volume / reference volume the trainers log (and use as their readiness criterion). The shape regularisers are
in :mod:`nnunet_topo.losses.mesh_regularisers`. Plain torch (no nnU-Net import).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from nnunet_topo.frames import normalized_to_mm_scale
from nnunet_topo.losses.mesh_targets import region_mask

__all__ = ["default_smoothing_mm", "enclosed_volumes", "mesh_volume_ratios"]


def default_smoothing_mm(spacing: Sequence[float], mean_edge_mm: float) -> float:
    """Default dipole smoothing of the mesh losses, in mm: one in-plane voxel (the finest spacing) clipped to
    [1, 2] mm, so that it is finer than a myocardial wall, but at least half the mean template edge length, below
    which the vertex quadrature of the dipole form is bumpy near the surface (measured:
    ``benchmarks/bench_dipole_smoothing.py``, documentation/benchmarks.md "Dipole smoothing")."""
    return float(max(min(max(min(float(s) for s in spacing), 1.0), 2.0), 0.5 * float(mean_edge_mm)))


def enclosed_volumes(vertices: Tensor, faces: Tensor) -> Tensor:
    """Signed enclosed volume ``(B,)`` of closed, outward-oriented triangle meshes ``(B, V, 3)`` (divergence theorem:
    ``Σ_f v0 · (v1 × v2) / 6``), in the vertices' unit cubed."""
    f = faces.long()
    a, b, c = vertices[:, f[:, 0]], vertices[:, f[:, 1]], vertices[:, f[:, 2]]
    return (a * torch.cross(b, c, dim=-1)).sum(dim=(-1, -2)) / 6.0


def mesh_volume_ratios(meshes: Sequence[Tensor], faces: Sequence[Tensor], target: Tensor,
                       regions: Sequence[Sequence[int]], spacing: Sequence[float]) -> List[Tensor]:
    """Per mesh structure, the mean over the batch items whose reference has the structure of
    ``mesh volume / reference volume`` (NaN when no item has it): meshes ``(B, V, 3)`` in the normalised patch
    frame, ``target`` ``(B, 1, Z, Y, X)`` labels, ``regions`` the label ids of each structure, ``spacing`` (z, y, x)
    mm. The number the mesh trainers log each epoch (``volratio_<structure>``) and use to tell when the meshes fit."""
    shape = tuple(target.shape[2:])
    voxel = float(torch.tensor([float(s) for s in spacing]).prod())
    out = []
    for v, f, ids in zip(meshes, faces, regions):
        ref = region_mask(target[:, 0], ids).flatten(1).sum(1).float() * voxel
        # normalised (x, y, z) -> mm by a positive per-axis scale, which keeps the orientation
        half = torch.tensor(normalized_to_mm_scale(shape, spacing), device=v.device, dtype=v.dtype)
        vol = enclosed_volumes(v * half, f)
        ok = ref > 0
        ratio = torch.where(ok, vol / ref.clamp_min(1e-12), torch.zeros_like(vol))
        out.append(ratio.sum() / ok.sum())  # 0/0 = NaN when no item has the structure
    return out
