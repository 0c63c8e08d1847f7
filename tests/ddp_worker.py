"""One rank of the DDP check of tests/test_ddp.py (run as a script, two processes; not collected by pytest).

The rank joins a gloo process group (CPU), builds each trainer as ``nnUNetv2_train -num_gpus 2`` does (nnU-Net's own
``initialize``: its per-rank batch split and its DDP wrapper, without ``find_unused_parameters``), and runs real
training steps on real batches of nnU-Net's loader, including the corner cases that break DDP in plugins:

- step 0: a structure is absent from *this rank's* batch only (rank 1's RV removed from the target),
- step 1: the topology terms switched off (the first phase of the schedule), on every rank,
- step 2: the mesh head's inputs detached (``mesh_backbone_grad_share = 0``), and on rank 1 the batch is background
  only (no structure at all),
- step 3: the share back on; with ``mesh_share_every = 2`` the mesh trainers take the predicted share's single
  backward (step 1 measured it), which DDP's reducer sees as one backward.

Afterwards nnU-Net's epoch-end logging (all_gather of the losses) runs and every parameter (network and mesh head) is
gathered from both ranks. The only change to nnU-Net is the device: nnU-Net's DDP path assumes CUDA
(``device_ids=[local_rank]``), which a CPU module refuses, so the wrapper is called with ``device_ids=None`` here.

Usage: ``python ddp_worker.py RANK WORLD STORE_FILE OUT_JSON DATASET PLANS TRAINER [TRAINER ...]``
"""
import json
import math
import sys

import numpy as np
import torch
import torch.distributed as dist

FEW_POINTS = dict(occ_num_uniform=64, occ_num_surface=64, max_critical_points=64, mie_num_points=128)
RV = 1  # label id of the synthetic ACDC-like data set


def _cpu_ddp():
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module

    ddp = module.DDP

    def wrap(network, device_ids=None, **kwargs):  # nnU-Net passes device_ids=[local_rank] (a CUDA index)
        return ddp(network, device_ids=None, **kwargs)

    module.DDP = wrap


def _without(batch: dict, labels) -> dict:
    """The batch with the given labels set to background in every deep-supervision target (``None``: all)."""
    def clear(t):
        t = t.clone()
        if labels is None:
            t.zero_()
        else:
            for v in labels:
                t[t == v] = 0
        return t
    target = batch["target"]
    batch["target"] = [clear(t) for t in target] if isinstance(target, list) else clear(target)
    return batch


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params]) if params else torch.zeros(0)


def run_trainer(name: str, dataset: str, plans: str, rank: int) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args
    from torch.nn.parallel import DistributedDataParallel

    tr = get_trainer_from_args(dataset, "3d_fullres", 0, name, plans, device=torch.device("cpu"))
    assert tr.is_ddp and tr.local_rank == rank
    tr.device, tr.grad_scaler = torch.device("cpu"), None  # nnU-Net's DDP path sets CUDA (module docstring)
    mesh = hasattr(tr, "mesh_head_settings")
    attrs = dict(num_epochs=2, topology_start_epoch=1)
    if mesh:
        attrs.update(FEW_POINTS, mesh_backbone_grad_share=0.5, mesh_share_every=2)
    for k, v in attrs.items():
        setattr(tr, k, v)
    tr.initialize()
    assert isinstance(tr.network, DistributedDataParallel), type(tr.network)
    tr.on_train_start()
    result = {"batch_size": tr.batch_size, "losses": [], "predicted_steps": 0}
    from nnunet_topo import mesh_step
    real = mesh_step.backward_with_predicted_share

    def counted(*a, **k):
        result["predicted_steps"] += 1
        return real(*a, **k)
    mesh_step.backward_with_predicted_share = counted
    tr.on_epoch_start()
    for step in range(4):
        tr.current_epoch = 1 if step != 1 else 0  # step 1: the first phase (topology terms off) on every rank
        tr.on_train_epoch_start()
        batch = next(tr.dataloader_train)
        if step == 0 and rank == 1:
            batch = _without(batch, [RV])
        if step == 2:
            if mesh:
                tr.mesh_backbone_grad_share = 0.0
            if rank == 1:
                batch = _without(batch, None)
        if step == 3 and mesh:
            tr.mesh_backbone_grad_share = 0.5
        out = tr.train_step(batch)
        result["losses"].append(float(out["loss"]))
        assert math.isfinite(float(out["loss"])), (name, step, out)
    mesh_step.backward_with_predicted_share = real
    tr.on_train_epoch_end([{"loss": np.array(v)} for v in result["losses"]])
    params = [p for p in tr.network.parameters()]
    head = list(tr.mesh_head.parameters()) if mesh else []
    for what, ps in (("network", params), ("head", head)):
        mine = _flat(ps)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        result[f"{what}_max_diff"] = max(float((g - gathered[0]).abs().max()) if g.numel() else 0.0
                                         for g in gathered)
        result[f"{what}_numel"] = int(mine.numel())
    result["train_loss_logged"] = float(tr.logger.get_value("train_losses", step=-1))
    # stop the data loaders' background workers as nnU-Net's on_train_end does: left running for every trainer, their
    # threads met the interpreter's teardown once (rank 1 aborted, "terminate called without an active exception",
    # after every result was written)
    for loader in (tr.dataloader_train, tr.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()
    return result


def gradient_arithmetic(rank: int) -> dict:
    """mesh_step's collectives with gradients that differ in *presence* between the ranks: rank 1 has no gradient
    for the second parameter and no feature gradient at all (its batch lacked the structures)."""
    from nnunet_topo.mesh_step import add_bounded_feature_gradient, mean_over_ranks

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    grads = [torch.full((3,), float(rank + 1)), torch.ones(2, 2) if rank == 0 else None]
    mean = mean_over_ranks(params, grads)
    none_everywhere = mean_over_ranks(params, [None, None])
    # the bounded share: rank 0 has a feature gradient, rank 1 none (the old code returned early there and hung)
    feat = params[0] * 2.0 + params[1].sum()
    for p in params:
        p.grad = torch.ones_like(p)
    g = [torch.ones(3)] if rank == 0 else [None]
    seg, mesh_norm, factor = add_bounded_feature_gradient(params, [feat], g, share=0.5, ddp=True)
    return {"mean": [m.tolist() if m is not None else None for m in mean],
            "none_everywhere": [m is None for m in none_everywhere],
            "mesh_norm": float(mesh_norm), "factor": float(factor), "grads": [p.grad.tolist() for p in params]}


def main(argv) -> None:
    rank, world, store, out_json, dataset, plans, *trainers = argv
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    _cpu_ddp()
    # different seeds per rank: different batches, and a mesh head that would start differently on each rank unless
    # the trainer synchronises it (DDP broadcasts only the network it wraps)
    torch.manual_seed(1000 + rank)
    np.random.seed(1000 + rank)
    results = {}
    try:
        results["gradient_arithmetic"] = gradient_arithmetic(rank)
        for name in trainers:
            results[name] = run_trainer(name, dataset, plans, rank)
            dist.barrier()
    finally:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
