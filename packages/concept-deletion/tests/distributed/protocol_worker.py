"""Worker for test_concept_deletion_distributed.py: the paper protocol on a linear concept
model, in one process or under ``torchrun`` (gloo); counts the classes each rank computed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from concept_deletion_helpers import LinearHead

from concept_deletion import ComparisonConfig, ImportanceConfig, ProtocolConfig, paper_protocol

K = 6


class CodeModel:
    def __init__(self) -> None:
        self.linear = LinearHead((K, 2, 2), n_classes=5, seed=2)
        self.calls = 0

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images

    def head(self, codes: torch.Tensor) -> torch.Tensor:
        return self.linear(codes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(K, 2, 2, generator=gen, dtype=torch.float64), i % 5) for i in range(60)]
    cfg = ProtocolConfig(
        n_classes=5,
        per_class=4,
        comparison=ComparisonConfig(
            measures=("contribution", "saliency", "sobol", "random"),
            orderings=("local", "global"),
            schedule="all",
            importance=ImportanceConfig(sobol_designs=8),
        ),
    )
    model = CodeModel()
    curves = paper_protocol(
        data, model, "BKHW", args.out, cfg, contributions=model.linear.contributions,
        progress=False,
    )  # fmt: skip
    result = {
        "calls": model.calls,
        "curves": {f"{c.measure}|{c.mode}": c.scores.tolist() for c in curves},
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
