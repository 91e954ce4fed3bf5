"""Training a FaCT layer: an SAE sweep on a feature set, selected by held-out FaCT accuracy.

App. A: every grid point (learning rate x k x dictionary size) is trained on the
importance-sampled features (:mod:`fact_model.features`); each run is scored by the top-1
accuracy of the FaCT model with that SAE spliced in, on the held-out training images (50 per
class in the paper); per k the top two runs are kept, preferring fewer dead / always-active
latents among near-ties. The sweep is resumable (``topk_sae.sweep.sweep``): an interrupted
``fact train`` continues with the next unfinished run.

:class:`HeldoutScorer` computes the layer's full feature maps of the held-out images once
(cached up to a memory budget) and scores an SAE by running only the network after the layer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fact_model.chain import ForwardChain
from fact_model.data import IndexedImages, SkipLog, image_loader, iterate
from fact_model.features import FeatureSet
from fact_model.model import FaCT
from fact_model.splice import layout_of
from topk_sae import BiasFreeTopKSAE, RunResult, SweepResult, TrainConfig
from topk_sae import distributed as dist
from topk_sae.sweep import sweep

__all__ = ["HeldoutScorer", "LayerTraining", "train_layer"]


class HeldoutScorer:
    """Held-out top-1 accuracy of FaCT with a given SAE at ``layer`` (the paper's criterion).

    Args:
        backbone: the B-cos network (plain, or a FaCT model whose original network is used).
        layer: the decomposed layer; must be a point of the backbone's forward chain.
        dataset, indices: the held-out images.
        cache_bytes: keep the layer outputs of the held-out images in memory up to this size
            (otherwise they are recomputed for every SAE).

    Under ``torchrun`` each rank scores a contiguous share of the images and the hits are
    summed, so every rank gets the accuracy of the whole held-out set; ``distributed=False``
    scores every image in this process (a sweep split by grid point).
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer: str,
        dataset: IndexedImages,
        indices: Sequence[int],
        *,
        batch_size: int = 64,
        device: Any = None,
        cache_bytes: int = 4 << 30,
        progress: bool = True,
        distributed: bool | None = None,
    ) -> None:
        if isinstance(backbone, FaCT):
            backbone = backbone.backbone_module()
        self.backbone = backbone.eval()
        self.layer = layer
        self.chain = ForwardChain(self.backbone)
        self.chain.index(layer)
        indices = list(indices)
        self.distributed = dist.is_distributed() if distributed is None else bool(distributed)
        if self.distributed:
            indices = indices[dist.rank_slice(len(indices))]
        self.loader = image_loader(dataset, batch_size=batch_size, indices=indices)
        self.device = device
        self.progress = progress
        self.cache: list[tuple[Tensor, Tensor]] | None = []
        used = 0
        log = SkipLog()
        with torch.no_grad():
            for batch in iterate(self.loader, log):
                f = self._prefix(batch.images)
                used += f.numel() * f.element_size()
                if used > cache_bytes:
                    self.cache = None
                    break
                assert self.cache is not None
                self.cache.append((f, batch.labels))
        self.skipped = log.summary()

    def _prefix(self, images: Tensor) -> Tensor:
        x = images.to(self.device) if self.device is not None else images
        return self.chain.prefix(self.layer, x)

    def _batches(self) -> Any:
        if self.cache is not None:
            yield from self.cache
            return
        for batch in iterate(self.loader):
            yield self._prefix(batch.images), batch.labels

    @torch.no_grad()
    def accuracy(self, sae: BiasFreeTopKSAE | None) -> float:
        """Top-1 accuracy with ``sae`` at the layer (``None``: the B-cos network itself)."""
        hits = n = 0
        for f, labels in self._batches():
            if sae is not None:
                sae = sae.to(f.device)
                f = (sae.forward_map(f) if layout_of(f) == "BKHW" else sae.forward_tokens(f)).recon
            logits = self.chain.tail(self.layer, f)
            hits += int((logits.argmax(1).cpu() == labels).sum())
            n += len(labels)
        if self.distributed:
            hits, n = (int(v) for v in dist.all_reduce_sum(torch.tensor([hits, n])).tolist())
        if n == 0:
            raise ValueError("no held-out image could be scored")
        return hits / n

    def __call__(self, sae: BiasFreeTopKSAE, heldout: Any = None) -> float:
        """``topk_sae`` score function: held-out FaCT accuracy (the held-out rows are unused)."""
        return self.accuracy(sae)


