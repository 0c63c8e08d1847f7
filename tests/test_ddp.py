"""Every trainer is DDP-safe by construction (issue 23 item 7), shown on the CPU.

``nnUNetv2_train -num_gpus N`` wraps the network in DDP without ``find_unused_parameters``; a step in which a
parameter gets no gradient on one rank, or a collective that one rank skips, breaks (or hangs) the next step. Two
processes with the gloo backend (tests/ddp_worker.py) build every trainer through nnU-Net's own ``initialize`` (per-rank
batch split 2 -> 1, nnU-Net's DDP wrapper) and run real steps on real batches with the corner cases: a structure absent
from one rank's batch, the topology terms switched off, the mesh head's inputs detached, a background-only batch on one
rank. No reducer error, no hang (a timeout fails the test), and afterwards every parameter of the network and of the
mesh head is equal on both ranks.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import nnunet_cli, run_cli

pytestmark = pytest.mark.slow

DATASET_ID = 993
PLANS = "nnUNetPlansDDPTest"
TRAINERS = ["nnUNetTrainerProjPool", "nnUNetTrainerBetti", "nnUNetTrainerMeshROI", "nnUNetTrainerMesh",
            "nnUNetTrainerTPM", "nnUNetTrainerMIE", "nnUNetTrainerMesh_headOnly"]
WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from nnunet_topo.synthetic import write_dataset
    from nnunet_topo.trainers import TRAINER_DIR

    root = tmp_path_factory.mktemp("ddp")
    e = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
             nnUNet_results=str(root / "res"), nnUNet_extTrainer=TRAINER_DIR, nnUNet_compile="f",
             OMP_NUM_THREADS="1")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(e[k])
    write_dataset(e["nnUNet_raw"], DATASET_ID, "acdc", num_training=6, num_test=0, shape=(8, 40, 40))
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1"], e)
    folder = next(p for p in os.scandir(e["nnUNet_preprocessed"]) if p.name.startswith(f"Dataset{DATASET_ID}_"))
    with open(os.path.join(folder.path, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = PLANS
    conf = plans["configurations"]["3d_fullres"]
    conf["patch_size"] = [12, 48, 48]  # holds every case's heart (the mesh trainers need the whole structure)
    conf["batch_size"] = 2  # global batch 2: nnU-Net gives each of the two ranks 1
    with open(os.path.join(folder.path, PLANS + ".json"), "w") as f:
        json.dump(plans, f)
    e["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation in the ranks
    return e


def test_every_trainer_is_ddp_safe_with_two_gloo_ranks(env, tmp_path):
    store = tmp_path / "store"
    procs, outs = [], []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, WORKER, str(rank), "2", str(store), str(out), str(DATASET_ID),
                                       PLANS, *TRAINERS], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=1200)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-6000:]}"
    results = [json.loads(o.read_text()) for o in outs]
    # mesh_step's collectives when the ranks differ in which gradients exist: one mean, None only where no rank had one
    a0, a1 = results[0]["gradient_arithmetic"], results[1]["gradient_arithmetic"]
    assert a0 == a1
    assert a0["mean"] == [[1.5] * 3, [[0.5, 0.5], [0.5, 0.5]]] and a0["none_everywhere"] == [True, True]
    assert a0["mesh_norm"] == pytest.approx(((2 * 0.5) ** 2 * 3 + 4 * (1.5 ** 2)) ** 0.5)  # rank 0's pulled back / 2
    assert 0 < a0["factor"] <= 1
    for name in TRAINERS:
        r0, r1 = results[0][name], results[1][name]
        assert r0["batch_size"] == r1["batch_size"] == 1, name  # nnU-Net's per-rank split of the global batch 2
        assert r0["network_numel"] > 0 and r0["network_max_diff"] == 0.0, (name, r0)
        assert r0["head_max_diff"] == 0.0, (name, r0)
        if name.startswith(("nnUNetTrainerMesh", "nnUNetTrainerTPM", "nnUNetTrainerMIE")) and name != \
                "nnUNetTrainerMeshROI":
            assert r0["head_numel"] > 0, name
            if name != "nnUNetTrainerMesh_headOnly":  # step 3 went through the predicted share on both ranks
                assert r0["predicted_steps"] == r1["predicted_steps"] == 1, (name, r0, r1)
        # the ranks saw different batches, and nnU-Net's epoch-end logging averaged their losses
        assert r0["losses"] != r1["losses"], name
        assert r0["train_loss_logged"] == pytest.approx(r1["train_loss_logged"])
