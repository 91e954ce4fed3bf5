"""Ground-truth evaluation of learned concepts against the concept world's true concepts.

ImageNet has no per-pixel concept labels; the concept world has. Three pure measurements:

* :func:`match_concepts` -- for every true concept, the learned concept whose image-level
  presence best separates the images that contain the true concept from those that do not
  (AUROC over images), and that AUROC.
* :func:`mask_metrics` -- how well one input attribution map lies on one true mask: the share
  of the positive attribution mass inside the mask, and the pixel AUROC of the attribution as a
  detector of mask pixels.
* :func:`ground_truth_report` -- both together for a whole evaluation set, and the fraction of
  true concepts *recovered* (matched with image AUROC >= ``auroc_threshold`` and localised with
  mean mass-in-mask >= ``mass_threshold``).

AUROCs count ties as one half (mid-ranks, as ``sklearn.metrics.roc_auc_score``): a constant
score has AUROC 0.5, a perfect detector 1, a perfectly inverted one 0. An AUROC is undefined
(NaN) when the labels hold a single class (a concept in every image or in none).

Typical use (attribution maps only for the pairs that are scored, since they are expensive)::

    m = match_concepts(learned_presence, true_present)              # (N, K), (N, C)
    image_ids, true_ids = localisation_pairs(m, true_present, per_concept=8)
    maps = attributions_of(learned=m.learned[true_ids], images=image_ids)  # (P, H, W)
    report = ground_truth_report(m, true_present, image_ids, true_ids, maps, true_masks)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = [
    "DEFAULT_AUROC_THRESHOLD",
    "DEFAULT_MASS_THRESHOLD",
    "GroundTruthReport",
    "Matching",
    "auroc",
    "ground_truth_report",
    "localisation_pairs",
    "mask_metrics",
    "match_concepts",
]

DEFAULT_AUROC_THRESHOLD = 0.9
"""A true concept is matched when its best learned concept has image AUROC at least this."""
DEFAULT_MASS_THRESHOLD = 0.5
"""... and localised when, on average, at least this share of the positive attribution mass of
the matched concept lies inside the true mask."""

ArrayLike = np.ndarray | torch.Tensor


def _np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    out = np.asarray(x)
    if out.dtype == object:
        raise TypeError(f"{name} must be a numeric array or tensor, got {type(x).__name__}")
    return out


def _auroc_columns(scores_NK: np.ndarray, labels_NC: np.ndarray) -> np.ndarray:
    """AUROC of every score column as a detector of every label column: (K, C).

    Mann-Whitney: with mid-ranks ``r`` of a score over the N samples and ``P`` positives,
    ``AUROC = (sum of positive ranks - P (P + 1) / 2) / (P (N - P))``; the rank sums of all
    pairs are one matrix product. Columns with P in {0, N} are NaN.
    """
    n = scores_NK.shape[0]
    ranks = rankdata(scores_NK, axis=0, method="average")  # (N, K), float64
    y = labels_NC.astype(np.float64)
    pos = y.sum(axis=0)  # (C,)
    rank_sums = ranks.T @ y  # (K, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rank_sums - pos * (pos + 1) / 2) / (pos * (n - pos))
    out[:, (pos == 0) | (pos == n)] = np.nan
    return out


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """AUROC of ``scores`` as a detector of boolean ``labels`` (same shape, any number of
    dimensions); ties count one half; NaN when ``labels`` is all True or all False."""
    s, y = _np(scores, "scores"), _np(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same shape")
    if s.size == 0:
        raise ValueError("auroc of an empty set of scores")
    return float(_auroc_columns(s.reshape(-1, 1).astype(np.float64), y.reshape(-1, 1) != 0)[0, 0])


def mask_metrics(attribution_HW: ArrayLike, mask_HW: ArrayLike) -> tuple[float, float]:
    """``(mass_in_mask, auroc)`` of one attribution map against one true mask.

    ``mass_in_mask`` = positive attribution summed over the mask / positive attribution summed
    over the image (1: everything the map credits lies on the concept; the area fraction of the
    mask for a map that ignores the concept; NaN when the map has no positive value).
    ``auroc`` = pixel AUROC of the attribution as a score for mask membership (NaN when the
    mask is empty or covers the whole image).
    """
    a = _np(attribution_HW, "attribution_HW").astype(np.float64)
    m = _np(mask_HW, "mask_HW")
    if a.ndim != 2 or a.shape != m.shape:
        raise ValueError(
            f"attribution_HW and mask_HW must be (H, W) maps of the same shape, got {a.shape} and "
            f"{m.shape} (sum a multi-channel attribution over its channels first)"
        )
    if not np.isfinite(a).all():
        raise ValueError("attribution_HW holds NaN or infinite values")
    m = m != 0
    pos = np.maximum(a, 0.0)
    total = pos.sum()
    mass = float(pos[m].sum() / total) if total > 0 else math.nan
    return mass, auroc(a, m)


class Matching(NamedTuple):
    """The best learned concept for each true concept (:func:`match_concepts`)."""

    learned: np.ndarray
    """int64 (C,): index of the learned concept matched to true concept ``c`` (-1 when the
    image AUROC of ``c`` is undefined)."""
    auroc: np.ndarray
    """float64 (C,): image-level AUROC of that learned concept's presence for true concept
    ``c`` (NaN when ``c`` is present in every evaluated image or in none)."""
    auroc_all: np.ndarray
    """float64 (K, C): image AUROC of every learned concept for every true concept."""


def match_concepts(learned_presence_NK: ArrayLike, true_present_NC: ArrayLike) -> Matching:
    """For every true concept, the learned concept with the highest image-level AUROC.

    Args:
        learned_presence_NK: presence (any real score; larger = more present) of K learned
            concepts in N images.
        true_present_NC: bool, whether each of C true concepts is present in each image.

    A learned concept is never sign-flipped: one that fires exactly when the true concept is
    absent scores AUROC 0 for it. Ties between learned concepts go to the lowest index.
    """
    s = _np(learned_presence_NK, "learned_presence_NK")
    y = _np(true_present_NC, "true_present_NC")
    if s.ndim != 2 or y.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(
            "learned_presence_NK must be (N, K) and true_present_NC (N, C) over the same N "
            f"images, got {s.shape} and {y.shape}"
        )
    if s.shape[0] < 2 or s.shape[1] < 1:
        raise ValueError(f"need at least 2 images and 1 learned concept, got {s.shape}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("learned_presence_NK holds NaN or infinite values")
    table = _auroc_columns(s, y != 0)  # (K, C)
    defined = ~np.isnan(table[0])
    learned = np.full(table.shape[1], -1, dtype=np.int64)
    best = np.full(table.shape[1], np.nan)
    if defined.any():
        learned[defined] = table[:, defined].argmax(axis=0)
        best[defined] = table[learned[defined], np.flatnonzero(defined)]
    return Matching(learned, best, table)


def localisation_pairs(
    matching: Matching, true_present_NC: ArrayLike, per_concept: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids, true_concept_ids)``: the first ``per_concept`` images containing each
    matched true concept -- the pairs whose attribution maps :func:`ground_truth_report`
    scores (the map of pair ``j`` is learned concept ``matching.learned[true_concept_ids[j]]``
    on image ``image_ids[j]``)."""
    y = _np(true_present_NC, "true_present_NC") != 0
    if y.ndim != 2 or y.shape[1] != len(matching.learned):
        raise ValueError(f"true_present_NC must be (N, {len(matching.learned)}), got {y.shape}")
    if per_concept < 1:
        raise ValueError(f"per_concept must be >= 1, got {per_concept}")
    images, concepts = [], []
    for c in np.flatnonzero(matching.learned >= 0):
        ids = np.flatnonzero(y[:, c])[:per_concept]
        images.append(ids)
        concepts.append(np.full(len(ids), c, dtype=np.int64))
    if not images:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(images).astype(np.int64), np.concatenate(concepts)


