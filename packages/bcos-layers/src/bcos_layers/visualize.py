"""B-cos explanation images and contribution heat maps.

* :func:`explanation_rgba` -- the standard B-cos RGBA explanation (Böhle et al., B-cos v1
  ``interpretability/utils.py``; bcos-v2 ``common.gradient_to_image``): the colour of a pixel is
  the colour its dynamic linear weights W(x) align with, its opacity the weights' norm,
  smoothed and clipped at a percentile; pixels with negative contribution are transparent.
  Batched, on any device.
* :func:`save_explanation_png` -- write such an image as an RGBA PNG (PIL, atomic).
* :func:`contribution_heatmap` / :func:`contribution_heatmap_rgba` / :func:`save_contribution_png`
  -- contribution maps ``Σ_c x ⊙ W(x)`` in a diverging colour map with a symmetric range,
  clipped at a percentile of ``|map|``. These need matplotlib (``bcos-layers[plot]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from bcos_layers.fileio import atomic_path

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.image

__all__ = [
    "contribution_heatmap",
    "contribution_heatmap_rgba",
    "explanation_rgba",
    "save_contribution_png",
    "save_explanation_png",
]

ArrayLike = Tensor | np.ndarray

_QUANTILE_MAX_NUMEL = 1 << 24
"""torch.quantile refuses larger inputs; bigger batches are processed in chunks."""


def _check_percentile(percentile: float, what: str) -> float:
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"{what} must be in (0, 100], got {percentile}")
    return float(percentile)


def explanation_rgba(
    image: Tensor,
    weights: Tensor,
    *,
    smooth: int = 15,
    alpha_percentile: float = 99.5,
) -> Tensor:
    """RGBA explanation image(s) from the input and its dynamic linear weights W(x).

    Args:
        image: the model input, ``[6, H, W]`` or ``[B, 6, H, W]`` (``[r, g, b, 1-r, 1-g, 1-b]``).
        weights: W(x) of the explained output (the input gradient in explanation mode), same
            shape as ``image``.
        smooth: odd kernel size of the box filter applied to the opacity; 0 or 1 disables it.
        alpha_percentile: opacities are divided by this percentile (per image) and clipped
            to 1.

    Returns:
        float32 ``[H, W, 4]`` or ``[B, H, W, 4]`` (RGBA in [0, 1]) on the input's device.

    Per pixel: ``rgb = max(W, 0) / max_c |W|``, then ``r / (r + r̄)`` for each colour/inverse
    pair; ``alpha = ||W||_2`` (``1e-12`` where the contribution ``Σ_c x W`` is negative), box
    smoothed (zero padding counted), divided by its percentile, clipped to [0, 1]. Identical to
    ``bcos.common.gradient_to_image`` except that an all-zero W gives alpha 0 instead of NaN.
    """
    if image.shape != weights.shape:
        raise ValueError(
            f"image and weights must have the same shape, got {tuple(image.shape)} and "
            f"{tuple(weights.shape)}"
        )
    if image.ndim not in (3, 4) or image.shape[-3] != 6:
        raise ValueError(
            "expected [6, H, W] or [B, 6, H, W] (an AddInverse-encoded image and its W(x)), "
            f"got shape {tuple(image.shape)}"
        )
    if not (image.is_floating_point() and weights.is_floating_point()):
        raise TypeError(f"expected floating tensors, got {image.dtype} and {weights.dtype}")
    if smooth < 0 or (smooth > 1 and smooth % 2 == 0):
        raise ValueError(f"smooth must be 0, 1 or an odd kernel size, got {smooth}")
    q = _check_percentile(alpha_percentile, "alpha_percentile") / 100
    single = image.ndim == 3
    x = image.detach()[None] if single else image.detach()
    w = weights.detach()[None] if single else weights.detach()

    contribs = (x * w).sum(1, keepdim=True)  # [B, 1, H, W]
    rgb = (w / (w.abs().amax(1, keepdim=True) + 1e-12)).clamp(min=0)
    rgb = rgb[:, :3] / (rgb[:, :3] + rgb[:, 3:] + 1e-12)  # [B, 3, H, W]

    alpha = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    alpha = torch.where(contribs < 0, torch.full_like(alpha, 1e-12), alpha)
    if smooth > 1:
        alpha = F.avg_pool2d(alpha, smooth, stride=1, padding=(smooth - 1) // 2)
    flat = alpha.flatten(1)
    chunk = max(1, _QUANTILE_MAX_NUMEL // max(1, flat.shape[1]))
    level = torch.cat([torch.quantile(f, q, dim=1) for f in flat.split(chunk)])
    level = level.view(-1, 1, 1, 1)
    alpha = torch.where(level > 0, alpha / level, torch.zeros_like(alpha)).clip(0, 1)

    out = torch.cat([rgb, alpha], 1).permute(0, 2, 3, 1).float()
    return out[0] if single else out


def _to_numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def _atomic_save_png(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def _float_image_to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{what} must be a float image in [0, 1], got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)


def save_explanation_png(rgba: ArrayLike, path: str | os.PathLike[str]) -> Path:
    """Save one ``[H, W, 4]`` RGBA image in [0, 1] (from :func:`explanation_rgba`) as a PNG.

    Written atomically (temporary file, then rename); returns the path. For a batch, call it
    per image: ``for i, e in enumerate(rgba_BHW4): save_explanation_png(e, f"expl_{i}.png")``.
    """
    a = _to_numpy(rgba)
    if a.ndim != 3 or a.shape[-1] != 4:
        raise ValueError(
            f"expected one RGBA image of shape [H, W, 4], got {a.shape}"
            + ("; save a batch image by image" if a.ndim == 4 else "")
        )
    return _atomic_save_png(Image.fromarray(_float_image_to_uint8(a, "rgba"), "RGBA"), path)


# --------------------------------------------------------------------------- heat maps


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "contribution heat maps need matplotlib: pip install 'bcos-layers[plot]'"
        ) from err
    return matplotlib


def _clip_symmetric(map_hw: np.ndarray, percentile: float) -> tuple[np.ndarray, float]:
    """Clip to ± the ``percentile`` of ``|map|``; return the clipped map and max ``|clipped|``."""
    cutoff = np.percentile(np.abs(map_hw), percentile)
    clipped = np.clip(map_hw, -cutoff, cutoff)
    return clipped, float(np.max(np.abs(clipped)))


def _check_map(contribution_map: ArrayLike, ndims: tuple[int, ...]) -> np.ndarray:
    m = _to_numpy(contribution_map)
    if m.ndim not in ndims:
        shapes = " or ".join({2: "[H, W]", 3: "[B, H, W]"}[n] for n in ndims)
        raise ValueError(f"expected a contribution map of shape {shapes}, got {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the contribution map contains NaN or Inf")
    return m


def contribution_heatmap(
    contribution_map: ArrayLike,
    ax: matplotlib.axes.Axes | None = None,
    *,
    percentile: float = 99.5,
    cmap: str = "bwr",
    vrange: float | None = None,
    hide_ticks: bool = True,
) -> tuple[matplotlib.axes.Axes, matplotlib.image.AxesImage]:
    """Plot a ``[H, W]`` contribution map with a symmetric diverging colour map.

    Values are clipped to ± the ``percentile`` of ``|map|``; the colour range is ``±vrange``
    (default: the largest clipped ``|value|``), so white is exactly zero contribution.
    """
    _require_matplotlib()
    import matplotlib.pyplot as plt

    m = _check_map(contribution_map, (2,))
    clipped, vmax = _clip_symmetric(m, _check_percentile(percentile, "percentile"))
    v = vmax if vrange is None else float(vrange)
    if ax is None:
        _, ax = plt.subplots(1)
    im = ax.imshow(clipped, cmap=cmap, vmin=-v, vmax=v)
    if hide_ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    return ax, im


def contribution_heatmap_rgba(
    contribution_map: ArrayLike, *, percentile: float = 99.5, cmap: str = "bwr"
) -> np.ndarray:
    """Colour ``[H, W]`` or ``[B, H, W]`` contribution maps without a figure: float RGBA
    ``[..., H, W, 4]``, each map clipped and scaled symmetrically as in
    :func:`contribution_heatmap`."""
    matplotlib = _require_matplotlib()
    m = _check_map(contribution_map, (2, 3))
    p = _check_percentile(percentile, "percentile")
    from matplotlib.colors import Normalize

    colormap = matplotlib.colormaps[cmap]
    out = []
    for one in m.reshape(-1, *m.shape[-2:]):
        clipped, v = _clip_symmetric(one, p)
        # An all-zero map is drawn in the centre colour (white for bwr), not the low end.
        scaled = Normalize(vmin=-v, vmax=v)(clipped) if v > 0 else np.full(clipped.shape, 0.5)
        out.append(colormap(scaled))
    return np.stack(out).reshape(*m.shape, 4)


def save_contribution_png(
    contribution_map: ArrayLike,
    path: str | os.PathLike[str],
    *,
    percentile: float = 99.5,
    cmap: str = "bwr",
) -> Path:
    """Save one ``[H, W]`` contribution map as an RGB PNG (see :func:`contribution_heatmap_rgba`)."""
    rgba = contribution_heatmap_rgba(
        _check_map(contribution_map, (2,)), percentile=percentile, cmap=cmap
    )
    rgb = _float_image_to_uint8(rgba[..., :3], "heat map")
    return _atomic_save_png(Image.fromarray(rgb, "RGB"), path)
