"""Add topology terms to nnU-Net's own segmentation loss without touching it.

nnU-Net builds ``DC_and_CE_loss`` wrapped in ``DeepSupervisionWrapper`` (a list of outputs, one per
resolution, and a list of targets). :class:`TopologyLossWrapper` keeps that loss exactly as built and adds
``sum_i weight_i * term_i(output_full_res, target_full_res)``: topology terms act on the full-resolution
output only (DESIGN §6). The values of the last call are kept (detached) so a trainer can log each term.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor, nn


class EveryKCalls(nn.Module):
    """Evaluate ``module`` on every ``k``-th training call only; otherwise return a graph-connected zero.

    Validation calls (no grad) always evaluate, so the logged validation value is the real term.
    """

    def __init__(self, module: nn.Module, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.module, self.k, self.calls = module, int(k), 0

    def forward(self, logits, target):
        if not torch.is_grad_enabled():
            return self.module(logits, target)
        self.calls += 1
        if (self.calls - 1) % self.k:
            return logits.sum() * 0.0
        return self.module(logits, target)


def full_resolution(x):
    """First element of a deep-supervision list/tuple, or ``x`` itself."""
    return x[0] if isinstance(x, (list, tuple)) else x


class TopologyLossWrapper(nn.Module):
    """``seg_loss(output, target) + sum_i w_i * term_i(output[0], target[0])``.

    Args:
        seg_loss: nnU-Net's loss as built by ``nnUNetTrainer._build_loss`` (deep supervision or not).
        terms: name -> (module, weight). Each module maps ``(logits (B, C, *spatial), target (B, 1, *spatial))``
            to a scalar. A weight of 0 skips the term entirely (not computed; its logged value is NaN).
    """

    def __init__(self, seg_loss: nn.Module, terms: Mapping[str, Tuple[nn.Module, float]]) -> None:
        super().__init__()
        self.seg_loss = seg_loss
        self.terms = nn.ModuleDict({name: module for name, (module, _) in terms.items()})
        self.weights: Dict[str, float] = {name: float(w) for name, (_, w) in terms.items()}
        for name, w in self.weights.items():
            if not (w >= 0):
                raise ValueError(f"weight of topology term {name!r} must be >= 0, got {w}")
        self.last_values: Dict[str, Tensor] = {}

    def forward(self, output, target) -> Tensor:
        loss = self.seg_loss(output, target)
        out0, tgt0 = full_resolution(output), full_resolution(target)
        values = {"seg": loss.detach()}
        for name, module in self.terms.items():
            w = self.weights[name]
            if w == 0:  # switched off (e.g. the first phase of the two-phase schedule): not computed, logged as NaN
                values[name] = torch.full((), float("nan"), device=loss.device)
                continue
            term = module(out0, tgt0)
            values[name] = term.detach()
            loss = loss + w * term.to(loss.dtype)
        self.last_values = values
        return loss

    def pop_values(self) -> Dict[str, float]:
        """Values of the last call as floats (one device sync), then forget them."""
        values, self.last_values = self.last_values, {}
        return {k: float(v) for k, v in values.items()}
