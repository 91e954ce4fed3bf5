"""Training loop of the bias-free TopK SAE (work in progress: signature first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from topk_sae.config import TrainConfig
from topk_sae.data import BatchSource
from topk_sae.sae import BiasFreeTopKSAE


class TrainResult(NamedTuple):
    """The trained model (on CPU... or the training device), its history and where it is saved."""

    model: BiasFreeTopKSAE
    history: list[dict[str, Any]]
    epoch_stats: list[dict[str, Any]]
    model_dir: Path


def train(
    config: TrainConfig, source: BatchSource, *, out_dir: str | Path, resume: bool = True
) -> TrainResult:
    """Train a bias-free TopK SAE on ``source``; checkpoints go to ``out_dir``."""
    raise NotImplementedError("being implemented (issue 3)")
