"""Mesh trainers: nnU-Net + a GCN mesh head supervised by occupancy losses (TPM, MIE; DESIGN §6-8).

| trainer | loss |
|---|---|
| ``nnUNetTrainerMesh`` | ``L_seg + L_occ + w_lap L_lap + w_edge L_edge`` (the λ_TP = 0 baseline of TPM Table 1) |
| ``nnUNetTrainerTPM`` | ``+ λ_TP L_TPM``, λ_TP = 0.5, switched on after ``tpm_warmup_epochs`` (TPM §3.1) |
| ``nnUNetTrainerTPM_lambda1`` | λ_TP = 1.0 (the paper's best on MRI) |
| ``nnUNetTrainerMIE`` | ``L_seg + L_MIE + w_lap L_lap`` with ρ = 0.2 critical points |

TPM: C. Zhang et al., *Topology-Preserving Loss for Accurate and Anatomically Consistent Cardiac Mesh
Reconstruction*, arXiv:2503.07874 (Eq. 5-11). ``L_seg`` is nnU-Net's own deep-supervised Dice+CE, untouched.

Decisions (documentation/mesh_trainers.md has the long form):

* **Templates** (one per ``topology.mesh_structures`` entry, in that order) are built in ``__init__`` from the
  preprocessed segmentations of *all* cases (``load_case``; not the fold's split, because all folds of a model
  folder share one ``plans.json``, so the templates must not depend on the fold), each centre-padded to the patch
  size exactly as nnU-Net's data loader places a case smaller than the patch (pad before = ``need // 2``), mask
  = ``isin(seg, structure ids)``, shifted so that every mask's centroid lies on the mean centroid (the "mean
  aligned mask" of DESIGN §7), then :func:`~nnunet_topo.mesh_head.templates.template_from_masks`; when that fails
  (mean mask not star-shaped, or split by the majority vote) and most masks are genus 0, a moment-fitted
  ellipsoid is used instead (logged). They are
  stored as plain dicts in the plans (``configurations[<config>]["nnunet_topo_mesh_templates"]``, head settings
  in ``"nnunet_topo_mesh_head"``), so nnU-Net writes them into the model folder's ``plans.json`` and the static
  :meth:`nnUNetTrainerMesh.build_network_architecture` rebuilds the identical head at inference (it raises a
  clear error when they are missing). Templates already in the plans, or in the model folder's ``plans.json``
  (``--c``, ``--val``), are reused, never recomputed.
* **Whole structures in the patch**: every preprocessed case must fit in ``configuration_manager.patch_size``
  (checked in ``__init__``; otherwise a ``RuntimeError`` names the sizes and suggests a configuration whose
  patch covers the volume, e.g. 3d_lowres). ``mesh_structures`` must not be empty.
* **Meshes into the loss without copying train_step**: the network is a :class:`MeshCachingNetwork` (a
  :class:`~nnunet_topo.mesh_head.network.MeshAugmentedNetwork` with the same state dict). In *training* mode its
  ``forward`` runs the head too and keeps the meshes in ``last_meshes``; the return value is exactly the
  segmentation output. The loss terms (called by ``TopologyLossWrapper`` with the full-resolution logits and
  target) read the cached meshes from the network (``.module`` under DDP). During the trainer's validation
  epochs (``meshes_in_eval``) the head runs in eval mode too, so ``val_<term>`` are the terms on the validation
  batches; in nnU-Net's predictor (``perform_actual_validation``, ``nnUNetv2_predict``) it does not run.
* **No torch.compile** for this family (``_do_i_compile`` returns False): the head uses sparse matrix products
  and forward hooks and the wrapper mutates an attribute in ``forward``; Dynamo does not support sparse
  tensors, so compiling the wrapper would fail or fall back silently.
* **Occupancy for training**: the smoothed dipole form (``method="dipole"``) with ``smoothing`` = the mean
  template edge length in normalised units (the exact form has zero vertex gradients).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_topo.mesh_head.graph import edge_length_loss, edge_lengths, laplacian_smoothing_loss, mesh_edges
from nnunet_topo.mesh_head.network import MeshAugmentedNetwork
from nnunet_topo.mesh_head.templates import Template, template_from_masks
from nnunet_topo.rules import TopologySpecError
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase

#: plans key (in ``plans["configurations"][<configuration>]``) holding the templates as ``Template.to_dict()``
TEMPLATES_KEY = "nnunet_topo_mesh_templates"
#: plans key holding the head settings ``{"decoder_stages": ..., "head_kwargs": {...}}``
HEAD_KEY = "nnunet_topo_mesh_head"


# ---------------------------------------------------------------------------------------------- network
class MeshCachingNetwork(MeshAugmentedNetwork):
    """:class:`MeshAugmentedNetwork` whose training-mode ``forward`` also runs the head and caches the meshes.

    ``forward(x)`` returns exactly the wrapped network's output in every mode. In training mode with
    ``cache_meshes`` True it calls :meth:`forward_with_meshes` and keeps the meshes (list of ``(B, V_s, 3)``,
    normalised patch frame) in ``last_meshes``; in eval mode the head does not run and ``last_meshes`` is None,
    unless ``meshes_in_eval`` is set (the trainer's validation epochs). The state dict is that of
    :class:`MeshAugmentedNetwork` (no new parameters or buffers).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache_meshes: bool = True
        #: also run the head in eval mode (the trainer sets it during its validation epochs only, never for the
        #: predictor), so that the validation loss has mesh terms
        self.meshes_in_eval: bool = False
        self.last_meshes: Optional[List[Tensor]] = None

    def forward(self, x: Tensor):
        if (self.training or self.meshes_in_eval) and self.cache_meshes:
            seg, meshes = self.forward_with_meshes(x)
            self.last_meshes = meshes
            return seg
        self.last_meshes = None
        return self.network(x)

    def pop_meshes(self) -> Optional[List[Tensor]]:
        """The cached meshes of the last training forward (then forgotten), or None."""
        meshes, self.last_meshes = self.last_meshes, None
        return meshes


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod") and isinstance(network._orig_mod, nn.Module):
            network = network._orig_mod
        else:
            return network


def templates_from_configuration(configuration: dict) -> List[Template]:
    """Templates stored in a configuration dict of the plans; a clear error when there are none."""
    raw = configuration.get(TEMPLATES_KEY)
    if not raw:
        raise RuntimeError(
            f"the plans' configuration has no {TEMPLATES_KEY!r}: the mesh trainers store their templates there when "
            "they are instantiated for training, and nnU-Net copies them into the model folder's plans.json. Build "
            "this network from the plans.json of a model folder trained with a mesh trainer (nnUNetTrainerMesh, "
            "nnUNetTrainerTPM, nnUNetTrainerMIE), or instantiate the trainer once so it adds the templates.")
    return [Template.from_dict(d) for d in raw]


# ---------------------------------------------------------------------------------------------- loss terms
class MeshLossComputer:
    """Computes every mesh term of one training step once and hands them out by name.

    Not an ``nn.Module`` on purpose: it holds a callable returning the trainer's network, which must not become a
    submodule of the loss. ``compute(meshes, faces, logits, target)`` returns ``{term name: scalar}``; the values are
    cached for the logits tensor they were computed for, so the several terms of one loss call share one evaluation.
    """

    def __init__(self, get_network: Callable[[], nn.Module],
                 compute: Callable[[List[Tensor], List[Tensor], Tensor, Tensor], Dict[str, Tensor]]) -> None:
        self.get_network = get_network
        self.compute = compute
        self._for: Optional[Tensor] = None
        self._values: Dict[str, Tensor] = {}

    def value(self, name: str, logits: Tensor, target: Tensor) -> Optional[Tensor]:
        net = unwrap_network(self.get_network())
        meshes = net.pop_meshes() if hasattr(net, "pop_meshes") else None
        if meshes is not None:
            faces = [net.mesh_head.template_faces(s) for s in range(len(meshes))]
            with torch.autocast(logits.device.type, enabled=False):
                self._values = self.compute(meshes, faces, logits.float(), target)
            self._for = logits
        elif self._for is not logits:
            return None  # eval mode: the head did not run
        return self._values[name]

    def clear(self) -> None:
        self._for, self._values = None, {}


class MeshTerm(nn.Module):
    """One named mesh term as ``TopologyLossWrapper`` expects it: ``(logits, target) -> scalar``.

    Without cached meshes (the head did not run) it returns a zero connected to ``logits``.
    """

    def __init__(self, computer: MeshLossComputer, name: str) -> None:
        super().__init__()
        self.computer, self.name = computer, name

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        v = self.computer.value(self.name, logits, target)
        return logits.sum() * 0.0 if v is None else v

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# ---------------------------------------------------------------------------------------------- trainers
class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule, with each parameter group's lr scaled by its ``lr_factor`` (default 1)."""

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.initial_lr * (1 - current_step / self.max_steps) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_factor", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class nnUNetTrainerMesh(nnUNetTrainerTopoBase):
    """nnU-Net + mesh head; ``L_seg + L_occ + laplacian_weight L_lap + edge_weight L_edge`` (λ_TP = 0)."""

    #: icosphere subdivision of genus-0 templates (3: 642 vertices) and (major, minor) sections of tori
    template_subdivisions: int = 3
    template_torus_sections: Tuple[int, int] = (32, 16)
    #: MeshHead settings (stored in the plans with the templates, so inference rebuilds the same head)
    head_kwargs: Dict[str, int] = {"hidden_features": 64, "num_blocks": 2, "num_residual": 1, "alignment_hidden": 64}
    #: decoder stages whose features the head samples (None: all)
    head_decoder_stages: Optional[Tuple[int, ...]] = None
    #: place each template at the centroid and per-axis extent of the network's own soft segmentation of its
    #: structure before the learned alignment (MeshHead "segmentation-guided placement"; stored in the plans)
    segmentation_guided_placement: bool = True
    #: occupancy: "dipole" (trainable) with smoothing in normalised units; None = mean template edge length
    occupancy_method: str = "dipole"
    occupancy_smoothing: Optional[float] = None
    #: L_occ query points per mesh and batch item (TPM Eq. 10-11)
    occ_num_uniform: int = 1024
    occ_num_surface: int = 1024
    occ_weight: float = 1.0
    #: regularisers (normalised units; not tuned): uniform Laplacian energy, edge length vs the template's
    laplacian_weight: float = 0.1
    edge_weight: float = 0.1
    #: λ_TP; 0 = no L_TPM term (this class)
    lambda_tp: float = 0.0
    #: epochs of L_seg + L_occ before L_TPM is switched on (None: 10 % of num_epochs)
    tpm_warmup_epochs: Optional[int] = None
    max_critical_points: int = 2048
    #: learning rate of the mesh head relative to nnU-Net's (SGD, Nesterov momentum 0.99, poly schedule). At 1.0 the
    #: head diverged in the CPU study (documentation/results.md); in a 15-step diagnostic on the same data, 0.01
    #: brought the training occupancy BCE from 1.14 to 0.6-0.9 where 1.0 gave 1.1-2.0.
    head_lr_factor: float = 0.01
    #: spatial augmentation. A template is a shape prior *in the image frame* (RV to the left of the LV, base above
    #: apex), but nnU-Net rotates anisotropic patches by up to ±180° in-plane and mirrors every axis, so the
    #: augmented target is mostly nowhere near the template and mirroring swaps left and right chambers, which no
    #: rotation of a template can undo. The mesh trainers therefore rotate by at most this many degrees and do not
    #: mirror (in training or, consequently, at test time; as nnU-Net's nnUNetTrainerNoMirroring). Scaling,
    #: elastic and intensity augmentation are nnU-Net's.
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

    # ------------------------------------------------------------------ templates
    def _case_identifiers(self):
        """(identifiers of the preprocessed cases, nnU-Net's dataset class for the folder)."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        return dataset_class.get_identifiers(self.preprocessed_dataset_folder), dataset_class

    def _setup_templates(self) -> None:
        if self.preprocessed_dataset_folder is None or not os.path.isdir(self.preprocessed_dataset_folder):
            raise RuntimeError(f"{self.__class__.__name__}: no preprocessed data at "
                               f"{self.preprocessed_dataset_folder}; "
                               "run nnUNetv2_plan_and_preprocess for this configuration first.")
        identifiers, dataset_class = self._case_identifiers()
        dataset = dataset_class(self.preprocessed_dataset_folder, identifiers)
        patch = [int(p) for p in self.configuration_manager.patch_size]
        if len(patch) != 3:
            raise RuntimeError(f"{self.__class__.__name__} needs a 3D configuration (mesh structures are closed "
                               f"surfaces), but {self.configuration_name!r} has patch size {patch}.")
        segs: Dict[str, np.ndarray] = {}
        too_big = []
        for k in identifiers:
            _, seg, _, _ = dataset.load_case(k)
            seg = np.asarray(seg[0])
            segs[k] = seg
            if any(s > p for s, p in zip(seg.shape, patch)):
                too_big.append((k, list(seg.shape)))
        if too_big:
            raise RuntimeError(
                f"{self.__class__.__name__}: a mesh describes a whole structure, so every case must fit in the patch, "
                f"but the patch size of configuration {self.configuration_name!r} is {patch} and {len(too_big)} "
                f"preprocessed case(s) are larger, e.g. {too_big[:3]}. Train a configuration whose patch covers the "
                "preprocessed volume (e.g. 3d_lowres, or plans with a larger patch_size), or crop the images to the "
                "structures first.")
        stored = self._stored_templates()
        if stored is not None:
            templates = stored
            self.print_to_log_file(f"mesh templates reused from the plans: {[t.name for t in templates]}")
        else:
            # all cases, not the fold's training split: every fold of a model folder shares one plans.json, so the
            # templates must not depend on the fold (folds trained in parallel would otherwise disagree)
            keys = sorted(segs)
            templates = []
            for name in self.mesh_names:
                ids = np.asarray(self.topology_spec.mesh_structures[name].label_ids)
                masks = align_centroids([np.isin(center_pad_to(segs[k], patch), ids) for k in keys])
                try:
                    templates.append(template_from_masks(masks, subdivisions=self.template_subdivisions, name=name,
                                                         torus_sections=tuple(self.template_torus_sections)))
                except ValueError as e:
                    fallback = ellipsoid_template(masks, self.template_subdivisions, name)
                    if fallback is None:
                        raise RuntimeError(f"{self.__class__.__name__}: cannot build the template of mesh structure "
                                           f"{name!r} from {len(keys)} training case(s): {e}") from e
                    self.print_to_log_file(f"template {name!r}: {e} -> using the moment-fitted ellipsoid instead")
                    templates.append(fallback)
            self.print_to_log_file(
                "mesh templates built from the training labels: "
                + ", ".join(f"{t.name} (genus {t.genus}, {t.num_vertices} vertices)" for t in templates))
        if [t.name for t in templates] != list(self.mesh_names):
            raise RuntimeError(f"the templates in the plans are for {[t.name for t in templates]} but the topology "
                               "spec's "
                               f"mesh_structures are {list(self.mesh_names)}; remove {TEMPLATES_KEY!r} from the plans "
                               "(or train into a new output folder) to rebuild them.")
        head = {"decoder_stages": None if self.head_decoder_stages is None else list(self.head_decoder_stages),
                "head_kwargs": dict(self.head_kwargs)}
        if self.segmentation_guided_placement:  # label ids = output channels (plain integer labels, checked)
            head["structure_channels"] = [sorted(int(i) for i in self.topology_spec.mesh_structures[n].label_ids)
                                          for n in self.mesh_names]
        for conf in (self.plans_manager.plans["configurations"][self.configuration_name],
                     self.configuration_manager.configuration):
            conf[TEMPLATES_KEY] = [t.to_dict() for t in templates]
            conf[HEAD_KEY] = head
        self.mesh_templates: List[Template] = templates

    def _stored_templates(self) -> Optional[List[Template]]:
        """Templates of the model folder's plans.json (a run being continued), else of the given plans, else None."""
        sources = []
        if self.output_folder_base is not None and isfile(join(self.output_folder_base, "plans.json")):
            try:
                sources.append(load_json(join(self.output_folder_base, "plans.json"))["configurations"]
                               .get(self.configuration_name, {}))
            except (OSError, ValueError, KeyError):
                pass
        sources.append(self.configuration_manager.configuration)
        for conf in sources:
            if conf.get(TEMPLATES_KEY):
                return [Template.from_dict(d) for d in conf[TEMPLATES_KEY]]
        return None

    def print_plans(self):
        # nnU-Net prints the whole configuration dict; the template vertex/face lists would flood the log.
        if self.local_rank == 0:
            conf = {k: v for k, v in self.configuration_manager.configuration.items() if k != TEMPLATES_KEY}
            conf[TEMPLATES_KEY] = [f"{t.name}: genus {t.genus}, {t.num_vertices} vertices, {len(t.faces)} faces"
                                   for t in self.mesh_templates]
            plans = {k: v for k, v in self.plans_manager.plans.items() if k != "configurations"}
            self.print_to_log_file(f"\nThis is the configuration used by this training:\nConfiguration name: "
                                   f"{self.configuration_name}\n", conf, "\n", add_timestamp=False)
            self.print_to_log_file("These are the global plan.json settings:\n", plans, "\n", add_timestamp=False)

    # ------------------------------------------------------------------ augmentation
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's settings with the rotation limited to ``mesh_max_rotation_degrees`` and (by default) no
        mirroring; the initial (pre-rotation) patch size is recomputed by nnU-Net's ``get_patch_size``."""
        from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

        _, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        r = float(self.mesh_max_rotation_degrees) / 180.0 * np.pi
        rotation = (-r, r)
        patch_size = self.configuration_manager.patch_size
        initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        if not self.mesh_mirroring:
            mirror_axes = None
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file(f"mesh trainer augmentation: rotation ±{self.mesh_max_rotation_degrees}°, mirror axes "
                               f"{mirror_axes} (the templates are shape priors in the image frame)")
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    # ------------------------------------------------------------------ network
    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule, with the mesh head in its own group at ``head_lr_factor`` x the lr."""
        net = unwrap_network(self.network)
        head_ids = {id(p) for p in net.mesh_head.parameters()}
        params = list(self.network.parameters())
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr_factor": 1.0},
                  {"params": [p for p in params if id(p) in head_ids], "lr_factor": float(self.head_lr_factor)}]
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, GroupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned network wrapped in a :class:`MeshCachingNetwork` with the templates of the plans."""
        templates = templates_from_configuration(configuration_manager.configuration)
        head = configuration_manager.configuration.get(HEAD_KEY) or {}
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        return MeshCachingNetwork(network, templates, decoder_stages=head.get("decoder_stages"),
                                  structure_channels=head.get("structure_channels"),
                                  **(head.get("head_kwargs") or {}))

    def _do_i_compile(self) -> bool:
        # The mesh head uses sparse matmuls and forward hooks, and the wrapper caches meshes in forward: not
        # supported by torch.compile (Dynamo has no sparse tensors). Stay eager.
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            self.print_to_log_file("INFO: torch.compile disabled for the mesh trainers (sparse GCN head).")
        return False

    # ------------------------------------------------------------------ losses
    def mesh_smoothing(self) -> float:
        """Dipole smoothing in normalised units: the class attribute, or the mean template edge length."""
        if self.occupancy_smoothing is not None:
            return float(self.occupancy_smoothing)
        lengths = [edge_lengths(torch.from_numpy(t.vertices), mesh_edges(torch.from_numpy(t.faces))).mean()
                   for t in self.mesh_templates]
        return float(torch.stack(lengths).mean())

    def warmup_epochs(self) -> int:
        return int(round(0.1 * self.num_epochs)) if self.tpm_warmup_epochs is None else int(self.tpm_warmup_epochs)

    def tpm_active(self) -> bool:
        return self.lambda_tp > 0 and self.current_epoch >= self.warmup_epochs()

    def topology_term_names(self):
        names = ("occ",)
        if self.lambda_tp > 0:
            names += ("tpm",)
        return names + ("laplacian", "edge")

    def _term_weights(self) -> Dict[str, float]:
        return {"occ": self.occ_weight, "tpm": self.lambda_tp, "laplacian": self.laplacian_weight,
                "edge": self.edge_weight}

    def _make_loss_modules(self):
        from nnunet_topo.losses.tpm import TPMLoss

        smoothing = self.mesh_smoothing()
        kw = dict(method=self.occupancy_method, num_uniform=self.occ_num_uniform, num_surface=self.occ_num_surface,
                  max_critical_points=self.max_critical_points, smoothing=smoothing)
        # occupancy only (no rules -> no critical points), for L_occ alone and the TPM warm-up
        spec_no_rules = _replace(self.topology_spec, rules=())
        self._occ_loss = TPMLoss(spec_no_rules, self.mesh_names, lambda_tp=0.0, **kw)
        self._tpm_loss = TPMLoss(self.topology_spec, self.mesh_names, lambda_tp=max(self.lambda_tp, 0.0), **kw) \
            if self.lambda_tp > 0 else None
        self._template_edge_lengths = [
            edge_lengths(torch.from_numpy(t.vertices), mesh_edges(torch.from_numpy(t.faces)))
            for t in self.mesh_templates]
        self.print_to_log_file(f"mesh losses: occupancy {self.occupancy_method}, smoothing {smoothing:.4f} "
                               f"(normalised units), weights {self._term_weights()}, TPM warm-up "
                               f"{self.warmup_epochs() if self.lambda_tp > 0 else '-'} epochs")

    def compute_mesh_terms(self, meshes: List[Tensor], faces: List[Tensor], logits: Tensor,
                           target: Tensor) -> Dict[str, Tensor]:
        """All mesh terms of one step: ``occ``, ``tpm`` (if λ_TP > 0 and warm-up over), ``laplacian``, ``edge``."""
        out = {}
        if self._tpm_loss is not None and self.tpm_active():
            r = self._tpm_loss(meshes, faces, logits, target)
            out["occ"], out["tpm"] = r["occ"], r["tpm"]
        else:
            out["occ"] = self._occ_loss(meshes, faces, logits, target)["occ"]
            if self.lambda_tp > 0:
                out["tpm"] = sum(v.sum() for v in meshes) * 0.0  # weight set to 0 during the warm-up anyway
        out["laplacian"] = torch.stack([laplacian_smoothing_loss(v, f) for v, f in zip(meshes, faces)]).mean()
        out["edge"] = torch.stack([edge_length_loss(v, f, ref.to(v.device)) for v, f, ref
                                   in zip(meshes, faces, self._template_edge_lengths)]).mean()
        return out

    def build_topology_terms(self):
        self._make_loss_modules()
        self._mesh_computer = MeshLossComputer(lambda: self.network, self.compute_mesh_terms)
        weights = self._term_weights()
        return {name: (MeshTerm(self._mesh_computer, name), weights[name]) for name in self.topology_term_names()}

    # ------------------------------------------------------------------ warm-up and logging
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.lambda_tp > 0 and hasattr(self.loss, "weights"):
            self.loss.weights["tpm"] = self.lambda_tp if self.tpm_active() else 0.0
            if self.current_epoch == self.warmup_epochs():
                self.print_to_log_file(f"L_TPM switched on (λ_TP = {self.lambda_tp}) at epoch {self.current_epoch}")

    def _set_meshes_in_eval(self, on: bool) -> None:
        net = unwrap_network(self.network)
        if hasattr(net, "meshes_in_eval"):  # attribute test, not isinstance: nnU-Net may load this file twice
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
        if self.lambda_tp > 0 and not self.tpm_active():
            values[f"{split}_tpm"] = float("nan")  # not computed during the warm-up
        return values


class nnUNetTrainerTPM(nnUNetTrainerMesh):
    """``L_seg + L_occ + λ_TP L_TPM`` + regularisers, λ_TP = 0.5 (TPM, best on CT), TPM after the warm-up."""

    lambda_tp: float = 0.5


class nnUNetTrainerTPM_lambda1(nnUNetTrainerTPM):
    """λ_TP = 1.0 (TPM's best on MRI)."""

    lambda_tp: float = 1.0


class nnUNetTrainerMIE(nnUNetTrainerMesh):
    """``L_seg + L_MIE + mie_laplacian_weight L_lap``: occupancy BCE on ρ = 0.2 slice-wise critical points + 0.8
    random points (MIE), with uniform-Laplacian smoothness."""

    mie_rho: float = 0.2
    mie_num_points: int = 2048
    mie_weight: float = 1.0
    mie_laplacian_weight: float = 0.1

    def topology_term_names(self):
        return ("mie", "laplacian")

    def _term_weights(self) -> Dict[str, float]:
        return {"mie": self.mie_weight, "laplacian": self.mie_laplacian_weight}

    def _make_loss_modules(self):
        from nnunet_topo.losses.mie import MIELoss

        smoothing = self.mesh_smoothing()
        self._mie_loss = MIELoss(self.topology_spec, self.mesh_names, method=self.occupancy_method, rho=self.mie_rho,
                                 num_points=self.mie_num_points, lambda_lap=0.0, smoothing=smoothing)
        self.print_to_log_file(f"MIE loss: occupancy {self.occupancy_method}, smoothing {smoothing:.4f}, "
                               f"rho {self.mie_rho}, weights {self._term_weights()}")

    def compute_mesh_terms(self, meshes, faces, logits, target):
        r = self._mie_loss(meshes, faces, logits, target)
        return {"mie": r["mie"], "laplacian": r["laplacian"]}


# ---------------------------------------------------------------------------------------------- helpers
def center_pad_to(seg: np.ndarray, patch: Sequence[int], fill: int = 0) -> np.ndarray:
    """Pad ``seg`` (Z, Y, X) to ``patch`` as nnU-Net's data loader places a case smaller than the patch
    (``need // 2`` before, the rest after); a larger axis is centre-cropped."""
    out = seg
    pads = []
    for s, p in zip(seg.shape, patch):
        need = max(p - s, 0)
        pads.append((need // 2, need - need // 2))
    out = np.pad(out, pads, constant_values=fill)
    sl = tuple(slice((s - p) // 2, (s - p) // 2 + p) if s > p else slice(None) for s, p in zip(out.shape, patch))
    return out[sl]


def align_centroids(masks: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Shift each (Z, Y, X) mask by whole voxels so its centroid lands on the mean centroid (zero fill): the
    "mean aligned mask" of DESIGN §7, so that position jitter between cases does not blur the template."""
    masks = [np.asarray(m, dtype=bool) for m in masks]
    cents = [np.argwhere(m).mean(0) if m.any() else None for m in masks]
    valid = [c for c in cents if c is not None]
    if not valid:
        return masks
    target = np.mean(valid, axis=0)
    out = []
    for m, c in zip(masks, cents):
        if c is None:
            out.append(m)
            continue
        shift = np.round(target - c).astype(int)
        shifted = np.zeros_like(m)
        src = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(shift, m.shape))
        dst = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(shift, m.shape))
        shifted[dst] = m[src]
        out.append(shifted)
    return out


def ellipsoid_template(masks: Sequence[np.ndarray], subdivisions: int, name: str) -> Optional[Template]:
    """Fallback genus-0 template: an icosphere scaled to the moments of the soft mean mask (axis-aligned ellipsoid,
    semi-axis = sqrt(5) x the weighted standard deviation, as for a uniformly filled ellipsoid, clipped to the
    patch), centred at its weighted centroid. None unless most masks are genus 0 (Betti (1, 0, 0))."""
    from nnunet_topo.meshes import index_to_normalized
    from nnunet_topo.metrics.topology import betti_numbers_3d
    from nnunet_topo.mesh_head.templates import _orient_outward, sphere_template

    masks = [np.asarray(m, dtype=bool) for m in masks if np.any(m)]
    if not masks or sum(tuple(betti_numbers_3d(m)) == (1, 0, 0) for m in masks) * 2 <= len(masks):
        return None
    mean = np.mean(np.stack(masks).astype(np.float64), axis=0)
    idx = np.argwhere(mean > 0).astype(np.float64)
    w = mean[mean > 0]
    c = (idx * w[:, None]).sum(0) / w.sum()
    sd = np.maximum(np.sqrt((((idx - c) ** 2) * w[:, None]).sum(0) / w.sum()), 0.5)
    shape = np.asarray(mean.shape, dtype=np.float64)
    semi = np.minimum(np.sqrt(5.0) * sd, np.minimum(c, shape - 1 - c).clip(min=0.5))
    unit = sphere_template(subdivisions, radius=1.0, name=name)
    v_zyx = c + unit.vertices[:, ::-1].astype(np.float64) * semi  # icosphere (x, y, z) -> (z, y, x) offsets
    v = index_to_normalized(v_zyx, mean.shape)
    return Template(v, _orient_outward(np.asarray(v, dtype=np.float64), unit.faces), name=name, genus=0)


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


class _CPUStudyMixin:
    """Short runs for the CPU study of documentation/results.md (examples/study_tpm_vs_mesh.sh): 15 epochs x 20
    iterations, 512 occupancy query points per mesh, TPM switched on after 5 epochs (100 iterations, by which the
    segmentation that places the templates is usable)."""

    def _study_settings(self):
        self.num_epochs = 15
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 2
        self.occ_num_uniform = 256
        self.occ_num_surface = 256
        self.max_critical_points = 512
        self.tpm_warmup_epochs = 5


class nnUNetTrainerMesh_cpuStudy(_CPUStudyMixin, nnUNetTrainerMesh):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._study_settings()


class nnUNetTrainerTPM_cpuStudy(_CPUStudyMixin, nnUNetTrainerTPM):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._study_settings()
