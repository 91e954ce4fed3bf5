import json

import numpy as np
import pytest
import torch
from concept_deletion_helpers import LinearHead
from torch import Tensor

from concept_deletion import (
    ComparisonConfig,
    ConceptHead,
    ConceptModel,
    ImportanceConfig,
    ProtocolConfig,
    always_on_concepts,
    compare_measures,
    curves_from_json,
    curves_to_json,
    deletion_curve,
    gradient_x_input,
    paper_protocol,
    plot_curves,
    save_curves,
    select_images,
)

K, N_CLASSES = 6, 3


class CodeModel:
    """Images are already codes ``(K, 2, 2)``; the head is linear and bias-free."""

    def __init__(self) -> None:
        self.linear = LinearHead((K, 2, 2), n_classes=N_CLASSES, seed=2)
        self.n_codes_calls = 0

    def codes(self, images: Tensor) -> Tensor:
        self.n_codes_calls += 1
        return images

    def head(self, codes: Tensor) -> Tensor:
        return self.linear(codes)


def _dataset(n_per_class: int = 10) -> list[tuple[Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    data = []
    for c in range(5):
        for _ in range(n_per_class):
            data.append((torch.rand(K, 2, 2, generator=gen, dtype=torch.float64), c % N_CLASSES))
    return data


def _config(**kw: object) -> ProtocolConfig:
    comparison = ComparisonConfig(
        measures=("contribution", "gradient_x_input", "saliency", "occlusion", "sobol", "random"),
        orderings=("local", "global"),
        modes=("deletion", "insertion"),
        schedule="all",
        importance=ImportanceConfig(sobol_designs=8),
    )
    return ProtocolConfig(n_classes=2, per_class=4, comparison=comparison, **kw)  # type: ignore[arg-type]


def test_select_images_is_reproducible_and_balanced() -> None:
    labels = np.repeat(np.arange(10), [8, 8, 8, 3, 8, 8, 8, 8, 8, 8])
    a = select_images(labels, n_classes=5, per_class=8, seed=1)
    assert a == select_images(labels, n_classes=5, per_class=8, seed=1)
    assert a != select_images(labels, n_classes=5, per_class=8, seed=2)
    assert len(a) == 5 and 3 not in a
    for c, idx in a.items():
        assert len(idx) == 8 and all(labels[i] == c for i in idx)
    with pytest.raises(ValueError, match="only 9 classes"):
        select_images(labels, n_classes=10, per_class=8)


def test_paper_protocol_runs_resumes_and_writes_results(tmp_path) -> None:
    data, model = _dataset(), CodeModel()
    assert isinstance(model, ConceptModel) and isinstance(model.linear, ConceptHead)
    contrib = model.linear.contributions
    curves = paper_protocol(
        data, model, "BKHW", tmp_path, _config(), contributions=contrib, progress=False
    )
    assert len(curves) == 6 * 2 * 2 and model.n_codes_calls == 2
    by_name = {(c.measure, c.mode): c for c in curves}
    assert all(c.scores.shape == (8, K + 1) for c in curves)
    # Linear head: the supplied contributions and GxI give identical, optimal local curves.
    exact = by_name[("contribution/local", "deletion")]
    np.testing.assert_allclose(exact.scores, by_name[("gradient_x_input/local", "deletion")].scores)
    for name in ("saliency/local", "sobol/local", "random/local", "contribution/global"):
        assert by_name[(name, "deletion")].auc_score >= exact.auc_score - 1e-12
    # The merged curve of a class equals a direct deletion_curve call on its images.
    sel = select_images([y for _, y in data], 2, 4, 0)
    cls, idx = next(iter(sel.items()))
    codes = torch.stack([data[i][0] for i in idx])
    targets = model.head(codes).argmax(1)
    direct = deletion_curve(
        model.head, codes, targets, gradient_x_input(model.head, codes, targets, "BKHW"), "BKHW"
    )
    np.testing.assert_allclose(exact.scores[:4], direct.scores, atol=1e-12)
    # Files: per-class results, merged JSON and CSVs.
    assert sorted(p.name for p in (tmp_path / "classes").iterdir()) == [
        f"{c}.json" for c in sorted(sel)
    ]
    saved = json.loads((tmp_path / "deletion.json").read_text())
    assert len(saved["curves"]) == 24
    assert (tmp_path / "deletion_auc.csv").read_text().count("\n") == 25
    # Resume: nothing is recomputed, the result is the same.
    again = paper_protocol(
        data, model, "BKHW", tmp_path, _config(), contributions=contrib, progress=False
    )
    assert model.n_codes_calls == 2
    for a, b in zip(curves, again):
        np.testing.assert_array_equal(a.scores, b.scores)
    # A class file removed by an interruption is recomputed alone.
    (tmp_path / "classes" / f"{cls}.json").unlink()
    paper_protocol(data, model, "BKHW", tmp_path, _config(), contributions=contrib, progress=False)
    assert model.n_codes_calls == 3
    with pytest.raises(ValueError, match="other settings"):
        paper_protocol(
            data, model, "BKHW", tmp_path, _config(seed=1), contributions=contrib, progress=False
        )


def test_protocol_needs_contributions_for_the_contribution_measure(tmp_path) -> None:
    with pytest.raises(ValueError, match="contributions"):
        paper_protocol(_dataset(), CodeModel(), "BKHW", tmp_path, _config(), progress=False)


def test_always_on_concepts() -> None:
    codes = torch.zeros(3, 4, 2, 2)
    codes[:, 1, 0, 0] = 1  # in every image
    codes[:2, 2, 1, 1] = 1  # in two of three
    assert always_on_concepts(codes, "BKHW").tolist() == [1]
    assert always_on_concepts(codes, "BKHW", min_fraction=0.5).tolist() == [1, 2]


def test_json_roundtrip_csv_and_plot(tmp_path) -> None:
    model = CodeModel()
    codes = torch.stack([x for x, _ in _dataset()[:4]])
    labels = torch.tensor([0, 0, 1, 2])
    imp = gradient_x_input(model.head, codes, labels, "BKHW")
    curve = deletion_curve(model.head, codes, labels, imp, "BKHW", labels=labels, measure="gxi")
    (back,) = curves_from_json(curves_to_json([curve]))
    np.testing.assert_array_equal(back.scores, curve.scores)
    np.testing.assert_array_equal(back.correct, curve.correct)
    assert back.auc_score == pytest.approx(curve.auc_score)
    paths = save_curves([curve], tmp_path)
    rows = paths["curves_csv"].read_text().splitlines()
    assert rows[0] == "measure,mode,count,fraction,mean_score,accuracy" and len(rows) == K + 2
    fig = plot_curves([curve], tmp_path / "fig.png", title="test")
    assert (tmp_path / "fig.png").stat().st_size > 1000 and len(fig.axes) == 2


def test_compare_measures_on_one_batch() -> None:
    model = CodeModel()
    codes = torch.stack([x for x, _ in _dataset()[:6]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = ComparisonConfig(
        measures=("contribution", "integrated_gradients", "saliency", "random"),
        orderings=("local", "global"),
        schedule="all",
    )
    contrib = model.linear.contributions(codes, labels)
    curves = compare_measures(
        model.head, codes, labels, "BKHW", cfg, labels=labels, contributions=contrib
    )
    names = [c.measure for c in curves]
    assert names == [f"{m}/{o}" for m in cfg.measures for o in cfg.orderings]
    best = curves[0]
    assert all(c.auc_score >= best.auc_score - 1e-12 for c in curves)
    np.testing.assert_allclose(curves[2].scores, best.scores, atol=1e-10)  # IG exact if linear
    with pytest.raises(ValueError, match="global ordering needs"):
        compare_measures(model.head, codes, labels, "BKHW", cfg, contributions=contrib)
    with pytest.raises(ValueError, match="measure must be one of"):
        compare_measures(model.head, codes, labels, "BKHW", ComparisonConfig(measures=("x",)))
