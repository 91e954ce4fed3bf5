"""``fact compare``: the paper's comparison tables for every available concept method.

* :func:`compare_c2` -- the C2 table (paper Fig. 4, App. C.3): the C2-score (Eq. 16) of each
  concept set on one dataset and layer; on the concept world also each set's ground-truth
  recovery (:mod:`fact_model.world.groundtruth`).
* :func:`compare_deletion` -- the deletion table (paper Fig. 7, App. F): for each concept set
  with a head (FaCT, B-cos channels, CRAFT), the deletion curve and AUC of every importance
  measure (exact contributions, saliency, Sobol, random).

Concept methods (:data:`METHODS`): ``fact`` (the SAE latents), ``channels`` (the B-cos
network's own channels at the layer), ``craft`` (per-class NMF, :mod:`fact_model.baselines.
craft`) and ``crp`` (channels of a standard torchvision network with their conditional
relevance maps, :mod:`fact_model.baselines.crp`, optional extra ``fact-model[crp]``). Each
table is written as one JSON and one PNG (:func:`plot_c2_table`, :func:`plot_deletion_table`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fact_model._atomic import atomic_write_json
from fact_model.concepts import LayerConcepts
from fact_model.consistency import c2_score, deletion
from fact_model.data import IndexedImages
from fact_model.model import FaCT

__all__ = [
    "DELETION_MEASURES",
    "METHODS",
    "compare_c2",
    "compare_deletion",
    "concept_sets",
    "plot_c2_table",
    "plot_deletion_table",
]

METHODS = ("fact", "channels", "craft", "crp")
"""Every concept method the comparison knows (``crp`` needs the ``fact-model[crp]`` extra)."""

DELETION_MEASURES = ("contribution", "saliency", "sobol", "random")
"""The importance measures of the deletion table (``contribution``: exact Eq. 9)."""


def concept_sets(
    model: FaCT,
    layer: str,
    methods: Sequence[str] = ("fact", "channels"),
    *,
    craft_train: IndexedImages | None = None,
    craft_components: int = 16,
    craft_images_per_class: int = 50,
    craft_path: str | os.PathLike[str] | None = None,
    crp_model: Any = None,
    crp_layer: str | None = None,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The concept sets to compare, by method name, at ``layer`` of ``model``.

    ``craft`` is fitted on ``craft_train`` (per class, the first ``craft_images_per_class``
    images) and cached at ``craft_path`` (``.safetensors`` + ``.json``) when given (a second
    call loads it; delete the files to refit); ``crp`` needs a standard
    (non-B-cos) torchvision network ``crp_model`` and its layer ``crp_layer``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown concept methods {unknown}; choose from {', '.join(METHODS)}")
    sets: dict[str, Any] = {}
    for method in methods:
        if method == "fact":
            sets[method] = LayerConcepts(model, layer, "sae")
        elif method == "channels":
            sets[method] = LayerConcepts(model, layer, "channels")
        elif method == "craft":
            if craft_train is None:
                raise ValueError("the craft method needs training images (craft_train)")
            from fact_model.baselines.craft import CraftConcepts

            path = None if craft_path is None else Path(craft_path)
            if path is not None and Path(f"{path}.json").is_file():
                sets[method] = CraftConcepts.load(model, path)
            else:
                sets[method] = CraftConcepts.fit(
                    model, craft_train, layer, n_components=craft_components,
                    per_class_images=craft_images_per_class, device=device, progress=progress,
                )  # fmt: skip
                if path is not None:
                    sets[method].save(path)
        else:  # crp
            if crp_model is None or crp_layer is None:
                raise ValueError(
                    "the crp method needs a standard torchvision network and its layer "
                    "(--crp-model/--crp-weights/--crp-layer); CRP does not run on B-cos models"
                )
            from fact_model.baselines.crp import CrpConcepts

            sets[method] = CrpConcepts(crp_model, crp_layer, device=device)
    return sets


def compare_c2(
    sets: Mapping[str, Any],
    dataset: IndexedImages,
    extractor: Any,
    out_dir: str | os.PathLike[str],
    *,
    indices: Sequence[int] | None = None,
    world: Any = None,
    crp_dataset: IndexedImages | None = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The C2 table: ``c2.json`` and ``c2.png`` in ``out_dir``; returns the table.

    ``world``: the :class:`~fact_model.world.ConceptWorld` of ``dataset`` (its test split from
    image 0) to add each method's ground-truth recovery. ``crp_dataset``: the same images as
    the CRP network takes them (3-channel input), when ``crp`` is compared.
    """
    import c2score
    from fact_model.demo_steps import ground_truth_for

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = list(range(len(dataset))) if indices is None else list(indices)
    table: dict[str, Any] = {"images": len(idx), "methods": {}}
    for name, concepts in sets.items():
        data = crp_dataset if (name == "crp" and crp_dataset is not None) else dataset
        res = c2_score(
            concepts, data, extractor, indices=idx, config=c2score.EvalConfig(progress=progress),
            batch_size=batch_size, device=device, pixels=dataset,
        )  # fmt: skip
        row: dict[str, Any] = {
            "name": getattr(concepts, "name", name),
            "c2": _num(res.c2),
            "mean_consistency": _num(res.mean_consistency),
            "baseline": _num(res.baseline_mean),
            "n_concepts": int(concepts.n_concepts),
            "n_scored": len(res.concept_ids),
        }
        if world is not None:
            gt = ground_truth_for(concepts, data, world, len(idx), device)
            row["groundtruth"] = {k: v for k, v in gt.items() if k != "matches"}
        table["methods"][name] = row
    atomic_write_json(out / "c2.json", table)
    plot_c2_table(table, out / "c2.png")
    return table


