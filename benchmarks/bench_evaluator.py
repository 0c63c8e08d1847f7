"""Evaluator throughput: every metric of one whole-heart-CT-sized case (a script, not a test).

Times :func:`nnunet_topo.evaluation.evaluate_case` — what ``nnUNetv2_topo_evaluate_folder`` computes per case:
nnU-Net's Dice/IoU, HD95, Betti numbers 3D and per slice, Betti errors, CCE 2D/3D, the 3D Betti priors and
all rule violation maps (TVS, VR, SVR) — on the 240 x 512 x 512 label map with 7 structures of
``bench_metrics.py`` and its perturbed copy, with a whole-heart rule set (5 exclusions, 1 inclusion with
``may_touch``, one 2D rule). File reading is not included (it depends on the disk, not on us).

Usage::

    python benchmarks/bench_evaluator.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import NAMES, SPACING, make_prediction, make_reference  # noqa: E402

from nnunet_topo.evaluation import evaluate_case  # noqa: E402
from nnunet_topo.topology_spec import parse_topology  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(NAMES)}}
    dj = {"labels": labels, "topology": {
        "rules": [{"type": "exclusion", "a": "LV", "b": "RV"}, {"type": "exclusion", "a": "LA", "b": "RA"},
                  {"type": "exclusion", "a": "LV", "b": "RA"}, {"type": "exclusion", "a": "RV", "b": "LA"},
                  {"type": "exclusion", "a": "AO", "b": "PA"},
                  {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": ["LA", "AO"]},
                  {"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 0}],
        "betti": {n: [1, 0, 0] for n in NAMES}, "betti_2d": {"axis": 0}}}
    spec = parse_topology(dj)
    ref = make_reference()
    pred = make_prediction(ref)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = evaluate_case(ref, pred, SPACING, spec, list(range(1, len(NAMES) + 1)))
        times.append(time.perf_counter() - t0)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"label map {ref.shape} uint8, {len(NAMES)} structures, {len(spec.rules)} rules")
    print(f"evaluate_case (all metrics, one case): best {min(times):.2f} s, median {sorted(times)[len(times)//2]:.2f} s "
          f"over {args.repeats} runs")
    print(f"TVS {res['topology']['TVS']:.5f}, violating voxels {res['topology']['violating_voxels']}")


if __name__ == "__main__":
    main()
