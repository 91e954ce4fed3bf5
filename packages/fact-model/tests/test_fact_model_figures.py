"""fact_model.figures: each picture renders from hand-made arrays, shows its numbers, checks input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from PIL import Image

from fact_model import figures as F

RNG = np.random.default_rng(0)


def _image(h: int = 24, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _overlay(h: int = 24, w: int = 24) -> np.ndarray:
    return RNG.random((h, w, 4)).astype(np.float32)


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


def _saved(fig: Figure, path: Path) -> Image.Image:
    out = F.save_figure(fig, path, dpi=50)
    assert out == path and path.stat().st_size > 2000
    img = Image.open(path)
    assert img.format == "PNG"
    w, h = img.size
    assert 150 <= w <= 3000 and 100 <= h <= 3000, img.size
    return img


# ---------------------------------------------------------------- pure helpers


def test_composite_rgba_is_alpha_blend_over_black_or_background() -> None:
    rgba = np.zeros((2, 2, 4), np.float32)
    rgba[..., :3] = [0.2, 0.4, 0.8]
    rgba[..., 3] = [[1.0, 0.0], [0.5, 0.25]]
    out = F.composite_rgba(rgba)
    np.testing.assert_allclose(out[0, 0], [0.2, 0.4, 0.8])
    np.testing.assert_allclose(out[0, 1], 0.0)
    np.testing.assert_allclose(out[1, 0], [0.1, 0.2, 0.4])
    bg = np.full((2, 2, 3), 255, np.uint8)  # white, as uint8
    np.testing.assert_allclose(F.composite_rgba(rgba, bg)[1, 1], 0.25 * rgba[1, 1, :3] + 0.75)


def test_percent_of_positive_matches_definition() -> None:
    np.testing.assert_allclose(F.percent_of_positive([3.0, 1.0, -2.0, 0.0]), [75, 25, -50, 0])
    np.testing.assert_array_equal(F.percent_of_positive([-1.0, 0.0]), [0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        F.percent_of_positive([1.0, float("nan")])


def test_completeness_text_uses_the_given_numbers() -> None:
    assert (
        F.completeness_text(3.217, 5.414, -2.197, 1.2e-7)
        == "logit 3.217 = Σ contributions 5.414 + bias −2.197; error 1.2e-07"
    )


# ---------------------------------------------------------------- figures render


def test_concept_card(tmp_path: Path) -> None:
    n = 7
    fig = F.fig_concept_card(
        [_image() for _ in range(n)],
        [_overlay() if i != 2 else None for i in range(n)],
        [f"class {i}" for i in range(n)],
        [0.5 + i for i in range(n)],
        "layer4:12 · wheels",
        c2=0.372,
        extra={"frequency": 0.051},
    )
    texts = _texts(fig)
    assert "layer4:12 · wheels" in texts
    assert any("C2 0.372" in t and "frequency 0.051" in t for t in texts)
    for i in range(n):
        assert f"class {i}" in texts
        assert f"presence {0.5 + i:.3g}" in texts
    # 7 images + 7 attribution panels (one of them the empty "no image" panel).
    assert len(fig.axes) == 2 * n and "no image" in texts
    _saved(fig, tmp_path / "card.png")


def test_concept_card_draws_attributions_over_the_dimmed_image() -> None:
    img, ov = _image(), _overlay()
    img_f = img.astype(np.float32) / 255
    for dim, background in ((0.25, 0.25 * img_f), (0.0, np.zeros_like(img_f))):
        fig = F.fig_concept_card([img], [ov], ["a"], [1.0], "t", dim=dim)
        shown = np.asarray(fig.axes[1].images[0].get_array())
        expected = ov[..., :3] * ov[..., 3:] + (1 - ov[..., 3:]) * background
        np.testing.assert_allclose(shown, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"overlays\[0\] is 12 x 12 but images\[0\] is 24 x 24"):
        F.fig_concept_card([img], [_overlay(12, 12)], ["a"], [1.0], "t")
    F.fig_concept_card([img], [_overlay(12, 12)], ["a"], [1.0], "t", dim=0)  # over black: fine
    with pytest.raises(ValueError, match=r"dim is a brightness in \[0, 1\]"):
        F.fig_concept_card([img], [ov], ["a"], [1.0], "t", dim=2)


def _bar_patches(fig: Figure) -> tuple[list[Rectangle], list[Rectangle]]:
    """The stacked-bar segments and the logit bar of an explanation figure."""
    bar_ax = next(ax for ax in fig.axes if ax.get_xlabel() == "contribution to the logit")
    rects = [p for p in bar_ax.patches if isinstance(p, Rectangle)]
    segments = [p for p in rects if (p.get_gid() or "").startswith("segment:")]
    return segments, [p for p in rects if p.get_gid() == "logit"]


def test_explanation_bar_stacks_contributions_and_prints_completeness(tmp_path: Path) -> None:
    contribs = [("wheels", 2.0), ("stripes", -0.5), ("sky", 1.0), ("eyes", -0.25)]
    other, bias = 0.3, -2.197
    logit = 2.0 - 0.5 + 1.0 - 0.25 + other + bias
    fig = F.fig_explanation(
        _image(),
        "bus",
        logit,
        bias,
        3.1e-8,
        contribs,
        [_overlay(), _image(), None, _overlay()],
        other=other,
    )
    texts = _texts(fig)
    assert F.completeness_text(logit, 2.25 + other, bias, 3.1e-8) in texts
    assert "error 3.1e-08" in F.completeness_text(logit, 2.25 + other, bias, 3.1e-8)
    assert "+2.000" in texts and "−0.500" in texts
    assert f" logit {logit:.3f} " in texts
    bar_ax = next(ax for ax in fig.axes if ax.get_xlabel() == "contribution to the logit")
    bar_texts = {t.get_text() for t in bar_ax.texts}
    assert {"wheels", "sky", "bias"} <= bar_texts  # wide segments carry their name
    segments, logit_bar = _bar_patches(fig)
    assert [p.get_gid() for p in segments] == ["segment:concept"] * 4 + [
        "segment:other",
        "segment:bias",
    ]
    # positive segments stack rightwards from 0, negative ones (incl. the bias) leftwards,
    # each segment as wide as its value, in the given order
    widths = [p.get_width() for p in segments]
    np.testing.assert_allclose(widths, [2.0, -0.5, 1.0, -0.25, other, bias])
    lefts = [p.get_x() for p in segments]
    np.testing.assert_allclose(lefts, [0.0, 0.0, 2.0, -0.5, 3.0, -0.75])
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in segments]
    right = max(max(a, b) for a, b in spans)
    left = min(min(a, b) for a, b in spans)
    assert right == pytest.approx(2.0 + 1.0 + other)
    assert left == pytest.approx(-0.5 - 0.25 + bias)
    assert right + left == pytest.approx(logit)  # the net of the stack is the logit ...
    assert len(logit_bar) == 1 and logit_bar[0].get_x() == 0  # ... drawn as its own bar
    assert logit_bar[0].get_width() == pytest.approx(logit)
    # one framed thumbnail per shown concept, titled with its name and signed value
    thumb_axes = [ax for ax in fig.axes if ax.get_title() in {n for n, _ in contribs}]
    assert [ax.get_xlabel() for ax in thumb_axes] == ["+2.000", "−0.500", "+1.000", "−0.250"]
    _saved(fig, tmp_path / "explanation.png")


def test_explanation_without_concepts_or_other(tmp_path: Path) -> None:
    # only the bias: no "other concepts" segment (other == 0), no thumbnails, negative logit
    fig = F.fig_explanation(_image(), "cat", -1.5, -1.5, 0.0, [], [])
    segments, logit_bar = _bar_patches(fig)
    assert [p.get_gid() for p in segments] == ["segment:bias"]
    assert logit_bar[0].get_width() == pytest.approx(-1.5)
    assert "logit −1.500 = Σ contributions 0.000 + bias −1.500; error 0.0e+00" in _texts(fig)
    assert len(fig.axes) == 2  # the image and the bar
    _saved(fig, tmp_path / "bias_only.png")


def test_cross_layer(tmp_path: Path) -> None:
    early = [("circle", 2.0), ("edges", -0.3), ("grass", 0.4)]
    fig = F.fig_cross_layer(
        "late:7 wheel",
        2.6,
        early,
        [_overlay(), _image()],
        [_overlay(), None, _image()],
        2e-7,
        other=0.5,
    )
    texts = _texts(fig)
    assert any("Σ early contributions 2.600" in t and "error 2.0e-07" in t for t in texts)
    for name, _ in early:
        assert name in texts
    _saved(fig, tmp_path / "cross.png")
    # a single late image (not a list) is accepted too
    F.fig_cross_layer("x", 1.0, [("a", 1.0)], _image(), [None], 0.0)


def test_deletion_curves(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 11)
    fig = F.fig_deletion_curves(
        {"FaCT": (x, np.exp(-5 * x)), "random": (x, 1 - x)},
        {"FaCT": 0.198, "random": 0.5},
        "target logit",
        "Deletion at layer4",
    )
    texts = _texts(fig)
    assert "FaCT (AUC 0.198)" in texts and "random (AUC 0.5)" in texts
    assert "Deletion at layer4" in texts and "target logit" in texts
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.exp(-5 * x))
    _saved(fig, tmp_path / "deletion.png")


def test_accuracy_vs_sparsity(tmp_path: Path) -> None:
    points = [
        {
            "name": f"k{k}",
            "l0": float(k),
            "accuracy": 0.8 + 0.01 * k,
            "layer": layer,
            "selected": k == 8 and layer == "layer4",
        }
        for layer in ("layer3", "layer4")
        for k in (4, 8, 16)
    ]
    fig = F.fig_accuracy_vs_sparsity(points, baseline_accuracy=0.962)
    texts = _texts(fig)
    assert "B-cos baseline 96.2%" in texts and "k8" in texts and "layer3" in texts
    _saved(fig, tmp_path / "sparsity.png")


def test_misclassification_marks_shared_and_exclusive(tmp_path: Path) -> None:
    fig = F.fig_misclassification(
        ["ball", "jersey", "floor", "net"],
        [30.0, 20.0, 0.0, 12.0],
        [25.0, 15.0, 18.0, -3.0],
        "volleyball",
        "basketball",
        [_overlay(), _image(), None, _overlay()],
    )
    texts = _texts(fig)
    assert texts.count("shared") == 2
    assert texts.count("only basketball") == 1 and texts.count("only volleyball") == 1
    assert "30.0%" in " ".join(texts) and "−3.0%" in " ".join(texts)
    _saved(fig, tmp_path / "misclassification.png")


# ---------------------------------------------------------------- bad input


def test_mismatched_lengths_are_value_errors() -> None:
    with pytest.raises(ValueError, match="labels has 1 entries but images has 2"):
        F.fig_concept_card([_image(), _image()], [None, None], ["a"], [1.0, 2.0], "t")
    with pytest.raises(ValueError, match="concept_thumbs has 1 entries but contributions has 2"):
        F.fig_explanation(_image(), "c", 1.0, 0.0, 0.0, [("a", 1.0), ("b", 0.0)], [None])
    with pytest.raises(ValueError, match="thumbs_early has 0 entries"):
        F.fig_cross_layer("x", 1.0, [("a", 1.0)], None, [], 0.0)
    with pytest.raises(ValueError, match="share_b has 1 entries"):
        F.fig_misclassification(["a", "b"], [1.0, 2.0], [1.0], "A", "B", [None, None])


def test_wrong_image_shapes_and_values_are_value_errors() -> None:
    chw = RNG.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"H x W x 3.*channels first"):
        F.fig_concept_card([chw], [None], ["a"], [1.0], "t")
    with pytest.raises(ValueError, match=r"overlays\[0\] must be an image of shape H x W x 4"):
        F.fig_concept_card([_image()], [_image()], ["a"], [1.0], "t")
    with pytest.raises(ValueError, match=r"floats must lie in \[0, 1\]"):
        F.fig_explanation(_image().astype(np.float32), "c", 1.0, 0.0, 0.0, [], [])
    with pytest.raises(ValueError, match="dtype uint16"):
        F.fig_cross_layer("x", 1.0, [("a", 1.0)], None, [np.zeros((4, 4, 3), np.uint16)], 0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.composite_rgba(np.full((2, 2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="logit must be finite"):
        F.fig_explanation(_image(), "c", float("inf"), 0.0, 0.0, [], [])
    with pytest.raises(ValueError, match=r"\(name, value\) pair"):
        F.fig_explanation(_image(), "c", 1.0, 0.0, 0.0, [("a", 1.0, 2.0)], [None])


def test_bad_plot_data_are_value_errors() -> None:
    x = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="no curve"):
        F.fig_deletion_curves({"a": (x, x)}, {"b": 0.5}, "y", "t")
    with pytest.raises(ValueError, match="same non-zero length"):
        F.fig_deletion_curves({"a": (x, x[:3])}, {}, "y", "t")
    with pytest.raises(ValueError, match="non-decreasing"):
        F.fig_deletion_curves({"a": (x[::-1], x)}, {}, "y", "t")
    point = {"name": "a", "l0": 8, "accuracy": 95.0, "layer": "l", "selected": True}
    with pytest.raises(ValueError, match="divide percentages by 100"):
        F.fig_accuracy_vs_sparsity([point])
    with pytest.raises(ValueError, match=r"missing \['layer'\]"):
        F.fig_accuracy_vs_sparsity([{k: v for k, v in point.items() if k != "layer"}])
    with pytest.raises(ValueError, match="beyond ±100"):
        F.fig_misclassification(["a"], [150.0], [1.0], "A", "B", [None])


# ---------------------------------------------------------------- saving


def test_save_figure_is_atomic_and_closes(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 3)
    target = tmp_path / "sub" / "curve.png"
    fig = F.fig_deletion_curves({"a": (x, x)}, {}, "y", "t")
    F.save_figure(fig, target, dpi=40)
    assert Image.open(target).format == "PNG"
    assert fig.axes == []  # released
    assert sorted(p.name for p in target.parent.iterdir()) == ["curve.png"]  # no temp left
    assert target.stat().st_mode & 0o777 == 0o644

    with pytest.raises(ValueError, match=r"ending in \.png"):
        F.save_figure(F.fig_deletion_curves({"a": (x, x)}, {}, "y", "t"), tmp_path / "x.pdf")
    # a failed replace (the target is a folder) leaves no temporary file behind
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OSError):
        F.save_figure(F.fig_deletion_curves({"a": (x, x)}, {}, "y", "t"), tmp_path / "dir.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "sub"]
