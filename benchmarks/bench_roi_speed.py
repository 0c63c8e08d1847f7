"""Per-iteration time of the mesh trainers against ``nnUNetTrainer``, and of the heart-ROI mesh configuration against
the whole-volume plans, same data, same run.

An ACDC-like synthetic dataset whose images are much larger than the heart (``--canvas``, like real cine MRI, where
most of the image is not heart) is planned twice: ``nnUNetv2_topo_plan_whole_volume`` (patch = the largest case,
the old way to train the mesh trainers) and ``nnUNetv2_topo_plan_mesh`` (patch = the heart ROI). The ``--trainers``
(default ``nnUNetTrainer`` and ``nnUNetTrainerTPM``; the mesh trainers with ``topology_start_epoch=0``, so that
L_TPM / MIE themselves are timed) are built on each ``--configurations`` exactly as ``nnUNetv2_train`` builds them,
and ``train_step`` is timed on the same pre-fetched batches (the mesh trainers' ROI loader) in interleaved rounds
(the order alternates). Printed: ms/iteration (median over rounds), each trainer / ``nnUNetTrainer`` per
configuration and ROI / whole volume per trainer (medians of same-round ratios, with their ranges). ``--profile``
adds the cumulative time of the mesh-loss functions in the last trainer's steps (cProfile).

    python benchmarks/bench_roi_speed.py --device cpu --iters 3 --rounds 3
    python benchmarks/bench_roi_speed.py --configurations roi --trainers nnUNetTrainer nnUNetTrainerMesh \
        nnUNetTrainerTPM nnUNetTrainerMIE --iters 5 --rounds 5 --profile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trainer_speed import _setup_env, build_trainer, stop_workers  # noqa: E402

DATASET = 983


def _prepare(canvas, shape, n) -> None:
    from nnunet_topo.plans import write_whole_volume_plans
    from nnunet_topo.synthetic import write_dataset

    raw, pre = os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"]
    bindir = os.path.dirname(sys.executable)
    if not any(x.startswith(f"Dataset{DATASET}_") for x in os.listdir(raw)):
        write_dataset(raw, DATASET, "acdc", num_training=n, num_test=0, seed=0, shape=shape, canvas=canvas)
    if not any(x.startswith(f"Dataset{DATASET}_") for x in os.listdir(pre)):
        subprocess.run([os.path.join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c",
                        "3d_fullres", "-np", "1", "-npfp", "1"], check=True, stdout=subprocess.DEVNULL)
    try:
        write_whole_volume_plans(str(DATASET), "3d_fullres", "nnUNetPlans", "nnUNetPlansWholeVolume")
    except FileExistsError:
        pass
    folder = next(x for x in os.scandir(pre) if x.name.startswith(f"Dataset{DATASET}_")).path
    if not os.path.isfile(os.path.join(folder, "nnUNetPlansMesh.json")):
        subprocess.run([os.path.join(bindir, "nnUNetv2_topo_plan_mesh"), "-d", str(DATASET)], check=True,
                       stdout=subprocess.DEVNULL)
    if not os.path.isdir(os.path.join(folder, "nnUNetPlansMesh_3d_mesh")):
        subprocess.run([os.path.join(bindir, "nnUNetv2_preprocess"), "-d", str(DATASET), "-plans_name",
                        "nnUNetPlansMesh", "-c", "3d_mesh", "-np", "1"], check=True, stdout=subprocess.DEVNULL)


SETUPS = {"whole": ("whole volume", "3d_fullres", "nnUNetPlansWholeVolume"),
          "roi": ("heart ROI", "3d_mesh", "nnUNetPlansMesh")}
#: the functions whose cumulative time --profile prints (the split of a mesh trainer's step)
PROFILED = ("train_step", "forward", "mesh_train_step", "head_backward", "add_bounded_feature_gradient",
            "occupancy_bce", "critical_points_both_sources", "mesh_violation_masks", "critical_point_masks",
            "critical_bce", "select_points", "sample_query_points", "backward")


def _profile(trainer, batches) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for b in batches:
        trainer.train_step(b)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = None
    rows = []
    for (filename, _, func), (_, _, _, cum, _) in stats.items():
        if func in PROFILED and ("nnunet_topo" in filename or "nnunetv2" in filename or func == "backward"):
            rows.append((cum, func, os.path.relpath(filename, os.path.dirname(os.path.dirname(filename)))))
            if func == "train_step":
                total = max(total or 0.0, cum)
    print(f"profile of {type(trainer).__name__}, {len(batches)} steps (cumulative s, share of train_step):")
    for cum, func, where in sorted(rows, reverse=True):
        share = f"{cum / total:6.1%}" if total else ""
        print(f"  {cum:8.3f}  {share}  {func:<30} {where}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--canvas", type=int, nargs=3, default=(10, 176, 176), metavar=("Z", "Y", "X"),
                        help="image size (default 10 x 176 x 176, about an ACDC image at 1.5 mm)")
    parser.add_argument("--shape", type=int, nargs=3, default=(10, 64, 64), metavar=("Z", "Y", "X"),
                        help="size of the heart phantom block inside the image")
    parser.add_argument("-n", type=int, default=6, help="training cases")
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerTPM"],
                        help="trainers to time (nnUNetTrainer is always included: the ratios' denominator)")
    parser.add_argument("--configurations", nargs="+", default=["whole", "roi"], choices=sorted(SETUPS))
    parser.add_argument("--profile", action="store_true", help="cProfile split of the last trainer's step (ROI)")
    parser.add_argument("--attr", action="append", default=[], metavar="NAME=JSON",
                        help="trainer attribute for every trainer but nnUNetTrainer, e.g. mesh_backbone_grad_share=0")
    args = parser.parse_args(argv)
    attrs = {a.split("=", 1)[0]: json.loads(a.split("=", 1)[1]) for a in args.attr}
    names = ["nnUNetTrainer"] + [t for t in args.trainers if t != "nnUNetTrainer"]
    mesh_name = next((t for t in names if t != "nnUNetTrainer"), None)

    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    import torch

    _setup_env(tempfile.mkdtemp(prefix="nnunet_topo_bench_roi_"))
    _prepare(tuple(args.canvas), tuple(args.shape), args.n)
    device = torch.device(args.device)
    setups = {SETUPS[c][0]: SETUPS[c][1:] for c in args.configurations}
    runs, batches, info = {}, {}, {}
    for label, (conf, plans) in setups.items():
        for name in names:
            extra = {} if name == "nnUNetTrainer" else attrs
            runs[(label, name)] = build_trainer(str(DATASET), conf, 0, name, plans, device,
                                                dict({"topology_start_epoch": 0}, **extra))
        # the mesh trainers' loader places the patches (heart ROI); nnUNetTrainer is timed on the same batches
        first = runs[(label, mesh_name or "nnUNetTrainer")]
        batches[label] = [next(first.dataloader_train) for _ in range(args.iters)]
        info[label] = (list(first.configuration_manager.patch_size), list(first.configuration_manager.spacing),
                       first.configuration_manager.batch_size)
        for name in names:
            stop_workers(runs[(label, name)])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for key, t in runs.items():
        for b in batches[key[0]][: args.warmup]:
            t.train_step(b)
    keys = list(runs)
    times = {k: [] for k in keys}
    for r in range(args.rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            sync()
            t0 = time.perf_counter()
            for b in batches[k[0]]:
                runs[k].train_step(b)
            sync()
            times[k].append((time.perf_counter() - t0) / args.iters * 1000)

    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {dev}; torch {torch.__version__}; {args.iters} iterations x {args.rounds} rounds; "
          f"image {list(args.canvas)}, heart block {list(args.shape)}, {args.n} cases; attributes {attrs}")
    for label, (patch, spacing, bs) in info.items():
        print(f"  {label:<13} {setups[label][1]}/{setups[label][0]}: patch {patch}, spacing "
              f"{[round(s, 3) for s in spacing]}, batch {bs}")

    def ratio(a, b):
        rs = [x / y for x, y in zip(times[a], times[b])]
        return f"{statistics.median(rs):.3f} ({min(rs):.3f}..{max(rs):.3f})"

    print(f"{'trainer':<20}{'configuration':<15}{'ms/iter':>10}   / nnUNetTrainer (same round)")
    for (label, name) in keys:
        extra = ratio((label, name), (label, "nnUNetTrainer")) if name != "nnUNetTrainer" else ""
        print(f"{name:<20}{label:<15}{statistics.median(times[(label, name)]):>10.0f}   {extra}")
    if len(setups) == 2:
        for name in names:
            print(f"ROI / whole volume, {name}: {ratio(('heart ROI', name), ('whole volume', name))}")
    print(json.dumps({f"{k[0]}|{k[1]}": round(statistics.median(v), 1) for k, v in times.items()}))
    if args.profile and mesh_name is not None:
        label = "heart ROI" if "heart ROI" in setups else next(iter(setups))
        _profile(runs[(label, names[-1])], batches[label])


if __name__ == "__main__":
    main()
