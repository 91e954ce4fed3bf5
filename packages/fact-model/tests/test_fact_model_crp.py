"""CRP baseline concept set: conservation, shapes, presence, and a C2-score run."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("crp")

import torch
from torch import nn

import c2score
from fact_model.baselines.crp import CrpConcepts
from fact_model.consistency import c2_inputs, c2_score
from fact_model.data import IndexedImages, TensorImages


def _net(bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4, bias=bias),
    ).eval()
    # Activations and logits of order 1, so the rules' stabilisers (1e-6) are negligible.
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data *= 8.0 if isinstance(m, nn.Conv2d) else 20.0
    return net


def _bn_net(seed: int = 1) -> nn.Module:
    """A conv net with biases and batch norm (non-trivial running statistics)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _plain_heatmap(concepts: CrpConcepts, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unconditional CRP heatmap (y condition only), straight from zennit-crp."""
    from crp.attribution import CondAttribution

    attr = CondAttribution(concepts.model)
    res = attr(
        x.clone().requires_grad_(True), [{"y": [int(t)]} for t in targets], concepts.composite
    )
    return res.heatmap.detach()


def test_conservation_bias_free_net_is_exact() -> None:
    # Bias-free net: z+ / flat / epsilon (1e-6) rules conserve relevance, so the layer
    # relevance adds up to the logit and each concept's map adds up to its relevance.
    model = _net(bias=False)
    concepts = CrpConcepts(model, "2")
    assert concepts.n_concepts == 6 and concepts.name == "CRP 2"
    x = _images(3, seed=0)
    logits = model(x).detach()
    targets = torch.tensor([0, 2, 3])
    rel = concepts.relevance(x, targets)
    assert rel.shape == (3, 6)
    chosen = logits.gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(rel.sum(1), chosen, rtol=1e-4, atol=1e-9)
    att = concepts.attributions(x, torch.arange(6), targets)
    assert att.attributions.shape == (3, 6, 16, 16)
    # The concept's relevance in the conditional pass is its relevance in the plain pass.
    torch.testing.assert_close(att.value, rel, rtol=1e-5, atol=1e-9)
    # Input conservation: the conditional map of channel k sums to channel k's relevance.
    scale = rel.abs().max()
    assert att.completeness_error.abs().max() <= 1e-4 * scale
    torch.testing.assert_close(att.attributions.sum((2, 3)), rel, rtol=1e-4, atol=1e-4 * scale)
    # The maps of all channels add up to the unconditional heatmap, which sums to the logit.
    plain = _plain_heatmap(concepts, x, targets)
    torch.testing.assert_close(att.attributions.sum(1), plain, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(plain.sum((1, 2)), chosen, rtol=1e-4, atol=1e-9)


def test_biases_absorb_relevance_but_maps_stay_linear() -> None:
    # With biases and batch norm (merged by the canonizer) the rules are not conservative:
    # the maps no longer sum to the layer relevance, but CRP stays linear in the mask.
    model = _bn_net()
    concepts = CrpConcepts(model, "3")
    x = _images(2, seed=3)
    targets = torch.tensor([1, 2])
    rel = concepts.relevance(x, targets)
    att = concepts.attributions(x, torch.arange(concepts.n_concepts), targets)
    torch.testing.assert_close(att.value, rel, rtol=1e-5, atol=1e-7)
    assert att.completeness_error.abs().max() > 1e-4  # bias absorption is really there
    plain = _plain_heatmap(concepts, x, targets)
    torch.testing.assert_close(att.attributions.sum(1), plain, rtol=1e-4, atol=1e-6)
    # Batch norm was restored after the canonized pass: plain forward is unchanged.
    torch.testing.assert_close(model(x), _bn_net()(x))


def test_attributions_shapes_and_errors() -> None:
    concepts = CrpConcepts(_net(bias=False), "2")
    x = _images(2, seed=4)
    single = concepts.attributions(x, 3)
    assert single.attributions.shape == (2, 1, 16, 16)
    assert single.concepts.tolist() == [[3], [3]]
    per_image = concepts.attributions(x, torch.tensor([[0, 5], [1, 2]]))
    assert per_image.attributions.shape == (2, 2, 16, 16)
    # Per-image ids give the same map as the same concept asked alone.
    torch.testing.assert_close(
        per_image.attributions[1, 1], concepts.attributions(x, 2).attributions[1, 0]
    )
    with pytest.raises(ValueError, match="concept ids"):
        concepts.attributions(x, 6)
    with pytest.raises(ValueError, match="concepts must be"):
        concepts.attributions(x, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="not a module"):
        CrpConcepts(_net(bias=False), "nope")
    with pytest.raises(ValueError, match="composite"):
        CrpConcepts(_net(bias=False), "2", composite="epsilon_flat_typo")


def test_presence_is_predicted_class_relevance_or_activation() -> None:
    model = _bn_net()
    x = _images(4, seed=5)
    pred = model(x).argmax(1)
    rel = CrpConcepts(model, "3")
    torch.testing.assert_close(rel.presence(x), rel.relevance(x, pred))
    torch.testing.assert_close(rel.presence(x), rel.relevance(x))
    act = CrpConcepts(model, "5", presence="activation")
    feats = model[:6](x).detach().sum((2, 3))
    torch.testing.assert_close(act.presence(x), feats)
    assert (act.presence(x) >= 0).all()


def test_resnet18_layer_maps_add_up_to_plain_heatmap() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    concepts = CrpConcepts(model, "layer1")
    assert concepts.n_concepts == 64
    x = _images(1, seed=6, size=32)
    target = torch.tensor([2])
    att = concepts.attributions(x, torch.arange(64), target)
    assert att.attributions.shape == (1, 64, 32, 32)
    plain = _plain_heatmap(concepts, x, target)
    scale = plain.abs().max()
    torch.testing.assert_close(att.attributions.sum(1), plain, rtol=1e-3, atol=1e-4 * scale)
    torch.testing.assert_close(att.value, concepts.relevance(x, target), rtol=1e-4, atol=1e-7)


def test_c2_score_runs_with_oracle_features() -> None:
    model = _bn_net()
    x = _images(10, seed=7)
    data = IndexedImages(TensorImages(x, torch.arange(10) % 4), lambda t: t.float())
    concepts = CrpConcepts(model, "3")
    _imgs, table, source, _ = c2_inputs(concepts, data, batch_size=4, progress=False)
    presence = concepts.presence(x)
    dense = torch.zeros(10, concepts.n_concepts)
    dense[table.image_index, table.concept_index] = table.values
    torch.testing.assert_close(dense, presence.clamp_min(0))
    ids = presence[2].topk(2).indices
    torch.testing.assert_close(source(2, ids), concepts.attributions(x[2:3], ids).attributions[0])
    result = c2_score(
        concepts,
        data,
        c2score.OracleFeatures(x, dim=3),
        config=c2score.EvalConfig(progress=False),
        batch_size=4,
    )
    assert result.n_images == 10 and math.isfinite(result.baseline_mean)
