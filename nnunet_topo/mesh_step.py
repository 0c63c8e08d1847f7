"""The gradient arithmetic of one mesh-trainer step: the segmentation keeps its budget (DESIGN §6).

A mesh trainer's step has two optimisers: nnU-Net's (``self.network``, clipped to norm 12 as nnU-Net does) and the
mesh head's (own clip, own GradScaler, own lr). The head reads *detached* copies of the decoder features, so its loss
never enters nnU-Net's backward by itself; what the mesh terms may give the backbone is added explicitly:

1. :func:`head_backward` — one backward of the head's loss: the weighted *data* terms (occupancy, L_TPM, L_MIE) give
   the head parameters their gradient **and** the gradient at the detached features; the *shape regularisers*
   (Laplacian, edge) give the head parameters theirs but never reach the features, so they never reach the backbone.
2. nnU-Net's ``L_seg`` backward fills ``.grad`` of the network exactly as in plain nnU-Net.
3. :func:`add_bounded_feature_gradient` — the feature gradient is pulled back through the network
   (``torch.autograd.grad``; no ``.grad`` is touched), scaled so that its norm is at most
   ``share * ||∇L_seg||`` of *this* step (both over all of the network's parameters), and added to ``.grad``.

So with ``share = 0`` the network's update is exactly plain nnU-Net's, and at any share the backbone's gradient
differs from plain nnU-Net's by at most ``share`` times L_seg's own gradient norm, at every step where the bound is
exact. Step 3 is a second backward through the network (~0.9x of a plain nnU-Net iteration on the 2-core CPU at the
heart-ROI configuration, documentation/benchmarks.md), so with ``every = k > 1`` (the trainers'
``mesh_share_every``) it is exact only on every k-th step (:class:`ShareEstimate`); in between, L_seg and the mesh
share go through **one** backward (:func:`backward_with_predicted_share`), the factor predicted from the last exact
step: the network's gain ``||J^T g|| / ||g||`` (J: the features' Jacobian) and ``||∇L_seg||``, applied to this
step's feature gradient ``g``, with a safety margin (the realised share is then measured, not guaranteed). Plain
torch, no nnU-Net import (``mesh_train_step`` reads a trainer duck-typed); one device sync per exact step in the
arithmetic (whether its estimate is usable), none on predicted steps.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ShareEstimate", "add_bounded_feature_gradient", "backward_with_predicted_share", "broadcast_from_rank0_",
           "grad_norm", "head_backward", "mean_over_ranks", "mesh_train_step"]


def grad_norm(grads: Sequence[Optional[Tensor]]) -> Tensor:
    """L2 norm over a list of gradients (None entries skipped), as a float32 0-dim tensor (no host sync)."""
    sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    if not sq:
        return torch.zeros(())
    return torch.stack(sq).sum().sqrt()


def _process_group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def mean_over_ranks(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Average per-parameter gradients over the DDP processes (unchanged without an initialised process group).

    DDP-safe by construction: every rank makes the same single collective whatever its local gradients are, since
    gradients computed with ``torch.autograd.grad`` (or a head outside DDP) bypass DDP's reducer, and a rank whose
    loss did not reach a parameter (a structure absent from its batch, a term off) has ``None`` there. A ``None``
    counts as zero in the mean (what DDP does for unused parameters); the result is ``None`` only where no rank had
    a gradient (so an optimiser skips the parameter on every rank alike). One host sync (the presence flags).
    """
    import torch.distributed as dist

    if not _process_group_ready():
        return list(grads)
    if len(params) == 0:
        return []
    ref = params[0]
    parts = [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float() for p, g in zip(params, grads)]
    present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=ref.device)
    flat = torch.cat(parts + [present])
    dist.all_reduce(flat)
    flat[:-len(present)].div_(dist.get_world_size())
    counts = flat[-len(present):].tolist()
    out: List[Optional[Tensor]] = []
    offset = 0
    for p, g, n in zip(params, grads, counts):
        k = p.numel()
        out.append(flat[offset:offset + k].view_as(p).to(p.dtype) if n > 0 else None)
        offset += k
    return out


def _rms_over_ranks(norm: Tensor) -> Tensor:
    """The root mean square of a per-rank norm over the DDP processes (unchanged without a process group)."""
    import torch.distributed as dist

    if not _process_group_ready():
        return norm
    sq = norm.detach().float().pow(2).reshape(1).clone()
    dist.all_reduce(sq)
    return (sq / dist.get_world_size()).sqrt().reshape(())


