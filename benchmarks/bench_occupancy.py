"""Throughput of the winding number / occupancy (a script, not a test).

Times ``nnunet_topo.occupancy.winding_number`` on an icosphere of 5120 faces (2562 vertices) against
uniform random query points, for the exact (point x face pairs) and dipole (point x vertex pairs) forms,
forward alone and forward + backward (gradient wrt the vertices), for several ``chunk_size`` values.
The design goal on the GPU is 100k points x 5k faces in <= 20 ms (forward).

Usage::

    python benchmarks/bench_occupancy.py [--device cpu|cuda] [--points 10000 100000] [--faces 5120]
        [--chunk-sizes 1048576 4194304 16777216] [--methods exact dipole] [--repeats 3]
        [--big-chunks-only]

``--big-chunks-only`` times the largest point count with the default chunk size only (CPU runs of
100k points take minutes each).
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
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    mesh = trimesh.creation.icosphere(subdivisions=ICOSPHERE_FACES[args.faces], radius=1.0)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32, device=device)
    faces = torch.tensor(mesh.faces, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {machine(device)}")
    print(f"mesh: icosphere, {faces.shape[0]} faces, {verts.shape[0]} vertices; points uniform in [-1.5, 1.5]^3; "
          f"float32; median of {args.repeats}")
    header = f"{'method':<8}{'points':>9}{'pairs':>11}{'chunk_size':>12}{'pass':>10}{'ms':>11}{'Mpairs/s':>10}"
    if device.type == "cuda":
        header += f"{'peak MiB':>10}"
    print(header)
    for n in args.points:
        pts = (torch.rand(n, 3, generator=gen) * 3.0 - 1.5).to(device)
        for method in args.methods:
            k = faces.shape[0] if method == "exact" else verts.shape[0]
            chunks = args.chunk_sizes
            if args.big_chunks_only and n == max(args.points) and len(args.points) > 1:
                chunks = [DEFAULT_CHUNK_SIZE]
            for cs in chunks:
                def forward():
                    with torch.no_grad():
                        winding_number(pts, verts, faces, method=method, chunk_size=cs)

                def forward_backward():
                    v = verts.clone().requires_grad_()
                    winding_number(pts, v, faces, method=method, chunk_size=cs).sum().backward()

                # Warm-up with blocks of the timed shape (allocator, page faults, kernels) on a slice of the
                # points, so that a CPU run of 100k points is not paid twice.
                per_block = max(1, cs // k)
                warm = pts[: min(n, 2 * per_block)]
                for _ in range(2):
                    v = verts.clone().requires_grad_()
                    winding_number(warm, v, faces, method=method, chunk_size=cs).sum().backward()
                for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t = time_call(fn, device, args.repeats)
                    row = f"{method:<8}{n:>9}{n * k:>11.2e}{cs:>12}{name:>10}{t * 1e3:>11.1f}{n * k / t / 1e6:>10.1f}"
                    if device.type == "cuda":
                        row += f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:>10.0f}"
                    print(row, flush=True)


if __name__ == "__main__":
    main()
