"""Test-time topological refinement (Clough et al., IEEE TPAMI 2020, post-processing framework).

For one case, a *copy* of the trained network is fine-tuned to minimise

    (1/|V|) sum_{v in V} sum_c (softmax f(x; w)_{c,v} - softmax f(x; w0)_{c,v})^2 + lambda * (L_betti3D + L_betti2D)

starting from the trained weights ``w0``, with the dataset's Betti priors (``betti`` for 3D, ``betti_2d`` for
slices along ``betti_2d.axis``; :class:`nnunet_topo.losses.betti.BettiPriorLoss` in ``"prior"`` mode). The first
term (:func:`fidelity_loss`) keeps the segmentation close to the network's own answer; the second repairs the
topology. The fidelity is Clough et al.'s: the squared difference of the class-probability vectors, summed over
the classes and averaged over the voxels ``V`` (not averaged over classes too, which would divide it by the
number of classes C). ``lambda`` defaults to 0.01, inside Clough's range 0.005-0.02 for this normalisation.
A ``betti_2d`` prior with an allowed set (``[[1, 1], [1, 0]]``) pushes each slice to the nearest allowed vector
(the per-slice loss is the minimum over the set, see :mod:`nnunet_topo.losses.betti`). The per-slice priors
apply to the slices where the class is present now *and* (``keep_present``, default; CLI ``--no_keep_present``
switches it off) to those where the unrefined segmentation shows it (:func:`bind_presence`): Clough set ACDC's
per-slice priors by hand for the slices of each structure; without that binding a weak structure (an arg-max RV
at probability 0.4) is outside every prior and can be deleted, which meets the priors vacuously -- what the
refinement did to weak RVs on ACDC (documentation/results.md). The trained weights are never modified; every case
starts again from ``w0``.

A fold ensemble (several ``-f``) is refined as a whole: its output is the mean of the folds' logits (as nnU-Net
ensembles folds), the loss above is applied to that mean, and all folds' copies are fine-tuned jointly
(:func:`refine_logits_ensemble`), so the written ensemble segmentation is the one that meets the priors.

The loss sees the whole volume: the priors describe whole structures, so the whole structure must be in view
(DESIGN §6). The network sees what nnU-Net's predictor gives it (:class:`SlidingWindow`): the volume padded to the
patch size as nnU-Net pads it, nnU-Net's tiles and Gaussian weights, stitched differentiably, so that the unrefined
output is nnU-Net's own prediction. (A single pass over the whole volume, padded to a multiple of the network's
stride, was used before: other padding and context change the instance norms' statistics, and on ACDC it disagreed
with nnU-Net's prediction on 0.6-0.8 % of the voxels, up to 11 Dice points on a structure, before any refinement
step; documentation/results.md.) The gradient of every tile is kept for a step: memory grows with the number of
tiles.

:func:`refine_logits` is the generic optimisation (any ``nn.Module``); :func:`refine_folder` is the nnU-Net glue
(model folder, nnU-Net's preprocessing and export) behind ``nnUNetv2_topo_refine``.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_topo.losses.betti import BettiPriorLoss
from nnunet_topo.metrics.topology import (allowed_betti_vectors, betti_error, betti_numbers_3d, betti_numbers_per_slice,
                                          betti_prior_error)
from nnunet_topo.topology_spec import label_priors


#: default weight of the topology terms (Clough et al. use 0.005-0.02 with the per-voxel fidelity below)
DEFAULT_LAMBDA = 0.01


class RefinementError(ValueError):
    """Bad input to the refinement (folders, priors, model)."""


def fidelity_loss(logits: Tensor, p0: Tensor) -> Tensor:
    """Clough et al.'s fidelity term: ``(1/|V|) sum_v sum_c (softmax(logits)_{c,v} - p0_{c,v})^2``.

    Args:
        logits: ``(B, C, *spatial)`` logits of the network being refined.
        p0: ``(B, C, *spatial)`` class probabilities of the unrefined network (the softmax of its logits).

    Returns:
        Scalar: the squared difference summed over the class channel, averaged over voxels (and the batch).
    """
    return ((torch.softmax(logits, 1) - p0) ** 2).sum(1).mean()


def build_prior_losses(priors_3d: Mapping[int, Sequence[int]], priors_2d: Mapping[int, Sequence],
                       slice_axis: Optional[int], downsample: int = 1) -> List[BettiPriorLoss]:
    """The prior-mode Betti losses for the given class-id priors (3D and per slice). A per-slice prior is one
    vector ``(b0, b1)`` or an allowed set of vectors (:func:`nnunet_topo.topology_spec.label_priors` gives sets)."""
    losses = []
    if priors_3d:
        losses.append(BettiPriorLoss(class_ids=sorted(priors_3d), priors=dict(priors_3d), target="prior",
                                     downsample=downsample, softmax=True))
    if priors_2d and slice_axis is not None:
        losses.append(BettiPriorLoss(class_ids=sorted(priors_2d), priors=dict(priors_2d), target="prior",
                                     downsample=downsample, softmax=True, slice_axis=slice_axis))
    if not losses:
        raise RefinementError("no Betti priors to refine towards: add \"betti\" / \"betti_2d\" priors of single "
                              "labels to the dataset.json topology block")
    return losses


def bind_presence(prior_losses: Sequence[nn.Module], logits0: Optional[Tensor]) -> None:
    """Bind the per-slice priors of ``prior_losses`` to the slices where the unrefined output ``logits0`` shows each
    class (:meth:`BettiPriorLoss.fix_presence`), or unbind them (``None``). Bound, a structure present in a slice of
    the network's own answer keeps its prior there (b0 >= 1) during the refinement and cannot meet the prior by
    vanishing; unbound (Clough's per-slice loss on the slices where the class is present at each step), a weak
    structure can be deleted: measured on ACDC (documentation/results.md), where the refinement deleted weak RVs."""
    for loss in prior_losses:
        if isinstance(loss, BettiPriorLoss) and loss.target == "prior" and loss.slice_axis is not None:
            loss.fix_presence(logits0)


def refine_logits(network: nn.Module, x: Tensor, prior_losses: Sequence[nn.Module], steps: int = 30,
                  lr: float = 1e-4, lam: float = DEFAULT_LAMBDA,
                  keep_present: bool = True) -> Tuple[Tensor, Tensor, List[dict]]:
    """Fine-tune a copy of ``network`` on one input so its output keeps close to the original and meets the priors.

    Args:
        network: maps ``x`` to logits ``(1, C, *spatial)``; not modified.
        x: ``(1, C_in, *spatial)`` input.
        prior_losses: modules mapping logits to a scalar topology loss (e.g. prior-mode BettiPriorLoss).
        steps: Adam steps. lr: Adam learning rate. lam: weight of the topology terms (default 0.01; the
            fidelity is :func:`fidelity_loss`).
        keep_present: bind the per-slice priors to the slices where the unrefined output shows each class
            (:func:`bind_presence`; default), else to the slices where it is present at each step.

    Returns:
        ``(logits_before, logits_after, history)``; history holds per step ``{"step", "fidelity", "topology"}``.
    """
    if steps < 0 or not (lr > 0) or not (lam >= 0):
        raise RefinementError(f"need steps >= 0, lr > 0, lam >= 0; got steps={steps}, lr={lr}, lam={lam}")
    net = copy.deepcopy(network)
    net.eval()  # no dropout; nnU-Net's instance norms do not depend on the mode
    with torch.no_grad():
        logits0 = network(x).float()
        p0 = torch.softmax(logits0, 1)
    if not torch.isfinite(logits0).all():
        raise RefinementError("the network produced NaN/inf logits for this case")
    bind_presence(prior_losses, logits0 if keep_present else None)
    opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = net(x).float()
        fidelity = fidelity_loss(logits, p0)
        topo = sum(loss(logits) for loss in prior_losses)
        total = fidelity + lam * topo
        total.backward()
        opt.step()
        history.append({"step": step, "fidelity": float(fidelity.detach()), "topology": float(topo.detach())})
    with torch.no_grad():
        logits1 = net(x).float()
    return logits0, logits1, history


def refine_logits_ensemble(networks: Sequence[nn.Module], x: Tensor, prior_losses: Sequence[nn.Module],
                           steps: int = 30, lr: float = 1e-4, lam: float = DEFAULT_LAMBDA, keep_present: bool = True
                           ) -> Tuple[Tensor, Tensor, List[dict]]:
    """Fine-tune copies of K networks (a fold ensemble) jointly, so that their *ensemble* output meets the priors.

    The ensemble output is the mean of the K networks' logits, as nnU-Net ensembles folds
    (``nnUNetPredictor.predict_logits_from_preprocessed_data``), and the loss of :func:`refine_logits` is applied to
    it: ``fidelity(zbar, softmax(zbar0)) + lambda * topology(zbar)`` (:func:`fidelity_loss`) with
    ``zbar = mean_k f_k(x; w_k)``,
    ``zbar0`` the unrefined ensemble. So the segmentation that is written (the ensemble's) is the one refined
    towards the priors; refining each fold alone and averaging would not guarantee that, since the mean of
    topologically correct outputs need not be correct. One Adam optimiser over all copies' weights.

    Memory: the gradient of a mean is ``dL/dz_k = dL/dzbar / K``, so each step computes ``zbar`` without graph, the
    loss gradient with respect to ``zbar``, then back-propagates each network on its own (one network's activations
    at a time, two forwards per network and step).

    Args:
        networks: K >= 1 modules mapping ``x`` to logits ``(1, C, *spatial)``; not modified.
        x, prior_losses, steps, lr, lam, keep_present: as :func:`refine_logits`.

    Returns:
        ``(ensemble logits before, ensemble logits after, history)`` as :func:`refine_logits`.
    """
    if steps < 0 or not (lr > 0) or not (lam >= 0):
        raise RefinementError(f"need steps >= 0, lr > 0, lam >= 0; got steps={steps}, lr={lr}, lam={lam}")
    if not networks:
        raise RefinementError("refine_logits_ensemble needs at least one network")
    nets = [copy.deepcopy(n) for n in networks]
    for n in nets:
        n.eval()

    def ensemble_logits(models: Sequence[nn.Module]) -> Tensor:
        with torch.no_grad():
            total = None
            for m in models:
                z = m(x).float()
                total = z if total is None else total + z
            return total / len(models)

    logits0 = ensemble_logits(networks)
    if not torch.isfinite(logits0).all():
        raise RefinementError("the networks produced NaN/inf logits for this case")
    bind_presence(prior_losses, logits0 if keep_present else None)
    p0 = torch.softmax(logits0, 1)
    opt = torch.optim.Adam([q for n in nets for q in n.parameters() if q.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        zbar = ensemble_logits(nets).requires_grad_(True)
        fidelity = fidelity_loss(zbar, p0)
        topo = sum(loss(zbar) for loss in prior_losses)
        total = fidelity + lam * topo
        (grad,) = torch.autograd.grad(total, zbar)
        for n in nets:
            n(x).float().backward(grad / len(nets))
        opt.step()
        history.append({"step": step, "fidelity": float(fidelity.detach()), "topology": float(topo.detach())})
    logits1 = ensemble_logits(nets)
    return logits0, logits1, history


def topology_errors(seg: np.ndarray, priors_3d: Mapping[int, Sequence[int]], priors_2d: Mapping[int, Sequence],
                    slice_axis: Optional[int]) -> Dict[str, dict]:
    """Betti numbers and errors of a label map against priors: 3D per class, 2D mean over slices with the class.

    A per-slice prior is one vector or an allowed set; a slice's error is the Betti error to the nearest allowed
    vector (:func:`nnunet_topo.metrics.topology.betti_prior_error`), so a slice is wrong only when it matches none.
    """
    out = {}
    for c in sorted(set(priors_3d) | set(priors_2d)):
        mask = seg == c
        e: dict = {}
        if c in priors_3d:
            b = betti_numbers_3d(mask)
            e["betti_3d"] = list(b)
            e["betti_error_3d"] = betti_error(b, priors_3d[c])
        if c in priors_2d and slice_axis is not None:
            per = betti_numbers_per_slice(mask, axis=slice_axis)
            present = per[:, 0] > 0
            errs = [betti_prior_error(row, priors_2d[c]) for row in per[present]]
            e["betti_error_2d_mean"] = float(np.mean(errs)) if errs else math.nan
            e["slices_wrong_2d"] = int(sum(v > 0 for v in errs))
        out[str(c)] = e
    return out


class SlidingWindow(nn.Module):
    """nnU-Net's sliding-window prediction as a differentiable module: ``(1, C_in, *spatial)`` preprocessed input to
    ``(1, K, *spatial)`` logits, as ``nnUNetPredictor.predict_sliding_window_return_logits`` computes them (the input
    padded to at least ``patch_size`` by nnU-Net's ``pad_nd_image``, tiles at nnU-Net's
    ``compute_steps_for_sliding_window`` positions, each tile's logits weighted by nnU-Net's ``compute_gaussian``,
    their weighted mean, the padding removed), in float32 and without mirroring. 3D patches only."""

    def __init__(self, network: nn.Module, patch_size: Sequence[int], tile_step_size: float = 0.5,
                 use_gaussian: bool = True):
        super().__init__()
        if len(patch_size) != 3:
            raise RefinementError(f"refinement needs a 3D configuration; this one has patch size {list(patch_size)}")
        self.network, self.patch_size = network, tuple(int(p) for p in patch_size)
        self.tile_step_size, self.use_gaussian = tile_step_size, use_gaussian

    def forward(self, x: Tensor) -> Tensor:
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

        data, revert = pad_nd_image(x[0], self.patch_size, "constant", {"value": 0}, True, None)
        steps = compute_steps_for_sliding_window(tuple(data.shape[1:]), self.patch_size, self.tile_step_size)
        weight = (compute_gaussian(self.patch_size, sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                                   device=x.device) if self.use_gaussian
                  else torch.ones(self.patch_size, device=x.device))
        total, count = None, torch.zeros(data.shape[1:], device=x.device)
        for start in itertools.product(*steps):
            sl = (slice(None), *(slice(a, a + t) for a, t in zip(start, self.patch_size)))
            z = self.network(data[sl][None]).float()[0] * weight
            if total is None:
                total = z.new_zeros((z.shape[0], *data.shape[1:]))
            total[sl] += z  # in place on a tensor without history: autograd records the slice update
            count[sl[1:]] += weight
        return (total / count)[(slice(None), *revert[1:])][None]


def refine_folder(model_folder: str, input_folder: str, output_folder: str, folds: Optional[Sequence] = None,
                  checkpoint: str = "checkpoint_final.pth", steps: int = 30, lr: float = 1e-4,
                  lam: float = DEFAULT_LAMBDA,
                  downsample: int = 1, use_2d: bool = True, device: str = "cuda", overwrite: bool = False,
                  show_progress: bool = True, keep_present: bool = True) -> dict:
    """Refine every case of ``input_folder`` (nnU-Net raw images) and write segmentations to ``output_folder``.

    ``folds``: one fold, several, ``"all"``, or None for every ``fold_N`` folder with ``checkpoint``
    (:func:`nnunet_topo.model_folder.resolve_folds`). One fold: :func:`refine_logits` on its network. Several folds: the
    ensemble (mean of the folds' logits, as ``nnUNetv2_predict -f 0 1 ...``) is refined, every fold's copy
    fine-tuned jointly (:func:`refine_logits_ensemble`); the written segmentation is the refined ensemble's.

    Writes one segmentation per case (nnU-Net's file naming and export, original geometry) and
    ``refinement_summary.json`` (per case: Betti numbers/errors against the priors before and after, voxels
    changed, seconds). Never writes into ``input_folder``; refuses to replace existing files unless ``overwrite``.
    """
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_topo.topology_spec import spec_from_dataset_json, spec_in_patch_frame

    from nnunet_topo.paths import check_output

    if not os.path.isdir(input_folder):
        raise RefinementError(f"input folder not found: {input_folder}")
    if not os.path.isdir(model_folder):
        raise RefinementError(f"model folder not found: {model_folder} (train first, or check -d/-c/-tr/-p)")
    # never into, above or through a symlink to the input folder (paths resolved)
    check_output(output_folder, {"input folder": input_folder}, kind="folder")
    from nnunet_topo.model_folder import resolve_folds

    try:
        folds = resolve_folds(model_folder, folds, checkpoint)
    except ValueError as e:
        raise RefinementError(str(e)) from e
    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=dev,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, tuple(folds), checkpoint_name=checkpoint)
    plans_manager, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    spec = spec_from_dataset_json(dj)
    # priors on single labels only (BettiPriorLoss acts on channels); regions are reported, not refined
    priors_3d, priors_2d = label_priors(spec)
    if not use_2d:
        priors_2d = {}
    # the slice axis is given in the axis order of the images; nnU-Net's preprocessing transposes
    slice_axis = spec_in_patch_frame(spec, plans_manager.transpose_forward).betti_2d_axis if priors_2d else None
    losses = build_prior_losses(priors_3d, priors_2d, slice_axis, downsample)

    file_ending = dj["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(input_folder, file_ending)
    if not cases:
        raise RefinementError(f"no images ending in _0000{file_ending} in {input_folder}")
    os.makedirs(output_folder, exist_ok=True)
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.to(dev)
    networks = [network]
    for params in predictor.list_of_parameters[1:]:  # one copy per further fold (parameters only: small)
        other = copy.deepcopy(network)
        other.load_state_dict(params)
        networks.append(other)
    windows = [SlidingWindow(n, cm.patch_size, predictor.tile_step_size) for n in networks]
    preprocessor = cm.preprocessor_class(verbose=False)
    summary: dict = {"model_folder": model_folder, "folds": list(folds), "checkpoint": checkpoint, "steps": steps, "lr": lr,
                     "lambda": lam, "downsample": downsample, "keep_present": keep_present, "priors_3d": {str(k): list(v) for k, v in priors_3d.items()},
                     "priors_2d": {str(k): [list(b) for b in allowed_betti_vectors(v)]
                                   for k, v in priors_2d.items()},
                     "cases": {}}
    it = cases
    if show_progress:
        from tqdm import tqdm
        it = tqdm(cases, desc="refining")
    for files in it:
        name = os.path.basename(files[0])[: -len(f"_0000{file_ending}")]
        out_trunc = os.path.join(output_folder, name)
        if os.path.exists(out_trunc + file_ending) and not overwrite:
            raise RefinementError(f"{out_trunc + file_ending} exists; pass --overwrite to replace it")
        t0 = time.time()
        data, _, props = preprocessor.run_case(files, None, plans_manager, cm, dj)
        x = torch.from_numpy(data)[None].float().to(dev)
        if len(networks) == 1:
            logits0, logits1, hist = refine_logits(windows[0], x, losses, steps=steps, lr=lr, lam=lam,
                                                     keep_present=keep_present)
        else:
            logits0, logits1, hist = refine_logits_ensemble(windows, x, losses, steps=steps, lr=lr, lam=lam,
                                                              keep_present=keep_present)
        logits0 = logits0[0].cpu()
        logits1 = logits1[0].cpu()
        seg0, seg1 = logits0.argmax(0).numpy(), logits1.argmax(0).numpy()
        export_prediction_from_logits(logits1, props, cm, plans_manager, dj, out_trunc, False)
        summary["cases"][name] = {
            "before": topology_errors(seg0, priors_3d, priors_2d, slice_axis),
            "after": topology_errors(seg1, priors_3d, priors_2d, slice_axis),
            "voxels_changed": int((seg0 != seg1).sum()), "voxels": int(seg0.size),
            "final_fidelity": hist[-1]["fidelity"] if hist else 0.0,
            "final_topology_loss": hist[-1]["topology"] if hist else None,
            "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(output_folder, "refinement_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def format_refinement_summary(summary: dict) -> str:
    lines = [f"{'case':<24}{'class':>6}{'Betti err 3D before':>21}{'after':>7}{'2D slices wrong before':>24}"
             f"{'after':>7}{'voxels changed':>16}"]
    for case, c in summary["cases"].items():
        for cls in c["before"]:
            b, a = c["before"][cls], c["after"][cls]
            lines.append(f"{case:<24}{cls:>6}{b.get('betti_error_3d', '-'):>21}{a.get('betti_error_3d', '-'):>7}"
                         f"{b.get('slices_wrong_2d', '-'):>24}{a.get('slices_wrong_2d', '-'):>7}"
                         f"{c['voxels_changed']:>16}")
    return "\n".join(lines)
