"""Time of a fold job's trainer construction with and without ``nnUNetv2_topo_precompute`` (examples/cluster/).

Before training, ``nnUNetv2_train`` builds the trainer; an nnunet-topo trainer's constructor checks the rules on the
reference labels and a mesh trainer's builds its templates and heart-ROI boxes from every preprocessed case, unless
the precompute has left them in the caches and the model folder. Measured on an existing preprocessed dataset,
which is only read: its folder is mirrored into a temporary ``nnUNet_preprocessed`` (symlinks to every entry except
nnunet-topo's caches ``nnunet_topo_*.json``), with empty temporary ``nnUNet_raw`` and ``nnUNet_results``. Per round:

1. *without*: fold 0's trainer built as ``nnUNetv2_train`` builds it (``get_trainer_from_args``, CPU), no cache;
2. ``nnUNetv2_topo_precompute`` (wall time of the command, imports included), after the caches are removed;
3. *with*: fold 1's trainer built the same way, as a fold job of the array is.

Each construction runs in a fresh Python process, as a fold job does; the constructor alone is timed (imports
excluded). Prints the seconds per round and the medians.

    python benchmarks/bench_precompute.py -d 993 -c 3d_fullres -p nnUNetPlans -tr nnUNetTrainerTPM --rounds 3
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CONSTRUCT = """
import json, sys, time, torch
from nnunetv2.run.run_training import get_trainer_from_args
t = time.perf_counter()
get_trainer_from_args(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], device=torch.device("cpu"))
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _mirror(dataset_folder: str, root: str) -> str:
    """A folder in ``root`` with symlinks to every entry of ``dataset_folder`` except nnunet-topo's caches."""
    out = os.path.join(root, os.path.basename(os.path.normpath(dataset_folder)))
    os.makedirs(out)
    for name in os.listdir(dataset_folder):
        if not name.startswith("nnunet_topo_"):
            os.symlink(os.path.join(dataset_folder, name), os.path.join(out, name))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset ID or name (in $nnUNet_preprocessed; only read)")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-tr", default="nnUNetTrainerTPM")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_topo.trainers import TRAINER_DIR

    name = maybe_convert_to_dataset_name(args.d)
    source = os.path.join(os.environ["nnUNet_preprocessed"], name)
    env = dict(os.environ, nnUNet_compile="f", nnUNet_extTrainer=os.pathsep.join(
        [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p] + [TRAINER_DIR]))
    env.pop("nnUNet_wandb_enabled", None)
    rows = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
                env[var] = os.path.join(tmp, var)
                os.makedirs(env[var])
            pre = _mirror(source, env["nnUNet_preprocessed"])

            def construct(fold: int) -> float:
                out = subprocess.run([sys.executable, "-c", CONSTRUCT, name, args.c, str(fold), args.tr, args.p],
                                     env=env, capture_output=True, text=True, check=True)
                return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]

            without = construct(0)
            for cache in glob.glob(os.path.join(pre, "nnunet_topo_*.json")):
                os.remove(cache)
            shutil.rmtree(os.path.join(env["nnUNet_results"], name), ignore_errors=True)
            t = time.perf_counter()
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_topo_precompute"), "-d", name,
                            "-c", args.c, "-p", args.p, "-tr", args.tr], env=env, capture_output=True, check=True)
            rows.append((without, time.perf_counter() - t, construct(1)))
        print(f"round {len(rows)}: construction without precompute {rows[-1][0]:.2f} s, precompute command "
              f"{rows[-1][1]:.2f} s, construction after it {rows[-1][2]:.2f} s", flush=True)
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    print(f"{name} {args.c} {args.p} {args.tr}: median over {len(rows)} round(s): a fold's trainer construction "
          f"{med[0]:.2f} s without the precompute, {med[2]:.2f} s with it; the precompute command {med[1]:.2f} s")


if __name__ == "__main__":
    main()
