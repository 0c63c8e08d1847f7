"""Which head learning rate lets the mesh head learn: the head trained alone on a trained nnU-Net, per ``head_lr``.

The mesh trainers' head has its own Adam optimiser at ``head_lr`` (issue 21: "an lr that lets it learn: measure,
don't keep 1 % by habit"). This trains ``nnUNetTrainerMesh_headOnly`` (network frozen, exactly the loaded model;
only the head learns, so the head lr is the only thing that differs) from ``--pretrained_weights`` (a plain model's
``checkpoint_final.pth``: every network key, the segmentation layers too) for ``--steps`` steps per learning rate,
every rate on the **same** pre-fetched training batches from the same initial head (seeded), then runs the head on
the same ``--val_batches`` validation batches of nnU-Net's validation loader (patches of the validation cases,
no gradient) and prints, per rate: the occupancy BCE at the start, at the end of training (mean of the last 20
steps) and on validation, and the validation mesh volume / reference volume per structure (1 = the right size;
``losses.mesh_terms.mesh_volume_ratios``), with the share of validation patches whose ratio is within 0.85-1.15;
a first row "0 (no step)" gives the same for the head before any step (the templates where placement puts them).
The trainers' schedule decays ``head_lr`` by nnU-Net's poly rule over the run; here it is constant (one epoch).

    nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=/tmp/hlr python benchmarks/bench_head_lr.py -d 127 \\
        -c 3d_mesh -p nnUNetPlansMesh4.5mm --pretrained_weights BACKBONE/checkpoint_final.pth \\
        --lrs 3e-4 1e-3 3e-3 1e-2 --steps 200 --val_batches 20
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trainer_speed import _setup_env, build_trainer, stop_workers  # noqa: E402

BAND = (0.85, 1.15)


def run_rate(args, lr: float, train_batches, val_batches, weights) -> dict:
    import torch

    torch.manual_seed(args.seed)  # the same initial head for every rate
    t = build_trainer(args.dataset, args.configuration, args.fold, args.trainer, args.plans,
                      torch.device(args.device), dict(head_lr=lr, num_epochs=1, **json.loads(args.set)))
    stop_workers(t)
    t.network.load_state_dict(weights)  # every key: nnU-Net's network as the user trained it
    if args.baseline:  # the placed templates before any step: what the head adds to the placement
        before = validate(t, val_batches)
    occ, start = [], time.perf_counter()
    for i, b in enumerate(train_batches):
        torch.manual_seed(args.seed + i)  # the same occupancy query points for every rate
        occ.append(t.train_step(copy.deepcopy(b))["train_occ"])
    seconds = time.perf_counter() - start
    tail = occ[-min(20, len(occ)):]
    rows = [] if not args.baseline else [dict(before, head_lr=0.0, occ_first=math.nan, occ_train_end=math.nan,
                                              seconds_per_step=math.nan)]
    return rows + [dict(validate(t, val_batches), head_lr=lr, occ_first=occ[0], occ_train_end=statistics.fmean(tail),
                        seconds_per_step=seconds / len(train_batches))]


def validate(t, val_batches) -> dict:
    """The head on the validation batches (nnU-Net's ``validation_step``, no gradient): occupancy BCE, volume ratios."""
    import numpy as np
    import torch

    t.on_validation_epoch_start()
    vals = []
    with torch.no_grad():
        for i, b in enumerate(val_batches):
            torch.manual_seed(10_000 + i)
            vals.append(t.validation_step(copy.deepcopy(b)))
    t.on_train_epoch_start()
    ratios = {n: [v[f"val_volratio_{n}"] for v in vals if np.isfinite(v[f"val_volratio_{n}"])] for n in t.mesh_names}
    return {"occ_val": statistics.fmean(v["val_occ"] for v in vals),
            "volume_ratio": {n: statistics.fmean(r) if r else float("nan") for n, r in ratios.items()},
            "in_band": {n: (sum(BAND[0] <= x <= BAND[1] for x in r) / len(r)) if r else float("nan")
                        for n, r in ratios.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_mesh")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--trainer", default="nnUNetTrainerMesh_headOnly")
    parser.add_argument("--pretrained_weights", required=True, help="checkpoint of a plain model, same plans/conf")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val_batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", default="{}", help="JSON object of trainer attributes set before initialize")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the row head_lr 0: the placed templates before any step, on the same batches")
    args = parser.parse_args(argv)
    _setup_env(tempfile.mkdtemp(prefix="bench_head_lr_"))
    import torch

    weights = torch.load(args.pretrained_weights, map_location="cpu", weights_only=False)["network_weights"]
    torch.manual_seed(args.seed)
    t = build_trainer(args.dataset, args.configuration, args.fold, args.trainer, args.plans,
                      torch.device(args.device), dict(num_epochs=1, **json.loads(args.set)))
    train_batches = [next(t.dataloader_train) for _ in range(args.steps)]
    val_batches = [next(t.dataloader_val) for _ in range(args.val_batches)]
    stop_workers(t)
    del t
    rows = []
    for i, lr in enumerate(args.lrs):
        args.baseline = i == 0 and not args.no_baseline
        rows += run_rate(args, lr, train_batches, val_batches, weights)
    names = list(rows[0]["volume_ratio"])
    print(f"\n{args.trainer} on {args.dataset} {args.configuration} ({args.plans}), fold {args.fold}, from "
          f"{args.pretrained_weights}; {args.steps} steps per rate on the same batches, {args.val_batches} "
          f"validation batches; device {args.device}, torch {torch.__version__}, {platform.machine()}")
    head = ["head_lr", "occ start", "occ train end", "occ val"] + [f"vol ratio {n} (in band)" for n in names] + \
        ["s/step"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['head_lr']:g}" if r["head_lr"] else "0 (no step)", f"{r['occ_first']:.3f}",
                 f"{r['occ_train_end']:.3f}", f"{r['occ_val']:.3f}"]
        cells += [f"{r['volume_ratio'][n]:.2f} ({r['in_band'][n]:.0%})" for n in names]
        cells.append(f"{r['seconds_per_step']:.2f}")
        cells = [c.replace("nan", "-") for c in cells]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
