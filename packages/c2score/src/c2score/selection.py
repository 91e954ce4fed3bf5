"""Which images each concept is evaluated on (paper App. C.3), decided up front from the table.

The rule is the authors' ``get_indices_to_explain`` (``analysis/dino_consistency.py``), exactly.
Per concept c over the N evaluation images:

* the *active* images are those with a finite activation a_c(x) > 0; let n be their number;
* with n <= ``min_top`` (10) all active images are taken; otherwise the threshold is
  ``thr = min(torch.quantile(positives, 1 - top_fraction), (min_top + 1)-th largest positive)``
  (default: the 95 % quantile with torch's default linear interpolation, and the 11th largest)
  and the images with ``a_c(x) > thr`` are taken: the top 5 %, but at least the top 10;
* the comparison is computed on float32 activations, as in the authors' code, with
  ``torch.quantile`` itself (so its float32 rank arithmetic is reproduced: for distinct values
  the count is max(10, ceil(0.05 (n - 1))) -- 10 at n = 201, 50 at n = 1000 -- except where
  that rounding moves the quantile just below a value, e.g. 24 instead of 23 at some n = 461);
* **ties:** the threshold is strict, so all images tied *above* it are taken and all images
  tied *at* it are left out. A concept can therefore get more or fewer than the nominal count,
  down to none (e.g. 200 images with the same activation: thr = that value, nothing is above);
* concepts left with fewer than ``min_images`` (5) images are skipped and counted, as are
  concepts whose column holds a NaN or an infinity;
* an image whose *whole* row is NaN / infinite (e.g. the concept model failed on it) is
  excluded from the evaluation instead (listed in ``Selection.bad_images``), so that one broken
  image does not disqualify every concept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from c2score.io import ActivationTable

__all__ = ["Selection", "SelectionConfig", "n_to_select", "select_images"]


@dataclass(frozen=True)
class SelectionConfig:
    """Image-selection rule of the C2-score (paper App. C.3)."""

    top_fraction: float = 0.05
    """Fraction of the active images taken per concept (top 5 %)."""
    min_top: int = 10
    """Take at least this many top images; with at most this many active images take all."""
    min_images: int = 5
    """Concepts with fewer selected images than this are skipped (and counted)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.min_top < 0 or self.min_images < 2:
            raise ValueError(
                f"need min_top >= 0 and min_images >= 2 (a consistency needs two images), "
                f"got min_top={self.min_top}, min_images={self.min_images}"
            )


def n_to_select(n_active: int, config: SelectionConfig = SelectionConfig()) -> int:
    """Nominal number of images a concept with ``n_active`` distinct active values gets.

    ``n`` if ``n <= min_top``, else ``max(min_top, ceil(top_fraction * (n - 1)))`` (the number
    of values above the linear-interpolation quantile at exact arithmetic). The selection
    itself is the threshold rule of :func:`select_images`, which differs from this with ties
    and, rarely, by one through torch's float32 quantile arithmetic (see the module docstring).
    """
    if n_active <= config.min_top:
        return n_active
    # round() guards against e.g. 0.05 * 1000 = 50.000000000000007 turning into 51.
    k = math.ceil(round(config.top_fraction * (n_active - 1), 9))
    return min(n_active, max(config.min_top, k))


def _thresholds(
    acts_CN: torch.Tensor, active_CN: torch.Tensor, config: SelectionConfig
) -> torch.Tensor:
    """(C,) selection threshold per row of float32 ``acts_CN`` (concept-major: select
    ``acts > thr``).

    ``torch.nanquantile`` over a row with its inactive entries set to NaN is ``torch.quantile``
    of the row's active values (same sort, same rank arithmetic).
    """
    n_C = active_CN.sum(dim=1)
    zero = torch.zeros((), dtype=acts_CN.dtype)
    if n_C.numel() == 0 or int(n_C.max()) <= config.min_top:
        return zero.expand(acts_CN.shape[0])  # take every active image
    nan = torch.full((), float("nan"), dtype=acts_CN.dtype)
    q_C = torch.nanquantile(torch.where(active_CN, acts_CN, nan), 1.0 - config.top_fraction, dim=1)
    # some row has n > min_top, so there are at least min_top + 1 columns
    neg_inf = torch.full((), float("-inf"), dtype=acts_CN.dtype)
    top_Ck = torch.topk(torch.where(active_CN, acts_CN, neg_inf), config.min_top + 1, dim=1)
    q_C = torch.minimum(q_C, top_Ck.values[:, -1])  # the (min_top + 1)-th largest
    # n <= min_top: every active image (a > 0); this also covers the NaN of empty rows
    return torch.where(n_C <= config.min_top, zero, q_C)


