"""Test-time refinement: planted topological defects are repaired while few voxels change."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_topo.metrics.topology import betti_numbers_3d, betti_numbers_per_slice
from nnunet_topo.refine import RefinementError, build_prior_losses, refine_logits, topology_errors


class FixedLogits(nn.Module):
    """A 'network' whose output is a learnable logit map (ignores its input): refinement acts on it directly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits


def logits_from_labels(lab, strength=4.0, weak=None):
    C = int(lab.max()) + 1
    onehot = np.eye(C)[lab].transpose(3, 0, 1, 2)
    lg = torch.tensor((onehot * 2 - 1) * strength, dtype=torch.float32)[None]
    if weak is not None:  # voxels where the network was unsure: small margins
        for c in range(C):
            lg[0, c][torch.from_numpy(weak)] *= 0.25
    return lg


def test_extra_component_is_removed():
    lab = np.zeros((12, 16, 16), np.int64)
    zz, yy, xx = np.ogrid[:12, :16, :16]
    lab[(zz - 6) ** 2 + (yy - 7) ** 2 + (xx - 7) ** 2 <= 16] = 1
    blob = np.zeros_like(lab, bool)
    blob[9:11, 12:14, 12:14] = True  # spurious second component
    lab[blob] = 1
    assert betti_numbers_3d(lab == 1) == (2, 0, 0)
    net = FixedLogits(logits_from_labels(lab, weak=blob))
    losses = build_prior_losses({1: (1, 0, 0)}, {}, None)
    before, after, hist = refine_logits(net, torch.zeros(1, 1, 12, 16, 16), losses, steps=40, lr=0.1, lam=1.0)
    seg0, seg1 = before.argmax(1)[0].numpy(), after.argmax(1)[0].numpy()
    assert betti_numbers_3d(seg1 == 1) == (1, 0, 0)
    changed = seg0 != seg1
    assert changed.sum() <= blob.sum() + 4  # essentially only the blob
    assert hist[-1]["topology"] < hist[0]["topology"]
    # the original network is untouched
    assert torch.equal(net(None), logits_from_labels(lab, weak=blob))


def test_gap_in_ring_is_closed_slice_wise():
    lab = np.zeros((4, 20, 20), np.int64)
    yy, xx = np.ogrid[:20, :20]
    r2 = (yy - 10) ** 2 + (xx - 10) ** 2
    ring = (r2 >= 16) & (r2 <= 36)
    lab[:, ring] = 1
    gap = np.zeros_like(lab, bool)
    gap[2, 9:12, 14:17] = True
    gap &= lab == 1
    lab[gap] = 0
    per = betti_numbers_per_slice(lab == 1, axis=0)
    assert per[2].tolist() == [1, 0] and per[0].tolist() == [1, 1]
    net = FixedLogits(logits_from_labels(lab, weak=gap))
    losses = build_prior_losses({}, {1: (1, 1)}, slice_axis=0)
    before, after, _ = refine_logits(net, torch.zeros(1, 1, 4, 20, 20), losses, steps=40, lr=0.1, lam=1.0)
    seg1 = after.argmax(1)[0].numpy()
    assert betti_numbers_per_slice(seg1 == 1, axis=0).tolist() == [[1, 1]] * 4
    err = topology_errors(seg1, {}, {1: (1, 1)}, 0)
    assert err["1"]["slices_wrong_2d"] == 0
    changed = (before.argmax(1)[0].numpy() != seg1).sum()
    assert 0 < changed <= gap.sum() + 6


def test_bad_arguments():
    with pytest.raises(RefinementError, match="no Betti priors"):
        build_prior_losses({}, {}, None)
    with pytest.raises(RefinementError, match="steps"):
        refine_logits(FixedLogits(torch.zeros(1, 2, 3, 3, 3)), torch.zeros(1), build_prior_losses({1: (1, 0, 0)}, {}, None),
                      steps=-1)


@pytest.mark.parametrize("kind", ["wall_hole", "extra_component"])
def test_planted_defect_in_synthetic_phantom_is_repaired(kind):
    """A synthetic short-axis heart with a planted defect: refinement towards the dataset priors (3D and per
    slice, from the phantom's own topology block) reaches the prior Betti numbers and changes few voxels."""
    from nnunet_topo import synthetic
    from nnunet_topo.rules import parse_topology

    labels = synthetic.labels_for("acdc")
    spec = parse_topology({"labels": labels, "topology": synthetic.topology_block("acdc")})
    ph = synthetic.make_phantom("acdc", 3)
    extra = {"structure": "MYO"} if kind == "extra_component" else {}
    lab, defect = synthetic.plant_defect(ph.label, kind, labels, np.random.default_rng(0), **extra)
    lab = lab.astype(np.int64)
    myo = labels["MYO"]
    priors_3d = {myo: tuple(spec.betti["MYO"])}
    # the 2D prior says "a ring wherever MYO appears": right for a hole in the wall, wrong for a blob on a slice
    # without myocardium (there it would ask for a ring); the blob is removed by the 3D prior alone
    priors_2d = {myo: tuple(spec.betti_2d["MYO"])} if kind == "wall_hole" else {}
    before_err = topology_errors(lab, priors_3d, priors_2d, 0)[str(myo)]
    assert before_err["betti_error_3d"] > 0
    net = FixedLogits(logits_from_labels(lab, weak=defect.mask))
    losses = build_prior_losses(priors_3d, priors_2d, slice_axis=0)
    x = torch.zeros(1, 1, *lab.shape)
    assert sum(float(loss(net(x)).detach()) for loss in losses) > 0.3
    before, after, _ = refine_logits(net, x, losses, steps=60, lr=0.1, lam=1.0)
    seg0, seg1 = before.argmax(1)[0].numpy(), after.argmax(1)[0].numpy()
    err = topology_errors(seg1, priors_3d, priors_2d, 0)[str(myo)]
    assert err["betti_error_3d"] == 0 and err.get("slices_wrong_2d", 0) == 0
    assert (seg0 != seg1).sum() <= 3 * defect.mask.sum() + 10
