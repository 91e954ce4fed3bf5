"""Stability score: Hungarian matching of atoms by cosine, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from topk_sae import BiasFreeTopKSAE
from topk_sae.stability import stability_score


def _brute_force(a: np.ndarray, b: np.ndarray) -> float:
    """Best mean cosine over every injective map from the smaller set of atoms to the larger."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    if len(a) > len(b):
        a, b = b, a
    cos = a @ b.T
    best = -np.inf
    for perm in itertools.permutations(range(len(b)), len(a)):
        best = max(best, cos[np.arange(len(a)), list(perm)].mean())
    return float(best)


def test_permuted_rescaled_copy_scores_one() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 16, generator=gen)
    perm = torch.randperm(50, generator=gen)
    b = a[perm] * torch.rand(50, 1, generator=gen).add(0.5)  # same directions, other norms
    result = stability_score(a, b)
    assert result.score == pytest.approx(1.0, abs=1e-12)
    # The matching recovers the permutation: atom perm[j] of A is atom j of B.
    assert torch.equal(result.index_b[perm], torch.arange(50))
    assert torch.allclose(result.matched_cosine, torch.ones(50, dtype=torch.float64))


def test_sign_flips_count_against_stability() -> None:
    a = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    assert stability_score(a, -a).score < 0.5


def test_random_dictionaries_score_low() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
    # Random unit vectors in 128-d have cosines ~ N(0, 1/128); the best matching stays well
    # below the ~1 of a real copy.
    assert stability_score(a, b).score < 0.35


@pytest.mark.parametrize(("n_a", "n_b", "seed"), [(4, 4, 0), (5, 5, 1), (3, 6, 2), (6, 4, 3)])
def test_matching_equals_brute_force(n_a: int, n_b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n_a, 3)), rng.normal(size=(n_b, 3))
    result = stability_score(a, b)
    assert result.score == pytest.approx(_brute_force(a, b), abs=1e-12)
    assert len(result.index_a) == min(n_a, n_b)
    assert len(set(result.index_b.tolist())) == min(n_a, n_b)  # one-to-one


def test_accepts_saes_and_rejects_mismatches() -> None:
    sae_a = BiasFreeTopKSAE(8, 10, 2, generator=torch.Generator().manual_seed(0))
    sae_b = BiasFreeTopKSAE(8, 12, 2, generator=torch.Generator().manual_seed(1))
    direct = stability_score(sae_a.W_dec, sae_b.W_dec).score
    assert stability_score(sae_a, sae_b).score == pytest.approx(direct)
    assert stability_score(sae_a, sae_a).score == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different spaces"):
        stability_score(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="zero atom"):
        stability_score(torch.zeros(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="n_atoms, d"):
        stability_score(torch.randn(4), torch.randn(3, 4))
