"""nnUNetTrainerTPM: the Topology-Preserving Mesh loss (C. Zhang et al., arXiv:2503.07874, Eq. 6-12).

``L = L_seg + L_occ + λ_TP L_TPM + regularisers``: the occupancy BCE of :class:`nnUNetTrainerMesh` plus L_TPM, one
BCE over the standard query points and the *critical points* of the topology rules (voxel rules and mesh rules) with
rule-aware targets (``nnunet_topo/losses/tpm.py``). λ_TP = 0.5 (the paper's best on CT); ``nnUNetTrainerTPM_lambda1``
uses 1.0 (best on MRI).

Schedule (the paper: "we first optimize the model using Dice + L_occ before introducing L_TP"): L_TPM is off (not
computed, logged NaN) until the meshes fit — every structure's mean mesh volume / reference volume on the training
batches of an epoch within ``mesh_ready_volume_band`` — or, at the latest, until ``topology_start_epoch`` (default:
half of ``num_epochs``; a 1000-epoch run: at most 500 + 500). ``nnUNetTrainerTPM_finetune`` has it on from the first
epoch: for a start from a trained mesh model (``-pretrained_weights`` of an ``nnUNetTrainerMesh`` checkpoint, head
included: the paper's protocol).
"""
from __future__ import annotations

from typing import Dict, List

from torch import Tensor

from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh


class nnUNetTrainerTPM(nnUNetTrainerMesh):
    """``L_seg + L_occ + λ_TP L_TPM`` + regularisers, λ_TP = 0.5 (TPM, best on CT), L_TPM once the meshes fit."""

    lambda_tp: float = 0.5

    def default_topology_start_epoch(self) -> int:
        return self.num_epochs // 2

    def phase_term_names(self):
        return ("tpm",)

    def mesh_term_names(self):
        return ("occ", "tpm", "laplacian", "edge")

    def mesh_term_weights(self) -> Dict[str, float]:
        return {**super().mesh_term_weights(), "tpm": self.lambda_tp if self.topology_active() else 0.0}

    def _make_loss_modules(self) -> None:
        super()._make_loss_modules()
        self._tpm_loss = self._occupancy_loss(self.patch_topology_spec, self.lambda_tp)
        self.print_to_log_file(f"L_TPM: λ_TP {self.lambda_tp}, on from epoch {self.topology_start()} at the latest "
                               f"(earlier once the meshes fit), critical points from the label map"
                               f"{' and the meshes (every voxel)' if self.mesh_critical_points else ' only'}, at most "
                               f"{self.max_critical_points} per mesh")

    def extra_logged_term_names(self):
        # critical voxels per step from each source (label map, meshes), before the cap
        return super().extra_logged_term_names() + ("crit_pred", "crit_mesh")

    def compute_mesh_terms(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor,
                           target: Tensor) -> Dict[str, Tensor]:
        """``occ``, ``tpm`` (only once the topology phase is on), ``laplacian``, ``edge``."""
        if not self.topology_active():
            self._point_counts = {}
            return super().compute_mesh_terms(meshes, faces, logits, target)
        r = self._tpm_loss(meshes, faces, logits, target)
        self._point_counts = {"crit_pred": self._tpm_loss.last_counts["prediction"],
                              "crit_mesh": self._tpm_loss.last_counts["meshes"]}
        return {"occ": r["occ"], "tpm": r["tpm"], **self.regularisers(meshes, faces, logits)}

    def _mesh_log_values(self, split, values, meshes, faces, target) -> dict:
        out = super()._mesh_log_values(split, values, meshes, faces, target)
        counts = self.__dict__.pop("_point_counts", {})
        for name in ("crit_pred", "crit_mesh"):
            out[f"{split}_{name}"] = float(counts.get(name, float("nan")))
        return out


class nnUNetTrainerTPM_lambda1(nnUNetTrainerTPM):
    """λ_TP = 1.0 (TPM's best on MRI)."""

    lambda_tp: float = 1.0


class nnUNetTrainerTPM_finetune(nnUNetTrainerTPM):
    """L_TPM from the first epoch: start from a trained ``nnUNetTrainerMesh`` model (``-pretrained_weights``)."""

    topology_start_epoch = 0


class nnUNetTrainerTPM_lambda1_finetune(nnUNetTrainerTPM_lambda1):
    """λ_TP = 1.0, L_TPM from the first epoch (start from a trained ``nnUNetTrainerMesh`` model)."""

    topology_start_epoch = 0
