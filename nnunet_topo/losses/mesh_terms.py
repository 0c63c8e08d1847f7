"""Pieces of the mesh trainers' objective that are not a loss of their own: the shape regularisers, the template
edge lengths they refer to, the default dipole smoothing, and the mesh volume / reference volume the trainers log
(and use as their readiness criterion). Plain torch (no nnU-Net import).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from nnunet_topo.losses.mesh_targets import normalized_to_mm, region_mask
from nnunet_topo.mesh_head.graph import edge_length_loss, edge_lengths, laplacian_smoothing_loss, mesh_edges
from nnunet_topo.mesh_head.templates import Template

__all__ = ["default_smoothing_mm", "enclosed_volumes", "mesh_regularisers", "mesh_volume_ratios",
           "template_edge_lengths"]


def template_edge_lengths(templates: Sequence[Template], patch_shape: Optional[Sequence[int]] = None,
                          spacing: Optional[Sequence[float]] = None) -> List[Tensor]:
    """Edge lengths ``(E,)`` of each template (the reference of the edge-length term): in mm of the physical patch
    frame when ``patch_shape`` (the training patch the templates are normalised to) is given, with ``spacing``
    ``(z, y, x)`` mm (None: 1 mm); else in the templates' normalised units."""
    out = []
    for t in templates:
        v = torch.from_numpy(t.vertices).to(torch.float64)
        if patch_shape is not None:
            v = normalized_to_mm(v, patch_shape, spacing)
        out.append(edge_lengths(v, mesh_edges(torch.from_numpy(t.faces))).to(torch.float32))
    return out


def default_smoothing_mm(spacing: Sequence[float], mean_edge_mm: float) -> float:
    """Default dipole smoothing of the mesh losses, in mm: one in-plane voxel (the finest spacing) clipped to
    [1, 2] mm, so that it is finer than a myocardial wall, but at least half the mean template edge length, below
    which the vertex quadrature of the dipole form is bumpy near the surface (measured:
    ``benchmarks/bench_dipole_smoothing.py``, documentation/benchmarks.md "Dipole smoothing")."""
    return float(max(min(max(min(float(s) for s in spacing), 1.0), 2.0), 0.5 * float(mean_edge_mm)))


def mesh_regularisers(meshes_mm: Sequence[Tensor], faces: Sequence[Tensor],
                      reference_edge_lengths: Sequence[Tensor], length_scale: float = 1.0) -> Dict[str, Tensor]:
    """``{"laplacian": mean uniform-Laplacian energy, "edge": mean squared edge-length deviation from the
    reference}`` over the structures, both divided by ``length_scale²`` (e.g. the mean template edge length in mm,
    so that the terms are dimensionless and isotropic); meshes ``(B, V_s, 3)`` in mm, faces ``(F_s, 3)``."""
    scale = 1.0 / float(length_scale) ** 2
    return {"laplacian": torch.stack([laplacian_smoothing_loss(v, f) for v, f in zip(meshes_mm, faces)]).mean() * scale,
            "edge": torch.stack([edge_length_loss(v, f, ref.to(v.device))
                                 for v, f, ref in zip(meshes_mm, faces, reference_edge_lengths)]).mean() * scale}


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
        # normalised (x, y, z) -> mm by a positive per-axis scale, which keeps the orientation (normalized_to_mm
        # also reverses the axis order to (z, y, x), which would flip the sign)
        half = torch.tensor([(n - 1) / 2.0 * float(sp) for n, sp in zip(shape[::-1], list(spacing)[::-1])],
                            device=v.device, dtype=v.dtype)
        vol = enclosed_volumes(v * half, f)
        ok = ref > 0
        ratio = torch.where(ok, vol / ref.clamp_min(1e-12), torch.zeros_like(vol))
        out.append(ratio.sum() / ok.sum())  # 0/0 = NaN when no item has the structure
    return out
