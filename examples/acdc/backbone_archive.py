#!/usr/bin/env python
"""The ACDC study's backbone, kept in the repository (issue 22), so that a lost work folder does not cost it again.

A study work folder lives only as long as its machine; the backbone is the one asset every stage-2 arm starts from,
and rows of arms fine-tuned from two different backbones must not be compared. So stage backbone archives the
trained network's weights in float16 (5.5 M parameters: 11 MB instead of 22 MB; nnU-Net's optimizer state is not
kept) into ``documentation/results/``, and **every arm starts from the float16-rounded weights**, also on the
machine that trained them: an arm trained before a machine change and one trained after start from the same
numbers. The rounding moves a weight by at most 2^-11 of its magnitude (the change of the backbone's own validation
Dice is recorded by stage backbone, which evaluates the rounded start checkpoint as well).

    python examples/acdc/backbone_archive.py save CHECKPOINT_FINAL ARCHIVE START   # after stage 1 trained
    python examples/acdc/backbone_archive.py restore ARCHIVE START                 # a new work folder
    python examples/acdc/backbone_archive.py id START                              # the weights' sha256

``START`` is an nnU-Net checkpoint (``network_weights`` in float32 plus the trainer's ``init_args``,
``trainer_name``, ``current_epoch``, ``inference_allowed_mirroring_axes``) for ``nnUNetv2_train
-pretrained_weights``. ``id`` is the sha256 of the rounded weights (key, dtype, shape and bytes of every tensor in
key order), written beside ``START`` as ``backbone_id.txt``; the collector records it and keeps earlier rows only
when it matches.
"""
import argparse
import hashlib
import os
import sys
from typing import Dict

import torch

#: the checkpoint entries kept beside the weights (what nnU-Net and the trainers read from a pretrained checkpoint)
META_KEYS = ("init_args", "trainer_name", "current_epoch", "inference_allowed_mirroring_axes")
ID_FILE = "backbone_id.txt"


def weights_sha256(weights: Dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: key, dtype, shape and bytes of every tensor, in key order."""
    h = hashlib.sha256()
    for k in sorted(weights):
        a = weights[k].detach().cpu().contiguous().numpy()
        h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cast(weights: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``, aliases kept: nnU-Net's U-Nets list the encoder twice in their state dict
    (``decoder.encoder.*`` is ``encoder.*``), and ``torch.save`` stores a shared tensor once, so a cast without the
    aliases would store the encoder twice."""
    done: Dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in weights.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key not in done:
            done[key] = (v.to(dtype) if v.is_floating_point() else v.clone()).contiguous()
        out[k] = done[key]
    return out


def _start_weights(half: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return _cast(half, torch.float32)


def _atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_start(archive: dict, start: str) -> str:
    """The float32 start checkpoint of ``archive`` at ``start`` and its id beside it; returns the id. An archive
    without ``sha256`` (being saved) gets it; one with it (restored) must match it."""
    weights = _start_weights(archive["network_weights_fp16"])
    sha = weights_sha256(weights)
    archive.setdefault("sha256", sha)
    if sha != archive["sha256"]:
        raise ValueError(f"the archived backbone's weights do not match its sha256 ({sha} != {archive['sha256']}): "
                         "the file is damaged")
    _atomic_save(dict(archive["meta"], network_weights=weights), start)
    with open(os.path.join(os.path.dirname(os.path.abspath(start)), ID_FILE), "w") as f:
        f.write(sha + "\n")
    return sha


def save(checkpoint: str, archive_path: str, start: str) -> str:
    """Archive ``checkpoint``'s network weights in float16 and write the rounded start checkpoint."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "network_weights" not in ck:
        raise ValueError(f"{checkpoint} is not an nnU-Net checkpoint (no 'network_weights')")
    half = _cast(ck["network_weights"], torch.float16)
    bad = [k for k, v in half.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # float16 overflows beyond 65504: a weight that large would not survive the rounding
        raise ValueError(f"{checkpoint}: weights not finite in float16: {bad[:5]}")
    archive = {"network_weights_fp16": half, "meta": {k: ck[k] for k in META_KEYS if k in ck},
               "source": os.path.abspath(checkpoint), "logging": ck.get("logging")}
    sha = write_start(archive, start)  # casts and hashes once, and sets archive["sha256"]
    _atomic_save(archive, archive_path)
    return sha


def restore(archive_path: str, start: str) -> str:
    return write_start(torch.load(archive_path, map_location="cpu", weights_only=False), start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="archive a trained backbone and write its rounded start checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("archive")
    s.add_argument("start")
    r = sub.add_parser("restore", help="write the start checkpoint of an archived backbone")
    r.add_argument("archive")
    r.add_argument("start")
    i = sub.add_parser("id", help="print the sha256 of a checkpoint's network weights")
    i.add_argument("start")
    a = p.parse_args(argv)
    if a.cmd == "save":
        print(save(a.checkpoint, a.archive, a.start))
    elif a.cmd == "restore":
        print(restore(a.archive, a.start))
    else:
        print(weights_sha256(torch.load(a.start, map_location="cpu", weights_only=False)["network_weights"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
