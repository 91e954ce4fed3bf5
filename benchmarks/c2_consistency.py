"""C2 consistency (Eq. 15): our streaming O(N * D) accumulators vs the dense N x N formulation.

Two cases, each run in its own subprocess so that peak memory (ru_maxrss) is per method:

* ``concepts``: C concepts (default 16,384) with k selected images each (default 60), D = 384.
  The authors' way (``weighted_pairwise_cosine_similarity`` in ``analysis/dino_consistency.py``)
  keeps every embedding row in memory and builds a k x k cosine matrix per concept in a Python
  loop; ours folds chunks of embeddings into per-concept sums as they arrive.
* ``random``: the random-baseline concept, one embedding per evaluation image (N = 50,000 on
  ImageNet). Dense builds N x N float64 matrices (20 GB each at N = 50,000, so it runs at a
  smaller ``--random-n-dense``); ours streams the N embeddings in chunks.

Embeddings are generated chunk by chunk from a seeded generator, identically for both methods;
times are medians over ``--repeats`` runs of the consistency computation alone (generation
excluded), peak memory is the process's maximum RSS (and that above an idle ``import torch``
process). Both methods' scores are compared. Run: ``uv run python benchmarks/c2_consistency.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CHUNK = 64  # concepts per generated chunk (case "concepts")
ROW_CHUNK = 2048  # embeddings per generated chunk (case "random")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _concept_chunks(n_concepts: int, k: int, dim: int):
    for c0 in range(0, n_concepts, CHUNK):
        g = torch.Generator().manual_seed(c0)
        c = min(CHUNK, n_concepts - c0)
        centre = torch.randn(c, 1, dim, generator=g)  # a shared direction per concept
        emb = (torch.randn(c, k, dim, generator=g) + centre).reshape(c * k, dim)
        w = torch.rand(c * k, generator=g, dtype=torch.float64) + 0.01
        yield c0, c, emb, w


def _row_chunks(n: int, dim: int):
    for r0 in range(0, n, ROW_CHUNK):
        g = torch.Generator().manual_seed(10_000 + r0)
        r = min(ROW_CHUNK, n - r0)
        yield (
            torch.randn(r, dim, generator=g) + 0.05,
            torch.rand(r, generator=g, dtype=torch.float64),
        )


def _dense_weighted(x: torch.Tensor, w: torch.Tensor) -> float:
    """The authors' formulation: normalised weights, unit rows, full cosine matrix, off-diagonal."""
    w = (w / w.sum()).double()
    x = torch.nn.functional.normalize(x.double(), dim=1)
    sim = x @ x.T
    ww = w[:, None] * w[None, :]
    ww.fill_diagonal_(0)
    return float((ww * sim).sum() / ww.sum())


def worker(case: str, method: str, args: argparse.Namespace) -> dict:
    from c2score.consistency import ConsistencyAccumulator

    torch.set_num_threads(args.threads)
    times: list[float] = []
    scores = torch.zeros(0)
    if case == "idle":
        return {"peak_rss_mb": _peak_rss_mb()}
    if case == "concepts":
        c_total, k, d = args.concepts, args.k, args.dim
        if method == "dense":
            rows = torch.empty(c_total * k, d)  # every embedding row held, as the authors do
            weights = torch.empty(c_total * k, dtype=torch.float64)
            for c0, c, emb, w in _concept_chunks(c_total, k, d):
                rows[c0 * k : (c0 + c) * k] = emb
                weights[c0 * k : (c0 + c) * k] = w
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                scores = torch.tensor(
                    [
                        _dense_weighted(rows[i * k : (i + 1) * k], weights[i * k : (i + 1) * k])
                        for i in range(c_total)
                    ]
                )
                times.append(time.perf_counter() - t0)
        else:
            for _ in range(args.repeats):
                acc = ConsistencyAccumulator(c_total, d)
                elapsed = 0.0
                for c0, c, emb, w in _concept_chunks(c_total, k, d):
                    t0 = time.perf_counter()
                    slots = torch.arange(c0, c0 + c).repeat_interleave(k)
                    acc.add_embeddings(slots, emb, w)
                    elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                scores = acc.consistency()
                times.append(elapsed + time.perf_counter() - t0)
    else:
        n = args.random_n_dense if method == "dense" else args.random_n
        if method == "dense":
            parts = list(_row_chunks(n, args.dim))
            x = torch.cat([p[0] for p in parts])
            w = torch.cat([p[1] for p in parts])
            del parts
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                scores = torch.tensor([_dense_weighted(x, w)])
                times.append(time.perf_counter() - t0)
        else:
            for _ in range(args.repeats):
                acc = ConsistencyAccumulator(1, args.dim)
                elapsed = 0.0
                for x, w in _row_chunks(n, args.dim):
                    t0 = time.perf_counter()
                    acc.add_embeddings(torch.zeros(len(w), dtype=torch.long), x, w)
                    elapsed += time.perf_counter() - t0
                scores = acc.consistency()
                times.append(elapsed)
    torch.save(scores, args.scores_out)
    return {"median_s": statistics.median(times), "times_s": times, "peak_rss_mb": _peak_rss_mb()}