def compare_deletion(
    sets: Mapping[str, Any],
    dataset: IndexedImages,
    out_dir: str | os.PathLike[str],
    *,
    n_classes: int,
    per_class: int = 4,
    measures: Sequence[str] = DELETION_MEASURES,
    n_steps: int = 30,
    seed: int = 0,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The deletion table: ``deletion.json`` and ``deletion.png`` in ``out_dir`` (resumable:
    each method's curves live in ``out_dir/<method>/``); returns the table.

    Sets without a head on the B-cos model (CRP) are left out and listed as ``skipped``.
    """
    import concept_deletion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {"per_class": per_class, "methods": {}, "skipped": {}}
    for name, concepts in sets.items():
        if not hasattr(concepts, "head"):
            table["skipped"][name] = "no head on the B-cos model (CRP explains another network)"
            continue
        usable = [m for m in measures if m != "contribution" or hasattr(concepts, "contributions")]
        pcfg = concept_deletion.ProtocolConfig(
            n_classes=n_classes, per_class=per_class, seed=seed,
            comparison=concept_deletion.ComparisonConfig(
                measures=tuple(usable), schedule="geometric", n_steps=n_steps
            ),
        )  # fmt: skip
        curves = deletion(concepts, dataset, out / name, pcfg, device=device, progress=progress)
        table["methods"][name] = {
            "name": getattr(concepts, "name", name),
            "auc": {c.measure.split("/")[0]: _num(c.auc_score) for c in curves},
            "curves": {
                c.measure.split("/")[0]: {
                    "fractions": c.fractions.tolist(),
                    "logit": c.mean_score.tolist(),
                }
                for c in curves
            },
        }
    atomic_write_json(out / "deletion.json", table)
    plot_deletion_table(table, out / "deletion.png")
    return table


def plot_c2_table(table: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Bar chart of the C2-score per method (with the random baseline and, on the concept
    world, the fraction of true concepts recovered)."""
    from fact_model.figures import _new_figure, save_figure

    rows = list(table["methods"].items())
    fig = _new_figure(1.6 + 1.4 * len(rows), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    names = [r["name"] for _, r in rows]
    vals = [r["c2"] if r["c2"] is not None else math.nan for _, r in rows]
    bars = ax.bar(range(len(rows)), vals, color="#4C78A8")
    for b, (_, r) in zip(bars, rows):
        label = "n/a" if r["c2"] is None else f"{r['c2']:.3f}"
        gt = r.get("groundtruth", {}).get("fraction_recovered")
        if gt is not None:
            label += f"\n{100 * gt:.0f}% true\nrecovered"
        h = 0.0 if math.isnan(b.get_height()) else b.get_height()
        ax.text(b.get_x() + b.get_width() / 2, max(h, 0) + 0.01, label, ha="center", va="bottom",
                fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(rows)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("C2-score (higher = more consistent)")
    ax.set_ylim(min(0.0, *(v for v in vals if not math.isnan(v))) if rows else 0, 1.15)
    ax.set_title(f"C2 per concept method ({table['images']} images)")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_deletion_table(table: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """One panel per concept method: the deletion curve of every importance measure."""
    from fact_model.figures import _new_figure, save_figure

    rows = list(table["methods"].items())
    n = max(1, len(rows))
    fig = _new_figure(4.2 * n, 3.6)
    for i, (_, r) in enumerate(rows):
        ax = fig.add_subplot(1, n, i + 1)
        for measure, c in r["curves"].items():
            auc = r["auc"].get(measure)
            ax.plot(c["fractions"], c["logit"], label=f"{measure} (AUC {auc:.3f})", lw=1.8)
        ax.set_title(r["name"], fontsize=10)
        ax.set_xlabel("fraction of concepts removed")
        if i == 0:
            ax.set_ylabel("target logit")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
