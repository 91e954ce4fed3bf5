"""The ``fact`` command line: one subcommand per step of the method.

    fact features  --backbone NAME --layer L --dataset SPEC --out DIR     (App. A, Eq. A.1)
    fact train     --backbone NAME --layer L [--layer L2] --dataset SPEC --out DIR
    fact evaluate  MODEL --dataset SPEC                                  (Sec. 5.1, App. B)
    fact explain   MODEL IMAGE [--out DIR]                               (Eq. 9, Eq. 12)
    fact stats     MODEL --dataset SPEC --out DIR                        (App. D)
                   [--clip-model SPEC --vocabulary FILE]                 (names, Sec. 5.3)
    fact atlas     MODEL --dataset SPEC --out DIR [--names DIR]          (browsable concepts)
    fact demo      [--out DIR] [--fast]                                  (the whole method)
    fact compare   {c2,deletion} MODEL --out DIR [--dataset ...]          (the paper's tables)

Datasets: ``imagefolder:PATH``, ``hf:NAME[:SPLIT]``, ``hf-disk:PATH[:SPLIT]``, ``world[:SPLIT]``
(the embedded concept world). Exit codes: 0 success, 1 failure (the message says why),
2 bad command line, 130 interrupted (everything finished so far is kept; rerun to resume).

Several GPUs: ``torchrun --nproc-per-node N -m fact_model.cli features|train|evaluate|stats
... --device cuda`` splits the work across the ranks (one GPU each) with the single-process
result; the other commands run in one process (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


# ----------------------------------------------------------------------------- helpers
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps (default cpu)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per pass (default 64)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image-decoding worker processes per pass (default: $FACT_DATA_WORKERS or 0); "
        "on GPUs use several, JPEG decoding in one process caps a pass at a few hundred images/s",
    )


def _add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="bcos_layers model name, e.g. resnet50_long")
    w = p.add_mutually_exclusive_group()
    w.add_argument(
        "--pretrained",
        action="store_true",
        help="official B-cos-v2 weights (downloaded, hash-checked)",
    )
    w.add_argument(
        "--weights",
        type=Path,
        help="local backbone weights (.safetensors, converted dir, or official .pth)",
    )
    p.add_argument(
        "--backbone-kwargs",
        default="{}",
        help="constructor overrides as JSON, e.g. '{\"num_classes\": 10}'",
    )


def _backbone(args: argparse.Namespace) -> Any:
    import bcos_layers
    from fact_model.model import BackboneSpec

    try:
        kwargs = json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--backbone-kwargs is not valid JSON: {err}") from err
    if not isinstance(kwargs, dict):
        raise ValueError("--backbone-kwargs must be a JSON object")
    pretrained: Any = True if args.pretrained else (args.weights or False)
    if not pretrained:
        import torch

        # A randomly initialised backbone is a function of --seed: reruns, resumes and the
        # ranks of a torchrun job all build the same network.
        torch.manual_seed(args.seed)
    model = bcos_layers.create(args.backbone, pretrained=pretrained, **kwargs)
    model.fact_backbone_spec = BackboneSpec(args.backbone, kwargs, official=bool(args.pretrained))
    return model.to(args.device).eval()


def _dataset(spec: str, model: Any, split: str | None = None) -> Any:
    from fact_model.data import IndexedImages, eval_transform_for, open_dataset

    return IndexedImages(open_dataset(spec, split=split), eval_transform_for(model))


def _limit(dataset: Any, limit: int | None, seed: int) -> list[int] | None:
    if limit is None or limit >= len(dataset):
        return None
    import numpy as np

    return sorted(
        np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False).tolist()
    )


def _load_model(path: str, device: str) -> Any:
    from fact_model import FaCT

    return FaCT.from_pretrained(path).to(device).eval()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ----------------------------------------------------------------------------- commands
def cmd_features(args: argparse.Namespace) -> int:
    from fact_model.features import FeatureConfig, extract_features
    from fact_model.splice import find_module

    backbone = _backbone(args)
    find_module(backbone, args.layer)  # a wrong layer name fails before any data is read
    data = _dataset(args.dataset, backbone)
    cfg = FeatureConfig(
        layer=args.layer,
        samples_per_image=args.samples_per_image,
        budget_bytes=int(args.budget_gb * 1e9),
        heldout_per_class=args.heldout_per_class,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        autocast_bf16=args.bf16,
    )
    fs = extract_features(
        backbone,
        data,
        args.out,
        cfg,
        device=args.device,
        progress=not args.no_progress,
        describe=args.dataset,
    )
    print(
        f"feature set {fs.root}: {fs.train.num_rows} training vectors, "
        f"{fs.heldout.num_rows if fs.heldout else 0} held-out, M={fs.provenance['samples_per_image']} "
        f"of {fs.provenance['positions']} positions, {fs.skipped['skipped']} unreadable images skipped"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fact_model.pipeline import SweepGrid, TrainSettings, paper_grid, train_fact
    from fact_model.splice import find_module
    from topk_sae import TrainConfig

    backbone = _backbone(args)
    for layer in args.layer:
        find_module(backbone, layer)
    data = _dataset(args.dataset, backbone)
    grids = {}
    for layer in args.layer:
        default = paper_grid(args.backbone, layer) or SweepGrid()
        grids[layer] = SweepGrid(
            tuple(args.k or default.k),
            tuple(args.n_latents or default.n_latents),
            tuple(args.lr or default.lr),
        )
    settings = TrainSettings(
        features={
            "samples_per_image": args.samples_per_image,
            "budget_bytes": int(args.budget_gb * 1e9),
            "heldout_per_class": args.heldout_per_class,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "autocast_bf16": args.bf16,
        },
        sae=TrainConfig(
            n_latents=grids[args.layer[0]].n_latents[0],
            k=grids[args.layer[0]].k[0],
            epochs=args.epochs,
            seed=args.seed,
            init=args.init,
            autocast_bf16=args.bf16,
            device=args.device,
        ),
        sae_batch_size=args.sae_batch_size,
        image_batch_size=args.batch_size,
        parallel=args.parallel,
    )
    _, report = train_fact(
        backbone, data, args.layer, args.out, grids=grids, settings=settings, dataset_name=args.dataset,
        device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    ev = report["heldout_evaluation"]
    print(f"B-cos held-out top-1 {100 * ev['bcos']['top1']:.2f}%")
    for layer, r in ev["layers"].items():
        print(
            f"FaCT {layer}: top-1 {100 * r['top1']:.2f}%, L0 {r['mean_l0']:.1f}, 80% cover {r['mean_cover80']:.1f}"
        )
    print(f"model saved to {Path(args.out) / 'model'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fact_model.evaluation import evaluate

    model = _load_model(args.model, args.device)
    data = _dataset(args.dataset, model)
    res = evaluate(
        model,
        data,
        indices=_limit(data, args.limit, args.seed),
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    out = res.to_dict()
    if args.json and _is_main():
        from fact_model._atomic import atomic_write_json

        atomic_write_json(args.json, out)
    _print_json(out)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from PIL import Image

    import bcos_layers
    from fact_model._atomic import atomic_write_json
    from fact_model.explain import concept_attributions, concept_contributions

    model = _load_model(args.model, args.device)
    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            x = model.transform(img.convert("RGB"))[None].to(args.device)
    except OSError as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from err
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    out = Path(args.out) if args.out else None
    result: dict[str, Any] = {"image": str(path), "layers": {}}
    for layer in [args.layer] if args.layer else list(model.layers):
        exp = concept_contributions(model, x, args.target, layer=layer)
        cls = int(exp.targets[0, 0])
        top = exp.top(args.top)[0]
        err = float(exp.completeness_error[0, 0])
        logit = float(exp.logits[0, 0])
        print(
            f"[{layer}] class {cls} ({names[cls]}): logit {logit:.4f} = sum of {int((exp.contributions[0, 0] != 0).sum())} concept contributions {float(exp.contributions[0, 0].sum()):.4f} + bias {exp.bias:.4f}"
        )
        print(f"  completeness error {err:.3e}")
        for rank, (concept, value) in enumerate(top, 1):
            print(
                f"  {rank:2d}. concept {concept:6d}  contribution {value:+.4f}  presence {float(exp.presence[0, concept]):.4f}"
            )
        entry = {"class": cls, "class_name": names[cls], "logit": logit, "bias": exp.bias, "completeness_error": err,
                 "top": [{"concept": c, "contribution": v} for c, v in top]}  # fmt: skip
        if out is not None:
            ids = [c for c, _ in top]
            att = concept_attributions(model, x, [ids], layer=layer)
            rgba = bcos_layers.explanation_rgba(
                x[0].expand(len(ids), -1, -1, -1), att.weights[0], smooth=3
            )
            files = []
            for j, c in enumerate(ids):
                f = out / f"{path.stem}_{layer}_concept{c}.png"
                bcos_layers.save_explanation_png(rgba[j], f)
                files.append(str(f))
            entry["attribution_pngs"] = files
            entry["attribution_completeness_error"] = [float(e) for e in att.completeness_error[0]]
            try:
                from fact_model.figures import fig_explanation, save_figure

                shown = sum(v for _, v in top)
                fig = fig_explanation(
                    x[0, :3].permute(1, 2, 0).cpu().numpy(), names[cls], logit, exp.bias, err,
                    [(f"concept {c}", v) for c, v in top], [r.cpu().numpy() for r in rgba],
                    other=float(exp.contributions[0, 0].sum()) - shown,
                )  # fmt: skip
                fig_path = save_figure(fig, out / f"{path.stem}_{layer}_explanation.png")
                entry["figure"] = str(fig_path)
            except ImportError:
                pass
        result["layers"][layer] = entry
    if out is not None:
        atomic_write_json(out / f"{path.stem}_explanation.json", result)
        print(f"pictures and JSON written to {out}")
    return 0


def _naming_words(args: argparse.Namespace) -> list[str] | None:
    """The vocabulary when ``fact stats`` names concepts (``None`` when it does not); checks
    the naming options before the long statistics pass, so that bad input fails at once."""
    from fact_model.naming import check_clip_spec, read_vocabulary

    if args.clip_model is None and args.vocabulary is None:
        for flag, value in (
            ("--probe-dataset", args.probe_dataset),
            ("--name-top-k", args.name_top_k),
        ):
            if value is not None:
                raise ValueError(
                    f"{flag} is a naming option: give --clip-model and --vocabulary too"
                )
        return None
    if args.vocabulary is None:
        raise ValueError("--clip-model needs --vocabulary FILE (one word or phrase per line)")
    if args.clip_model is None:
        raise ValueError(
            "--vocabulary needs --clip-model (a transformers CLIP folder, open_clip:DIR or "
            "open_clip:ARCH:FILE)"
        )
    if args.name_top_k is not None and args.name_top_k < 1:
        raise ValueError(f"--name-top-k must be >= 1, got {args.name_top_k}")
    words = read_vocabulary(args.vocabulary)
    check_clip_spec(args.clip_model)
    return words


def _name_layers(
    args: argparse.Namespace, model: Any, data: Any, layers: list[str], words: list[str],
    summaries: dict[str, dict[str, Any]], out: Path,
) -> None:  # fmt: skip
    """CLIP-Dissect names of every layer's concepts: ``names_<layer>.json`` and the names in
    ``stats_<layer>.json`` (rank 0 only: no collective operation runs here)."""
    from fact_model._atomic import atomic_write_json
    from fact_model.concepts import LayerConcepts
    from fact_model.naming import check_clip_spec, load_clip, name_concepts, save_names

    clip, processor = load_clip(args.clip_model, device=args.device)
    if args.probe_dataset is None:
        probe, indices, probe_spec = data, _limit(data, args.limit, args.seed), args.dataset
    else:
        probe, indices, probe_spec = _dataset(args.probe_dataset, model), None, args.probe_dataset
    top_k = 100 if args.name_top_k is None else args.name_top_k
    meta = {
        "clip_model": args.clip_model,
        "clip_model_resolved": check_clip_spec(args.clip_model),
        "vocabulary": str(Path(args.vocabulary).expanduser().resolve()),
        "n_words": len(words),
        "probe_dataset": probe_spec,
        "probe_images": len(probe) if indices is None else len(indices),
        "top_k": top_k,
    }
    for layer in layers:
        res = name_concepts(
            LayerConcepts(model, layer, kind=args.kind), probe, words, clip, processor,
            indices=indices, batch_size=args.batch_size, device=args.device,
            progress=not args.no_progress, top_k=top_k,
        )  # fmt: skip
        names_file = out / f"names_{layer}.json"
        save_names(names_file, res, layer=layer, kind=args.kind, meta=meta)
        summary = {
            **summaries[layer],
            "naming": {**meta, "file": names_file.name},
            "concept_names": [
                {"concept": c, "name": name, "score": float(score)}
                for c, (name, score) in enumerate(zip(res.names, res.scores.tolist()))
            ],
        }
        atomic_write_json(out / f"stats_{layer}.json", summary)
        shown = ", ".join(f"{c}: {n!r}" for c, n in enumerate(res.names[:5]))
        print(f"{layer}: {len(res.names)} concepts named ({shown}, ...); written to {names_file}")


def cmd_stats(args: argparse.Namespace) -> int:

    from fact_model._atomic import atomic_write_json
    from fact_model.concepts import LayerConcepts
    from fact_model.stats import concept_statistics

    words = _naming_words(args)
    model = _load_model(args.model, args.device)
    data = _dataset(args.dataset, model)
    out = Path(args.out)
    layers = [args.layer] if args.layer else list(model.layers)
    summaries: dict[str, dict[str, Any]] = {}
    for layer in layers:
        st = concept_statistics(
            LayerConcepts(model, layer, kind=args.kind), data, indices=_limit(data, args.limit, args.seed),
            top_k=args.top_k, extent_images=args.extent_images, batch_size=args.batch_size,
            device=args.device, progress=not args.no_progress,
        )  # fmt: skip
        summary = {
            **st.summary(),
            "layer": layer,
            "kind": args.kind,
            "n_images": st.n_images,
            "skipped": st.skipped,
        }
        summaries[layer] = summary
        if _is_main():  # under torchrun every rank holds the same statistics
            st.save(out / f"stats_{layer}.safetensors")
            atomic_write_json(out / f"stats_{layer}.json", summary)
        _print_json(summary)
    # Naming after every layer's statistics: the other ranks of a torchrun job are done then,
    # none waits in a collective while rank 0 runs CLIP.
    if words is not None and _is_main():
        _name_layers(args, model, data, layers, words, summaries, out)
    return 0


def _is_main() -> bool:
    from topk_sae import distributed as dist

    return dist.rank() == 0


def _atlas_names(
    paths: Sequence[str], model: Any
) -> tuple[dict[str, list[str]], dict[str, list[float]], dict[str, str]]:
    """Names, scores and a one-line provenance per layer from ``names_<layer>.json`` files
    (each path a file, or a folder holding them, e.g. the ``--out`` of ``fact stats``)."""
    from fact_model.naming import load_names

    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(p.glob("names_*.json"))
            if not found:
                raise FileNotFoundError(
                    f"--names {raw}: the folder holds no names_<layer>.json; write them with "
                    "fact stats MODEL --dataset ... --out DIR --clip-model ... --vocabulary ..."
                )
            files += found
        else:
            files.append(p)
    names: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    about: dict[str, str] = {}
    for f in files:
        rec = load_names(f)
        layer = rec["layer"]
        if layer not in model.layers:
            raise ValueError(
                f"{f} names concepts of layer {layer!r}, which this model does not decompose "
                f"(its layers: {', '.join(model.layers)}); were they made for another model?"
            )
        if rec["kind"] != "sae":
            raise ValueError(
                f"{f} names the B-cos channels of {layer} (fact stats --kind channels); the "
                "atlas shows the SAE concepts: rerun fact stats without --kind channels"
            )
        n = model.layer_info(layer).n_latents
        if len(rec["names"]) != n:
            raise ValueError(
                f"{f} has {len(rec['names'])} names but layer {layer} has {n} concepts; were "
                "they made for another model?"
            )
        if layer in names:
            raise ValueError(f"--names gives layer {layer!r} twice (the second time in {f})")
        names[layer], scores[layer] = rec["names"], [float(v) for v in rec["scores"]]
        about[layer] = f"{_short_clip(rec.get('clip_model'))}, {rec.get('n_words', '?')} words"
    return names, scores, about


def _short_clip(spec: Any) -> str:
    """A short name of a --clip-model spec for the atlas summary (its folder or architecture)."""
    if not isinstance(spec, str) or not spec:
        return "CLIP"
    if spec.startswith("open_clip:"):
        rest = spec[len("open_clip:") :]
        return "open_clip " + (Path(rest).name if Path(rest).is_dir() else rest.split(":", 1)[0])
    return Path(spec).name or spec


def cmd_atlas(args: argparse.Namespace) -> int:
    from fact_model.report import build_model_atlas

    model = _load_model(args.model, args.device)
    names, scores, about = _atlas_names(args.names or [], model)
    data = _dataset(args.dataset, model)
    path = build_model_atlas(
        model, data, args.out, indices=_limit(data, args.limit, args.seed), n_explained=args.explain,
        top_k=args.top_k, max_concepts=args.max_concepts, concept_names=names or None,
        name_scores=scores or None,
        summary={"concept names (CLIP-Dissect)": about} if about else None,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"atlas written: open {path} in a browser")
    return 0


def _crp_network(args: argparse.Namespace, num_classes: int) -> Any:
    """A standard torchvision network for CRP: ``--crp-model`` with ``--crp-weights``
    (a safetensors state dict, loaded strictly; never a pickle)."""
    if not args.crp_model:
        return None
    import torchvision
    from safetensors.torch import load_file

    if not args.crp_weights:
        raise ValueError("--crp-model needs --crp-weights (a safetensors state dict of it)")
    try:
        builder = torchvision.models.get_model_builder(args.crp_model)
    except ValueError as err:
        raise ValueError(f"--crp-model: {err}") from err
    net = builder(weights=None, num_classes=num_classes)
    net.load_state_dict(load_file(args.crp_weights), strict=True)
    return net.to(args.device).eval()


class _CrpInput:
    """The CRP network's input from the B-cos input: the RGB half, ImageNet-normalised."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        import torch

        x = self.transform(image)[:3]
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        return (x - mean) / std