def _spawn(case: str, method: str, args: argparse.Namespace, extra: list[str]) -> dict:
    out = f"/tmp/c2bench_{case}_{method}.pt"
    cmd = [sys.executable, __file__, "--worker", case, method, "--scores-out", out, *extra]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["scores"] = out
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, default=16_384)
    p.add_argument("--k", type=int, default=60)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--random-n", type=int, default=50_000)
    p.add_argument("--random-n-dense", type=int, default=12_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cases", nargs="+", choices=["concepts", "random"], default=["concepts", "random"]
    )
    p.add_argument("--worker", nargs=2, default=None)
    p.add_argument("--scores-out", default="")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    extra = [
        f"--concepts={args.concepts}", f"--k={args.k}", f"--dim={args.dim}",
        f"--random-n={args.random_n}", f"--random-n-dense={args.random_n_dense}",
        f"--repeats={args.repeats}", f"--threads={args.threads}",
    ]  # fmt: skip
    idle = _spawn("idle", "none", args, extra)["peak_rss_mb"]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); idle process peak RSS {idle:.0f} MB"
    )
    for case, label in (
        ("concepts", f"{args.concepts} concepts x {args.k} images, D={args.dim}"),
        (
            "random",
            f"random baseline, D={args.dim}: dense N={args.random_n_dense}, ours N={args.random_n_dense} and {args.random_n}",
        ),
    ):
        if case not in args.cases:
            continue
        print(f"\n## {label}")
        runs = {m: _spawn(case, m, args, extra) for m in ("dense", "stream")}
        if case == "random":  # ours also at the dense size, for a like-for-like comparison
            small = [*extra[:3], f"--random-n={args.random_n_dense}", *extra[4:]]
            runs["stream_same_n"] = _spawn(case, "stream", args, small)
            a, b = (
                torch.load(runs["dense"]["scores"], weights_only=True),
                torch.load(runs["stream_same_n"]["scores"], weights_only=True),
            )
            peer = "stream_same_n"
        else:
            a, b = (
                torch.load(runs["dense"]["scores"], weights_only=True),
                torch.load(runs["stream"]["scores"], weights_only=True),
            )
            peer = "stream"
        print(f"{'method':<16}{'median s':>10}{'peak RSS MB':>13}{'above idle MB':>15}")
        for m, r in runs.items():
            print(
                f"{m:<16}{r['median_s']:>10.3f}{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] - idle:>15.0f}"
            )
        d, s = runs["dense"], runs[peer]
        print(
            f"max |score diff| = {float((a - b).abs().max()):.2e}; dense/ours ({peer}): "
            f"time {d['median_s'] / s['median_s']:.1f}x, peak RSS above idle "
            f"{(d['peak_rss_mb'] - idle) / max(s['peak_rss_mb'] - idle, 1.0):.1f}x"
        )


if __name__ == "__main__":
    main()
