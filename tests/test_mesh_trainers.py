"""The mesh trainers (nnUNetTrainerMesh / TPM / TPM_lambda1 / MIE) with real nnU-Net objects, without the CLI.

A tiny synthetic ACDC-like dataset is planned and preprocessed with nnUNetv2_plan_and_preprocess; the trainers
are built as nnUNetv2_train builds them (``get_trainer_from_args``, device cpu), initialised, and run for two
``train_step``s on real batches. The checkpoint is loaded as nnUNetv2_predict loads it (nnUNetPredictor from the
model folder: trainer lookup by name, ``build_network_architecture`` from the saved plans.json with deep
supervision off, strict ``load_state_dict``). The full nnUNetv2_train run is the integration test's job.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import nnunet_cli, run_cli

pytestmark = pytest.mark.slow

DATASET_ID = 992
PLANS_BIG = "nnUNetPlansMeshTest"  # the default plans with a patch that covers every preprocessed case
#: fewer occupancy query points than the defaults, to keep this module within ~3 min on 2 CPU cores
FEW_POINTS = dict(occ_num_uniform=128, occ_num_surface=128, max_critical_points=128, mie_num_points=256)
TRAINERS = ["nnUNetTrainerMesh", "nnUNetTrainerTPM", "nnUNetTrainerTPM_lambda1", "nnUNetTrainerMIE"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from nnunet_topo.trainers import TRAINER_DIR

    root = tmp_path_factory.mktemp("mesh_trainers")
    e = {k: str(root / d) for k, d in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"),
                                        ("nnUNet_results", "res"))}
    for p in e.values():
        os.makedirs(p)
    e["nnUNet_extTrainer"] = TRAINER_DIR
    e["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation: no background workers left behind
    e["nnUNet_compile"] = "f"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in e.items():
            mp.setenv(k, v)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def pre(env):
    """Preprocessed folder of the synthetic dataset, plus a plans file whose patch covers every case."""
    from nnunet_topo.synthetic import write_dataset

    write_dataset(env["nnUNet_raw"], DATASET_ID, "acdc", num_training=6, num_test=0, shape=(8, 40, 40))
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # the planner needs >= 1 thread
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1"], plan_env)
    folder = next(p for p in os.scandir(env["nnUNet_preprocessed"]) if p.name.startswith(f"Dataset{DATASET_ID}_"))
    plans = json.load(open(os.path.join(folder.path, "nnUNetPlans.json")))
    plans["plans_name"] = PLANS_BIG
    # the planned patch (10, 40, 40) is smaller than some resampled cases (up to 11 x 42 x 42); same data identifier
    plans["configurations"]["3d_fullres"]["patch_size"] = [12, 48, 48]
    with open(os.path.join(folder.path, PLANS_BIG + ".json"), "w") as f:
        json.dump(plans, f)
    return folder.path


def _trainer(name, plans=PLANS_BIG, **attrs):
    from nnunetv2.run.run_training import get_trainer_from_args

    tr = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, plans, device=torch.device("cpu"))
    for k, v in attrs.items():
        setattr(tr, k, v)
    return tr


def _load(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name", TRAINERS)
def test_trainers_are_found_by_nnunet(env, name):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name)
    assert cls.__name__ == name and issubclass(cls, nnUNetTrainer)


def test_class_attributes_of_the_variants(env):
    from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh
    from nnunet_topo.trainers.nnUNetTrainerMIE import nnUNetTrainerMIE
    from nnunet_topo.trainers.nnUNetTrainerTPM import nnUNetTrainerTPM, nnUNetTrainerTPM_lambda1

    assert nnUNetTrainerMesh.lambda_tp == 0 and nnUNetTrainerTPM.lambda_tp == 0.5
    assert nnUNetTrainerTPM_lambda1.lambda_tp == 1.0 and nnUNetTrainerMIE.mie_rho == 0.2
    assert nnUNetTrainerMesh.occupancy_method == "dipole"


@pytest.mark.parametrize("name, terms", [
    ("nnUNetTrainerMesh", ("occ", "laplacian", "edge")),
    ("nnUNetTrainerTPM", ("occ", "tpm", "laplacian", "edge")),
    ("nnUNetTrainerMIE", ("mie", "laplacian")),
])
def test_two_train_steps_log_finite_terms_and_checkpoint_loads_like_predict(pre, env, name, terms):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_topo.mesh_head.network import TEMPLATES_KEY

    tr = _trainer(name, topology_start_epoch=0, num_epochs=1, **FEW_POINTS)
    assert tuple(tr.mesh_term_names()) == terms
    tr.initialize()
    tr.on_train_start()
    assert not tr._do_i_compile()
    # the templates went into the model folder's plans.json (written by nnU-Net's on_train_start)
    saved = _load(tr.output_folder_base, "plans.json")["configurations"]["3d_fullres"][TEMPLATES_KEY]
    assert [t["name"] for t in saved] == ["LV_endo", "LV_epi", "RV"]

    tr.on_epoch_start()
    tr.on_train_epoch_start()
    before = [p.detach().clone() for p in tr.mesh_head.parameters()]
    outs = [tr.train_step(next(tr.dataloader_train)) for _ in range(2)]
    for o in outs:
        assert np.isfinite(o["loss"])
        for t in terms:
            assert math.isfinite(o[f"train_{t}"]), (t, o)
        assert o[f"train_{terms[0]}"] > 0  # an occupancy BCE
    # the head is trained by the mesh terms
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.mesh_head.parameters()))
    tr.on_train_epoch_end(outs)
    tr.on_validation_epoch_start()
    val = [tr.validation_step(next(tr.dataloader_val))]
    assert all(math.isfinite(val[0][f"val_{t}"]) for t in terms)  # the head runs during validation epochs
    assert val[0][f"val_{terms[0]}"] > 0
    assert np.isfinite(val[0]["loss"])
    tr.on_validation_epoch_end(val)
    tr.on_epoch_end()
    log = tr.logger.local_logger.my_fantastic_logging
    for t in terms:
        assert len(log[f"train_{t}"]) == 1 and math.isfinite(log[f"train_{t}"][0])
        assert len(log[f"val_{t}"]) == 1 and math.isfinite(log[f"val_{t}"][0])
    for n in ("LV_endo", "LV_epi", "RV"):  # mesh volume / reference volume, logged every epoch
        assert len(log[f"train_volratio_{n}"]) == 1 and log[f"train_volratio_{n}"][0] > 0
    # the mesh trainers limit rotation and do not mirror (templates are priors in the image frame)
    rot, _, _, mirror = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror is None and tr.inference_allowed_mirroring_axes is None
    assert rot == pytest.approx((-np.pi / 12, np.pi / 12))

    # self.network is exactly nnU-Net's planned network (the head is a passenger): same class and keys as the
    # network plain nnUNetTrainer builds; the head runs only on features captured from its forward
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plain = nnUNetTrainer.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1,
                                                     tr.label_manager.num_segmentation_heads, True)
    assert type(tr.network) is type(plain) and tr.network.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 1, *tr.configuration_manager.patch_size)
    tr.network.eval()
    with torch.no_grad():
        ref = tr.network(x)[0]
        with tr.mesh_model.capture() as cap:
            tr.network(x)
        feats, bottleneck = tr.mesh_model.head_inputs(cap)
        meshes = tr.mesh_head(feats, bottleneck, ref)
    assert len(meshes) == 3 and meshes[0].shape == (1, 642, 3)

    # checkpoint -> nnUNetPredictor (what nnUNetv2_predict does): lookup by name, DS off, strict load; the head is
    # stored beside nnU-Net's network_weights
    from nnunet_topo.mesh_head.network import HEAD_STATE_KEY

    tr.save_checkpoint(os.path.join(tr.output_folder, "checkpoint_final.pth"))
    ckpt = torch.load(os.path.join(tr.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert ckpt[HEAD_STATE_KEY]["format"] == 2 and ckpt["network_weights"].keys() == plain.state_dict().keys()
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(tr.output_folder_base, use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    pnet = predictor.network
    assert type(pnet) is type(plain) and not pnet.decoder.deep_supervision
    pnet.load_state_dict(predictor.list_of_parameters[0], strict=True)
    pnet.eval()
    with torch.no_grad():
        out = pnet(x)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, ref, atol=1e-5)


def test_tpm_schedule_switches_l_tpm_on(pre, env):
    """L_TPM is off (weight 0, logged NaN) in the first phase, on from topology_start_epoch, or from the epoch after
    the meshes fit; default bound: half of num_epochs; the _finetune variant starts with it on."""
    tr = _trainer("nnUNetTrainerTPM_lambda1", topology_start_epoch=1, **FEW_POINTS)
    tr.initialize()
    tr.on_train_epoch_start()
    assert tr.mesh_term_weights()["tpm"] == 0.0 and not tr.topology_active()
    tr.current_epoch = 1
    tr.on_train_epoch_start()
    assert tr.mesh_term_weights()["tpm"] == 1.0 and tr.topology_active()
    tr.topology_start_epoch = None
    tr.num_epochs = 50
    assert tr.topology_start() == 25
    tr.current_epoch = 3  # the meshes fit after epoch 2 -> on from epoch 3
    log = tr.logger.local_logger.my_fantastic_logging
    for n in tr.mesh_names:
        log[f"train_volratio_{n}"] = [0.5, 0.7, 1.02]
    assert tr.topology_active() and tr._ready_epoch == 3
    assert _trainer("nnUNetTrainerTPM_finetune").topology_start() == 0


def test_templates_are_reused_not_recomputed(pre, env):
    from nnunet_topo.mesh_head.templates import Template
    from nnunet_topo.mesh_head.network import TEMPLATES_KEY

    tr = _trainer("nnUNetTrainerMesh")
    conf = tr.plans_manager.plans["configurations"]["3d_fullres"]
    assert conf[TEMPLATES_KEY] == tr.configuration_manager.configuration[TEMPLATES_KEY]
    first = [Template.from_dict(d) for d in conf[TEMPLATES_KEY]]
    assert [t.name for t in first] == ["LV_endo", "LV_epi", "RV"] and all(t.genus == 0 for t in first)
    # a marker template in the model folder's plans.json (a run being continued) wins over recomputation
    os.makedirs(tr.output_folder_base, exist_ok=True)
    plans = json.loads(json.dumps(tr.plans_manager.plans))
    marked = [dict(d, vertices=(np.asarray(d["vertices"]) * 0.5).tolist()) for d in conf[TEMPLATES_KEY]]
    plans["configurations"]["3d_fullres"][TEMPLATES_KEY] = marked
    path = os.path.join(tr.output_folder_base, "plans.json")
    with open(path, "w") as f:
        json.dump(plans, f)
    try:
        again = _trainer("nnUNetTrainerMesh")
        assert again.mesh_templates == [Template.from_dict(d) for d in marked]
    finally:
        os.remove(path)


def test_mesh_network_without_templates_is_a_clear_error(pre, env):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_topo.mesh_head.network import mesh_network_from_configuration

    pm = PlansManager(_load(pre, PLANS_BIG + ".json"))
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 4, False)
    with pytest.raises(RuntimeError, match="nnunet_topo_mesh_templates"):
        mesh_network_from_configuration(net, cm.configuration)


def test_patch_smaller_than_a_case_is_fine_but_not_smaller_than_its_structures(pre, env):
    """The heart ROI (DESIGN §7): a case may be larger than the patch as long as its mesh structures fit; the
    loader then places every patch on them. Structures larger than the patch are a clear error naming a case."""
    from nnunet_topo.plans import preprocessed_cases
    from nnunet_topo.roi import structure_box

    tr = _trainer("nnUNetTrainerMesh", plans="nnUNetPlans")  # patch (10, 40, 40) < some cases (11 x 42 x 42)
    assert len(tr.mesh_boxes) == 6 and all(b is not None for b in tr.mesh_boxes.values())
    k, _, seg = next(iter(preprocessed_cases(tr.preprocessed_dataset_folder)))
    assert tr.mesh_boxes[k] == structure_box(np.asarray(seg[0]), [1, 2, 3])
    plans = _load(pre, "nnUNetPlans.json")
    plans["plans_name"] = "nnUNetPlansTinyPatch"
    plans["configurations"]["3d_fullres"]["patch_size"] = [4, 16, 16]
    with open(os.path.join(pre, "nnUNetPlansTinyPatch.json"), "w") as f:
        json.dump(plans, f)
    with pytest.raises(RuntimeError, match=r"mesh structures of every case must fit in the patch \[4, 16, 16\].*"
                                           r"nnUNetv2_topo_plan_mesh"):
        _trainer("nnUNetTrainerMesh", plans="nnUNetPlansTinyPatch")


def test_missing_mesh_structures_is_a_clear_error(pre, env):
    from nnunet_topo.topology_spec import TopologySpecError
    from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh

    plans = _load(pre, PLANS_BIG + ".json")
    dj = _load(pre, "dataset.json")
    del dj["topology"]["mesh_structures"]
    with pytest.raises(TopologySpecError, match="mesh_structures"):
        nnUNetTrainerMesh(dict(plans, continue_training=False), "3d_fullres", 0, dj, torch.device("cpu"))


def test_mesh_losses_are_in_mm_with_the_patch_frame_spec_and_log_point_sources(pre, env):
    """The loss modules measure in the configuration's spacing (mm) and use the spec with axes mapped through the
    plans' transpose_forward (a CT-like plans copy with a non-identity transpose; only the wiring is checked);
    TPM logs how many critical points came from the label map and from the meshes."""
    from nnunet_topo.topology_spec import spec_in_patch_frame

    plans = _load(pre, PLANS_BIG + ".json")
    plans["plans_name"] = PLANS_BIG + "T"
    plans["transpose_forward"], plans["transpose_backward"] = [1, 0, 2], [1, 0, 2]
    with open(os.path.join(pre, PLANS_BIG + "T.json"), "w") as f:
        json.dump(plans, f)
    tr = _trainer("nnUNetTrainerTPM", plans=PLANS_BIG + "T", topology_start_epoch=0, **FEW_POINTS)
    two_d = [r for r in tr.topology_spec.rules if r.mode == "2d"]
    assert two_d, "the synthetic ACDC spec has slice-wise rules"
    assert tr.patch_topology_spec == spec_in_patch_frame(tr.topology_spec, [1, 0, 2])
    assert [r.axis for r in tr.patch_topology_spec.rules if r.mode == "2d"] == [[1, 0, 2].index(r.axis)
                                                                                for r in two_d]
    tr._make_loss_modules()
    assert tr._tpm_loss.spec is tr.patch_topology_spec and tr._tpm_loss.spacing == tuple(tr.patch_spacing())
    assert tr.patch_spacing() == [float(s) for s in tr.configuration_manager.spacing]
    assert 1.0 <= tr.mesh_smoothing() and tr.mesh_smoothing() >= 0.5 * tr._mean_edge_mm

    tr = _trainer("nnUNetTrainerTPM", topology_start_epoch=0, num_epochs=1, **FEW_POINTS)
    tr.initialize()
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    outs = [tr.train_step(next(tr.dataloader_train)) for _ in range(2)]
    for o in outs:
        assert o["train_crit_pred"] >= 0 and o["train_crit_mesh"] >= 0
    tr.on_train_epoch_end(outs)
    log = tr.logger.local_logger.my_fantastic_logging
    assert len(log["train_crit_pred"]) == 1 and len(log["train_crit_mesh"]) == 1


# ------------------------------------------------------------------ the segmentation keeps its budget (issue 21)
def _same_start(name, plain_attrs=None, **attrs):
    """A plain nnUNetTrainer and a mesh trainer on the same plans, the mesh trainer's network set to the plain one's
    initial weights, and two real training batches of the mesh trainer's loader."""
    import copy

    plain = _trainer("nnUNetTrainer", **(plain_attrs or {}))
    plain.initialize()
    tr = _trainer(name, **{**dict(topology_start_epoch=0, num_epochs=1, **FEW_POINTS), **attrs})
    tr.initialize()
    tr.network.load_state_dict(plain.network.state_dict())
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    batches = [next(tr.dataloader_train) for _ in range(3)]
    return plain, tr, [copy.deepcopy(b) for b in batches], batches


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["nnUNetTrainerMesh", "nnUNetTrainerTPM"])
def test_with_share_zero_the_network_trains_exactly_as_plain_nnunet(pre, env, name):
    plain, tr, b_plain, b_mesh = _same_start(name, mesh_backbone_grad_share=0.0)
    head0 = _params(tr.mesh_head)
    for a, b in zip(b_plain, b_mesh):
        plain.train_step(a)
        tr.train_step(b)
    for p, q in zip(plain.network.parameters(), tr.network.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(head0, tr.mesh_head.parameters()))  # the head did learn


