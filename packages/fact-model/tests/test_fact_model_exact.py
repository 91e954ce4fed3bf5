"""Exactness of FaCT's explanations (Eq. 9, 12, H.6, H.14) on ResNet, DenseNet and ViT.

Tiny calibrated B-cos backbones with briefly trained SAEs (their input scale is not 1). The
explained value minus the sum of its parts must vanish to float32 round-off -- and to float64
round-off in double precision, which shows the decomposition is exact, not approximate.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fact_model_helpers import FAMILIES, fact, images

from fact_model import (
    concept_attributions,
    concept_contributions,
    contribution_attributions,
    cross_layer_contributions,
)

EPS = {torch.float32: 2e-6, torch.float64: 1e-13}


def _assert_exact(error: torch.Tensor, *scales: torch.Tensor, dtype: torch.dtype) -> None:
    """|error| within round-off of the magnitudes involved (values and sums of |parts|)."""
    scale = sum(s.detach().abs().double() for s in scales)
    assert torch.all(error.detach().abs().double() <= EPS[dtype] * (scale + 1e-30)), (error, scale)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eq9_logit_is_sum_of_concept_contributions(family: str, dtype: torch.dtype) -> None:
    model = fact(family).to(dtype)
    x = images(4, seed=1).to(dtype)
    for layer in model.layers:
        out = concept_contributions(model, x, targets=[[0, 3], [1, 2], [5, 5], [9, 0]], layer=layer)
        assert out.contributions.shape == (4, 2, model.sae(layer).n_latents)
        # Many concepts take part and the logits are O(1): the identity is not trivial.
        assert int((out.contributions[:, 0] != 0).sum(1).min()) >= 3
        assert float((out.logits - out.bias).abs().max()) > 1e-2
        assert torch.equal(out.targets[:, 1], torch.tensor([3, 2, 5, 0]))
        _assert_exact(
            out.completeness_error, out.logits, out.contributions.abs().sum(2), dtype=dtype
        )
        # The explained logits are the model's own (Eq. 9 explains the real forward pass).
        with torch.no_grad():
            torch.testing.assert_close(model(x).gather(1, out.targets), out.logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eq12_presence_is_sum_of_pixel_attributions(family: str, dtype: torch.dtype) -> None:
    model = fact(family).to(dtype)
    x = images(3, seed=2).to(dtype)
    for layer in model.layers:
        presence = concept_contributions(model, x, layer=layer).presence
        top = presence.topk(3, dim=1).indices  # (B, 3) active concepts per image
        out = concept_attributions(model, x, top, layer=layer)
        assert torch.equal(out.concepts, top) and out.attributions.shape == (3, 3, 32, 32)
        torch.testing.assert_close(out.value, presence.gather(1, top))
        assert float(out.value.min()) > 0
        _assert_exact(
            out.completeness_error,
            out.value,
            out.attributions.abs().flatten(2).sum(2),
            out.pos_emb,
            dtype=dtype,
        )
        # The weights are the dynamic linear map: x * W summed over channels is the map.
        torch.testing.assert_close((x[:, None] * out.weights).sum(2), out.attributions)
    # Only the ViT has a positional embedding; it is reported, not hidden in the error.
    assert (float(out.pos_emb.abs().max()) > 1e-3) == (family == "vit")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eh6_contribution_attribution_sums_to_eq9_contribution(family: str) -> None:
    model = fact(family)
    x = images(3, seed=3)
    layer = model.layers[-1]
    eq9 = concept_contributions(model, x, layer=layer)
    top = eq9.contributions[:, 0].abs().topk(2, dim=1).indices
    out = contribution_attributions(model, x, top, layer=layer)
    torch.testing.assert_close(
        out.value, eq9.contributions[:, 0].gather(1, top), rtol=1e-5, atol=1e-6
    )
    _assert_exact(
        out.completeness_error,
        out.value,
        out.attributions.abs().flatten(2).sum(2),
        out.pos_emb,
        dtype=torch.float32,
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_h14_late_concept_is_sum_of_early_concept_contributions(
    family: str, dtype: torch.dtype
) -> None:
    model = fact(family).to(dtype)
    early, late = model.layers
    x = images(3, seed=4).to(dtype)
    presence = concept_contributions(model, x, layer=late).presence
    top = presence.topk(4, dim=1).indices
    out = cross_layer_contributions(model, x, top, early=early, late=late)
    torch.testing.assert_close(out.presence, presence.gather(1, top))
    assert float(out.presence.min()) > 0
    assert int((out.contributions != 0).sum(2).min()) >= 2
    _assert_exact(out.completeness_error, out.presence, out.contributions.abs().sum(2), dtype=dtype)
    with pytest.raises(ValueError, match="must come before"):
        cross_layer_contributions(model, x, top, early=late, late=early)


def test_identity_dictionary_leaves_the_logits_unchanged() -> None:
    """An SAE whose atoms are +-e_i with k = d reconstructs its input exactly."""
    from fact_model_helpers import backbone, channels

    from fact_model import FaCT
    from topk_sae import BiasFreeTopKSAE

    bb = backbone("resnet")
    d = channels("resnet", "layer3")
    sae = BiasFreeTopKSAE(d, 2 * d, d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
    model = FaCT(bb, {"layer3": sae}, input_size=32)
    x = images(4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bb(x), rtol=0, atol=1e-6)
        with model.bcos_mode():
            assert torch.equal(model(x), bb(x))
        # A random dictionary of the same size does change them: the test can fail.
        other = FaCT(bb, {"layer3": BiasFreeTopKSAE(d, 2 * d, 4)}, input_size=32)
        assert float((other(x) - bb(x)).abs().max()) > 1e-3


def test_two_models_do_not_interfere_and_copies_are_independent() -> None:
    a, b = fact("resnet", ("layer3",)), fact("resnet", ("layer2",))
    x = images(2, seed=6)
    with torch.no_grad():
        la, lb = a(x), b(x)
        with a.bcos_mode():  # bypassing a's SAE leaves b untouched
            torch.testing.assert_close(b(x), lb, rtol=0, atol=0)
            plain = a(x)
        torch.testing.assert_close(a(x), la, rtol=0, atol=0)
        assert float((plain - la).abs().max()) > 1e-4
        c = copy.deepcopy(a)
        with torch.no_grad():
            c.sae("layer3").W_dec.mul_(0.5)
        torch.testing.assert_close(a(x), la, rtol=0, atol=0)
        assert float((c(x) - la).abs().max()) > 1e-5
    # The backbone passed in is never modified.
    from fact_model_helpers import backbone

    from fact_model.splice import ConceptLayer

    assert not any(isinstance(m, ConceptLayer) for m in backbone("resnet").modules())


def test_state_dict_round_trip_and_torch_compile() -> None:
    a = fact("densenet", ("features.norm5",))
    b = fact("densenet", ("features.norm5",))
    with torch.no_grad():
        b.sae("features.norm5").W_enc.add_(0.01)
    b.load_state_dict(a.state_dict(), strict=True)
    x = images(2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        compiled = torch.compile(a, backend="eager")
        torch.testing.assert_close(compiled(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bcos_channels_baseline_is_exact_in_the_original_network(family: str) -> None:
    from fact_model.explain import channel_attributions, channel_contributions

    model = fact(family)
    layer = model.layers[-1]
    x = images(3, seed=8)
    out = channel_contributions(model, x, layer=layer)
    with torch.no_grad(), model.bcos_mode():
        torch.testing.assert_close(model(x).gather(1, out.targets), out.logits)
    with torch.no_grad():  # the FaCT logits differ: the channels explain the B-cos network
        assert float((model(x).gather(1, out.targets) - out.logits).abs().max()) > 1e-5
    _assert_exact(
        out.completeness_error, out.logits, out.contributions.abs().sum(2), dtype=torch.float32
    )
    top = out.presence.abs().topk(2, dim=1).indices
    att = channel_attributions(model, x, top, layer=layer)
    torch.testing.assert_close(att.value, out.presence.gather(1, top))
    _assert_exact(
        att.completeness_error,
        att.value,
        att.attributions.abs().flatten(2).sum(2),
        att.pos_emb,
        dtype=torch.float32,
    )
