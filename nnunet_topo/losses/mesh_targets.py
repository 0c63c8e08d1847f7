"""Query points and inside/outside targets for the mesh losses (TPM Eq. 6-11).

Implements the point sampling of C. Zhang et al., *Topology-Preserving Loss for Accurate and Anatomically
Consistent Cardiac Mesh Reconstruction* (TPM, arXiv:2503.07874):

* :func:`sample_query_points`: points for ``L_occ`` (Eq. 10-11), uniform in the patch plus points near the
  reference surface of a structure, each with the target ``[label(p) ∈ region(X)]``.
* :func:`critical_point_targets`: the *critical points* of ``L_TPM`` (Eq. 6-9), the violation voxels of the
  predicted label map (DESIGN §4, :mod:`nnunet_topo.violations`), with rule-aware occupancy targets.

Coordinate frames (kept explicit everywhere):

* *voxel index* ``(z, y, x)`` of a patch of shape ``(Z, Y, X)``; every function here returns points in this
  frame (integer voxel centres for critical points, continuous indices for sampled points);
* *normalised patch frame* of ``torch.nn.functional.grid_sample(..., align_corners=True)``: ``(x, y, z)`` in
  ``[-1, 1]`` with ``x`` along the last array axis; meshes live in this frame. :func:`voxel_to_normalized` and
  :func:`normalized_to_voxel` convert (they are :func:`nnunet_topo.meshes.index_to_normalized` and its inverse).

Rule-aware targets (``r`` = reference label of a violation voxel of the prediction):

* ``exclusion(A, B)``: ``r ∈ B`` -> negative (0) for A's mesh; ``r ∈ A`` -> negative for B's mesh;
* ``inclusion(I in O, may_touch M)``: ``r ∈ I`` -> positive (1) for O's mesh; ``r ∉ O ∪ M`` -> negative for
  I's mesh (a voxel of an allowed opening M is not penalised: touching M is legal).

Every such target equals ``[r ∈ region(mesh)]`` (B is disjoint from A; I ⊂ O; I ⊂ O ∪ M), so the rules only
*select* which voxels become points of which mesh, and the target of a selected voxel is always
``[reference label ∈ region(mesh)]``. That is also the tie-break the design asks for (a voxel selected for the
same mesh by several rules appears once; the reference decides), and it is how the targets are computed.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nnunet_topo.meshes import index_to_normalized, normalized_to_index
from nnunet_topo.rules import ExclusionRule, InclusionRule, Rule, Structure, TopologySpec
from nnunet_topo.violations import dilate, rule_violation_map

__all__ = [
    "voxel_to_normalized",
    "normalized_to_voxel",
    "mesh_for_structure",
    "rule_mesh_selections",
    "critical_point_targets",
    "sample_query_points",
    "region_mask",
]

MODES = ("3d", "2d")


# ---------------------------------------------------------------------------------------------- frames
def voxel_to_normalized(idx_zyx: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel indices ``(z, y, x)`` -> normalised patch coordinates ``(x, y, z)`` in ``[-1, 1]``.

    ``n = 2 * i / (size - 1) - 1`` per axis, order reversed (``grid_sample``, ``align_corners=True``); an axis of
    size 1 maps to 0. Same as :func:`nnunet_topo.meshes.index_to_normalized`.

    Args:
        idx_zyx: ``(..., 3)`` continuous or integer voxel indices in array order.
        shape: the patch shape ``(Z, Y, X)``.

    Returns:
        ``(..., 3)`` float tensor (float32 for integer input) in ``(x, y, z)`` order.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be the 3D patch shape (Z, Y, X), got {tuple(shape)}")
    return index_to_normalized(idx_zyx, shape)


def normalized_to_voxel(points_xyz: Tensor, shape: Sequence[int]) -> Tensor:
    """Normalised patch coordinates ``(x, y, z)`` -> continuous voxel indices ``(z, y, x)``; inverse of
    :func:`voxel_to_normalized` (``i = (n + 1) / 2 * (size - 1)``)."""
    if len(shape) != 3:
        raise ValueError(f"shape must be the 3D patch shape (Z, Y, X), got {tuple(shape)}")
    return normalized_to_index(points_xyz, shape)


# ---------------------------------------------------------------------------------------------- helpers
def region_mask(labels: Tensor, label_ids: Sequence[int]) -> Tensor:
    """Bool mask ``labels ∈ label_ids`` (same shape as ``labels``)."""
    ids = torch.as_tensor(sorted(set(int(i) for i in label_ids)), device=labels.device, dtype=labels.dtype)
    return torch.isin(labels, ids)


def _check_label_map(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer label map, got dtype {x.dtype}; convert with .long()")
    if x.ndim != 4:
        hint = " (drop the channel dimension with [:, 0])" if x.ndim == 5 and x.shape[1] == 1 else ""
        raise ValueError(f"{name} must have shape (B, Z, Y, X), got {tuple(x.shape)}{hint}")


def mesh_for_structure(spec: TopologySpec, structure: Structure) -> Optional[str]:
    """The mesh of ``spec.mesh_structures`` whose label-id set equals ``structure``'s, or ``None``.

    Rules whose structures have no mesh contribute no critical points to that structure. If several meshes
    have the same label set (not useful, but allowed by the spec), the first one in ``mesh_structures`` order
    is returned.
    """
    ids = set(structure.label_ids)
    for name, s in spec.mesh_structures.items():
        if set(s.label_ids) == ids:
            return name
    return None


def rule_mesh_selections(rule: Rule, spec: TopologySpec) -> List[Tuple[str, Tuple[int, ...], bool]]:
    """Which reference labels of a rule's violation voxels become points of which mesh (TPM Eq. 6-9).

    Returns:
        ``[(mesh name, reference label ids that select the voxel, complement)]``; with ``complement=True`` the
        voxel is selected when its reference label is *not* in the ids (``inclusion``: ``r ∉ O ∪ M``).
        Entries whose structure has no mesh are left out.
    """
    out: List[Tuple[str, Tuple[int, ...], bool]] = []
    if isinstance(rule, ExclusionRule):
        ma, mb = mesh_for_structure(spec, rule.a), mesh_for_structure(spec, rule.b)
        if ma is not None:
            out.append((ma, tuple(rule.b.label_ids), False))  # r ∈ B -> negative for A
        if mb is not None:
            out.append((mb, tuple(rule.a.label_ids), False))  # r ∈ A -> negative for B
    elif isinstance(rule, InclusionRule):
        mo, mi = mesh_for_structure(spec, rule.outer), mesh_for_structure(spec, rule.inner)
        if mo is not None:
            out.append((mo, tuple(rule.inner.label_ids), False))  # r ∈ I -> positive for O
        if mi is not None:
            allowed = tuple(rule.outer.label_ids) + (tuple(rule.may_touch.label_ids) if rule.may_touch else ())
            out.append((mi, allowed, True))  # r ∉ O ∪ M -> negative for I
    else:
        raise TypeError(f"rule must be an ExclusionRule or InclusionRule, got {type(rule).__name__}")
    return out


# ---------------------------------------------------------------------------------------------- critical points
def critical_point_targets(
    pred_labels: Tensor,
    ref_labels: Tensor,
    spec: TopologySpec,
    mode: str = "3d",
    axis: Optional[int] = None,
) -> List[Dict[str, Tuple[Tensor, Tensor]]]:
    """Critical points of a predicted label map with rule-aware occupancy targets (TPM Eq. 6-9).

    The critical points are the violation voxels of the *prediction* (DESIGN §4). With ``mode="3d"`` every rule
    is evaluated as written in the spec (3d rules in the volume, 2d rules slice-wise). With ``mode="2d"`` (MIE)
    *every* rule is evaluated slice by slice: a copy of each 3d rule with ``mode="2d"`` along ``axis`` (``None``:
    the rule's own ``axis`` attribute, 0 unless set); rules already in 2d mode keep their axis. The in-plane
    kernel is 4 (for ``spec.connectivity`` 6) or 8 (for 26).

    Selection per rule (``r`` = reference label of a violation voxel): ``exclusion(A, B)``: ``r ∈ B`` for A's
    mesh, ``r ∈ A`` for B's mesh; ``inclusion(I in O | M)``: ``r ∈ I`` for O's mesh, ``r ∉ O ∪ M`` for I's mesh.
    A voxel selected for a mesh by several rules appears once, with target ``[r ∈ region(mesh)]`` (which every
    rule's own target equals; see the module docstring).

    Args:
        pred_labels: ``(B, Z, Y, X)`` integer predicted label map (e.g. ``argmax`` of the logits).
        ref_labels: ``(B, Z, Y, X)`` integer reference label map.
        spec: the topology spec (rules, mesh structures, connectivity).
        mode: ``"3d"`` or ``"2d"`` (see above).
        axis: slice axis (0..2) for 3d rules in ``mode="2d"``; ``None`` uses each rule's ``axis``.

    Returns:
        One dict per batch item with a key for *every* mesh of ``spec.mesh_structures``: ``(points_idx (N, 3)
        long voxel indices (z, y, x) in C order, targets (N,) float32 in {0, 1})``, on the input's device; ``N``
        may be 0.

    Raises:
        ValueError: shapes differ or are not ``(B, Z, Y, X)``, unknown ``mode``, bad ``axis``.
        TypeError: non-integer label maps.
    """
    _check_label_map(pred_labels, "pred_labels")
    _check_label_map(ref_labels, "ref_labels")
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"pred_labels {tuple(pred_labels.shape)} and ref_labels {tuple(ref_labels.shape)} must "
                         "have the same shape (B, Z, Y, X)")
    if mode not in MODES:
        raise ValueError(f"mode must be '3d' or '2d', got {mode!r}")
    if axis is not None and axis not in (0, 1, 2):
        raise ValueError(f"axis must be None or a spatial axis 0, 1 or 2 of (Z, Y, X), got {axis!r}")
    ref_labels = ref_labels.to(pred_labels.device)
    batch = pred_labels.shape[0]
    selected: Dict[str, Tensor] = {}
    for rule in spec.rules:
        sel = rule_mesh_selections(rule, spec)
        if not sel:
            continue
        if mode == "2d" and rule.mode == "3d":
            rule = dataclasses.replace(rule, mode="2d", axis=rule.axis if axis is None else axis)
        vmap = rule_violation_map(pred_labels, rule, probabilities=False, connectivity=spec.connectivity) > 0
        if not bool(vmap.any()):
            continue
        for mesh, ids, complement in sel:
            chosen = region_mask(ref_labels, ids)
            chosen = vmap & (~chosen if complement else chosen)
            selected[mesh] = selected[mesh] | chosen if mesh in selected else chosen
    out: List[Dict[str, Tuple[Tensor, Tensor]]] = [{} for _ in range(batch)]
    for mesh, structure in spec.mesh_structures.items():
        inside = region_mask(ref_labels, structure.label_ids) if mesh in selected else None
        for b in range(batch):
            if mesh in selected:
                idx = torch.nonzero(selected[mesh][b], as_tuple=False)  # (N, 3), C order
                t = inside[b][idx[:, 0], idx[:, 1], idx[:, 2]].to(torch.float32)
            else:
                idx = torch.zeros(0, 3, dtype=torch.long, device=pred_labels.device)
                t = torch.zeros(0, dtype=torch.float32, device=pred_labels.device)
            out[b][mesh] = (idx, t)
    return out


# ---------------------------------------------------------------------------------------------- query points
def _rand(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device (CPU by default), moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(*shape, generator=generator, device=gen_device).to(device)


def _boundary(mask: Tensor) -> Tensor:
    """Voxels on either side of the surface of ``mask`` (B, Z, Y, X) bool, 6-connectivity, zero padding:
    structure voxels with an outside neighbour and outside voxels with a structure neighbour."""
    return (mask & dilate(~mask, 6)) | (~mask & dilate(mask, 6))


def sample_query_points(
    ref_labels: Tensor,
    structure_ids: Sequence[int],
    num_uniform: int,
    num_surface: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Query points for ``L_occ`` with targets ``[label(p) ∈ region]`` (TPM Eq. 10-11).

    ``num_uniform`` points uniform in the continuous index box ``[0, size - 1]`` per axis, then ``num_surface``
    points near the reference surface: voxels on either side of the region's boundary (6-connectivity; the patch
    border is no boundary), drawn with replacement, plus a uniform jitter in ``[-0.5, 0.5]`` voxel per axis
    (clamped to the patch). A batch item whose region has no boundary in the patch gets uniform points instead.
    Target = ``[label at the nearest voxel ∈ structure_ids]`` (nearest = ``round``).

    Args:
        ref_labels: ``(B, Z, Y, X)`` integer reference label map.
        structure_ids: label ids of the region (e.g. ``spec.mesh_structures[name].label_ids``).
        num_uniform: number of uniform points (>= 0).
        num_surface: number of near-surface points (>= 0).
        generator: optional ``torch.Generator`` (its device is where the random numbers are drawn).

    Returns:
        ``(points_idx (B, N, 3) float32 continuous voxel indices (z, y, x), targets (B, N) float32 in {0, 1})``
        with ``N = num_uniform + num_surface``; uniform points first.
    """
    _check_label_map(ref_labels, "ref_labels")
    for name, n in (("num_uniform", num_uniform), ("num_surface", num_surface)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if len(structure_ids) == 0:
        raise ValueError("structure_ids is empty: give the label ids of the region")
    device = ref_labels.device
    batch, spatial = ref_labels.shape[0], tuple(ref_labels.shape[1:])
    hi = torch.tensor([s - 1 for s in spatial], dtype=torch.float32, device=device)
    inside = region_mask(ref_labels, structure_ids)
    uniform = _rand((batch, num_uniform, 3), generator, device) * hi
    parts = [uniform]
    if num_surface:
        boundary = _boundary(inside).reshape(batch, -1)
        counts = boundary.sum(dim=1)
        cum = torch.cumsum(boundary.to(torch.float64), dim=1)
        u = _rand((batch, num_surface), generator, device).to(torch.float64)
        # the k-th boundary voxel (in C order) for k = floor(u * count): searchsorted on the cumulative count
        k = torch.floor(u * counts.unsqueeze(1).clamp(min=1)) + 1
        flat = torch.searchsorted(cum, k).clamp(max=boundary.shape[1] - 1)
        idx = torch.stack(torch.unravel_index(flat, spatial), dim=-1).to(torch.float32)
        jitter = _rand((batch, num_surface, 3), generator, device) - 0.5
        surface = torch.minimum((idx + jitter).clamp(min=0.0), hi)
        fallback = _rand((batch, num_surface, 3), generator, device) * hi
        surface = torch.where((counts > 0).view(batch, 1, 1), surface, fallback)
        parts.append(surface)
    points = torch.cat(parts, dim=1)
    nearest = torch.round(points).long()
    b_idx = torch.arange(batch, device=device).view(batch, 1).expand(batch, points.shape[1])
    targets = inside[b_idx, nearest[..., 0], nearest[..., 1], nearest[..., 2]].to(torch.float32)
    return points, targets
