"""Pictures and the concept atlas of a trained FaCT model on a dataset.

:func:`concept_pictures` renders, for chosen concepts, their top-activating images with the
exact Eq. 12 attribution of the concept on each (B-cos RGBA explanation images) and a concept
card; :func:`explanation_pictures` renders explained decisions (Eq. 9 stacked bar with
attribution thumbnails); :func:`build_model_atlas` runs the statistics, renders both and builds
the static HTML atlas (:mod:`fact_model.atlas`) -- for any FaCT model and dataset, not only the
demo.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

import bcos_layers
from fact_model._atomic import atomic_path
from fact_model.concepts import LayerConcepts
from fact_model.data import IndexedImages
from fact_model.explain import concept_attributions, concept_contributions
from fact_model.model import FaCT
from fact_model.stats import ConceptStats, concept_statistics, spatial_extent

__all__ = [
    "build_model_atlas",
    "concept_id",
    "concept_pictures",
    "explanation_pictures",
    "rgb_uint8",
]


def concept_id(layer: str, index: int) -> str:
    """The atlas id of a concept, ``"<layer>:<index>"``."""
    return f"{layer}:{int(index)}"


def rgb_uint8(x: Tensor) -> np.ndarray:
    """The RGB image ``H x W x 3`` uint8 of a B-cos input ``(6, H, W)``."""
    return (x[:3].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def class_names(dataset: IndexedImages, n_classes: int) -> list[str]:
    """The dataset's class names, completed with indices up to the model's class count."""
    names = list(dataset.classes or [])
    return names + [str(i) for i in range(len(names), n_classes)]


def _save_png(array: np.ndarray, path: Path) -> str:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return str(path)


def _rgba_uint8(rgba: Tensor) -> np.ndarray:
    return (rgba.clamp(0, 1) * 255).round().byte().cpu().numpy()


def concept_pictures(
    model: FaCT,
    dataset: IndexedImages,
    stats: ConceptStats,
    concepts: Sequence[int],
    folder: str | os.PathLike[str],
    *,
    c2: Mapping[int, float] | None = None,
    names: Sequence[str] | None = None,
    per_concept: int = 8,
    device: Any = None,
    progress: bool = True,
) -> dict[int, dict[str, Any]]:
    """Top images, attribution overlays, a thumbnail and a card PNG per concept (Eq. 12).

    Returns ``{concept: {"card", "thumb", "top_images": [{"image", "overlay", "label",
    "presence"}]}}`` with file paths under ``folder``.
    """
    from fact_model.figures import composite_rgba, fig_concept_card, save_figure

    folder = Path(folder)
    layer = stats.layer
    classes = class_names(dataset, int(stats.label_mass.shape[1]))
    out: dict[int, dict[str, Any]] = {}
    for c in tqdm(list(concepts), desc=f"concept cards {layer}", disable=not progress):
        ids = [i for i in stats.top_images[c, :per_concept].tolist() if i >= 0]
        if not ids:
            continue
        items = [dataset[i] for i in ids]
        keep = [(x, y, i) for x, y, i in items if x is not None]
        if not keep:
            continue
        x = torch.stack([k[0] for k in keep])
        x = x.to(device) if device is not None else x
        att = concept_attributions(model, x, [[c]] * len(keep), layer=layer)
        rgba = bcos_layers.explanation_rgba(x, att.weights[:, 0], smooth=3)
        tops, imgs, overlays = [], [], []
        for j, (xi, y, i) in enumerate(keep):
            img = rgb_uint8(xi)
            ov = _rgba_uint8(rgba[j])
            tops.append(
                {
                    "image": _save_png(img, folder / f"img_{i}.png"),
                    "overlay": _save_png(ov, folder / f"att_{layer}_{c}_{i}.png"),
                    "label": classes[int(y)],
                    "presence": float(att.value[j, 0]),
                }
            )
            imgs.append(img)
            overlays.append(rgba[j].cpu().numpy())
        thumb = (composite_rgba(overlays[0]) * 255).round().astype(np.uint8)
        name = names[c] if names is not None and c < len(names) and names[c] else None
        # A name is a vocabulary word shown as is: "$" would start matplotlib mathtext.
        title = concept_id(layer, c) + (" · " + name.replace("$", r"\$") if name else "")
        extra = {"frequency": float(stats.frequency[c])}
        if math.isfinite(float(stats.entropy[c])):
            extra["entropy"] = float(stats.entropy[c])
        fig = fig_concept_card(
            imgs, overlays, [t["label"] for t in tops], [t["presence"] for t in tops], title,
            c2=None if c2 is None else c2.get(c), extra=extra,
        )  # fmt: skip
        out[c] = {
            "card": str(save_figure(fig, folder / f"card_{layer}_{c}.png")),
            "thumb": _save_png(thumb, folder / f"thumb_{layer}_{c}.png"),
            "top_images": tops,
        }
    return out


def explanation_pictures(
    model: FaCT,
    dataset: IndexedImages,
    indices: Sequence[int],
    folder: str | os.PathLike[str],
    *,
    layer: str | None = None,
    top: int = 6,
    device: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Explain images (Eq. 9 for the predicted class) and render each as a figure; returns one
    dict per image with the exact numbers and picture paths."""
    from fact_model.figures import fig_explanation, save_figure

    folder = Path(folder)
    layer = layer or model.layers[-1]
    classes = class_names(dataset, model.num_classes)
    results = []
    for i in tqdm(list(indices), desc=f"explanations {layer}", disable=not progress):
        x, y, _ = dataset[i]
        if x is None:
            continue
        x = x[None].to(device) if device is not None else x[None]
        exp = concept_contributions(model, x, layer=layer)
        contrib = exp.contributions[0, 0]
        order = contrib.abs().argsort(descending=True)[:top]
        order = order[contrib[order] != 0]
        ids = order.tolist()
        att = (
            concept_attributions(model, x.expand(1, -1, -1, -1), [ids], layer=layer)
            if ids
            else None
        )
        thumbs, overlays = [], []
        if att is not None:
            rgba = bcos_layers.explanation_rgba(
                x[0].expand(len(ids), -1, -1, -1), att.weights[0], smooth=3
            )
            for j, c in enumerate(ids):
                thumbs.append(rgba[j].cpu().numpy())
                overlays.append(
                    _save_png(_rgba_uint8(rgba[j]), folder / f"expl_{layer}_{i}_{c}.png")
                )
        pred = int(exp.targets[0, 0])
        shown = float(contrib[order].sum()) if ids else 0.0
        other = float(contrib.sum()) - shown
        img = rgb_uint8(x[0])
        fig = fig_explanation(
            img, classes[pred], float(exp.logits[0, 0]), exp.bias, float(exp.completeness_error[0, 0]),
            [(concept_id(layer, c), float(contrib[c])) for c in ids], thumbs, other=other,
        )  # fmt: skip
        expl_rgba = bcos_layers.explain(model, x).weights  # the B-cos explanation of the logit
        overlay = _rgba_uint8(bcos_layers.explanation_rgba(x[0], expl_rgba[0], smooth=3))
        results.append(
            {
                "index": int(i),
                "id": f"{layer}:image-{i}",
                "image": _save_png(img, folder / f"img_{i}.png"),
                "overlay": _save_png(overlay, folder / f"bcos_{i}.png"),
                "label": classes[int(y)],
                "predicted": classes[pred],
                "correct": int(y) == pred,
                "logit": float(exp.logits[0, 0]),
                "bias": float(exp.bias),
                "completeness_error": abs(float(exp.completeness_error[0, 0])),
                "layer": layer,
                "figure": str(save_figure(fig, folder / f"explanation_{layer}_{i}.png")),
                "other": other,
                "contributions": [
                    {
                        "concept": concept_id(layer, c),
                        "value": float(contrib[c]),
                        "overlay": overlays[j],
                    }
                    for j, c in enumerate(ids)
                ],
            }
        )
    return results