@pytest.mark.parametrize("name", ["nnUNetTrainerTPM", "nnUNetTrainerMIE"])
def test_a_trainers_mesh_terms_read_nothing_back_from_the_device(pre, env, monkeypatch, name):
    """Issue 26, item 3: a real trainer's mesh terms (``mesh_losses``: occupancy, L_TPM with both sources and the
    trainers' cap / L_MIE, the shape regularisers), forward and backward on the head's meshes of a real batch, after
    one training step: no aten op that reads a device value back (HostSyncRecorder; the occupancy's data checks in
    their asynchronous form, as on a GPU)."""
    from nnunet_topo import occupancy
    from nnunet_topo.losses.combined import full_resolution
    from nnunet_topo.voxelize import HostSyncRecorder

    monkeypatch.setattr(occupancy, "SYNC_FREE_CHECKS", True)
    _, tr, _, batches = _same_start(name)
    tr.train_step(batches[0])  # the template faces are range-checked and their edges built once
    with tr.mesh_model.capture() as captured:
        output = tr.network(batches[1]["data"])
    logits, tgt = full_resolution(output), full_resolution(batches[1]["target"])
    feats, bottleneck = tr.mesh_model.head_inputs(captured)
    meshes = tr.mesh_head([f.detach() for f in feats], bottleneck.detach(), logits.detach())
    faces = [tr.mesh_head.template_faces(s) for s in range(len(meshes))]
    with HostSyncRecorder() as rec:
        data_loss, reg_loss, values = tr.mesh_losses(meshes, faces, logits, tgt)
        (data_loss + reg_loss).backward()
    assert rec.syncs == [], rec.syncs
    assert torch.isfinite(data_loss) and ("tpm" in values or "mie" in values), values


