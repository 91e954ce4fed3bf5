"""Streaming concept statistics equal a brute-force computation; evaluation metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fact_model_helpers import backbone, fact, images

from fact_model.concepts import LayerConcepts
from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.evaluation import evaluate
from fact_model.explain import concept_contributions, concepts_to_cover
from fact_model.stats import ConceptStats, TopK, concept_statistics, pixels_to_cover


def _dataset(n: int, seed: int) -> IndexedImages:
    x = images(n, seed=seed)[:, :3]
    return IndexedImages(
        TensorImages(x, torch.arange(n) % 3), eval_transform_for(backbone("resnet"))
    )


def test_topk_table_matches_a_full_sort_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 4, (7, 50), generator=g).double()  # many ties and zeros
    top = TopK(7, 5)
    for start in range(0, 50, 9):
        top.update(table[:, start : start + 9], torch.arange(start, min(start + 9, 50)))
    for r in range(7):
        pos = [(-float(v), i) for i, v in enumerate(table[r].tolist()) if v > 0]
        want = [i for _, i in sorted(pos)[:5]]
        got = [i for i in top.ids[r].tolist() if i >= 0]
        assert got == want


def test_streaming_statistics_equal_brute_force() -> None:
    model = fact("resnet")
    data = _dataset(17, seed=31)
    concepts = LayerConcepts(model, "layer3")
    st = concept_statistics(concepts, data, top_k=4, batch_size=5, extent_images=2, progress=False)
    x = torch.stack([data[i][0] for i in range(17)])
    labels = torch.tensor(data.targets)
    p = concepts.presence(x).double()
    assert torch.allclose(st.frequency, (p > 0).double().mean(0))
    assert torch.equal(st.dead, (p > 0).sum(0) == 0)
    mass = torch.stack([p.clamp_min(0)[labels == c].sum(0) for c in range(3)], 1)
    torch.testing.assert_close(st.label_mass, mass)
    q = mass / mass.sum(1, keepdim=True)
    ent = -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(1)
    alive = ~st.dead
    torch.testing.assert_close(st.entropy[alive], ent[alive])
    assert (
        bool(st.entropy[st.dead].isnan().all())
        and float(st.entropy[alive].max()) <= math.log(3) + 1e-9
    )
    for c in torch.nonzero(alive)[:, 0].tolist():
        order = sorted((-float(p[i, c]), i) for i in range(17) if p[i, c] > 0)[:4]
        assert [i for i in st.top_images[c].tolist() if i >= 0] == [i for _, i in order]
    # Spatial extent of one concept: its Eq. 12 maps on its two top images, brute force.
    c = int(torch.nonzero(alive)[0, 0])
    ids = [i for i in st.top_images[c, :2].tolist() if i >= 0]
    px = [
        float(pixels_to_cover(concepts.attributions(x[i : i + 1], [c]).attributions[0])[0])
        for i in ids
    ]
    assert math.isclose(float(st.spatial_extent[c]), sum(px) / len(px), rel_tol=1e-9)


def test_stats_save_load_round_trip_and_refusals(tmp_path: Path) -> None:
    model = fact("resnet")
    data = _dataset(9, seed=5)
    st = concept_statistics(
        LayerConcepts(model, "layer3"), data, top_k=3, batch_size=4, extent_images=1,
        progress=False,
    )  # fmt: skip
    back = ConceptStats.load(st.save(tmp_path / "s.safetensors"))
    for name, a in st._asdict().items():
        b = getattr(back, name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a.nan_to_num(-7), b.nan_to_num(-7)), name
        else:
            assert a == b, name
    from safetensors.torch import save_file

    save_file({"frequency": st.frequency}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a concept-statistics file"):
        ConceptStats.load(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.safetensors: cannot read"):
        ConceptStats.load(tmp_path / "bad.safetensors")


def test_pixels_to_cover() -> None:
    m = torch.tensor([[[4.0, 3.0], [2.0, -5.0]], [[0.0, 0.0], [-1.0, 0.0]]])
    px = pixels_to_cover(m, 0.75)  # 4 + 3 = 7 >= 0.75 * 9, 4 alone is not
    assert px[0] == 2 and math.isnan(float(px[1]))


def test_evaluate_accuracy_sparsity_and_exactness() -> None:
    model = fact("resnet")
    data = _dataset(10, seed=32)
    res = evaluate(model, data, batch_size=4, progress=False)
    x = torch.stack([data[i][0] for i in range(10)])
    y = torch.tensor(data.targets)
    with torch.no_grad(), model.bcos_mode():
        ref = model(x)
    assert math.isclose(res.bcos.top1, float((ref.argmax(1) == y).double().mean()))
    for layer in model.layers:
        with model.only(layer):
            out = concept_contributions(model, x, layer=layer)
        ev = res.layers[layer]
        assert math.isclose(ev.top1, float((out.output.argmax(1) == y).double().mean()))
        assert math.isclose(ev.mean_l0, float((out.presence > 0).sum(1).double().mean()))
        assert math.isclose(
            ev.mean_cover80, float(concepts_to_cover(out.contributions[:, 0]).double().mean())
        )
        assert ev.max_abs_completeness_error < 1e-5
    assert res.to_dict()["n_images"] == 10
