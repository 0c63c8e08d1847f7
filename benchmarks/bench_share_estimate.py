"""How well the predicted share bound (``mesh_share_every = k``, nnunet_topo/mesh_step.py ``ShareEstimate``) keeps
the bound it predicts, on a real training trajectory.

A mesh trainer is built as ``nnUNetv2_train`` builds it (optionally from ``--pretrained_weights``, as the ACDC study's
fine-tunes start) and trained ``--steps`` steps with the **exact** bound at every step (``mesh_share_every = 1``),
on fresh batches of its own loader. Every step records ``||∇L_seg||``, the norm of the pulled-back mesh gradient
``||J^T g||`` and of the feature gradient ``||g||``. Then, for each ``--every k``, the steps are replayed as the
predicted scheme would see them (exact at steps 0, k, 2k, ...; in between the factor
``min(1, share * ||∇L_seg||_e / (gain_e * ||g||_t))`` from the last exact step e, gain = ``||J^T g|| / ||g||``), and
printed: over the predicted steps, the realised share ``factor * ||J^T g||_t / ||∇L_seg||_t`` relative to the
allowed ``share`` (1 = exactly at the bound; above 1 = the bound exceeded), and the factor relative to the exact one.
The trajectory is the exact scheme's (the predicted one would drift from it by what the table shows).

    nnUNet_preprocessed=... nnUNet_results=/tmp/x python benchmarks/bench_share_estimate.py -d 127 -c 3d_mesh \\
        -p nnUNetPlansMesh4.5mm --pretrained_weights BACKBONE/checkpoint_final.pth --steps 40 --every 2 5 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trainer_speed import _setup_env, build_trainer  # noqa: E402


def replay(records, every: int, share: float, margin: float = 1.0):
    """The predicted scheme on recorded exact steps, through the trainers' own :class:`ShareEstimate` (which steps
    are exact, what they record, the predicted factor): ``(realised share / share, factor / exact factor)`` per
    predicted step with a mesh gradient. ``records``: dicts with ``seg``, ``mesh``, ``feat``, ``factor`` (floats)."""
    import torch

    from nnunet_topo.mesh_step import ShareEstimate

    est = ShareEstimate(every, margin)
    out = []
    for r in records:
        seg, mesh, feat = (torch.tensor(r[k], dtype=torch.float64) for k in ("seg", "mesh", "feat"))
        if est.exact_due():
            est.record_exact(seg, mesh, feat)
            continue
        c = float(est.predicted_factor(share, feat))
        if r["mesh"] > 0 and r["feat"] > 0 and r["seg"] > 0:
            out.append((c * r["mesh"] / (share * r["seg"]), c / r["factor"] if r["factor"] > 0 else float("nan")))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_mesh")
    parser.add_argument("-p", "--plans", default="nnUNetPlansMesh")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerMesh")
    parser.add_argument("--pretrained_weights", default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--share", type=float, default=None, help="default: the trainer's mesh_backbone_grad_share")
    parser.add_argument("--margin", type=float, nargs="+", default=None,
                        help="safety margins to replay (default: 1 and ShareEstimate.MARGIN)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    import torch

    from nnunet_topo import mesh_step

    _setup_env(tempfile.mkdtemp(prefix="nnunet_topo_bench_share_"))
    attrs = {"mesh_share_every": 1}
    if args.share is not None:
        attrs["mesh_backbone_grad_share"] = args.share
    t = build_trainer(args.dataset, args.configuration, 0, args.trainer, args.plans, torch.device(args.device), attrs)
    if args.pretrained_weights:
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

        load_pretrained_weights(t.network, args.pretrained_weights, verbose=False)
    share = float(t.mesh_backbone_grad_share)
    records = []
    real = mesh_step.add_bounded_feature_gradient

    def recording(params, features, feature_grads, s, ddp=False):
        feat = mesh_step.grad_norm(feature_grads).item()
        seg, mesh, factor = real(params, features, feature_grads, s, ddp=ddp)
        records.append(dict(seg=seg.item(), mesh=mesh.item(), feat=feat, factor=factor.item()))
        return seg, mesh, factor

    mesh_step.add_bounded_feature_gradient = recording
    for i in range(args.steps):
        t.train_step(next(t.dataloader_train))
        r = records[-1]
        print(f"step {i:3d}: ||grad L_seg|| {r['seg']:.4g}  ||J^T g|| {r['mesh']:.4g}  ||g|| {r['feat']:.4g}  "
              f"exact factor {r['factor']:.4g}", flush=True)
    for dl in (t.dataloader_train, t.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    print(f"\n{args.trainer}, {args.configuration}/{args.plans}, share {share}, {args.steps} steps, "
          f"pretrained: {args.pretrained_weights or 'no'}; device {args.device}")
    print(f"{'every':>6} {'margin':>7} {'predicted':>10} {'realised/share: median':>24} {'p90':>7} {'max':>7} "
          f"{'> 1.1':>7}   factor/exact: median (range)")
    for k, margin in [(k, m) for k in args.every for m in (args.margin or [1.0, mesh_step.ShareEstimate.MARGIN])]:
        rows = replay(records, k, share, margin)
        if not rows:
            print(f"{k:>6} {margin:>7} {0:>10}")
            continue
        real_share = sorted(x for x, _ in rows)
        ratio = sorted(y for _, y in rows if y == y)
        p90 = real_share[min(len(real_share) - 1, int(0.9 * len(real_share)))]
        over = sum(x > 1.1 for x in real_share) / len(real_share)
        print(f"{k:>6} {margin:>7} {len(rows):>10} {statistics.median(real_share):>24.3f} {p90:>7.3f} "
              f"{max(real_share):>7.3f} {over:>7.0%}   {statistics.median(ratio):.3f} "
              f"({min(ratio):.3f}..{max(ratio):.3f})")


if __name__ == "__main__":
    main()
