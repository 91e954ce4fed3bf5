"""Tiny calibrated B-cos models, trained tiny SAEs and images shared by the fact-model tests."""

from __future__ import annotations

import functools
import tempfile

import torch
from torch import Tensor, nn

import bcos_layers
from fact_model import FaCT
from fact_model.model import _all_shapes
from topk_sae import BiasFreeTopKSAE, TensorSource, TrainConfig, train

SIZE = 32
FAMILIES: dict[str, tuple[str, tuple[str, str]]] = {
    # family -> (registry name, (early layer, late layer))
    "resnet": ("tiny_resnet_bottleneck", ("layer2", "layer3")),
    "densenet": ("tiny_densenet", ("features.transition2", "features.norm5")),
    "vit": ("tiny_vitc", ("0.transformer.encoder_0", "0.transformer.encoder_1")),
}


def images(n: int, seed: int, size: int = SIZE) -> Tensor:
    """B-cos inputs [x, 1 - x] of random RGB images."""
    g = torch.Generator().manual_seed(seed)
    return bcos_layers.AddInverse()(torch.rand(n, 3, size, size, generator=g))


def calibrate(model: nn.Module, x: Tensor) -> nn.Module:
    """Set every BatchNorm's running variance from one batch (unit-variance activations), so
    logits and contributions are O(1) instead of vanishingly small at random initialisation."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average: one batch sets the statistics
        m.num_batches_tracked.zero_()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    for m in bns:
        m.momentum = 0.1
    return model


@functools.cache
def backbone(family: str) -> nn.Module:
    name, _ = FAMILIES[family]
    torch.manual_seed(0)
    return calibrate(bcos_layers.create(name), images(32, seed=100))


def layer_features(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """Rows (N, C) of a layer's output for ``x`` (maps flattened over positions)."""
    out = {}
    h = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: out.setdefault("f", o)
    )
    with torch.no_grad():
        model(x)
    h.remove()
    f = out["f"]
    return (
        f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) if f.ndim == 4 else f.reshape(-1, f.shape[-1])
    )


@functools.cache
def trained_sae(family: str, layer: str, n_latents: int = 64, k: int = 6) -> BiasFreeTopKSAE:
    """A briefly trained SAE on the layer's features (its estimated input scale is not 1)."""
    rows = layer_features(backbone(family), layer, images(24, seed=200))
    cfg = TrainConfig(
        n_latents=n_latents, k=k, epochs=3, lr=5e-3, warmup_epochs=0.2, hold_epochs=0.2,
        init="data", k_aux=8, progress=False, seed=0, device="cpu", uncentered_warn_ratio=100.0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sae = train(cfg, TensorSource(rows, batch_size=256, seed=0), out_dir=tmp).model
    assert abs(float(sae.input_scale) - 1.0) > 1e-3
    return sae.eval()


def fact(family: str, layers: tuple[str, ...] | None = None) -> FaCT:
    """A FaCT model of ``family`` with trained SAEs at ``layers`` (default: both)."""
    _, both = FAMILIES[family]
    layers = layers or both
    return FaCT(
        backbone(family), {name: trained_sae(family, name) for name in layers}, input_size=SIZE
    )


def channels(family: str, layer: str) -> int:
    shape = _all_shapes(backbone(family), SIZE)[layer]
    return shape[0] if len(shape) == 3 else shape[1]
