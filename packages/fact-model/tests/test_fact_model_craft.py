"""CRAFT baseline: NMF recovery, sklearn-equal codes, head consistency, metrics, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fact_model_helpers import fact, images
from scipy.optimize import linear_sum_assignment

import c2score
import concept_deletion
from fact_model.baselines import CraftConcepts
from fact_model.baselines.craft import _nmf_fit
from fact_model.consistency import c2_score, deletion
from fact_model.data import IndexedImages, TensorImages, eval_transform_for


def _dataset(n: int, seed: int, n_classes: int = 2) -> IndexedImages:
    x = images(n, seed=seed)[:, :3]
    labels = torch.arange(n) % n_classes
    return IndexedImages(TensorImages(x, labels), eval_transform_for(fact("resnet")))


@pytest.fixture(scope="module")
def craft() -> CraftConcepts:
    model = fact("resnet")
    return CraftConcepts.fit(
        model, _dataset(8, seed=21), "layer3", n_components=4, classes=[0, 1], progress=False
    )


def test_planted_low_rank_factors_are_recovered() -> None:
    rng = np.random.default_rng(0)
    r, c, n = 5, 30, 400
    # Sparse non-negative factors (separable: each basis has a private support) -> identifiable.
    w = rng.random((r, c)) * (rng.random((r, c)) < 0.4)
    w[np.arange(r), np.arange(r)] = 2.0
    u = rng.random((n, r)) * (rng.random((n, r)) < 0.5)
    u[np.arange(r) * 7, np.arange(r)] = 3.0
    a = u @ w
    basis = _nmf_fit(a, r, seed=0, max_iter=2000)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    bn = basis / np.linalg.norm(basis, axis=1, keepdims=True)
    cos = wn @ bn.T
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.99
    # A shuffled random basis does not match (the criterion can fail).
    other = rng.random((r, c))
    on = other / np.linalg.norm(other, axis=1, keepdims=True)
    cos2 = wn @ on.T
    r2, c2 = linear_sum_assignment(-cos2)
    assert cos2[r2, c2].min() < 0.99


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_codes_are_sklearn_transform_on_the_fitted_basis(craft: CraftConcepts) -> None:
    from sklearn.decomposition import NMF

    data = _dataset(8, seed=21)
    x = torch.stack([data[i][0] for i in range(8) if data[i][1] == 1])
    a = craft.activations(x)
    rows = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).clamp_min(0).double().numpy()
    nmf = NMF(n_components=4, random_state=0, max_iter=200).fit(rows)
    np.testing.assert_allclose(craft.bases[1].numpy(), nmf.components_, rtol=1e-5, atol=1e-6)
    codes = craft.codes(x[:1], class_index=torch.tensor([1]))
    assert codes.shape == (1, 8, *a.shape[2:])
    assert torch.all(codes[:, :4] == 0)
    per = a[:1].permute(0, 2, 3, 1).reshape(-1, a.shape[1]).clamp_min(0).numpy()
    expected = nmf.transform(per.astype(np.float64))
    got = codes[0, 4:].permute(1, 2, 0).reshape(-1, 4).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_shapes_presence_attributions_and_report(craft: CraftConcepts) -> None:
    x = images(3, seed=22)
    codes = craft.codes(x)
    assert codes.shape[:2] == (3, 8) and (codes >= 0).all()
    pred = craft.predicted(x)
    for i in range(3):  # predicted basis: only that class's block is non-zero
        other = 1 - int(pred[i])
        assert torch.all(codes[i, other * 4 : (other + 1) * 4] == 0)
    torch.testing.assert_close(craft.presence(x), codes.sum((2, 3)))
    att = craft.attributions(x, [0, 5])
    assert att.attributions.shape == (3, 2, 32, 32)
    torch.testing.assert_close(att.value, codes[:, [0, 5]].sum((2, 3)))
    rep = craft.fit_report
    assert 0 < rep["negative_fraction"] < 1  # B-cos features are signed: clamped
    assert all(0 <= v["relative_error"] < 1 for v in rep["classes"].values())
    logits = craft.head(codes)
    contrib = craft.contributions(codes, pred)
    with torch.no_grad():
        torch.testing.assert_close(
            contrib.sum(1),
            logits.gather(1, torch.as_tensor(craft.classes)[pred][:, None])[:, 0]
            - craft.model.logit_bias,
            rtol=1e-3,
            atol=1e-4,
        )


def test_head_of_codes_approaches_the_model_with_many_components() -> None:
    model = fact("resnet")
    data = _dataset(12, seed=23, n_classes=1)
    layer = "layer2"
    c_dim = model.layer_info(layer).d_in
    x = torch.stack([data[i][0] for i in range(4)])
    errs, act_errs = {}, {}
    for r in (1, c_dim):
        cr = CraftConcepts.fit(model, data, layer, n_components=r, classes=[0], progress=False)
        a = cr.activations(x).clamp_min(0)
        with torch.no_grad(), model.bcos_mode():
            target = cr._chain.tail(layer, a)  # the B-cos tail on the clamped activations
        codes = cr.codes(x)
        with torch.no_grad():
            out = cr.head(codes)
        assert out.shape == target.shape
        errs[r] = float((out - target).norm() / target.norm())
        act_errs[r] = float((cr.reconstruct(codes) - a).norm() / a.norm())
    assert errs[c_dim] < 0.01 and act_errs[c_dim] < 0.05
    assert act_errs[1] > 0.3 and errs[1] > errs[c_dim]


def test_c2_and_deletion_run_on_craft(craft: CraftConcepts, tmp_path) -> None:
    data = _dataset(8, seed=21)
    oracle = c2score.OracleFeatures(torch.stack([data[i][0][:3] for i in range(8)]), dim=3)
    res = c2_score(craft, data, oracle, config=c2score.EvalConfig(progress=False), batch_size=4)
    assert res.n_images == 8
    cfg = concept_deletion.ProtocolConfig(
        n_classes=2,
        per_class=2,
        comparison=concept_deletion.ComparisonConfig(
            measures=("contribution", "random"), schedule="all"
        ),
    )
    curves = deletion(craft, data, tmp_path / "del", cfg, progress=False)
    assert {c.measure.split("/")[0] for c in curves} == {"contribution", "random"}
    assert all(math.isfinite(c.auc_score) for c in curves)


def test_save_load_round_trip(craft: CraftConcepts, tmp_path) -> None:
    craft.save(tmp_path / "craft")
    back = CraftConcepts.load(craft.model, tmp_path / "craft")
    assert torch.equal(back.bases, craft.bases) and back.classes == craft.classes
    assert back.fit_report == craft.fit_report and back.basis == craft.basis
    x = images(2, seed=24)
    torch.testing.assert_close(back.codes(x), craft.codes(x))
    with pytest.raises(FileNotFoundError):
        CraftConcepts.load(craft.model, tmp_path / "missing")
    (tmp_path / "craft.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a fact-craft"):
        CraftConcepts.load(craft.model, tmp_path / "craft")


def test_errors() -> None:
    model = fact("resnet")
    data = _dataset(4, seed=25, n_classes=2)
    with pytest.raises(ValueError, match="class 3 has no images"):
        CraftConcepts.fit(model, data, "layer3", n_components=2, classes=[3], progress=False)
    with pytest.raises(ValueError, match="n_components=100000"):
        CraftConcepts.fit(model, data, "layer3", n_components=100000, classes=[0], progress=False)
    with pytest.raises((ValueError, KeyError)):
        CraftConcepts.fit(model, data, "no.such.layer", classes=[0], progress=False)
    vit = fact("vit")
    with pytest.raises(ValueError, match="BKHW"):
        CraftConcepts(vit, vit.layers[0], torch.zeros(1, 2, 4), [0])
    with pytest.raises(ValueError, match="basis must be"):
        CraftConcepts(model, "layer3", torch.zeros(1, 2, 4), [0], basis="x")  # type: ignore[arg-type]
