"""Mesh Interrelation Enhancement loss ``L_MIE`` (relational anatomical supervision; DESIGN §6).

The MIE strategy supervises the meshes where the *prediction* breaks a relation between structures: critical
points are the violation voxels of the predicted label map, detected **slice-wise (2D)** (every rule is checked
slice by slice, :func:`~nnunet_topo.losses.mesh_targets.critical_point_targets` with ``mode="2d"``), with the
rule-aware targets of TPM Eq. 6-9 (C. Zhang et al., arXiv:2503.07874). Per mesh and batch item ``num_points``
query points are drawn as a mix: ``round(rho * num_points)`` critical points (``rho = 0.2``) and the rest random
points (uniform in the patch and near the reference surface, targets ``[label ∈ region]``); if fewer critical
points exist, all of them are used and random points fill up to ``num_points``. The loss is the BCE of the mesh
occupancy (TPM Eq. 5) on those points, **one** mean over the ``B * num_points`` points of a mesh (critical and random
together: a critical point weighs exactly what a random point weighs, as in TPM Eq. 10-11, and the ρ share is the
only knob; tests/test_tpm_weighting.py checks it against a per-point loop), then the mean over meshes, plus a
uniform-Laplacian smoothness term of
the meshes (:func:`nnunet_topo.metrics.mesh.laplacian_smoothness_energy`, mean squared uniform Laplacian, in
mm² divided by ``length_scale²``) weighted by ``lambda_lap``. The critical points
come from both sources of TPM (the label map, detected slice-wise, and the meshes, checked against the mesh-level
rules in force: the spec's ``mesh_rules`` and the voxel rules read on the meshes; :mod:`.mesh_targets`).

Host synchronisation (issue 26, item 3): the critical points are a fixed-size selection from the masks of both
sources (:func:`mix_points`, :func:`~nnunet_topo.losses.mesh_targets.select_points`), the random order is drawn on
the device, the Laplacian's edge structure is built once per faces tensor (:mod:`nnunet_topo.faces_cache`), and the
count stays a 0-d tensor (``last_num_critical``) until logged; tests/test_tpm_weighting.py records the aten ops of a
forward and backward after the first call.

Frame: the meshes arrive in the normalised patch frame and every length is measured in the patch's physical frame
(mm, ``spacing``), as in :class:`~nnunet_topo.losses.tpm.TPMLoss`.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nnunet_topo.frames import check_spacing, normalized_to_mm, voxel_to_mm
from nnunet_topo.losses.mesh_targets import (generator_on, sample_query_points, select_points, source_union,
                                             targets_at)
from nnunet_topo.losses.mesh_loss_checks import check_count, check_flag, check_mesh_inputs, check_mesh_loss_options
from nnunet_topo.losses.tpm import critical_masks_both_sources, known_weights
from nnunet_topo.metrics.mesh import laplacian_smoothness_energy
from nnunet_topo.occupancy import DEFAULT_EPS, occupancy_bce
from nnunet_topo.topology_spec import TopologySpec

__all__ = ["mix_points", "MIELoss"]


def mix_points(
    critical_mask: Tensor,
    ref_labels: Tensor,
    label_ids: Sequence[int],
    random_points: Tensor,
    random_targets: Tensor,
    rho: float = 0.2,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Mix critical and random points per batch item: ``round(rho * N)`` critical ones, random ones for the rest,
    as fixed-size tensors with no host synchronisation (issue 26).

    The critical points are a uniformly random subset without replacement of each item's ``critical_mask`` voxels
    (:func:`~nnunet_topo.losses.mesh_targets.select_points`), all of them when there are fewer; a slot without a
    critical point takes a random point (the last ones of ``random_points``, which are in random order): the first
    ``round(rho * N)`` rows are the critical slots (in no particular order), the rest the first random points.

    Args:
        critical_mask: ``(B, Z, Y, X)`` bool, the mesh's critical voxels.
        ref_labels: ``(B, Z, Y, X)``; the critical points' targets are ``[ref ∈ label_ids]``.
        label_ids: the mesh's region.
        random_points: ``(B, N, 3)`` continuous voxel indices, in random order.
        random_targets: ``(B, N)``.
        rho: fraction of critical points in [0, 1].
        generator: for the choice of critical points (used where it lives on the mask's device).

    Returns:
        ``(points (B, N, 3) float32, targets (B, N) float32, number of critical points (B,) long)``.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho!r}")
    n = random_points.shape[1]
    rnd_p, rnd_t = random_points.to(torch.float32), random_targets.to(torch.float32)
    k = min(int(round(rho * n)), n)
    if k == 0:
        return rnd_p, rnd_t, torch.zeros(rnd_p.shape[0], dtype=torch.long, device=rnd_p.device)
    idx, valid = select_points(critical_mask, k, generator)  # (B, k', 3), k' = min(k, Z*Y*X)
    k = idx.shape[1]
    crit_p = idx.to(device=rnd_p.device, dtype=torch.float32)
    crit_t = targets_at(idx, ref_labels, label_ids).to(rnd_p.device)
    valid = valid.to(rnd_p.device)
    head_p = torch.where(valid[..., None], crit_p, rnd_p[:, n - k:])
    head_t = torch.where(valid, crit_t, rnd_t[:, n - k:])
    return (torch.cat([head_p, rnd_p[:, : n - k]], dim=1), torch.cat([head_t, rnd_t[:, : n - k]], dim=1),
            valid.sum(dim=1))


class MIELoss(nn.Module):
    """Mesh Interrelation Enhancement: occupancy BCE on a critical/random point mix plus Laplacian smoothness.

    Args:
        spec: the topology spec, slice axes in the patch's array order.
        mesh_names: names of ``spec.mesh_structures`` in the order of the mesh head's outputs.
        method: occupancy method, ``"exact"`` or ``"dipole"`` (exact has zero vertex gradients on closed meshes;
            see :mod:`nnunet_topo.occupancy`).
        rho: fraction of critical points (0.2).
        num_points: query points per mesh and batch item.
        surface_fraction: share of the random points drawn near the reference surface (the rest uniform).
        lambda_lap: weight of the Laplacian term in ``total``.
        axis: slice axis for the 2D detection of 3d rules; ``None`` = each rule's ``axis`` attribute.
        eps: occupancy clamp margin.
        smoothing: smoothed-dipole sigma in mm (``method="dipole"`` only).
        spacing: ``(z, y, x)`` mm of the patches (None: 1 mm); every length is measured in this physical frame.
        mesh_critical_points: critical points where the meshes break a rule too (every patch voxel, as
            :class:`~nnunet_topo.losses.tpm.TPMLoss`); False: label-map critical points only.
        ignore_label: nnU-Net's ignore label, never a query or critical point.
        length_scale: the Laplacian energy (mm²) is divided by ``length_scale²`` (e.g. the mean template edge
            length in mm), so that it is dimensionless and the same for any voxel size.

    Shapes (forward):
        meshes: list of ``(B, V_s, 3)`` (normalised patch frame); faces: list of ``(F_s, 3)``;
        seg_logits: ``(B, C, Z, Y, X)``; ref_labels: ``(B, 1, Z, Y, X)``.
        Returns ``{"mie": BCE, "laplacian": energy (unweighted), "total": mie + lambda_lap * laplacian}``;
        the number of critical points used by the last call is kept in ``last_num_critical`` (0-d tensor) and the
        critical voxels per source in ``last_counts`` (for logging).
    """

    def __init__(self, spec: TopologySpec, mesh_names: Sequence[str], method: str = "exact", rho: float = 0.2,
                 num_points: int = 2048, surface_fraction: float = 0.5, lambda_lap: float = 0.1,
                 axis: Optional[int] = None, eps: float = DEFAULT_EPS, smoothing: float = 0.0,
                 spacing: Optional[Sequence[float]] = None, mesh_critical_points: bool = True,
                 ignore_label: Optional[int] = None, length_scale: float = 1.0) -> None:
        super().__init__()
        self.spec = spec
        self.mesh_names = check_mesh_loss_options(spec, mesh_names, method, eps, smoothing)
        if not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho!r}")
        if not isinstance(surface_fraction, (int, float)) or not 0.0 <= surface_fraction <= 1.0:
            raise ValueError(f"surface_fraction must lie in [0, 1], got {surface_fraction!r}")
        if not isinstance(lambda_lap, (int, float)) or isinstance(lambda_lap, bool) or lambda_lap < 0:
            raise ValueError(f"lambda_lap must be a number >= 0, got {lambda_lap!r}")
        if axis is not None and axis not in (0, 1, 2):
            raise ValueError(f"axis must be None or 0, 1, 2, got {axis!r}")
        if not isinstance(length_scale, (int, float)) or not length_scale > 0:
            raise ValueError(f"length_scale must be a positive length in mm, got {length_scale!r}")
        self.num_points = check_count("num_points", num_points, 1)
        self.method, self.rho, self.surface_fraction = method, float(rho), float(surface_fraction)
        self.lambda_lap, self.axis, self.eps, self.smoothing = float(lambda_lap), axis, float(eps), float(smoothing)
        self.spacing = check_spacing(spacing)
        self.mesh_critical_points = check_flag("mesh_critical_points", mesh_critical_points)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.length_scale = float(length_scale)
        self.last_num_critical: Tensor = torch.zeros((), dtype=torch.long)
        self.last_counts: Dict[str, int] = {}

    def forward(self, meshes: Sequence[Tensor], faces: Sequence[Tensor], seg_logits: Tensor, ref_labels: Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        ref = check_mesh_inputs(meshes, faces, seg_logits, ref_labels, len(self.mesh_names))
        shape = tuple(ref.shape[1:])
        meshes_mm = [normalized_to_mm(v, shape, self.spacing) for v in meshes]
        masks, self.last_counts = critical_masks_both_sources(
            meshes_mm, faces, self.mesh_names, self.spec, seg_logits, ref, self.spacing, self.mesh_critical_points,
            self.ignore_label, mode="2d", axis=self.axis)
        num_surface = int(round(self.surface_fraction * self.num_points))
        num_uniform = self.num_points - num_surface
        bce_terms, lap_terms, n_crit = [], [], []
        for name, v, f in zip(self.mesh_names, meshes_mm, faces):
            ids = self.spec.mesh_structures[name].label_ids
            rnd_p, rnd_t = sample_query_points(ref, ids, num_uniform, num_surface, generator)
            # random points in random order, so that filling up with the first ones keeps the uniform/surface mix
            perm = torch.randperm(self.num_points, generator=generator_on(generator, rnd_p.device), device=rnd_p.device)
            pts, tgts, k = mix_points(source_union(masks, name), ref, ids, rnd_p[:, perm], rnd_t[:, perm], self.rho,
                                      generator)
            n_crit.append(k.sum())
            w = known_weights(ref, pts, self.ignore_label)
            pm = voxel_to_mm(pts, self.spacing).to(v.dtype)
            bce_terms.append(occupancy_bce(pm, v, f, tgts, method=self.method, eps=self.eps,
                                           weights=w, reduction="mean", smoothing=self.smoothing))
            lap_terms.append(laplacian_smoothness_energy(v, f).mean() / self.length_scale ** 2)
        mie = torch.stack(bce_terms).mean()
        lap = torch.stack(lap_terms).mean()
        self.last_num_critical = torch.stack(n_crit).sum()  # a 0-d tensor, read only when logged
        return {"mie": mie, "laplacian": lap, "total": mie + self.lambda_lap * lap}

    def extra_repr(self) -> str:
        return (f"mesh_names={self.mesh_names}, method={self.method!r}, rho={self.rho}, num_points={self.num_points}, "
                f"surface_fraction={self.surface_fraction}, lambda_lap={self.lambda_lap}, axis={self.axis}, "
                f"smoothing={self.smoothing} mm, spacing={self.spacing}, "
                f"mesh_critical_points={self.mesh_critical_points}")