def broadcast_from_rank0_(module: torch.nn.Module) -> None:
    """Give every DDP process rank 0's parameters and buffers of ``module`` (what DDP does for the module it wraps;
    the mesh head is not inside nnU-Net's DDP wrapper). No-op without an initialised process group."""
    import torch.distributed as dist

    if not _process_group_ready():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def head_backward(data_loss: Tensor, regulariser_loss: Tensor, head_params: Sequence[Tensor],
                  features: Sequence[Tensor], loss_scale: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """Accumulate the head's gradient into ``p.grad`` and return the data terms' gradient at ``features``.

    Args:
        data_loss: weighted sum of the data terms (they may reach the backbone).
        regulariser_loss: weighted sum of the shape regularisers (head only).
        head_params: the head's parameters (``.grad`` accumulated, scaled by ``loss_scale`` as a GradScaler does).
        features: the detached features the head read (``requires_grad`` set where the backbone may get a gradient;
            empty: none is computed).
        loss_scale: the head GradScaler's current scale as a tensor (``scaler.scale(torch.ones(()))``), or None.

    Returns the **unscaled** gradient at each feature (None where there is none); non-finite entries are zeroed
    (the head's GradScaler skips such a step; the backbone then gets nothing from it).
    """
    params = [p for p in head_params if p.requires_grad]
    feats = [f for f in features if f.requires_grad]
    s = loss_scale if loss_scale is not None else None
    d = data_loss * s if s is not None else data_loss
    r = regulariser_loss * s if s is not None else regulariser_loss
    inputs = params + feats
    g_data = torch.autograd.grad(d, inputs, retain_graph=r.requires_grad, allow_unused=True) if d.requires_grad \
        else [None] * len(inputs)
    g_reg = torch.autograd.grad(r, params, allow_unused=True) if r.requires_grad else [None] * len(params)
    for p, a, b in zip(params, g_data[:len(params)], g_reg):
        g = a if b is None else (b if a is None else a + b)
        if g is None:
            continue
        p.grad = g if p.grad is None else p.grad + g
    out: List[Optional[Tensor]] = []
    it = iter(g_data[len(params):])
    for f in features:
        if not f.requires_grad:
            out.append(None)
            continue
        g = next(it)
        if g is not None:
            g = g.float() / s if s is not None else g.float()
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        out.append(g)
    return out


def add_bounded_feature_gradient(params: Sequence[Tensor], features: Sequence[Tensor],
                                 feature_grads: Sequence[Optional[Tensor]], share: float, ddp: bool = False
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Pull ``feature_grads`` back through the graph of ``features`` (the network's own outputs, graph retained)
    to ``params`` and add it to their ``.grad``, scaled to a norm of at most ``share * ||params.grad||``.

    Call after L_seg's backward (and the GradScaler's ``unscale_``), before nnU-Net's clip. Returns ``(norm of
    L_seg's gradient, norm of the mesh gradient before scaling, the factor applied)`` as tensors (no host sync).
    With ``share <= 0`` or no feature gradient nothing is computed or added.
    """
    params = [p for p in params if p.requires_grad]
    seg_norm = grad_norm([p.grad for p in params])
    pairs = [(f, g) for f, g in zip(features, feature_grads) if g is not None and f.requires_grad]
    zero = torch.zeros((), device=seg_norm.device)
    # ``share`` is the same on every rank; ``pairs`` is not (a rank whose batch lacks the structures may have no
    # feature gradient), so under DDP every rank joins the mean even with nothing of its own
    if share <= 0 or (not pairs and not ddp):
        return seg_norm, zero, zero
    mesh: List[Optional[Tensor]] = [None] * len(params)
    if pairs:
        outs, grads = zip(*pairs)
        mesh = list(torch.autograd.grad(outs, params, grad_outputs=[g.to(f.dtype) for f, g in pairs],
                                        allow_unused=True, retain_graph=False))
    if ddp:
        mesh = mean_over_ranks(params, mesh)
    mesh_norm = grad_norm(mesh).to(seg_norm.device)
    factor = torch.clamp(float(share) * seg_norm / mesh_norm.clamp_min(1e-30), max=1.0)
    factor = torch.where(torch.isfinite(factor), factor, zero)
    for p, g in zip(params, mesh):
        if g is None:
            continue
        g = g * factor.to(g.dtype)
        p.grad = g if p.grad is None else p.grad + g.to(p.grad.dtype)
    return seg_norm, mesh_norm, factor


class ShareEstimate:
    """The state of the predicted share bound (``every = k > 1``): which steps are exact, and what the last exact
    step measured.

    A step is exact when it is the k-th since the last exact one, or when no usable estimate exists yet (the first
    steps, and steps whose batch gave no mesh gradient: a head whose last layers start at zero, structures absent).
    An exact step records ``gain = ||J^T g|| / ||g||`` (the norm of the pulled-back mesh gradient over the norm of
    the feature gradient ``g``) and ``||∇L_seg||``; a predicted step then scales its own ``g`` by
    ``min(1, share / margin * ||∇L_seg|| / (gain * ||g||))``. Kept on the trainer, not in the checkpoint: after
    ``--c`` the first step is exact again.

    ``margin`` (default :attr:`MARGIN`): the prediction errs towards the segmentation. Measured on the ACDC study's
    fine-tune start (``benchmarks/bench_share_estimate.py``, 30 steps of nnUNetTrainerMesh from the backbone,
    documentation/benchmarks.md), with every = 5 the realised share of the predicted steps was 0.74x the allowed one
    (median), 1.09x (90th percentile), 1.2x (max); without the margin 1.10x / 1.64x / 1.81x.
    """

    MARGIN = 1.5

    def __init__(self, every: int, margin: float = MARGIN):
        self.every = max(1, int(every))
        self.margin = float(margin)
        self.since_exact: Optional[int] = None  # steps since the last exact one with a usable estimate
        self.gain: Optional[Tensor] = None
        self.seg_norm: Optional[Tensor] = None

    def exact_due(self) -> bool:
        return self.every <= 1 or self.since_exact is None or self.since_exact + 1 >= self.every

    def record_exact(self, seg_norm: Tensor, mesh_norm: Tensor, feature_norm: Tensor) -> None:
        """After an exact step: keep its gain and L_seg norm if they are usable (one host sync)."""
        gain = mesh_norm / feature_norm.clamp_min(1e-30)
        ok = bool(((mesh_norm > 0) & (feature_norm > 0) & torch.isfinite(gain) & torch.isfinite(seg_norm)).item())
        if ok:
            self.gain, self.seg_norm, self.since_exact = gain.detach(), seg_norm.detach(), 0
        elif self.since_exact is not None:
            self.since_exact = self.every  # keep the old estimate, measure again at the next step

    def predicted_factor(self, share: float, feature_norm: Tensor) -> Tensor:
        """The factor for this predicted step's feature gradient (a tensor; no host sync)."""
        self.since_exact = (self.since_exact or 0) + 1
        c = float(share) / self.margin * self.seg_norm / (self.gain * feature_norm).clamp_min(1e-30)
        c = torch.clamp(c, max=1.0)
        return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def backward_with_predicted_share(l_seg: Tensor, features: Sequence[Tensor], feature_grads: Sequence[Optional[Tensor]],
                                  factor: Tensor, loss_scale: Optional[Tensor] = None) -> None:
    """One backward of ``loss_scale * (L_seg + factor * <features, feature_grads>)`` into the network's ``.grad``
    (what L_seg's backward plus :func:`add_bounded_feature_gradient` with that factor give, in one pass through the
    network). ``loss_scale``: nnU-Net's GradScaler scale as a tensor (its ``unscale_`` then divides both parts)."""
    pairs = [(f, g) for f, g in zip(features, feature_grads) if g is not None and f.requires_grad]
    s = loss_scale if loss_scale is not None else torch.ones((), device=l_seg.device)
    roots = [l_seg * s.to(l_seg.dtype)] + [f for f, _ in pairs]
    grads = [None] + [(g * (factor * s).to(g.device, g.dtype)).to(f.dtype) for f, g in pairs]
    torch.autograd.backward(roots, grads)


def mesh_train_step(trainer, batch: dict):
    """One training step of a mesh trainer (``nnUNetTrainerMesh.train_step``; the one place where nnU-Net's step is
    changed): nnU-Net's step for ``trainer.network`` (its loss, backward, clip 12, GradScaler, optimiser), the head's
    own step beside it (its optimiser, clip, GradScaler), and the mesh data terms' bounded gradient into the network.

    ``trainer`` provides nnU-Net's ``device``, ``network``, ``loss``, ``optimizer``, ``grad_scaler``, ``is_ddp`` and
    the mesh trainer's ``mesh_model``, ``mesh_head``, ``head_optimizer``, ``head_grad_scaler``, ``head_grad_clip``,
    ``mesh_backbone_grad_share``, ``freeze_network``, ``mesh_losses(meshes, faces, logits, target)``.
    Returns ``({"loss": L_seg}, (mesh term values, meshes, faces, full-resolution target))``: nnU-Net's "loss"
    (progress.png) stays L_seg, comparable with plain nnU-Net and with its ``val_loss``.
    """
    import contextlib

    from nnunet_topo.losses.combined import full_resolution

    t = trainer
    data, target = batch["data"].to(t.device, non_blocking=True), batch["target"]
    target = [x.to(t.device, non_blocking=True) for x in target] if isinstance(target, list) else \
        target.to(t.device, non_blocking=True)
    t.optimizer.zero_grad(set_to_none=True)
    t.head_optimizer.zero_grad(set_to_none=True)
    amp = torch.autocast(t.device.type, enabled=True) if t.device.type == "cuda" else contextlib.nullcontext()
    share = 0.0 if t.freeze_network else float(t.mesh_backbone_grad_share)
    with amp:
        with t.mesh_model.capture() as captured, torch.set_grad_enabled(not t.freeze_network):
            output = t.network(data)
            l_seg = t.loss(output, target)
        logits, tgt = full_resolution(output), full_resolution(target)
        feats, bottleneck = t.mesh_model.head_inputs(captured)
        feats = feats + [bottleneck]
        inputs = [f.detach().requires_grad_(share > 0) for f in feats]  # the head never enters nnU-Net's backward
        meshes = t.mesh_head(inputs[:-1], inputs[-1], logits.detach())
        faces = [t.mesh_head.template_faces(s) for s in range(len(meshes))]
    data_loss, reg_loss, values = t.mesh_losses(meshes, faces, logits, tgt)
    hs = t.head_grad_scaler
    scale = hs.scale(torch.ones((), device=t.device)) if hs is not None else None
    head_params = list(t.mesh_head.parameters())
    feature_grads = head_backward(data_loss, reg_loss, head_params, inputs, scale)
    if not t.freeze_network:  # the network: L_seg's backward, the bounded mesh share, nnU-Net's clip and step
        net_params = list(t.network.parameters())
        every = max(1, int(getattr(t, "mesh_share_every", 1)))
        est = getattr(t, "_share_estimate", None)
        if est is None or est.every != every:
            est = t._share_estimate = ShareEstimate(every)
        feature_norm = grad_norm(feature_grads).to(t.device) if share > 0 else None
        if share > 0 and not est.exact_due():  # one backward: L_seg + the share predicted from the last exact step
            factor = est.predicted_factor(share, feature_norm)
            nnunet_scale = t.grad_scaler.scale(torch.ones((), device=t.device)) if t.grad_scaler is not None else None
            backward_with_predicted_share(l_seg, feats, feature_grads, factor, nnunet_scale)
            if t.grad_scaler is not None:
                t.grad_scaler.unscale_(t.optimizer)
        else:
            if t.grad_scaler is not None:
                t.grad_scaler.scale(l_seg).backward(retain_graph=share > 0)
                t.grad_scaler.unscale_(t.optimizer)
            else:
                l_seg.backward(retain_graph=share > 0)
            seg_norm, mesh_norm, _ = add_bounded_feature_gradient(net_params, feats, feature_grads, share,
                                                                  ddp=t.is_ddp)
            if share > 0 and est.every > 1:  # under DDP every rank records the same (global) norms
                est.record_exact(seg_norm, mesh_norm, _rms_over_ranks(feature_norm) if t.is_ddp else feature_norm)
        torch.nn.utils.clip_grad_norm_(net_params, 12)
        if t.grad_scaler is not None:
            t.grad_scaler.step(t.optimizer)
            t.grad_scaler.update()
        else:
            t.optimizer.step()
    if t.is_ddp:  # the head (outside nnU-Net's DDP wrapper): one mean over the ranks, then its own step
        for p, g in zip(head_params, mean_over_ranks(head_params, [p.grad for p in head_params])):
            p.grad = g
    if hs is not None:
        hs.unscale_(t.head_optimizer)
    torch.nn.utils.clip_grad_norm_(head_params, t.head_grad_clip)
    if hs is not None:
        hs.step(t.head_optimizer)
        hs.update()
    else:
        t.head_optimizer.step()
    return {"loss": l_seg.detach().cpu().numpy()}, (values, meshes, faces, tgt)
