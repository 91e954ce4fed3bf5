"""Worker for test_c2score_distributed.py: one C2 pass in one process or under ``torchrun``
(gloo), optionally killed after some images on rank 1; writes the result as JSON per rank."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from c2score import EvalConfig, RandomBaselineConfig, SelectionConfig, evaluate_c2

N, C, D, H, W = 41, 7, 8, 12, 10


class Extractor:
    """A fixed random per-pixel map of RGB (plus position) to D features."""

    patch_size = 2
    dim = D

    def __init__(self, fail_after: int | None = None) -> None:
        self.w = torch.randn(D, 5, generator=torch.Generator().manual_seed(7))
        self.fail_after, self.calls = fail_after, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        inp = torch.cat([x, yy.expand(b, 1, h, w), xx.expand(b, 1, h, w)], dim=1)
        return torch.tanh(torch.einsum("dc,bchw->bdhw", self.w, inp)) + 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--crash-rank", type=int, default=-1)
    ap.add_argument("--groups", action="store_true")
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=g) for _ in range(N)]
    images[9] = torch.full((3, 1, 1), 0.5)  # smaller than a patch: skipped, counted
    acts = torch.rand(N, C, generator=g) - 0.3
    maps = torch.randn(N, C, H // 2, W // 2, generator=g)
    labels = torch.arange(N) % 3
    cfg = EvalConfig(
        selection=SelectionConfig(top_fraction=0.5, min_images=3),
        baseline=RandomBaselineConfig(seeds=(0, 1, 2)),
        batch_size=4,
        checkpoint_every=4,
        progress=False,
    )
    extractor = Extractor(fail_after=2 if rank == args.crash_rank else None)
    out = Path(args.out)
    try:
        res = evaluate_c2(
            images, acts, maps, extractor, cfg, work_dir=out / "work",
            baseline_groups=labels if args.groups else None,
        )  # fmt: skip
    except RuntimeError:
        raise SystemExit(3) from None
    (out / f"rank{rank}.json").write_text(json.dumps(dataclasses.asdict(res), default=str))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
