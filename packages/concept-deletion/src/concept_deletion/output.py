"""JSON and CSV output of deletion curves and their areas, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from concept_deletion.deletion import CurveResult
from concept_deletion.fileio import read_json, write_atomic

__all__ = [
    "curves_from_json",
    "curves_to_json",
    "read_json",
    "save_curves",
    "write_atomic",
]


def _curve_to_dict(curve: CurveResult, per_image: bool) -> dict[str, Any]:
    acc = curve.accuracy
    out: dict[str, Any] = {
        "measure": curve.measure,
        "mode": curve.mode,
        "n_images": int(curve.scores.shape[0]),
        "n_eligible": curve.n_eligible,
        "counts": curve.counts.tolist(),
        "fractions": curve.fractions.tolist(),
        "mean_score": curve.mean_score.tolist(),
        "accuracy": None if acc is None else acc.tolist(),
        "auc_score": curve.auc_score,
        "auc_accuracy": curve.auc_accuracy,
    }
    if per_image:
        out["scores"] = curve.scores.tolist()
        out["correct"] = None if curve.correct is None else curve.correct.astype(int).tolist()
    return out


def curves_to_json(curves: Iterable[CurveResult], per_image: bool = True) -> str:
    """Serialise curves (mean curves, AUCs and, if ``per_image``, every image's scores)."""
    return json.dumps({"curves": [_curve_to_dict(c, per_image) for c in curves]}, indent=1)


def curves_from_json(text: str) -> list[CurveResult]:
    """Inverse of :func:`curves_to_json` (needs ``per_image=True``)."""
    out = []
    for d in json.loads(text)["curves"]:
        if "scores" not in d:
            raise ValueError("these curves were saved without per-image scores")
        counts = np.asarray(d["counts"], dtype=np.int64)
        out.append(
            CurveResult(
                measure=d["measure"],
                mode=d["mode"],
                counts=counts,
                fractions=np.asarray(d["fractions"], dtype=np.float64),
                scores=np.asarray(d["scores"], dtype=np.float64).reshape(-1, counts.size),
                correct=None
                if d["correct"] is None
                else np.asarray(d["correct"], dtype=bool).reshape(-1, counts.size),
                n_eligible=int(d["n_eligible"]),
            )
        )
    return out


def save_curves(
    curves: Iterable[CurveResult], directory: str | os.PathLike[str], stem: str = "deletion"
) -> dict[str, Path]:
    """Write ``<stem>.json`` (everything), ``<stem>_curves.csv`` and ``<stem>_auc.csv``."""
    curves = list(curves)
    directory = Path(directory)
    paths = {
        "json": directory / f"{stem}.json",
        "curves_csv": directory / f"{stem}_curves.csv",
        "auc_csv": directory / f"{stem}_auc.csv",
    }
    write_atomic(paths["json"], curves_to_json(curves))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["measure", "mode", "count", "fraction", "mean_score", "accuracy"])
    for c in curves:
        acc = c.accuracy
        for s in range(c.counts.size):
            a = "" if acc is None else f"{acc[s]:.6g}"
            w.writerow(
                [
                    c.measure,
                    c.mode,
                    int(c.counts[s]),
                    f"{c.fractions[s]:.6g}",
                    f"{c.mean_score[s]:.6g}",
                    a,
                ]
            )
    write_atomic(paths["curves_csv"], buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["measure", "mode", "n_images", "auc_score", "auc_accuracy"])
    for c in curves:
        auc_acc = c.auc_accuracy
        w.writerow(
            [
                c.measure,
                c.mode,
                c.scores.shape[0],
                f"{c.auc_score:.6g}",
                "" if auc_acc is None else f"{auc_acc:.6g}",
            ]
        )
    write_atomic(paths["auc_csv"], buf.getvalue())
    return paths
