"""Ground-truth metrics of the concept world on hand-made cases, against brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fact_model.world.groundtruth import (
    GroundTruthReport,
    auroc,
    ground_truth_report,
    localisation_pairs,
    mask_metrics,
    match_concepts,
)


def _auroc_brute(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(equal), over all pairs."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def test_auroc_equals_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        s = rng.integers(0, 4, n).astype(float)  # many ties
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        assert auroc(s, y) == pytest.approx(_auroc_brute(s, y), abs=1e-12)
    assert math.isnan(auroc(np.arange(4.0), np.ones(4, bool)))
    assert auroc(np.zeros(6), np.array([1, 0, 1, 0, 0, 1], bool)) == 0.5


def test_mask_metrics_perfect_inverted_random_and_constant() -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((32, 32), bool)
    mask[4:14, 6:20] = True
    area = mask.mean()
    assert mask_metrics(mask.astype(float), mask) == (1.0, 1.0)
    # Credit only outside the mask: no mass inside, every mask pixel ranked last.
    assert mask_metrics((~mask).astype(float), mask) == (0.0, 0.0)
    mass, auc = mask_metrics(rng.random((32, 32)), mask)
    assert mass == pytest.approx(area, abs=0.03) and auc == pytest.approx(0.5, abs=0.06)
    mass, auc = mask_metrics(np.ones((32, 32)), mask)
    assert mass == pytest.approx(area) and auc == 0.5
    # Negative attribution is not mass: a map that is negative on the mask and positive
    # elsewhere scores 0; a fully negative map has no mass (NaN) but a defined AUROC.
    signed = np.where(mask, -1.0, 0.5)
    assert mask_metrics(signed, mask) == (0.0, 0.0)
    mass, auc = mask_metrics(-np.ones((32, 32)) + mask, mask)
    assert math.isnan(mass) and auc == 1.0
    # Torch input, brute-force mass.
    a = torch.randn(32, 32)
    mass, _ = mask_metrics(a, torch.from_numpy(mask))
    pos = a.clamp(min=0).numpy()
    assert mass == pytest.approx(pos[mask].sum() / pos.sum(), rel=1e-6)


def test_mask_metrics_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        mask_metrics(np.zeros((3, 8, 8)), np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="NaN"):
        mask_metrics(np.full((4, 4), np.nan), np.eye(4, dtype=bool))


def _world_like(n: int = 400, c: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, c)) < np.linspace(0.2, 0.6, c)


def test_match_concepts_perfect_random_anticorrelated() -> None:
    present = _world_like()
    rng = np.random.default_rng(2)
    n = len(present)
    # Learned concepts: 0 random, 1 = true concept 3 plus a constant, 2 = NOT true concept 0,
    # 3 = true concept 1 with 10 % of the labels flipped.
    noisy = present[:, 1] ^ (rng.random(n) < 0.1)
    learned = np.stack(
        [rng.random(n), present[:, 3] * 2.0 + 5, ~present[:, 0] * 1.0, noisy * 1.0], axis=1
    )
    m = match_concepts(learned, present)
    assert m.learned[3] == 1 and m.auroc[3] == 1.0
    assert m.learned[1] == 3 and 0.8 < m.auroc[1] < 0.95
    assert m.auroc_all[2, 0] == 0.0  # anti-correlated: never sign-flipped
    assert m.auroc_all[0, 2] == pytest.approx(0.5, abs=0.08)  # random: chance
    for k in range(learned.shape[1]):  # the whole table against brute force
        for c in range(present.shape[1]):
            assert m.auroc_all[k, c] == pytest.approx(_auroc_brute(learned[:, k], present[:, c]))
    # A true concept in every image has no defined AUROC and no match.
    present[:, 4] = True
    m = match_concepts(learned, present)
    assert m.learned[4] == -1 and math.isnan(m.auroc[4])


def test_match_concepts_input_errors() -> None:
    with pytest.raises(ValueError, match="same N"):
        match_concepts(np.zeros((5, 2)), np.zeros((4, 2), bool))
    with pytest.raises(ValueError, match="NaN"):
        match_concepts(np.full((5, 2), np.nan), np.zeros((5, 2), bool))


def _masks_for(present: np.ndarray, size: int = 16, seed: int = 3) -> np.ndarray:
    """Random rectangles per (image, present concept)."""
    rng = np.random.default_rng(seed)
    n, c = present.shape
    masks = np.zeros((n, c, size, size), bool)
    for i, k in zip(*np.nonzero(present)):
        r0, c0 = rng.integers(0, size - 4, 2)
        masks[i, k, r0 : r0 + 4, c0 : c0 + 5] = True
    return masks


def test_ground_truth_report_perfect_random_and_anticorrelated() -> None:
    present = _world_like(n=200, c=3, seed=5)
    masks = _masks_for(present)
    rng = np.random.default_rng(6)
    n = len(present)
    # Learned 0 = true 0 exactly; 1 = noise; 2 = NOT true 2.
    learned = np.stack([present[:, 0] * 1.0, rng.random(n), ~present[:, 2] * 1.0], axis=1)
    m = match_concepts(learned, present)
    images, concepts = localisation_pairs(m, present, per_concept=6)
    assert len(images) == 18 and present[images, concepts].all()
    maps = []
    for i, c in zip(images, concepts):
        if c == 0:  # the perfect concept's map is its mask
            maps.append(masks[i, c].astype(np.float32))
        else:  # the others point at random pixels
            maps.append(rng.random(masks.shape[2:]).astype(np.float32))
    rep = ground_truth_report(m, present, images, concepts, np.stack(maps), masks)
    assert isinstance(rep, GroundTruthReport)
    assert rep.image_auroc[0] == 1.0 and rep.mass_in_mask[0] == 1.0 and rep.pixel_auroc[0] == 1.0
    assert rep.recovered.tolist() == [True, False, False]
    assert rep.fraction_recovered == pytest.approx(1 / 3)
    area = masks[present].mean()
    assert rep.mass_in_mask[1] == pytest.approx(area, abs=0.05)
    assert rep.pixel_auroc[1] == pytest.approx(0.5, abs=0.1)
    assert rep.n_localised.tolist() == [6, 6, 6]
    d = rep.to_dict(["a", "b", "c"])
    json.dumps(d)  # JSON-ready
    assert d["matches"][0] == {
        "name": "a",
        "learned": 0,
        "auroc": 1.0,
        "mass_in_mask": 1.0,
        "pixel_auroc": 1.0,
        "n_localised": 6,
        "recovered": True,
    }
    # Concept 2 is matched to its best learned concept, none of which predicts it: ~chance,
    # and never the anti-correlated one (AUROC 0) since better ones exist.
    assert m.learned[2] != 2 and rep.image_auroc[2] < 0.65


def test_ground_truth_report_refuses_pairs_without_the_concept() -> None:
    present = _world_like(n=50, c=2, seed=7)
    masks = _masks_for(present)
    m = match_concepts(present * 1.0, present)
    absent = int(np.flatnonzero(~present[:, 0])[0])
    with pytest.raises(ValueError, match="absent from image"):
        ground_truth_report(m, present, [absent], [0], np.zeros((1, 16, 16)), masks)
    with pytest.raises(ValueError, match="one entry per scored pair"):
        ground_truth_report(m, present, [0, 1], [0], np.zeros((1, 16, 16)), masks)
