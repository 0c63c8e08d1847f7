"""Betti prior loss (Clough et al.): naive loop reference, exact gradients, patch vs prior targets,
slice-wise mode, downsampling, graph-connected zero and bad input."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

pytest.importorskip("cripser")

from nnunet_topo.losses.betti import (  # noqa: E402
    BettiPriorLoss,
    betti_prior_loss,
    betti_targets_from_labels,
    max_pool_downsample,
)
from nnunet_topo.persistence import persistence_diagrams  # noqa: E402


def smooth_probs(shape, seed, sigma=1.0, scale=4.0):
    """Softmax of smoothed noise, (B, C, *spatial) float64."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape)
    logits = ndimage.gaussian_filter(logits, [0, 0] + [sigma] * (len(shape) - 2)) * scale
    return torch.softmax(torch.from_numpy(logits), dim=1)


def naive_loss(p, targets):
    """Plain loops over sorted bars. targets: {(b, c): [beta_0, beta_1, ...]}; mean over the batch."""
    total = 0.0
    for (b, c), betas in targets.items():
        diagrams = persistence_diagrams(p[b, c].detach(), maxdim=len(betas) - 1)
        for beta, d in zip(betas, diagrams):
            bars = [abs(float(x) - float(y)) for x, y in zip(d.births, d.deaths)]
            bars.sort(reverse=True)
            for l in range(1, max(beta, len(bars)) + 1):
                pers = bars[l - 1] if l <= len(bars) else 0.0  # missing bars have persistence 0
                total += (1 - pers**2) if l <= beta else pers**2
    return total / p.shape[0]


def torus_mask(shape=(12, 24, 24), R=7.0, r=2.5):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    z -= (shape[0] - 1) / 2
    y -= (shape[1] - 1) / 2
    x -= (shape[2] - 1) / 2
    return (np.hypot(np.hypot(y, x) - R, z) <= r)


# ---------------------------------------------------------------------------------------------
# value: naive reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 7, 7, 7), (2, 3, 12, 12), (1, 2, 6, 9, 5)])
@pytest.mark.parametrize("offset", [-2, -1, 0, 1, 3])  # beta* smaller than, equal to, larger than #bars
def test_matches_naive_loop_per_sample_targets(shape, offset):
    p = smooth_probs(shape, seed=sum(shape) + offset, sigma=0.8)
    nd = len(shape) - 2
    classes = [1, 2] if shape[1] == 3 else [0, 1]
    counts = np.zeros((shape[0], len(classes), nd), dtype=np.int64)
    for b in range(shape[0]):
        for i, c in enumerate(classes):
            counts[b, i] = [len(d.births) for d in persistence_diagrams(p[b, c])]
    tb = np.maximum(counts + offset, 0)
    got = betti_prior_loss(p, torch.from_numpy(tb), class_ids=classes, num_workers=2)
    want = naive_loss(p, {(b, c): tb[b, i].tolist() for b in range(shape[0]) for i, c in enumerate(classes)})
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "priors", [{1: (1, 0, 0), 2: (1, 1, 0)}, {2: (0, 0, 0)}, {0: (3, 2, 1), 1: (1, 0, 1)}]
)
def test_matches_naive_loop_mapping_priors(priors):
    p = smooth_probs((2, 3, 8, 8, 8), seed=5)
    got = betti_prior_loss(p, priors)
    want = naive_loss(p, {(b, c): list(v) for b in range(2) for c, v in priors.items()})
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_float32_and_maxdim():
    p = smooth_probs((1, 2, 8, 8, 8), seed=3).float()
    got = betti_prior_loss(p, {1: (1, 0)}, maxdim=1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_loss(p.double(), {(0, 1): [1, 0]}), rel=1e-5)


