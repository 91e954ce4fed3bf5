"""The packages composed into a FaCT model: exactness end to end, at float32 precision.

A tiny B-cos ResNet (``bcos_layers``) with a bias-free TopK SAE (``topk_sae``) replacing the
output of ``layer3`` by its reconstruction. In explanation mode everything is dynamic-linear, so

* the target logit minus the logit bias is EXACTLY the sum of concept contributions
  (code value x d logit / d code value, paper Eq. 9);
* every concept activation is EXACTLY the sum of its pixel attributions;

and the same model feeds the deletion metric (``concept_deletion``) through its head and the C2
score (``c2score``) through its activations and attribution maps.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import Tensor, nn

import bcos_layers
import c2score
import concept_deletion
from topk_sae import BiasFreeTopKSAE

LAYER = "layer3"
N_LATENTS, K = 48, 6


class SAEHook:
    """Forward hook: replace a layer's output by the SAE reconstruction and keep the codes."""

    def __init__(self, sae: BiasFreeTopKSAE) -> None:
        self.sae = sae
        self.codes_BKHW: Tensor | None = None
        self.override_BKHW: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], out_BCHW: Tensor) -> Tensor:
        if self.override_BKHW is not None:
            codes = self.override_BKHW
        else:
            codes = self.sae.encode_map(out_BCHW, dense=True)
            if codes.requires_grad:
                codes.retain_grad()
        self.codes_BKHW = codes
        # Dense decode as a 1x1 convolution of the (B, K, H, W) code with the atoms.
        return torch.einsum("bkhw,kc->bchw", codes, self.sae.W_dec)


@pytest.fixture(scope="module")
def fact_model() -> tuple[nn.Module, SAEHook]:
    torch.manual_seed(0)
    model = bcos_layers.create("tiny_resnet_bottleneck")
    # Random (calibrated-looking) BatchNorm statistics so the norms are not identities.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    feats = {}
    handle = dict(model.named_modules())[LAYER].register_forward_hook(
        lambda m, i, o: feats.setdefault("f", o)
    )
    with torch.no_grad():
        model(_images(4, seed=1))
    handle.remove()
    channels = feats["f"].shape[1]
    sae = BiasFreeTopKSAE(channels, N_LATENTS, K)
    hook = SAEHook(sae)
    dict(model.named_modules())[LAYER].register_forward_hook(hook)
    model.eval()
    return model, hook


def _images(n: int, seed: int, size: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, size, size, generator=g)
    return bcos_layers.AddInverse()(rgb)


def _logit_bias(model: nn.Module) -> float:
    biases = [m.logit_bias for m in model.modules() if isinstance(m, bcos_layers.LogitLayer)]
    assert len(biases) == 1
    return float(biases[0] or 0.0)


def test_logit_is_exact_sum_of_concept_contributions(fact_model) -> None:
    model, hook = fact_model
    x = _images(5, seed=2).requires_grad_(True)
    with bcos_layers.explanation_mode(model), _pre_bias_logits(model) as pre:
        logits = model(x)
        target = logits.argmax(1)
        y = logits.gather(1, target[:, None])[:, 0]
        y.sum().backward()
    codes = hook.codes_BKHW
    assert codes is not None and codes.grad is not None
    contrib_BK = (codes * codes.grad).sum((2, 3))  # paper Eq. 9
    # The explained value: the target logit before the logit layer adds its constant bias.
    explained = pre["logits"].gather(1, target[:, None])[:, 0].detach()
    assert torch.allclose(y.detach(), explained + _logit_bias(model))
    # Many concepts are active: the identity is not trivially about one term.
    assert int((contrib_BK != 0).sum(1).min()) >= K
    _assert_complete(contrib_BK.sum(1), explained, contrib_BK.abs().sum(1))
    # The pixel contributions of the logit add up to the same number (B-cos completeness).
    pixel_BCHW = (x * x.grad).detach()
    _assert_complete(pixel_BCHW.sum((1, 2, 3)), explained, pixel_BCHW.abs().sum((1, 2, 3)))


