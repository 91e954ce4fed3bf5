"""SAE sweep on a feature set, selected by held-out FaCT accuracy (App. A)."""

from __future__ import annotations

import json
import math

import torch
from fact_model_helpers import backbone, images

from fact_model import FaCT
from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.features import FeatureConfig, extract_features
from fact_model.training import HeldoutScorer, train_layer
from topk_sae import TrainConfig


def test_sweep_selects_by_heldout_fact_accuracy(tmp_path) -> None:
    bb = backbone("resnet")
    n = 24
    x = images(n, seed=41)[:, :3]
    with (
        torch.no_grad()
    ):  # labels = the backbone's own predictions: held-out accuracy is informative
        labels = bb(images(n, seed=41)).argmax(1)
    data = IndexedImages(TensorImages(x, labels), eval_transform_for(bb))
    fs = extract_features(
        bb,
        data,
        tmp_path / "fs",
        FeatureConfig(layer="layer3", samples_per_image=4, heldout_per_class=1, batch_size=8),
        progress=False,
    )
    base = TrainConfig(
        n_latents=32, k=4, epochs=2, lr=1e-3, warmup_epochs=0.1, hold_epochs=0.1, init="data",
        k_aux=8, progress=False, uncentered_warn_ratio=100.0, device="cpu",
    )  # fmt: skip
    result = train_layer(
        bb, fs, tmp_path / "sweep", base, heldout_dataset=data, k=[2, 8], n_latents=[32], lr=[1e-2],
        sae_batch_size=32, image_batch_size=8, progress=False,
    )  # fmt: skip
    assert len(result.sweep.runs) == 2 and math.isclose(result.bcos_heldout_accuracy, 1.0)
    # Each run's score is the top-1 accuracy of the FaCT model with that SAE on the held-out images.
    held = torch.stack([data[i][0] for i in fs.heldout_indices])
    held_labels = labels[fs.heldout_indices]
    for run in result.sweep.runs:
        from topk_sae import BiasFreeTopKSAE

        model = FaCT(bb, {"layer3": BiasFreeTopKSAE.from_pretrained(run.model_dir)}, input_size=32)
        with torch.no_grad():
            acc = float((model(held).argmax(1) == held_labels).double().mean())
        assert math.isclose(run.score, acc), (run.name, run.score, acc)
    assert result.best.score == max(r.score for r in result.sweep.runs)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(saved["runs"]) == {r.name for r in result.sweep.runs}
    # Resuming a finished sweep trains nothing and returns the same selection.
    again = train_layer(
        bb, fs, tmp_path / "sweep", base, heldout_dataset=data, k=[2, 8], n_latents=[32], lr=[1e-2],
        sae_batch_size=32, image_batch_size=8, progress=False,
    )  # fmt: skip
    assert again.best.name == result.best.name


def test_heldout_scorer_without_cache_matches_cached() -> None:
    bb = backbone("densenet")
    x = images(6, seed=42)[:, :3]
    data = IndexedImages(TensorImages(x, torch.arange(6) % 2), eval_transform_for(bb))
    a = HeldoutScorer(bb, "features.norm5", data, range(6), batch_size=4)
    b = HeldoutScorer(bb, "features.norm5", data, range(6), batch_size=4, cache_bytes=1)
    assert a.cache is not None and b.cache is None
    assert a.accuracy(None) == b.accuracy(None)
