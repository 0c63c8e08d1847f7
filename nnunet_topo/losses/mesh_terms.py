"""Hand the mesh terms of one training step to nnU-Net's loss, one named term at a time.

``TopologyLossWrapper`` (:mod:`nnunet_topo.losses.combined`) calls each topology term as
``term(full-resolution logits, target)``. The mesh terms also need the meshes that the network's head predicted in
the same forward pass; :class:`~nnunet_topo.mesh_head.network.MeshCachingNetwork` caches them, and
:class:`MeshLossComputer` pops them, evaluates *all* mesh terms once per step and hands them out by name through
:class:`MeshTerm` views. Plain torch (no nnU-Net import).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from nnunet_topo.losses.mesh_targets import normalized_to_mm
from nnunet_topo.mesh_head.graph import edge_length_loss, edge_lengths, laplacian_smoothing_loss, mesh_edges
from nnunet_topo.mesh_head.network import unwrap_network
from nnunet_topo.mesh_head.templates import Template

__all__ = ["MeshLossComputer", "MeshTerm", "default_smoothing_mm", "mesh_regularisers", "template_edge_lengths"]


class MeshLossComputer:
    """Computes every mesh term of one training step once and hands them out by name.

    Not an ``nn.Module`` on purpose: it holds a callable returning the trainer's network, which must not become a
    submodule of the loss. ``compute(meshes, faces, logits, target)`` returns ``{term name: scalar}``; the values are
    cached for the logits tensor they were computed for, so the several terms of one loss call share one evaluation.
    The terms are computed in float32 with autocast off.
    """

    def __init__(self, get_network: Callable[[], nn.Module],
                 compute: Callable[[List[Tensor], List[Tensor], Tensor, Tensor], Dict[str, Tensor]]) -> None:
        self.get_network = get_network
        self.compute = compute
        self._for: Optional[Tensor] = None
        self._values: Dict[str, Tensor] = {}

    def value(self, name: str, logits: Tensor, target: Tensor) -> Optional[Tensor]:
        net = unwrap_network(self.get_network())
        meshes = net.pop_meshes() if hasattr(net, "pop_meshes") else None
        if meshes is not None:
            faces = [net.mesh_head.template_faces(s) for s in range(len(meshes))]
            with torch.autocast(logits.device.type, enabled=False):
                self._values = self.compute(meshes, faces, logits.float(), target)
            self._for = logits
        elif self._for is not logits:
            return None  # eval mode: the head did not run
        return self._values[name]

    def clear(self) -> None:
        self._for, self._values = None, {}


class MeshTerm(nn.Module):
    """One named mesh term as ``TopologyLossWrapper`` expects it: ``(logits, target) -> scalar``.

    Without cached meshes (the head did not run) it returns a zero connected to ``logits``.
    """

    def __init__(self, computer: MeshLossComputer, name: str) -> None:
        super().__init__()
        self.computer, self.name = computer, name

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        v = self.computer.value(self.name, logits, target)
        return logits.sum() * 0.0 if v is None else v

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


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