def test_predicted_share_steps_run_in_the_trainer_and_follow_the_exact_bound(pre, env, monkeypatch):
    """``mesh_share_every = 2`` against 1 (exact at every step), same start, same batches: steps 1-2 are exact in both
    (step 1 has no mesh gradient yet, so step 2 measures again), step 3 goes through the one-backward path in the
    predicted run only, and its network lands close to the exact run's (the factor is predicted from step 2)."""
    import copy

    from nnunet_topo import mesh_step

    calls = []
    real = mesh_step.backward_with_predicted_share
    monkeypatch.setattr(mesh_step, "backward_with_predicted_share", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.random.seed(0)  # the same batches whatever ran before (the loader samples with numpy's global generator)
    torch.manual_seed(0)
    plain, exact, b_plain, b_mesh = _same_start("nnUNetTrainerMesh", mesh_backbone_grad_share=0.5, mesh_share_every=1)
    pred = _trainer("nnUNetTrainerMesh", **dict(topology_start_epoch=0, num_epochs=1, mesh_backbone_grad_share=0.5,
                                                mesh_share_every=2, **FEW_POINTS))
    pred.initialize()
    pred.network.load_state_dict(plain.network.state_dict())
    pred.mesh_head.load_state_dict(exact.mesh_head.state_dict())
    pred.on_train_start()
    pred.on_epoch_start()
    pred.on_train_epoch_start()
    b_pred = copy.deepcopy(b_mesh)
    for i, (a, b, c) in enumerate(zip(b_plain, b_mesh, b_pred)):
        plain.train_step(a)
        torch.manual_seed(i)  # the same query points in both mesh runs
        exact.train_step(b)
        torch.manual_seed(i)
        pred.train_step(c)
        assert len(calls) == (1 if i == 2 else 0)
        if i == 1:  # exact in both: the same network
            assert _dist(pred.network, exact.network) < 1e-6
    mesh_part = _dist(exact.network, plain.network)
    assert mesh_part > 1e-7 and _dist(pred.network, plain.network) > 1e-7
    assert _dist(pred.network, exact.network) < 0.5 * mesh_part


def _dist(a, b):
    return sum((p - q).double().pow(2).sum().item() for p, q in zip(a.parameters(), b.parameters())) ** 0.5


def test_with_a_share_the_mesh_terms_move_the_network_and_the_head_uses_its_own_gradscaler(pre, env):
    plain, tr, b_plain, b_mesh = _same_start("nnUNetTrainerMesh", mesh_backbone_grad_share=0.5)
    tr.head_grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for a, b in zip(b_plain[:2], b_mesh[:2]):  # step 1: the head's last layers start at 0, so no feature gradient
        plain.train_step(a)
        tr.train_step(b)
    diff = max((p - q).abs().max().item() for p, q in zip(plain.network.parameters(), tr.network.parameters()))
    assert diff > 1e-7  # the mesh terms do reach the backbone at share > 0 ...
    assert tr.head_grad_scaler._growth_tracker.item() == 2  # ... and the head stepped through its GradScaler
    # a non-finite head gradient: the GradScaler skips the head's step and halves its scale; the network still steps
    head0, net0 = _params(tr.mesh_head), _params(tr.network)
    hook = next(tr.mesh_head.parameters()).register_hook(lambda g: g * float("inf"))
    tr.train_step(b_mesh[2])
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(head0, tr.mesh_head.parameters()))
    assert tr.head_grad_scaler.get_scale() == 2.0 ** 7
    assert any(not torch.equal(a, b) for a, b in zip(net0, tr.network.parameters()))
    assert all(torch.isfinite(p).all() for p in tr.network.parameters())


