"""Mesh regularisers: uniform Laplacian smoothing and edge length (plain torch).

In the style of pytorch3d (``pytorch3d/loss/mesh_laplacian_smoothing.py``, ``mesh_edge_loss.py``), for batched
vertices ``(B, V, 3)`` sharing one connectivity ``faces (F, 3)``; an empty mesh gives a zero that keeps the graph.

* :func:`laplacian_smoothing_loss`: ``mean_{b, v} |v - mean_{u in N(v)} u|^2`` (the squared norm; pytorch3d
  averages the norm), computed by the one implementation of the uniform Laplacian,
  :func:`nnunet_topo.metrics.mesh.laplacian_smoothness_energy`.
* :func:`edge_length_loss` ``mean_{b, e} (|e| - l_e)^2`` against reference lengths (:func:`edge_lengths`,
  :func:`template_edge_lengths`: the template's, in mm of the physical patch frame).
* :func:`mesh_regularisers`: both terms as the mesh trainers weight them (``{"laplacian", "edge"}``).

The edges are those of :func:`nnunet_topo.mesh_head.graph.mesh_edges`. No nnU-Net import.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from nnunet_topo.faces_cache import once_per_faces
from nnunet_topo.frames import normalized_to_mm
from nnunet_topo.mesh_head.graph import check_faces, mesh_edges
from nnunet_topo.mesh_head.templates import Template
from nnunet_topo.metrics.mesh import laplacian_smoothness_energy

__all__ = ["edge_length_loss", "edge_lengths", "laplacian_smoothing_loss", "mesh_regularisers",
           "template_edge_lengths"]


def _check_vertices(vertices: torch.Tensor) -> torch.Tensor:
    if not isinstance(vertices, torch.Tensor):
        raise TypeError(f"vertices must be a torch.Tensor, got {type(vertices).__name__}.")
    if vertices.ndim == 2:
        vertices = vertices[None]
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, V, 3) or (V, 3), got {tuple(vertices.shape)}.")
    return vertices


def _checked_mesh(vertices: torch.Tensor, faces: torch.Tensor):
    """``(B, V, 3)`` vertices, ``(F, 3)`` long faces on their device, and the graph-connected zero a regulariser returns
    when there are no faces or no vertices (else None)."""
    vertices = _check_vertices(vertices)
    num_v = vertices.shape[1]
    if isinstance(faces, torch.Tensor):  # the range check (it reads numbers back) once per faces tensor
        once_per_faces(faces, "range", num_v, lambda: check_faces(faces, num_v) is not None)
    else:
        check_faces(faces, num_v)
    faces = check_faces(faces).to(vertices.device)  # dtype and shape only
    empty = faces.numel() == 0 or vertices.numel() == 0
    return vertices, faces, (vertices.float().sum() * 0.0 if empty else None)


def laplacian_smoothing_loss(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian smoothing loss ``mean_{b, v} |v - mean_{u in N(v)} u|^2``.

    ``N(v)``: vertices sharing an edge with ``v``, each counted once; the mean runs over the
    vertices used by some face and over the batch. The squared norm (pytorch3d averages the
    norm) makes it :func:`nnunet_topo.metrics.mesh.laplacian_smoothness_energy` (the one implementation of the
    uniform Laplacian) averaged over the batch, computed in float32.

    Args:
        vertices: ``(B, V, 3)`` (or ``(V, 3)``), any unit (here: normalised patch coordinates).
        faces: ``(F, 3)`` integer, shared by the batch.

    Returns:
        0-dim float32 tensor; a graph-connected zero if there are no faces or no vertices.
    """
    vertices, faces, zero = _checked_mesh(vertices, faces)
    if zero is not None:
        return zero
    return laplacian_smoothness_energy(vertices.float(), faces).mean()  # the one uniform Laplacian, per item


def edge_lengths(vertices: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Lengths ``(B, E)`` of the edges ``(E, 2)`` for vertices ``(B, V, 3)`` (or ``(E,)`` for ``(V, 3)``)."""
    squeeze = vertices.ndim == 2
    v = _check_vertices(vertices)
    d = v[:, edges[:, 0]] - v[:, edges[:, 1]]
    out = d.norm(dim=-1)
    return out[0] if squeeze else out


def edge_length_loss(
    vertices: torch.Tensor, faces: torch.Tensor, reference_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Edge-length loss ``mean_{b, e} (|e| - l_e)^2`` over the unique edges of the mesh.

    Without ``reference_lengths`` the target is 0, as in pytorch3d's ``mesh_edge_loss`` with
    ``target_length=0`` (it penalises long edges); with them (e.g. the template's
    ``edge_lengths(template_vertices, mesh_edges(faces))``) it keeps edges near their template length.

    Args:
        vertices: ``(B, V, 3)`` (or ``(V, 3)``).
        faces: ``(F, 3)`` integer, shared by the batch.
        reference_lengths: ``(E,)`` or ``(B, E)`` in the order of :func:`mesh_edges` (faces).

    Returns:
        0-dim float32 tensor; a graph-connected zero if there are no faces or no vertices.
    """
    vertices, faces, zero = _checked_mesh(vertices, faces)
    if zero is not None:
        return zero
    e = once_per_faces(faces, "edges", str(faces.device), lambda: mesh_edges(faces))  # unique: once per faces
    lengths = edge_lengths(vertices.float(), e)  # (B, E)
    if reference_lengths is None:
        return (lengths**2).mean()
    ref = torch.as_tensor(reference_lengths, device=lengths.device, dtype=lengths.dtype)
    if ref.shape not in ((e.shape[0],), lengths.shape):
        raise ValueError(
            f"reference_lengths must be (E,) or (B, E) with E = {e.shape[0]} unique edges, got {tuple(ref.shape)}."
        )
    return ((lengths - ref) ** 2).mean()


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


def mesh_regularisers(meshes_mm: Sequence[Tensor], faces: Sequence[Tensor],
                      reference_edge_lengths: Sequence[Tensor], length_scale: float = 1.0) -> Dict[str, Tensor]:
    """``{"laplacian": mean uniform-Laplacian energy, "edge": mean squared edge-length deviation from the
    reference}`` over the structures, both divided by ``length_scale²`` (e.g. the mean template edge length in mm,
    so that the terms are dimensionless and isotropic); meshes ``(B, V_s, 3)`` in mm, faces ``(F_s, 3)``."""
    scale = 1.0 / float(length_scale) ** 2
    return {"laplacian": torch.stack([laplacian_smoothing_loss(v, f) for v, f in zip(meshes_mm, faces)]).mean() * scale,
            "edge": torch.stack([edge_length_loss(v, f, ref.to(v.device))
                                 for v, f, ref in zip(meshes_mm, faces, reference_edge_lengths)]).mean() * scale}
