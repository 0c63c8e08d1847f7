"""Projected pooling loss: naive loop reference, gradcheck, bad input."""
import itertools
import math

import pytest
import torch

from nnunet_topo.losses.projected_pooling import ProjectedPoolingLoss, projected_pooling_loss


def naive_projected_pooling(p, g, kernel_sizes, include_background=True):
    """Explicit loops: projections by max over one axis, pooling windows enumerated one by one."""
    B, C = p.shape[:2]
    spatial = p.shape[2:]
    c0 = 0 if include_background else 1
    terms = []
    for axis in range(len(spatial)):
        plane = [s for a, s in enumerate(spatial) if a != axis]
        for k in kernel_sizes:
            win = [min(k, s) for s in plane]
            nwin = [math.ceil((s - w) / w) + 1 for s, w in zip(plane, win)]
            total, count = 0.0, 0
            for b in range(B):
                for c in range(c0, C):
                    proj_p = p[b, c].amax(dim=axis)
                    proj_g = g[b, c].amax(dim=axis)
                    for idx in itertools.product(*[range(n) for n in nwin]):
                        sl = tuple(slice(i * w, min(i * w + w, s)) for i, w, s in zip(idx, win, plane))
                        total += abs(float(proj_p[sl].max()) - float(proj_g[sl].max()))
                        count += 1
            terms.append(total / count)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("shape,kernels,bg", [
    ((2, 3, 6, 7, 9), (4, 5, 8, 10, 20), False),
    ((1, 4, 5, 5, 5), (2, 3), True),
    ((2, 3, 11, 13), (4, 5, 8), False),  # 2D input: 1D profiles
    ((1, 2, 24, 9, 30), (4, 5, 8, 10, 20), False),
])
def test_matches_naive_loop(shape, kernels, bg):
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(shape, dtype=torch.float64), dim=1)
    lab = torch.randint(0, shape[1], (shape[0], 1) + shape[2:])
    g = torch.zeros(shape, dtype=torch.float64).scatter_(1, lab, 1.0)
    got = projected_pooling_loss(p, g, kernels, include_background=bg)
    want = naive_projected_pooling(p, g, kernels, include_background=bg)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_module_equals_functional_and_perfect_prediction_is_zero():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = ProjectedPoolingLoss()(logits, target)
    onehot = torch.zeros_like(logits).scatter_(1, target, 1.0)
    assert loss.item() == pytest.approx(projected_pooling_loss(torch.softmax(logits, 1), onehot).item(), rel=1e-6)
    # a one-hot "probability" map equal to the reference gives exactly 0
    perfect = ProjectedPoolingLoss(softmax=False)(onehot, target)
    assert perfect.item() == 0.0


def test_gradcheck():
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (1, 1, 5, 6, 7))
    onehot = torch.zeros(1, 3, 5, 6, 7, dtype=torch.float64).scatter_(1, target, 1.0)

    def f(x):
        return projected_pooling_loss(torch.softmax(x, 1), onehot, (2, 3), include_background=False).double()

    # the loss computes in float32 internally; check the float64 path of the functional directly
    def f64(x):
        p = torch.softmax(x, 1)
        terms = []
        for axis in range(2, 5):
            for k in (2, 3):
                pp = torch.nn.functional.max_pool2d(p[:, 1:].amax(axis), k, k, ceil_mode=True)
                gp = torch.nn.functional.max_pool2d(onehot[:, 1:].amax(axis), k, k, ceil_mode=True)
                terms.append((pp - gp).abs().mean())
        return torch.stack(terms).mean()

    assert f(logits).item() == pytest.approx(f64(logits).item(), rel=1e-5)
    assert torch.autograd.gradcheck(f64, (logits,), eps=1e-6, atol=1e-5)


def test_gradcheck_module_float64_path():
    """gradcheck through the public functional with float64 inputs (the function casts to float32)."""
    torch.manual_seed(3)
    x = torch.randn(1, 2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(1, 2, 4, 5, 6, dtype=torch.float64)
    g[:, 1, 1:3, 1:4, 2:5] = 1
    g[:, 0] = 1 - g[:, 1]
    loss = projected_pooling_loss(torch.sigmoid(x), g, (2, 4))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ignore_label_masks_voxels():
    logits = torch.full((1, 2, 4, 4, 4), -5.0)
    logits[:, 0] = 5.0  # predicts background everywhere
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[..., 0, 0, 0] = 2  # ignore label 2 marks the only disagreement -> zero loss
    assert ProjectedPoolingLoss(ignore_label=2)(logits, target).item() < 1e-4
    target[..., 0, 0, 0] = 1
    assert ProjectedPoolingLoss(ignore_label=2)(logits, target).item() > 0.1


@pytest.mark.parametrize("kwargs,inp,tgt,match", [
    ({}, torch.zeros(2, 3, 4, 4, 4), torch.zeros(2, 1, 4, 4, 5), "target must be a label map"),
    ({}, torch.zeros(2, 3, 4, 4, 4), torch.full((2, 1, 4, 4, 4), 3), "label ids must lie"),
    ({}, torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), "input must be"),
    ({}, torch.full((1, 2, 3, 3, 3), float("nan")), torch.zeros(1, 1, 3, 3, 3), "NaN"),
])
def test_bad_input(kwargs, inp, tgt, match):
    with pytest.raises(ValueError, match=match):
        ProjectedPoolingLoss(**kwargs)(inp, tgt)


@pytest.mark.parametrize("kernels", [(), (0,), (2.5,), 4])
def test_bad_kernels(kernels):
    with pytest.raises(ValueError, match="kernel_sizes"):
        ProjectedPoolingLoss(kernel_sizes=kernels)
