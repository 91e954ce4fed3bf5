"""Worker for test_fact_model_distributed.py: importance-sampled extraction (optionally killed
on one rank mid-way) then a few SAE steps on the extracted set, in one process or under
``torchrun``; writes the stores' rows and the trained weights for comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

import bcos_layers
from fact_model import features as features_module
from fact_model.data import IndexedImages, eval_transform_for, open_dataset
from fact_model.features import FeatureConfig, extract_features
from topk_sae import TrainConfig, train
from topk_sae import distributed as dist


class Crash(RuntimeError):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--crash-rank", type=int, default=-1)
    ap.add_argument("--crash-after-batches", type=int, default=0)
    args = ap.parse_args()
    dist.init_from_env("cpu")
    torch.set_num_threads(1)
    backbone = bcos_layers.create(
        "tiny_resnet_bottleneck", pretrained=args.weights, num_classes=3
    ).eval()
    data = IndexedImages(open_dataset(f"imagefolder:{args.images}"), eval_transform_for(backbone))
    if dist.rank() == args.crash_rank:  # a rank dies after some flushed batches
        real, calls = features_module.position_weights, [0]

        def dying(*a, **k):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] > args.crash_after_batches:
                raise Crash(f"rank {dist.rank()} killed")
            return real(*a, **k)

        features_module.position_weights = dying
    cfg = FeatureConfig(
        layer="layer3", samples_per_image=3, heldout_per_class=2, batch_size=3, flush_rows=1
    )
    out = Path(args.out)
    try:
        fs = extract_features(backbone, data, out / "features", cfg, device="cpu", progress=False)
    except Crash:
        raise SystemExit(3) from None
    tcfg = TrainConfig(
        n_latents=24, k=3, epochs=3, lr=5e-3, warmup_epochs=0.3, hold_epochs=0.3, k_aux=4,
        dead_after_tokens=20, progress=False, log_every=1, device="cpu", init="data",
    )  # fmt: skip
    res = train(tcfg, fs.train.source(16, seed=1), out_dir=out / "sae")
    save_file(
        {
            "train_rows": fs.train.read(0, fs.train.num_rows).contiguous(),
            "train_image_index": fs.train.read(0, fs.train.num_rows, "image_index").contiguous(),
            "train_position": fs.train.read(0, fs.train.num_rows, "position").contiguous(),
            "heldout_rows": fs.heldout.read(0, fs.heldout.num_rows).contiguous(),
            "W_enc": res.model.W_enc.detach().contiguous(),
            "W_dec": res.model.W_dec.detach().contiguous(),
            "loss": torch.tensor([h["loss"] for h in res.history]),
        },
        str(out / f"result-rank{dist.rank()}.safetensors"),
    )
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
