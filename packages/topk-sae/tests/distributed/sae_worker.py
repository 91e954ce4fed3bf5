"""Worker run by ``torchrun`` (or plainly, as one process) for test_topk_sae_distributed.py.

Trains a small bias-free TopK SAE with AuxK active, optionally "crashes" after a step (the
checkpoint of that step is on disk), evaluates it, and writes what it computed to
``<out>/result-rank<R>.safetensors`` so the test can compare ranks and process counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from topk_sae import TensorSource, TrainConfig, evaluate, train
from topk_sae import distributed as dist


class Crash(RuntimeError):
    pass


def data(rows: int, d: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(20, d, generator=gen)
    codes = torch.rand(rows, 20, generator=gen) * (torch.rand(rows, 20, generator=gen) < 0.15)
    return codes @ atoms + 0.6  # uncentred, so latents die and AuxK has work to do


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=402)  # batch 50: a last batch of 2 rows
    ap.add_argument("--crash-after", type=int, default=0)
    args = ap.parse_args()
    dist.init_from_env("cpu")
    cfg = TrainConfig(
        n_latents=48,
        k=3,
        epochs=2,
        lr=5e-3,
        warmup_epochs=0.2,
        hold_epochs=0.2,
        k_aux=8,
        dead_after_tokens=60,  # dies fast: AuxK is on for most steps
        checkpoint_every=4,
        log_every=1,
        progress=False,
        device="cpu",
    )
    source = TensorSource(data(args.rows), batch_size=50, seed=3)
    out = Path(args.out)

    def crash(step: int, metrics: dict) -> None:
        if args.crash_after and step == args.crash_after:
            raise Crash(f"simulated crash after step {step}")

    try:
        res = train(cfg, source, out_dir=out / "run", callback=crash)
    except Crash:
        dist.barrier()
        return
    metrics = evaluate(res.model, data(args.rows, seed=1), batch_size=64)
    r = dist.rank()
    save_file(
        {
            "W_enc": res.model.W_enc.detach().contiguous(),
            "W_dec": res.model.W_dec.detach().contiguous(),
            "firing_frequency": metrics.firing_frequency.contiguous(),
        },
        str(out / f"result-rank{r}.safetensors"),
    )
    summary = {
        "world_size": dist.world_size(),
        "metrics": metrics.summary(),
        "history": res.history,
        "epoch_stats": res.epoch_stats,
    }
    (out / f"result-rank{r}.json").write_text(json.dumps(summary))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
