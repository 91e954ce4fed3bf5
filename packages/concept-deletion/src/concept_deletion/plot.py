"""Deletion-curve figure like the paper's Fig. 7 (needs the optional ``plot`` extra)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from concept_deletion.deletion import CurveResult
from concept_deletion.fileio import write_atomic

__all__ = ["plot_curves"]


def _pyplot() -> Any:
    try:
        import matplotlib

        if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting needs matplotlib: install the extra with "
            "`pip install 'concept-deletion[plot]'` (or `uv add matplotlib`)"
        ) from err
    return plt


def plot_curves(
    curves: Iterable[CurveResult],
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Any:
    """Mean target score (left) and accuracy (right, if labelled) vs the fraction deleted.

    One line per measure, with its AUC in the legend. Saves to ``path`` if given (atomically;
    the format follows the suffix, e.g. ``.png``, ``.pdf``, ``.svg``); returns the figure.
    """
    curves = list(curves)
    if not curves:
        raise ValueError("no curves to plot")
    plt = _pyplot()
    with_acc = any(c.correct is not None for c in curves)
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 5, 4))
    axes = list(axes) if with_acc else [axes]
    for c in curves:
        label = f"{c.measure} ({c.mode}, AUC {c.auc_score:.3g})"
        axes[0].plot(c.fractions, c.mean_score, label=label)
        if with_acc and c.accuracy is not None:
            axes[1].plot(c.fractions, c.accuracy, label=f"{c.measure} (AUC {c.auc_accuracy:.3g})")
    axes[0].set_xlabel(
        "fraction of concepts removed"
        if curves[0].mode == "deletion"
        else "fraction of concepts inserted"
    )
    axes[0].set_ylabel("target logit / score (mean over images)")
    axes[0].legend(fontsize=8)
    if with_acc:
        axes[1].set_xlabel(axes[0].get_xlabel())
        axes[1].set_ylabel("accuracy over all images")
        axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        buf = io.BytesIO()
        fig.savefig(buf, format=path.suffix[1:].lower() or None, dpi=120)
        write_atomic(path, buf.getvalue())
    return fig
