"""``MeshAugmentedNetwork``: an nnU-Net network plus a :class:`MeshHead` riding along as a passenger (DESIGN §7).

How the mesh trainers use it: ``self.network`` stays exactly nnU-Net's planned network (same state-dict keys, so
``-pretrained_weights``, ``nnUNetv2_predict``, nnU-Net's clip and DDP work on it unchanged); the trainer holds a
``MeshAugmentedNetwork`` around that same network object only to own the hooks and the head, runs nnU-Net's
``self.network(x)`` inside :meth:`MeshAugmentedNetwork.capture` and feeds the captured features to the head, which
has its own optimiser step, clip and checkpoint entry (:data:`HEAD_STATE_KEY`). Mesh inference
(``nnunet_topo.mesh_prediction``) rebuilds the composition from the plain network and that checkpoint entry.

* ``forward(x)`` is the wrapped network's forward, unchanged: segmentation logits (a list, highest
  resolution first, under deep supervision). nnU-Net's sliding-window predictor, mirroring and
  ``DeepSupervisionWrapper`` work as with the bare network.
* ``forward_with_meshes(x)`` runs the wrapped network once and captures, with forward hooks, the
  encoder's skips (the bottleneck is the last one) and the outputs of the chosen decoder stages;
  then it runs the head on them. No nnU-Net code is copied, so any network with
  ``.encoder`` (returning the list of skips) and ``.decoder.stages`` works (``PlainConvUNet``,
  ``ResidualEncoderUNet`` of dynamic_network_architectures).
* ``.encoder`` and ``.decoder`` are properties returning the wrapped network's modules, so
  nnU-Net's ``set_deep_supervision_enabled`` (``network.decoder.deep_supervision = ...``) works.
* ``state_dict`` = the wrapped network's parameters under ``network.`` plus the head's under
  ``mesh_head.``, including the templates (buffers + extra state), so ``load_state_dict(strict=True)``
  restores the identical model and ``MeshHead.templates_from_state_dict(sd, "mesh_head.")`` rebuilds
  the templates from a checkpoint alone.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch import nn

from nnunet_topo.mesh_head.head import MeshHead
from nnunet_topo.mesh_head.templates import Template

__all__ = ["HEAD_KEY", "TEMPLATES_KEY", "HEAD_FORMAT_VERSION", "HEAD_STATE_KEY", "MeshAugmentedNetwork", "decoder_stage_channels",
           "head_settings", "mesh_network_from_configuration", "store_in_configuration", "stored_templates", "templates_from_configuration", "unwrap_network"]

#: key (in a plans configuration, ``plans["configurations"][<configuration>]``) holding the templates as
#: ``Template.to_dict()`` (the mesh trainers write it; nnU-Net copies it into the model folder's plans.json)
TEMPLATES_KEY = "nnunet_topo_mesh_templates"
#: key holding the head settings ``{"decoder_stages": ..., "structure_channels": ..., "head_kwargs": {...}}``
HEAD_KEY = "nnunet_topo_mesh_head"
#: key of a mesh trainer's checkpoint (beside nnU-Net's ``network_weights``, which hold nnU-Net's network only) with
#: ``{"format": HEAD_FORMAT_VERSION, "head_settings": ..., "state_dict": ..., "optimizer_state": ...,
#: "grad_scaler_state": ...}``
HEAD_STATE_KEY = "nnunet_topo_mesh_head"
#: 2: the head is a passenger beside nnU-Net's network (own checkpoint entry), placed from the hard arg-max mask.
#: 1 (nnunet-topo before 2026-12): network + head in one wrapper (``network.``/``mesh_head.`` keys in
#: ``network_weights``), placed from soft-segmentation moments; such models are refused, never given other meshes.
HEAD_FORMAT_VERSION = 2


def decoder_stage_channels(network: nn.Module) -> tuple[list[int], int]:
    """``(channels of decoder.stages[i] outputs, bottleneck channels)`` of an nnU-Net network.

    Uses ``network.encoder.output_channels`` (``PlainConvEncoder``/``ResidualEncoder``): decoder
    stage ``i`` (0 = lowest resolution) outputs ``output_channels[-(i + 2)]`` channels.
    """
    enc = getattr(network, "encoder", None)
    dec = getattr(network, "decoder", None)
    if enc is None or dec is None or not hasattr(dec, "stages") or not hasattr(enc, "output_channels"):
        raise TypeError(
            f"{type(network).__name__} has no .encoder.output_channels / .decoder.stages; MeshAugmentedNetwork "
            "supports nnU-Net's U-Nets from dynamic_network_architectures (PlainConvUNet, ResidualEncoderUNet)."
        )
    oc = [int(c) for c in enc.output_channels]
    n = len(dec.stages)
    return [oc[-(i + 2)] for i in range(n)], oc[-1]


class MeshAugmentedNetwork(nn.Module):
    """A segmentation network with a mesh head.

    Args:
        network: the planned nnU-Net network (e.g. from ``get_network_from_plans``), already
            initialised (its ``initialize`` is not re-run here).
        templates: one :class:`Template` per mesh structure.
        decoder_stages: indices into ``network.decoder.stages`` (0 = lowest resolution, negative
            allowed) whose outputs the head samples; default: all stages.
        **head_kwargs: passed to :class:`MeshHead` (``hidden_features``, ``num_blocks``, ...).
    """

    def __init__(
        self,
        network: nn.Module,
        templates: Sequence[Template],
        decoder_stages: Sequence[int] | None = None,
        **head_kwargs: Any,
    ) -> None:
        super().__init__()
        stage_channels, bottleneck_channels = decoder_stage_channels(network)
        n = len(stage_channels)
        idx = list(range(n)) if decoder_stages is None else [int(i) for i in decoder_stages]
        if not idx or any(not -n <= i < n for i in idx):
            raise ValueError(f"decoder_stages must be non-empty indices into {n} decoder stages, got {decoder_stages}.")
        self.decoder_stage_indices = [i % n for i in idx]
        self.network = network
        self.mesh_head = MeshHead(
            templates, [stage_channels[i] for i in self.decoder_stage_indices], bottleneck_channels, **head_kwargs
        )
        self._captured: dict[str, Any] | None = None
        # Hooks only record while forward_with_meshes runs (self._captured is not None).
        network.encoder.register_forward_hook(self._encoder_hook)
        network.register_forward_hook(self._output_hook)
        for i in sorted(set(self.decoder_stage_indices)):
            network.decoder.stages[i].register_forward_hook(self._make_stage_hook(i))

    # nnU-Net reaches these (set_deep_supervision_enabled, key_to_encoder-style code)
    @property
    def encoder(self) -> nn.Module:
        return self.network.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.network.decoder

    def _encoder_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._captured is not None:
            skips = output if isinstance(output, (list, tuple)) else [output]
            self._captured["bottleneck"] = skips[-1]

    def _output_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._captured is not None:
            self._captured["output"] = output

    def _make_stage_hook(self, i: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._captured is not None:
                self._captured[i] = output

        return hook

    def forward(self, x: torch.Tensor):
        """Exactly the wrapped network's output (segmentation logits; a list under deep supervision)."""
        return self.network(x)

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict]:
        """Within the block, every forward of the wrapped network (called directly, or through DDP) records the
        bottleneck and the chosen decoder stages' outputs into the yielded dict (read it with
        :meth:`head_inputs`). The mesh trainers run nnU-Net's own ``self.network(x)`` inside it: the head rides
        along as a passenger and ``self.network`` stays exactly nnU-Net's network."""
        self._captured = {}
        try:
            yield self._captured
        finally:
            self._captured = None

    def head_inputs(self, captured: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(decoder feature maps in the head's order, bottleneck)`` from a :meth:`capture` dict."""
        missing = [i for i in self.decoder_stage_indices if i not in captured]
        if "bottleneck" not in captured or missing:
            raise RuntimeError(
                "MeshAugmentedNetwork: the forward hooks did not capture the bottleneck/decoder stages "
                f"{missing}; the wrapped network must call .encoder and every .decoder.stages[i] (under torch.compile"
                ", the hooks must be registered before the compiled network's first call; nnUNet_compile=f turns "
                "compilation off)."
            )
        return [captured[i] for i in self.decoder_stage_indices], captured["bottleneck"]

    def forward_with_meshes(self, x: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        """``(segmentation output as forward(x), [meshes (B, V_s, 3) in the normalised patch frame]))``."""
        with self.capture() as captured:
            seg = self.network(x)
        feats, bottleneck = self.head_inputs(captured)
        seg_full = seg[0] if isinstance(seg, (list, tuple)) else seg  # highest resolution first (deep supervision)
        meshes = self.mesh_head(feats, bottleneck, seg_full)
        return seg, meshes

    def templates(self) -> list[Template]:
        return self.mesh_head.templates()


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod") and isinstance(network._orig_mod, nn.Module):
            network = network._orig_mod
        else:
            return network


def templates_from_configuration(configuration: dict) -> list[Template]:
    """Templates stored in a configuration dict of the plans; a clear error when there are none."""
    raw = configuration.get(TEMPLATES_KEY)
    if not raw:
        raise RuntimeError(
            f"the plans' configuration has no {TEMPLATES_KEY!r}: the mesh trainers store their templates there when "
            "they are instantiated for training, and nnU-Net copies them into the model folder's plans.json. Build "
            "this network from the plans.json of a model folder trained with a mesh trainer (nnUNetTrainerMesh, "
            "nnUNetTrainerTPM, nnUNetTrainerMIE), or instantiate the trainer once so it adds the templates.")
    return [Template.from_dict(d) for d in raw]


def mesh_network_from_configuration(network: nn.Module, configuration: dict) -> MeshAugmentedNetwork:
    """Wrap a built nnU-Net network in a :class:`MeshAugmentedNetwork` with the templates and head settings that a
    plans configuration dict stores (:data:`TEMPLATES_KEY`, :data:`HEAD_KEY`), so inference rebuilds the head of
    training exactly. A DDP or ``torch.compile`` wrapper is looked through (:func:`unwrap_network`): the hooks sit on
    nnU-Net's own modules and the state dict keys stay ``network.<nnU-Net keys>``."""
    network = unwrap_network(network)
    templates = templates_from_configuration(configuration)
    head = configuration.get(HEAD_KEY) or {}
    return MeshAugmentedNetwork(network, templates, decoder_stages=head.get("decoder_stages"),
                              structure_channels=head.get("structure_channels"), **(head.get("head_kwargs") or {}))


def stored_templates(*configurations: dict) -> Optional[list[Template]]:
    """The templates of the first configuration dict that stores any (:data:`TEMPLATES_KEY`), else None."""
    for conf in configurations:
        if conf.get(TEMPLATES_KEY):
            return [Template.from_dict(d) for d in conf[TEMPLATES_KEY]]
    return None


def head_settings(head_kwargs: dict, decoder_stages: Optional[Sequence[int]] = None,
                  structure_channels: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """The :data:`HEAD_KEY` dict: MeshHead keyword arguments, decoder stages (None: all) and, for
    segmentation-guided placement, the output channels of each structure (None: off)."""
    head = {"decoder_stages": None if decoder_stages is None else [int(i) for i in decoder_stages],
            "head_kwargs": dict(head_kwargs)}
    if structure_channels is not None:
        head["structure_channels"] = [sorted(int(i) for i in ch) for ch in structure_channels]
    return head


def store_in_configuration(configuration: dict, templates: Sequence[Template], head: dict) -> None:
    """Write templates and head settings into a plans configuration dict (read back by
    :func:`mesh_network_from_configuration`)."""
    configuration[TEMPLATES_KEY] = [t.to_dict() for t in templates]
    configuration[HEAD_KEY] = head
