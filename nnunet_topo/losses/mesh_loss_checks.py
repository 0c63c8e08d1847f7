"""Argument checks shared by the mesh losses (:class:`nnunet_topo.losses.tpm.TPMLoss`,
:class:`nnunet_topo.losses.mie.MIELoss`): constructor options in ``__init__`` and the forward inputs (meshes, faces,
segmentation logits, reference label map), each raising ``ValueError``/``TypeError`` with what was expected.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
from torch import Tensor

from nnunet_topo.occupancy import METHODS
from nnunet_topo.topology_spec import TopologySpec

__all__ = ["check_count", "check_flag", "check_mesh_inputs", "check_mesh_loss_options"]


def check_mesh_inputs(
    meshes: Sequence[Tensor],
    faces: Sequence[Tensor],
    seg_logits: Tensor,
    ref_labels: Tensor,
    num_meshes: int,
) -> Tensor:
    """Validate the inputs shared by :class:`TPMLoss` and :class:`~nnunet_topo.losses.mie.MIELoss`.

    Returns:
        ``ref_labels`` as a ``(B, Z, Y, X)`` long tensor on ``seg_logits``' device.
    """
    if not isinstance(seg_logits, Tensor) or seg_logits.ndim != 5:
        raise ValueError(f"seg_logits must be a (B, C, Z, Y, X) tensor, got "
                         f"{tuple(seg_logits.shape) if isinstance(seg_logits, Tensor) else type(seg_logits).__name__}")
    if not isinstance(ref_labels, Tensor) or ref_labels.ndim != 5 or ref_labels.shape[1] != 1:
        raise ValueError(f"ref_labels must be a (B, 1, Z, Y, X) label map (nnU-Net's target), got "
                         f"{tuple(ref_labels.shape) if isinstance(ref_labels, Tensor) else type(ref_labels).__name__}")
    if ref_labels.shape[0] != seg_logits.shape[0] or ref_labels.shape[2:] != seg_logits.shape[2:]:
        raise ValueError(f"ref_labels {tuple(ref_labels.shape)} does not match seg_logits {tuple(seg_logits.shape)}: "
                         "same batch size and spatial shape expected")
    if ref_labels.is_complex() or ref_labels.dtype == torch.bool:
        raise ValueError(f"ref_labels must hold label ids, got dtype {ref_labels.dtype}")
    if len(meshes) != num_meshes or len(faces) != num_meshes:
        raise ValueError(f"expected {num_meshes} meshes and face tensors (one per mesh name, in head order), got "
                         f"{len(meshes)} meshes and {len(faces)} face tensors")
    batch = seg_logits.shape[0]
    for i, (v, f) in enumerate(zip(meshes, faces)):
        if not isinstance(v, Tensor) or v.ndim != 3 or v.shape[0] != batch or v.shape[2] != 3:
            raise ValueError(f"meshes[{i}] must be (B={batch}, V, 3) vertices in the normalised patch frame, got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"faces[{i}] must be an (F, 3) integer tensor, got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
    labels = ref_labels[:, 0]
    if labels.is_floating_point():
        if not bool(torch.equal(labels, labels.round())):
            raise ValueError("ref_labels is a float tensor with non-integer values; pass a label map")
    return labels.long().to(seg_logits.device)


def check_mesh_loss_options(spec: TopologySpec, mesh_names: Sequence[str], method: str, eps: float,
                             smoothing: float = 0.0) -> List[str]:
    """The constructor options shared by the mesh losses: ``mesh_names`` (known to the spec, no duplicate, in the
    order of the mesh head), ``method`` (:data:`nnunet_topo.occupancy.METHODS`), ``eps`` in (0, 0.5), ``smoothing``
    >= 0 mm (``"dipole"`` only); warns for ``"exact"`` (no vertex gradients). Returns the names as a list."""
    if not isinstance(spec, TopologySpec):
        raise TypeError(f"spec must be a TopologySpec (rules.parse_topology), got {type(spec).__name__}")
    names = list(mesh_names)
    if not names:
        raise ValueError("mesh_names is empty: give the mesh structure names in the order of the mesh head")
    for n in names:
        if n not in spec.mesh_structures:
            raise ValueError(f"unknown mesh name {n!r}; the spec's mesh_structures are "
                             f"{list(spec.mesh_structures)} (dataset.json topology.mesh_structures)")
    if len(set(names)) != len(names):
        raise ValueError(f"mesh_names contains duplicates: {names}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not smoothing >= 0:
        raise ValueError(f"smoothing must be a number >= 0 (mm), got {smoothing!r}")
    if smoothing > 0 and method != "dipole":
        raise ValueError("smoothing > 0 needs method='dipole' (the smoothed kernel exists for the dipole form only)")
    if method == "exact":
        warnings.warn("method='exact': the exact occupancy of a closed mesh is piecewise constant in the vertex "
                      "positions, so this loss gives (almost) zero vertex gradients. To train a mesh head use "
                      "method='dipole' with smoothing > 0 (in mm; at least half an edge length).",
                      UserWarning, stacklevel=3)
    return names


def check_flag(name: str, value: bool) -> bool:
    """``value`` if it is a bool; TypeError otherwise (None and counts are refused with a hint)."""
    if not isinstance(value, bool):
        hint = (" (it replaces the count mesh_candidates: every voxel is checked now; its None is False here)"
                if value is None or isinstance(value, int) else "")
        raise TypeError(f"{name} must be True or False, got {value!r}{hint}")
    return value


def check_count(name: str, n: int, minimum: int = 0) -> int:
    """``n`` if it is an int >= ``minimum`` (bools refused); ValueError otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {n!r}")
    return n
