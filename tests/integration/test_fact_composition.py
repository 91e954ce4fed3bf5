"""The packages composed: fact_model's FaCT against a direct computation from the parts.

A tiny calibrated B-cos ResNet (``bcos_layers``) and a trained bias-free TopK SAE (``topk_sae``,
input scale != 1) spliced in by ``fact_model.FaCT``. The FaCT numbers are checked against an
independent computation that uses only ``bcos_layers`` and ``topk_sae``: a forward hook replacing
``layer3``'s output by ``sae.forward_map(out).recon`` and plain autograd. The same model then
feeds ``concept_deletion`` and ``c2score`` through ``fact_model``'s concept set.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from torch import nn

import bcos_layers
import c2score
import concept_deletion
from fact_model import FaCT, LayerConcepts, concept_attributions, concept_contributions
from topk_sae import BiasFreeTopKSAE, TensorSource, TrainConfig, train

LAYER = "layer3"


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return bcos_layers.AddInverse()(torch.rand(n, 3, size, size, generator=g))


@pytest.fixture(scope="module")
def parts() -> tuple[nn.Module, BiasFreeTopKSAE]:
    torch.manual_seed(0)
    model = bcos_layers.create("tiny_resnet_bottleneck")
    for m in model.modules():  # calibrated norms: O(1) activations and logits
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(_images(32, seed=9))
    model.eval()
    feats = {}
    h = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        model(_images(24, seed=1))
    h.remove()
    rows = feats["f"].permute(0, 2, 3, 1).reshape(-1, feats["f"].shape[1])
    cfg = TrainConfig(
        n_latents=48, k=6, epochs=3, lr=5e-3, warmup_epochs=0.2, hold_epochs=0.2, init="data",
        k_aux=8, progress=False, uncentered_warn_ratio=100.0, device="cpu",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sae = train(cfg, TensorSource(rows, batch_size=128), out_dir=tmp).model.eval()
    assert abs(float(sae.input_scale) - 1) > 1e-2
    return model, sae


def _reference(model: nn.Module, sae: BiasFreeTopKSAE, x: torch.Tensor):
    """Logits, per-concept contributions (Eq. 9) and presences from the parts alone."""
    store = {}

    def hook(m, i, out):
        recon, code = sae.forward_map(out)
        store["code"] = code
        return recon

    h = model.get_submodule(LAYER).register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)
        with bcos_layers.explanation_mode(model):
            logits = model(x)
            pred = logits.argmax(1)
            values = store["code"].values
            (g,) = torch.autograd.grad(
                logits.gather(1, pred[:, None]).sum(), values, retain_graph=True
            )
            contrib = torch.zeros(x.shape[0], sae.n_latents).scatter_add_(
                1, store["code"].indices.flatten(1), (values * g).detach().flatten(1)
            )
            presence = torch.zeros_like(contrib).scatter_add_(
                1, store["code"].indices.flatten(1), values.flatten(1)
            )
            c = int(presence[0].argmax())
            (gx,) = torch.autograd.grad(presence[:, c].sum(), x)
    finally:
        h.remove()
    return logits.detach(), pred, contrib, presence.detach(), c, (x.detach() * gx).sum(1)


def test_fact_equals_the_direct_computation_and_is_exact(parts) -> None:
    backbone, sae = parts
    fact = FaCT(backbone, {LAYER: sae}, input_size=32)
    x = _images(5, seed=2)
    logits, pred, contrib, presence, c, attribution = _reference(backbone, sae, x)
    out = concept_contributions(fact, x)
    torch.testing.assert_close(out.output, logits)
    assert torch.equal(out.targets[:, 0], pred)
    torch.testing.assert_close(out.contributions[:, 0], contrib)
    torch.testing.assert_close(out.presence, presence)
    # Eq. 9 at float32 round-off, many concepts taking part.
    assert int((contrib != 0).sum(1).min()) >= 6
    scale = out.logits.abs() + out.contributions.abs().sum(2)
    assert bool((out.completeness_error.abs() <= 2e-6 * scale).all())
    att = concept_attributions(fact, x, c)
    torch.testing.assert_close(att.attributions[:, 0], attribution)
    assert bool(
        (
            att.completeness_error.abs()
            <= 2e-6 * (att.value.abs() + att.attributions.abs().flatten(2).sum(2))
        ).all()
    )
    # The backbone given to FaCT is untouched: no hook or concept layer left behind.
    with torch.no_grad():
        plain = backbone(x)
    assert float((plain - logits).abs().max()) > 1e-4


def test_deletion_and_c2_consume_the_fact_concept_set(parts) -> None:
    backbone, sae = parts
    fact = FaCT(backbone, {LAYER: sae}, input_size=32)
    concepts = LayerConcepts(fact, LAYER)
    x = _images(4, seed=4)
    with torch.no_grad():
        codes = concepts.codes(x)
        logits = concepts.head(codes)
    target = logits.argmax(1)
    contrib = concepts.contributions(codes, target)
    curve = concept_deletion.deletion_curve(
        concepts.head, codes, target, contrib, "BKHW", measure="contribution"
    )
    scores = torch.as_tensor(curve.scores)
    torch.testing.assert_close(
        scores[:, 0].float(), logits.gather(1, target[:, None])[:, 0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        scores[:, -1].float(), torch.full((4,), fact.logit_bias), atol=1e-5, rtol=0
    )
    assert math.isfinite(curve.auc_score)

    n = 12
    x = _images(n, seed=5)
    presence = concepts.presence(x)
    rgb = x[:, :3]

    def maps(image_index: int, concept_ids: torch.Tensor) -> torch.Tensor:
        return concepts.attributions(
            x[image_index : image_index + 1], concept_ids[None]
        ).attributions[0]

    result = c2score.evaluate_c2(
        list(rgb),
        presence.clamp_min(0),
        maps,
        c2score.OracleFeatures(rgb, dim=3),
        c2score.EvalConfig(progress=False),
    )
    assert result.n_images == n and result.n_concepts == sae.n_latents
    assert math.isfinite(result.baseline_mean)
    assert len(result.concept_ids) == int(((presence > 0).sum(0) >= 5).sum())
