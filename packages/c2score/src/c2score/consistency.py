"""Weighted pairwise cosine consistency of concept embeddings (paper Eq. 15), in O(N * D).

With unit rows u_i = e_i / |e_i| and weights w_i,

    sum_{i != j} w_i w_j cos(e_i, e_j) / sum_{i != j} w_i w_j
        = (|sum_i w_i u_i|^2 - sum_i w_i^2) / ((sum_i w_i)^2 - sum_i w_i^2),

so a concept needs only sum_i w_i u_i (D numbers), sum_i w_i and sum_i w_i^2: no N x N matrix.
Accumulation is in float64. The normalisation by sum_{i != j} w_i w_j follows the authors' code
(Eq. 15 as printed has none); it makes the score a weighted mean cosine in [-1, 1].
"""

from __future__ import annotations

import torch

__all__ = ["ConsistencyAccumulator", "pairwise_consistency_dense", "weighted_consistency"]


def _unit_rows(emb_ND: torch.Tensor) -> torch.Tensor:
    emb = emb_ND.to(torch.float64)
    norm = emb.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("an embedding is the zero vector: its cosine similarity is undefined")
    return emb / norm


def weighted_consistency(emb_ND: torch.Tensor, weight_N: torch.Tensor) -> float:
    """Eq. 15 for one concept from its N embeddings and weights, in O(N * D)."""
    if emb_ND.ndim != 2 or weight_N.shape != (emb_ND.shape[0],):
        raise ValueError(
            f"need (N, D) embeddings and (N,) weights, got {emb_ND.shape}, {weight_N.shape}"
        )
    acc = ConsistencyAccumulator(1, emb_ND.shape[1])
    acc.add(torch.zeros(len(weight_N), dtype=torch.int64), _unit_rows(emb_ND), weight_N)
    return float(acc.consistency()[0])


def pairwise_consistency_dense(emb_ND: torch.Tensor, weight_N: torch.Tensor) -> float:
    """The same quantity through the dense N x N cosine matrix (the authors' formulation).

    Reference for tests and the benchmark only: O(N^2) time and memory.
    """
    u = _unit_rows(emb_ND)
    w = weight_N.to(torch.float64)
    sim_NN = u @ u.T
    ww_NN = w[:, None] * w[None, :]
    ww_NN.fill_diagonal_(0.0)
    return float((ww_NN * sim_NN).sum() / ww_NN.sum())


_ROWS = 1024  # rows folded per step: temporaries stay small and cache-resident


class ConsistencyAccumulator:
    """Running sums for the consistencies of C concepts, fed embeddings in any order and chunking.

    Memory: C x D float64 (sum_i w_i u_i) plus three C-vectors, whatever the number of images.
    """

    def __init__(self, n_concepts: int, dim: int) -> None:
        self.sum_wu_CD = torch.zeros(n_concepts, dim, dtype=torch.float64)
        self.sum_w_C = torch.zeros(n_concepts, dtype=torch.float64)
        self.sum_w2_C = torch.zeros(n_concepts, dtype=torch.float64)
        self.count_C = torch.zeros(n_concepts, dtype=torch.int64)

    def _fold(
        self, slot_K: torch.Tensor, rows_KD: torch.Tensor, scale_K: torch.Tensor, w_K: torch.Tensor
    ) -> None:
        """sum_wu[slot] += scale * row (row products in the rows' precision, sums in float64)."""
        scaled = rows_KD * scale_K.to(device=rows_KD.device, dtype=rows_KD.dtype)[:, None]
        self.sum_wu_CD.index_add_(0, slot_K, scaled.to(device="cpu", dtype=torch.float64))
        self.sum_w_C.index_add_(0, slot_K, w_K)
        self.sum_w2_C.index_add_(0, slot_K, w_K * w_K)
        self.count_C.index_add_(0, slot_K, torch.ones_like(slot_K))

    def add(self, slot_K: torch.Tensor, unit_KD: torch.Tensor, weight_K: torch.Tensor) -> None:
        """Fold in K unit embeddings ``unit_KD`` of concepts ``slot_K`` with weights ``weight_K``."""
        slot_K, w_K = slot_K.long().cpu(), weight_K.to(torch.float64).cpu()
        for r0 in range(0, len(slot_K), _ROWS):
            r = slice(r0, r0 + _ROWS)
            self._fold(slot_K[r], unit_KD[r], w_K[r], w_K[r])

    def add_embeddings(
        self,
        slot_K: torch.Tensor,
        emb_KD: torch.Tensor,
        weight_K: torch.Tensor,
        centre_D: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Centre (optionally, in float64), normalise and fold in raw embeddings in one sweep.

        Returns the (K,) mask of the rows used: zero or non-finite vectors are left out.
        """
        slot_K, w_K = slot_K.long().cpu(), weight_K.to(torch.float64).cpu()
        used = torch.zeros(len(slot_K), dtype=torch.bool)
        for r0 in range(0, len(slot_K), _ROWS):
            r = slice(r0, r0 + _ROWS)
            e = emb_KD[r]
            if centre_D is not None:
                e = e.to(torch.float64) - centre_D.to(device=e.device, dtype=torch.float64)
            # the norm in the rows' precision (a float64 upcast inside vector_norm is ~10x slower)
            norm = torch.linalg.vector_norm(e, dim=1).to(device="cpu", dtype=torch.float64)
            ok = torch.isfinite(norm) & (norm > 0)
            used[r] = ok
            if bool(ok.all()):
                self._fold(slot_K[r], e, w_K[r] / norm, w_K[r])
            else:
                idx = ok.nonzero().flatten()
                self._fold(slot_K[r][idx], e[idx.to(e.device)], (w_K[r] / norm)[idx], w_K[r][idx])
        return used

    def consistency(self) -> torch.Tensor:
        """(C,) float64 consistencies; NaN for concepts with fewer than two embeddings."""
        num = (self.sum_wu_CD * self.sum_wu_CD).sum(dim=1) - self.sum_w2_C
        den = self.sum_w_C * self.sum_w_C - self.sum_w2_C
        out = num / den
        out[(self.count_C < 2) | (den <= 0)] = float("nan")
        return out
