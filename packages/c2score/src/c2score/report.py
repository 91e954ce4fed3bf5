"""The result of a C2 evaluation: JSON report, terminal summary and score distribution."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from c2score.io import atomic_path, atomic_write_text

__all__ = ["C2Result", "UndefinedScoreWarning"]


class UndefinedScoreWarning(RuntimeWarning):
    """C2 came out NaN: no concept could be scored, or the random baseline is undefined (fewer
    than two usable images). The result says why in :attr:`C2Result.undefined_reason`."""


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class C2Result:
    """C2 = mean consistency over the scored concepts - random baseline (paper Eq. 16)."""

    c2: float
    """Mean consistency minus the baseline mean (NaN when no concept could be scored)."""
    mean_consistency: float
    """Mean of Eq. 15 over the scored concepts."""
    baseline_mean: float
    """Mean consistency of the random concepts (one per seed)."""
    baseline_std: float
    """Sample standard deviation over the seeds (0 with a single seed)."""
    baseline_per_seed: dict[int, float]
    concept_ids: list[int]
    """Original indices of the scored concepts."""
    consistency: list[float]
    """Eq. 15 per scored concept, aligned with ``concept_ids``."""
    n_images_per_concept: list[int]
    """Embeddings that entered each scored concept's consistency."""
    skipped_concepts: dict[str, list[int]]
    """Reason -> ids of the concepts not scored for it."""
    skipped_images: dict[str, int]
    """Reason -> number of evaluation images that could not be used."""
    skipped_pairs: dict[str, int]
    """Reason -> number of (image, concept) pairs left out (e.g. an all-zero attribution map)."""
    n_images: int
    n_images_used: int
    n_concepts: int
    feature_dim: int
    baseline_per_group: list[float] | None = None
    """Per-group baseline (mean over seeds) when groups were given; NaN for groups < 2 images."""
    config: dict[str, Any] = field(default_factory=dict)
    undefined_reason: str | None = None
    """Why ``c2`` is NaN (None when it is a number); :func:`~c2score.evaluate_c2` also warns
    with an :class:`UndefinedScoreWarning`."""

    def histogram(self, bins: int = 20) -> tuple[list[float], list[int]]:
        """(bin edges, counts) of the per-concept consistencies over [-1, 1]."""
        # rounding can put a perfectly consistent concept at 1 + 1e-16: clip into the range
        values = np.clip(np.asarray(self.consistency, dtype=np.float64), -1.0, 1.0)
        counts, edges = np.histogram(values, bins=bins, range=(-1.0, 1.0))
        return edges.tolist(), counts.tolist()

    def to_dict(self) -> dict[str, Any]:
        edges, counts = self.histogram()
        return {
            "c2": _finite_or_none(self.c2),
            "c2_undefined_reason": self.undefined_reason,
            "mean_consistency": _finite_or_none(self.mean_consistency),
            "baseline": {
                "mean": _finite_or_none(self.baseline_mean),
                "std": _finite_or_none(self.baseline_std),
                "per_seed": {str(k): _finite_or_none(v) for k, v in self.baseline_per_seed.items()},
                "per_group": None
                if self.baseline_per_group is None
                else [_finite_or_none(v) for v in self.baseline_per_group],
            },
            "counts": {
                "images": self.n_images,
                "images_used": self.n_images_used,
                "concepts": self.n_concepts,
                "concepts_scored": len(self.concept_ids),
                "concepts_skipped": {k: len(v) for k, v in self.skipped_concepts.items()},
                "images_skipped": dict(self.skipped_images),
                "pairs_skipped": dict(self.skipped_pairs),
            },
            "feature_dim": self.feature_dim,
            "per_concept": {
                "concept_id": self.concept_ids,
                "consistency": [_finite_or_none(x) for x in self.consistency],
                "n_images": self.n_images_per_concept,
            },
            "distribution": {"bin_edges": edges, "counts": counts},
            "skipped_concept_ids": self.skipped_concepts,
            "config": self.config,
        }

    def save_json(self, path: str | Path) -> None:
        """Write the report as JSON (atomically; non-finite numbers become null)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    def summary(self) -> str:
        """A small terminal table of the headline numbers."""
        q = np.quantile(self.consistency, [0.1, 0.5, 0.9]) if self.consistency else [math.nan] * 3
        rows = [
            ("C2-score", f"{self.c2:.4f}"),
            ("mean consistency", f"{self.mean_consistency:.4f}"),
            ("random baseline", f"{self.baseline_mean:.4f} ± {self.baseline_std:.4f}"),
            ("consistency p10/p50/p90", f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}"),
            ("concepts scored", f"{len(self.concept_ids)} of {self.n_concepts}"),
        ]
        rows += [(f"  skipped: {k}", str(len(v))) for k, v in self.skipped_concepts.items() if v]
        rows.append(("images used", f"{self.n_images_used} of {self.n_images}"))
        rows += [(f"  skipped: {k}", str(v)) for k, v in self.skipped_images.items() if v]
        rows += [(f"  pairs skipped: {k}", str(v)) for k, v in self.skipped_pairs.items() if v]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def save_histogram(self, path: str | Path, bins: int = 40) -> bool:
        """Plot the per-concept consistency distribution (needs matplotlib; False without it).

        The format follows the file extension (PNG without one); the file is written atomically.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(np.clip(self.consistency, -1, 1), bins=bins, range=(-1, 1), color="tab:blue")
        ax.axvline(self.baseline_mean, color="tab:red", ls="--", label="random baseline")
        ax.set_xlabel("consistency (Eq. 15)")
        ax.set_ylabel("concepts")
        ax.set_title(f"C2 = {self.c2:.3f}")
        ax.legend()
        fig.tight_layout()
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        try:
            with atomic_path(path) as tmp:  # the temporary name hides the format: pass it
                fig.savefig(tmp, dpi=120, format=fmt)
        finally:
            plt.close(fig)
        return True
