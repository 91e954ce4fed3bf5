"""The analysis steps of ``fact demo`` (statistics, C2, deletion, ground truth, figures).

Each step takes the trained FaCT model and the test split of the concept world and returns a
JSON-able result; :mod:`fact_model.demo` runs them resumably.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bcos_layers
from fact_model.concepts import LayerConcepts
from fact_model.consistency import c2_score, deletion
from fact_model.data import IndexedImages
from fact_model.model import FaCT
from fact_model.stats import ConceptStats, concept_statistics

__all__ = [
    "c2_step",
    "deletion_step",
    "figures_step",
    "ground_truth_for",
    "groundtruth_step",
    "pick_step",
    "stats_step",
]


def stats_step(
    model: FaCT, test: IndexedImages, layer: str, cfg: Any, device: Any, progress: bool, out: Path
) -> ConceptStats:
    """Concept statistics of ``layer`` on the first ``cfg.stats_images`` test images (cached)."""
    path = out / "steps" / f"stats_{layer}.safetensors"
    if path.is_file():
        return ConceptStats.load(path)
    st = concept_statistics(
        LayerConcepts(model, layer), test, indices=range(min(cfg.stats_images, len(test))), top_k=8,
        extent_images=3, batch_size=128, device=device, progress=progress,
    )  # fmt: skip
    st.save(path)
    return st


def c2_step(
    model: FaCT, test: IndexedImages, world: Any, cfg: Any, device: Any, progress: bool
) -> dict[str, Any]:
    """C2 (Eq. 16) with the oracle backbone on one-hot ground-truth features: FaCT concepts and
    B-cos channels at each layer, on the first ``cfg.c2_images`` test images."""
    import c2score

    n = min(cfg.c2_images, len(test))
    out: dict[str, Any] = {
        "fact": {},
        "channels": {},
        "images": n,
        "features": "one-hot ground-truth concept masks (oracle)",
    }
    for layer in model.layers:
        for kind, key in (("sae", "fact"), ("channels", "channels")):
            res = c2_score(
                LayerConcepts(model, layer, kind), test, world.oracle_extractor("test", 0),
                indices=list(range(n)), config=c2score.EvalConfig(progress=progress), batch_size=128, device=device,
            )  # fmt: skip
            out[key][layer] = {
                "c2": res.c2,
                "mean_consistency": res.mean_consistency,
                "baseline": res.baseline_mean,
                "n_scored": len(res.concept_ids),
                "per_concept": {str(c): v for c, v in zip(res.concept_ids, res.consistency)},
            }
    return out


def deletion_step(
    model: FaCT, test: IndexedImages, cfg: Any, device: Any, progress: bool, out: Path
) -> dict[str, Any]:
    """Concept deletion (App. F) at each layer: exact contributions vs saliency, Sobol, random."""
    import concept_deletion

    result: dict[str, Any] = {"auc": {}, "auc_accuracy": {}, "curves": {}}
    n_classes = model.num_classes
    for layer in model.layers:
        pcfg = concept_deletion.ProtocolConfig(
            n_classes=n_classes,
            per_class=cfg.deletion_per_class,
            seed=0,
            comparison=concept_deletion.ComparisonConfig(
                measures=("contribution", "saliency", "sobol", "random"),
                schedule="geometric",
                n_steps=30,
            ),
        )
        curves = deletion(
            LayerConcepts(model, layer),
            test,
            out / "deletion" / layer,
            pcfg,
            device=device,
            progress=progress,
        )
        result["auc"][layer] = {c.measure.split("/")[0]: c.auc_score for c in curves}
        result["auc_accuracy"][layer] = {c.measure.split("/")[0]: c.auc_accuracy for c in curves}
        result["curves"][layer] = {
            c.measure.split("/")[0]: {
                "fractions": c.fractions.tolist(),
                "logit": c.mean_score.tolist(),
                "accuracy": None if c.accuracy is None else c.accuracy.tolist(),
            }
            for c in curves
        }
    return result


def ground_truth_for(
    concepts: Any, test: IndexedImages, world: Any, n: int, device: Any
) -> dict[str, Any]:
    """Ground-truth recovery of one concept set on the first ``n`` test images of ``world``
    (``test`` must be its test split from image 0): every true concept's best-matching learned
    concept (image-level AUROC of the presence), the mass of that concept's input attribution
    inside the true mask and its pixel AUROC, the fraction recovered (``report.to_dict``)."""
    from fact_model.world.groundtruth import ground_truth_report, localisation_pairs, match_concepts

    n = min(n, len(test))
    samples = [world.sample(i, "test") for i in range(n)]
    present = np.stack([s.present for s in samples])
    masks = [s.masks for s in samples]
    x_all = torch.stack([test[i][0] for i in range(n)])
    pres = torch.cat(
        [concepts.presence(x_all[s : s + 128].to(device)).cpu() for s in range(0, n, 128)]
    )
    matching = match_concepts(pres.double().numpy(), present)
    images, true_ids = localisation_pairs(matching, present, per_concept=8)
    learned = matching.learned[true_ids]
    maps = _maps(concepts, x_all, images.tolist(), learned.tolist(), device)
    report = ground_truth_report(matching, present, images, true_ids, maps.numpy(), masks)
    return report.to_dict(world.concept_names)


def groundtruth_step(
    model: FaCT, test: IndexedImages, world: Any, cfg: Any, device: Any, progress: bool
) -> dict[str, Any]:
    """Ground truth ImageNet cannot give (:func:`ground_truth_for`) for FaCT concepts and
    B-cos channels at every layer; learned concepts that match a true one well get its name."""
    n = min(cfg.stats_images, len(test))
    out: dict[str, Any] = {
        "layers": {},
        "channels": {},
        "true_concepts": world.concept_names,
        "names": {},
    }
    for layer in model.layers:
        for kind, key in (("sae", "layers"), ("channels", "channels")):
            concepts = LayerConcepts(model, layer, kind)
            out[key][layer] = ground_truth_for(concepts, test, world, n, device)
            if kind == "sae":
                names: list[str | None] = [None] * concepts.n_concepts
                ranked = sorted(
                    (
                        m
                        for m in out[key][layer]["matches"]
                        if m["learned"] is not None and m["auroc"] is not None
                    ),
                    key=lambda m: -m["auroc"],
                )
                for m in ranked:  # a learned concept is named after its best true concept
                    if m["auroc"] >= 0.85 and names[m["learned"]] is None:
                        names[m["learned"]] = f"~{m['name']} (AUROC {m['auroc']:.2f})"
                out["names"][layer] = names
    return out


def _maps(
    concepts: Any, x_all: torch.Tensor, images: list[int], ids: list[int], device: Any
) -> torch.Tensor:
    """Eq. 12 maps of concept ``ids[j]`` on image ``images[j]`` -> (P, H, W)."""
    maps = []
    for s in range(0, len(images), 64):
        x = x_all[images[s : s + 64]].to(device)
        c = torch.tensor(ids[s : s + 64], device=x.device)[:, None]
        maps.append(concepts.attributions(x, c).attributions[:, 0].detach().cpu())
    return torch.cat(maps) if maps else torch.empty(0)


def pick_step(
    model: FaCT, test: IndexedImages, world_config: Any, n: int, search: int, device: Any
) -> dict[str, Any]:
    """The test images to explain: the first one the FaCT model (every SAE in place)
    misclassifies, then the first correctly classified ones (``n`` in all).

    A well-trained model may classify the whole test split correctly; the search then goes on
    through further test images of the world (same split, indices past ``len(test)``, never
    seen in training) up to ``search`` images, in chunks, so memory stays bounded."""
    from fact_model.data import image_loader, iterate
    from fact_model.world_source import WorldImages

    right: list[int] = []
    wrong: int | None = None
    chunk, start = test, 0
    while True:
        for batch in iterate(image_loader(chunk, batch_size=256)):
            with torch.no_grad():
                pred = model(batch.images.to(device)).argmax(1).cpu()
            for i, ok in zip(batch.indices.tolist(), (pred == batch.labels).tolist()):
                if ok and len(right) < n:
                    right.append(start + i)
                elif not ok and wrong is None:
                    wrong = start + i
            if wrong is not None and len(right) >= n:
                break
        start += len(chunk)
        size = min(2000, search - start)
        if wrong is not None or size <= 0:
            break
        chunk = IndexedImages(
            WorldImages("test", size, start=start, config=world_config), test.transform
        )
    indices = ([] if wrong is None else [wrong]) + right
    return {"indices": indices[:n], "misclassified": wrong, "searched": start}


def figures_step(
    model: FaCT,
    test: IndexedImages,
    trained: dict[str, Any],
    ev: dict[str, Any],
    deletion_result: dict[str, Any],
    cfg: Any,
    device: Any,
    progress: bool,
    out: Path,
    explained: list[int],
) -> dict[str, Any]:
    """Explanation, cross-layer, misclassification, deletion and accuracy-vs-sparsity figures
    (``explained``: the images to explain, from :func:`pick_step`)."""
    from fact_model.explain import concept_attributions, cross_layer_contributions
    from fact_model.figures import (
        fig_accuracy_vs_sparsity,
        fig_cross_layer,
        fig_deletion_curves,
        fig_misclassification,
        percent_of_positive,
        save_figure,
    )
    from fact_model.misclassification import compare_classes
    from fact_model.report import explanation_pictures

    fig_dir = out / "figures"
    files: dict[str, str] = {}
    names = test.classes
    late = model.layers[-1]
    exps = explanation_pictures(
        model,
        test,
        explained[:3],
        fig_dir / "explanations",
        layer=late,
        device=device,
        progress=progress,
    )
    for e in exps:
        files[f"explanation_{e['index']}{'' if e['correct'] else '_misclassified'}"] = e["figure"]

    # Cross-layer view (Fig. 1): the top late concept of the first explained image, in early concepts.
    if len(model.layers) >= 2:
        early = model.layers[0]
        x = test[explained[0]][0][None].to(device)
        top_late = (
            int(torch.tensor([c["value"] for c in exps[0]["contributions"]]).argmax())
            if exps[0]["contributions"]
            else 0
        )
        late_c = (
            int(exps[0]["contributions"][top_late]["concept"].split(":")[-1])
            if exps[0]["contributions"]
            else 0
        )
        cl = cross_layer_contributions(model, x, [[late_c]], early=early, late=late)
        contrib = cl.contributions[0, 0]
        order = contrib.abs().argsort(descending=True)[:6]
        order = order[contrib[order] != 0]
        ids = order.tolist()
        att_e = concept_attributions(model, x, [ids], layer=early) if ids else None
        att_l = concept_attributions(model, x, [[late_c]], layer=late)
        rgba_l = bcos_layers.explanation_rgba(x[0], att_l.weights[0, 0], smooth=3).cpu().numpy()
        thumbs = []
        if att_e is not None:
            rgba_e = bcos_layers.explanation_rgba(
                x[0].expand(len(ids), -1, -1, -1), att_e.weights[0], smooth=3
            )
            thumbs = [r.cpu().numpy() for r in rgba_e]
        fig = fig_cross_layer(
            f"{late}:{late_c}", float(cl.presence[0, 0]), [(f"{early}:{c}", float(contrib[c])) for c in ids],
            rgba_l, thumbs, float(cl.completeness_error[0, 0]), other=float(contrib.sum() - contrib[order].sum()),
        )  # fmt: skip
        files["cross_layer"] = str(save_figure(fig, fig_dir / "cross_layer.png"))

    # Misclassification (Fig. 8): the first misclassified image, true vs predicted class.
    wrong = [e for e in exps if not e["correct"]]
    if wrong:
        i = wrong[0]["index"]
        x, y, _ = test[i]
        x = x[None].to(device)
        pred = names.index(wrong[0]["predicted"])
        comp = compare_classes(model, x, int(y), pred, layer=late, top=6)
        from fact_model.explain import concept_contributions

        full = concept_contributions(model, x, [[int(y), pred]], layer=late).contributions[0]
        pa = percent_of_positive(full[0].numpy())[comp.concepts]
        pb = percent_of_positive(full[1].numpy())[comp.concepts]
        att = concept_attributions(model, x, [comp.concepts], layer=late) if comp.concepts else None
        thumbs = []
        if att is not None:
            rgba = bcos_layers.explanation_rgba(
                x[0].expand(len(comp.concepts), -1, -1, -1), att.weights[0], smooth=3
            )
            thumbs = [r.cpu().numpy() for r in rgba]
        fig = fig_misclassification(
            [f"{late}:{c}" for c in comp.concepts],
            pa.tolist(),
            pb.tolist(),
            names[int(y)],
            names[pred],
            thumbs,
        )
        files["misclassification"] = str(save_figure(fig, fig_dir / "misclassification.png"))

    # Deletion curves (Fig. 7) per layer.
    for layer, curves in deletion_result["curves"].items():
        fig = fig_deletion_curves(
            {m: (c["fractions"], c["logit"]) for m, c in curves.items()},
            deletion_result["auc"][layer],
            "target logit",
            f"concept deletion, {layer}",
        )
        files[f"deletion_{layer}"] = str(save_figure(fig, fig_dir / f"deletion_{layer}.png"))

    # Accuracy vs sparsity of every SAE of the sweeps (held-out accuracy vs feature-level L0).
    points = []
    for layer, rep in trained["reports"].items():
        chosen = rep["layers"][layer]["selected"][0]["name"]
        for r in rep["layers"][layer]["runs"]:
            if r["error"] is None and r["l0"] and math.isfinite(r["heldout_top1"]):
                points.append(
                    {
                        "name": r["name"],
                        "l0": r["l0"],
                        "accuracy": r["heldout_top1"],
                        "layer": layer,
                        "selected": r["name"] == chosen,
                    }
                )
    if points:
        fig = fig_accuracy_vs_sparsity(
            points,
            baseline_accuracy=trained["reports"][model.layers[-1]]["layers"][model.layers[-1]][
                "bcos_heldout_top1"
            ],
        )
        files["accuracy_vs_sparsity"] = str(save_figure(fig, fig_dir / "accuracy_vs_sparsity.png"))
    return {"files": files, "explained_indices": explained}
