"""The atlas of a trained model: statistics, cards, explanations, all cross-linked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fact_model_helpers import backbone, fact, images

from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.report import build_model_atlas

NAMES = [f'w{i} <b>&"' if i % 2 else f"w{i} $\\frac{{$ 5" for i in range(64)]
"""Names for the 64 concepts of layer2: HTML and an unbalanced matplotlib mathtext."""


def test_build_model_atlas_links_explanations_to_concept_cards(tmp_path: Path) -> None:
    model = fact("resnet")
    x = images(16, seed=71)[:, :3]
    data = IndexedImages(
        TensorImages(x, torch.arange(16) % 3, classes=["a<b>", "b & c", 'c "d"']),
        eval_transform_for(backbone("resnet")),
    )
    path = build_model_atlas(
        model,
        data,
        tmp_path / "atlas",
        n_explained=2,
        explain_top=2,
        top_k=2,
        max_concepts=2,
        concept_names={"layer2": NAMES},
        name_scores={"layer2": [0.5 + i for i in range(len(NAMES))]},
        batch_size=8,
        progress=False,
    )
    assert path.name == "index.html" and path.is_file()
    js = (path.parent / "data.js").read_text()
    data_obj = json.loads(js[js.index("{") : js.rindex("}") + 1])
    concepts = {c["id"] for c in data_obj["concepts"]}
    exps = data_obj["explanations"]
    assert len(exps) == 2 * len(model.layers)
    for e in exps:
        assert abs(e["completeness_error"]) < 1e-5
        assert all(c["concept"] in concepts for c in e["contributions"])
    assert any((path.parent / "assets").iterdir())
    # layer2 has names (user vocabulary: shown as text, escaped in data.js, no mathtext on the
    # card), with their score on the concept page; layer3 has none and looks as before
    assert "<" not in js and ">" not in js
    named = [c for c in data_obj["concepts"] if c["layer"] == "layer2"]
    unnamed = [c for c in data_obj["concepts"] if c["layer"] == "layer3"]
    assert named and unnamed and all(c["card"] for c in named)
    assert {c["index"] % 2 for c in named} == {0, 1}  # both kinds of name on a card
    for c in named:
        assert c["name"] == NAMES[c["index"]]
        assert c["extra"] == [["name score (soft-WPMI)", 0.5 + c["index"]]]
    assert all(c["name"] is None and c["extra"] == [] for c in unnamed)
