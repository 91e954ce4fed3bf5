"""Accuracy and sparsity of a FaCT model (paper Sec. 5.1, App. B).

For the B-cos backbone and for the FaCT model of every decomposed layer (that layer's SAE alone
in place): top-1 / top-5 accuracy; per-image concept L0 (concepts with presence > 0) and the
number of concepts covering 80 % of the positive contribution to the predicted logit (App. B,
bottom of Fig. B1); plus the mean completeness error of those contributions, which shows the
decomposition is exact on real data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.data import IndexedImages, SkipLog, image_loader, iterate, rank_share
from fact_model.explain import concept_contributions, concepts_to_cover
from fact_model.model import FaCT
from topk_sae import distributed as dist

__all__ = ["Accuracy", "EvalResult", "LayerEval", "evaluate"]


class Accuracy(NamedTuple):
    top1: float
    top5: float


class LayerEval(NamedTuple):
    """FaCT with one layer's SAE: accuracy, sparsity and exactness over the evaluated images."""

    top1: float
    top5: float
    mean_l0: float
    """Mean number of concepts with positive presence per image."""
    mean_cover80: float
    """Mean number of concepts covering 80 % of the positive contribution (App. B)."""
    agreement: float
    """Fraction of images where FaCT predicts the same class as the B-cos backbone."""
    max_abs_completeness_error: float
    """Largest |logit - bias - sum of contributions| (Eq. 9) seen."""


class EvalResult(NamedTuple):
    n_images: int
    bcos: Accuracy
    layers: dict[str, LayerEval]
    skipped: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "bcos": self.bcos._asdict(),
            "layers": {k: v._asdict() for k, v in self.layers.items()},
            "skipped": self.skipped,
        }


def _topk_hits(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum())


def evaluate(
    model: FaCT,
    dataset: IndexedImages,
    *,
    indices: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate the B-cos backbone and FaCT at each of ``layers`` (default: all decomposed).

    Under ``torchrun`` (a process group of several ranks, all calling it) every rank evaluates
    a contiguous share of the images and the counts are summed: every rank returns the result
    of the whole set.
    """
    layers = list(model.layers if layers is None else layers)
    indices = rank_share(dataset, indices)
    progress = progress and dist.rank() == 0
    loader = image_loader(dataset, batch_size=batch_size, indices=indices)
    log = SkipLog()
    n = 0
    bcos = [0, 0]
    acc: dict[str, list[float]] = {name: [0, 0, 0.0, 0.0, 0, 0.0] for name in layers}
    for batch in tqdm(
        iterate(loader, log), total=len(loader), desc="evaluate", disable=not progress
    ):
        x = batch.images.to(device) if device is not None else batch.images
        y = batch.labels.to(x.device)
        with torch.no_grad(), model.bcos_mode():
            ref = model(x)
        h1, h5 = _topk_hits(ref, y)
        bcos[0] += h1
        bcos[1] += h5
        for name in layers:
            with model.only(name):
                out = concept_contributions(model, x, layer=name)
            h1, h5 = _topk_hits(out.output, y)
            a = acc[name]
            a[0] += h1
            a[1] += h5
            a[2] += float((out.presence > 0).sum())
            a[3] += float(concepts_to_cover(out.contributions[:, 0], 0.8).sum())
            a[4] += int((out.output.argmax(1) == ref.argmax(1)).sum())
            a[5] = max(a[5], float(out.completeness_error.abs().max()))
        n += len(y)
    if dist.is_distributed():
        sums = torch.tensor(
            [n, *bcos, *(v for name in layers for v in acc[name][:5])], dtype=torch.float64
        )
        sums = dist.all_reduce_sum(sums).tolist()
        n, bcos = int(sums[0]), [int(sums[1]), int(sums[2])]
        worst = dist.all_reduce_max(torch.tensor([acc[name][5] for name in layers] or [0.0]))
        for i, name in enumerate(layers):
            acc[name] = [*sums[3 + 5 * i : 8 + 5 * i], float(worst[i])]
        log = log.gathered()
    if n == 0:
        raise ValueError(f"no image could be evaluated ({log})")
    return EvalResult(
        n,
        Accuracy(bcos[0] / n, bcos[1] / n),
        {
            name: LayerEval(a[0] / n, a[1] / n, a[2] / n, a[3] / n, a[4] / n, a[5])
            for name, a in acc.items()
        },
        log.summary(),
    )