class Selection(NamedTuple):
    """Selected (image, concept) pairs, sorted by image (the streaming pass order).

    Concepts that are scored get a *slot* ``s`` in ``concept_ids``; the pairs of image ``i`` are
    ``pair_*[image_ptr[i]:image_ptr[i + 1]]``.
    """

    concept_ids: torch.Tensor
    """(S,) int64, the original concept index of every slot."""
    n_selected: torch.Tensor
    """(S,) int64, images selected per slot."""
    pair_image: torch.Tensor
    """(P,) int64, image index of every pair (non-decreasing)."""
    pair_slot: torch.Tensor
    """(P,) int64, slot of every pair."""
    pair_weight: torch.Tensor
    """(P,) float64, the activation a_c(x) > 0 (the weight w of Eq. 15)."""
    image_ptr: torch.Tensor
    """(N + 1,) int64 offsets into the pair arrays per image."""
    skipped: dict[str, torch.Tensor]
    """Reason -> (int64) ids of the concepts skipped for it."""
    bad_images: torch.Tensor
    """(int64) images whose whole activation row is non-finite: left out of the evaluation."""
    n_images: int
    n_concepts: int

    def pairs_of(self, image_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots_K, weights_K) of the concepts that selected image ``image_index``."""
        lo, hi = int(self.image_ptr[image_index]), int(self.image_ptr[image_index + 1])
        return self.pair_slot[lo:hi], self.pair_weight[lo:hi]


def _select_column_block(
    acts_NC: torch.Tensor, config: SelectionConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Selected images per column of a dense block: (image ids, weights) per column, finite
    mask and number of active images per column."""
    c = acts_NC.shape[1]
    acts_CN = acts_NC.T.contiguous()  # reductions along the last axis are the fast ones
    finite_C = torch.isfinite(acts_CN).all(dim=1)
    acts = torch.where(torch.isfinite(acts_CN), acts_CN, torch.zeros((), dtype=acts_CN.dtype))
    active = (acts > 0) & finite_C[:, None]
    thr_C = _thresholds(acts, active, config)
    cols, rows = (active & (acts > thr_C[:, None])).nonzero(as_tuple=True)  # by column, row
    vals = acts[cols, rows].to(torch.float64)
    start_C = torch.searchsorted(cols, torch.arange(c + 1))
    images = [rows[start_C[j] : start_C[j + 1]] for j in range(c)]
    weights = [vals[start_C[j] : start_C[j + 1]] for j in range(c)]
    return images, weights, finite_C, active.sum(dim=1)


