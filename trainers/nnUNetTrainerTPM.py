"""nnUNetTrainerTPM: the Topology-Preserving Mesh loss (C. Zhang et al., arXiv:2503.07874, Eq. 6-11).

``L = L_seg + L_occ + λ_TP L_TPM + regularisers``: the occupancy BCE of :class:`nnUNetTrainerMesh` plus the same
BCE on the *critical points* of the topology rules with rule-aware targets (``nnunet_topo/losses/tpm.py``).
L_TPM is switched on after a warm-up of ``L_seg + L_occ`` (``tpm_warmup_epochs``, paper §3.1; during the warm-up
its weight is 0 and ``train_tpm``/``val_tpm`` are logged as NaN). λ_TP = 0.5 (the paper's best on CT);
``nnUNetTrainerTPM_lambda1`` uses 1.0 (best on MRI).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import Tensor

from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh


class nnUNetTrainerTPM(nnUNetTrainerMesh):
    """``L_seg + L_occ + λ_TP L_TPM`` + regularisers, λ_TP = 0.5 (TPM, best on CT), TPM after the warm-up."""

    lambda_tp: float = 0.5
    #: epochs of L_seg + L_occ before L_TPM is switched on (None: 10 % of num_epochs)
    tpm_warmup_epochs: Optional[int] = None

    def warmup_epochs(self) -> int:
        return int(round(0.1 * self.num_epochs)) if self.tpm_warmup_epochs is None else int(self.tpm_warmup_epochs)

    def tpm_active(self) -> bool:
        return self.current_epoch >= self.warmup_epochs()

    def topology_term_names(self):
        return ("occ", "tpm", "laplacian", "edge")

    def _term_weights(self) -> Dict[str, float]:
        return {**super()._term_weights(), "tpm": self.lambda_tp}

    def _make_loss_modules(self) -> None:
        super()._make_loss_modules()
        self._tpm_loss = self._occupancy_loss(self.patch_topology_spec, self.lambda_tp)
        self.print_to_log_file(f"L_TPM: λ_TP {self.lambda_tp}, warm-up {self.warmup_epochs()} epochs, critical points "
                               f"from the label map and the meshes ({self.mesh_candidates} random candidates per "
                               f"rule), at most {self.max_critical_points} per mesh")

    def extra_logged_term_names(self):
        # critical voxels per step from each source (label map, meshes), before the cap
        return super().extra_logged_term_names() + ("crit_pred", "crit_mesh")

    def compute_mesh_terms(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor,
                           target: Tensor) -> Dict[str, Tensor]:
        """``occ``, ``tpm`` (a graph-connected zero during the warm-up), ``laplacian``, ``edge``."""
        if not self.tpm_active():
            out = super().compute_mesh_terms(meshes, faces, logits, target)
            out["tpm"] = sum(v.sum() for v in meshes) * 0.0  # its weight is 0 during the warm-up anyway
            return out
        r = self._tpm_loss(meshes, faces, logits, target)
        # this step's critical points per source, popped with the step's term values
        self._point_counts = {"crit_pred": self._tpm_loss.last_counts["prediction"],
                              "crit_mesh": self._tpm_loss.last_counts["meshes"]}
        return {"occ": r["occ"], "tpm": r["tpm"], **self.regularisers(meshes, faces, logits)}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if hasattr(self.loss, "weights"):
            self.loss.weights["tpm"] = self.lambda_tp if self.tpm_active() else 0.0
            if self.current_epoch == self.warmup_epochs():
                self.print_to_log_file(f"L_TPM switched on (λ_TP = {self.lambda_tp}) at epoch {self.current_epoch}")

    def _pop_term_values(self, split: str) -> Dict[str, float]:
        values = super()._pop_term_values(split)
        if not self.tpm_active():
            values[f"{split}_tpm"] = float("nan")  # not computed during the warm-up
        counts = self.__dict__.pop("_point_counts", {})  # none: TPM did not run in this step (warm-up)
        for name in ("crit_pred", "crit_mesh"):
            values[f"{split}_{name}"] = float(counts.get(name, float("nan")))
        return values


class nnUNetTrainerTPM_lambda1(nnUNetTrainerTPM):
    """λ_TP = 1.0 (TPM's best on MRI)."""

    lambda_tp: float = 1.0
