"""The mesh head as a passenger beside nnU-Net's network: the trainer mixin of the mesh trainers (DESIGN §6-7).

``self.network`` stays exactly nnU-Net's planned network; :class:`MeshHeadPassenger` adds, beside it, the hooks and
the head (``self.mesh_model``, ``self.mesh_head``), the head's optimiser (Adam, nnU-Net's poly decay), GradScaler and
checkpoint entry (``nnunet_topo/mesh_checkpoint.py``), the one changed ``train_step`` (``nnunet_topo/mesh_step.py``)
and the mesh terms on nnU-Net's validation batches. Put it before ``nnUNetTrainerTopoBase`` in the bases; the trainer
provides the head settings (``mesh_head_settings``, ``head_lr``, ``head_grad_clip``, ...) and ``mesh_losses``,
``_mesh_log_values``. nnU-Net glue (imports nnunetv2).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_topo.losses.combined import full_resolution
from nnunet_topo.mesh_checkpoint import add_head_entry, head_entry, load_pretrained_head, refuse_older_mesh_model
from nnunet_topo.mesh_head.network import mesh_network_from_configuration
from nnunet_topo.mesh_step import broadcast_from_rank0_, mesh_train_step

__all__ = ["MeshHeadPassenger"]


def _no_donated_buffers() -> None:
    """Turn off AOTAutograd's donated buffers (an inductor memory saving in the backward) for this process: the
    bounded mesh share's exact steps go back through the network's graph twice (L_seg's backward with
    ``retain_graph``, then the features' pull-back), which a compiled backward with donated buffers refuses. Only
    matters where nnU-Net compiles the network; set before its first call, when the graph is compiled."""
    import torch._functorch.config as functorch_config

    if getattr(functorch_config, "donated_buffer", False):
        functorch_config.donated_buffer = False


class MeshHeadPassenger:
    """Trainer mixin: the mesh head beside nnU-Net's network (module docstring)."""

    # ------------------------------------------------------------------ network (nnU-Net's), head (a passenger)
    def initialize(self):
        """nnU-Net's ``initialize`` (network, nnU-Net's optimiser, loss), then the head beside the network: hooks on
        the network's encoder and decoder stages, the head's optimiser, poly schedule and GradScaler.

        nnU-Net compiles its network where it decides to (``_do_i_compile``: CUDA, unless ``nnUNet_compile`` is off);
        the head stays eager. ``torch.compile`` is lazy: the hooks below are registered on the compiled network's
        own modules before its first call, so dynamo traces them into the graph (one graph with the capture on, one
        without; hooks registered after a first compiled call would be ignored). documentation/mesh_trainers.md."""
        if self.was_initialized:
            return super().initialize()
        if self.mesh_backbone_grad_share > 0:
            _no_donated_buffers()
        super().initialize()
        self.mesh_model = mesh_network_from_configuration(self.network, self.configuration_manager.configuration)
        self.mesh_model.mesh_head.to(self.device)
        self.mesh_head = self.mesh_model.mesh_head
        if self.is_ddp:  # every rank starts from rank 0's head, as DDP does for the network it wraps
            broadcast_from_rank0_(self.mesh_head)
        self.head_optimizer = torch.optim.Adam(self.mesh_head.parameters(), lr=self.head_lr)
        self.head_lr_scheduler = PolyLRScheduler(self.head_optimizer, self.head_lr, self.num_epochs)
        self.head_grad_scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.mesh_head.train()
        self.head_lr_scheduler.step(self.current_epoch)

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.mesh_head.eval()

    # ------------------------------------------------------------------ checkpoint: the head beside the network
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (``network_weights``: nnU-Net's network only) plus the head's entry."""
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing and os.path.isfile(filename):
            add_head_entry(filename, self.mesh_head, self.head_optimizer, self.head_grad_scaler,
                           self.mesh_head_settings, self._ready_epoch)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        where = str(filename_or_checkpoint)[:200]
        refuse_older_mesh_model(checkpoint, where)  # before nnU-Net's strict load, with a message that says why
        super().load_checkpoint(filename_or_checkpoint)
        entry = head_entry(checkpoint, where, self.mesh_head_settings, required=True)
        self.mesh_head.load_state_dict(entry["state_dict"])
        self.head_optimizer.load_state_dict(entry["optimizer_state"])
        if self.head_grad_scaler is not None and entry.get("grad_scaler_state") is not None:
            self.head_grad_scaler.load_state_dict(entry["grad_scaler_state"])
        self._ready_epoch = entry.get("ready_epoch")

    def before_pretrained_weights(self, fname: str, checkpoint: dict) -> None:
        super().before_pretrained_weights(fname, checkpoint)
        refuse_older_mesh_model(checkpoint, fname)

    def after_pretrained_weights(self, fname: str, checkpoint: dict) -> None:
        super().after_pretrained_weights(fname, checkpoint)  # nnU-Net's network, the segmentation layers too
        load_pretrained_head(fname, checkpoint, self.mesh_head, self.mesh_head_settings,
                             lambda msg: self.print_to_log_file(msg, also_print_to_console=True))

    # ------------------------------------------------------------------ one step
    def mesh_losses(self, meshes, faces, logits: Tensor, target: Tensor):
        """``(weighted data terms, weighted regularisers, {name: value})`` in float32 with autocast off."""
        with torch.autocast(logits.device.type, enabled=False):
            values = self.compute_mesh_terms([m.float() for m in meshes], faces, logits.detach().float(), target)
        weights = self.mesh_term_weights()
        zero = meshes[0].sum() * 0.0
        data = sum((weights[k] * v for k, v in values.items() if k not in self.regulariser_names and weights[k]), zero)
        reg = sum((weights[k] * v for k, v in values.items() if k in self.regulariser_names and weights[k]), zero)
        return data, reg, values

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step for the network, the head's own step beside it, the bounded mesh share (mesh_step.py)."""
        out, (values, meshes, faces, target) = mesh_train_step(self, batch)
        out.update(self._pop_term_values("train"))
        out.update(self._mesh_log_values("train", values, meshes, faces, target))
        return out

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (pseudo Dice, L_seg), plus the mesh terms on the same batch (no gradient)."""
        with self.mesh_model.capture() as captured:
            out = super().validation_step(batch)
        target = full_resolution(batch["target"]).to(self.device)
        with torch.no_grad():
            feats, bottleneck = self.mesh_model.head_inputs(captured)
            seg = full_resolution(captured["output"]).float()
            meshes = self.mesh_head(feats, bottleneck, seg)
            faces = [self.mesh_head.template_faces(s) for s in range(len(meshes))]
            _, _, values = self.mesh_losses(meshes, faces, seg, target)
        out.update(self._mesh_log_values("val", values, meshes, faces, target))
        return out
