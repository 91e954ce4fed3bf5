"""The O(N * D) consistency equals the brute-force pairwise definition (Eq. 15)."""

import itertools
import math

import pytest
import torch

from c2score import ConsistencyAccumulator, pairwise_consistency_dense, weighted_consistency


def _brute_force(emb: torch.Tensor, w: torch.Tensor) -> float:
    num = den = 0.0
    for i, j in itertools.permutations(range(len(w)), 2):
        cos = float(torch.nn.functional.cosine_similarity(emb[i], emb[j], dim=0))
        num += float(w[i] * w[j]) * cos
        den += float(w[i] * w[j])
    return num / den


@pytest.mark.parametrize(
    ("n", "d", "offset"), [(2, 3, 0.0), (7, 5, 0.0), (23, 16, 0.7), (40, 384, 0.2)]
)
def test_streaming_equals_brute_force(n: int, d: int, offset: float) -> None:
    g = torch.Generator().manual_seed(n * d)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    w = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.01
    ref = _brute_force(emb, w)
    assert weighted_consistency(emb, w) == pytest.approx(ref, abs=1e-12)
    assert pairwise_consistency_dense(emb, w) == pytest.approx(ref, abs=1e-12)


def test_accumulator_is_order_and_chunk_invariant_over_many_concepts() -> None:
    g = torch.Generator().manual_seed(0)
    n_concepts, d = 9, 12
    slots = torch.randint(0, n_concepts, (300,), generator=g)
    emb = torch.randn(300, d, generator=g, dtype=torch.float64) + 0.3
    w = torch.rand(300, generator=g, dtype=torch.float64) + 0.1
    unit = emb / emb.norm(dim=1, keepdim=True)
    acc = ConsistencyAccumulator(n_concepts, d)
    perm = torch.randperm(300, generator=g)
    for chunk in perm.split(37):
        acc.add(slots[chunk], unit[chunk].float(), w[chunk])
    got = acc.consistency()
    for c in range(n_concepts):
        m = slots == c
        assert float(got[c]) == pytest.approx(_brute_force(emb[m], w[m]), abs=1e-6)


def test_known_values_and_invariances() -> None:
    e = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    w = torch.tensor([1.0, 1.0, 2.0])
    # pairs (ordered): (0,1) cos 1 weight 1; (0,2),(1,2) cos 0 weight 2 each; doubled.
    assert weighted_consistency(e, w) == pytest.approx(1.0 / 5.0)
    assert weighted_consistency(e, 10 * w) == pytest.approx(0.2)  # weight scale invariant
    assert weighted_consistency(e * torch.tensor([[3.0], [0.1], [7.0]]), w) == pytest.approx(0.2)
    same = torch.ones(5, 4)
    assert weighted_consistency(same, torch.rand(5) + 0.1) == pytest.approx(1.0)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert weighted_consistency(opposite, torch.ones(2)) == pytest.approx(-1.0)


def test_degenerate_inputs() -> None:
    acc = ConsistencyAccumulator(2, 3)
    acc.add(torch.tensor([0]), torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1.0]))
    out = acc.consistency()
    assert math.isnan(float(out[0])) and math.isnan(float(out[1]))
    with pytest.raises(ValueError, match="zero vector"):
        weighted_consistency(torch.zeros(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        weighted_consistency(torch.ones(3, 2), torch.ones(4))


def test_add_embeddings_centres_normalises_and_drops_zero_rows() -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(3000, 7, generator=g, dtype=torch.float64) + 2.0
    w = torch.rand(3000, generator=g, dtype=torch.float64) + 0.1
    slots = torch.randint(0, 4, (3000,), generator=g)
    centre = emb.mean(dim=0)
    emb[10] = centre  # centres to the zero vector: left out
    acc = ConsistencyAccumulator(4, 7)
    used = acc.add_embeddings(slots, emb, w, centre_D=centre)
    assert used.sum() == 2999 and not used[10]
    got = acc.consistency()
    keep = torch.arange(3000) != 10
    for c in range(4):
        m = (slots == c) & keep
        ref = pairwise_consistency_dense(emb[m] - centre, w[m])
        assert float(got[c]) == pytest.approx(ref, abs=1e-6)
