"""Generation speed of the concept world (fact_model.world) on one core.

Images per second for the default 64x64 world (``WorldConfig()``), one thread (numpy / BLAS /
torch threads = 1), fresh image indices every repeat, median over ``--repeats`` runs:

* ``images``: ``ConceptWorld.images`` -- pixels and labels only (the training-data path);
* ``batch``: ``ConceptWorld.batch`` -- pixels, labels, per-pixel concept masks and presence;
* ``sample``: ``ConceptWorld.sample`` called once per image (the same, one image at a time).

Each figure is given in wall-clock and in process CPU time; the process is single-threaded, so
CPU time is what one core delivers even on a shared machine. The script also checks that the
three paths give the same pixels (and ``batch`` / ``sample`` the same masks).

    OMP_NUM_THREADS=1 uv run python benchmarks/world_speed.py [--n 2000] [--repeats 7] [--size 64]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fact_model.world import ConceptWorld, WorldConfig  # noqa: E402


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=64, help="image size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = ConceptWorld(WorldConfig(image_size=args.size))
    world.batch(range(50))  # warm-up (caches, imports)
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start; python {platform.python_version()}, numpy "
        f"{np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} thread)"
    )
    print(f"{args.n} images of {args.size}x{args.size} per run, median of {args.repeats} runs")

    # Same pixels on every path (and same masks for batch / sample).
    check = range(10**6, 10**6 + 20)
    b = world.batch(check, "train")
    imgs, labels = world.images("train", len(check), start=check[0])
    assert np.array_equal(b.images, imgs) and np.array_equal(b.labels, labels)
    for k, i in enumerate(check):
        s = world.sample(i, "train")
        assert np.array_equal(s.image, imgs[k]) and np.array_equal(s.masks, b.masks[k])

    paths = {
        "images (pixels + labels)": lambda s: world.images("train", args.n, start=s),
        "batch (+ masks, presence)": lambda s: world.batch(range(s, s + args.n), "train"),
        "sample (one at a time)": lambda s: [
            world.sample(i, "train") for i in range(s, s + args.n)
        ],
    }
    start = 0
    for name, call in paths.items():
        walls, cpus = [], []
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            call(start)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            start += args.n  # fresh images every run
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(
            f"{name:27s} {args.n / wall:7.0f} img/s wall  {args.n / cpu:7.0f} img/s CPU  "
            f"({1e6 * cpu / args.n:.0f} us CPU per image)"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
