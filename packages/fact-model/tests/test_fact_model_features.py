"""Importance-sampled feature sets (App. A, Eq. A.1): sampling law, oracle weights, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fact_model_helpers import backbone, images
from scipy import stats

import bcos_layers
from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.features import (
    FeatureConfig,
    extract_features,
    heldout_split,
    image_generator,
    open_feature_set,
    position_weights,
    sample_positions,
    samples_per_image,
)


def test_single_draw_follows_the_weights() -> None:
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 10.0]])
    n = 6000
    counts = np.zeros(6)
    for s in range(n):
        pos, count = sample_positions(w, 1, [image_generator(7, s)])
        counts[int(pos[0, 0])] += 1
        assert int(count[0]) == 1
    assert counts[0] == 0  # zero weight: never drawn
    expected = (w[0, 1:] / w.sum()).numpy() * n
    assert stats.chisquare(counts[1:], expected).pvalue > 1e-3


def test_draws_without_replacement_have_the_successive_sampling_law() -> None:
    w = np.array([1.0, 2.0, 3.0, 6.0])
    W = w.sum()
    # P(i in a 2-sample) = w_i/W + sum_{j != i} (w_j / W) (w_i / (W - w_j)).
    incl = np.array(
        [w[i] / W + sum(w[j] / W * w[i] / (W - w[j]) for j in range(4) if j != i) for i in range(4)]
    )
    n = 5000
    hits = np.zeros(4)
    for s in range(n):
        pos, _ = sample_positions(torch.tensor(w)[None], 2, [image_generator(3, s)])
        p = pos[0].tolist()
        assert len(set(p)) == 2
        hits[p] += 1
    z = (hits - n * incl) / np.sqrt(n * incl * (1 - incl))
    assert np.abs(z).max() < 4, (hits / n, incl)


def test_fewer_positive_positions_than_m_and_bad_weights() -> None:
    pos, count = sample_positions(torch.tensor([[0.0, 5.0, 0.0, 1.0]]), 3, [image_generator(0, 0)])
    assert int(count[0]) == 2 and set(pos[0, :2].tolist()) == {1, 3} and int(pos[0, 2]) == -1
    with pytest.raises(ValueError, match="non-negative"):
        sample_positions(torch.tensor([[1.0, -1.0]]), 1, [image_generator(0, 0)])


def test_budget_and_heldout_split() -> None:
    # ResNet-50 layer4 on ImageNet's 1,231,167 training images under 170 GB: 16 of 49 positions.
    assert samples_per_image(1_231_167, 2048, 49, 170 * 10**9) == 16
    assert samples_per_image(10, 8, 4, 10**12) == 4
    labels = [0] * 5 + [1] * 3 + [2] * 1
    train, held = heldout_split(labels, 2, seed=0)
    assert sorted(train + held) == list(range(9)) and not set(train) & set(held)
    assert [labels[i] for i in held].count(0) == 2 and [labels[i] for i in held].count(2) == 1
    assert heldout_split(labels, 2, seed=0) == (train, held)


@pytest.mark.parametrize(
    ("family", "layer"), [("resnet", "layer3"), ("vit", "0.transformer.encoder_0")]
)
def test_position_weights_equal_bcos_contributions(family: str, layer: str) -> None:
    model = backbone(family)
    x = images(3, seed=21)
    weights, rows, pred = position_weights(model, x, layer)
    expl = bcos_layers.explain(model, x, wrt=layer)  # oracle: bcos-layers' own explanation
    assert torch.equal(pred, expl.target)
    ref = expl.contribution_map.flatten(1).abs()
    torch.testing.assert_close(weights, ref, rtol=1e-5, atol=1e-7)
    assert rows.shape[:2] == weights.shape


def _dataset(n: int = 20) -> IndexedImages:
    x = images(n, seed=22)[:, :3]
    return IndexedImages(
        TensorImages(x, torch.arange(n) % 4), eval_transform_for(backbone("resnet"))
    )


class _Interrupting(IndexedImages):
    """Raises KeyboardInterrupt when item ``stop`` is read (a killed extraction)."""

    def __init__(self, base: IndexedImages, stop: int) -> None:
        super().__init__(base.source, base.transform)
        self.stop = stop

    def __getitem__(self, index: int):
        if index == self.stop:
            raise KeyboardInterrupt
        return super().__getitem__(index)


def _rows(store) -> dict[str, torch.Tensor]:
    return {
        f: store.read(0, store.num_rows, f)
        for f in ("features", "image_index", "position", "label")
    }


def test_resumed_extraction_equals_an_uninterrupted_one(tmp_path) -> None:
    data = _dataset()
    cfg = FeatureConfig(
        layer="layer2", samples_per_image=5, heldout_per_class=1, batch_size=3, flush_rows=10
    )
    full = extract_features(backbone("resnet"), data, tmp_path / "full", cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            backbone("resnet"), _Interrupting(data, stop=11), tmp_path / "cut", cfg, progress=False
        )
    partial = json.loads((tmp_path / "cut" / "train" / "manifest.json").read_text())
    assert 0 < partial["num_rows"] < full.train.num_rows and not partial["complete"]
    resumed = extract_features(backbone("resnet"), data, tmp_path / "cut", cfg, progress=False)
    for split in ("train", "heldout"):
        a, b = _rows(getattr(full, split)), _rows(getattr(resumed, split))
        for key in a:
            assert torch.equal(a[key], b[key]), (split, key)
    rows = _rows(full.train)
    # Each training image appears exactly M = 5 times with distinct positions; none held out.
    ids, counts = rows["image_index"].unique(return_counts=True)
    assert set(ids.tolist()).isdisjoint(full.heldout_indices) and (counts == 5).all()
    pairs = set(zip(rows["image_index"].tolist(), rows["position"].tolist()))
    assert len(pairs) == full.train.num_rows
    # The stored vectors are the layer's features at the recorded positions.
    i = int(rows["image_index"][0])
    _, feats, _ = position_weights(backbone("resnet"), data[i][0][None], "layer2")
    torch.testing.assert_close(rows["features"][0], feats[0, int(rows["position"][0])])
    # Running again on the finished set is a no-op that returns the same rows.
    again = extract_features(backbone("resnet"), data, tmp_path / "full", cfg, progress=False)
    assert torch.equal(_rows(again.train)["features"], rows["features"])


def test_store_from_another_layer_or_model_is_refused(tmp_path) -> None:
    data = _dataset(8)
    cfg = FeatureConfig(layer="layer3", samples_per_image=2, heldout_per_class=0, batch_size=4)
    extract_features(backbone("resnet"), data, tmp_path / "fs", cfg, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        extract_features(
            backbone("resnet"),
            data,
            tmp_path / "fs",
            FeatureConfig(layer="layer2", samples_per_image=2, heldout_per_class=0),
            progress=False,
        )
    fs = open_feature_set(tmp_path / "fs", backbone=backbone("resnet"), layer="layer3")
    assert fs.provenance["layer"] == "layer3" and fs.provenance["samples_per_image"] == 2
    with pytest.raises(ValueError, match="layer 'layer3', not 'layer2'"):
        open_feature_set(tmp_path / "fs", layer="layer2")
    other = bcos_layers.create("tiny_resnet_bottleneck")
    with pytest.raises(ValueError, match="another backbone"):
        open_feature_set(tmp_path / "fs", backbone=other)
