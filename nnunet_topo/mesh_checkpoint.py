"""The mesh head's entry in an nnU-Net checkpoint (``HEAD_STATE_KEY``, beside nnU-Net's ``network_weights``).

The mesh trainers save nnU-Net's checkpoint as nnU-Net writes it and add the head's weights, optimiser, GradScaler,
settings and format; ``--c`` needs the entry of the same settings; ``-pretrained_weights`` takes the head when it fits
(same settings and templates) and starts it fresh otherwise; mesh models of an earlier nnunet-topo (head format 1)
are refused with a message that says why. Plain torch (no nnU-Net import).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from nnunet_topo.mesh_head.network import HEAD_FORMAT_VERSION, HEAD_STATE_KEY

__all__ = ["add_head_entry", "head_entry", "load_pretrained_head", "refuse_older_mesh_model"]


def refuse_older_mesh_model(checkpoint: dict, where: str) -> None:
    """A clear error for a checkpoint of a mesh model of an earlier nnunet-topo (head format 1: network and head in
    one wrapper, ``network.``/``mesh_head.`` keys in ``network_weights``, placement from soft moments)."""
    if HEAD_STATE_KEY not in checkpoint and any(k.startswith("mesh_head.")
                                                for k in checkpoint.get("network_weights", {})):
        raise RuntimeError(
            f"{where}: a mesh model of an earlier nnunet-topo (head format 1: nnU-Net's network and the mesh head in "
            "one wrapper, placement from soft-segmentation moments). This version cannot reproduce its meshes and "
            "nnU-Net cannot load its network keys ('network.' prefix). Retrain it with this version.")


def add_head_entry(filename: str, head: nn.Module, optimizer, grad_scaler, settings: dict,
                   ready_epoch: Optional[int]) -> None:
    """Add the head's entry to a checkpoint file nnU-Net has just written (read, extend, write again)."""
    checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    checkpoint[HEAD_STATE_KEY] = {
        "format": HEAD_FORMAT_VERSION, "head_settings": settings, "state_dict": head.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": grad_scaler.state_dict() if grad_scaler is not None else None,
        "ready_epoch": ready_epoch}
    torch.save(checkpoint, filename)


def head_entry(checkpoint: dict, where: str, settings: dict, required: bool,
               log: Callable[[str], None] = print) -> Optional[dict]:
    """The checkpoint's head entry if it fits a head of ``settings``. Without an entry, or (``required`` False) with
    other settings: None (logged). A clear error for an older format, and (``required``, i.e. ``--c``) for a missing
    entry or other settings."""
    refuse_older_mesh_model(checkpoint, where)
    entry = checkpoint.get(HEAD_STATE_KEY)
    if entry is None:
        if required:
            raise RuntimeError(f"{where} has no mesh head ({HEAD_STATE_KEY}); it is not a checkpoint of a mesh "
                               "trainer of this version. Start from it with -pretrained_weights instead.")
        return None
    if entry.get("format") != HEAD_FORMAT_VERSION:
        raise RuntimeError(f"{where}: mesh head format {entry.get('format')}, this version reads "
                           f"{HEAD_FORMAT_VERSION}; retrain the mesh model.")
    theirs = entry.get("head_settings", {})
    if theirs != settings:
        if required:
            raise RuntimeError(f"{where}: its mesh head settings {theirs} differ from the expected {settings}; "
                               "start from a mesh model of the same trainer settings, or from its network only "
                               "(-pretrained_weights).")
        log(f"{where}: its mesh head settings {theirs} differ from the expected {settings}")
        return None
    return entry


def load_pretrained_head(fname: str, checkpoint: dict, head: nn.Module, settings: dict,
                         log: Callable[[str], None]) -> bool:
    """``-pretrained_weights``: load the head from ``checkpoint`` (read from ``fname``) when it holds a head of these
    settings and templates (True), else leave it fresh (False); the log says which and why."""
    entry = head_entry(checkpoint, fname, settings, required=False, log=log)
    own = head.state_dict()
    same = entry is not None and all(torch.equal(entry["state_dict"][k].cpu(), v.cpu())
                                     for k, v in own.items() if k.startswith("template_"))
    if same:
        head.load_state_dict(entry["state_dict"])
        log(f"mesh head loaded from {fname} (its {len(entry['state_dict'])} keys); the head's optimiser starts fresh")
        return True
    why = "it has no mesh head of these settings" if entry is None else "its templates differ from this plans.json's"
    log(f"mesh head starts fresh: {fname} is used for nnU-Net's network only ({why})")
    return False