def _assert_complete(total: Tensor, value: Tensor, mass: Tensor) -> None:
    """|sum of contributions - value| at float32 round-off relative to the contribution mass."""
    value = value.detach()
    err = (total.detach().double() - value.double()).abs()
    rel = err / (mass.detach().double() + 1e-30)
    assert float(rel.max()) < 1e-5, (err, value, mass)


@contextlib.contextmanager
def _pre_bias_logits(model: nn.Module):
    store: dict[str, Tensor] = {}
    (layer,) = [m for m in model.modules() if isinstance(m, bcos_layers.LogitLayer)]
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("logits", i[0]))
    try:
        yield store
    finally:
        handle.remove()


def test_concept_activation_is_exact_sum_of_pixel_attributions(fact_model) -> None:
    model, hook = fact_model
    x = _images(3, seed=3).requires_grad_(True)
    with bcos_layers.explanation_mode(model):
        model(x)
        codes = hook.codes_BKHW
        presence_BK = codes.sum((2, 3))
        active = presence_BK[0].nonzero()[:, 0]
        assert len(active) >= 3
        for kk in active[:3].tolist():
            (grad,) = torch.autograd.grad(presence_BK[:, kk].sum(), x, retain_graph=True)
            attribution_BHW = (x * grad).sum(1)
            _assert_complete(
                attribution_BHW.sum((1, 2)), presence_BK[:, kk], attribution_BHW.abs().sum((1, 2))
            )


def test_deletion_metric_runs_through_the_fact_head(fact_model) -> None:
    model, hook = fact_model
    x = _images(4, seed=4).requires_grad_(True)
    with bcos_layers.explanation_mode(model):
        logits = model(x)
        target = logits.argmax(1)
        logits.gather(1, target[:, None]).sum().backward()
    codes = hook.codes_BKHW.detach()
    contrib_BK = (codes * hook.codes_BKHW.grad).sum((2, 3))

    def head(codes_BKHW: Tensor) -> Tensor:
        hook.override_BKHW = codes_BKHW
        try:
            # The image only fixes the batch size here: layer3 is overridden by the code.
            return model(torch.zeros(codes_BKHW.shape[0], *x.shape[1:]))
        finally:
            hook.override_BKHW = None

    with torch.no_grad():
        full = head(codes).gather(1, target[:, None])[:, 0]
        assert torch.allclose(full, logits.gather(1, target[:, None])[:, 0].detach(), atol=1e-5)
        curve = concept_deletion.deletion_curve(
            head, codes, target, contrib_BK, "BKHW", measure="contribution"
        )
    scores_BS = torch.as_tensor(curve.scores)
    # First point: nothing deleted; last point: everything deleted, only the logit bias remains.
    assert torch.allclose(scores_BS[:, 0].float(), full, atol=1e-5)
    assert torch.allclose(
        scores_BS[:, -1].float(), torch.full_like(full, _logit_bias(model)), atol=1e-5
    )
    assert math.isfinite(curve.auc_score)


def test_c2score_consumes_fact_activations_and_attributions(fact_model) -> None:
    model, hook = fact_model
    n, size = 12, 32
    x = _images(n, seed=5, size=size).requires_grad_(True)
    with bcos_layers.explanation_mode(model):
        model(x)
        presence_NC = hook.codes_BKHW.sum((2, 3))
        maps = torch.zeros(n, N_LATENTS, size, size)
        for kk in presence_NC.sum(0).nonzero()[:, 0].tolist():
            (grad,) = torch.autograd.grad(presence_NC[:, kk].sum(), x, retain_graph=True)
            maps[:, kk] = (x * grad).sum(1).detach()
    rgb = x.detach()[:, :3]
    # Oracle features: the RGB values themselves (any per-pixel feature works for the plumbing).
    oracle = c2score.OracleFeatures(rgb, dim=3)
    result = c2score.evaluate_c2(
        list(rgb),
        presence_NC.detach(),
        c2score.DenseAttributions(maps),
        oracle,
        c2score.EvalConfig(progress=False),
    )
    assert result.n_images == n and result.n_concepts == N_LATENTS
    assert math.isfinite(result.baseline_mean)
    # Every concept active on >= 5 images is scored; the others are counted as skipped.
    n_active = (presence_NC.detach() > 0).sum(0)
    assert len(result.concept_ids) == int((n_active >= 5).sum())
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in result.consistency)
