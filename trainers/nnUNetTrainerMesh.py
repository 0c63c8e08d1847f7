"""nnUNetTrainerMesh: nnU-Net + a GCN mesh head supervised by occupancy (the λ_TP = 0 baseline of TPM Table 1).

``L = L_seg + occ_weight L_occ + laplacian_weight L_lap + edge_weight L_edge`` (TPM, arXiv:2503.07874, Eq. 5,
10-11), every mesh term in mm; ``L_seg`` is nnU-Net's own loss, untouched.

The head is a passenger (DESIGN §6-7, documentation/mesh_trainers.md): ``self.network`` is exactly nnU-Net's planned
network (so ``-pretrained_weights``, ``nnUNetv2_predict``, nnU-Net's clip and DDP work on it unchanged); the head
reads the decoder features that nnU-Net's forward computes anyway (hooks), has its own optimiser, clip, GradScaler
and lr, and is saved beside the network weights in the checkpoint (``HEAD_STATE_KEY``). The mesh terms reach the
backbone only through a gradient bounded by ``mesh_backbone_grad_share`` x L_seg's own gradient norm at each step
(``nnunet_topo/mesh_step.py``); the shape regularisers never reach it. ``train_step`` is changed here, once.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor


from nnunet_topo.frames import normalized_to_mm
from nnunet_topo.losses.mesh_regularisers import mesh_regularisers, template_edge_lengths
from nnunet_topo.losses.mesh_terms import default_smoothing_mm, mesh_volume_ratios
from nnunet_topo.losses.tpm import TPMLoss
from nnunet_topo.mesh_head.label_templates import training_templates
from nnunet_topo.mesh_head.network import (HEAD_FORMAT_VERSION, TEMPLATES_KEY, head_settings,
                                           store_in_configuration, stored_templates)
from nnunet_topo.mesh_passenger import MeshHeadPassenger
from nnunet_topo.mesh_head.templates import Template
from nnunet_topo.plans import saved_configuration
from nnunet_topo.roi_cache import roi_boxes_and_crops
from nnunet_topo.roi_loader import MeshROISampling
from nnunet_topo.topology_spec import TopologySpecError
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class nnUNetTrainerMesh(MeshHeadPassenger, MeshROISampling, nnUNetTrainerTopoBase):
    """nnU-Net + mesh head; ``L_seg + L_occ + laplacian_weight L_lap + edge_weight L_edge`` (λ_TP = 0)."""

    #: icosphere subdivision of genus-0 templates (3: 642 vertices) and (major, minor) sections of tori
    template_subdivisions: int = 3
    template_torus_sections: Tuple[int, int] = (32, 16)
    #: MeshHead settings and the decoder stages it samples (None: all); stored in the plans with the templates
    head_kwargs: Dict[str, int] = {"hidden_features": 64, "num_blocks": 2, "num_residual": 1, "alignment_hidden": 64}
    head_decoder_stages: Optional[Tuple[int, ...]] = None
    #: place each template at the network's own soft segmentation of its structure before the learned alignment
    segmentation_guided_placement: bool = True
    #: occupancy: "dipole" (trainable); its smoothing in mm (None: losses.mesh_terms.default_smoothing_mm)
    occupancy_method: str = "dipole"
    occupancy_smoothing_mm: Optional[float] = None
    #: L_occ query points per mesh and batch item (TPM Eq. 10-11), and the weights of the terms (not tuned)
    occ_num_uniform: int = 1024
    occ_num_surface: int = 1024
    occ_weight: float = 1.0
    #: TPM critical points: cap per mesh; also where the meshes break a rule, every voxel (False: label map only)
    max_critical_points: int = 2048
    mesh_critical_points: bool = True
    laplacian_weight: float = 0.1
    edge_weight: float = 0.1
    #: λ_TP of TPM Table 1: 0 here (no L_TPM term); nnUNetTrainerTPM sets it
    lambda_tp: float = 0.0
    #: the mesh terms' gradient into nnU-Net's network, at most this share of L_seg's own gradient norm at every step
    #: (0: the network trains exactly as plain nnU-Net; mesh_step.py). 0.1 is a first choice, not yet measured on
    #: ACDC (the fine-tune study, issue 22, is where it gets measured; documentation/mesh_trainers.md)
    mesh_backbone_grad_share: float = 0.1
    #: the share's bound is exact on every k-th step (a second backward through the network); in between it is
    #: predicted from the last exact step in one backward (mesh_step.ShareEstimate; 1: exact at every step)
    mesh_share_every: int = 5
    #: train the head only, on top of a trained network that stays exactly as it is (``nnUNetTrainerMesh_headOnly``
    #: with ``-pretrained_weights``): the network runs without gradient and is never stepped
    freeze_network: bool = False
    #: the head's own optimiser: Adam at ``head_lr`` with nnU-Net's poly decay over ``num_epochs``, clipped to
    #: ``head_grad_clip`` on its own (the segmentation's clip budget is nnU-Net's alone); 1e-3 measured on ACDC as
    #: the best of 1e-4..1e-2 (results.md "The mesh head's learning rate"; 1e-2 collapses the meshes)
    head_lr: float = 1e-3
    head_grad_clip: float = 12.0
    #: L_TPM / the MIE critical points: on from ``topology_start_epoch`` (nnUNetTrainerTopoBase) or, earlier, from
    #: the epoch after the meshes fit: every structure's mean mesh volume / reference volume within this band
    mesh_ready_volume_band: Tuple[float, float] = (0.85, 1.15)
    _ready_epoch: Optional[int] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.topology_spec.mesh_structures:
            raise TopologySpecError(
                f"{self.__class__.__name__} needs closed mesh structures, but the dataset's topology spec has no "
                "'mesh_structures'. Add them to the 'topology' block of dataset.json, e.g. "
                "\"mesh_structures\": {\"LV_epi\": [\"LV\", \"MYO\"], \"RV\": [\"RV\"]} (see "
                "documentation/topology_spec.md), and run nnUNetv2_plan_and_preprocess again (or copy dataset.json "
                "into the preprocessed folder).")
        self.mesh_names: Tuple[str, ...] = tuple(self.topology_spec.mesh_structures)
        self.mesh_model = None  # MeshAugmentedNetwork around self.network's own modules; built in initialize
        self._setup_templates()

    # ------------------------------------------------------------------ templates (stored in the plans)
    def _setup_templates(self) -> None:
        patch = [int(p) for p in self.configuration_manager.patch_size]
        if len(patch) != 3:
            raise RuntimeError(f"{self.__class__.__name__} needs a 3D configuration (mesh structures are closed "
                               f"surfaces), but {self.configuration_name!r} has patch size {patch}.")
        structures = {n: self.topology_spec.mesh_structures[n].label_ids for n in self.mesh_names}
        self.mesh_label_ids = sorted({int(i) for ids in structures.values() for i in ids})
        # all cases, not the fold's split (every fold of a model folder shares one plans.json), streamed: only the
        # patch-size ROI crops are kept; the boxes place the training patches (nnunet_topo/roi_loader.py)
        # templates of the model folder's plans.json (a run being continued), else of the given plans, else built
        stored = stored_templates(saved_configuration(self.output_folder_base, self.configuration_name),
                                  self.configuration_manager.configuration)
        # the boxes alone (templates stored) come from the preprocessed folder's cache (nnunet_topo/roi_cache.py)
        crops, self.mesh_boxes = roi_boxes_and_crops(self.preprocessed_dataset_folder, self.mesh_label_ids, patch,
                                                     self.__class__.__name__, self.configuration_name,
                                                     crop=stored is None, log=self.print_to_log_file)
        templates = training_templates(crops, structures, patch, self.patch_spacing(), stored,
                                       self.template_subdivisions, self.template_torus_sections,
                                       log=self.print_to_log_file)
        channels = [self.topology_spec.mesh_structures[n].label_ids for n in self.mesh_names]  # = label ids
        head = head_settings(self.head_kwargs, self.head_decoder_stages,
                             channels if self.segmentation_guided_placement else None)
        head["format"] = HEAD_FORMAT_VERSION
        for conf in (self.plans_manager.plans["configurations"][self.configuration_name],
                     self.configuration_manager.configuration):
            store_in_configuration(conf, templates, head)
        self.mesh_head_settings = head
        self.mesh_templates: List[Template] = templates

    def print_plans(self):
        # nnU-Net prints the whole configuration dict; the template vertex/face lists would flood the log.
        if self.local_rank == 0:
            conf = dict(self.configuration_manager.configuration)
            conf[TEMPLATES_KEY] = [f"{t.name}: genus {t.genus}, {t.num_vertices} vertices, {len(t.faces)} faces"
                                   for t in self.mesh_templates]
            plans = {k: v for k, v in self.plans_manager.plans.items() if k != "configurations"}
            self.print_to_log_file(f"\nThis is the configuration used by this training:\nConfiguration name: "
                                   f"{self.configuration_name}\n", conf, "\n", add_timestamp=False)
            self.print_to_log_file("These are the global plan.json settings:\n", plans, "\n", add_timestamp=False)

    # ------------------------------------------------------------------ loss terms
    regulariser_names: Tuple[str, ...] = ("laplacian", "edge")

    def patch_spacing(self) -> List[float]:
        """Voxel size (mm) of the preprocessed patches, in their array order: the physical frame of every mesh term."""
        return [float(x) for x in self.configuration_manager.spacing]

    def mesh_smoothing(self) -> float:
        """Dipole smoothing in mm: the class attribute, or :func:`default_smoothing_mm`."""
        if self.occupancy_smoothing_mm is not None:
            return float(self.occupancy_smoothing_mm)
        return default_smoothing_mm(self.patch_spacing(), self._mean_edge_mm)

    def mesh_term_names(self) -> Tuple[str, ...]:
        return ("occ", "laplacian", "edge")

    def mesh_term_weights(self) -> Dict[str, float]:
        return {"occ": self.occ_weight, "laplacian": self.laplacian_weight, "edge": self.edge_weight}

    def extra_logged_term_names(self):
        return super().extra_logged_term_names() + self.mesh_term_names() + tuple(
            f"volratio_{n}" for n in self.topology_spec.mesh_structures)

    def _occupancy_loss(self, spec, lambda_tp: float) -> TPMLoss:
        return TPMLoss(spec, self.mesh_names, lambda_tp=lambda_tp, method=self.occupancy_method,
                       num_uniform=self.occ_num_uniform, num_surface=self.occ_num_surface,
                       max_critical_points=self.max_critical_points, smoothing=self.mesh_smoothing(),
                       spacing=self.patch_spacing(), mesh_critical_points=self.mesh_critical_points,
                       ignore_label=self.label_manager.ignore_label)

    def _make_loss_modules(self) -> None:
        patch = [int(p) for p in self.configuration_manager.patch_size]
        self._edge_refs = template_edge_lengths(self.mesh_templates, patch, self.patch_spacing())
        self._mean_edge_mm = float(torch.stack([e.mean() for e in self._edge_refs]).mean())
        self._occ_loss = self._occupancy_loss(dataclasses.replace(self.patch_topology_spec, rules=()), 0.0)
        self.print_to_log_file(f"mesh losses (mm, spacing {self.patch_spacing()}): occupancy {self.occupancy_method}, "
                               f"smoothing {self.mesh_smoothing():.3f} mm, mean template edge {self._mean_edge_mm:.2f} "
                               f"mm, weights {self.mesh_term_weights()}; head: Adam lr {self.head_lr}, clip "
                               f"{self.head_grad_clip}; " + ("network frozen" if self.freeze_network else
                               f"mesh gradient into the network <= {self.mesh_backbone_grad_share} x L_seg's"))

    def regularisers(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor) -> Dict[str, Tensor]:
        shape = tuple(logits.shape[2:])
        meshes_mm = [normalized_to_mm(v, shape, self.patch_spacing()) for v in meshes]
        return mesh_regularisers(meshes_mm, faces, self._edge_refs, self._mean_edge_mm)

    def compute_mesh_terms(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor,
                           target: Tensor) -> Dict[str, Tensor]:
        """All mesh terms of one step: ``occ``, ``laplacian``, ``edge``."""
        return {"occ": self._occ_loss(meshes, faces, logits, target)["occ"], **self.regularisers(meshes, faces, logits)}

    def build_topology_terms(self):
        self._make_loss_modules()  # the mesh terms are computed by train_step, not by nnU-Net's loss
        return {}

    # ------------------------------------------------------------------ logging, the two phases
    def _mesh_log_values(self, split: str, values: Dict[str, Tensor], meshes, faces, target: Tensor) -> dict:
        out = {f"{split}_{k}": float(v.detach()) for k, v in values.items() if k in self.mesh_term_names()}
        with torch.no_grad():
            ratios = mesh_volume_ratios([m.detach().float() for m in meshes], faces, target,
                                        [self.topology_spec.mesh_structures[n].label_ids for n in self.mesh_names],
                                        self.patch_spacing())
        out.update({f"{split}_volratio_{n}": float(r) for n, r in zip(self.mesh_names, ratios)})
        for k in self.mesh_term_names():
            out.setdefault(f"{split}_{k}", float("nan"))
        return out

    def meshes_fit(self) -> bool:
        """The readiness criterion of the second phase: last epoch's mean mesh volume / reference volume of every
        structure within ``mesh_ready_volume_band`` (training batches)."""
        lo, hi = self.mesh_ready_volume_band
        vals = [self.logger.get_value(f"train_volratio_{n}", step=-1) for n in self.mesh_names]
        return all(np.isfinite(v) and lo <= v <= hi for v in vals)

    def topology_phase_ready(self) -> bool:
        """Second phase from ``topology_start_epoch`` at the latest, or from the epoch after the meshes first fit."""
        if self._ready_epoch is None and self.current_epoch > 0 and self.meshes_fit():
            self._ready_epoch = self.current_epoch
            self.print_to_log_file(f"the meshes fit (volume ratios within {self.mesh_ready_volume_band}) after epoch "
                                   f"{self.current_epoch - 1}")
        return self._ready_epoch is not None and self.current_epoch >= self._ready_epoch
