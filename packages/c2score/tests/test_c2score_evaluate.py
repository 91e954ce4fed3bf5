"""Streaming evaluation == a direct dense computation of Eq. 13-16; resume; batching; cache."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from c2score import (
    ActivationTable,
    EvalConfig,
    OracleFeatures,
    RandomBaselineConfig,
    SelectionConfig,
    evaluate_c2,
    random_attribution,
    save_activation_table,
)
from c2score.report import UndefinedScoreWarning

N, C, D, H, W = 36, 6, 8, 12, 10


class TinyExtractor:
    """A fixed random per-pixel map of RGB (plus position) to D features; counts calls."""

    patch_size = 2

    def __init__(self, dim: int = D, fail_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(dim, 5, generator=g)
        self.dim = dim
        self.fail_at = fail_at
        self.seen: list[int] = []
        self.lowres_calls = 0

    def _feats(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        inp = torch.cat([x, yy.expand(b, 1, h, w), xx.expand(b, 1, h, w)], dim=1)
        return torch.tanh(torch.einsum("dc,bchw->bdhw", self.w, inp)) + 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_at in self.seen_next(x):
            raise RuntimeError("simulated crash")
        return self._feats(x)

    def seen_next(self, x: torch.Tensor) -> list[int]:  # images are tagged by their pixel (0,0)
        idx = [round(float(v) * 100) for v in x[:, 0, 0, 0]]
        self.seen += idx
        return idx


def _data(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, H, W, generator=g) for _ in range(N)]
    for i, im in enumerate(images):
        im[0, 0, 0] = i / 100  # a tag so the tiny extractor can tell which image it sees
    acts = torch.rand(N, C, generator=g) - 0.3
    acts[:, 4] = -1.0  # never active
    acts[:3, 4] = 1.0  # 3 active: too few
    maps = torch.randn(N, C, H // 2, W // 2, generator=g)
    maps[5, 0] = -1.0  # an all-negative map of a selected pair: relu sum 0 -> pair skipped
    acts[5, 0] = 5.0
    return images, acts, maps


def _reference(images, acts, maps, extractor, sel_cfg, seeds, relu_first=True):
    """Eq. 13-16 computed directly: all features in memory, explicit loops, N x N pairs.

    Maps are clipped at 0 and then resized, as the authors do (``relu_first=False``: resized,
    then clipped)."""
    feats = torch.cat([extractor._feats(im[None]) for im in images]).double()
    mu = feats.mean(dim=(0, 2, 3))
    centred = feats - mu[None, :, None, None]
    maps = maps.float().clamp_min(0) if relu_first else maps.float()
    up = torch.nn.functional.interpolate(maps, size=(H, W), mode="bilinear").double()

    def consistency(pairs):
        num = den = 0.0
        for (ei, wi), (ej, wj) in itertools.permutations(pairs, 2):
            num += wi * wj * float(torch.nn.functional.cosine_similarity(ei, ej, dim=0))
            den += wi * wj
        return num / den

    def emb(a, f):
        a = a.clamp_min(0)
        return (a[None] * f).sum(dim=(1, 2)) / a.sum()

    scores = {}
    for c in range(acts.shape[1]):
        col = acts[:, c].float()
        pos = col[col > 0]  # the authors' rule: a > min(q95 of the positives, 11th largest)
        thr = 0.0 if len(pos) <= 10 else min(torch.quantile(pos, 0.95), pos.topk(11).values[-1])
        act = [i for i in range(N) if col[i] > thr]
        chosen = [i for i in act if float(up[i, c].clamp_min(0).sum()) > 0]
        if len(chosen) >= sel_cfg.min_images:
            scores[c] = consistency([(emb(up[i, c], centred[i]), float(col[i])) for i in chosen])
    base = []
    for s in seeds:
        pairs = []
        for i in range(N):
            a, w = random_attribution(s, i, (H, W))
            pairs.append((emb(a.double(), centred[i]), w))
        base.append(consistency(pairs))
    return scores, base


def test_streaming_equals_direct_reference() -> None:
    images, acts, maps = _data()
    sel_cfg = SelectionConfig(top_fraction=0.05, min_top=10, min_images=5)
    cfg = EvalConfig(selection=sel_cfg, batch_size=4, progress=False)
    ext = TinyExtractor()
    res = evaluate_c2(images, acts, maps, ext, cfg)
    scores, base = _reference(images, acts, maps, ext, sel_cfg, cfg.baseline.seeds)
    assert res.concept_ids == sorted(scores)
    for c, v in zip(res.concept_ids, res.consistency):
        assert v == pytest.approx(scores[c], abs=1e-5)
    assert [res.baseline_per_seed[s] for s in (0, 1, 2)] == pytest.approx(base, abs=1e-5)
    expected_c2 = sum(scores.values()) / len(scores) - sum(base) / 3
    assert res.c2 == pytest.approx(expected_c2, abs=1e-5)
    assert res.skipped_concepts["too_few_images"] == [4]
    assert res.skipped_pairs == {"empty_attribution": 1}
    assert res.n_images_used == N


def test_maps_are_clipped_before_resizing_unless_asked_otherwise() -> None:
    images, acts, maps = _data(8)
    sel_cfg = SelectionConfig()
    ext = TinyExtractor()
    runs = {
        order: evaluate_c2(
            images, acts, maps, ext, EvalConfig(progress=False, relu_before_resize=order)
        )
        for order in (True, False)
    }
    for order, res in runs.items():
        scores, _ = _reference(images, acts, maps, ext, sel_cfg, (0,), relu_first=order)
        assert res.concept_ids == sorted(scores)
        for c, v in zip(res.concept_ids, res.consistency):
            assert v == pytest.approx(scores[c], abs=1e-5)
    # the two orders really differ on these half-resolution maps with negative values
    assert max(abs(a - b) for a, b in zip(runs[True].consistency, runs[False].consistency)) > 1e-3
    # random-concept maps are at image resolution: the order does not matter for them
    assert runs[True].baseline_per_seed == pytest.approx(runs[False].baseline_per_seed, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"map_chunk": 0}, "map_chunk must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"checkpoint_every": -1}, "checkpoint_every must be a positive integer"),
        ({"device": "gpu"}, "not a torch device"),
    ],
)
def test_bad_eval_config_is_refused_on_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalConfig(**kwargs)
    with pytest.raises(TypeError, match="SelectionConfig"):
        EvalConfig(selection={"min_top": 5})  # type: ignore[arg-type]


def _assert_same(a, b) -> None:
    assert a.concept_ids == b.concept_ids
    assert a.consistency == pytest.approx(b.consistency, abs=1e-9)
    assert a.baseline_per_seed == pytest.approx(b.baseline_per_seed, abs=1e-9)
    assert a.skipped_pairs == b.skipped_pairs and a.skipped_images == b.skipped_images


def test_batch_size_does_not_change_the_result() -> None:
    images, acts, maps = _data(1)
    runs = [
        evaluate_c2(images, acts, maps, TinyExtractor(), EvalConfig(batch_size=b, progress=False))
        for b in (1, 5)
    ]
    _assert_same(*runs)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    images, acts, maps = _data(2)
    cfg = EvalConfig(batch_size=2, checkpoint_every=4, progress=False)
    full = evaluate_c2(images, acts, maps, TinyExtractor(), cfg)
    crashing = TinyExtractor(fail_at=21)
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate_c2(images, acts, maps, crashing, cfg, work_dir=tmp_path)
    again = TinyExtractor()
    resumed = evaluate_c2(images, acts, maps, again, cfg, work_dir=tmp_path)
    _assert_same(full, resumed)
    assert min(again.seen) == 20  # images 0..19 came from the checkpoint, not recomputed
    # a finished work dir answers without touching the images again
    third = TinyExtractor()
    _assert_same(full, evaluate_c2(images, acts, maps, third, cfg, work_dir=tmp_path))
    assert third.seen == []
    with pytest.raises(ValueError, match="fingerprint"):
        evaluate_c2(images, acts * 2, maps, TinyExtractor(), cfg, work_dir=tmp_path)


def test_a_crash_inside_a_batch_rolls_it_back_and_resumes_exactly(tmp_path: Path) -> None:
    images, acts, maps = _data(6)
    acts[:, 0] = torch.linspace(1, 2, N)  # concept 0 selects the last 10 images
    cfg = EvalConfig(batch_size=4, checkpoint_every=100, progress=False)
    full = evaluate_c2(images, acts, maps, TinyExtractor(), cfg)

    def flaky(image: int, concepts: torch.Tensor) -> torch.Tensor:
        if image == 30:  # images 28, 29 of the batch 28..31 are already embedded
            raise OSError("attribution store went away")
        return maps[image, concepts]

    with pytest.raises(OSError, match="went away"):
        evaluate_c2(images, acts, flaky, TinyExtractor(), cfg, work_dir=tmp_path)
    again = TinyExtractor()
    resumed = evaluate_c2(images, acts, maps, again, cfg, work_dir=tmp_path)
    assert min(again.seen) == 28  # saved on the way out although no checkpoint was due
    _assert_same(full, resumed)


class TwoStage(TinyExtractor):
    """Exposes lowres / upsample like the DINOv2 + upsampler extractors."""

    def lowres(self, x: torch.Tensor) -> torch.Tensor:
        self.lowres_calls += len(x)
        return self._feats(x)[:, :, ::2, ::2]

    def upsample(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(low, size=x.shape[-2:], mode="nearest")


def test_lowres_cache_is_reused(tmp_path: Path) -> None:
    images, acts, maps = _data(3)
    cfg = EvalConfig(batch_size=3, progress=False)
    first, second = TwoStage(), TwoStage()
    a = evaluate_c2(images, acts, maps, first, cfg, lowres_cache=tmp_path)
    b = evaluate_c2(images, acts, maps, second, cfg, lowres_cache=tmp_path)
    assert first.lowres_calls == N and second.lowres_calls == 0
    _assert_same(a, b)
    with pytest.raises(ValueError, match="belongs to"):
        evaluate_c2(images, acts, maps, TwoStage(dim=D + 1), cfg, lowres_cache=tmp_path)
    cropped = [im[:, :8, :8] for im in images]
    with pytest.raises(ValueError, match="preprocessing"):
        evaluate_c2(cropped, acts, maps, TwoStage(), cfg, lowres_cache=tmp_path)
    c = evaluate_c2(images, acts, maps, TwoStage(), cfg)  # no cache: plain __call__
    assert not math.isclose(a.c2, c.c2, abs_tol=1e-6)  # __call__ is full-res, lowres is not


def test_bad_inputs_fail_up_front_or_are_counted() -> None:
    images, acts, maps = _data(4)
    cfg = EvalConfig(progress=False)
    with pytest.raises(ValueError, match="rows"):
        evaluate_c2(images[:-1], acts, maps, TinyExtractor(), cfg)
    with pytest.raises(ValueError, match="attribution maps cover"):
        evaluate_c2(images, acts, maps[:, :3], TinyExtractor(), cfg)
    acts = acts.clone()
    acts[3, 1] = float("nan")
    acts[11] = float("nan")  # the concept model failed on image 11: the image is left out
    bad = list(images)
    bad[7] = torch.rand(3, 1, 1)  # smaller than the patch
    bad[8] = torch.full((3, H, W), 2.0)  # float image outside [0, 1]
    maps = maps.clone()
    maps[9, 2] = float("nan")
    acts[9, 2] = 5.0
    res = evaluate_c2(bad, acts, maps, TinyExtractor(), cfg)
    assert res.skipped_concepts["non_finite_activations"] == [1]
    assert res.skipped_images == {
        "smaller_than_patch": 1,
        "invalid_image": 1,
        "non_finite_activations": 1,
    }
    assert res.n_images_used == N - 3
    assert res.skipped_pairs["non_finite_attribution"] == 1


def test_generators_are_accepted_and_checked() -> None:
    images, acts, maps = _data(5)
    cfg = EvalConfig(progress=False, baseline=RandomBaselineConfig(seeds=(3,)))
    a = evaluate_c2(iter(images), acts, maps, TinyExtractor(), cfg)
    b = evaluate_c2(images, acts, maps, TinyExtractor(), cfg)
    _assert_same(a, b)
    assert a.baseline_std == 0.0
    with pytest.raises(ValueError, match="only 30 images"):
        evaluate_c2(iter(images[:30]), acts, maps, TinyExtractor(), cfg)
    with pytest.raises(ValueError, match="more images"):
        evaluate_c2(iter([*images, images[0]]), acts, maps, TinyExtractor(), cfg)


def test_with_a_tiny_dinov2_and_bilinear_upsampling(tmp_path: Path) -> None:
    """The real two-stage extractor (random tiny DINOv2 + bilinear) runs through the metric."""
    from transformers import Dinov2Config, Dinov2Model

    from c2score.features import BilinearUpsampler, Dinov2PatchFeatures, UpsampledFeatureExtractor

    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=28, patch_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    ext = UpsampledFeatureExtractor(Dinov2PatchFeatures(Dinov2Model(config)), BilinearUpsampler())
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 28, 28, generator=g) for _ in range(12)]
    images.append(torch.rand(3, 5, 5, generator=g))  # smaller than one patch: skipped, counted
    acts = torch.rand(13, 3, generator=g)
    maps = torch.rand(13, 3, 7, 7, generator=g)
    cfg = EvalConfig(batch_size=4, progress=False)
    res = evaluate_c2(images, acts, maps, ext, cfg, lowres_cache=tmp_path)
    assert res.skipped_images == {"smaller_than_patch": 1}
    assert res.feature_dim == 16 and len(res.concept_ids) == 3
    assert all(-1 <= c <= 1 for c in res.consistency) and math.isfinite(res.c2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 12
    # features under transformers' position-embedding rule are others: not from this cache
    other = Dinov2PatchFeatures(ext.backbone.model, pos_interpolation="transformers")
    with pytest.raises(ValueError, match="belongs to"):
        evaluate_c2(images, acts, maps, UpsampledFeatureExtractor(other, BilinearUpsampler()), cfg, lowres_cache=tmp_path)  # fmt: skip


def test_sparse_table_file_and_stored_maps_and_an_empty_result(tmp_path: Path) -> None:
    images, acts, maps = _data(7)
    acts = acts.clamp_min(0)
    nz = acts.nonzero()
    sparse = ActivationTable.from_sparse(nz[:, 0], nz[:, 1], acts[nz[:, 0], nz[:, 1]], (N, C))
    save_activation_table(sparse, tmp_path / "acts.safetensors")
    ii, cc = torch.meshgrid(torch.arange(N), torch.arange(C), indexing="ij")
    save_file(
        {"image_index": ii.flatten(), "concept_index": cc.flatten(), "maps": maps.flatten(0, 1)},
        str(tmp_path / "maps.safetensors"),
    )
    cfg = EvalConfig(progress=False)
    from_files = evaluate_c2(
        images, tmp_path / "acts.safetensors", tmp_path / "maps.safetensors", TinyExtractor(), cfg
    )
    _assert_same(from_files, evaluate_c2(images, acts, maps, TinyExtractor(), cfg))

    with pytest.warns(UndefinedScoreWarning, match="no concept could be scored"):
        empty = evaluate_c2(images, torch.zeros(N, 2), maps[:, :2], TinyExtractor(), cfg)
    assert math.isnan(empty.c2) and empty.concept_ids == []
    assert empty.skipped_concepts["no_active_images"] == [0, 1]
    empty.save_json(tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["c2"] is None and report["baseline"]["mean"] is not None
    assert "C2-score" in empty.summary()


def test_an_empty_concept_set_is_refused_as_such() -> None:
    """Zero concepts used to flag every image as 'non_finite_activations' (all of a 0-wide row
    is non-finite) and end in "no image could be used"."""
    images, acts, maps = _data(9)
    with pytest.raises(ValueError, match=r"no concepts \(36 x 0\)"):
        evaluate_c2(images, acts[:, :0], maps[:, :0], TinyExtractor(), EvalConfig(progress=False))


def test_no_usable_image_lists_the_reasons_it_refers_to() -> None:
    images, acts, maps = _data(10)
    bad = [im * 3 for im in images]  # float images outside [0, 1]: all invalid
    bad[4] = torch.rand(3, 1, 1)  # smaller than the patch
    with pytest.raises(ValueError, match="no image could be used") as err:
        evaluate_c2(bad, acts, maps, TinyExtractor(), EvalConfig(progress=False))
    msg = str(err.value)
    assert "35 x invalid_image" in msg and "1 x smaller_than_patch" in msg
    assert "float image values must lie in [0, 1]" in msg  # the example detail of the reason


def test_undefined_c2_warns_and_says_why() -> None:
    images, acts, maps = _data(11)
    cfg = EvalConfig(progress=False)
    with pytest.warns(UndefinedScoreWarning, match="at least 2 usable images") as rec:
        one = evaluate_c2(images[:1], acts[:1], maps[:1], TinyExtractor(), cfg)
    assert math.isnan(one.c2) and one.undefined_reason is not None
    assert "no concept could be scored" in str(rec[0].message)
    assert one.to_dict()["c2_undefined_reason"] == one.undefined_reason
    fine = evaluate_c2(images, acts, maps, TinyExtractor(), cfg)
    assert math.isfinite(fine.c2) and fine.undefined_reason is None


def test_oracle_with_fewer_maps_than_images_is_refused_up_front() -> None:
    images, acts, maps = _data(12)
    feats = torch.rand(N - 4, 3, H, W)
    with pytest.raises(ValueError, match=r"feature maps for 32 images.*36 rows"):
        evaluate_c2(images, acts, maps, OracleFeatures(feats, dim=3), EvalConfig(progress=False))
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        OracleFeatures(torch.rand(N, 2, H, W), dim=3)
