"""Test-time refinement: planted topological defects are repaired while few voxels change."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_topo.metrics.topology import betti_numbers_3d, betti_numbers_per_slice
from nnunet_topo.refine import (
    RefinementError,
    build_prior_losses,
    refine_logits,
    refine_logits_ensemble,
    topology_errors,
)


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
    from nnunet_topo.topology_spec import parse_topology

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


# ------------------------------------------------------------------------------ fold ensembles

def _ball_with_blob():
    lab = np.zeros((12, 16, 16), np.int64)
    zz, yy, xx = np.ogrid[:12, :16, :16]
    lab[(zz - 6) ** 2 + (yy - 7) ** 2 + (xx - 7) ** 2 <= 16] = 1
    blob = np.zeros_like(lab, bool)
    blob[9:11, 12:14, 12:14] = True
    with_blob = lab.copy()
    with_blob[blob] = 1
    return lab, with_blob, blob


def test_ensemble_of_one_or_identical_folds_is_the_single_refinement():
    """K = 1: the two-pass gradient (dL/dzbar, then back through the network) is the single-network refinement.
    K identical copies: each copy gets dL/dzbar / K, which Adam's scale invariance turns into the same steps (up to
    its eps on tiny gradients), so the segmentation is the single-network one."""
    _, lab, blob = _ball_with_blob()
    net = FixedLogits(logits_from_labels(lab, weak=blob))
    losses = build_prior_losses({1: (1, 0, 0)}, {}, None)
    x = torch.zeros(1, 1, 12, 16, 16)
    b1, a1, h1 = refine_logits(net, x, losses, steps=10, lr=0.1)
    b2, a2, h2 = refine_logits_ensemble([net], x, losses, steps=10, lr=0.1)
    torch.testing.assert_close(b2, b1)
    torch.testing.assert_close(a2, a1, atol=1e-5, rtol=1e-5)
    assert [h["topology"] for h in h2] == pytest.approx([h["topology"] for h in h1], abs=1e-5)
    b3, a3, _ = refine_logits_ensemble([net, net, net], x, losses, steps=10, lr=0.1)
    torch.testing.assert_close(b3, b1)
    assert torch.equal(a3.argmax(1), a1.argmax(1))
    torch.testing.assert_close(a3, a1, atol=0.1, rtol=0)


def test_ensemble_refinement_repairs_the_ensemble_output():
    """Fold A sees a spurious blob (confidently), fold B does not (weakly): their mean of logits (nnU-Net's fold
    ensemble) has the blob; joint refinement removes it from the ensemble output; the folds are untouched."""
    lab, with_blob, blob = _ball_with_blob()
    a = FixedLogits(logits_from_labels(with_blob, weak=blob))  # blob: foreground by a margin of 2
    lb = logits_from_labels(lab, weak=blob)
    lb[0][:, torch.from_numpy(blob)] *= 0.5  # blob: background by a margin of 1
    b = FixedLogits(lb)
    la, lb = a(None).clone(), b(None).clone()
    losses = build_prior_losses({1: (1, 0, 0)}, {}, None)
    before, after, hist = refine_logits_ensemble([a, b], torch.zeros(1, 1, 12, 16, 16), losses, steps=60, lr=0.1)
    torch.testing.assert_close(before, (la + lb) / 2)
    seg0, seg1 = before.argmax(1)[0].numpy(), after.argmax(1)[0].numpy()
    assert betti_numbers_3d(seg0 == 1) == (2, 0, 0) and betti_numbers_3d(seg1 == 1) == (1, 0, 0)
    assert (seg0 != seg1).sum() <= blob.sum() + 4
    assert hist[-1]["topology"] < hist[0]["topology"]
    assert torch.equal(a(None), la) and torch.equal(b(None), lb)
    with pytest.raises(RefinementError, match="at least one network"):
        refine_logits_ensemble([], torch.zeros(1), losses)


def _model_folder(tmp_path, folds, patch_size=None):
    """A hand-made plain nnU-Net model folder (random networks, one per fold) and an input folder with one image."""
    import json

    import SimpleITK as sitk
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from test_mesh_prediction import _case, _plans_for

    img_file, _, dj, _ = _case(tmp_path, False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(sitk.ReadImage(img_file), str(inputs / "c_0000.nii.gz"))
    plans = _plans_for(dj, img_file)
    if patch_size is not None:
        plans["configurations"]["3d_fullres"]["patch_size"] = list(patch_size)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps(dj))
    for fold in folds:
        torch.manual_seed(fold)
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, len(dj["labels"]), deep_supervision=False)
        (model / f"fold_{fold}").mkdir()
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
                   model / f"fold_{fold}" / "checkpoint_final.pth")
    return model, inputs


def test_unrefined_output_is_nnunets_own_sliding_window_prediction(tmp_path):
    """With 0 steps the refinement writes what nnUNetv2_predict writes (nnU-Net's predictor, no mirroring), on an
    image larger than the patch (several tiles, Gaussian-weighted); the differentiable stitching equals nnU-Net's
    logits up to nnU-Net's float16 accumulation. (A single whole-volume pass disagreed with nnU-Net on 0.6-0.8 % of
    the voxels of ACDC cases before any refinement step.)"""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    from nnunet_topo.refine import SlidingWindow, refine_folder

    model, inputs = _model_folder(tmp_path, (0,), patch_size=[8, 16, 16])
    refine_folder(str(model), str(inputs), str(tmp_path / "refined"), folds=[0], steps=0, device="cpu",
                  show_progress=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    predictor.predict_from_files([[str(inputs / "c_0000.nii.gz")]], [str(tmp_path / "nnunet" / "c")],
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined" / "c.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nnunet" / "c.nii.gz")))
    assert ours.shape == theirs.shape and (ours == theirs).mean() > 0.999
    # the logits themselves, on nnU-Net's preprocessed case
    cm = predictor.configuration_manager
    data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(inputs / "c_0000.nii.gz")], None,
                                                               predictor.plans_manager, cm, predictor.dataset_json)
    tiles = compute_steps_for_sliding_window(tuple(max(a, b) for a, b in zip(data.shape[1:], cm.patch_size)),
                                             tuple(cm.patch_size), 0.5)
    assert np.prod([len(t) for t in tiles]) > 1
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    want = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).float()
    with torch.no_grad():
        got = SlidingWindow(predictor.network, cm.patch_size)(torch.from_numpy(data)[None].float())[0]
    # nnU-Net accumulates in float16, where the tiles' corner weights are tiny: its logits there are coarse (up to
    # ~0.5 off here); the arg-max and the mean agree
    assert got.shape == want.shape and float((got.argmax(0) == want.argmax(0)).float().mean()) > 0.99
    assert float((got - want).abs().mean()) < 0.01 * float(want.abs().max())


def test_refine_folder_fold_ensemble(tmp_path, capsys, monkeypatch):
    """refine_folder / nnUNetv2_topo_refine on a hand-made two-fold plain nnU-Net model folder: default folds = every
    fold_N with the checkpoint, -f takes several folds, a missing fold is a clear error."""
    import json

    import SimpleITK as sitk
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from test_mesh_prediction import _case, _plans_for

    from nnunet_topo.cli.refine import refine_entry
    from nnunet_topo.refine import refine_folder

    model, inputs = _model_folder(tmp_path, (0, 1))
    s = refine_folder(str(model), str(inputs), str(tmp_path / "out"), steps=1, lr=1e-3, device="cpu",
                      show_progress=False)
    assert s["folds"] == [0, 1] and (tmp_path / "out" / "c.nii.gz").is_file()
    assert json.loads((tmp_path / "out" / "refinement_summary.json").read_text())["folds"] == [0, 1]
    s1 = refine_folder(str(model), str(inputs), str(tmp_path / "out1"), folds=["1"], steps=0, device="cpu",
                       show_progress=False)
    assert s1["folds"] == [1]
    with pytest.raises(RefinementError, match="fold 3: no folder"):
        refine_folder(str(model), str(inputs), str(tmp_path / "out3"), folds=[0, 3], device="cpu")
    monkeypatch.setattr("nnunet_topo.cli.refine.model_folder_from_args", lambda args: str(model))
    with pytest.raises(SystemExit) as e:
        refine_entry(["-i", str(inputs), "-o", str(tmp_path / "o"), "-d", "1", "-c", "3d_fullres", "-f", "0", "5",
                      "-device", "cpu"])
    assert e.value.code == 2 and "fold 5: no folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Clough's fidelity, default lambda

def test_fidelity_is_the_class_sum_averaged_over_voxels():
    """Clough et al.: (1/|V|) sum_v sum_c (p_cv - p0_cv)^2, checked against a plain loop over voxels."""
    import math

    from nnunet_topo.refine import fidelity_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 3, 4, dtype=torch.float64)
    p0 = torch.softmax(torch.randn(1, 3, 2, 3, 4, dtype=torch.float64), 1)
    total, n = 0.0, 0
    for z in range(2):
        for y in range(3):
            for x in range(4):
                e = [math.exp(float(logits[0, c, z, y, x])) for c in range(3)]
                total += sum((e[c] / sum(e) - float(p0[0, c, z, y, x])) ** 2 for c in range(3))
                n += 1
    got = fidelity_loss(logits, p0)
    assert got.item() == pytest.approx(total / n, rel=1e-12)
    assert got.item() != pytest.approx(total / (n * 3), rel=1e-3)  # not also averaged over the 3 classes
    assert fidelity_loss(logits, torch.softmax(logits, 1)).item() == 0.0


def test_refinement_logs_the_clough_fidelity_single_and_ensemble():
    """The fidelity of step 1 (after one Adam step) is fidelity_loss of the logits that one step produces."""
    from nnunet_topo.refine import fidelity_loss

    _, lab, blob = _ball_with_blob()
    net = FixedLogits(logits_from_labels(lab, weak=blob))
    losses = build_prior_losses({1: (1, 0, 0)}, {}, None)
    x = torch.zeros(1, 1, 12, 16, 16)
    p0 = torch.softmax(net(x).float(), 1)
    _, one_step, h1 = refine_logits(net, x, losses, steps=1, lr=0.1)
    _, _, h2 = refine_logits(net, x, losses, steps=2, lr=0.1)
    assert h1[0]["fidelity"] == 0.0
    assert h2[1]["fidelity"] == pytest.approx(fidelity_loss(one_step, p0).item(), rel=1e-6)
    assert h2[1]["fidelity"] > 0
    other = FixedLogits(logits_from_labels(lab))
    p0 = torch.softmax((net(x) + other(x)).float() / 2, 1)
    _, one_step, _ = refine_logits_ensemble([net, other], x, losses, steps=1, lr=0.1)
    _, _, h2 = refine_logits_ensemble([net, other], x, losses, steps=2, lr=0.1)
    assert h2[1]["fidelity"] == pytest.approx(fidelity_loss(one_step, p0).item(), rel=1e-6)


def test_default_lambda_is_cloughs_and_the_cli_passes_it(monkeypatch):
    import inspect

    from nnunet_topo.cli.refine import refine_entry
    from nnunet_topo.refine import DEFAULT_LAMBDA, refine_folder

    assert DEFAULT_LAMBDA == 0.01
    for fn in (refine_logits, refine_logits_ensemble, refine_folder):
        assert inspect.signature(fn).parameters["lam"].default == 0.01, fn.__name__
    seen = {}

    def fake_refine_folder(*args, **kwargs):
        seen.update(kwargs)
        return {"cases": {}}
    monkeypatch.setattr("nnunet_topo.cli.refine.refine_folder", fake_refine_folder)
    monkeypatch.setattr("nnunet_topo.cli.refine.model_folder_from_args", lambda args: "model")
    refine_entry(["-i", "in", "-o", "out", "-d", "1", "-c", "3d_fullres", "-device", "cpu"])
    assert seen["lam"] == 0.01
    refine_entry(["-i", "in", "-o", "out", "-d", "1", "-c", "3d_fullres", "-device", "cpu", "--lam", "0.02"])
    assert seen["lam"] == 0.02


def _ring_stack(num_slices: int) -> np.ndarray:
    """Label 1 = the same ring (radii 4-6 around the centre) on every slice of a (num_slices, 20, 20) stack."""
    lab = np.zeros((num_slices, 20, 20), np.int64)
    yy, xx = np.ogrid[:20, :20]
    r2 = (yy - 10) ** 2 + (xx - 10) ** 2
    lab[:, (r2 >= 16) & (r2 <= 36)] = 1
    return lab


def test_default_lambda_still_closes_a_gap_in_a_ring():
    lab = _ring_stack(4)
    gap = np.zeros_like(lab, bool)
    gap[2, 9:12, 14:17] = True
    gap &= lab == 1
    lab[gap] = 0
    net = FixedLogits(logits_from_labels(lab, weak=gap))
    losses = build_prior_losses({}, {1: (1, 1)}, slice_axis=0)
    _, after, _ = refine_logits(net, torch.zeros(1, 1, 4, 20, 20), losses, steps=40, lr=0.1)  # lam = 0.01
    assert betti_numbers_per_slice(after.argmax(1)[0].numpy() == 1, axis=0).tolist() == [[1, 1]] * 4


# ------------------------------------------------------------------------------ per-slice allowed sets

def _rings_with_blob_and_c():
    """Ring on 5 slices; slice 1 also holds a weak blob (2, 1), slice 3 a weak gap, an open "C" (1, 0)."""
    lab = _ring_stack(5)
    weak = np.zeros_like(lab, bool)
    weak[1, 1:3, 1:3] = True
    lab[weak] = 1
    gap = np.zeros_like(lab, bool)
    gap[3, 9:12, 14:17] = True
    gap &= lab == 1
    lab[gap] = 0
    assert betti_numbers_per_slice(lab == 1, axis=0).tolist() == [[1, 1], [2, 1], [1, 1], [1, 0], [1, 1]]
    return lab, weak | gap


def test_topology_errors_with_an_allowed_set():
    lab, _ = _rings_with_blob_and_c()
    ring_or_c = topology_errors(lab, {}, {1: ((1, 1), (1, 0))}, 0)["1"]
    assert ring_or_c["slices_wrong_2d"] == 1  # the blob slice (2, 1): 1 from (1, 1)
    assert ring_or_c["betti_error_2d_mean"] == pytest.approx(1 / 5)
    for ring in ((1, 1), ((1, 1),)):
        e = topology_errors(lab, {}, {1: ring}, 0)["1"]
        assert e["slices_wrong_2d"] == 2 and e["betti_error_2d_mean"] == pytest.approx(2 / 5)


def test_refinement_pushes_each_slice_to_the_nearest_allowed_vector():
    """Priors {(1, 1), (1, 0)}: the blob slice (2, 1) becomes the ring (1, 1); the "C" slice already meets (1, 0)
    and stays open. With the single prior (1, 1) the "C" is closed instead."""
    lab, weak = _rings_with_blob_and_c()
    x = torch.zeros(1, 1, *lab.shape)
    results = {}
    for name, prior in (("set", ((1, 1), (1, 0))), ("ring", (1, 1))):
        net = FixedLogits(logits_from_labels(lab, weak=weak))
        losses = build_prior_losses({}, {1: prior}, slice_axis=0)
        _, after, hist = refine_logits(net, x, losses, steps=40, lr=0.1, lam=1.0)
        seg1 = after.argmax(1)[0].numpy()
        results[name] = betti_numbers_per_slice(seg1 == 1, axis=0).tolist()
        assert topology_errors(seg1, {}, {1: prior}, 0)["1"]["slices_wrong_2d"] == 0, name
        assert hist[-1]["topology"] < hist[0]["topology"]
    assert results["set"] == [[1, 1], [1, 1], [1, 1], [1, 0], [1, 1]]
    assert results["ring"] == [[1, 1]] * 5


def _weak_inner_structure():
    """3 slices: class A a ring (p 0.8), class B inside it weak but the arg-max (p 0.4 against 0.35 / 0.25)."""
    S, H, W = 3, 16, 16
    p = np.zeros((3, S, H, W))
    p[0], p[1], p[2] = 0.9, 0.05, 0.05
    yy, xx = np.mgrid[:H, :W]
    r = np.hypot(yy - 7.5, xx - 7.5)
    for s in range(S):
        p[:, s][:, (r > 3) & (r < 6)] = np.array([0.1, 0.8, 0.1])[:, None]
        p[:, s][:, r <= 3] = np.array([0.25, 0.35, 0.4])[:, None]
    return torch.tensor(np.log(p), dtype=torch.float32)[None]


def test_fixed_presence_binds_the_prior_to_slices_of_the_unrefined_segmentation():
    """A class that is the arg-max in a slice of the unrefined output but below the presence threshold: unbound,
    the per-slice prior ignores that slice (loss 0); bound, b0 = 1 is asked there and the gradient raises the
    class's probability."""
    from nnunet_topo.losses.betti import BettiPriorLoss
    z0 = _weak_inner_structure()
    loss = BettiPriorLoss(class_ids=[2], priors={2: (1, 0)}, target="prior", slice_axis=0)
    z = z0.clone().requires_grad_(True)
    assert float(loss(z).detach()) == 0.0
    loss.fix_presence(z0)
    assert loss.fixed_presence.tolist() == [[[True, True, True]]]
    z = z0.clone().requires_grad_(True)
    value = loss(z)
    assert float(value) > 0.1
    value.backward()
    assert float(z.grad[0, 2].min()) < 0  # descending the loss raises B's logit (at its critical voxels)
    loss.fix_presence(None)
    assert float(loss(z0)) == 0.0
    with pytest.raises(ValueError, match="per-slice prior mode"):
        BettiPriorLoss(class_ids=[2], priors={2: (1, 0, 0)}, target="prior").fix_presence(z0)


def test_refinement_keeps_a_weak_structure_that_the_priors_would_let_vanish():
    """A's prior (one component, no hole) is met by filling its hole, i.e. by eating the weak B inside it. Unbound
    (per-step presence, B below the threshold) B loses most of its voxels; bound to the unrefined segmentation
    (keep_present, the default) B's own prior keeps it on every slice."""
    z0 = _weak_inner_structure()
    kept = {}
    for keep in (False, True):
        losses = build_prior_losses({}, {1: [[1, 0]], 2: [[1, 0]]}, 0)
        _, z1, _ = refine_logits(FixedLogits(z0), torch.zeros(1, 1, *z0.shape[2:]), losses, steps=30, lr=0.1,
                                 lam=1.0, keep_present=keep)
        seg = z1.argmax(1)[0]
        kept[keep] = [int((seg[s] == 2).sum()) for s in range(seg.shape[0])]
    before = int((z0.argmax(1)[0, 0] == 2).sum())
    assert min(kept[True]) >= 0.8 * before, kept
    assert max(kept[False]) < 0.5 * before, kept
