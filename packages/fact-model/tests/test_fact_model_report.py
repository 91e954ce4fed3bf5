"""The atlas of a trained model: statistics, cards, explanations, all cross-linked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fact_model_helpers import backbone, fact, images

from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.report import build_model_atlas


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
