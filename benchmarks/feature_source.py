"""SAE-trainer throughput from the native feature store vs a local Hugging Face ``datasets`` copy.

Run from the repository root:

    uv run python benchmarks/feature_source.py [--rows 131072] [--dim 512] [--repeats 3]

A synthetic FaCT feature set (``rows`` x ``dim`` float32 with image/position/label metadata) is
written once as a ``topk-sae`` sharded store and exported to Parquet with
``fact_model.hf_features.export_feature_set``. Then, in one run and interleaved:

* **read** -- one shuffled epoch of batches, nothing else: ``StoreSource`` (native store),
  ``HFFeatureSource`` over ``load_dataset("parquet")`` (map-style, memory-mapped Arrow) and over
  ``load_dataset(..., streaming=True)``;
* **train** -- ``topk_sae.train`` for one epoch from each source (``--latents`` latents,
  ``--k``), i.e. the rows/s the trainer actually gets.

Figures are medians of rows/s over ``--repeats`` runs; one untimed training run comes first and
the order of the sources rotates between repeats, so one-time costs and drifting machine load
do not fall on one source.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _make(root: Path, rows: int, dim: int):
    from fact_model.features import FeatureSet
    from topk_sae import FeatureStoreWriter, ShardedFeatureStore

    g = torch.Generator().manual_seed(0)
    path = root / "fs" / "train"
    with FeatureStoreWriter(
        path,
        dim,
        metadata=("image_index", "position", "label"),
        attributes={"provenance": {"layer": "synthetic"}},
    ) as w:
        for s in range(0, rows, 16384):
            n = min(16384, rows - s)
            w.append(torch.randn(n, dim, generator=g).abs(), image_index=torch.arange(s, s + n) // 16,
                     position=torch.arange(n) % 16, label=torch.arange(n) % 10)  # fmt: skip
    store = ShardedFeatureStore(path)
    return FeatureSet(root / "fs", store, None, {"layer": "synthetic"}, [], {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import datasets

    from fact_model.hf_features import HFFeatureSource, export_feature_set
    from topk_sae import TrainConfig, train

    datasets.disable_progress_bars()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.rows} rows x {args.dim} float32 ({args.rows * args.dim * 4 / 2**20:.0f} MiB), batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fs = _make(root, args.rows, args.dim)
        folder = export_feature_set(fs, root / "hf", rows_per_file=1 << 16)
        local = datasets.load_dataset(str(folder), split="train", cache_dir=str(root / "cache"))
        stream = datasets.load_dataset(str(folder), split="train", streaming=True)

        sources = {
            "native store": lambda: fs.train.source(args.batch, seed=0),
            "datasets (map-style)": lambda: HFFeatureSource(local, args.batch, seed=0),
            "datasets (streaming)": lambda: HFFeatureSource(
                stream, args.batch, seed=0, num_rows=args.rows, buffer_size=1 << 15
            ),
        }
        read: dict[str, list[float]] = {k: [] for k in sources}
        trained: dict[str, list[float]] = {k: [] for k in sources}
        cfg = TrainConfig(n_latents=args.latents, k=args.k, epochs=1, warmup_epochs=0.1, hold_epochs=0.1,
                          progress=False, uncentered_warn_ratio=1e9, checkpoint_every=10**9, device="cpu")  # fmt: skip
        names = list(sources)
        train(cfg, sources[names[0]](), out_dir=root / "warm-up", resume=False)  # one-time costs
        for r in range(args.repeats):
            # the order rotates between repeats, so no source always runs first (or last)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                make = sources[name]
                src = make()
                src.set_epoch(r)
                t = time.perf_counter()
                n = sum(b.shape[0] for b in src)
                read[name].append(n / (time.perf_counter() - t))
                t = time.perf_counter()
                train(
                    cfg,
                    make(),
                    out_dir=root / f"run-{r}-{len(trained[name])}-{name[:6]}",
                    resume=False,
                )
                trained[name].append(args.rows / (time.perf_counter() - t))
        print(f"{'source':24s} {'read rows/s':>14s} {'train rows/s':>14s}")
        base_r, base_t = (
            statistics.median(read["native store"]),
            statistics.median(trained["native store"]),
        )
        for name in sources:
            mr, mt = statistics.median(read[name]), statistics.median(trained[name])
            print(
                f"{name:24s} {mr:14,.0f} {mt:14,.0f}   (read {mr / base_r:.2f}x, train {mt / base_t:.2f}x of native)"
            )


if __name__ == "__main__":
    main()