def test_perfect_binary_prediction_has_zero_loss():
    ref = torch.from_numpy(torus_mask()).long()[None, None]  # (1, 1, 12, 24, 24)
    onehot = torch.cat([1 - ref, ref], dim=1).double()
    loss = BettiPriorLoss([1], softmax=False)(onehot, ref)
    assert loss.item() == 0.0
    loss = BettiPriorLoss([1], priors={1: (1, 1, 0)}, target="prior", softmax=False)(onehot)
    assert loss.item() == 0.0
    # the wrong prior costs exactly one unit per missing/extra bar of persistence 1
    assert betti_prior_loss(onehot, {1: (1, 0, 0)}).item() == 1.0
    assert betti_prior_loss(onehot, {1: (2, 1, 1)}).item() == 2.0


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [(1, 0, 0), (2, 1, 1), (0, 0, 0)])
def test_gradient_reaches_exactly_birth_and_death_voxels(prior):
    p = smooth_probs((1, 2, 6, 6, 6), seed=11).requires_grad_(True)
    loss = betti_prior_loss(p, {1: prior})
    loss.backward()
    want = np.zeros((6, 6, 6))
    support = np.zeros((6, 6, 6), dtype=bool)
    for k, d in enumerate(persistence_diagrams(p[0, 1].detach())):
        pers = (d.births - d.deaths).numpy()
        sign = np.where(np.arange(len(pers)) < prior[k], -1.0, 1.0)
        bi, di = tuple(d.birth_index.T.numpy()), tuple(d.death_index.T.numpy())
        np.add.at(want, bi, 2 * sign * pers)
        np.add.at(want, di, -2 * sign * pers)
        support[bi] = True
        support[di] = True
        # every contributing bar moves its birth voxel (no cancellation on this input)
        assert (want[bi] != 0).all()
    grad = p.grad[0, 1].numpy()
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-15)
    assert not grad[~support].any()
    assert not p.grad[0, 0].any()


def test_gradcheck_2d():
    p = smooth_probs((1, 2, 6, 6), seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: betti_prior_loss(q, {1: (1, 1)}), (p,), eps=1e-7, atol=1e-6)


def test_gradient_through_module_softmax_and_downsample():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    loss = BettiPriorLoss([1, 2], priors={1: (1, 0, 0), 2: (1, 0, 0)}, target="prior", downsample=2)
    loss(logits).backward()
    g = logits.grad.abs().sum(dim=1)[0]
    # max-pooling routes the gradient to one voxel per 2x2x2 window at most
    assert 0 < int((g > 0).sum()) <= 4**3


# ---------------------------------------------------------------------------------------------
# targets: patch vs prior, downsampling, slices
# ---------------------------------------------------------------------------------------------


def test_patch_targets_of_a_cut_ring_differ_from_the_prior():
    torus = torus_mask()
    full = torch.from_numpy(torus.astype(np.int64))[None, None]
    assert betti_targets_from_labels(full, [1]).tolist() == [[[1, 1, 0]]]
    patch = full[..., :, :, :14]  # the patch border cuts the ring twice: one arc
    assert betti_targets_from_labels(patch, [1]).tolist() == [[[1, 0, 0]]]
    # the module in "patch" mode uses the patch's targets, in "prior" mode the whole-organ prior
    torch.manual_seed(0)
    sign = 2 * patch.float() - 1  # +1 inside the arc, -1 outside
    logits = 0.3 * torch.randn(1, 2, *patch.shape[2:]) + 4 * torch.cat([-sign, sign], 1)
    patch_loss = BettiPriorLoss([1])(logits, patch)
    prior_loss = BettiPriorLoss([1], priors={1: (1, 1, 0)}, target="prior")(logits, patch)
    probs = torch.softmax(logits, 1)
    assert patch_loss.item() == pytest.approx(betti_prior_loss(probs, {1: (1, 0, 0)}).item(), rel=1e-6)
    assert prior_loss.item() == pytest.approx(betti_prior_loss(probs, {1: (1, 1, 0)}).item(), rel=1e-6)
    assert patch_loss.item() < 0.1  # a good prediction of the arc
    assert prior_loss.item() > 0.9  # the prior asks for a tunnel the patch cannot show


def test_targets_per_sample_and_class():
    lab = np.zeros((2, 1, 10, 10, 10), dtype=np.int64)
    lab[0, 0, 1:4, 1:4, 1:4] = 1
    lab[0, 0, 6:9, 6:9, 6:9] = 1
    lab[1, 0, 2:8, 2:8, 2:8] = 2
    lab[1, 0, 4, 4, 4] = 0  # cavity
    tb = betti_targets_from_labels(torch.from_numpy(lab), [1, 2])
    assert tb.dtype == torch.int64 and tb.tolist() == [[[2, 0, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 1]]]
    # 2x max-pooling closes the one-voxel cavity, the same on both sides of the loss
    assert betti_targets_from_labels(torch.from_numpy(lab), [2], downsample=2)[1, 0].tolist() == [1, 0, 0]


