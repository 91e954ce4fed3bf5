"""Concept deletion and insertion curves and their areas (FaCT Sec. 6, Fig. 7; App. F).

Deletion: zero the concepts of each image in order of decreasing importance and follow the
target logit (or probability) and, for shared concept bases, the accuracy over all images. The
sharper the fall, the better the importance measure. Insertion is the mirror: start from the
all-zero code and put concepts back in the same order. Concepts marked *protected* (the
"always-on" concepts of App. F, Fig. F2) are never deleted, and are present from the start of
an insertion; the deletion fraction counts only the other concepts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from concept_deletion.choices import ChoiceEnum
from concept_deletion.head import (
    DEFAULT_MAX_ELEMENTS,
    check_targets,
    evaluate_masked,
    target_logits,
)
from concept_deletion.layout import Layout, check_codes

__all__ = [
    "CurveResult",
    "Mode",
    "Schedule",
    "Score",
    "deletion_curve",
    "deletion_order",
    "deletion_schedule",
    "trapezoid_auc",
]


class Mode(ChoiceEnum, kind="mode"):
    """Remove concepts from the full code (deletion) or add them to the empty code (insertion)."""

    DELETION = "deletion"
    INSERTION = "insertion"


class Score(ChoiceEnum, kind="score"):
    """What is followed for the target class: the raw logit or its softmax probability."""

    LOGIT = "logit"
    PROBABILITY = "probability"


class Schedule(ChoiceEnum, kind="schedule"):
    """Counts of deleted concepts at which the head is evaluated."""

    ALL = "all"  # every count 0..K (small K)
    LINEAR = "linear"  # n_steps + 1 equally spaced counts
    GEOMETRIC = "geometric"  # 0 and n_steps geometrically spaced counts 1..K (dense at the start)


class CurveResult(NamedTuple):
    """One deletion (or insertion) curve of one measure over a set of images.

    Attributes:
        measure: the importance measure's name.
        mode: ``'deletion'`` or ``'insertion'``.
        counts: ``(S,)`` number of deleted (inserted) unprotected concepts at each step.
        fractions: ``(S,)`` ``counts / n_eligible``, from 0 to 1.
        scores: ``(B, S)`` target logit (or probability) of every image at every step.
        correct: ``(B, S)`` whether the argmax is the label, or ``None`` without labels.
        n_eligible: number of concepts that may be deleted (K minus the protected ones).
    """

    measure: str
    mode: str
    counts: np.ndarray
    fractions: np.ndarray
    scores: np.ndarray
    correct: np.ndarray | None
    n_eligible: int

    @property
    def mean_score(self) -> np.ndarray:
        """``(S,)`` target score averaged over images."""
        return self.scores.mean(axis=0)

    @property
    def accuracy(self) -> np.ndarray | None:
        """``(S,)`` accuracy over all images, or ``None`` without labels."""
        return None if self.correct is None else self.correct.mean(axis=0)

    @property
    def auc_score(self) -> float:
        """Trapezoid area under the mean score curve over the deletion fraction."""
        return trapezoid_auc(self.fractions, self.mean_score)

    @property
    def auc_accuracy(self) -> float | None:
        """Trapezoid area under the accuracy curve, or ``None`` without labels."""
        acc = self.accuracy
        return None if acc is None else trapezoid_auc(self.fractions, acc)

    def merge(self, other: CurveResult) -> CurveResult:
        """Concatenate the images of two curves of the same measure, mode and schedule."""
        same = (self.measure, self.mode, self.n_eligible) == (
            other.measure,
            other.mode,
            other.n_eligible,
        )
        if not same or not np.array_equal(self.counts, other.counts):
            raise ValueError("can only merge curves of the same measure, mode and schedule")
        if (self.correct is None) != (other.correct is None):
            raise ValueError("can only merge curves that both have labels or both have none")
        correct = None
        if self.correct is not None and other.correct is not None:
            correct = np.concatenate([self.correct, other.correct])
        return self._replace(scores=np.concatenate([self.scores, other.scores]), correct=correct)


def trapezoid_auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Area under ``values`` over ``fractions`` (trapezoid rule).

    ``fractions`` must be strictly increasing within [0, 1] (a curve's deletion fractions);
    unsorted or out-of-range fractions, or non-finite values, are refused rather than turned
    into a meaningless (or NaN) area.
    """
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two 1-D arrays of equal length >= 2, got {x.shape}, {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fractions and values must be finite (no NaN/Inf)")
    steps = np.diff(x)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise ValueError(
            "fractions must be strictly increasing (sorted, no repeats), got "
            f"{x[i]:.6g} then {x[i + 1]:.6g} at positions {i}, {i + 1}"
        )
    if x[0] < 0 or x[-1] > 1:
        raise ValueError(f"fractions must lie in [0, 1], got the range [{x[0]:.6g}, {x[-1]:.6g}]")
    return float(np.sum(steps * (y[1:] + y[:-1]) / 2))


def deletion_schedule(
    n_eligible: int, schedule: Schedule | str = Schedule.ALL, n_steps: int = 50
) -> np.ndarray:
    """Sorted unique counts at which the curve is evaluated; always 0 first and ``n_eligible``
    last, so every curve spans the deletion fractions [0, 1].

    ``all``: every count. ``linear``: ``n_steps`` equal intervals (``n_steps + 1`` counts).
    ``geometric``: 0 and ``n_steps`` counts spaced geometrically from 1 to ``n_eligible``; with
    ``n_steps=1`` that one count is ``n_eligible`` (``[0, K]``, as ``linear``), never 1. Counts
    that round to the same integer are merged, and ``n_steps >= n_eligible`` gives every count.
    """
    if n_eligible < 1:
        raise ValueError(f"need at least one deletable concept, got n_eligible={n_eligible}")
    schedule = Schedule.parse(schedule)
    if schedule is not Schedule.ALL and n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if schedule is Schedule.ALL or n_steps >= n_eligible:
        counts = np.arange(n_eligible + 1)
    elif schedule is Schedule.LINEAR:
        counts = np.round(np.linspace(0, n_eligible, n_steps + 1)).astype(np.int64)
    else:
        # geomspace with one point returns its start (1): the curve would stop at 1/K.
        geo = np.geomspace(1, n_eligible, n_steps) if n_steps > 1 else np.array([n_eligible])
        counts = np.concatenate([[0], np.round(geo).astype(np.int64)])
    counts = np.unique(counts).astype(np.int64)
    assert counts[0] == 0 and counts[-1] == n_eligible, counts
    return counts


def _protected_mask(protected: Tensor | None, k: int, device: torch.device) -> Tensor:
    if protected is None:
        return torch.zeros(k, dtype=torch.bool, device=device)
    p = torch.as_tensor(protected, device=device)
    if p.dtype != torch.bool:
        idx = p.long().flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= k):
            raise ValueError(f"protected concept indices must lie in [0, {k})")
        p = torch.zeros(k, dtype=torch.bool, device=device)
        p[idx] = True
    if p.shape != (k,):
        raise ValueError(f"protected must be a (K={k},) bool mask or an index list")
    return p


