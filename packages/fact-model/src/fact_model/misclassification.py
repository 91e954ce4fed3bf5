"""Inspecting a (mis)classification on the concept level (paper Fig. 8, App. G).

For one image and two classes (e.g. the predicted and the true one), each concept's exact
contribution (Eq. 9) to both logits, as a percentage of that logit's total positive concept
contribution. Concepts among the top ``top`` of either logit are listed; a concept is *shared*
when it contributes positively to both logits and *exclusive* otherwise -- the model's
confusion shows as shared concepts that weigh more for the wrong class.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from fact_model.explain import concept_contributions
from fact_model.model import FaCT

__all__ = ["ConceptComparison", "compare_classes"]


class ConceptComparison(NamedTuple):
    layer: str
    class_a: int
    class_b: int
    logit_a: float
    logit_b: float
    concepts: list[int]
    """The concepts shown: union of the top ``top`` of each logit, by larger share first."""
    share_a: list[float]
    """Contribution to logit a in % of its positive concept contribution."""
    share_b: list[float]
    contribution_a: list[float]
    contribution_b: list[float]
    shared: list[bool]
    """Positive for both logits."""
    completeness_error: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def compare_classes(
    model: FaCT, x: Tensor, class_a: int, class_b: int, *, layer: str | None = None, top: int = 12
) -> ConceptComparison:
    """Fig. 8 for one image ``x`` ``(1, C, H, W)`` and two classes (App. G: top 12 per logit)."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"compare_classes explains one image (1, C, H, W), got {tuple(x.shape)}")
    out = concept_contributions(model, x, [[class_a, class_b]], layer=layer)
    ca, cb = out.contributions[0, 0], out.contributions[0, 1]
    pa = 100 * ca / ca.clamp_min(0).sum().clamp_min(1e-30)
    pb = 100 * cb / cb.clamp_min(0).sum().clamp_min(1e-30)
    k = min(top, ca.numel())
    chosen = torch.cat([ca.topk(k).indices, cb.topk(k).indices]).unique()
    chosen = chosen[(ca[chosen] != 0) | (cb[chosen] != 0)]
    order = torch.maximum(pa[chosen], pb[chosen]).argsort(descending=True)
    chosen = chosen[order]
    return ConceptComparison(
        out.layer,
        int(class_a),
        int(class_b),
        float(out.logits[0, 0]),
        float(out.logits[0, 1]),
        chosen.tolist(),
        pa[chosen].tolist(),
        pb[chosen].tolist(),
        ca[chosen].tolist(),
        cb[chosen].tolist(),
        ((ca[chosen] > 0) & (cb[chosen] > 0)).tolist(),
        (float(out.completeness_error[0, 0]), float(out.completeness_error[0, 1])),
    )
