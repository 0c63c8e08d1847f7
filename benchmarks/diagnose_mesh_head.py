"""Does the mesh head learn? Per-step diagnostic of a mesh trainer on a preprocessed dataset (a script, not a test).

Builds the trainer as ``nnUNetv2_train`` does (``get_trainer_from_args``, ``initialize``, ``on_train_start``), runs
``--steps`` of the trainer's own ``train_step`` on real augmented batches and prints per step: the time, nnU-Net's loss,
every mesh term, and the **mesh Dice** of each predicted mesh against the (augmented) target region of that batch
(exact winding number > 1/2 at the voxel centres vs ``isin(target, structure labels)``, mean over the batch).
The lr schedule advances per epoch as in nnU-Net. Class attributes can be overridden (JSON), e.g. nnU-Net's own
augmentation and no placement, as before the fixes of documentation/results.md::

    python benchmarks/diagnose_mesh_head.py -d 502 -p nnUNetPlansWholeVolume -tr nnUNetTrainerMesh_cpuStudy \\
        --steps 120 --set '{"mesh_max_rotation_degrees": 180, "mesh_mirroring": true,
                            "segmentation_guided_placement": false}'

Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results and nnUNet_extTrainer (``nnUNetv2_topo_trainer_path``).
Writes only into nnUNet_results (the trainer's output folder, as nnU-Net does).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def mesh_dice(trainer, meshes, faces, target) -> list:
    from nnunet_topo.frames import voxel_to_normalized
    from nnunet_topo.occupancy import winding_number

    t = target[:, 0].long()
    shape = tuple(t.shape[1:])
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    pn = voxel_to_normalized(grid.float(), shape)
    out = []
    for s, name in enumerate(trainer.mesh_names):
        ids = torch.tensor(sorted(trainer.topology_spec.mesh_structures[name].label_ids))
        dice = []
        for b in range(t.shape[0]):
            inside = winding_number(pn, meshes[s][b].cpu(), faces[s].cpu()) > 0.5
            ref = torch.isin(t[b].reshape(-1).cpu(), ids)
            dice.append(float(2 * (inside & ref).sum() / (inside.sum() + ref.sum()).clamp_min(1)))
        out.append(float(np.mean(dice)))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset ID or name (preprocessed)")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlansWholeVolume", help="plans whose patch holds whole structures")
    parser.add_argument("-tr", default="nnUNetTrainerMesh_cpuStudy")
    parser.add_argument("-f", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", default="{}", help="JSON object of trainer class attributes to override")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = json.loads(args.set)
    if not isinstance(overrides, dict):
        parser.error("--set must be a JSON object")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    from nnunetv2.run.run_training import get_trainer_from_args

    tr = get_trainer_from_args(args.d, args.c, args.f, args.tr, args.p, device=torch.device(args.device))
    for k, v in overrides.items():
        if not hasattr(tr, k):
            parser.error(f"{args.tr} has no attribute {k!r}")
        setattr(tr, k, v)
    if "segmentation_guided_placement" in overrides or "head_kwargs" in overrides:
        tr._setup_templates()  # re-write the head settings of the plans (templates are reused, not rebuilt)
    tr.initialize()
    tr.on_train_start()
    seen = {}
    compute = tr.compute_mesh_terms  # every mesh term of a step, called once by the trainer's train_step

    def spy(meshes, faces, logits, target):
        seen.update(meshes=[m.detach() for m in meshes], faces=faces, target=target.detach())
        return compute(meshes, faces, logits, target)

    tr.compute_mesh_terms = spy
    print(f"{args.tr} on {args.d}/{args.c}/{args.p}, overrides {overrides}; structures {list(tr.mesh_names)}")
    tr.on_train_epoch_start()
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = tr.train_step(next(tr.dataloader_train))
        dt = time.perf_counter() - t0
        terms = " ".join(f"{k[6:]}={v:.3f}" for k, v in out.items() if k.startswith("train_"))
        dice = " ".join(f"{d:.2f}" for d in mesh_dice(tr, seen["meshes"], seen["faces"], seen["target"]))
        print(f"step {i:4d} {dt:6.2f}s loss {out['loss']:.3f} {terms} mesh Dice {dice}", flush=True)
        if (i + 1) % tr.num_iterations_per_epoch == 0:
            tr.current_epoch += 1
            tr.on_train_epoch_start()  # poly lr per epoch, the schedule's phase
    os._exit(0)  # do not wait for nnU-Net's augmentation workers


if __name__ == "__main__":
    main()