def test_max_pool_keeps_a_thin_ring():
    n = 24
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    ring = (np.abs(np.hypot(y, x) - 8) < 0.6)  # one pixel wide
    lab = torch.from_numpy(ring.astype(np.int64))[None, None]
    assert betti_targets_from_labels(lab, [1]).tolist() == [[[1, 1]]]
    assert betti_targets_from_labels(lab, [1], downsample=2).tolist() == [[[1, 1]]]
    # the probability map pooled the same way keeps persistence ~1 for that ring; avg-pooling would not
    p = torch.from_numpy(ring.astype(float))[None, None]
    d = persistence_diagrams(max_pool_downsample(p, 2)[0, 0])
    assert (d[1].births - d[1].deaths).tolist() == [1.0]
    d_avg = persistence_diagrams(F.avg_pool2d(p, 2)[0, 0])
    assert all(q <= 0.5 for q in (d_avg[1].births - d_avg[1].deaths).tolist())


def test_module_downsample_equals_functional_on_pooled_maps():
    lab = np.zeros((1, 1, 12, 12, 12), dtype=np.int64)
    lab[0, 0, 2:10, 2:10, 2:10] = 1
    lab[0, 0, 4:8, 4:8, :] = 0  # a tunnel: b = (1, 1, 0)
    target = torch.from_numpy(lab)
    logits = torch.randn(1, 2, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    got = BettiPriorLoss([1], downsample=2)(logits, target)
    pooled = max_pool_downsample(torch.softmax(logits, 1), 2)
    tb = betti_targets_from_labels(target, [1], downsample=2)
    assert tb.tolist() == [[[1, 1, 0]]]
    assert got.item() == pytest.approx(betti_prior_loss(pooled, tb, class_ids=[1]).item(), rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_slice_mode_equals_sum_of_2d_losses(axis):
    p = smooth_probs((2, 2, 6, 7, 5), seed=9).requires_grad_(True)
    S = p.shape[2 + axis % 3]
    rng = np.random.default_rng(0)
    tb = rng.integers(0, 3, size=(2, 1, S, 2))
    tb[0, 0, 1] = -1  # skipped slice
    got = betti_prior_loss(p, torch.from_numpy(tb), class_ids=[1], slice_axis=axis)
    got.backward()
    want = 0.0
    q = p.detach().clone().requires_grad_(True)
    for b in range(2):
        for s in range(S):
            if tb[b, 0, s, 0] < 0:
                continue
            sl = q.select(2 + axis % 3, s)[b:b + 1]  # (1, C, plane)
            want = want + betti_prior_loss(sl, {1: tuple(tb[b, 0, s])}) * 1 / 2
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    torch.testing.assert_close(p.grad, q.grad)


def test_slice_mode_prior_only_where_present_and_patch_targets():
    # a myocardium-like ring on slices 2..5 of 8 along axis 0, absent elsewhere
    n = 16
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    ring = np.abs(np.hypot(y, x) - 5) <= 1.2
    lab = np.zeros((1, 1, 8, n, n), dtype=np.int64)
    lab[0, 0, 2:6] = ring
    target = torch.from_numpy(lab)
    tb = betti_targets_from_labels(target, [1], slice_axis=0)
    assert tb.shape == (1, 1, 8, 2)
    assert tb[0, 0, :, 1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    onehot = torch.cat([1 - target, target], 1).double()
    # perfect prediction: 0 with both kinds of targets
    assert BettiPriorLoss([1], slice_axis=0, softmax=False)(onehot, target).item() == 0.0
    prior = BettiPriorLoss([1], priors={1: (1, 1)}, target="prior", slice_axis=0, softmax=False)
    assert prior(onehot).item() == 0.0
    # a prediction with a spurious blob on slice 7: "patch" mode penalises it (target (0, 0)),
    # the prior applies (1, 1) to it because the class is present there
    pred = onehot.clone()
    pred[0, 1, 7, 0:2, 0:2] = 1.0
    pred[0, 0, 7, 0:2, 0:2] = 0.0
    assert BettiPriorLoss([1], slice_axis=0, softmax=False)(pred, target).item() == pytest.approx(1.0)
    assert prior(pred).item() == pytest.approx(1.0)  # blob: b0 ok, the missing hole costs 1


# ---------------------------------------------------------------------------------------------
# zero, autocast, bad input
# ---------------------------------------------------------------------------------------------


def test_graph_connected_zero():
    logits = torch.zeros(2, 3, 6, 6, 6, requires_grad=True)  # uniform probabilities: no bars
    loss = BettiPriorLoss([1, 2], priors={1: (0, 0, 0), 2: (0, 0, 0)}, target="prior")(logits)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()
    # slice mode with the class absent everywhere: no slice to penalise
    p = torch.full((1, 2, 4, 5, 5), 0.5).requires_grad_(True)
    p2 = torch.cat([p[:, :1] + 0.3, p[:, 1:] - 0.3], 1)
    loss = betti_prior_loss(p2, {1: (1, 1)}, slice_axis=0)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert not p.grad.any()


def test_autocast_bfloat16_is_computed_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 8, 8, 8).bfloat16()
    module = BettiPriorLoss([1], priors={1: (1, 0, 0)}, target="prior")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(logits)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(module(logits.float()).item(), rel=1e-6)


def test_bad_input_raises():
    p = smooth_probs((1, 3, 5, 5, 5), seed=0)
    bad = p.clone()
    bad[0, 1, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        betti_prior_loss(bad, {1: (1, 0, 0)})
    with pytest.raises(ValueError, match="NaN or inf"):
        BettiPriorLoss([1], priors={1: (1, 0, 0)}, target="prior")(bad.log())
    with pytest.raises(ValueError, match=r"\(1, 3, 5\)"):
        betti_prior_loss(torch.rand(1, 3, 5), {1: (1,)})
    with pytest.raises(ValueError, match="unknown class id 3"):
        betti_prior_loss(p, {3: (1, 0, 0)})
    with pytest.raises(ValueError, match="unknown class id"):
        BettiPriorLoss([1, 2], priors={1: (1, 0, 0), 4: (1, 0, 0)}, target="prior")
    with pytest.raises(ValueError, match="unknown class id 5"):
        BettiPriorLoss([5])(torch.randn(1, 3, 5, 5, 5), torch.zeros(1, 1, 5, 5, 5))
    with pytest.raises(ValueError, match="expected 3"):
        betti_prior_loss(p, {1: (1, 0)})
    with pytest.raises(ValueError, match="expected 3"):
        BettiPriorLoss([1], priors={1: (1, 1)}, target="prior")(torch.randn(1, 3, 5, 5, 5))
    with pytest.raises(ValueError, match="expected 2"):
        BettiPriorLoss([1], priors={1: (1, 1, 0)}, target="prior", slice_axis=0)
    with pytest.raises(ValueError, match="non-negative ints"):
        betti_prior_loss(p, {1: (1, -1, 0)})
    with pytest.raises(ValueError, match="no prior given"):
        BettiPriorLoss([1, 2], priors={1: (1, 0, 0)}, target="prior")
    with pytest.raises(ValueError, match="needs priors"):
        BettiPriorLoss([1], target="prior")
    with pytest.raises(ValueError, match="target must be one of"):
        BettiPriorLoss([1], target="organ")
    with pytest.raises(ValueError, match="downsample"):
        BettiPriorLoss([1], downsample=0)
    with pytest.raises(ValueError, match="needs the reference"):
        BettiPriorLoss([1])(torch.randn(1, 3, 5, 5, 5))
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 5, 5\)"):
        BettiPriorLoss([1])(torch.randn(1, 3, 5, 5, 5), torch.zeros(1, 1, 4, 5, 5))
    with pytest.raises(ValueError, match="needs class_ids"):
        betti_prior_loss(p, torch.ones(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 1, 3\)"):
        betti_prior_loss(p, torch.ones(1, 2, 3, dtype=torch.long), class_ids=[1])
    with pytest.raises(TypeError):
        betti_prior_loss(p, torch.ones(1, 1, 3), class_ids=[1])
    with pytest.raises(ValueError, match="mixing"):
        betti_prior_loss(p, torch.tensor([[[1, -1, 0]]]), class_ids=[1])
    with pytest.raises(ValueError, match="slice_axis needs 3D"):
        betti_prior_loss(torch.rand(1, 2, 5, 5), {1: (1, 0)}, slice_axis=0)


# ---------------------------------------------------------------------------------------------
# sparse references: nnU-Net's ignore label
# ---------------------------------------------------------------------------------------------

IGNORE = 2  # nnU-Net: the ignore label is the highest id; the network has no channel for it


def _logits(dense):
    """Perfect prediction: 20 * one-hot of the dense reference (B, 1, *spatial) with labels {0, 1}."""
    return 20 * torch.cat([1 - dense, dense], 1).float()


def test_sparse_3d_patch_uses_the_prior_or_skips():
    dense = torch.from_numpy(torus_mask().astype(np.int64))[None, None]  # (1, 1, 12, 24, 24), b = (1, 1, 0)
    sparse = dense.clone()
    sparse[:, :, ::2] = IGNORE  # every other slice unknown
    logits = _logits(dense)
    # the bug: ignored voxels counted as background split the torus, a perfect prediction costs > 1
    assert BettiPriorLoss([1])(logits, sparse).item() > 1
    loss = BettiPriorLoss([1], priors={1: (1, 1, 0)}, ignore_label=IGNORE)
    assert loss(logits, sparse).item() <= 1e-4
    assert loss.last_counts == {"units": 1, "prior": 1, "skipped": 0}
    # the prior is a real target there: a prediction without the tunnel costs 1
    y, x = np.mgrid[:24, :24] - 11.5
    filled = dense.clone()
    filled[0, 0, 5:7][:, torch.from_numpy(np.hypot(y, x) <= 6)] = 1  # a disc closes the tunnel: (1, 0, 0)
    assert loss(_logits(filled), sparse).item() == pytest.approx(1.0, abs=1e-4)
    # without priors the unit is undefined: skipped, a graph-connected zero
    loss = BettiPriorLoss([1], ignore_label=IGNORE)
    x = logits.clone().requires_grad_(True)
    out = loss(x, sparse)
    assert out.item() == 0.0 and out.requires_grad
    assert loss.last_counts == {"units": 1, "prior": 0, "skipped": 1}
    # a fully annotated patch keeps its label targets
    assert loss(_logits(filled), dense).item() == pytest.approx(1.0, abs=1e-4)
    assert loss.last_counts == {"units": 1, "prior": 0, "skipped": 0}


def _ring_stack(n=16, slices=8, on=range(2, 6)):
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    ring = np.abs(np.hypot(y, x) - 5) <= 1.2
    lab = np.zeros((1, 1, slices, n, n), dtype=np.int64)
    lab[0, 0, list(on)] = ring
    return torch.from_numpy(lab)


def test_sparse_slice_mode_ignored_slices_prior_or_skip_annotated_slices_keep_labels():
    dense = _ring_stack()  # ring on slices 2..5 of 8
    sparse = dense.clone()
    sparse[:, :, 1::2] = IGNORE  # slices 1, 3, 5, 7 unknown; 0, 2, 4, 6 annotated
    logits = _logits(dense)
    assert BettiPriorLoss([1], slice_axis=0)(logits, sparse).item() > 1  # the bug: rings on 3, 5 "are background"
    no_prior = BettiPriorLoss([1], slice_axis=0, ignore_label=IGNORE)
    with_prior = BettiPriorLoss([1], priors={1: (1, 1)}, slice_axis=0, ignore_label=IGNORE)
    assert no_prior(logits, sparse).item() == 0.0
    assert no_prior.last_counts == {"units": 8, "prior": 0, "skipped": 4}
    assert with_prior(logits, sparse).item() <= 1e-4
    # slices 3 and 5 show the ring: prior; slices 1 and 7 show nothing: skipped
    assert with_prior.last_counts == {"units": 8, "prior": 2, "skipped": 2}
    # annotated slices keep their label targets: a ring broken on slice 2 costs 1 (b1 target 1) ...
    broken = dense.clone()
    broken[0, 0, 2, :8, 7:9] = 0  # one cut: an arc
    for loss in (no_prior, with_prior):
        assert loss(_logits(broken), sparse).item() == pytest.approx(1.0, abs=1e-4)
    # ... and a blob on the empty annotated slice 6 costs 1 (target (0, 0))
    blob = dense.clone()
    blob[0, 0, 6, 7:9, 7:9] = 1
    assert no_prior(_logits(blob), sparse).item() == pytest.approx(1.0, abs=1e-4)
    # the same break on the ignored slice 3: the prior asks for the ring, without a prior it is skipped
    broken3 = dense.clone()
    broken3[0, 0, 3, :8, 7:9] = 0
    assert with_prior(_logits(broken3), sparse).item() == pytest.approx(1.0, abs=1e-4)
    assert no_prior(_logits(broken3), sparse).item() == 0.0


def test_sparse_structure_touching_the_border_is_skipped_not_given_the_prior():
    arc = torch.from_numpy(torus_mask().astype(np.int64))[None, None][..., :14]  # the patch border cuts the ring
    sparse = arc.clone()
    sparse[:, :, ::2] = IGNORE
    loss = BettiPriorLoss([1], priors={1: (1, 1, 0)}, ignore_label=IGNORE)
    assert loss(_logits(arc), sparse).item() == 0.0  # the prior (1, 1, 0) would cost 1 on the arc
    assert loss.last_counts == {"units": 1, "prior": 0, "skipped": 1}
    # a structure in view in the reference but predicted touching the border: skipped too
    dense = torch.from_numpy(torus_mask().astype(np.int64))[None, None]
    sparse = dense.clone()
    sparse[:, :, ::2] = IGNORE
    pred = dense.clone()
    pred[0, 0, 5:7, 0:2, 0:2] = 1  # a blob at the patch edge
    assert loss(_logits(pred), sparse).item() == 0.0
    assert loss.last_counts["skipped"] == 1
    # slice mode: the in-plane border of the slice decides; the slice axis is not a border
    ring = _ring_stack(on=range(8))  # ring on every slice, so the first and last slices too
    cut = ring[..., :10]  # rings cut by the in-plane border: arcs
    for lab, prior_used in ((ring, 4), (cut, 0)):
        sparse = lab.clone()
        sparse[:, :, 1::2] = IGNORE
        loss = BettiPriorLoss([1], priors={1: (1, 1)}, slice_axis=0, ignore_label=IGNORE)
        assert loss(_logits(lab), sparse).item() <= 1e-4
        assert loss.last_counts == {"units": 8, "prior": prior_used, "skipped": 4 - prior_used}


@pytest.mark.parametrize("slice_axis", [None, 1])
@pytest.mark.parametrize("downsample", [1, 2])
def test_ignore_label_none_or_absent_gives_the_old_values(slice_axis, downsample):
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 8, 9, 7, requires_grad=True)
    lab = torch.from_numpy(ndimage.zoom(np.random.default_rng(3).integers(0, 3, (2, 1, 4, 5, 4)), (1, 1, 2, 2, 2),
                                        order=0)[..., :8, :9, :7])
    kw = {"class_ids": [1, 2], "priors": {1: (1, 0), 2: (0, 0)} if slice_axis is not None else None,
          "downsample": downsample, "slice_axis": slice_axis}
    old = BettiPriorLoss(**kw)
    want = old(logits, lab)
    (g_want,) = torch.autograd.grad(want, logits)
    for ignore_label in (None, 3):  # None, or an ignore label absent from the reference
        new = BettiPriorLoss(**kw, ignore_label=ignore_label)
        got = new(logits, lab)
        (g_got,) = torch.autograd.grad(got, logits)
        assert got.item() == want.item()
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
        assert new.last_counts["prior"] == new.last_counts["skipped"] == 0
        assert new.last_counts["units"] == (4 if slice_axis is None else 2 * 2 * 9)


def test_ignore_label_validation_and_counts_in_a_mixed_batch():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="ignore_label"):
            BettiPriorLoss([1], ignore_label=bad)
    with pytest.raises(ValueError, match="ignore_label 1 cannot be one of the class_ids"):
        BettiPriorLoss([1], ignore_label=1)
    # sample 0 fully annotated (label targets), sample 1 sparse (prior)
    dense = torch.from_numpy(torus_mask().astype(np.int64))[None, None].repeat(2, 1, 1, 1, 1)
    sparse = dense.clone()
    sparse[1, :, ::2] = IGNORE
    loss = BettiPriorLoss([1], priors={1: (1, 1, 0)}, ignore_label=IGNORE)
    assert loss.last_counts is None
    assert loss(_logits(dense), sparse).item() <= 1e-4
    assert loss.last_counts == {"units": 2, "prior": 1, "skipped": 0}


def test_trainer_passes_ignore_label_and_priors_and_logs_the_counts():
    from types import SimpleNamespace

    from nnunet_topo.losses.combined import TopologyLossWrapper
    from nnunet_topo.topology_spec import default_topology

    nnUNetTrainerBetti = pytest.importorskip("nnunet_topo.trainers.nnUNetTrainerBetti").nnUNetTrainerBetti  # nnunetv2

    class Trainer(nnUNetTrainerBetti):
        betti_downsample = 1
        betti_every = 2

    t = Trainer.__new__(Trainer)  # no plans or data needed for the loss wiring
    with pytest.warns(UserWarning, match="no 'topology' block"):
        t.topology_spec = default_topology({"background": 0, "ring": 1, "ignore": IGNORE})
    t.label_manager = SimpleNamespace(ignore_label=IGNORE, foreground_labels=[1])
    t._topology_term_names = ("betti",)
    logged = []
    t.print_to_log_file = lambda *a, **k: logged.append(" ".join(map(str, a)))
    terms = t.build_topology_terms()
    inner = terms["betti"][0].module
    assert isinstance(inner, BettiPriorLoss)
    assert inner.ignore_label == IGNORE and inner.priors == {1: (1, 0, 0)} and inner.class_ids == [1]
    assert set(t.extra_logged_term_names()) == {"betti_skipped", "betti_prior_used"}
    assert inner.downsample == 1 and inner.num_workers >= 1 and "persistence thread" in logged[0]

    class Zero(torch.nn.Module):
        def forward(self, output, target):
            return output.sum() * 0.0

    t.loss = TopologyLossWrapper(Zero(), terms)
    dense = torch.from_numpy(torus_mask().astype(np.int64))[None, None]
    sparse = dense.clone()
    sparse[:, :, ::2] = IGNORE
    cut = sparse[..., :14].contiguous()  # the arc touches the border: skipped
    logits = _logits(dense).requires_grad_(True)
    t.loss(logits, sparse)
    v = t._pop_term_values("train")
    assert (v["train_betti_prior_used"], v["train_betti_skipped"]) == (1.0, 0.0)
    t.loss(logits, sparse)  # betti_every = 2: the term does not run on this step
    v = t._pop_term_values("train")
    assert np.isnan(v["train_betti_skipped"]) and np.isnan(v["train_betti_prior_used"])
    with torch.no_grad():  # validation always evaluates
        t.loss(_logits(dense[..., :14]), cut)
    v = t._pop_term_values("val")
    assert (v["val_betti_prior_used"], v["val_betti_skipped"]) == (0.0, 1.0)


def test_default_downsampling_bounds_the_pooled_map():
    """The trainer's default factor: the smallest whose pooled map has at most 32^3 voxels, for any planned patch."""
    from nnunet_topo.losses.betti import DEFAULT_MAX_POOLED_VOXELS, betti_downsample_for_patch

    for patch, expected in (((128, 128, 128), 4), ((10, 256, 224), 3), ((10, 64, 64), 2), ((20, 20, 20), 1)):
        f = betti_downsample_for_patch(patch)
        assert f == expected, patch
        assert np.prod([-(-n // f) for n in patch]) <= DEFAULT_MAX_POOLED_VOXELS
        assert f == 1 or np.prod([-(-n // (f - 1)) for n in patch]) > DEFAULT_MAX_POOLED_VOXELS  # smallest
    assert betti_downsample_for_patch((10, 256, 224), slice_axis=0) == 5  # slices are not pooled
    with pytest.raises(ValueError, match="patch_size"):
        betti_downsample_for_patch((0, 4, 4))


def test_persistence_workers_leave_the_reserved_cores():
    from nnunet_topo.persistence import persistence_workers

    cores = len(os.sched_getaffinity(0))
    assert persistence_workers(0) == cores
    assert persistence_workers(cores + 5) == 1


# ---------------------------------------------------------------------------------------------
# allowed sets of Betti vectors (betti_2d [[1, 1], [1, 0]]): the loss is the min over the set
# ---------------------------------------------------------------------------------------------


def _ring_and_c(slices=7):
    """(1, 1, 7, 16, 16) label map: a ring (1, 1) on slices 1..3, an open "C" (1, 0) on slices 4..5."""
    lab = _ring_stack(slices=slices, on=range(1, 6))
    lab[0, 0, 4:6, :8, 7:9] = 0  # one cut: an arc
    return lab


def test_allowed_set_is_the_min_over_single_vector_losses_per_slice():
    p = smooth_probs((2, 3, 6, 9, 9), seed=21)
    allowed = {1: ((1, 1), (1, 0), (2, 0)), 2: ((0, 0), (1, 1))}
    got = betti_prior_loss(p, allowed, slice_axis=0)
    # independently: per present slice, the naive loop's loss for each allowed vector, the smallest of them
    want, chosen = 0.0, np.full((2, 2, 6, 2), -1)
    for b in range(2):
        for k, (c, vecs) in enumerate(allowed.items()):
            for s in range(6):
                sl = p[b:b + 1, :, s]
                if sl[0, c].max() <= 0.5:
                    continue
                values = [naive_loss(sl, {(0, c): list(v)}) for v in vecs]
                want += min(values) / 2
                chosen[b, k, s] = vecs[int(np.argmin(values))]
    assert want > 0 and (chosen[..., 0] >= 0).sum() >= 4  # enough slices to compare
    assert got.item() == pytest.approx(want, rel=1e-9)
    # never above any single vector's loss, strictly below one of them here
    singles = [betti_prior_loss(p, {1: a, 2: b}, slice_axis=0).item() for a in allowed[1] for b in allowed[2]]
    assert got.item() <= min(singles) + 1e-12
    # the gradient is that of the nearest vector's loss (per-slice tensor targets = the chosen vectors)
    q1, q2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    betti_prior_loss(q1, allowed, slice_axis=0).backward()
    betti_prior_loss(q2, torch.from_numpy(chosen), class_ids=[1, 2], slice_axis=0).backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-12, atol=1e-12)
    assert q1.grad.abs().sum() > 0


def test_allowed_set_in_3d_is_the_min_per_sample():
    p = smooth_probs((2, 2, 7, 7, 7), seed=4)
    allowed = ((1, 0, 0), (2, 1, 0), (0, 3, 1))
    want = sum(min(naive_loss(p[b:b + 1], {(0, 1): list(v)}) for v in allowed) for b in range(2)) / 2
    assert betti_prior_loss(p, {1: allowed}).item() == pytest.approx(want, rel=1e-9)
    # a 1-element set is the vector
    assert betti_prior_loss(p, {1: ((1, 0, 0),)}).item() == betti_prior_loss(p, {1: (1, 0, 0)}).item()


def test_allowed_set_is_zero_where_a_slice_matches_any_vector_and_positive_where_none():
    lab = _ring_and_c()
    onehot = torch.cat([1 - lab, lab], 1).double()

    def loss(prior):
        return BettiPriorLoss([1], priors={1: prior}, target="prior", slice_axis=0, softmax=False)(onehot).item()
    assert loss(((1, 1), (1, 0))) == 0.0
    assert loss(((1, 0), (1, 1))) == 0.0  # order does not matter
    assert loss((1, 1)) == 2.0  # the two "C" slices each miss a hole
    assert loss(((1, 0),)) == 3.0  # the three rings each have one hole too many
    # neither (2, 0) nor (0, 1) matches: every slice pays its distance to the nearest (1 each), not a sum
    assert loss(((2, 0), (0, 1))) == 5.0


def test_a_gradient_step_lowers_the_allowed_set_loss():
    lab = _ring_and_c()
    noise = torch.from_numpy(ndimage.gaussian_filter(np.random.default_rng(2).standard_normal((1, 2, 7, 16, 16)),
                                                     [0, 0, 0, 1, 1]) * 6)
    logits = (2.0 * torch.cat([1 - lab, lab], 1).double() + noise).requires_grad_(True)
    module = BettiPriorLoss([1], priors={1: ((1, 1), (1, 0))}, target="prior", slice_axis=0)
    before = module(logits)
    before.backward()
    assert before.item() > 0.1 and logits.grad.abs().max() > 0
    with torch.no_grad():
        after = module(logits - 0.05 * logits.grad / logits.grad.abs().max())
    assert after.item() < before.item()


def test_allowed_set_priors_of_sparse_slices():
    dense = _ring_and_c(slices=8)  # ring on 1..3, "C" on 4..5
    sparse = dense.clone()
    sparse[:, :, 1::2] = IGNORE  # slices 1, 3, 5, 7 unknown: 3 (ring) and 5 (C) get the prior, 1 too, 7 skipped
    logits = _logits(dense)
    with_set = BettiPriorLoss([1], priors={1: ((1, 1), (1, 0))}, slice_axis=0, ignore_label=IGNORE)
    assert with_set(logits, sparse).item() <= 1e-4
    assert with_set.last_counts == {"units": 8, "prior": 3, "skipped": 1}
    ring_only = BettiPriorLoss([1], priors={1: (1, 1)}, slice_axis=0, ignore_label=IGNORE)
    assert ring_only(logits, sparse).item() == pytest.approx(1.0, abs=1e-4)  # the ignored "C" slice 5


def test_allowed_set_attributes_and_bad_sets():
    m = BettiPriorLoss([1, 2], priors={1: [[1, 1], [1, 0]], 2: (1, 0)}, target="prior", slice_axis=0)
    assert m.priors == {1: ((1, 1), (1, 0)), 2: (1, 0)}
    assert m.prior_sets == {1: ((1, 1), (1, 0)), 2: ((1, 0),)}
    p = smooth_probs((1, 2, 5, 5, 5), seed=0)
    with pytest.raises(ValueError, match="prior of class 1 is empty"):
        betti_prior_loss(p, {1: ()})
    with pytest.raises(ValueError, match="must be distinct"):
        BettiPriorLoss([1], priors={1: ((1, 1), (1, 1))}, target="prior", slice_axis=0)
    with pytest.raises(ValueError, match="expected 2"):
        BettiPriorLoss([1], priors={1: ((1, 1), (1, 0, 0))}, target="prior", slice_axis=0)
    with pytest.raises(ValueError, match="differ in length"):
        BettiPriorLoss([1], priors={1: ((1, 0, 0), (1, 0))}, target="prior")
    with pytest.raises(ValueError, match="non-negative ints"):
        betti_prior_loss(p, {1: ((1, 0, 0), (1, -1, 0))})