def deletion_order(importance_BK: Tensor, protected: Tensor | None = None) -> Tensor:
    """Rank of each concept in each image's deletion order, ``(B, K)`` long.

    Rank 0 is deleted first (highest importance; ties broken by concept index). Protected
    concepts get rank ``K`` (never reached).
    """
    if importance_BK.ndim != 2:
        raise ValueError(f"importance must be (B, K), got {tuple(importance_BK.shape)}")
    if not bool(torch.isfinite(importance_BK).all()):
        raise ValueError("importance contains NaN or inf; check the measure's inputs")
    b, k = importance_BK.shape
    prot = _protected_mask(protected, k, importance_BK.device)
    key = importance_BK.double().masked_fill(prot, -torch.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(k, device=order.device).expand(b, k).contiguous())
    return ranks.masked_fill(prot, k)


def deletion_curve(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    importance_BK: Tensor,
    layout: Layout | str,
    *,
    labels: Tensor | None = None,
    protected: Tensor | None = None,
    mode: Mode | str = Mode.DELETION,
    schedule: Schedule | str = Schedule.ALL,
    n_steps: int = 50,
    score: Score | str = Score.LOGIT,
    measure: str = "",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> CurveResult:
    """Deletion (or insertion) curve of every image under its importance ranking.

    At step ``s`` the ``counts[s]`` most important unprotected concepts of each image are zeroed
    (deletion), or only they and the protected ones are kept (insertion), at every position;
    the head is evaluated on the perturbed cached codes in chunks of ``max_elements``.
    """
    layout = check_codes(codes, layout)
    b, k = codes.shape[0], codes.shape[layout.concept_dim]
    if importance_BK.shape != (b, k):
        raise ValueError(f"importance must be (B, K) = {(b, k)}, got {tuple(importance_BK.shape)}")
    mode, score = Mode.parse(mode), Score.parse(score)
    t = check_targets(targets, b, codes.device)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=codes.device)
        if labels.shape != (b,):
            raise ValueError(f"labels must be ({b},), got {tuple(labels.shape)}")
    prot = _protected_mask(protected, k, codes.device)
    n_eligible = k - int(prot.sum())
    counts_np = deletion_schedule(n_eligible, schedule, n_steps)
    counts = torch.as_tensor(counts_np, device=codes.device)
    ranks = deletion_order(importance_BK.to(codes.device), prot)
    n_s = counts.numel()

    def masks(start: int, stop: int) -> Tensor:
        rows = torch.arange(start, stop, device=codes.device)
        r, c = ranks[rows // n_s], counts[rows % n_s][:, None]
        keep = (r >= c) if mode is Mode.DELETION else ((r < c) | prot)
        return keep.to(codes.dtype)

    scores = torch.empty(b * n_s, dtype=torch.float64)
    correct = torch.empty(b * n_s, dtype=torch.bool)
    image_index = torch.arange(b * n_s, device=codes.device) // n_s
    for start, stop, logits in evaluate_masked(
        head, codes, layout, image_index, masks, max_elements
    ):
        img = image_index[start:stop]
        vals = logits.softmax(dim=1) if score is Score.PROBABILITY else logits
        scores[start:stop] = target_logits(vals, t[img]).double().cpu()
        if labels is not None:
            correct[start:stop] = (logits.argmax(dim=1) == labels[img]).cpu()
    return CurveResult(
        measure=measure,
        mode=mode.value,
        counts=counts_np,
        fractions=counts_np / n_eligible,
        scores=scores.view(b, n_s).numpy(),
        correct=None if labels is None else correct.view(b, n_s).numpy(),
        n_eligible=n_eligible,
    )