def test_head_only_variant_leaves_the_network_untouched(pre, env):
    _, tr, _, batches = _same_start("nnUNetTrainerMesh_headOnly")
    net0, head0 = _params(tr.network), _params(tr.mesh_head)
    for b in batches[:2]:
        out = tr.train_step(b)
        assert np.isfinite(out["loss"])
    assert all(torch.equal(a, b) for a, b in zip(net0, tr.network.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(head0, tr.mesh_head.parameters()))


def test_first_phase_of_the_schedule_is_plain_nnunet(pre, env):
    """ProjPool before its switch epoch: its steps equal plain nnUNetTrainer's from the same weights and batches
    (the term is not computed, logged NaN); after the switch they differ."""
    import copy

    plain, tr, _, batches = _same_start("nnUNetTrainerProjPool", plain_attrs=dict(num_epochs=4), num_epochs=4,
                                        topology_start_epoch=None)
    assert tr.topology_start() == 2
    for b in batches[:2]:
        plain.train_step(copy.deepcopy(b))
        out = tr.train_step(copy.deepcopy(b))
        assert math.isnan(out["train_projpool"])
    for p, q in zip(plain.network.parameters(), tr.network.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    tr.current_epoch = 2
    tr.on_train_epoch_start()
    plain.lr_scheduler.step(2)  # the same lr: only the term differs
    plain.train_step(copy.deepcopy(batches[2]))
    out = tr.train_step(copy.deepcopy(batches[2]))
    assert math.isfinite(out["train_projpool"])
    assert any(not torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(plain.network.parameters(),
                                                                           tr.network.parameters()))


# ------------------------------------------------------------ torch.compile: network compiled, head eager (issue 21)
def _cpp_compiler():
    import shutil

    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(_cpp_compiler() is None, reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_network_trains_as_the_eager_one_and_the_head_keeps_its_features(pre, env, monkeypatch):
    """Issue 21, item 6. nnU-Net compiles its network on CUDA (never on the CPU); here ``_do_i_compile`` is forced on
    the CPU, where inductor runs. The mesh trainer's network is then nnU-Net's compiled module while the head stays
    eager: the hooks (registered after ``torch.compile()``, before the first call) are traced, so from the same
    weights and batches the compiled trainer's losses equal the eager trainer's and its network lands where the
    eager one does, the bounded mesh share included (it reaches the backbone only through the captured features,
    and its exact step goes through the compiled graph twice: donated buffers off); validation runs; the
    checkpoint holds nnU-Net's keys; and a predictor with ``nnUNet_compile=1`` (which compiles on any device) gives
    mesh prediction a network whose state dict loads strictly."""
    import copy

    from torch._dynamo.eval_frame import OptimizedModule

    from nnunet_topo.mesh_head.network import unwrap_network
    from nnunet_topo.mesh_prediction import check_mesh_network, mesh_model_from_checkpoints

    torch._dynamo.reset()
    attrs = dict(topology_start_epoch=0, num_epochs=1, mesh_backbone_grad_share=0.5, mesh_share_every=1,
                 **FEW_POINTS)
    plain, eager, b_plain, b_eager = _same_start("nnUNetTrainerMesh", **attrs)
    head0 = _params(eager.mesh_head)
    comp = _trainer("nnUNetTrainerMesh", **attrs)
    comp._do_i_compile = lambda: True
    comp.initialize()
    assert isinstance(comp.network, OptimizedModule) and not isinstance(comp.mesh_head, OptimizedModule)
    net = unwrap_network(comp.network)
    net.load_state_dict(eager.network.state_dict())
    comp.mesh_head.load_state_dict(eager.mesh_head.state_dict())
    comp.on_train_start()
    comp.on_epoch_start()
    comp.on_train_epoch_start()
    b_comp = copy.deepcopy(b_eager)
    for i in range(2):  # step 1: the head's last layers start at 0 (no feature gradient); step 2: the mesh share
        plain.train_step(b_plain[i])
        torch.manual_seed(i)  # the same query points
        ref = eager.train_step(b_eager[i])
        torch.manual_seed(i)
        out = comp.train_step(b_comp[i])
        # the head read the same features from the compiled network: the same losses (Adam's first steps turn
        # float-noise gradients of ~0 into full-size updates, so the head's parameters are not compared)
        assert out["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert out["train_occ"] == pytest.approx(ref["train_occ"], rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(head0, comp.mesh_head.parameters()))
    mesh_part = _dist(eager.network, plain.network)  # what the mesh share added to the backbone
    assert mesh_part > 1e-7 and _dist(net, eager.network) < 0.1 * mesh_part

    comp.on_validation_epoch_start()
    val = comp.validation_step(copy.deepcopy(b_comp[2]))
    assert np.isfinite(val["loss"]) and math.isfinite(val["val_occ"])
    path = os.path.join(comp.output_folder, "checkpoint_compiled.pth")
    comp.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["network_weights"].keys() == net.state_dict().keys()

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_compile", "1")
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(comp.output_folder_base, use_folds=(0,),
                                                   checkpoint_name="checkpoint_compiled.pth")
    assert isinstance(predictor.network, OptimizedModule)
    network, params = mesh_model_from_checkpoints(predictor, comp.output_folder_base, [0], "checkpoint_compiled.pth")
    mnet = check_mesh_network(network)
    mnet.load_state_dict(params[0], strict=True)
    mnet.eval()
    with torch.no_grad():
        _, meshes = mnet.forward_with_meshes(b_comp[2]["data"][:1])
    assert len(meshes) == 3 and all(torch.isfinite(m).all() for m in meshes)
