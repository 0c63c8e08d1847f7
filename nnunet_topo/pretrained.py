"""``nnUNetv2_train ... -pretrained_weights`` for the topology trainers (nnU-Net glue).

nnU-Net loads the network with ``load_pretrained_weights(network, file)`` and re-initialises its segmentation layers
(transfer learning). :class:`PretrainedWeights` (a mixin of ``nnUNetTrainerTopoBase``) also loads those layers when
their shapes match (``keep_pretrained_seg_layers``: a fine-tune on the same labels should start from the trained
decision, and the mesh head's placement reads it) and lets a trainer act before and after nnU-Net's load (the mesh
trainers refuse older mesh models and take the head from a mesh checkpoint). nnU-Net calls the function without the
trainer, so it is wrapped once per process in ``nnunetv2.run.run_training`` (:func:`_install_pretrained_weights_hook`):
nnU-Net's function runs unchanged, and for a network that belongs to no topology trainer nothing else happens.
"""
from __future__ import annotations

import weakref

import torch

__all__ = ["PretrainedWeights"]


class PretrainedWeights:
    """Trainer mixin: ``-pretrained_weights`` with the segmentation layers and the trainer's own steps."""

    #: under ``-pretrained_weights``, also load the segmentation layers nnU-Net re-initialises, if shapes match
    keep_pretrained_seg_layers: bool = True

    def initialize(self):
        super().initialize()
        _install_pretrained_weights_hook()
        from nnunet_topo.mesh_head.network import unwrap_network

        unwrap_network(self.network)._nnunet_topo_trainer = weakref.ref(self)

    def before_pretrained_weights(self, fname: str, checkpoint: dict) -> None:
        """Called before nnU-Net's ``load_pretrained_weights`` with the checkpoint (read once, on the CPU): a subclass
        refuses what nnU-Net would misreport."""

    def after_pretrained_weights(self, fname: str, checkpoint: dict) -> None:
        """Called after nnU-Net's ``load_pretrained_weights`` (``nnUNetv2_train ... -pretrained_weights``)."""
        from nnunet_topo.mesh_head.network import unwrap_network

        net = unwrap_network(self.network)
        saved = checkpoint["network_weights"]
        own = net.state_dict()
        seg = {k: v for k, v in saved.items() if ".seg_layers." in k and k in own and own[k].shape == v.shape}
        wanted = [k for k in own if ".seg_layers." in k]
        if self.keep_pretrained_seg_layers and wanted and len(seg) == len(wanted):
            net.load_state_dict(seg, strict=False)
            self.print_to_log_file(f"-pretrained_weights {fname}: nnU-Net's network loaded, segmentation layers "
                                   f"included ({len(seg)} keys; nnU-Net alone would re-initialise them)",
                                   also_print_to_console=True)
        else:
            self.print_to_log_file(f"-pretrained_weights {fname}: nnU-Net's network loaded; segmentation layers "
                                   "re-initialised (nnU-Net's transfer-learning behaviour: "
                                   f"{'switched on' if not self.keep_pretrained_seg_layers else 'shapes differ'})",
                                   also_print_to_console=True)


def _install_pretrained_weights_hook() -> None:
    """Make nnU-Net's ``-pretrained_weights`` call the trainer's :meth:`after_pretrained_weights` after nnU-Net's own
    ``load_pretrained_weights`` (which gets only the network and the file name, and is looked up in
    ``nnunetv2.run.run_training`` when ``nnUNetv2_train`` runs). The wrapper calls nnU-Net's function unchanged;
    for a network that does not belong to a topology trainer it does nothing else. Installed once per process."""
    import nnunetv2.run.run_training as run_training

    original = run_training.load_pretrained_weights
    if getattr(original, "_nnunet_topo", False):
        return

    def load_pretrained_weights(network, fname, verbose=False):
        from nnunet_topo.mesh_head.network import unwrap_network

        ref = getattr(unwrap_network(network), "_nnunet_topo_trainer", None)
        trainer = ref() if ref is not None else None
        checkpoint = torch.load(fname, map_location="cpu", weights_only=False) if trainer is not None else None
        if trainer is not None:
            trainer.before_pretrained_weights(fname, checkpoint)
        original(network, fname, verbose=verbose)
        if trainer is not None:
            trainer.after_pretrained_weights(fname, checkpoint)

    load_pretrained_weights._nnunet_topo = True
    run_training.load_pretrained_weights = load_pretrained_weights
