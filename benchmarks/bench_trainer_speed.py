"""Per-iteration training time of topology trainers as a ratio to the plain nnUNetTrainer, same run.

For one preprocessed dataset/configuration/fold, every trainer is built exactly as ``nnUNetv2_train`` builds it
(nnU-Net's ``get_trainer_from_args`` + ``initialize`` + ``on_train_start``), then ``train_step`` is timed on the
SAME pre-fetched batches for every trainer (data loading excluded: it is identical for all of them). Trainers are
timed in interleaved rounds (A, B, then B, A, ...) so drift of the machine hits all of them alike. The ratio is the
median over rounds of ``ms/iteration of trainer / ms/iteration of nnUNetTrainer`` in the same round, printed with
its range over rounds (on a busy 2-core CPU the range is wide: read it before reading the median).
The topology terms are timed from the first step (``--set`` defaults to ``{"topology_start_epoch": 0}``): the first
phase of a trainer's schedule is plain nnU-Net (documentation/trainers.md "Schedule"), so ``--set '{}'`` would time
ProjPool and Betti without their terms and TPM without L_TPM.

Usage (creates and preprocesses a synthetic dataset if ``-d`` is not given)::

    python benchmarks/bench_trainer_speed.py --device cpu --iters 10 --rounds 3
    python benchmarks/bench_trainer_speed.py -d 27 -c 3d_fullres --device cuda --iters 50 --rounds 5
    # mesh trainers need a patch that holds whole structures: --whole_volume writes and uses
    # nnUNetPlansWholeVolume (nnUNetv2_topo_plan_whole_volume) for every trainer, nnUNetTrainer included
    python benchmarks/bench_trainer_speed.py --whole_volume --trainers nnUNetTrainerTPM nnUNetTrainerMIE

Environment: the nnUNet_raw / nnUNet_preprocessed / nnUNet_results variables are honoured if set; otherwise a
temporary folder is used.
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


def _setup_env(workdir: str) -> None:
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(k):
            os.environ[k] = os.path.join(workdir, k)
            os.makedirs(os.environ[k], exist_ok=True)
    from nnunet_topo.trainers import TRAINER_DIR
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if TRAINER_DIR not in ext:
        ext.append(TRAINER_DIR)
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(ext)


def _make_dataset(dataset_id: int, preset: str, shape) -> None:
    from nnunet_topo.synthetic import write_dataset
    raw = os.environ["nnUNet_raw"]
    if not any(n.startswith(f"Dataset{dataset_id:03d}_") for n in os.listdir(raw)):
        write_dataset(raw, dataset_id, preset=preset, num_training=6, num_test=0, seed=0, shape=shape)
    pre = os.environ["nnUNet_preprocessed"]
    if not any(n.startswith(f"Dataset{dataset_id:03d}_") for n in os.listdir(pre)):
        bindir = os.path.dirname(sys.executable)
        subprocess.run([os.path.join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c",
                        "3d_fullres", "-np", "1", "-npfp", "1"], check=True, stdout=subprocess.DEVNULL)


def build_trainer(dataset: str, configuration: str, fold: int, name: str, plans: str, device, attrs: dict):
    """A trainer as ``nnUNetv2_train`` builds it, ``attrs`` set where it has them, up to its first epoch start."""
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(dataset, configuration, fold, name, plans, device=device)
    for k, v in attrs.items():
        if hasattr(t, k):
            setattr(t, k, v)
    t.initialize()
    t.on_train_start()
    t.on_train_epoch_start()  # as nnU-Net's run_training: train mode, lr, the schedule's phase
    return t


def stop_workers(trainer) -> None:
    """Stop a trainer's augmentation workers so that they do not compete with the timed steps."""
    for dl in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default=None, help="dataset ID/name (default: make synthetic 981)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainerProjPool"],
                        help="trainers to compare with nnUNetTrainer")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--preset", default="acdc")
    parser.add_argument("--shape", type=int, nargs=3, default=(10, 64, 64))
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (same for every trainer)")
    parser.add_argument("--whole_volume", action="store_true",
                        help="write nnUNetPlansWholeVolume with nnUNetv2_topo_plan_whole_volume and use it")
    parser.add_argument("--set", default='{"topology_start_epoch": 0}',
                        help="JSON object of class attributes set on every trainer that has them, before initialize "
                             "(default: '{\"topology_start_epoch\": 0}', the topology terms, L_TPM included, from "
                             "the first step rather than the first phase of the schedule, which is plain nnU-Net's "
                             "loss); it replaces the default, so repeat topology_start_epoch when adding keys")
    args = parser.parse_args(argv)

    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    import torch
    workdir = tempfile.mkdtemp(prefix="nnunet_topo_bench_")
    _setup_env(workdir)
    dataset = args.dataset
    if dataset is None:
        dataset = "981"
        _make_dataset(981, args.preset, tuple(args.shape))
    if args.whole_volume:
        from nnunet_topo.plans import write_whole_volume_plans
        try:
            write_whole_volume_plans(str(dataset), args.configuration, args.plans, "nnUNetPlansWholeVolume")
        except FileExistsError:
            pass  # written before (e.g. by the user): used as it is, never overwritten
        args.plans = "nnUNetPlansWholeVolume"

    device = torch.device(args.device)
    names = ["nnUNetTrainer"] + list(args.trainers)
    trainers = {name: build_trainer(str(dataset), args.configuration, args.fold, name, args.plans, device,
                                    json.loads(args.set)) for name in names}
    # the same batches for everybody
    first = trainers[names[0]]
    batches = [next(first.dataloader_train) for _ in range(args.iters)]
    for t in trainers.values():
        stop_workers(t)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for t in trainers.values():
        for b in batches[: args.warmup]:
            t.train_step(b)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):  # alternate the order: no trainer always runs first
            t = trainers[n]
            sync()
            t0 = time.perf_counter()
            for b in batches:
                t.train_step(b)
            sync()
            times[n].append((time.perf_counter() - t0) / len(batches) * 1000)
    cm = first.configuration_manager
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.processor() or platform.machine()} " \
                                                                      f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"device: {dev}; torch {torch.__version__}")
    print(f"dataset {dataset}, {args.configuration}, plans {args.plans}, patch {list(cm.patch_size)}, "
          f"batch {cm.batch_size}, "
          f"{args.iters} iterations x {args.rounds} rounds")
    base = times["nnUNetTrainer"]
    print(f"{'trainer':<32}{'ms/iter (median)':>18}{'ratio (median of rounds)':>26}{'min..max':>16}")
    for n in names:
        ratios = [a / b for a, b in zip(times[n], base)]  # same round: nearly the same machine state
        print(f"{n:<32}{statistics.median(times[n]):>18.1f}{statistics.median(ratios):>26.3f}"
              f"{min(ratios):>8.3f}..{max(ratios):.3f}")


if __name__ == "__main__":
    main()
