"""The FaCT pictures: concept cards, decision explanations, cross-layer views, evaluation plots.

Every ``fig_*`` function takes plain numpy arrays / Python values (no model, no tensors) and
returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing touches a screen or
pyplot's global figure list (the Agg canvas renders it); :func:`save_figure` writes it as a PNG
atomically and releases it.

Image conventions (checked; a wrong shape or range is a ``ValueError`` saying what was given):

* an *image* is ``H x W x 3`` (channels last), ``uint8`` in [0, 255] or float in [0, 1];
* an *attribution overlay* is the B-cos RGBA explanation image ``H x W x 4`` (float in [0, 1]
  or ``uint8``; e.g. ``bcos_layers.visualize.explanation_rgba``): the colour is what the
  dynamic linear weights align with, the alpha their strength. It is drawn over black, as in
  the B-cos and FaCT papers, or over the dimmed input on concept cards (:func:`composite_rgba`);
* a *thumbnail* is either of the two (RGBA is composited over black), or ``None`` for
  "no picture" (an empty, labelled panel).

The pictures follow the FaCT paper: concept cards are the top-activating images of a concept
with their input attributions (Eq. 12) and class labels (Sec. 5); the explanation of a decision
is the logit split into concept contributions (Eq. 9) plus the logit bias, with the completeness
error ``|logit - (Σ contributions + bias)|``; the cross-layer view decomposes a late concept into
early-concept contributions (Fig. 1, Sec. H.3); deletion curves are Fig. 7; the misclassification
view is Fig. 8 (contributions to two logits as a percentage of each logit's total positive
contribution, Sec. G).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

from fact_model._atomic import atomic_path

__all__ = [
    "completeness_text",
    "composite_rgba",
    "fig_accuracy_vs_sparsity",
    "fig_concept_card",
    "fig_cross_layer",
    "fig_deletion_curves",
    "fig_explanation",
    "fig_misclassification",
    "percent_of_positive",
    "save_figure",
]

_PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
"""Tableau 10: concept ``i`` of a figure is drawn in ``_PALETTE[i % 10]`` (bar and frame)."""
_OTHER_COLOUR = "#c8c8c8"
_BIAS_COLOUR = "#ffffff"
_POS_COLOUR = "#3b7dd8"
_NEG_COLOUR = "#d8553b"


# --------------------------------------------------------------------------- validation


def _as_image(value: Any, what: str, *, allow_rgba: bool, require_rgba: bool = False) -> np.ndarray:
    """``value`` as a float ``H x W x C`` array in [0, 1] (C = 3, or 4 where allowed)."""
    if value is None:
        raise ValueError(f"{what} is None; an image array is required here")
    a = np.asarray(value)
    channels = (4,) if require_rgba else ((3, 4) if allow_rgba else (3,))
    want = " or ".join(f"H x W x {c}" for c in channels)
    if a.ndim != 3 or a.shape[2] not in channels or a.shape[0] == 0 or a.shape[1] == 0:
        hint = ""
        if a.ndim == 3 and a.shape[0] in channels and a.shape[2] not in channels:
            hint = " (channels first? transpose it to channels last, e.g. a.transpose(1, 2, 0))"
        raise ValueError(f"{what} must be an image of shape {want}, got shape {a.shape}{hint}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(
            f"{what} must be uint8 in [0, 255] or float in [0, 1], got dtype {a.dtype}"
        )
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or Inf")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{what} is a float image with values in [{lo:.3g}, {hi:.3g}]; floats must lie in "
            "[0, 1] (pass uint8 for 0-255 data)"
        )
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def _as_thumb(value: Any, what: str) -> np.ndarray | None:
    """A thumbnail as an RGB float image (RGBA composited over black), or ``None``."""
    if value is None:
        return None
    a = _as_image(value, what, allow_rgba=True)
    return composite_rgba(a) if a.shape[2] == 4 else a


def _finite(value: Any, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, got {f}")
    return f


def _pairs(items: Sequence[tuple[str, float]], what: str) -> tuple[list[str], list[float]]:
    """Split ``(name, value)`` pairs into names and finite values, with clear errors."""
    names: list[str] = []
    vals: list[float] = []
    for i, item in enumerate(items):
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
            raise ValueError(f"{what}[{i}] must be a (name, value) pair, got {item!r}")
        names.append(str(item[0]))
        vals.append(_finite(item[1], f"{what}[{i}] value"))
    return names, vals


def _same_length(what: str, reference: str, n: int, **lists: Sequence[Any]) -> None:
    for name, seq in lists.items():
        if len(seq) != n:
            raise ValueError(
                f"{what}: {name} has {len(seq)} entries but {reference} has {n}; "
                "give one entry per item (None where there is no picture)"
            )


def _fmt(x: float, spec: str = ".3f") -> str:
    """``x`` formatted with a typographic minus sign (as matplotlib's tick labels)."""
    return format(x, spec).replace("-", "\N{MINUS SIGN}", 1) if x < 0 else format(x, spec)


def completeness_text(logit: float, total: float, bias: float, error: float) -> str:
    """The completeness line of an explanation (Eq. 9 plus the logit bias).

    >>> completeness_text(3.217, 5.414, -2.197, 1.2e-7)
    'logit 3.217 = Σ contributions 5.414 + bias −2.197; error 1.2e-07'
    """
    return (
        f"logit {_fmt(logit)} = Σ contributions {_fmt(total)} + bias {_fmt(bias)}; "
        f"error {abs(error):.1e}"
    )


def composite_rgba(rgba: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Draw an RGBA explanation ``H x W x 4`` over ``background`` (default black), as RGB.

    ``out = alpha * rgb + (1 - alpha) * background`` -- how B-cos explanations are shown (the
    opacity is the explanation's strength, so unexplained pixels stay black). ``background``
    may be an ``H x W x 3`` image (e.g. a dimmed input) of the same size.
    """
    a = _as_image(rgba, "rgba", allow_rgba=True, require_rgba=True)
    alpha = a[..., 3:4]
    out = a[..., :3] * alpha
    if background is not None:
        bg = _as_image(background, "background", allow_rgba=False)
        if bg.shape[:2] != a.shape[:2]:
            raise ValueError(f"background is {bg.shape[:2]} but the overlay is {a.shape[:2]}")
        out = out + (1.0 - alpha) * bg
    return out


def percent_of_positive(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Contributions as a percentage of their total positive contribution (paper Sec. G).

    ``100 * v / Σ_j max(v_j, 0)``; all zeros when nothing is positive. Pass *all* concept
    contributions of one logit (not only the shown ones), then pick the shown concepts.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not np.isfinite(v).all():
        raise ValueError(f"values must be a finite 1-d sequence, got shape {v.shape}")
    total = np.clip(v, 0, None).sum()
    return np.zeros_like(v) if total == 0 else 100.0 * v / total


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _show(ax: Axes, img: np.ndarray | None, *, frame: str | None = None) -> None:
    """An image panel without ticks; ``None`` draws a grey "no image" panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    if img is None:
        ax.set_facecolor("#eeeeee")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, color="#777777")
    else:
        ax.imshow(img, interpolation="nearest" if max(img.shape[:2]) < 96 else "antialiased")
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(3)


def _ink_on(colour: str) -> str:
    """Black or white text, whichever reads better on ``colour`` (WCAG relative luminance)."""
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "black" if luminance > 0.3 else "white"


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------- concept card


def fig_concept_card(
    images: Sequence[np.ndarray],
    overlays: Sequence[np.ndarray | None],
    labels: Sequence[str],
    presence: Sequence[float],
    title: str,
    c2: float | None = None,
    extra: Mapping[str, float] | None = None,
    *,
    columns: int = 5,
    dim: float = 0.25,
) -> Figure:
    """A concept card: its top-activating images, each over its attribution (paper Sec. 5).

    Args:
        images: ``n`` input images, each ``H x W x 3`` (sizes may differ between images).
        overlays: ``n`` B-cos RGBA attributions of the concept on each image (``H x W x 4``,
            shown below the image, over a dimmed copy of it, see ``dim``) or ``None`` (an
            empty attribution panel for that one).
        labels: ``n`` class labels, shown above each image.
        presence: ``n`` concept activations (presence values), shown below each attribution.
        title: the card's heading (e.g. ``"layer4:123 · wheels"``).
        c2: the concept's C2-score (Eq. 16), shown in the subtitle when given.
        extra: further named statistics for the subtitle (e.g. ``{"frequency": 0.05}``).
        columns: images per row.
        dim: the attribution is drawn over its image darkened to this brightness, so one
            sees where in the image it lies (``0``: over black, as in the B-cos papers);
            an overlay must then have its image's height and width.
    """
    n = len(images)
    if n == 0:
        raise ValueError("fig_concept_card needs at least one image")
    _same_length(
        "fig_concept_card", "images", n, overlays=overlays, labels=labels, presence=presence
    )
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    dim = _finite(dim, "dim")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim is a brightness in [0, 1], got {dim}")
    imgs = [_as_image(im, f"images[{i}]", allow_rgba=False) for i, im in enumerate(images)]
    ovs = [
        None if ov is None else _as_image(ov, f"overlays[{i}]", allow_rgba=True, require_rgba=True)
        for i, ov in enumerate(overlays)
    ]
    for i, ov in enumerate(ovs):
        if ov is not None and dim > 0 and ov.shape[:2] != imgs[i].shape[:2]:
            raise ValueError(
                f"overlays[{i}] is {ov.shape[0]} x {ov.shape[1]} but images[{i}] is "
                f"{imgs[i].shape[0]} x {imgs[i].shape[1]}; an attribution must match its "
                "image (or pass dim=0 to draw it over black)"
            )
    pres = [_finite(p, f"presence[{i}]") for i, p in enumerate(presence)]
    stats = {} if c2 is None else {"C2": _finite(c2, "c2")}
    stats.update({str(k): _finite(v, f"extra[{k!r}]") for k, v in (extra or {}).items()})
    with_overlays = any(ov is not None for ov in ovs)

    ncols = min(columns, n)
    nrows = math.ceil(n / ncols)
    per_row = 2 if with_overlays else 1
    fig = _new_figure(1.9 * ncols + 0.3, (1.85 * per_row + 0.45) * nrows + 0.9)
    grid = fig.add_gridspec(
        nrows,
        ncols,
        left=0.02,
        right=0.98,
        bottom=0.02,
        top=1 - 0.85 / fig.get_figheight(),
        hspace=0.22,
        wspace=0.08,
    )
    for i in range(n):
        r, c = divmod(i, ncols)
        cell = grid[r, c].subgridspec(per_row, 1, hspace=0.04)
        ax = fig.add_subplot(cell[0, 0])
        _show(ax, imgs[i])
        ax.set_title(_short(str(labels[i])), fontsize=8, pad=3)
        bottom = ax
        if with_overlays:
            bottom = fig.add_subplot(cell[1, 0])
            ov = ovs[i]
            _show(
                bottom, None if ov is None else composite_rgba(ov, dim * imgs[i] if dim else None)
            )
        bottom.set_xlabel(f"presence {_fmt(pres[i], '.3g')}", fontsize=8, labelpad=2)
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.12 / fig.get_figheight(), va="top")
    if stats:
        line = " · ".join(f"{k} {_fmt(v, '.3g')}" for k, v in stats.items())
        fig.text(
            0.5,
            1 - 0.5 / fig.get_figheight(),
            line,
            ha="center",
            va="top",
            fontsize=9,
            color="#444444",
        )
    return fig


# --------------------------------------------------------------------------- explanation


def _stacked_segments(
    values: Sequence[float],
) -> list[tuple[int, float, float]]:
    """Left edges of a stacked bar: positives stack rightwards from 0, negatives leftwards.

    Returns ``(index, left, width)`` per value, with signed width, in input order.
    """
    pos = neg = 0.0
    out = []
    for i, v in enumerate(values):
        if v >= 0:
            out.append((i, pos, v))
            pos += v
        else:
            out.append((i, neg, v))
            neg += v
    return out


def fig_explanation(
    image: np.ndarray,
    predicted: str,
    logit: float,
    bias: float,
    completeness_error: float,
    contributions: Sequence[tuple[str, float]],
    concept_thumbs: Sequence[np.ndarray | None],
    other: float = 0.0,
) -> Figure:
    """One decision as its concept contributions (paper Eq. 9): a stacked bar of the logit.

    Args:
        image: the explained input, ``H x W x 3`` (or its RGBA explanation, ``H x W x 4``).
        predicted: the explained class (the logit's class).
        logit: the logit value.
        bias: the logit bias (a constant of the classifier, not from any concept).
        completeness_error: ``|logit - (Σ_all concepts contribution + bias)|`` as computed by
            the model; printed, not recomputed.
        contributions: the shown concepts as ``(name, contribution)``, typically the top ones
            by ``|contribution|``; each becomes a coloured segment.
        concept_thumbs: one thumbnail per contribution (the concept's attribution on this image,
            ``H x W x 4`` or ``H x W x 3``), or ``None``.
        other: the summed contribution of all concepts not shown ("other concepts" segment).

    The upper bar stacks the positive segments rightwards from 0 and the negative ones
    leftwards, in the given order, each as wide as its value; the bias is its own hatched
    segment and "other concepts" a dotted grey one (left out when ``other`` is 0). The lower bar is
    the logit itself, the net sum of the upper one, and a dashed line joins its end to the
    stack. Segments are coloured like the frames of the concept thumbnails below.
    """
    img = _as_image(image, "image", allow_rgba=True)
    if img.shape[2] == 4:
        img = composite_rgba(img)
    logit = _finite(logit, "logit")
    bias = _finite(bias, "bias")
    err = _finite(completeness_error, "completeness_error")
    other = _finite(other, "other")
    n = len(contributions)
    _same_length("fig_explanation", "contributions", n, concept_thumbs=concept_thumbs)
    names, vals = _pairs(contributions, "contributions")
    thumbs = [_as_thumb(t, f"concept_thumbs[{i}]") for i, t in enumerate(concept_thumbs)]

    # Segments: the shown concepts, "other concepts" (left out when exactly 0), the bias.
    seg_vals, seg_names = list(vals), list(names)
    colours = [_PALETTE[i % len(_PALETTE)] for i in range(n)]
    kinds = ["concept"] * n
    if other != 0.0:
        seg_vals.append(other)
        seg_names.append("other concepts")
        colours.append(_OTHER_COLOUR)
        kinds.append("other")
    seg_vals.append(bias)
    seg_names.append("bias")
    colours.append(_BIAS_COLOUR)
    kinds.append("bias")
    total = sum(vals) + other

    # Layout in inches (robust for any number of concepts, including none): a heading band,
    # the image next to the bar, and one row of concept thumbnails under the bar.
    img_w, gap, margin, bar_h, axis_h = 2.5, 0.95, 0.25, 1.9, 0.55
    head_h, thumb_row_h, bottom = 0.8, (1.75 if n else 0.0), 0.15
    thumb_slot = 1.3
    width = max(8.0, margin + img_w + gap + max(n, 4) * thumb_slot + margin)
    height = head_h + max(img_w, bar_h + axis_h) + thumb_row_h + bottom
    fig = _new_figure(width, height)

    def rect(x: float, y_top: float, w: float, h: float) -> list[float]:
        """Axes rectangle from inches, ``y_top`` measured down from the figure's top edge."""
        return [x / width, 1 - (y_top + h) / height, w / width, h / height]

    ax_img = fig.add_axes(rect(margin, head_h + 0.25, img_w, img_w - 0.25))
    _show(ax_img, img)
    ax_img.set_title(_short(f"predicted: {predicted}", 30), fontsize=9, pad=3)

    bar_x = margin + img_w + gap
    bar_w = width - bar_x - margin
    ax = fig.add_axes(rect(bar_x, head_h + 0.25, bar_w, bar_h - 0.25))
    segs = _stacked_segments(seg_vals)
    ends = [0.0, logit, *(left + w for _, left, w in segs)]
    lo, hi = min(ends), max(ends)
    span = hi - lo if hi > lo else 1.0
    inches_per_unit = bar_w / (1.08 * span)
    y_stack, y_logit = 1.0, 0.0
    for i, left, w in segs:
        ax.barh(
            y_stack,
            w,
            left=left,
            height=0.62,
            color=colours[i],
            edgecolor="#333333",
            linewidth=0.6,
            hatch={"bias": "//", "other": ".."}.get(kinds[i]),
            gid=f"segment:{kinds[i]}",
        )
        chars = int(abs(w) * inches_per_unit / 0.075)  # ~0.075 in per character at 7 pt
        if chars >= 4:
            ax.text(
                left + w / 2,
                y_stack,
                _short(seg_names[i], chars),
                ha="center",
                va="center",
                fontsize=7,
                color=_ink_on(colours[i]),
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1}
                if kinds[i] == "bias"
                else None,
            )
    ax.barh(y_logit, logit, height=0.38, color="#333333", gid="logit")
    ax.text(
        logit,
        y_logit,
        f" logit {_fmt(logit)} ",
        ha="left" if logit >= 0 else "right",
        va="center",
        fontsize=8,
        fontweight="bold",
    )
    # The net of the stacked bar is the logit: a dashed guide from the logit bar up through it.
    ax.plot([logit, logit], [y_logit, y_stack + 0.42], color="black", linewidth=1.2, ls="--")
    ax.axvline(0, color="#555555", linewidth=0.8)
    label_room = 1.1 / inches_per_unit  # the logit label is about 1.1 in wide
    ax.set_xlim(
        min(lo - 0.04 * span, logit - label_room if logit < 0 else lo),
        max(hi + 0.04 * span, logit + label_room if logit >= 0 else hi),
    )
    ax.set_ylim(-0.45, 1.5)
    ax.set_yticks([y_logit, y_stack], ["logit", "concepts\n+ bias"], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("contribution to the logit", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{_short(predicted, 40)}: logit split into concept contributions", fontsize=9)

    if n:
        side = min(1.05, (bar_w / n) - 0.2)
        row_top = head_h + max(img_w, bar_h + axis_h) + 0.3
        for i in range(n):
            cx = bar_x + (i + 0.5) * bar_w / n
            axt = fig.add_axes(rect(cx - side / 2, row_top, side, side))
            _show(axt, thumbs[i], frame=colours[i])
            axt.set_title(_short(names[i], 18), fontsize=7, pad=3)
            axt.set_xlabel(
                _fmt(vals[i], "+.3f"),
                fontsize=8,
                labelpad=2,
                color=_POS_COLOUR if vals[i] >= 0 else _NEG_COLOUR,
            )
    fig.suptitle(
        f"Why {_short(predicted, 40)}?",
        fontsize=12,
        fontweight="bold",
        y=1 - 0.1 / height,
        va="top",
    )
    fig.text(
        0.5,
        1 - 0.45 / height,
        completeness_text(logit, total, bias, err),
        ha="center",
        va="top",
        fontsize=9,
        color="#333333",
    )
    return fig


# --------------------------------------------------------------------------- cross-layer


def fig_cross_layer(
    late_name: str,
    late_value: float,
    early: Sequence[tuple[str, float]],
    thumbs_late: Sequence[np.ndarray | None] | np.ndarray | None,
    thumbs_early: Sequence[np.ndarray | None],
    error: float,
    *,
    other: float = 0.0,
) -> Figure:
    """A late-layer concept decomposed into early-layer concept contributions (paper Fig. 1).

    Args:
        late_name: the late concept's name or id.
        late_value: its activation on the explained image (what the early contributions sum to).
        early: the shown early concepts as ``(name, contribution to the late concept)``.
        thumbs_late: the late concept's picture(s): one image, a list of images (e.g. its
            attribution on this image and on top-activating images), or ``None``.
        thumbs_early: one thumbnail per early concept (or ``None``).
        error: ``|late_value - Σ_all early contributions|`` from the model (printed).
        other: the summed contribution of the early concepts not shown.

    Lines from the late concept to each early one are as thick as ``|contribution|`` and
    coloured by its sign.
    """
    late_value = _finite(late_value, "late_value")
    err = _finite(error, "error")
    other = _finite(other, "other")
    n = len(early)
    if n == 0:
        raise ValueError("fig_cross_layer needs at least one early concept")
    _same_length("fig_cross_layer", "early", n, thumbs_early=thumbs_early)
    names, vals = _pairs(early, "early")
    if thumbs_late is None:
        late_list: list[np.ndarray | None] = [None]
    elif isinstance(thumbs_late, np.ndarray) and thumbs_late.ndim == 3:
        late_list = [_as_thumb(thumbs_late, "thumbs_late")]
    else:
        late_list = [_as_thumb(t, f"thumbs_late[{i}]") for i, t in enumerate(thumbs_late)]
        if not late_list:
            late_list = [None]
    early_thumbs = [_as_thumb(t, f"thumbs_early[{i}]") for i, t in enumerate(thumbs_early)]

    fig = _new_figure(9.0, max(3.6, 1.05 * n + 1.2))
    outer = fig.add_gridspec(
        1, 3, width_ratios=[1.3, 0.9, 3.2], left=0.03, right=0.97, bottom=0.1, top=0.8, wspace=0.05
    )
    late_grid = outer[0, 0].subgridspec(len(late_list), 1, hspace=0.15)
    late_axes = []
    for j, t in enumerate(late_list):
        axl = fig.add_subplot(late_grid[j, 0])
        _show(axl, t, frame="#333333")
        late_axes.append(axl)
    late_axes[0].set_title(f"{_short(late_name, 26)}\nactivation {_fmt(late_value)}", fontsize=9)

    rows = outer[0, 2].subgridspec(n, 2, width_ratios=[1, 3.2], hspace=0.25, wspace=0.05)
    bound = max(abs(v) for v in vals) or 1.0
    top_box, bottom_box = late_axes[0].get_position(), late_axes[-1].get_position()
    anchor_xy = (top_box.x1, (top_box.y1 + bottom_box.y0) / 2)  # figure coordinates
    for i in range(n):
        axt = fig.add_subplot(rows[i, 0])
        colour = _POS_COLOUR if vals[i] >= 0 else _NEG_COLOUR
        _show(axt, early_thumbs[i], frame=colour)
        axb = fig.add_subplot(rows[i, 1])
        axb.barh(0, vals[i], color=colour, height=0.55)
        axb.axvline(0, color="#555555", linewidth=0.8)
        axb.set_xlim(-1.15 * bound if min(vals) < 0 else 0, 1.15 * bound)
        axb.set_ylim(-0.6, 0.6)
        axb.set_yticks([])
        axb.text(
            0.01,
            0.97,
            _short(names[i], 30),
            transform=axb.transAxes,
            ha="left",
            va="top",
            fontsize=8,
        )
        axb.text(
            vals[i],
            0,
            f" {_fmt(vals[i], '+.3f')} ",
            ha="left" if vals[i] >= 0 else "right",
            va="center",
            fontsize=8,
        )
        for side in ("top", "right", "left"):
            axb.spines[side].set_visible(False)
        if i < n - 1:
            axb.set_xticklabels([])
        axb.tick_params(labelsize=7)
        fig.add_artist(
            ConnectionPatch(
                xyA=anchor_xy,
                coordsA=fig.transFigure,
                xyB=(0.0, 0.5),
                coordsB=axt.transAxes,
                color=colour,
                alpha=0.6,
                linewidth=0.5 + 5.0 * abs(vals[i]) / bound,
            )
        )
    fig.suptitle(f"{late_name} from earlier concepts", fontsize=12, fontweight="bold", y=0.98)
    total = sum(vals) + other
    fig.text(
        0.5,
        0.915,
        f"activation {_fmt(late_value)} = Σ early contributions {_fmt(total)} "
        f"(shown {_fmt(sum(vals))} + other {_fmt(other)}); error {abs(err):.1e}",
        ha="center",
        va="top",
        fontsize=9,
        color="#333333",
    )
    return fig


# --------------------------------------------------------------------------- evaluation plots


def fig_deletion_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    aucs: Mapping[str, float],
    ylabel: str,
    title: str,
) -> Figure:
    """Concept-deletion curves (paper Fig. 7): a score vs the fraction of concepts removed.

    Args:
        curves: importance measure name -> ``(fractions, values)``, two equally long 1-d
            sequences, fractions non-decreasing in [0, 1].
        aucs: measure name -> area under its curve, shown in the legend (measures may be
            missing; a name that is not in ``curves`` is an error).
        ylabel: what the curve measures (e.g. "target logit" or "accuracy").
        title: the plot title.
    """
    if not curves:
        raise ValueError("fig_deletion_curves needs at least one curve")
    unknown = sorted(set(aucs) - set(curves))
    if unknown:
        raise ValueError(
            f"aucs names measures that have no curve: {unknown}; curves: {sorted(curves)}"
        )
    fig = _new_figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, pair) in enumerate(curves.items()):
        if len(pair) != 2:
            raise ValueError(f"curves[{name!r}] must be a (fractions, values) pair")
        x = np.asarray(pair[0], dtype=np.float64)
        y = np.asarray(pair[1], dtype=np.float64)
        if x.ndim != 1 or y.shape != x.shape or x.size == 0:
            raise ValueError(
                f"curves[{name!r}]: fractions and values must be 1-d of the same non-zero length, "
                f"got shapes {x.shape} and {y.shape}"
            )
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError(f"curves[{name!r}] contains NaN or Inf")
        if x.min() < 0 or x.max() > 1 or np.any(np.diff(x) < 0):
            raise ValueError(f"curves[{name!r}]: fractions must be non-decreasing within [0, 1]")
        label = str(name)
        if name in aucs:
            label += f" (AUC {_fmt(_finite(aucs[name], f'aucs[{name!r}]'), '.3g')})"
        ax.plot(x, y, label=label, color=_PALETTE[i % len(_PALETTE)], linewidth=2)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of concepts removed (most important first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_accuracy_vs_sparsity(
    points: Sequence[Mapping[str, Any]],
    baseline_accuracy: float | None = None,
) -> Figure:
    """Accuracy vs per-image L0 of the concept codes, one colour per layer (paper Sec. A).

    Args:
        points: one mapping per trained SAE with keys ``name`` (str), ``l0`` (mean number of
            active concepts per image, > 0), ``accuracy`` (fraction in [0, 1]), ``layer`` (str)
            and ``selected`` (bool: the checkpoint chosen for the model, drawn as a star and
            labelled).
        baseline_accuracy: the B-cos network's accuracy without an SAE (dashed line).
    """
    if not points:
        raise ValueError("fig_accuracy_vs_sparsity needs at least one point")
    required = ("name", "l0", "accuracy", "layer", "selected")
    parsed: list[tuple[str, float, float, str, bool]] = []
    for i, p in enumerate(points):
        missing = [k for k in required if k not in p]
        if missing:
            raise ValueError(f"points[{i}] is missing {missing}; each point needs {list(required)}")
        acc = _finite(p["accuracy"], f"points[{i}].accuracy")
        if not 0 <= acc <= 1:
            raise ValueError(
                f"points[{i}].accuracy is {acc}; give accuracy as a fraction in [0, 1] "
                "(divide percentages by 100)"
            )
        l0 = _finite(p["l0"], f"points[{i}].l0")
        if l0 <= 0:
            raise ValueError(f"points[{i}].l0 must be > 0 (log axis), got {l0}")
        parsed.append((str(p["name"]), l0, acc, str(p["layer"]), bool(p["selected"])))
    if baseline_accuracy is not None:
        baseline_accuracy = _finite(baseline_accuracy, "baseline_accuracy")
        if not 0 <= baseline_accuracy <= 1:
            raise ValueError(
                f"baseline_accuracy must be a fraction in [0, 1], got {baseline_accuracy}"
            )

    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    layers = list(dict.fromkeys(p[3] for p in parsed))
    for j, layer in enumerate(layers):
        pts = sorted((p for p in parsed if p[3] == layer), key=lambda p: p[1])
        colour = _PALETTE[j % len(_PALETTE)]
        ax.plot(
            [p[1] for p in pts],
            [100 * p[2] for p in pts],
            "o-",
            color=colour,
            label=layer,
            markersize=5,
            linewidth=1.2,
            alpha=0.85,
        )
        for name, l0, acc, _, selected in pts:
            if selected:
                ax.plot(
                    l0,
                    100 * acc,
                    marker="*",
                    markersize=16,
                    color=colour,
                    markeredgecolor="black",
                    linestyle="none",
                )
                ax.annotate(
                    name, (l0, 100 * acc), xytext=(6, -12), textcoords="offset points", fontsize=8
                )
    if baseline_accuracy is not None:
        ax.axhline(
            100 * baseline_accuracy,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"B-cos baseline {100 * baseline_accuracy:.1f}%",
        )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("active concepts per image (L0)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs sparsity (★ = selected)", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_misclassification(
    concepts: Sequence[str],
    share_a: Sequence[float],
    share_b: Sequence[float],
    class_a: str,
    class_b: str,
    thumbs: Sequence[np.ndarray | None],
    *,
    min_share: float = 0.5,
) -> Figure:
    """Concepts behind a confusion between two classes (paper Fig. 8 and Sec. G).

    Args:
        concepts: the shown concept names.
        share_a: each concept's contribution to ``class_a``'s logit, in percent of that logit's
            total positive contribution (:func:`percent_of_positive`); may be negative.
        share_b: the same for ``class_b``.
        class_a, class_b: the two classes (e.g. the true and the predicted one).
        thumbs: one thumbnail per concept (its attribution on the image), or ``None``.
        min_share: a concept "contributes" to a logit when its share exceeds this (percent);
            contributing to both marks it *shared*, to one *only <class>*.
    """
    n = len(concepts)
    if n == 0:
        raise ValueError("fig_misclassification needs at least one concept")
    _same_length(
        "fig_misclassification", "concepts", n, share_a=share_a, share_b=share_b, thumbs=thumbs
    )
    a = [_finite(v, f"share_a[{i}]") for i, v in enumerate(share_a)]
    b = [_finite(v, f"share_b[{i}]") for i, v in enumerate(share_b)]
    for name, vals in (("share_a", a), ("share_b", b)):
        if any(abs(v) > 100 + 1e-6 for v in vals):
            raise ValueError(
                f"{name} holds values beyond ±100; shares are percentages of the "
                "total positive contribution (see percent_of_positive)"
            )
    pics = [_as_thumb(t, f"thumbs[{i}]") for i, t in enumerate(thumbs)]
    col_a, col_b = _PALETTE[0], _PALETTE[1]
    fig = _new_figure(8.0, 1.05 * n + 1.5)
    grid = fig.add_gridspec(
        n,
        3,
        width_ratios=[1, 3.6, 1.3],
        left=0.03,
        right=0.97,
        bottom=0.6 / fig.get_figheight(),
        top=1 - 0.9 / fig.get_figheight(),
        hspace=0.3,
        wspace=0.08,
    )
    bound = max(1.0, *(abs(v) for v in a + b))
    left_edge = -1.2 * bound if min(a + b) < 0 else 0.0
    for i in range(n):
        tag_a, tag_b = a[i] > min_share, b[i] > min_share
        tag = (
            "shared"
            if tag_a and tag_b
            else (f"only {class_a}" if tag_a else (f"only {class_b}" if tag_b else "neither"))
        )
        frame = "#333333" if tag == "shared" else (col_a if tag_a else (col_b if tag_b else None))
        axt = fig.add_subplot(grid[i, 0])
        _show(axt, pics[i], frame=frame)
        axb = fig.add_subplot(grid[i, 1])
        axb.barh([0.22, -0.22], [a[i], b[i]], height=0.38, color=[col_a, col_b])
        for y, v in ((0.22, a[i]), (-0.22, b[i])):
            axb.text(
                v,
                y,
                f" {_fmt(v, '.1f')}% ",
                ha="left" if v >= 0 else "right",
                va="center",
                fontsize=7,
            )
        axb.axvline(0, color="#555555", linewidth=0.8)
        axb.set_xlim(left_edge, bound * 1.2)
        axb.set_ylim(-0.55, 0.55)
        axb.set_yticks([])
        axb.tick_params(labelsize=7)
        if i < n - 1:
            axb.set_xticklabels([])
        else:
            axb.set_xlabel("% of the logit's positive contribution", fontsize=8)
        for side in ("top", "right", "left"):
            axb.spines[side].set_visible(False)
        axb.set_title(_short(str(concepts[i]), 40), fontsize=8, loc="left", pad=2)
        axs = fig.add_subplot(grid[i, 2])
        axs.axis("off")
        axs.text(
            0.05,
            0.5,
            tag,
            ha="left",
            va="center",
            fontsize=9,
            fontweight="bold" if tag == "shared" else "normal",
            color="#333333" if tag in ("shared", "neither") else (col_a if tag_a else col_b),
        )
    handles = [Rectangle((0, 0), 1, 1, color=col_a), Rectangle((0, 0), 1, 1, color=col_b)]
    fig.legend(
        handles,
        [f"→ {class_a}", f"→ {class_b}"],
        loc="lower center",
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"{class_a} vs {class_b}: share of each logit's positive contribution",
        fontsize=11,
        fontweight="bold",
        y=1 - 0.15 / fig.get_figheight(),
        va="top",
    )
    return fig


# --------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, then release the figure; returns the path.

    The PNG is rendered into a temporary file in the same folder and renamed over ``path``,
    so a reader never sees half a file. The folder is created if needed. The figure is closed
    (also when saving fails); do not draw on it afterwards.
    """
    out = Path(path)
    try:
        if out.suffix.lower() != ".png":
            raise ValueError(f"save_figure writes PNG; give a path ending in .png, got {out}")
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, facecolor=fig.get_facecolor())
        os.chmod(out, 0o644)  # the temporary file was private (mkstemp); a figure is for sharing
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(fig)  # only matters for figures made through pyplot
        fig.clear()
    return out
