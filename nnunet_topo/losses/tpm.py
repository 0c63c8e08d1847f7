"""Topology-Preserving Mesh loss: ``L_occ`` and ``L_TPM`` (TPM Eq. 5-11).

C. Zhang, Y. Luo, Y. Wu, C. H. Yap, G. Yang, *Topology-Preserving Loss for Accurate and Anatomically Consistent
Cardiac Mesh Reconstruction* (TPM, arXiv:2503.07874); DESIGN §6.

* ``L_occ`` (Eq. 10-11): per mesh structure X, query points uniform in the patch and near the reference
  surface of X (:func:`~nnunet_topo.losses.mesh_targets.sample_query_points`), BCE of the mesh occupancy
  (Eq. 5, :func:`nnunet_topo.occupancy.occupancy_bce`) against ``[label(p) ∈ region(X)]``; mean over meshes.
* ``L_TPM`` (Eq. 6-12): **one** BCE with 1/N over the whole query set of a mesh: the standard points of
  ``L_occ`` (the same points, the same per-point values) **plus** the *critical points* with rule-aware targets
  (:func:`~nnunet_topo.losses.mesh_targets.critical_point_masks`): the violation voxels of the current prediction
  ``argmax(seg_logits)`` (no gradient through the argmax) **and** the voxel centres where the predicted meshes
  break a mesh-level rule (``mesh_critical_points``; every patch voxel against the spec's ``mesh_rules`` and the
  voxel rules read on the meshes,
  :func:`nnunet_topo.topology_spec.mesh_rules_in_force`; without them, meshes that penetrate each other over a correct
  segmentation are never penalised). Each critical point of a rule is a point of every mesh the rule names, target
  ``[reference ∈ region(mesh)]``. Per mesh and batch item ``(Σ_S bce + Σ_C bce) / (|S| + |C|)``, then the mean over
  batch items and meshes (the same means as ``L_occ``). A critical point therefore weighs exactly what a standard
  point weighs; with no critical point ``tpm`` equals ``occ``, and ``tpm - occ`` fades as the violations vanish.
  (Before, ``tpm`` was the mean over the critical points alone, which gave each of them up to ``2048 / |C|`` times
  a standard point's weight and collapsed the shared segmentation on ACDC; DESIGN §6 "Weighting".)

The total of the paper (Eq. 12) is ``L = L_seg + L_occ + λ_TP · L_TPM`` (λ_TP = 0.5); this module returns ``occ``
(``L_occ``), ``tpm`` (``L_TPM`` as defined above) and ``total = occ + lambda_tp * tpm``, so that the caller adds
``L_seg`` and gets Eq. 12 exactly. The standard points thus enter the total with weight ``1 + λ_TP`` per point
over ``|S|`` resp. ``|S| + |C|``: as in the paper, ``L_TPM`` is a second occupancy term that includes the critical
points, not a term on the critical points alone. The warm-up (``L_seg + L_occ`` only, paper §3.1) belongs to the
caller. With ``num_uniform = num_surface = 0`` the query set is the critical points alone (then ``tpm`` is their
mean, per mesh and batch item that has any).

Frames: the mesh head predicts in the normalised patch frame of ``grid_sample(align_corners=True)``; the loss maps
vertices and query points to the patch's **physical frame** (mm, ``spacing``; DESIGN §6 "Frames") before any
occupancy is evaluated, so the dipole smoothing is a length in mm, the same along every axis.

Gradients: with ``method="exact"`` the occupancy of a closed mesh is piecewise constant in the vertex positions
(see :mod:`nnunet_topo.occupancy`), so the vertex gradient is zero almost everywhere; train with
``method="dipole"`` and ``smoothing > 0`` (mm; at least about half the mean edge length, documentation/benchmarks.md
"Dipole smoothing").

**Host synchronisation** (issue 26, item 3). With a cap on the critical points (``max_critical_points``, the
trainers' 2048) a forward and backward of :class:`TPMLoss` reads nothing back from the device:
the occupancy (:mod:`nnunet_topo.occupancy`: faces range-checked once per tensor, NaN and target checks
asynchronous on accelerators), the mesh source (:func:`~.mesh_targets.mesh_violation_masks`: exact voxelisation by
ray crossings, :mod:`nnunet_topo.voxelize`, rules as boolean algebra), the union of the sources, the capped
selection (:func:`~.mesh_targets.select_points`: top-k of random scores over each mask, fixed size, a validity
weight in the BCE and in its 1/N), and the counts per source, kept as 0-d tensors until the trainer logs them
(tests/test_tpm_weighting.py records every aten op under :class:`nnunet_topo.voxelize.HostSyncRecorder`; MIE and
the shape regularisers likewise, their faces' range checks and edges once per faces tensor,
:mod:`nnunet_topo.faces_cache`). Still synchronising: ``max_critical_points=None`` (the points as ``nonzero`` index
lists), label-map rules that count connected components, and what the trainers log per step (``float()`` of the
values).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nnunet_topo.frames import check_spacing, normalized_to_mm, voxel_to_mm
from nnunet_topo.losses.mesh_loss_checks import check_count, check_flag, check_mesh_inputs, check_mesh_loss_options
from nnunet_topo.losses.mesh_targets import (SOURCES, critical_point_masks, masks_to_targets, mesh_violation_masks,
                                             sample_query_points, select_points, source_union, targets_at)
from nnunet_topo.occupancy import DEFAULT_EPS, occupancy_bce
from nnunet_topo.topology_spec import TopologySpec

__all__ = ["occupancy_loss", "TPMLoss", "critical_bce", "critical_points_both_sources",
           "critical_masks_both_sources", "known_weights"]


def occupancy_loss(
    vertices: Tensor,
    faces: Tensor,
    points_norm: Tensor,
    targets: Tensor,
    method: str = "exact",
    eps: float = DEFAULT_EPS,
    smoothing: float = 0.0,
    weights: Optional[Tensor] = None,
) -> Tensor:
    """Mean BCE of mesh occupancy at query points (TPM Eq. 10-11).

    Args:
        vertices: ``(B, V, 3)`` mesh vertices (any frame shared with the points, e.g. mm); differentiable.
        faces: ``(F, 3)`` integer triangles shared by the batch, outward (counter-clockwise) orientation.
        points_norm: ``(B, N, 3)`` query points in the same frame.
        targets: ``(B, N)`` in [0, 1] (1 = inside the structure).
        method: ``"exact"`` or ``"dipole"`` (:func:`nnunet_topo.occupancy.winding_number`).
        eps: occupancy clamp margin in (0, 0.5).
        smoothing: smoothed-dipole sigma in the frame's unit (``method="dipole"`` only).
        weights: optional per-point weights broadcastable to ``(B, N)``.

    Returns:
        Scalar float32 tensor (mean over all ``B * N`` points); a zero connected to ``vertices``' graph when
        ``N == 0``.

    Raises:
        ValueError: shapes that do not match.
    """
    for name, x in (("vertices", vertices), ("points_norm", points_norm)):
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be a (B, *, 3) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if points_norm.shape[0] != vertices.shape[0]:
        raise ValueError(f"points_norm has batch size {points_norm.shape[0]} but vertices has {vertices.shape[0]}")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != tuple(points_norm.shape[:2]):
        raise ValueError(f"targets must have shape (B, N) = {tuple(points_norm.shape[:2])}, got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    return occupancy_bce(points_norm.to(vertices.device), vertices, faces, targets, method=method, eps=eps,
                         weights=weights, reduction="mean", smoothing=smoothing)


def critical_bce(
    vertices_mm: Tensor,
    faces: Tensor,
    points_idx: Sequence[Tensor],
    targets: Sequence[Tensor],
    spacing: Optional[Sequence[float]] = None,
    method: str = "exact",
    eps: float = DEFAULT_EPS,
    smoothing: float = 0.0,
) -> Tuple[Tensor, int]:
    """Sum of the occupancy BCE over ragged per-sample point sets, and the number of points.

    Args:
        vertices_mm: ``(B, V, 3)`` in the patch's physical frame (:func:`nnunet_topo.frames.normalized_to_mm`).
        faces: ``(F, 3)``.
        points_idx: ``B`` tensors ``(N_b, 3)`` of voxel indices ``(z, y, x)``.
        targets: ``B`` tensors ``(N_b,)``.
        spacing: ``(z, y, x)`` mm of the patch (None: 1 mm); smoothing: dipole sigma in mm.

    Returns:
        ``(sum of per-point BCE (graph-connected zero if no points), total number of points)``.
    """
    total = vertices_mm.sum() * 0.0
    count = 0
    for b, (p, t) in enumerate(zip(points_idx, targets)):
        if p.shape[0] == 0:
            continue
        pm = voxel_to_mm(p.to(vertices_mm.device), spacing).to(vertices_mm.dtype)
        total = total + occupancy_bce(pm, vertices_mm[b], faces, t.to(vertices_mm.device), method=method, eps=eps,
                                      reduction="sum", smoothing=smoothing)
        count += int(p.shape[0])
    return total, count


class TPMLoss(nn.Module):
    """``L_occ`` and ``L_TPM`` of the TPM paper for a batch of predicted meshes.

    Args:
        spec: the topology spec (rules, mesh structures, connectivity), slice axes in the patch's array order
            (:func:`nnunet_topo.topology_spec.spec_in_patch_frame`).
        mesh_names: names of ``spec.mesh_structures`` in the order of the mesh head's outputs.
        method: occupancy method, ``"exact"`` or ``"dipole"`` (see the module docstring about gradients).
        lambda_tp: weight of ``L_TPM`` in ``total`` (paper: 0.5 CT, 1.0 MRI).
        num_uniform: uniform query points per mesh and batch item for ``L_occ``.
        num_surface: near-surface query points per mesh and batch item for ``L_occ``.
        max_critical_points: at most this many critical points per mesh and batch item (random subset;
            ``None`` = all) to bound the cost; the subset enters the 1/N of ``L_TPM`` with its own size.
        eps: occupancy clamp margin.
        smoothing: smoothed-dipole sigma in **mm** (``method="dipole"`` only).
        spacing: ``(z, y, x)`` voxel size of the patches in mm (the configuration's spacing); None: 1 mm.
        mesh_critical_points: critical points of source (b) too: every patch voxel where the predicted meshes
            break a mesh-level rule (:func:`~.mesh_targets.mesh_violation_masks`, exact); ``False`` switches
            source (b) off (critical points from the label map only, the paper's ``P``).
        ignore_label: nnU-Net's ignore label: such voxels are never query or critical points. None: none.

    Shapes (forward):
        meshes: list of ``(B, V_s, 3)``, normalised patch frame; faces: list of ``(F_s, 3)``;
        seg_logits: ``(B, C, Z, Y, X)`` (channel c = label id c); ref_labels: ``(B, 1, Z, Y, X)``.
        Returns ``{"occ", "tpm", "total"}`` scalars: ``occ`` the BCE over the standard points, ``tpm`` the BCE
        over the standard points and the critical points together (1/N over both; equal to ``occ`` without
        critical points), ``total = occ + lambda_tp * tpm`` (TPM Eq. 12 without ``L_seg``). The numbers of critical
        points of the last call per source ((voxel, mesh) pairs over the batch, before the cap) are kept in
        ``last_counts``.
    """

    def __init__(self, spec: TopologySpec, mesh_names: Sequence[str], method: str = "exact",
                 lambda_tp: float = 0.5, num_uniform: int = 1024, num_surface: int = 1024,
                 max_critical_points: Optional[int] = 2048, eps: float = DEFAULT_EPS, smoothing: float = 0.0,
                 spacing: Optional[Sequence[float]] = None, mesh_critical_points: bool = True,
                 ignore_label: Optional[int] = None) -> None:
        super().__init__()
        self.spec = spec
        self.mesh_names = check_mesh_loss_options(spec, mesh_names, method, eps, smoothing)
        if not isinstance(lambda_tp, (int, float)) or isinstance(lambda_tp, bool) or lambda_tp < 0:
            raise ValueError(f"lambda_tp must be a number >= 0, got {lambda_tp!r}")
        self.method, self.lambda_tp, self.eps, self.smoothing = method, float(lambda_tp), float(eps), float(smoothing)
        self.num_uniform = check_count("num_uniform", num_uniform)
        self.num_surface = check_count("num_surface", num_surface)
        if max_critical_points is not None:
            check_count("max_critical_points", max_critical_points, 1)
        self.max_critical_points = max_critical_points
        self.spacing = check_spacing(spacing)
        self.mesh_critical_points = check_flag("mesh_critical_points", mesh_critical_points)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.last_counts: Dict[str, Tensor] = {src: torch.zeros((), dtype=torch.long) for src in SOURCES}

    def forward(self, meshes: Sequence[Tensor], faces: Sequence[Tensor], seg_logits: Tensor, ref_labels: Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        ref = check_mesh_inputs(meshes, faces, seg_logits, ref_labels, len(self.mesh_names))
        shape = tuple(ref.shape[1:])
        meshes_mm = [normalized_to_mm(v, shape, self.spacing) for v in meshes]
        zero = sum(v.sum() for v in meshes) * 0.0
        batch = ref.shape[0]
        n_std = self.num_uniform + self.num_surface
        has_rules = bool(self.spec.rules or self.spec.mesh_rules)
        fixed = self.max_critical_points is not None  # fixed-size, sync-free selection (else index lists)
        unions = critical = None
        if has_rules and fixed:
            unions = self.critical_masks(meshes_mm, faces, seg_logits, ref)
        elif has_rules:
            critical = self.critical_points(meshes_mm, faces, seg_logits, ref)
        occ_terms, tpm_terms, n_crit_all, pending = [], [], [], []
        any_critical = False
        for name, v, f in zip(self.mesh_names, meshes_mm, faces):
            # standard points S+/S- (Eq. 10-11): per-point BCE (B, n_std), weight 0 on ignored voxels
            std_sum = None
            ids = self.spec.mesh_structures[name].label_ids
            if n_std > 0:
                pts, tgt = sample_query_points(ref, ids, self.num_uniform, self.num_surface, generator)
                w = known_weights(ref, pts, self.ignore_label)
                pm = voxel_to_mm(pts, self.spacing).to(v.dtype)
                per_point = occupancy_bce(pm, v, f, tgt, method=self.method, eps=self.eps, weights=w,
                                          reduction="none", smoothing=self.smoothing)
                occ_terms.append(per_point.mean())
                std_sum = per_point.sum(dim=1)
            # L_TPM (Eq. 10-12): one BCE over the standard points and the critical points of this mesh and batch
            # item, 1/N over all of them
            if unions is not None:  # the critical points after every mesh's standard points (the generator's order)
                pending.append((name, v, f, ids, std_sum))
                continue
            for b in range(batch):  # no cap (max_critical_points=None): every critical point, as index lists
                crit_sum, n_crit = zero, 0
                if critical is not None:
                    p, t = critical[b][name]
                    crit_sum, n_crit = critical_bce(v[b:b + 1], f, [p], [t], self.spacing, self.method, self.eps,
                                                    self.smoothing)
                any_critical = any_critical or n_crit > 0
                n = n_crit + n_std
                if n > 0:
                    total = crit_sum + (std_sum[b] if std_sum is not None else 0.0)
                    tpm_terms.append(total / n)
        for name, v, f, ids, std_sum in pending:
            idx, valid = select_points(unions[name], self.max_critical_points, generator)
            pm = voxel_to_mm(idx, self.spacing).to(v.dtype)
            per_crit = occupancy_bce(pm, v, f, targets_at(idx, ref, ids), method=self.method, eps=self.eps,
                                     weights=valid, reduction="none", smoothing=self.smoothing)
            n = valid.sum(dim=1) + n_std                                    # (B,)
            total = per_crit.sum(dim=1) + (std_sum if std_sum is not None else 0.0)
            tpm_terms.append(torch.where(n > 0, total / n.clamp_min(1), 0.0))
            n_crit_all.append(n)
        occ = torch.stack(occ_terms).mean() if occ_terms else zero
        if n_crit_all:  # no host sync: the means over the (mesh, item) pairs with points, occ where none is critical
            n = torch.stack(n_crit_all)
            terms = torch.stack(tpm_terms)
            tpm = terms.sum() / (n > 0).sum().clamp_min(1) + zero
            tpm = torch.where((n > n_std).any(), tpm, occ)  # equal to the last bit without critical points
        elif not any_critical:
            tpm = occ  # the same mean over the same points (written so, it is equal to the last bit)
        else:
            tpm = torch.stack(tpm_terms).mean() + zero
        return {"occ": occ, "tpm": tpm, "total": occ + self.lambda_tp * tpm}

    def critical_points(self, meshes_mm: Sequence[Tensor], faces: Sequence[Tensor], seg_logits: Tensor,
                        ref: Tensor) -> List[Dict[str, Tuple[Tensor, Tensor]]]:
        """Critical points of both sources, merged, with targets; counts per source in ``last_counts``."""
        critical, self.last_counts = critical_points_both_sources(
            meshes_mm, faces, self.mesh_names, self.spec, seg_logits, ref, self.spacing, self.mesh_critical_points,
            self.ignore_label)
        return critical

    def critical_masks(self, meshes_mm: Sequence[Tensor], faces: Sequence[Tensor], seg_logits: Tensor,
                       ref: Tensor) -> Dict[str, Tensor]:
        """Per mesh, the ``(B, Z, Y, X)`` union of both sources' critical voxels; counts (tensors) in
        ``last_counts``."""
        masks, self.last_counts = critical_masks_both_sources(
            meshes_mm, faces, self.mesh_names, self.spec, seg_logits, ref, self.spacing, self.mesh_critical_points,
            self.ignore_label)
        return {m: source_union(masks, m) for m in self.mesh_names}

    def extra_repr(self) -> str:
        return (f"mesh_names={self.mesh_names}, method={self.method!r}, lambda_tp={self.lambda_tp}, "
                f"num_uniform={self.num_uniform}, num_surface={self.num_surface}, "
                f"max_critical_points={self.max_critical_points}, smoothing={self.smoothing} mm, "
                f"spacing={self.spacing}, mesh_critical_points={self.mesh_critical_points}, "
                f"ignore_label={self.ignore_label}")


def critical_masks_both_sources(
    meshes_mm: Sequence[Tensor], faces: Sequence[Tensor], mesh_names: Sequence[str], spec: TopologySpec,
    seg_logits: Tensor, ref: Tensor, spacing: Optional[Sequence[float]], mesh_critical_points: bool,
    ignore_label: Optional[int], mode: str = "3d",
    axis: Optional[int] = None) -> Tuple[Dict[str, Dict[str, Tensor]], Dict[str, Tensor]]:
    """Critical voxels of the label map ``argmax(seg_logits)`` (no gradient) and, if ``mesh_critical_points``,
    of the meshes (physical frame, :func:`~.mesh_targets.mesh_violation_masks`): the masks of
    :func:`~.mesh_targets.critical_point_masks` per source and mesh, and the number of critical points per source
    ((voxel, mesh) pairs over the batch, before any cap) as 0-d tensors (read only when logged)."""
    with torch.no_grad():
        pred = seg_logits.detach().argmax(dim=1)
        mesh_viol = None
        if mesh_critical_points:
            mesh_viol = mesh_violation_masks(meshes_mm, faces, mesh_names, spec, tuple(ref.shape[1:]), spacing)
        masks = critical_point_masks(pred, ref, spec, mode, axis, ignore_label, mesh_viol)
        zero = torch.zeros((), dtype=torch.long, device=ref.device)
        counts = {src: sum((m.sum() for m in masks[src].values()), zero) for src in SOURCES}
    return masks, counts


def critical_points_both_sources(
    meshes_mm: Sequence[Tensor], faces: Sequence[Tensor], mesh_names: Sequence[str], spec: TopologySpec,
    seg_logits: Tensor, ref: Tensor, spacing: Optional[Sequence[float]], mesh_critical_points: bool,
    ignore_label: Optional[int], mode: str = "3d",
    axis: Optional[int] = None) -> Tuple[List[Dict[str, Tuple[Tensor, Tensor]]], Dict[str, Tensor]]:
    """:func:`critical_masks_both_sources` as index lists with targets ``[ref ∈ region(mesh)]`` per batch item and
    mesh (:func:`~.mesh_targets.masks_to_targets`: ``nonzero``, a host synchronisation). Shared by :class:`TPMLoss`
    without a cap (``max_critical_points=None``) and MIE (``mode="2d"``)."""
    masks, counts = critical_masks_both_sources(meshes_mm, faces, mesh_names, spec, seg_logits, ref, spacing,
                                                mesh_critical_points, ignore_label, mode, axis)
    return masks_to_targets(masks, ref, spec), counts


def known_weights(ref: Tensor, points_idx: Tensor, ignore_label: Optional[int]) -> Optional[Tensor]:
    """``(B, N)`` weights 1 where the reference at the nearest voxel of a point is known, 0 where it is the ignore
    label; None without an ignore label."""
    if ignore_label is None:
        return None
    nearest = torch.round(points_idx).long()
    b_idx = torch.arange(ref.shape[0], device=ref.device).view(-1, 1).expand(-1, points_idx.shape[1])
    return (ref[b_idx, nearest[..., 0], nearest[..., 1], nearest[..., 2]] != ignore_label).to(torch.float32)
