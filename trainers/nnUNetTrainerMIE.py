"""nnUNetTrainerMIE: Mesh Interrelation Enhancement (relational anatomical supervision, DESIGN §6).

``L = L_seg + mie_weight L_MIE + mie_laplacian_weight L_lap``: occupancy BCE on a mix of ρ = 0.2 slice-wise (2D)
critical points and 0.8 random points in one mean, with uniform-Laplacian smoothness (``nnunet_topo/losses/mie.py``).
The mesh head, templates, augmentation and optimisers are those of :class:`nnUNetTrainerMesh`.

Schedule (MIE is the TPM authors' line of work: occupancy first, then the violations): ρ = 0 (random points only,
i.e. plain occupancy) until the meshes fit or ``topology_start_epoch`` (default: half of ``num_epochs``), then ρ = 0.2.
``nnUNetTrainerMIE_finetune`` uses ρ = 0.2 from the first epoch.
"""
from __future__ import annotations

from typing import Dict

from nnunet_topo.losses.mie import MIELoss
from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh


class nnUNetTrainerMIE(nnUNetTrainerMesh):
    """``L_seg + L_MIE + mie_laplacian_weight L_lap`` with ρ = 0.2 critical points + 0.8 random points."""

    mie_rho: float = 0.2
    mie_num_points: int = 2048
    mie_weight: float = 1.0
    mie_laplacian_weight: float = 0.1
    regulariser_names = ("laplacian",)

    def default_topology_start_epoch(self) -> int:
        return self.num_epochs // 2

    def phase_term_names(self):
        return ("mie_rho",)

    def mesh_term_names(self):
        return ("mie", "laplacian")

    def mesh_term_weights(self) -> Dict[str, float]:
        return {"mie": self.mie_weight, "laplacian": self.mie_laplacian_weight}

    def extra_logged_term_names(self):
        return super().extra_logged_term_names() + ("mie_rho",)

    def _make_loss_modules(self) -> None:
        super()._make_loss_modules()  # template edge lengths in mm (the Laplacian's length scale)
        smoothing = self.mesh_smoothing()
        self._mie_loss = MIELoss(self.patch_topology_spec, self.mesh_names, method=self.occupancy_method,
                                 rho=self.mie_rho, num_points=self.mie_num_points, lambda_lap=0.0, smoothing=smoothing,
                                 spacing=self.patch_spacing(), mesh_critical_points=self.mesh_critical_points,
                                 ignore_label=self.label_manager.ignore_label, length_scale=self._mean_edge_mm)
        self.print_to_log_file(f"MIE loss: occupancy {self.occupancy_method}, smoothing {smoothing:.3f} mm, "
                               f"rho {self.mie_rho} from epoch {self.topology_start()} at the latest (0 before), "
                               f"weights {self.mesh_term_weights()}")

    def compute_mesh_terms(self, meshes, faces, logits, target):
        self._mie_loss.rho = self.mie_rho if self.topology_active() else 0.0
        r = self._mie_loss(meshes, faces, logits, target)
        return {"mie": r["mie"], "laplacian": r["laplacian"]}

    def _mesh_log_values(self, split, values, meshes, faces, target) -> dict:
        out = super()._mesh_log_values(split, values, meshes, faces, target)
        out[f"{split}_mie_rho"] = self._mie_loss.rho if self.topology_active() else float("nan")
        return out


class nnUNetTrainerMIE_finetune(nnUNetTrainerMIE):
    """ρ = 0.2 from the first epoch: for ``-pretrained_weights`` of a trained model."""

    topology_start_epoch = 0