class GroundTruthReport(NamedTuple):
    """Matching, localisation and recovery of every true concept (:func:`ground_truth_report`).

    Arrays are indexed by true concept ``c`` (C entries).
    """

    learned: np.ndarray
    """int64 (C,): matched learned concept (-1: undefined, see :class:`Matching`)."""
    image_auroc: np.ndarray
    """float64 (C,): image AUROC of the match."""
    mass_in_mask: np.ndarray
    """float64 (C,): mean mass-in-mask of the matched concept's attribution maps over the
    scored images containing ``c`` (NaN: no scored image, or no positive attribution in any)."""
    pixel_auroc: np.ndarray
    """float64 (C,): mean pixel AUROC of those maps (NaN as above)."""
    n_localised: np.ndarray
    """int64 (C,): number of maps scored for ``c``."""
    recovered: np.ndarray
    """bool (C,): ``image_auroc >= auroc_threshold`` and ``mass_in_mask >= mass_threshold``."""
    fraction_recovered: float
    """Mean of ``recovered`` over the true concepts with a defined image AUROC (NaN if none)."""
    auroc_threshold: float
    mass_threshold: float

    def to_dict(self, concept_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready form: a ``matches`` list (one dict per true concept: ``learned``,
        ``auroc``, ``mass_in_mask``, ``pixel_auroc``, ``n_localised``, ``recovered`` and
        ``name`` when ``concept_names`` is given; NaN and -1 as ``None``) and the totals."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        matches = []
        for c in range(len(self.learned)):
            d: dict[str, Any] = {} if concept_names is None else {"name": concept_names[c]}
            d.update(
                learned=int(self.learned[c]) if self.learned[c] >= 0 else None,
                auroc=num(self.image_auroc[c]),
                mass_in_mask=num(self.mass_in_mask[c]),
                pixel_auroc=num(self.pixel_auroc[c]),
                n_localised=int(self.n_localised[c]),
                recovered=bool(self.recovered[c]),
            )
            matches.append(d)
        return {
            "matches": matches,
            "fraction_recovered": num(self.fraction_recovered),
            "mean_image_auroc": num(_nanmean(self.image_auroc)),
            "mean_mass_in_mask": num(_nanmean(self.mass_in_mask)),
            "mean_pixel_auroc": num(_nanmean(self.pixel_auroc)),
            "auroc_threshold": self.auroc_threshold,
            "mass_threshold": self.mass_threshold,
        }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def ground_truth_report(
    matching: Matching,
    true_present_NC: ArrayLike,
    image_ids: Sequence[int] | ArrayLike,
    concept_ids: Sequence[int] | ArrayLike,
    maps_PHW: ArrayLike | Sequence[ArrayLike],
    true_masks: ArrayLike | Sequence[ArrayLike],
    *,
    auroc_threshold: float = DEFAULT_AUROC_THRESHOLD,
    mass_threshold: float = DEFAULT_MASS_THRESHOLD,
) -> GroundTruthReport:
    """Combine the matching with the localisation of the matched concepts.

    Args:
        matching: :func:`match_concepts` of the same N images.
        true_present_NC: bool (N, C) true presence.
        image_ids, concept_ids: the P scored pairs ``(image n, true concept c)``, e.g. from
            :func:`localisation_pairs`; each must have ``true_present_NC[n, c]`` (a mask to
            hit) and a defined match.
        maps_PHW: (P, H, W) attribution maps (or P maps of (H, W)); map ``j`` is the input
            attribution of learned concept ``matching.learned[concept_ids[j]]`` on image
            ``image_ids[j]``.
        true_masks: the true masks, indexable by image: (N, C, H, W) or N items of (C, H, W)
            (e.g. :attr:`~fact_model.world.WorldBatch.masks`).
        auroc_threshold, mass_threshold: what counts as recovered (module defaults: 0.9, 0.5).

    Per true concept, mass-in-mask and pixel AUROC are averaged over its scored maps (maps
    without positive attribution count in the pixel AUROC only).
    """
    y = _np(true_present_NC, "true_present_NC") != 0
    n_true = len(matching.learned)
    if y.ndim != 2 or y.shape[1] != n_true:
        raise ValueError(f"true_present_NC must be (N, {n_true}), got {y.shape}")
    images = _np(image_ids, "image_ids").astype(np.int64).reshape(-1)
    concepts = _np(concept_ids, "concept_ids").astype(np.int64).reshape(-1)
    if len(images) != len(concepts) or len(maps_PHW) != len(images):
        raise ValueError(
            f"image_ids ({len(images)}), concept_ids ({len(concepts)}) and maps_PHW "
            f"({len(maps_PHW)}) must have one entry per scored pair"
        )
    mass_sum, mass_n = np.zeros(n_true), np.zeros(n_true, dtype=np.int64)
    auc_sum, auc_n = np.zeros(n_true), np.zeros(n_true, dtype=np.int64)
    for j, (n, c) in enumerate(zip(images.tolist(), concepts.tolist())):
        if not (0 <= n < y.shape[0] and 0 <= c < n_true):
            raise ValueError(f"pair {j}: (image {n}, concept {c}) is out of range {y.shape}")
        if matching.learned[c] < 0:
            raise ValueError(f"pair {j}: true concept {c} has no match (undefined image AUROC)")
        if not y[n, c]:
            raise ValueError(
                f"pair {j}: true concept {c} is absent from image {n}; score only pairs with "
                "true_present_NC[n, c] (see localisation_pairs)"
            )
        mask = _np(true_masks[n], "true_masks")[c]
        mass, auc = mask_metrics(maps_PHW[j], mask)
        if not math.isnan(mass):
            mass_sum[c] += mass
            mass_n[c] += 1
        if not math.isnan(auc):
            auc_sum[c] += auc
            auc_n[c] += 1
    n_localised = np.bincount(concepts, minlength=n_true).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mass_mean = np.where(mass_n > 0, mass_sum / np.maximum(mass_n, 1), np.nan)
        auc_mean = np.where(auc_n > 0, auc_sum / np.maximum(auc_n, 1), np.nan)
    image_auroc = matching.auroc.astype(np.float64)
    recovered = (np.nan_to_num(image_auroc, nan=-1.0) >= auroc_threshold) & (
        np.nan_to_num(mass_mean, nan=-1.0) >= mass_threshold
    )
    defined = ~np.isnan(image_auroc)
    fraction = float(recovered[defined].mean()) if defined.any() else math.nan
    return GroundTruthReport(
        learned=matching.learned.copy(),
        image_auroc=image_auroc,
        mass_in_mask=mass_mean,
        pixel_auroc=auc_mean,
        n_localised=n_localised,
        recovered=recovered,
        fraction_recovered=fraction,
        auroc_threshold=float(auroc_threshold),
        mass_threshold=float(mass_threshold),
    )