def build_model_atlas(
    model: FaCT,
    dataset: IndexedImages,
    out_dir: str | os.PathLike[str],
    *,
    indices: Sequence[int] | None = None,
    explain_indices: Sequence[int] | None = None,
    n_explained: int = 12,
    explain_top: int = 6,
    top_k: int = 8,
    max_concepts: int = 200,
    stats: Mapping[str, ConceptStats] | None = None,
    c2: Mapping[str, Mapping[int, float]] | None = None,
    concept_names: Mapping[str, Sequence[str]] | None = None,
    name_scores: Mapping[str, Sequence[float]] | None = None,
    summary: Mapping[str, Any] | None = None,
    title: str = "FaCT concept atlas",
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Statistics, cards and explanations of every decomposed layer, as a browsable atlas;
    returns the path of its ``index.html``.

    ``stats`` / ``c2`` may pass results computed before (per layer); otherwise the statistics
    are computed on ``indices``. Concepts with cards: the ``max_concepts`` most frequent alive
    ones per layer, plus every concept an explanation lists (its ``explain_top`` largest
    contributions). Explained images: ``explain_indices`` or the first ``n_explained`` of
    ``indices``, misclassified ones first. ``concept_names`` / ``name_scores``: per layer, a
    name and its score for every concept (e.g. :func:`fact_model.naming.load_names` of the
    ``names_<layer>.json`` of ``fact stats``); a name is the concept's title on the list and
    its page, the score a statistic on its page.
    """
    from fact_model.atlas import build_atlas

    idx = list(range(len(dataset))) if indices is None else list(indices)
    classes = class_names(dataset, model.num_classes)
    layer_stats = dict(stats or {})
    concepts_spec: list[dict[str, Any]] = []
    explanations: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fact-atlas-") as tmp:
        root = Path(tmp)
        if explain_indices is None:
            explain_indices = _pick_explained(model, dataset, idx, n_explained, batch_size, device)
        for layer in model.layers:
            fresh = layer not in layer_stats
            if fresh:  # spatial extents below, for the concepts that get a card only
                layer_stats[layer] = concept_statistics(
                    LayerConcepts(model, layer), dataset, indices=idx, top_k=top_k,
                    extent_images=0, batch_size=batch_size, device=device, progress=progress,
                )  # fmt: skip
            st = layer_stats[layer]
            exps = explanation_pictures(
                model, dataset, explain_indices, root, layer=layer, device=device, progress=progress
            )
            explanations += exps
            alive = torch.nonzero(~st.dead)[:, 0]
            order = alive[st.frequency[alive].argsort(descending=True)][:max_concepts].tolist()
            needed = {int(c["concept"].split(":")[-1]) for e in exps for c in e["contributions"]}
            chosen = list(dict.fromkeys(order + sorted(needed - set(order))))
            if fresh:
                keep = torch.full_like(st.top_images, -1)
                keep[chosen] = st.top_images[chosen]
                extent = spatial_extent(
                    LayerConcepts(model, layer),
                    dataset,
                    keep,
                    per_concept=3,
                    device=device,
                    progress=progress,
                )
                st = st._replace(spatial_extent=extent)
                layer_stats[layer] = st
            names = (concept_names or {}).get(layer)
            pics = concept_pictures(
                model, dataset, st, chosen, root, c2=(c2 or {}).get(layer), names=names,
                per_concept=top_k, device=device, progress=progress,
            )  # fmt: skip
            scores = (name_scores or {}).get(layer)
            for c in chosen:
                p = pics.get(c, {})
                name = names[c] if names is not None and c < len(names) and names[c] else None
                extra = {}
                if name is not None and scores is not None and c < len(scores):
                    extra["name score (soft-WPMI)"] = float(scores[c])
                concepts_spec.append(
                    {
                        "id": concept_id(layer, c),
                        "layer": layer,
                        "index": int(c),
                        "name": name,
                        "frequency": float(st.frequency[c]),
                        "c2": (c2 or {}).get(layer, {}).get(c),
                        "entropy": _finite(st.entropy[c]),
                        "spatial_extent": _finite(st.spatial_extent[c]),
                        "top_classes": [classes[k] for k in st.top_classes(c)],
                        "card": p.get("card"),
                        "thumb": p.get("thumb"),
                        "top_images": p.get("top_images", []),
                        "extra": extra,
                    }
                )
        spec = {
            "title": title,
            "subtitle": f"{model.spec.name if model.spec else type(model.backbone).__name__} with concept layers {', '.join(model.layers)}",
            "root": str(root),
            "classes": list(classes),
            "layers": [
                {"name": layer, "n_concepts": model.layer_info(layer).n_latents}
                for layer in model.layers
            ],
            "concepts": concepts_spec,
            "explanations": [{k: v for k, v in e.items() if k != "index"} for e in explanations],
            "summary": {
                **{f"{layer} concepts": layer_stats[layer].summary() for layer in model.layers},
                **dict(summary or {}),
            },
        }
        return build_atlas(spec, out_dir, overwrite=overwrite)


def _finite(v: Tensor) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _pick_explained(
    model: FaCT, dataset: IndexedImages, idx: list[int], n: int, batch_size: int, device: Any
) -> list[int]:
    """The first ``n`` images of ``idx``, misclassified ones first (they are the interesting ones)."""
    from fact_model.data import image_loader, iterate

    wrong, right = [], []
    for batch in iterate(
        image_loader(dataset, batch_size=batch_size, indices=idx[: max(4 * n, n)])
    ):
        x = batch.images.to(device) if device is not None else batch.images
        with torch.no_grad():
            pred = model(x).argmax(1).cpu()
        for i, ok in zip(batch.indices.tolist(), (pred == batch.labels).tolist()):
            (right if ok else wrong).append(i)
    head = max(1, n // 3)
    return (wrong[:head] + right + wrong[head:])[:n]
