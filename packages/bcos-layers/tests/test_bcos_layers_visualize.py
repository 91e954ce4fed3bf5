"""Explanation images and heat maps: parity with bcos 0.1.3, batching, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcos_layers.visualize import (
    contribution_heatmap,
    contribution_heatmap_rgba,
    explanation_rgba,
    save_contribution_png,
    save_explanation_png,
)


def _inputs(
    b: int = 3, h: int = 24, w: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, h, w, generator=g)
    image = torch.cat([rgb, 1 - rgb], 1)
    weights = torch.randn(b, 6, h, w, generator=g) * torch.rand(b, 1, h, w, generator=g)
    return image, weights


@pytest.mark.parametrize(("smooth", "percentile"), [(15, 99.5), (3, 90.0), (0, 99.5), (1, 50.0)])
def test_explanation_matches_official_per_image_and_batched(
    smooth: int, percentile: float, bcos_oracle
) -> None:
    gradient_to_image = bcos_oracle("bcos.common").gradient_to_image

    image, weights = _inputs()
    batched = explanation_rgba(image, weights, smooth=smooth, alpha_percentile=percentile)
    assert batched.shape == (3, 24, 20, 4) and batched.dtype == torch.float32
    for i in range(len(image)):
        ref = torch.from_numpy(gradient_to_image(image[i], weights[i], smooth, percentile))
        single = explanation_rgba(image[i], weights[i], smooth=smooth, alpha_percentile=percentile)
        torch.testing.assert_close(single, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched[i], ref, rtol=1e-6, atol=1e-6)
    # Sanity of the construction: negative-contribution pixels are (nearly) transparent
    # before smoothing, and alpha reaches 1 at the top percentile (kept above the share of
    # negative pixels: otherwise the percentile itself is the 1e-12 placeholder).
    raw = explanation_rgba(image, weights, smooth=0, alpha_percentile=99.0)
    negative = (image * weights).sum(1) < 0
    assert bool((raw[..., 3][negative] < 1e-6).all())
    assert bool((raw[..., 3].amax((1, 2)) == 1).all())


def test_explanation_of_an_all_zero_map_is_transparent_not_nan(bcos_oracle) -> None:
    gradient_to_image = bcos_oracle("bcos.common").gradient_to_image

    image, weights = _inputs(b=1)
    weights.zero_()
    assert np.isnan(gradient_to_image(image[0], weights[0])).any()  # the official behaviour
    out = explanation_rgba(image[0], weights[0])
    assert torch.isfinite(out).all() and bool((out[..., 3] == 0).all())


def test_explanation_bad_input() -> None:
    image, weights = _inputs(b=1)
    with pytest.raises(ValueError, match="same shape"):
        explanation_rgba(image, weights[:, :, :10])
    with pytest.raises(ValueError, match="AddInverse"):
        explanation_rgba(image[:, :3], weights[:, :3])
    with pytest.raises(ValueError, match="odd"):
        explanation_rgba(image, weights, smooth=4)
    with pytest.raises(ValueError, match="alpha_percentile"):
        explanation_rgba(image, weights, alpha_percentile=0)


def test_save_explanation_png_round_trips(tmp_path: Path) -> None:
    image, weights = _inputs(b=2)
    rgba = explanation_rgba(image, weights, smooth=3)
    path = save_explanation_png(rgba[1], tmp_path / "sub" / "e.png")
    with Image.open(path) as im:
        assert im.mode == "RGBA" and im.size == (20, 24)
        pixels = np.asarray(im)
    expected = np.round(rgba[1].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    assert [p.name for p in path.parent.iterdir()] == ["e.png"]  # no temp file left
    with pytest.raises(ValueError, match="image by image"):
        save_explanation_png(rgba, tmp_path / "batch.png")
    with pytest.raises(ValueError, match="NaN"):
        save_explanation_png(torch.full((4, 4, 4), float("nan")), tmp_path / "nan.png")


def test_heatmap_matches_official_plot(bcos_oracle) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_contribution_map = bcos_oracle("bcos.common").plot_contribution_map

    g = torch.Generator().manual_seed(1)
    cmap = torch.randn(30, 25, generator=g) ** 3  # heavy tails: clipping matters
    _, ours = contribution_heatmap(cmap)
    _, theirs = plot_contribution_map(cmap)
    np.testing.assert_array_equal(ours.get_array(), theirs.get_array())
    assert ours.get_clim() == pytest.approx(theirs.get_clim())
    assert ours.get_clim()[0] == -ours.get_clim()[1] < 0
    assert float(np.abs(ours.get_array()).max()) < float(cmap.abs().max())  # clipped
    # The figure-free colouring is exactly what imshow shows.
    np.testing.assert_allclose(
        contribution_heatmap_rgba(cmap), theirs.to_rgba(theirs.get_array()), atol=1e-12
    )
    plt.close("all")


def test_heatmap_rgba_batched_and_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(3, 16, 12, generator=g)
    batched = contribution_heatmap_rgba(maps, percentile=95)
    assert batched.shape == (3, 16, 12, 4)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], contribution_heatmap_rgba(maps[i], percentile=95))
    # Symmetric range: negating the map mirrors the colours of bwr (red <-> blue).
    flipped = contribution_heatmap_rgba(-maps[0], percentile=95)
    reds = maps[0].numpy() > 0
    assert (batched[0][reds, 0] > batched[0][reds, 2]).all()
    assert (flipped[reds, 2] > flipped[reds, 0]).all()
    zero = contribution_heatmap_rgba(np.zeros((4, 4)))
    np.testing.assert_allclose(zero[..., :3], 1.0, atol=0.01)  # white, not blue
    path = save_contribution_png(maps[0], tmp_path / "c.png")
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (12, 16)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        save_contribution_png(maps, tmp_path / "d.png")
    with pytest.raises(ValueError, match="NaN"):
        contribution_heatmap_rgba(torch.tensor([[float("inf")]]))


def test_end_to_end_with_model_explanations(tmp_path: Path, bcos_oracle) -> None:
    """explain() of a tiny B-cos model -> our images equal the official ones, per sample."""
    gradient_to_image = bcos_oracle("bcos.common").gradient_to_image

    from bcos_layers.explain import explain
    from bcos_layers.models import create

    torch.manual_seed(0)
    model = create("tiny_resnet")
    image, _ = _inputs(b=2, h=32, w=32, seed=3)
    e = explain(model, image)
    rgba = explanation_rgba(image, e.weights)
    for i in range(2):
        ref = gradient_to_image(image[i], e.weights[i])
        torch.testing.assert_close(rgba[i], torch.from_numpy(ref), rtol=1e-6, atol=1e-6)
        save_explanation_png(rgba[i], tmp_path / f"expl_{i}.png")
        save_contribution_png(e.contribution_map[i], tmp_path / f"contrib_{i}.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "contrib_0.png",
        "contrib_1.png",
        "expl_0.png",
        "expl_1.png",
    ]
