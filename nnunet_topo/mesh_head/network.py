"""``MeshAugmentedNetwork``: an nnU-Net network plus a :class:`MeshHead` (DESIGN §7 "Network wrapper").

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

from typing import Any, Sequence

import torch
from torch import nn

from .head import MeshHead
from .templates import Template

__all__ = ["MeshAugmentedNetwork", "decoder_stage_channels"]


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

    def _make_stage_hook(self, i: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._captured is not None:
                self._captured[i] = output

        return hook

    def forward(self, x: torch.Tensor):
        """Exactly the wrapped network's output (segmentation logits; a list under deep supervision)."""
        return self.network(x)

    def forward_with_meshes(self, x: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        """``(segmentation output as forward(x), [meshes (B, V_s, 3) in the normalised patch frame]))``."""
        self._captured = {}
        try:
            seg = self.network(x)
            captured = self._captured
        finally:
            self._captured = None
        missing = [i for i in self.decoder_stage_indices if i not in captured]
        if "bottleneck" not in captured or missing:
            raise RuntimeError(
                "MeshAugmentedNetwork: the forward hooks did not capture the bottleneck/decoder stages "
                f"{missing}; the wrapped network must call .encoder and every .decoder.stages[i]."
            )
        feats = [captured[i] for i in self.decoder_stage_indices]
        seg_full = seg[0] if isinstance(seg, (list, tuple)) else seg  # highest resolution first (deep supervision)
        meshes = self.mesh_head(feats, captured["bottleneck"], seg_full)
        return seg, meshes

    def templates(self) -> list[Template]:
        return self.mesh_head.templates()
