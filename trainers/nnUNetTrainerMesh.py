"""nnUNetTrainerMesh: nnU-Net + a GCN mesh head supervised by occupancy (the λ_TP = 0 baseline of TPM Table 1).

``L = L_seg + occ_weight L_occ + laplacian_weight L_lap + edge_weight L_edge`` (TPM, arXiv:2503.07874, Eq. 5,
10-11), every mesh term in mm; ``L_seg`` is nnU-Net's own loss, untouched. nnU-Net wiring only: templates come
from ``mesh_head/label_templates.py``, the network from ``mesh_head/network.py``, the terms from
``nnunet_topo/losses/``; the decisions are explained in documentation/mesh_trainers.md.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_topo.losses.mesh_targets import normalized_to_mm
from nnunet_topo.losses.mesh_terms import (MeshLossComputer, MeshTerm, default_smoothing_mm, mesh_regularisers,
                                           template_edge_lengths)
from nnunet_topo.losses.tpm import TPMLoss
from nnunet_topo.lr_schedule import GroupPolyLRScheduler
from nnunet_topo.mesh_head.label_templates import roi_crops, training_templates
from nnunet_topo.mesh_head.network import (TEMPLATES_KEY, head_settings, mesh_network_from_configuration,
                                           store_in_configuration, stored_templates, unwrap_network)
from nnunet_topo.mesh_head.templates import Template
from nnunet_topo.plans import preprocessed_cases, saved_configuration
from nnunet_topo.roi_loader import roi_data_loaders
from nnunet_topo.rules import TopologySpecError
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class nnUNetTrainerMesh(nnUNetTrainerTopoBase):
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
    #: TPM critical points: cap per mesh, random candidates per rule tested against the meshes (None: label map only)
    max_critical_points: int = 2048
    mesh_candidates: Optional[int] = 1024
    laplacian_weight: float = 0.1
    edge_weight: float = 0.1
    #: λ_TP of TPM Table 1: 0 here (no L_TPM term); nnUNetTrainerTPM sets it
    lambda_tp: float = 0.0
    #: lr of the mesh head relative to nnU-Net's (at 1.0 the head diverged in the CPU study, results.md)
    head_lr_factor: float = 0.01
    #: rotation limit and mirroring: a template is a shape prior in the image frame (mesh_trainers.md)
    mesh_max_rotation_degrees: float = 15.0
    mesh_mirroring: bool = False

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
        self._mesh_computer: Optional[MeshLossComputer] = None
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
        crops, self.mesh_boxes = roi_crops(((k, seg[0]) for k, _, seg in preprocessed_cases(
            self.preprocessed_dataset_folder)), self.mesh_label_ids, patch, self.__class__.__name__,
            self.configuration_name, crop=stored is None)
        templates = training_templates(crops, structures, patch, self.patch_spacing(), stored,
                                       self.template_subdivisions, self.template_torus_sections,
                                       log=self.print_to_log_file)
        channels = [self.topology_spec.mesh_structures[n].label_ids for n in self.mesh_names]  # = label ids
        head = head_settings(self.head_kwargs, self.head_decoder_stages,
                             channels if self.segmentation_guided_placement else None)
        for conf in (self.plans_manager.plans["configurations"][self.configuration_name],
                     self.configuration_manager.configuration):
            store_in_configuration(conf, templates, head)
        self.mesh_templates: List[Template] = templates

    def get_dataloaders(self):
        """nnU-Net's loaders, with training and validation patches placed on the mesh structures (the heart ROI)."""
        with roi_data_loaders(self.mesh_boxes, self.mesh_label_ids):
            return super().get_dataloaders()

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

    # ------------------------------------------------------------------ augmentation, network, optimiser
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's settings with the rotation limited to ``mesh_max_rotation_degrees`` and (by default) no
        mirroring; the initial (pre-rotation) patch size is recomputed by nnU-Net's ``get_patch_size``."""
        _, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        r = float(self.mesh_max_rotation_degrees) / 180.0 * np.pi
        patch_size = self.configuration_manager.patch_size
        initial_patch_size = get_patch_size(patch_size, (-r, r), (-r, r), (-r, r), (0.85, 1.25))
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        mirror_axes = mirror_axes if self.mesh_mirroring else None
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file(f"mesh trainer augmentation: rotation ±{self.mesh_max_rotation_degrees}°, mirror axes "
                               f"{mirror_axes} (the templates are shape priors in the image frame)")
        return (-r, r), dummy_2d, initial_patch_size, mirror_axes

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule, with the mesh head in its own group at ``head_lr_factor`` x the lr."""
        head_ids = {id(p) for p in unwrap_network(self.network).mesh_head.parameters()}
        params = list(self.network.parameters())
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr_factor": 1.0},
                  {"params": [p for p in params if id(p) in head_ids], "lr_factor": float(self.head_lr_factor)}]
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, GroupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned network wrapped in a ``MeshCachingNetwork`` with the templates of the plans."""
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        return mesh_network_from_configuration(network, configuration_manager.configuration)

    def _do_i_compile(self) -> bool:
        # sparse matmuls, forward hooks and a mesh cache in forward: not for torch.compile (no sparse in Dynamo)
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            self.print_to_log_file("INFO: torch.compile disabled for the mesh trainers (sparse GCN head).")
        return False

    # ------------------------------------------------------------------ loss assembly
    def patch_spacing(self) -> List[float]:
        """Voxel size (mm) of the preprocessed patches, in their array order: the physical frame of every mesh term."""
        return [float(x) for x in self.configuration_manager.spacing]

    def mesh_smoothing(self) -> float:
        """Dipole smoothing in mm: the class attribute, or :func:`default_smoothing_mm`."""
        if self.occupancy_smoothing_mm is not None:
            return float(self.occupancy_smoothing_mm)
        return default_smoothing_mm(self.patch_spacing(), self._mean_edge_mm)

    def topology_term_names(self):
        return ("occ", "laplacian", "edge")

    def _term_weights(self) -> Dict[str, float]:
        return {"occ": self.occ_weight, "laplacian": self.laplacian_weight, "edge": self.edge_weight}

    def _occupancy_loss(self, spec, lambda_tp: float) -> TPMLoss:
        return TPMLoss(spec, self.mesh_names, lambda_tp=lambda_tp, method=self.occupancy_method,
                       num_uniform=self.occ_num_uniform, num_surface=self.occ_num_surface,
                       max_critical_points=self.max_critical_points, smoothing=self.mesh_smoothing(),
                       spacing=self.patch_spacing(), mesh_candidates=self.mesh_candidates,
                       ignore_label=self.label_manager.ignore_label)

    def _make_loss_modules(self) -> None:
        patch = [int(p) for p in self.configuration_manager.patch_size]
        self._edge_refs = template_edge_lengths(self.mesh_templates, patch, self.patch_spacing())
        self._mean_edge_mm = float(torch.stack([e.mean() for e in self._edge_refs]).mean())
        self._occ_loss = self._occupancy_loss(dataclasses.replace(self.patch_topology_spec, rules=()), 0.0)
        self.print_to_log_file(f"mesh losses (mm, spacing {self.patch_spacing()}): occupancy {self.occupancy_method}, "
                               f"smoothing {self.mesh_smoothing():.3f} mm, mean template edge {self._mean_edge_mm:.2f} "
                               f"mm, weights {self._term_weights()}")

    def regularisers(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor) -> Dict[str, Tensor]:
        shape = tuple(logits.shape[2:])
        meshes_mm = [normalized_to_mm(v, shape, self.patch_spacing()) for v in meshes]
        return mesh_regularisers(meshes_mm, faces, self._edge_refs, self._mean_edge_mm)

    def compute_mesh_terms(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor,
                           target: Tensor) -> Dict[str, Tensor]:
        """All mesh terms of one step: ``occ``, ``laplacian``, ``edge``."""
        return {"occ": self._occ_loss(meshes, faces, logits, target)["occ"], **self.regularisers(meshes, faces, logits)}

    def build_topology_terms(self):
        self._make_loss_modules()
        self._mesh_computer = MeshLossComputer(lambda: self.network, self.compute_mesh_terms)
        weights = self._term_weights()
        return {name: (MeshTerm(self._mesh_computer, name), weights[name]) for name in self.topology_term_names()}

    # ------------------------------------------------------------------ validation terms and logging
    def _set_meshes_in_eval(self, on: bool) -> None:
        net = unwrap_network(self.network)
        if hasattr(net, "meshes_in_eval"):
            net.meshes_in_eval = on

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._set_meshes_in_eval(True)  # val_<term>: the mesh terms on the validation batches (no gradient)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        self._set_meshes_in_eval(False)  # never in nnU-Net's predictor (perform_actual_validation, predict)
        super().on_validation_epoch_end(val_outputs)

    def _pop_term_values(self, split: str) -> Dict[str, float]:
        values = super()._pop_term_values(split)
        if self._mesh_computer is not None:
            self._mesh_computer.clear()
        return values
