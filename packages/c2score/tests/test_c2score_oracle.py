"""Oracle features (ground-truth part masks) validate the metric on a synthetic dataset."""

import pytest
import torch

from c2score import EvalConfig, OracleFeatures, evaluate_c2
from c2score.features.base import PixelFeatureExtractor

N, S = 80, 28
PARTS = ("background", "head", "body", "tail")


def _synthetic(seed: int = 0):
    """Images with three coloured parts at random places; one-hot part masks as features."""
    g = torch.Generator().manual_seed(seed)
    images, masks = [], []
    colours = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.9]])
    for _ in range(N):
        label = torch.zeros(S, S, dtype=torch.long)
        for part, size in ((2, 12), (1, 6), (3, 5)):
            y, x = torch.randint(0, S - size, (2,), generator=g).tolist()
            label[y : y + size, x : x + size] = part
        images.append(colours[label].permute(2, 0, 1) + 0.05 * torch.rand(3, S, S, generator=g))
        masks.append(torch.nn.functional.one_hot(label, len(PARTS)).permute(2, 0, 1).float())
    return [im.clamp(0, 1) for im in images], torch.stack(masks)


def test_aligned_concept_scores_far_above_a_random_one() -> None:
    images, masks = _synthetic()
    g = torch.Generator().manual_seed(1)
    # concept 0 = "head" (its map is the head mask, activation = head area, noisy);
    # concept 1 = a random blob in every image, unrelated to the parts.
    head = masks[:, 1]
    acts = torch.stack(
        [head.sum(dim=(1, 2)) + torch.rand(N, generator=g), torch.rand(N, generator=g) + 0.1], 1
    )
    blob = torch.nn.functional.interpolate(
        torch.rand(N, 1, 4, 4, generator=g), size=(S, S), mode="bilinear"
    )[:, 0]
    maps = torch.stack([head * (0.5 + torch.rand(N, S, S, generator=g)), blob], dim=1)
    oracle = OracleFeatures(masks, dim=len(PARTS))
    res = evaluate_c2(images, acts, maps, oracle, EvalConfig(progress=False))
    by_id = dict(zip(res.concept_ids, res.consistency))
    assert by_id[0] > 0.99  # every head embedding is the same centred one-hot vector
    assert by_id[1] < 0.3
    assert abs(res.baseline_mean) < 0.1
    # the C2 of a method made of part-aligned concepts is far above that of random concepts
    only_head = evaluate_c2(images, acts[:, :1], maps[:, :1], oracle, EvalConfig(progress=False))
    only_blob = evaluate_c2(images, acts[:, 1:], maps[:, 1:], oracle, EvalConfig(progress=False))
    assert only_head.c2 > 0.9
    assert only_head.c2 - only_blob.c2 > 0.6


def test_oracle_serves_maps_by_index_and_resizes() -> None:
    maps = [torch.full((2, 4, 4), float(i)) for i in range(3)]
    oracle = OracleFeatures(maps, dim=2)
    out = oracle.features_at([2, 0], torch.zeros(2, 3, 8, 6))
    assert out.shape == (2, 2, 8, 6)
    assert torch.allclose(out[0], torch.full((2, 8, 6), 2.0)) and float(out[1].abs().max()) == 0
    assert isinstance(oracle, PixelFeatureExtractor)
    with pytest.raises(TypeError, match="features_at"):
        oracle(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        OracleFeatures(maps, dim=3).features_at([0], torch.zeros(1, 3, 4, 4))
    by_callable = OracleFeatures(lambda i: torch.ones(2, 5, 5) * i, dim=2)
    assert float(by_callable.features_at([4], torch.zeros(1, 3, 5, 5)).mean()) == 4.0
