"""Throughput of the winding number / occupancy (a script, not a test).

Times ``nnunet_topo.occupancy.winding_number`` on an icosphere of 5120 faces (2562 vertices) against
uniform random query points, for the exact (point x face pairs) and dipole (point x vertex pairs) forms,
forward alone and forward + backward (gradient wrt the vertices), for several ``chunk_size`` values.
The design goal on the GPU is 100k points x 5k faces in <= 20 ms (forward).

Usage::

    python benchmarks/bench_occupancy.py [--device cpu|cuda] [--points 10000 100000] [--faces 5120]
        [--chunk-sizes 1048576 4194304 16777216] [--methods exact dipole] [--repeats 3]
        [--big-chunks-only] [--backends torch triton] [--smoothing 0.0]

``--big-chunks-only`` times the largest point count with the default chunk size only (CPU runs of
100k points take minutes each).

``--backends torch triton`` (default: torch only) also times ``backend="triton"`` (the fused kernels of
``nnunet_topo.occupancy_triton``; needs ``--device cuda``, or a CPU run under ``TRITON_INTERPRET=1``,
which is only a smoke test). Triton ignores ``chunk_size``, so it gets one row per method and point
count (chunk_size column ``-``); the exact form has no Triton backward (it falls back to torch), so its
``fwd+bwd`` is timed for torch only. A comparison table follows: the fastest torch time over the chunk
sizes, the Triton time, their ratio ``torch / triton`` (> 1: Triton is faster), and the largest
difference of the values (and, for the dipole, of the vertex gradient relative to its largest entry)
between the two backends.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import trimesh

from nnunet_topo.occupancy import DEFAULT_CHUNK_SIZE, winding_number

ICOSPHERE_FACES = {20 * 4 ** k: k for k in range(8)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    cpu = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        return f"{cpu}; device cuda: {torch.cuda.get_device_name(device)}"
    return f"{cpu}; device cpu"


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--points", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--faces", type=int, default=5120, choices=sorted(ICOSPHERE_FACES),
                        help="icosphere face count (20 * 4^k)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[2 ** 20, 2 ** 22, 2 ** 24])
    parser.add_argument("--methods", nargs="+", default=["exact", "dipole"], choices=["exact", "dipole"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-chunks-only", action="store_true",
                        help="for the largest point count, time only the default chunk size")
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "triton"],
                        help="winding_number backends to time (triton: CUDA, or the interpreter)")
    parser.add_argument("--smoothing", type=float, default=0.0,
                        help="dipole smoothing sigma (the TPM loss uses sigma > 0; exact ignores it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if "triton" in args.backends:
        from nnunet_topo.occupancy_triton import unavailable_reason
        reason = unavailable_reason(device)
        if reason is not None:
            raise SystemExit(f"--backends triton: {reason}")

    mesh = trimesh.creation.icosphere(subdivisions=ICOSPHERE_FACES[args.faces], radius=1.0)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32, device=device)
    faces = torch.tensor(mesh.faces, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {machine(device)}")
    print(f"mesh: icosphere, {faces.shape[0]} faces, {verts.shape[0]} vertices; points uniform in [-1.5, 1.5]^3; "
          f"float32; median of {args.repeats}")
    multi = args.backends != ["torch"]
    header = (f"{'backend':<8}" if multi else "") + \
        f"{'method':<8}{'points':>9}{'pairs':>11}{'chunk_size':>12}{'pass':>10}{'ms':>11}{'Mpairs/s':>10}"
    if device.type == "cuda":
        header += f"{'peak MiB':>10}"
    print(header)
    results = {}   # (backend, method, n, pass) -> best seconds (torch: over the chunk sizes)
    checks = {}    # (method, n) -> (max |w_triton - w_torch|, vertex-gradient max rel. difference or None)
    for n in args.points:
        pts = (torch.rand(n, 3, generator=gen) * 3.0 - 1.5).to(device)
        for method in args.methods:
            k = faces.shape[0] if method == "exact" else verts.shape[0]
            sigma = args.smoothing if method == "dipole" else 0.0
            for backend in args.backends:
                chunks = args.chunk_sizes
                if args.big_chunks_only and n == max(args.points) and len(args.points) > 1:
                    chunks = [DEFAULT_CHUNK_SIZE]
                if backend == "triton":
                    chunks = [DEFAULT_CHUNK_SIZE]       # ignored by the kernels
                for cs in chunks:
                    def forward():
                        with torch.no_grad():
                            winding_number(pts, verts, faces, method=method, chunk_size=cs, smoothing=sigma,
                                           backend=backend)

                    def forward_backward():
                        v = verts.clone().requires_grad_()
                        winding_number(pts, v, faces, method=method, chunk_size=cs, smoothing=sigma,
                                       backend=backend).sum().backward()

                    # Warm-up with blocks of the timed shape (allocator, page faults, kernels, Triton's JIT)
                    # on a slice of the points, so that a CPU run of 100k points is not paid twice.
                    per_block = max(1, cs // k)
                    warm = pts if backend == "triton" else pts[: min(n, 2 * per_block)]
                    for _ in range(2):
                        v = verts.clone().requires_grad_()
                        winding_number(warm, v, faces, method=method, chunk_size=cs, smoothing=sigma,
                                       backend=backend).sum().backward()
                        with torch.no_grad():  # the exact form's Triton kernel runs without gradients only
                            winding_number(warm, verts, faces, method=method, chunk_size=cs, smoothing=sigma,
                                           backend=backend)
                    passes = [("fwd", forward), ("fwd+bwd", forward_backward)]
                    if backend == "triton" and method == "exact":
                        passes = passes[:1]                 # no Triton backward: it would time torch's
                    for name, fn in passes:
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        t = time_call(fn, device, args.repeats)
                        key = (backend, method, n, name)
                        results[key] = min(results.get(key, float("inf")), t)
                        row = (f"{backend:<8}" if multi else "") + f"{method:<8}{n:>9}{n * k:>11.2e}"
                        row += f"{'-' if backend == 'triton' else cs:>12}{name:>10}{t * 1e3:>11.1f}"
                        row += f"{n * k / t / 1e6:>10.1f}"
                        if device.type == "cuda":
                            row += f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:>10.0f}"
                        print(row, flush=True)
            if "triton" in args.backends and "torch" in args.backends:
                sub = pts[: min(n, 20_000)]
                vals, grads = [], []
                for backend in ("torch", "triton"):
                    v = verts.clone().requires_grad_(method == "dipole")
                    w = winding_number(sub, v, faces, method=method, smoothing=sigma, backend=backend)
                    vals.append(w.detach())
                    if method == "dipole":
                        w.sum().backward()
                        grads.append(v.grad)
                checks[(method, n)] = (float((vals[1] - vals[0]).abs().max()),
                                       max_rel(grads[1], grads[0]) if grads else None)
    if "triton" in args.backends and "torch" in args.backends:
        print("\ntorch vs triton (torch: fastest chunk size; ratio = torch / triton, > 1 means Triton is faster;"
              " differences on up to 20k of the points)")
        # The first field is "method:pass" and the names differ from the main table's: a parser that keys on
        # a "method ... points" header and on rows naming a method (benchmarks/device_check.py) skips these.
        print(f"{'form:pass':<16}{'n_points':>9}{'torch_ms':>11}{'triton_ms':>11}{'ratio':>8}"
              f"{'max|dw|':>11}{'grad_rel':>11}")
        for n in args.points:
            for method in args.methods:
                dw, dg = checks[(method, n)]
                for name in ("fwd", "fwd+bwd"):
                    tt, tr = results.get(("torch", method, n, name)), results.get(("triton", method, n, name))
                    if tt is None or tr is None:
                        continue
                    print(f"{method + ':' + name:<16}{n:>9}{tt * 1e3:>11.2f}{tr * 1e3:>11.2f}{tt / tr:>8.2f}"
                          f"{dw:>11.1e}{(f'{dg:.1e}' if dg is not None else '-'):>11}", flush=True)


if __name__ == "__main__":
    main()
