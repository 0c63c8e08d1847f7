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

from nnunet_topo.mesh_head.graph import edge_length_loss, edge_lengths, laplacian_smoothing_loss, mesh_edges
from nnunet_topo.mesh_head.network import unwrap_network
from nnunet_topo.mesh_head.templates import Template

__all__ = ["MeshLossComputer", "MeshTerm", "mesh_regularisers", "template_edge_lengths"]


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


def template_edge_lengths(templates: Sequence[Template]) -> List[Tensor]:
    """Edge lengths ``(E,)`` of each template (the reference of the edge-length term; their mean is the default
    dipole smoothing of the mesh trainers), in the templates' units."""
    return [edge_lengths(torch.from_numpy(t.vertices), mesh_edges(torch.from_numpy(t.faces))) for t in templates]


def mesh_regularisers(meshes: Sequence[Tensor], faces: Sequence[Tensor],
                      reference_edge_lengths: Sequence[Tensor]) -> Dict[str, Tensor]:
    """``{"laplacian": mean uniform-Laplacian energy, "edge": mean edge-length deviation from the reference}`` over
    the structures; meshes ``(B, V_s, 3)``, faces ``(F_s, 3)``."""
    return {"laplacian": torch.stack([laplacian_smoothing_loss(v, f) for v, f in zip(meshes, faces)]).mean(),
            "edge": torch.stack([edge_length_loss(v, f, ref.to(v.device))
                                 for v, f, ref in zip(meshes, faces, reference_edge_lengths)]).mean()}
