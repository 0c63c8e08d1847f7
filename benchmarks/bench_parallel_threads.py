"""Two CPU trainings at once on one machine: torch threads per training (``NNUNET_TOPO_CPU_THREADS``).

nnU-Net's ``run_training`` gives a CPU training ``multiprocessing.cpu_count()`` torch threads. The ACDC study runs two
trainings at once on 2 cores, i.e. 4 threads on 2 cores. This script runs two processes side by side, each doing
training steps (forward, backward, SGD step) of the network nnU-Net planned for the study (``PlainConvUNet``, 4 stages,
32-256 features, patch 20 x 56 x 64, batch 2; change with the options), first with ``cpu_count()`` threads each, then
with ``--threads`` each, alternating ``--rounds`` times, and prints the seconds per step and the ratio.

    python benchmarks/bench_parallel_threads.py [--steps 6] [--rounds 2] [--threads 1]

Run it on an idle machine (it measures contention between its own two processes).
"""
import argparse
import multiprocessing as mp
import platform
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet


def _steps(threads: int, steps: int, patch, batch: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = PlainConvUNet(1, 4, [32, 64, 128, 256], torch.nn.Conv3d, [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                        [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [2, 2, 2, 2], 4, [2, 2, 2], conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    opt = torch.optim.SGD(net.parameters(), 1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *patch)
    net(x).mean().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        net(x).mean().backward()
        opt.step()
    queue.put((time.perf_counter() - t0) / steps)


def side_by_side(threads: int, steps: int, patch, batch: int) -> float:
    """Mean seconds per step of two processes running at once with ``threads`` torch threads each."""
    queue = mp.Queue()
    procs = [mp.Process(target=_steps, args=(threads, steps, patch, batch, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return sum(queue.get() for _ in procs) / len(procs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--patch", type=int, nargs=3, default=[20, 56, 64])
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    default = mp.cpu_count()
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, {default} cores, "
          f"torch {torch.__version__}")
    a, b = [], []
    for _ in range(args.rounds):
        a.append(side_by_side(default, args.steps, args.patch, args.batch))
        b.append(side_by_side(args.threads, args.steps, args.patch, args.batch))
        print(f"2 trainings x {default} threads: {a[-1]:.2f} s/step; x {args.threads}: {b[-1]:.2f} s/step", flush=True)
    print(f"mean: {sum(a) / len(a):.2f} against {sum(b) / len(b):.2f} s/step; "
          f"{args.threads} thread(s) each is x{sum(a) / sum(b):.2f} the speed of {default} each")


if __name__ == "__main__":
    main()