class LayerTraining(NamedTuple):
    """The sweep of one layer and its selection."""

    layer: str
    sweep: SweepResult
    selected: list[RunResult]
    """Best runs (top two per k in the paper), best first."""
    best: RunResult
    sae: BiasFreeTopKSAE
    bcos_heldout_accuracy: float


def train_layer(
    backbone: nn.Module,
    features: FeatureSet,
    out_dir: str | os.PathLike[str],
    base_config: TrainConfig,
    *,
    heldout_dataset: IndexedImages,
    k: Sequence[int],
    n_latents: Sequence[int],
    lr: Sequence[float],
    top: int = 2,
    tolerance: float = 0.005,
    sae_batch_size: int = 32786,
    image_batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    parallel: str = "data",
) -> LayerTraining:
    """Sweep SAEs on ``features`` and select by held-out FaCT accuracy (App. A).

    ``heldout_dataset``: the dataset the feature set was extracted from (its held-out images,
    ``features.heldout_indices``, are scored). ``base_config``: every training setting except
    the swept ``k``, ``n_latents`` and ``lr``. ``parallel``: under ``torchrun``, ``"data"``
    trains each run data-parallel on all ranks, ``"grid"`` one grid point per rank
    (:func:`topk_sae.sweep.sweep`).
    """
    layer = features.provenance["layer"]
    if not features.heldout_indices:
        raise ValueError(
            "the feature set has no held-out images; extract it with heldout_per_class > 0 "
            "(checkpoint selection needs held-out accuracy)"
        )
    scorer = HeldoutScorer(
        backbone,
        layer,
        heldout_dataset,
        features.heldout_indices,
        batch_size=image_batch_size,
        device=device,
        progress=progress,
        distributed=False if parallel == "grid" else None,
    )
    bcos_acc = scorer.accuracy(None)
    source = features.train.source(sae_batch_size, seed=base_config.seed)
    held = features.heldout.source(sae_batch_size, shuffle=False) if features.heldout else source
    dev = None if device is None else str(device)
    config = dataclasses.replace(base_config, device=dev or base_config.device, progress=progress)
    result = sweep(
        config,
        source,
        held,
        out_dir=Path(out_dir),
        k=list(k),
        n_latents=list(n_latents),
        lr=list(lr),
        score_fn=scorer,
        tolerance=tolerance,
        top=top,
        progress=progress,
        parallel=parallel,  # type: ignore[arg-type]
    )
    ranked = sorted(
        (r for rs in result.best_per_k.values() for r in rs),
        key=lambda r: (-r.score, r.dead_fraction + r.always_active_fraction, r.name),
    )
    if not ranked:
        errors = [r.error for r in result.runs if r.error]
        raise RuntimeError(f"every SAE run of layer {layer!r} failed: {errors[:3]}")
    best = ranked[0]
    sae = BiasFreeTopKSAE.from_pretrained(best.model_dir).eval()
    return LayerTraining(layer, result, ranked, best, sae, bcos_acc)


def describe_runs(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """JSON-friendly rows of sweep runs (for summaries and the accuracy-vs-sparsity plot)."""
    return [
        {
            "name": r.name,
            "k": r.k,
            "n_latents": r.n_latents,
            "lr": r.lr,
            "heldout_top1": r.score,
            "explained_variance": r.explained_variance,
            "l0": r.l0,
            "dead_fraction": r.dead_fraction,
            "always_active_fraction": r.always_active_fraction,
            "error": r.error,
        }
        for r in runs
    ]
