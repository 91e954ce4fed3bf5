"""The random-concept baseline: thresholded (not floored) uniform maps; ~0 for centred noise."""

from collections.abc import Callable

import pytest
import torch

from c2score import (
    EvalConfig,
    OracleFeatures,
    RandomBaselineConfig,
    evaluate_c2,
    pairwise_consistency_dense,
    random_attribution,
)

# Only the baseline matters here: the tests' concepts are never active, so C2 itself is NaN
# (and evaluate_c2 says so with an UndefinedScoreWarning).
pytestmark = pytest.mark.filterwarnings("ignore::c2score.report.UndefinedScoreWarning")


def test_random_map_is_a_threshold_not_a_floor() -> None:
    zero_fracs = []
    for i in range(200):
        a, w = random_attribution(0, i, (32, 32))
        nz = a[a > 0]
        # threshold at level t: a fraction ~t of the pixels is 0 and the kept values start at
        # ~t (a floor, clip(min=t), would have no zeros and the level as its minimum).
        frac_zero = 1 - len(nz) / a.numel()
        level = float(nz.min()) if len(nz) else 1.0
        assert abs(frac_zero - level) < 0.06
        assert float(nz.max()) <= 1.0
        assert w == pytest.approx(float(a.double().sum()))  # the authors' attr.sum()
        zero_fracs.append(float((a == 0).float().mean()))
    # the level is U(0, 1), so the dropped fraction is too: its mean is ~1/2, spread wide
    fr = torch.tensor(zero_fracs)
    assert 0.4 < float(fr.mean()) < 0.6 and float(fr.min()) < 0.1 and float(fr.max()) > 0.9


def test_random_maps_are_reproducible_per_seed_and_image() -> None:
    a, _ = random_attribution(1, 5, (8, 8))
    b, _ = random_attribution(1, 5, (8, 8))
    c, _ = random_attribution(2, 5, (8, 8))
    d, _ = random_attribution(1, 6, (8, 8))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert random_attribution(0, 0, (4, 4), weight="uniform")[1] == 1.0
    a, w = random_attribution(0, 0, (4, 4), weight="mean")
    assert w == pytest.approx(float(a.mean()))


def _direct_baseline(
    feats: list[torch.Tensor], seed: int, weight: Callable[[torch.Tensor], float]
) -> float:
    """Eq. 14-15 for the random concept by hand: global centring, one embedding per image."""
    mu = torch.stack([f.double().mean(dim=(1, 2)) for f in feats]).mean(dim=0)
    embs, ws = [], []
    for i, f in enumerate(feats):
        a, _ = random_attribution(seed, i, tuple(f.shape[-2:]))
        a = a.double()
        if a.sum() > 0:
            embs.append((a[None] * f.double()).sum(dim=(1, 2)) / a.sum() - mu)
            ws.append(weight(a))
    return pairwise_consistency_dense(torch.stack(embs), torch.tensor(ws))


def test_baseline_weight_is_the_map_sum_also_with_mixed_image_sizes() -> None:
    """sum(A) and mean(A) differ by the pixel count, so they disagree once sizes differ."""
    g = torch.Generator().manual_seed(4)
    sizes = [(6, 6), (16, 12)] * 15
    feats = [torch.randn(5, h, w, generator=g) + (i % 3) for i, (h, w) in enumerate(sizes)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    n = len(images)
    oracle = OracleFeatures(feats, dim=5)
    acts, maps = torch.zeros(n, 1), torch.zeros(n, 1, 4, 4)
    res = {
        weight: evaluate_c2(
            images,
            acts,
            maps,
            oracle,
            EvalConfig(progress=False, baseline=RandomBaselineConfig(weight=weight)),
        )
        for weight in ("mass", "mean")
    }
    for seed in (0, 1, 2):
        by_sum = _direct_baseline(feats, seed, lambda a: float(a.sum()))
        by_mean = _direct_baseline(feats, seed, lambda a: float(a.mean()))
        assert res["mass"].baseline_per_seed[seed] == pytest.approx(by_sum, abs=1e-6)
        assert res["mean"].baseline_per_seed[seed] == pytest.approx(by_mean, abs=1e-6)
        assert abs(by_sum - by_mean) > 1e-3  # the two weightings really differ here


def test_baseline_is_near_zero_for_centred_random_features_even_with_an_offset() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, s = 150, 16, 12
    noise = torch.randn(n, d, s, s, generator=g)
    images = [torch.rand(3, s, s, generator=g) for _ in range(n)]
    acts = torch.zeros(n, 1)
    maps = torch.zeros(n, 1, s, s)
    for offset in (0.0, 3.0):  # a shared offset would make uncentred features all similar
        oracle = OracleFeatures(noise + offset, dim=d)
        res = evaluate_c2(images, acts, maps, oracle, EvalConfig(progress=False))
        assert abs(res.baseline_mean) < 0.02, res.baseline_per_seed
        assert 0 < res.baseline_std < 0.02
        assert res.skipped_concepts["no_active_images"] == [0]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="seed"):
        RandomBaselineConfig(seeds=())
    with pytest.raises(ValueError, match="weight"):
        RandomBaselineConfig(weight="sum")  # type: ignore[arg-type]


def test_per_group_baseline_equals_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(2)
    n, d, s = 60, 6, 8
    labels = torch.arange(n) % 3 * 10  # groups 0, 10, 20
    offsets = torch.randn(3, d, 1, 1, generator=g) * 3
    feats = torch.randn(n, d, s, s, generator=g) + offsets[labels // 10]
    images = [torch.rand(3, s, s, generator=g) for _ in range(n)]
    oracle = OracleFeatures(feats, dim=d)
    cfg = EvalConfig(progress=False)
    acts, maps = torch.zeros(n, 1), torch.zeros(n, 1, s, s)
    pooled = evaluate_c2(images, acts, maps, oracle, cfg)
    grouped = evaluate_c2(images, acts, maps, oracle, cfg, baseline_groups=labels)
    mu = feats.double().mean(dim=(0, 2, 3))
    for seed in cfg.baseline.seeds:
        per_group = []
        for lab in (0, 10, 20):
            embs, ws = [], []
            for i in (labels == lab).nonzero().flatten().tolist():
                a, w = random_attribution(seed, i, (s, s))
                a = a.double()
                if a.sum() == 0:  # an all-dropped map: no embedding (skipped by the metric too)
                    continue
                embs.append((a[None] * feats[i].double()).sum(dim=(1, 2)) / a.sum() - mu)
                ws.append(w)
            per_group.append(pairwise_consistency_dense(torch.stack(embs), torch.tensor(ws)))
        assert grouped.baseline_per_seed[seed] == pytest.approx(sum(per_group) / 3, abs=1e-6)
    # same-group images share an offset: within-group random concepts look consistent
    assert grouped.baseline_mean > 0.5 > abs(pooled.baseline_mean)
    assert len(grouped.baseline_per_group) == 3 and pooled.baseline_per_group is None
    with pytest.raises(ValueError, match="one integer label per image"):
        evaluate_c2(images, acts, maps, oracle, cfg, baseline_groups=labels[:-1])