def cmd_compare(args: argparse.Namespace) -> int:
    from fact_model.compare import compare_c2, compare_deletion, concept_sets
    from fact_model.data import IndexedImages
    from fact_model.world_source import WorldImages

    model = _load_model(args.model, args.device)
    data = _dataset(args.dataset, model)
    layer = args.layer or model.layers[-1]
    out = Path(args.out)
    methods = args.methods or (["fact", "channels", "craft"] + (["crp"] if args.crp_model else []))
    train = _dataset(args.train_dataset, model) if "craft" in methods else None
    sets = concept_sets(
        model, layer, methods, craft_train=train, craft_components=args.craft_components,
        craft_images_per_class=args.craft_images_per_class, craft_path=out / f"craft-{layer}",
        crp_model=_crp_network(args, model.num_classes), crp_layer=args.crp_layer,
        device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    indices = _limit(data, args.limit, args.seed)
    if args.table == "c2":
        world = data.source.world if isinstance(data.source, WorldImages) else None
        if world is not None and (data.source.split != "test" or data.source.start != 0):
            world = None  # ground truth is laid out for the test split from image 0
        if args.extractor == "oracle":
            if not isinstance(data.source, WorldImages):
                raise ValueError("--extractor oracle needs a concept-world dataset (world:...)")
            extractor = data.source.world.oracle_extractor(data.source.split, data.source.start)
        else:
            import c2score

            extractor = c2score.make_extractor(args.extractor, device=args.device)
        crp_data = IndexedImages(data.source, _CrpInput(data.transform)) if "crp" in sets else None
        table = compare_c2(
            sets, data, extractor, out, indices=indices, world=world, crp_dataset=crp_data,
            batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
        )  # fmt: skip
        for row in table["methods"].values():
            gt = row.get("groundtruth", {}).get("fraction_recovered")
            extra = "" if gt is None else f", {100 * gt:.0f}% of true concepts recovered"
            c2 = "n/a" if row["c2"] is None else f"{row['c2']:.3f}"
            print(f"{row['name']:<28s} C2 {c2} ({row['n_scored']} concepts scored{extra})")
    else:
        table = compare_deletion(
            sets, data, out, n_classes=model.num_classes, per_class=args.per_class,
            seed=args.seed, device=args.device, progress=not args.no_progress,
        )  # fmt: skip
        for row in table["methods"].values():
            aucs = ", ".join(
                f"{m} {v:.3f}" for m, v in sorted(row["auc"].items(), key=lambda kv: kv[1])
            )
            print(f"{row['name']:<28s} deletion AUC: {aucs}")
        for name, why in table["skipped"].items():
            print(f"{name}: skipped ({why})")
    print(f"written: {out / (args.table + '.json')}, {out / (args.table + '.png')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fact_model.demo import DemoConfig, run_demo

    cfg = DemoConfig.fast() if args.fast else DemoConfig()
    summary = run_demo(
        cfg,
        args.out,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(summary["text"])
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fact",
        description="FaCT: faithful concept traces -- B-cos networks with bias-free TopK SAEs inside.",
        epilog="Datasets: imagefolder:PATH, hf:NAME[:SPLIT], hf-disk:PATH[:SPLIT], world[:SPLIT]. "
        "Several GPUs: torchrun --nproc-per-node N -m fact_model.cli "
        "{features,train,evaluate,stats} ... --device cuda.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole method on the embedded concept world (no download)")
    p.add_argument(
        "--out", default="fact-demo-output", help="output folder (default ./fact-demo-output)"
    )
    p.add_argument(
        "--fast", action="store_true", help="a smaller, quicker run (for tests and a first look)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an existing output folder of another run",
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("features", help="extract an importance-sampled feature set (App. A)")
    _add_backbone(p)
    p.add_argument("--layer", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--samples-per-image", type=int, default=None, help="M (default: from --budget-gb)"
    )
    p.add_argument(
        "--budget-gb",
        type=float,
        default=170.0,
        help="storage budget of the training set (paper: 170)",
    )
    p.add_argument("--heldout-per-class", type=int, default=50)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast for the backbone during extraction"
    )
    _add_common(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train", help="features + SAE sweep + selection by held-out FaCT accuracy")
    _add_backbone(p)
    p.add_argument(
        "--layer", required=True, action="append", help="layer to decompose (repeatable)"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--k", type=int, nargs="+", help="TopK values to sweep (default: Table A1 or 16)"
    )
    p.add_argument(
        "--n-latents", type=int, nargs="+", help="dictionary sizes (default: Table A1 or 16384)"
    )
    p.add_argument("--lr", type=float, nargs="+", help="learning rates (default: Table A1 or 1e-3)")
    p.add_argument("--epochs", type=float, default=16.0)
    p.add_argument("--sae-batch-size", type=int, default=32786)
    p.add_argument("--init", choices=["random", "data"], default="data")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast for the SAE encoder matmul and the backbone during extraction "
        "(explanations and evaluation stay float32)",
    )
    p.add_argument(
        "--parallel",
        choices=["data", "grid"],
        default="data",
        help="under torchrun: train each SAE run data-parallel on all ranks (data), or one "
        "grid point per rank (grid: better for sweeps when reading features is the limit)",
    )
    p.add_argument("--samples-per-image", type=int, default=None)
    p.add_argument("--budget-gb", type=float, default=170.0)
    p.add_argument("--heldout-per-class", type=int, default=50)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy and sparsity of B-cos and FaCT at each layer")
    p.add_argument("model", help="FaCT model directory or Hub repo id")
    p.add_argument("--dataset", required=True)
    p.add_argument("--limit", type=int, default=None, help="evaluate a random subset of this size")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("explain", help="exact concept contributions of one image, with pictures")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("--layer", default=None)
    p.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the pictures and JSON")
    _add_common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("stats", help="concept statistics (top images, frequency, entropy, extent)")
    p.add_argument("model")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layer", default=None)
    p.add_argument("--kind", choices=["sae", "channels"], default="sae")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--extent-images", type=int, default=5)
    p.add_argument("--limit", type=int, default=None)
    g = p.add_argument_group(
        "concept names (CLIP-Dissect soft-WPMI, paper Sec. 5.3; local files only, nothing is "
        "downloaded)"
    )
    g.add_argument(
        "--clip-model", default=None, metavar="SPEC",
        help="a transformers CLIP folder (save_pretrained of CLIPModel and CLIPProcessor), "
        "open_clip:DIR (open_clip_config.json + weights) or open_clip:ARCH:FILE",
    )  # fmt: skip
    g.add_argument(
        "--vocabulary", default=None, metavar="FILE",
        help="the candidate names: a UTF-8 text file, one word or phrase per line",
    )  # fmt: skip
    g.add_argument(
        "--probe-dataset", default=None, metavar="SPEC",
        help="images the names are scored on (default: --dataset, with --limit)",
    )  # fmt: skip
    g.add_argument(
        "--name-top-k", type=int, default=None,
        help="top-activating probe images per concept in soft-WPMI (default 100)",
    )  # fmt: skip
    _add_common(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "compare", help="the paper's C2 / deletion tables for FaCT, B-cos channels, CRAFT, CRP"
    )
    p.add_argument("table", choices=["c2", "deletion"])
    p.add_argument("model", help="FaCT model directory or Hub repo id")
    p.add_argument("--dataset", default="world:test:600", help="(default world:test:600)")
    p.add_argument("--layer", default=None, help="decomposed layer (default: the last)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--methods", nargs="+", choices=["fact", "channels", "craft", "crp"], default=None,
        help="default: fact channels craft (+ crp with --crp-model)",
    )  # fmt: skip
    p.add_argument("--train-dataset", default="world:train:3000", help="images CRAFT is fitted on")
    p.add_argument("--craft-components", type=int, default=16, help="CRAFT concepts per class")
    p.add_argument("--craft-images-per-class", type=int, default=50)
    p.add_argument("--crp-model", default=None, help="torchvision model name for CRP")
    p.add_argument("--crp-weights", default=None, help="its safetensors state dict")
    p.add_argument("--crp-layer", default=None, help="its layer whose channels are the concepts")
    p.add_argument(
        "--extractor", default="oracle",
        help="C2 features: oracle (concept world) or a c2score spec, e.g. dinov2_vits14+loftup",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="a random subset of this size")
    p.add_argument("--per-class", type=int, default=4, help="deletion: images per class")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("atlas", help="build the browsable concept atlas (static HTML)")
    p.add_argument("model")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--explain", type=int, default=12, help="images to explain in the atlas")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument(
        "--max-concepts", type=int, default=200, help="concepts with cards (most frequent first)"
    )
    p.add_argument(
        "--names", action="append", default=None, metavar="PATH",
        help="concept names: a names_<layer>.json of fact stats --clip-model, or a folder of "
        "them (e.g. the --out of fact stats); repeatable",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_atlas)
    return parser


_DISTRIBUTED = ("features", "train", "evaluate", "stats")
"""Commands that split their work across the ranks of ``torchrun``."""


def _join_torchrun(args: argparse.Namespace) -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group; only rank 0 prints."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if args.command not in _DISTRIBUTED:
        raise RuntimeError(
            f"fact {args.command} runs in one process; of the commands only "
            f"{', '.join(_DISTRIBUTED)} split their work under torchrun"
        )
    from topk_sae import distributed as dist

    dist.init_from_env(args.device)
    args.device = str(dist.resolve_device(args.device))  # "cuda" -> this rank's cuda:LOCAL_RANK
    if dist.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    joined = False
    try:
        workers = getattr(args, "workers", None)
        if workers is not None:
            if workers < 0:
                raise ValueError(f"--workers must be >= 0, got {workers}")
            import os

            from fact_model.data import WORKERS_ENV

            os.environ[WORKERS_ENV] = str(workers)  # every image pass of this command
        joined = _join_torchrun(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        print(
            f"fact {args.command}: interrupted; finished work is kept, rerun to resume",
            file=sys.stderr,
        )
        return 130
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        NotADirectoryError,
        RuntimeError,
        OSError,
        ImportError,
    ) as err:
        print(f"fact {args.command}: error: {err}", file=sys.stderr)
        return 1
    finally:
        if joined:
            from topk_sae import distributed as dist

            dist.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