def select_images(
    table: ActivationTable | torch.Tensor,
    config: SelectionConfig = SelectionConfig(),
    block_concepts: int = 256,
) -> Selection:
    """Apply the selection rule to every concept of an activation table (images x concepts).

    Dense tables are processed ``block_concepts`` columns at a time, so memory stays at one
    block of N x block_concepts values beyond the table itself.
    """
    if isinstance(table, torch.Tensor):
        table = ActivationTable.from_dense(table)
    n_images, n_concepts = table.n_images, table.n_concepts

    per_concept_images: list[torch.Tensor] = []
    per_concept_weights: list[torch.Tensor] = []
    finite = torch.ones(n_concepts, dtype=torch.bool)
    n_active = torch.zeros(n_concepts, dtype=torch.int64)
    n_bad_N = torch.zeros(n_images, dtype=torch.int64)  # non-finite entries per image
    if table.dense is not None:
        for c0 in range(0, n_concepts, block_concepts):
            n_bad_N += (~torch.isfinite(table.dense[:, c0 : c0 + block_concepts])).sum(dim=1)
    else:
        assert table.values is not None and table.image_index is not None
        bad_entries = ~torch.isfinite(table.values)
        n_bad_N.index_add_(
            0, table.image_index[bad_entries], torch.ones_like(n_bad_N)[: int(bad_entries.sum())]
        )
    # (with no concepts at all, "every entry non-finite" would hold vacuously for every row)
    row_ok_N = (n_bad_N < n_concepts) | (n_concepts == 0)
    bad_images = torch.nonzero(~row_ok_N).flatten()
    if table.dense is not None:
        for c0 in range(0, n_concepts, block_concepts):
            block = table.dense[:, c0 : c0 + block_concepts].float()
            block = torch.where(row_ok_N[:, None], block, torch.zeros((), dtype=block.dtype))
            ims, ws, fin, act = _select_column_block(block, config)
            per_concept_images += ims
            per_concept_weights += ws
            finite[c0 : c0 + block.shape[1]] = fin
            n_active[c0 : c0 + block.shape[1]] = act
    else:
        ims_all, cons_all, vals_all = table.sparse_sorted_by_concept()
        row_ok = row_ok_N[ims_all]
        ims_all, cons_all, vals_all = ims_all[row_ok], cons_all[row_ok], vals_all[row_ok]
        fin_vals = torch.isfinite(vals_all)
        bad = torch.unique(cons_all[~fin_vals])
        finite[bad] = False
        bounds = torch.searchsorted(cons_all, torch.arange(n_concepts + 1))
        for c in range(n_concepts):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            v, im = vals_all[lo:hi], ims_all[lo:hi]
            if not finite[c]:
                per_concept_images.append(im[:0])
                per_concept_weights.append(v[:0].double())
                continue
            # sorted by value (descending) then image (ascending): the selection is a prefix
            v32 = v.float()
            n_active[c] = n = int((v32 > 0).sum())
            thr = _thresholds(v32[None, :n], torch.ones(1, n, dtype=torch.bool), config)
            k = int((v32[:n] > thr).sum())
            per_concept_images.append(im[:k])
            per_concept_weights.append(v[:k].double())

    counts = torch.tensor([len(i) for i in per_concept_images], dtype=torch.int64)
    ids = torch.arange(n_concepts)
    inactive = finite & (n_active == 0)
    too_few = finite & (n_active > 0) & (counts < config.min_images)
    kept = finite & (counts >= config.min_images)
    skipped = {
        "non_finite_activations": ids[~finite],
        "no_active_images": ids[inactive],
        "too_few_images": ids[too_few],
    }
    concept_ids = ids[kept]
    slot_images = [per_concept_images[int(c)] for c in concept_ids]
    slot_weights = [per_concept_weights[int(c)] for c in concept_ids]
    if slot_images:
        pair_image = torch.cat(slot_images).long()
        pair_weight = torch.cat(slot_weights)
        pair_slot = torch.repeat_interleave(
            torch.arange(len(concept_ids)), torch.tensor([len(x) for x in slot_images])
        )
    else:
        pair_image = torch.zeros(0, dtype=torch.int64)
        pair_weight = torch.zeros(0, dtype=torch.float64)
        pair_slot = torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(pair_image, stable=True)
    pair_image, pair_slot, pair_weight = pair_image[order], pair_slot[order], pair_weight[order]
    image_ptr = torch.searchsorted(pair_image, torch.arange(n_images + 1))
    return Selection(
        concept_ids=concept_ids,
        n_selected=counts[kept],
        pair_image=pair_image,
        pair_slot=pair_slot,
        pair_weight=pair_weight,
        image_ptr=image_ptr,
        skipped=skipped,
        bad_images=bad_images,
        n_images=n_images,
        n_concepts=n_concepts,
    )
