"""Query points and inside/outside targets for the mesh losses (TPM Eq. 6-11).

Implements the point sampling of C. Zhang et al., *Topology-Preserving Loss for Accurate and Anatomically
Consistent Cardiac Mesh Reconstruction* (TPM, arXiv:2503.07874):

* :func:`sample_query_points`: points for ``L_occ`` (Eq. 10-11), uniform in the patch plus points near the
  reference surface of a structure, each with the target ``[label(p) ∈ region(X)]``.
* :func:`critical_point_targets`: the *critical points* of ``L_TPM`` (Eq. 6-9) with rule-aware occupancy targets,
  from two sources (DESIGN §6): (a) the violation voxels of the predicted label map (DESIGN §4,
  :mod:`nnunet_topo.violations`), (b) the voxel centres where the predicted meshes themselves break a rule
  (:func:`mesh_violation_masks`: every patch voxel, every mesh voxelised exactly once per call by signed ray
  crossings, :mod:`nnunet_topo.voxelize`) — without (b), meshes that penetrate each other over a correct
  segmentation would never be penalised.

Coordinate frames (kept explicit everywhere; the conversions live in :mod:`nnunet_topo.frames`):

* *voxel index* ``(z, y, x)`` of a patch of shape ``(Z, Y, X)``; the point functions here return points in this
  frame (integer voxel centres for critical points, continuous indices for sampled points);
* *normalised patch frame* of ``torch.nn.functional.grid_sample(..., align_corners=True)``: ``(x, y, z)`` in
  ``[-1, 1]`` with ``x`` along the last array axis; the mesh head predicts in this frame;
* *physical patch frame*: ``(x, y, z)`` in mm, ``index * spacing`` with the axis order reversed. The losses
  measure everything here (vertices, query points, dipole smoothing), because the normalised frame is anisotropic:
  one normalised unit is half the patch extent, 50 mm through-plane but ~175 mm in-plane for a 20x256x224 MRI patch
  at 5x1.56x1.56 mm. The maps between the three frames are positive axis scalings (plus the order reversal applied
  to both points and meshes), so inside/outside is the same in each.

Selection (TPM Eq. 7, by the *prediction*): every critical voxel of a rule is a query point of **every** mesh the
rule names (``exclusion(A, B)``: A's and B's; ``inclusion(I in O)``: I's and O's), with target
``[reference label ∈ region(mesh)]``. Where the septum is missing (prediction ``RV RV RV LV LV LV`` over reference
``RV RV MYO MYO LV LV``), the contact voxels have reference MYO and become negatives for both the LV and the RV
mesh. Voxels whose reference is a rule's allowed opening (``may_touch``) or the ignore label are never critical.
A voxel selected for the same mesh by several rules or both sources appears once.

Source (b) checks the mesh-level rules in force (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`): the spec's
``mesh_rules`` (``mesh_exclusion``: inside both meshes; ``mesh_inclusion``: inside the inner mesh and outside the
outer one) and the voxel rules whose structures are mesh structures, read on the meshes. A critical point of a mesh
rule is a query point of both its meshes, with the same targets ``[reference label ∈ region(mesh)]``: an RV mesh that
enters the LV epicardial mesh over the septum (reference MYO) gives points that are negatives for the RV mesh and
positives for ``LV_epi``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nnunet_topo.frames import mm_to_voxel
from nnunet_topo.topology_spec import (ExclusionRule, InclusionRule, MeshExclusionRule, Rule, TopologySpec, mesh_for_structure,
                                mesh_rule_meshes, mesh_rules_in_force)
from nnunet_topo.violations import dilate, rule_violation_map
from nnunet_topo.voxelize import voxelize

__all__ = [
    "mesh_for_structure",
    "rule_meshes",
    "critical_point_masks",
    "critical_point_targets",
    "masks_to_targets",
    "generator_on",
    "select_points",
    "source_union",
    "targets_at",
    "mesh_violation_masks",
    "sample_query_points",
    "region_mask",
]

MODES = ("3d", "2d")
#: where critical points come from: the predicted label map and the predicted meshes (TPM Eq. 6-9, DESIGN §6)
SOURCES = ("prediction", "meshes")


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


def rule_meshes(rule: Rule, spec: TopologySpec) -> List[str]:
    """The meshes a rule names (TPM Eq. 7): ``exclusion(A, B)`` -> A's and B's, ``inclusion(I in O)`` -> I's and
    O's (those that have a mesh in ``spec.mesh_structures``; an allowed opening ``may_touch`` is no mesh of the
    rule). Every critical point of the rule becomes a query point of each of them."""
    if isinstance(rule, ExclusionRule):
        structures = (rule.a, rule.b)
    elif isinstance(rule, InclusionRule):
        structures = (rule.inner, rule.outer)
    else:
        raise TypeError(f"rule must be an ExclusionRule or InclusionRule, got {type(rule).__name__}")
    out = []
    for s in structures:
        m = mesh_for_structure(spec, s)
        if m is not None and m not in out:
            out.append(m)
    return out


def _never_penalised(rule: Rule, ref_labels: Tensor, ignore_label: Optional[int]) -> Tensor:
    """Voxels that are never critical points of ``rule``: reference in its allowed opening ``may_touch`` (touching
    it is legal) or the ignore label (unknown reference)."""
    skip = torch.zeros_like(ref_labels, dtype=torch.bool)
    if isinstance(rule, InclusionRule) and rule.may_touch is not None:
        skip |= region_mask(ref_labels, rule.may_touch.label_ids)
    if ignore_label is not None:
        skip |= ref_labels == int(ignore_label)
    return skip


def _slice_rule(rule: Rule, mode: str, axis: Optional[int]) -> Rule:
    if mode == "2d" and rule.mode == "3d":
        return dataclasses.replace(rule, mode="2d", axis=rule.axis if axis is None else axis)
    return rule


def generator_on(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """``generator`` if it lives on ``device``, else None (torch's default generator of that device): random numbers
    drawn where they are used, never on another device and copied over."""
    return generator if generator is not None and generator.device == device else None


def select_points(mask: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """At most ``k`` voxels of each batch item's ``mask`` ``(B, Z, Y, X)``, a uniformly random subset without
    replacement (all of them when there are at most ``k``), as a fixed-size selection with no host synchronisation:
    the ``k`` largest of uniform scores, ``-1`` outside the mask (``topk``). Returns ``(idx (B, k', 3) long (z, y, x),
    valid (B, k') bool)``, ``k' = min(k, Z*Y*X)``; rows with ``valid`` False are arbitrary voxels outside the mask
    (weight them 0). The same distribution as ``randperm`` of the ``nonzero`` list, without its data-dependent
    size. ``generator``: used where it lives on the mask's device, else the scores are drawn there from torch's
    default generator of that device (a CPU generator for a CUDA mask would mean a copy of B x Z*Y*X scores)."""
    flat = mask.flatten(1)
    kk = min(int(k), flat.shape[1])
    scores = torch.rand(flat.shape, generator=generator_on(generator, flat.device), device=flat.device)
    scores = torch.where(flat, scores, -1.0)
    vals, lin = scores.topk(kk, dim=1, sorted=False)
    _, y, x = mask.shape[1:]
    idx = torch.stack([lin // (y * x), (lin // x) % y, lin % x], dim=-1)
    return idx, vals >= 0


def targets_at(idx: Tensor, ref_labels: Tensor, label_ids: Sequence[int]) -> Tensor:
    """``[ref ∈ label_ids]`` at voxel indices ``idx`` ``(B, N, 3)`` of ``ref_labels`` ``(B, Z, Y, X)``, float32."""
    b = torch.arange(ref_labels.shape[0], device=ref_labels.device).view(-1, 1).expand(-1, idx.shape[1])
    return region_mask(ref_labels[b, idx[..., 0], idx[..., 1], idx[..., 2]], label_ids).to(torch.float32)


# ---------------------------------------------------------------------------------------------- critical points
def critical_point_masks(
    pred_labels: Tensor,
    ref_labels: Tensor,
    spec: TopologySpec,
    mode: str = "3d",
    axis: Optional[int] = None,
    ignore_label: Optional[int] = None,
    mesh_violations: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Dict[str, Tensor]]:
    """Which voxels are critical points of which mesh, per source (TPM Eq. 6-9, DESIGN §6).

    Source ``"prediction"``: the violation voxels of each rule in the predicted label map (TPM's ``P``). With
    ``mode="3d"`` every rule is evaluated as written (3d rules in the volume, 2d rules slice-wise); with
    ``mode="2d"`` (MIE) every rule is evaluated slice by slice: a copy of each 3d rule in 2d mode along ``axis``
    (``None``: the rule's own ``axis``). Source ``"meshes"``: the voxels of ``mesh_violations[rule name]``
    (:func:`mesh_violation_masks`: where the predicted *meshes* break the rule), for the voxel rules read on the
    meshes and for the spec's ``mesh_rules`` (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`). A critical voxel of a
    rule is a point of **every** mesh the rule names (:func:`rule_meshes`, :func:`nnunet_topo.topology_spec.mesh_rule_meshes`),
    whatever its reference label; voxels whose reference is the rule's ``may_touch`` opening or ``ignore_label`` are
    never critical.

    Returns:
        ``{"prediction": {mesh: (B, Z, Y, X) bool}, "meshes": {mesh: ...}}`` with a key for every mesh of
        ``spec.mesh_structures`` in each source.
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
    out = {src: {m: torch.zeros_like(pred_labels, dtype=torch.bool) for m in spec.mesh_structures}
           for src in SOURCES}
    for rule in spec.rules:
        meshes = rule_meshes(rule, spec)
        if not meshes:
            continue
        skip = None
        sources = {"prediction": rule_violation_map(pred_labels, _slice_rule(rule, mode, axis), probabilities=False,
                                                    connectivity=spec.connectivity) > 0}
        if mesh_violations is not None and rule.name in mesh_violations:
            sources["meshes"] = mesh_violations[rule.name].to(pred_labels.device).bool()
        for src, vmap in sources.items():  # no "if vmap.any()": an empty map ORs nothing and reads nothing back
            if skip is None:
                skip = _never_penalised(rule, ref_labels, ignore_label)
            vmap = vmap & ~skip
            for m in meshes:
                out[src][m] |= vmap
    if mesh_violations is not None:
        for mrule in spec.mesh_rules:  # rules between meshes: the mesh source only
            vmap = mesh_violations.get(mrule.name)
            if vmap is None:
                continue
            vmap = vmap.to(pred_labels.device).bool()
            if ignore_label is not None:
                vmap = vmap & (ref_labels != int(ignore_label))
            for m in mesh_rule_meshes(mrule):
                out["meshes"][m] |= vmap
    return out


def critical_point_targets(
    pred_labels: Tensor,
    ref_labels: Tensor,
    spec: TopologySpec,
    mode: str = "3d",
    axis: Optional[int] = None,
    ignore_label: Optional[int] = None,
    mesh_violations: Optional[Dict[str, Tensor]] = None,
) -> List[Dict[str, Tuple[Tensor, Tensor]]]:
    """Critical points with rule-aware occupancy targets (TPM Eq. 6-9), both sources merged.

    The points are those of :func:`critical_point_masks` (a voxel selected for a mesh by several rules or both
    sources appears once); the target of a point for a mesh is ``[reference label ∈ region(mesh)]``: where the
    septum is missing (prediction LV next to RV, reference MYO) the voxel is a negative for the LV *and* the RV mesh.

    Args:
        pred_labels: ``(B, Z, Y, X)`` integer predicted label map (e.g. ``argmax`` of the logits).
        ref_labels: ``(B, Z, Y, X)`` integer reference label map.
        spec: the topology spec (rules, mesh structures, connectivity), axes in the patch's array order.
        mode: ``"3d"`` or ``"2d"`` (MIE: every rule slice-wise).
        axis: slice axis (0..2) for 3d rules in ``mode="2d"``; ``None`` uses each rule's ``axis``.
        ignore_label: nnU-Net's ignore label (unknown reference), never a critical point; None: no ignore label.
        mesh_violations: optional ``{rule name: (B, Z, Y, X) bool}`` from :func:`mesh_violation_masks`.

    Returns:
        One dict per batch item with a key for *every* mesh of ``spec.mesh_structures``: ``(points_idx (N, 3)
        long voxel indices (z, y, x) in C order, targets (N,) float32 in {0, 1})``, on the input's device; ``N``
        may be 0.

    Raises:
        ValueError: shapes differ or are not ``(B, Z, Y, X)``, unknown ``mode``, bad ``axis``.
        TypeError: non-integer label maps.
    """
    masks = critical_point_masks(pred_labels, ref_labels, spec, mode, axis, ignore_label, mesh_violations)
    return masks_to_targets(masks, ref_labels.to(pred_labels.device), spec)


def masks_to_targets(masks: Dict[str, Dict[str, Tensor]], ref_labels: Tensor,
                     spec: TopologySpec) -> List[Dict[str, Tuple[Tensor, Tensor]]]:
    """Union over the sources of :func:`critical_point_masks`, as points and targets ``[ref ∈ region(mesh)]``."""
    batch = ref_labels.shape[0]
    out: List[Dict[str, Tuple[Tensor, Tensor]]] = [{} for _ in range(batch)]
    for mesh, structure in spec.mesh_structures.items():
        union = source_union(masks, mesh)
        for b in range(batch):
            idx = torch.nonzero(union[b], as_tuple=False)  # (N, 3), C order
            out[b][mesh] = (idx, targets_at(idx[None], ref_labels[b:b + 1], structure.label_ids)[0])
    return out


def source_union(masks: Dict[str, Dict[str, Tensor]], mesh: str) -> Tensor:
    """The ``(B, Z, Y, X)`` union over the sources of :func:`critical_point_masks` of one mesh's critical voxels."""
    union = None
    for src in masks.values():
        union = src[mesh] if union is None else union | src[mesh]
    return union


def mesh_violation_masks(
    meshes_mm: Sequence[Tensor],
    faces: Sequence[Tensor],
    mesh_names: Sequence[str],
    spec: TopologySpec,
    shape: Sequence[int],
    spacing: Optional[Sequence[float]] = None,
) -> Dict[str, Tensor]:
    """Voxel centres where the predicted meshes break a mesh-level rule (source (b) of TPM's critical points).

    The rules are those in force on the meshes (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`: the spec's
    ``mesh_rules`` and the voxel rules whose structures are mesh structures), each evaluated when all its meshes are
    among ``mesh_names``. Exclusion: inside both meshes; inclusion: inside the inner mesh and outside the outer one
    (and outside the meshes of its openings ``may_touch`` that were predicted). Inside = exact winding number > 1/2
    (sharp; no gradient is needed for the selection), at **every** voxel centre of the patch: every mesh a rule in
    force names is voxelised once per call by signed ray crossings (:func:`nnunet_topo.voxelize.voxelize`; shared by
    all its rules), and each rule is a boolean expression of those masks. Runs on the meshes' device without a host
    synchronisation.

    Args:
        meshes_mm: ``(B, V_s, 3)`` vertices in the patch's physical frame
            (:func:`nnunet_topo.frames.normalized_to_mm`), outward-oriented faces; no gradient flows.
        faces: ``(F_s, 3)`` per mesh; mesh_names: their names (keys of ``spec.mesh_structures``).
        spec: the spec (rules whose meshes are all among ``mesh_names`` are evaluated).
        shape: patch shape ``(Z, Y, X)``; spacing: ``(z, y, x)`` mm of the patch (None: 1 mm).

    Returns:
        ``{rule name: (B, Z, Y, X) bool}`` for the evaluated rules (a voxel rule read on the meshes under its own
        name, a mesh rule under its name), on the meshes' device.
    """
    by_name = {n: (v, f) for n, v, f in zip(mesh_names, meshes_mm, faces)}
    shape = tuple(int(s) for s in shape)
    rules = [r for r in mesh_rules_in_force(spec)[0] if all(m in by_name for m in mesh_rule_meshes(r))]
    needed: List[str] = []
    for rule in rules:  # an inclusion's openings count only where they have a predicted mesh
        openings = [] if isinstance(rule, MeshExclusionRule) else [m for m in rule.may_touch if m in by_name]
        needed += [m for m in list(mesh_rule_meshes(rule)) + openings if m not in needed]
    out: Dict[str, Tensor] = {}
    with torch.no_grad():
        # voxel index (z, y, x) reverses the axis order of the physical frame (x, y, z): orientation -1
        inside = {m: voxelize(mm_to_voxel(by_name[m][0].detach(), spacing), by_name[m][1], shape, orientation=-1)
                  for m in needed}
        for rule in rules:
            first, second = mesh_rule_meshes(rule)
            if isinstance(rule, MeshExclusionRule):
                out[rule.name] = inside[first] & inside[second]
            else:
                mask = inside[first] & ~inside[second]
                for m in rule.may_touch:
                    if m in inside:
                        mask &= ~inside[m]
                out[rule.name] = mask
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
