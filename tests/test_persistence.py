"""Super-level cubical persistence: cripser's output format, barcodes against an independent Betti
number implementation (nnunet_topo.metrics.topology), known shapes, gradients and bad input."""
import numpy as np
import pytest
import torch
from scipy import ndimage

cripser = pytest.importorskip("cripser")

from nnunet_topo.metrics.topology import betti_numbers_2d, betti_numbers_3d  # noqa: E402
from nnunet_topo.persistence import (  # noqa: E402
    Diagram,
    batch_persistence_diagrams,
    map_persistence_pairs,
    persistence_diagrams,
    persistence_pairs,
)


def smooth_field(shape, seed, sigma=1.0):
    """Gaussian-smoothed uniform noise rescaled to [0, 1] (float64, distinct values)."""
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return (a - a.min()) / (a.max() - a.min())


def thresholds(p, n=12):
    """Levels strictly above min(p): some values of p itself and some midpoints between values."""
    v = np.unique(p)
    rng = np.random.default_rng(0)
    picks = rng.choice(np.arange(1, len(v)), size=n // 2, replace=False)
    mids = rng.choice(np.arange(1, len(v)), size=n // 2, replace=False)
    return sorted(set(v[picks].tolist() + ((v[mids] + v[mids - 1]) / 2).tolist()))


def alive(diagram: Diagram, t: float) -> int:
    """Number of bars alive at level t of the super-level filtration: birth >= t > death."""
    return int(((diagram.births >= t) & (diagram.deaths < t)).sum())


# ---------------------------------------------------------------------------------------------
# cripser's T-construction output (what persistence.py relies on)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 12), (7, 13), (8, 8, 8), (9, 6, 5)])
def test_cripser_t_output_columns(shape):
    for seed in range(5):
        a = smooth_field(shape, seed)
        ph = cripser.computePH_T(a, maxdim=len(shape) - 1)
        nd = len(shape)
        assert ph.ndim == 2 and ph.shape[1] == 9
        bc = ph[:, 3:3 + nd].astype(int)
        dc = ph[:, 6:6 + nd].astype(int)
        if nd == 2:  # the unused third coordinate is 0 for births
            assert (ph[:, 5] == 0).all()
        # birth/death coordinates are voxel indices whose value IS the birth/death value
        np.testing.assert_array_equal(a[tuple(bc.T)], ph[:, 1])
        essential = ph[:, 2] > 1e300
        np.testing.assert_array_equal(a[tuple(dc[~essential].T)], ph[~essential, 2])
        # exactly one essential class, in dimension 0, with death coordinates -1
        assert essential.sum() == 1 and ph[essential, 0][0] == 0
        assert (ph[essential, 6:6 + nd] == -1).all()


# ---------------------------------------------------------------------------------------------
# barcodes against an independent reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,sigma", [((8, 8, 8), 1.0), ((8, 8, 8), 0.6), ((6, 9, 7), 1.0), ((10, 10, 10), 1.5)]
)
@pytest.mark.parametrize("seed", range(4))
def test_alive_bars_equal_betti_numbers_3d(shape, sigma, seed):
    p = smooth_field(shape, seed, sigma)
    diagrams = persistence_diagrams(torch.from_numpy(p))
    assert len(diagrams) == 3
    for t in thresholds(p):
        want = betti_numbers_3d(p >= t)
        got = tuple(alive(d, t) for d in diagrams)
        assert got == want, f"t={t}: barcode {got} vs Betti numbers {want}"


@pytest.mark.parametrize("shape,sigma", [((12, 12), 1.0), ((12, 12), 0.6), ((7, 13), 1.0)])
@pytest.mark.parametrize("seed", range(6))
def test_alive_bars_equal_betti_numbers_2d(shape, sigma, seed):
    p = smooth_field(shape, seed, sigma)
    diagrams = persistence_diagrams(torch.from_numpy(p))
    assert len(diagrams) == 2
    for t in thresholds(p):
        assert tuple(alive(d, t) for d in diagrams) == betti_numbers_2d(p >= t)


def test_bars_sorted_positive_and_essential_bar_ends_at_min():
    p = torch.from_numpy(smooth_field((8, 8, 8), 3))
    d0, d1, d2 = persistence_diagrams(p)
    for d in (d0, d1, d2):
        pers = d.births - d.deaths
        assert (pers > 0).all()
        assert (pers[:-1] >= pers[1:]).all()
        # births/deaths are the map's values at the reported voxels
        assert torch.equal(d.births, p[tuple(d.birth_index.T)])
        assert torch.equal(d.deaths, p[tuple(d.death_index.T)])
    # the essential bar: global max to global min (the longest bar)
    assert d0.births[0] == p.max() and d0.deaths[0] == p.min()
    assert tuple(d0.death_index[0].tolist()) == np.unravel_index(int(p.argmin()), p.shape)


def ring_2d(n=20, r=6.0, width=1.5, sigma=0.8):
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    ring = (np.abs(np.hypot(y, x) - r) <= width / 2 + 0.5).astype(float)
    return ndimage.gaussian_filter(ring, sigma)


def test_blurred_ring_has_one_long_dim1_bar():
    p = torch.from_numpy(ring_2d())
    d0, d1 = persistence_diagrams(p)
    pers1 = (d1.births - d1.deaths).tolist()
    assert pers1[0] > 0.3 and all(q < 0.05 for q in pers1[1:])
    # one long component bar (the digitised ridge has small dips, hence short extra dim-0 bars)
    pers0 = (d0.births - d0.deaths).tolist()
    assert pers0[0] > 0.3 and all(q < 0.3 for q in pers0[1:])


def test_blurred_hollow_sphere_has_one_long_dim2_bar():
    n = 16
    z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2
    shell = (np.abs(np.sqrt(z**2 + y**2 + x**2) - 5) <= 1.0).astype(float)
    p = torch.from_numpy(ndimage.gaussian_filter(shell, 0.7))
    d0, d1, d2 = persistence_diagrams(p)
    pers2 = (d2.births - d2.deaths).tolist()
    assert pers2[0] > 0.3 and all(q < 0.05 for q in pers2[1:])
    assert all(q < 0.05 for q in (d1.births - d1.deaths).tolist())
    assert (d0.births - d0.deaths)[0] > 0.3


def test_constant_and_binary_maps():
    assert all(len(d.births) == 0 for d in persistence_diagrams(torch.full((5, 5, 5), 0.3)))
    # a 0/1 mask: bars are exactly its Betti numbers, each from 1 down to 0
    m = np.zeros((9, 9, 9))
    m[2:7, 2:7, 2:7] = 1
    m[4, 4, 4] = 0  # a cavity
    m[0, 0, 0] = 1  # a second component
    ds = persistence_diagrams(torch.from_numpy(m))
    assert tuple(len(d.births) for d in ds) == betti_numbers_3d(m) == (2, 0, 1)
    for d in ds:
        assert (d.births == 1).all() and (d.deaths == 0).all()


# ---------------------------------------------------------------------------------------------
# gradients, dtypes, batches
# ---------------------------------------------------------------------------------------------


def test_gradients_reach_only_birth_and_death_voxels():
    p = torch.from_numpy(smooth_field((6, 6, 6), 1)).requires_grad_(True)
    diagrams = persistence_diagrams(p)
    total = sum((d.births - 2 * d.deaths).sum() for d in diagrams)
    total.backward()
    want = np.zeros(p.shape)
    for d in diagrams:
        np.add.at(want, tuple(d.birth_index.T.numpy()), 1.0)
        np.add.at(want, tuple(d.death_index.T.numpy()), -2.0)
    np.testing.assert_allclose(p.grad.numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    p16 = torch.from_numpy(smooth_field((7, 7, 7), 2)).to(dtype)
    got = persistence_diagrams(p16)
    want = persistence_diagrams(p16.float())
    for g, w in zip(got, want):
        assert g.births.dtype == torch.float32
        assert torch.equal(g.births, w.births) and torch.equal(g.deaths, w.deaths)


@pytest.mark.parametrize("executor,workers", [("thread", 3), ("thread", 1), ("process", 2)])
def test_batch_equals_single_maps(executor, workers):
    torch.manual_seed(0)
    p = torch.from_numpy(np.stack([np.stack([smooth_field((7, 8, 6), 10 * b + c) for c in range(3)])
                                   for b in range(2)])).float().requires_grad_(True)
    out = batch_persistence_diagrams(p, classes=[2, 0], num_workers=workers, executor=executor)
    assert len(out) == 2 and len(out[0]) == 2 and len(out[0][0]) == 3
    for b in range(2):
        for i, c in enumerate([2, 0]):
            for got, want in zip(out[b][i], persistence_diagrams(p[b, c])):
                assert torch.equal(got.births, want.births) and torch.equal(got.deaths, want.deaths)
                assert torch.equal(got.birth_index, want.birth_index)
    out[1][0][0].births.sum().backward()
    assert p.grad[1, 2].abs().sum() > 0 and p.grad[0].abs().sum() == 0


def test_maxdim_and_pairs_helper():
    a = smooth_field((9, 9), 4)
    assert len(persistence_diagrams(torch.from_numpy(a), maxdim=0)) == 1
    pairs = persistence_pairs(a)
    np.testing.assert_array_equal(a.reshape(-1)[pairs[1].birth_flat], pairs[1].births)
    again = map_persistence_pairs([a, a], maxdim=1, num_workers=2)
    for pr, pr2 in zip(again[1], pairs):
        np.testing.assert_array_equal(pr.birth_flat, pr2.birth_flat)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises():
    good = torch.rand(5, 5, 5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = good.clone()
        x[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            persistence_diagrams(x)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        persistence_diagrams(torch.rand(5))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
        persistence_diagrams(torch.rand(2, 3, 4, 5))
    with pytest.raises(TypeError):
        persistence_diagrams(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="maxdim"):
        persistence_diagrams(good, maxdim=3)
    with pytest.raises(ValueError, match=r"\(5, 5, 5\)"):
        batch_persistence_diagrams(good, classes=[0])
    with pytest.raises(ValueError, match="channel"):
        batch_persistence_diagrams(torch.rand(1, 2, 4, 4), classes=[2])
    with pytest.raises(ValueError, match="executor"):
        map_persistence_pairs([good.numpy()], maxdim=2, executor="gpu")


def test_cripser_releases_the_gil():
    """The reason batch_persistence_diagrams uses threads: another Python thread keeps running while
    cripser computes (a GIL-holding call would stall it for the whole call)."""
    import threading
    import time

    a = -smooth_field((64, 64, 64), 0, sigma=2.0)
    result = {}

    def work():
        t = time.perf_counter()
        cripser.computePH_T(a, maxdim=2)
        result["call"] = time.perf_counter() - t

    worker = threading.Thread(target=work)
    last, max_gap = time.perf_counter(), 0.0
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        max_gap, last = max(max_gap, now - last), now
    worker.join()
    assert result["call"] > 0.05
    assert max_gap < 0.5 * result["call"], (max_gap, result["call"])
