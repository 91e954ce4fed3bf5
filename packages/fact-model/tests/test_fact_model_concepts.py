"""Concept sets plug into concept_deletion and c2score without glue code."""

from __future__ import annotations

import math

import pytest
import torch
from fact_model_helpers import fact, images

import c2score
import concept_deletion
from fact_model.concepts import LayerConcepts
from fact_model.consistency import c2_inputs, c2_score, deletion
from fact_model.data import IndexedImages, TensorImages, eval_transform_for


@pytest.mark.parametrize(
    ("family", "kind"),
    [("resnet", "sae"), ("vit", "sae"), ("densenet", "channels"), ("vit", "channels")],
)
def test_head_of_codes_is_the_model_and_contributions_are_exact(family: str, kind: str) -> None:
    model = fact(family)
    concepts = LayerConcepts(model, model.layers[0], kind=kind)
    assert isinstance(concepts, concept_deletion.ConceptModel)
    x = images(3, seed=11)
    codes = concepts.codes(x)
    k_axis = 1 if concepts.layout == "BKHW" else 2
    assert codes.shape[0] == 3 and codes.shape[k_axis] == concepts.n_concepts
    with torch.no_grad():
        if kind == "sae":
            expected = model(x)
        else:
            with model.bcos_mode():
                expected = model(x)
        torch.testing.assert_close(concepts.head(codes), expected, rtol=1e-5, atol=1e-5)
    explained = concepts.explain(x)
    contrib = concepts.contributions(codes, explained.targets[:, 0])
    torch.testing.assert_close(contrib, explained.contributions[:, 0], rtol=1e-4, atol=1e-5)
    # Deleting every concept through the head leaves only the logit bias.
    with torch.no_grad():
        zero = concepts.head(torch.zeros_like(codes))
    torch.testing.assert_close(zero, torch.full_like(zero, model.logit_bias), rtol=0, atol=1e-5)


def test_head_refuses_a_layer_off_the_forward_chain() -> None:
    from fact_model_helpers import backbone, channels

    from fact_model import FaCT
    from topk_sae import BiasFreeTopKSAE

    inner = "layer3.0.bn3"  # inside a residual block: its output alone does not give the logits
    model = FaCT(
        backbone("resnet"),
        {inner: BiasFreeTopKSAE(channels("resnet", inner), 16, 2)},
        input_size=32,
    )
    with pytest.raises(ValueError, match="not a point of the forward chain"):
        LayerConcepts(model, inner)


def _dataset(n: int, seed: int) -> IndexedImages:
    x = images(n, seed=seed)[:, :3]
    labels = torch.arange(n) % 4
    model = fact("resnet")
    return IndexedImages(TensorImages(x, labels), eval_transform_for(model))


def test_c2_inputs_and_oracle_c2_score() -> None:
    model = fact("resnet")
    data = _dataset(12, seed=12)
    concepts = LayerConcepts(model, "layer3")
    imgs, table, source, _labels = c2_inputs(concepts, data, batch_size=5, progress=False)
    assert len(imgs) == 12 and table.n_images == 12 and table.n_concepts == concepts.n_concepts
    # The table holds the positive presences of every image.
    x = torch.stack([data[i][0] for i in range(12)])
    presence = concepts.presence(x)
    dense = torch.zeros(12, concepts.n_concepts)
    dense[table.image_index, table.concept_index] = table.values
    torch.testing.assert_close(dense, presence.clamp_min(0))
    # The attribution source gives the Eq. 12 maps, which sum to the presence.
    ids = presence[3].topk(2).indices
    maps = source(3, ids)
    torch.testing.assert_close(maps.sum((1, 2)), presence[3, ids], rtol=1e-4, atol=1e-5)
    oracle = c2score.OracleFeatures(x[:, :3], dim=3)
    result = c2_score(
        concepts, data, oracle, config=c2score.EvalConfig(progress=False), batch_size=5
    )
    assert result.n_images == 12 and math.isfinite(result.baseline_mean)


def test_deletion_protocol_runs_on_fact_concepts(tmp_path) -> None:
    model = fact("resnet")
    data = _dataset(8, seed=13)
    concepts = LayerConcepts(model, "layer3")
    cfg = concept_deletion.ProtocolConfig(
        n_classes=2,
        per_class=2,
        comparison=concept_deletion.ComparisonConfig(
            measures=("contribution", "saliency", "random"), schedule="all"
        ),
    )
    curves = deletion(concepts, data, tmp_path / "del", cfg, progress=False)
    by = {c.measure.split("/")[0]: c for c in curves}
    assert set(by) == {"contribution", "saliency", "random"}
    assert all(math.isfinite(c.auc_score) for c in curves)
    # Exact contributions delete the logit at least as fast as a random order, on average.
    assert by["contribution"].auc_score <= by["random"].auc_score + 1e-6
