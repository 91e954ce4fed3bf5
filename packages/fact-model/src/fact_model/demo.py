"""``fact demo``: the whole method on the embedded concept world, on a laptop, with no download.

Steps (each resumable: its result is written atomically and a rerun skips it):

1. generate the concept world (:mod:`fact_model.world`) -- train / test images with ground truth;
2. train a small B-cos ResNet on it (B-cos BCE loss, as B-cos-v2);
3. FaCT training at a mid and a late layer: importance-sampled feature sets (Eq. A.1), SAE
   sweeps, selection by held-out FaCT accuracy (App. A);
4. evaluation on the test split: B-cos and FaCT accuracy, concept L0, 80 % coverage, the
   completeness error of every decomposition;
5. concept statistics (App. D), C2-score with the oracle backbone on one-hot ground-truth
   features for FaCT concepts and B-cos channels (Eq. 13-16), concept deletion (FaCT
   contributions vs saliency vs Sobol vs random, App. F), ground-truth recovery;
6. pictures: explanations (incl. a misclassified image), the cross-layer view (Fig. 1), deletion
   curves (Fig. 7), accuracy vs sparsity, a misclassification analysis (Fig. 8), and the atlas.

Everything goes to ``--out``: ``summary.json``, ``figures/*.png``, ``atlas/index.html``, the
model (``train/model``) and per-step JSON files. A second run with the same ``--out`` and
settings resumes; with other settings it refuses (``--overwrite`` starts over).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fact_model._atomic import atomic_path, atomic_write_json

__all__ = ["DemoConfig", "run_demo"]

SUMMARY_NAME = "summary.json"
STATE_NAME = "demo.json"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the default runs in about ten minutes on a 2-core CPU).

    Attributes:
        world: :class:`fact_model.world.WorldConfig` keyword arguments.
        n_train, n_test: images of the train and test splits.
        backbone: ``bcos_layers.create`` name; ``backbone_kwargs`` its arguments.
        epochs, lr, batch_size, weight_decay: B-cos training (Adam, cosine schedule).
        layers: the decomposed layers (a mid and a late one).
        samples_per_image: M of the feature sets, per layer; heldout_per_class: App. A split.
        k, n_latents, sae_lr, sae_epochs, sae_batch_size: the SAE sweep per layer.
        stats_images, c2_images, deletion_per_class, explain_images: analysis sizes.
        atlas_concepts: concepts per layer shown in the atlas.
        misclassified_search: how many test images (past the split if need be) are searched
            for a misclassified one to explain.
        threads: torch CPU threads (fixed, for determinism).
    """

    world: dict[str, Any] = field(default_factory=dict)
    n_train: int = 6000
    n_test: int = 1000
    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"num_classes": 12, "inplanes": 16, "small_inputs": False}
    )
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    layers: tuple[str, ...] = ("layer3", "layer4")
    samples_per_image: dict[str, int] = field(default_factory=lambda: {"layer3": 8, "layer4": 4})
    heldout_per_class: int = 25
    k: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"layer3": (8, 16), "layer4": (4, 8)}
    )
    n_latents: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"layer3": (256,), "layer4": (256,)}
    )
    sae_lr: tuple[float, ...] = (3e-3,)
    sae_epochs: float = 12.0
    sae_batch_size: int = 1024
    stats_images: int = 1000
    c2_images: int = 600
    deletion_per_class: int = 4
    explain_images: int = 8
    atlas_concepts: int = 60
    misclassified_search: int = 20_000
    threads: int = 2

    @classmethod
    def fast(cls) -> DemoConfig:
        """A quick, smaller run (tests, a first look): same steps, fewer images and runs."""
        return cls(
            n_train=1500,
            n_test=300,
            epochs=3,
            k={"layer3": (8,), "layer4": (4,)},
            n_latents={"layer3": (128,), "layer4": (128,)},
            heldout_per_class=10,
            sae_epochs=6.0,
            sae_batch_size=512,
            stats_images=300,
            c2_images=120,
            deletion_per_class=2,
            explain_images=3,
            atlas_concepts=12,
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class _Steps:
    """Resumable steps: ``run(name, fn)`` returns the saved JSON result or computes and saves it."""

    def __init__(self, out: Path, progress: bool) -> None:
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.dir / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            self.times[name] = float(saved.get("_seconds", 0.0))
            return saved
        if self.progress:
            print(f"[fact demo] {name} ...", flush=True)
        t = time.perf_counter()
        result = fn()
        result["_seconds"] = time.perf_counter() - t
        self.times[name] = result["_seconds"]
        atomic_write_json(path, result, default=_jsonable)
        return result


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _prepare_out(out: Path, cfg: DemoConfig, seed: int, overwrite: bool) -> None:
    state = {"format": "fact-demo", "version": 1, "seed": seed, "config": cfg.to_dict()}
    marker = out / STATE_NAME
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved == state:
            return  # resume
        if not overwrite:
            differ = [k for k in ("format", "version", "seed") if saved.get(k) != state[k]] + [
                f"config.{k}"
                for k in sorted(set(state["config"]) | set(saved.get("config", {})))
                if saved.get("config", {}).get(k) != state["config"].get(k)
            ]
            raise ValueError(
                f"{out} holds a demo run with other settings (changed: {', '.join(differ)}; e.g. "
                "another --seed or --fast, or another version of fact-model); use another "
                "--out, or --overwrite to start over there"
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{out} exists and is not a demo output folder; use another --out or --overwrite"
        )
    if overwrite and out.exists():
        for name in (
            "steps",
            "train",
            "backbone",
            "figures",
            "atlas",
            "deletion",
            SUMMARY_NAME,
            STATE_NAME,
        ):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, state)


def _world(cfg: DemoConfig) -> Any:
    from fact_model.world import WorldConfig

    return WorldConfig(**cfg.world)


def _datasets(cfg: DemoConfig, transform: Any) -> tuple[Any, Any]:
    from fact_model.data import IndexedImages
    from fact_model.world_source import WorldImages

    wc = _world(cfg)
    train = IndexedImages(WorldImages("train", cfg.n_train, config=wc), transform)
    test = IndexedImages(WorldImages("test", cfg.n_test, config=wc), transform)
    return train, test


# ----------------------------------------------------------------------------- B-cos training
def train_bcos(
    cfg: DemoConfig, train: Any, seed: int, device: Any, progress: bool
) -> torch.nn.Module:
    """Train the small B-cos ResNet with the B-cos BCE loss (Adam, cosine schedule)."""
    from tqdm.auto import tqdm

    import bcos_layers
    from bcos_layers.training import UniformOffLabelBCELoss

    torch.manual_seed(seed)
    model = bcos_layers.create(cfg.backbone, **cfg.backbone_kwargs).to(device)
    x_all = torch.stack([train[i][0] for i in range(len(train))])
    y_all = torch.tensor(train.targets)
    loss_fn = UniformOffLabelBCELoss()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x_all) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15
    )
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="train B-cos", disable=not progress, unit="step")
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=g)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            x = x_all[idx].to(device)
            # Augmentation: random horizontal flips (the world's concepts are flip-invariant).
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)
            loss = loss_fn(model(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return model.eval()


def _save_backbone(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp)
        )


def _load_backbone(cfg: DemoConfig, path: Path, device: Any) -> torch.nn.Module:
    from safetensors.torch import load_file

    import bcos_layers
    from bcos_layers.models.registry import PretrainedCfg
    from fact_model.model import BackboneSpec

    model = bcos_layers.create(cfg.backbone, **cfg.backbone_kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    size = _world(cfg).image_size
    model.pretrained_cfg = PretrainedCfg(
        name=cfg.backbone, resize_size=size, crop_size=size, source=str(path)
    )
    model.fact_backbone_spec = BackboneSpec(cfg.backbone, dict(cfg.backbone_kwargs))
    return model.to(device).eval()


# ----------------------------------------------------------------------------- the demo
def run_demo(
    cfg: DemoConfig,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the demo; returns the summary (also in ``out_dir/summary.json``)."""
    from fact_model.data import eval_transform_for

    out = Path(out_dir)
    _prepare_out(out, cfg, seed, overwrite)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    steps = _Steps(out, progress)
    size = _world(cfg).image_size

    class _Shape:  # transform of world tensors: [x, 1 - x] only (images are generated at size)
        pretrained_cfg = None
        input_size = size

    transform = eval_transform_for(_Shape())
    train, test = _datasets(cfg, transform)
    world = train.source.world

    # 2. B-cos backbone ---------------------------------------------------------------------
    bb_path = out / "backbone" / "model.safetensors"

    def step_backbone() -> dict[str, Any]:
        model = train_bcos(cfg, train, seed, device, progress)
        _save_backbone(model, bb_path)
        return {"weights": str(bb_path)}

    steps.run("backbone", step_backbone)
    backbone = _load_backbone(cfg, bb_path, device)

    # 3. FaCT training -----------------------------------------------------------------------
    from fact_model.model import FaCT
    from fact_model.pipeline import SweepGrid, TrainSettings, train_fact
    from topk_sae import TrainConfig

    def step_train() -> dict[str, Any]:
        grids = {
            layer: SweepGrid(tuple(cfg.k[layer]), tuple(cfg.n_latents[layer]), tuple(cfg.sae_lr))
            for layer in cfg.layers
        }
        reports = {}
        for layer in cfg.layers:  # one feature set / sweep per layer; M differs per layer
            settings = TrainSettings(
                features={
                    "samples_per_image": cfg.samples_per_image[layer],
                    "heldout_per_class": cfg.heldout_per_class,
                    "seed": seed,
                    "batch_size": 128,
                },
                sae=TrainConfig(
                    n_latents=grids[layer].n_latents[0],
                    k=grids[layer].k[0],
                    epochs=cfg.sae_epochs,
                    warmup_epochs=1.0,
                    hold_epochs=1.0,
                    init="data",
                    k_aux=32,
                    seed=seed,
                    device=device,
                    deterministic=True,
                    uncentered_warn_ratio=1e9,
                    checkpoint_every=10_000,
                ),
                sae_batch_size=cfg.sae_batch_size,
                image_batch_size=128,
            )
            _, report = train_fact(
                backbone, train, [layer], out / "train" / layer, grids={layer: grids[layer]},
                settings=settings, dataset_name="concept world (train)", device=device, progress=progress,
            )  # fmt: skip
            reports[layer] = report
        return {"reports": reports}

    trained = steps.run("train", step_train)
    from topk_sae import BiasFreeTopKSAE

    saes = {}
    for layer in cfg.layers:
        best = trained["reports"][layer]["layers"][layer]["selected"][0]["name"]
        saes[layer] = BiasFreeTopKSAE.from_pretrained(
            out / "train" / layer / "sweeps" / layer / "runs" / best / "model"
        )
    model = FaCT(backbone, saes, class_names=world.classes).to(device).eval()
    if not (out / "model" / "config.json").is_file():
        model.save_pretrained(
            out / "model",
            metadata={"training_data": "fact demo concept world", "demo": cfg.to_dict()},
        )

    # 4. evaluation ----------------------------------------------------------------------------
    from fact_model.evaluation import evaluate

    ev = steps.run(
        "evaluate",
        lambda: evaluate(model, test, batch_size=128, device=device, progress=progress).to_dict(),
    )

    # 5. analyses --------------------------------------------------------------------------------
    from fact_model.demo_steps import (
        c2_step,
        deletion_step,
        figures_step,
        groundtruth_step,
        pick_step,
        stats_step,
    )

    stats = {
        layer: stats_step(model, test, layer, cfg, device, progress, out) for layer in cfg.layers
    }
    c2 = steps.run("c2", lambda: c2_step(model, test, world, cfg, device, progress))
    deletion = steps.run("deletion", lambda: deletion_step(model, test, cfg, device, progress, out))
    gt = steps.run(
        "groundtruth", lambda: groundtruth_step(model, test, world, cfg, device, progress)
    )
    # Explained images: one misclassified (searched past the test split if need be) and the
    # first correct ones; `shown` is the test split extended to the furthest of them.
    picked = steps.run(
        "pick",
        lambda: pick_step(
            model, test, _world(cfg), cfg.explain_images, cfg.misclassified_search, device
        ),
    )
    shown = test
    if max(picked["indices"], default=0) >= len(test):
        from fact_model.data import IndexedImages
        from fact_model.world_source import WorldImages

        n_shown = max(picked["indices"]) + 1
        shown = IndexedImages(WorldImages("test", n_shown, config=_world(cfg)), test.transform)
    figs = steps.run(
        "figures",
        lambda: figures_step(
            model, shown, trained, ev, deletion, cfg, device, progress, out, picked["indices"]
        ),
    )

    def step_atlas() -> dict[str, Any]:
        from fact_model.report import build_model_atlas

        per_concept_c2 = {
            layer: {int(k): float(v) for k, v in c2["fact"][layer]["per_concept"].items()}
            for layer in cfg.layers
        }
        path = build_model_atlas(
            model, shown, out / "atlas", indices=list(range(min(cfg.stats_images, len(test)))),
            explain_indices=figs["explained_indices"], top_k=8, max_concepts=cfg.atlas_concepts,
            stats=stats, c2=per_concept_c2, concept_names=gt.get("names"),
            summary=_headline(ev, c2, deletion, gt), title="FaCT concept atlas: the concept world",
            device=device, progress=progress, overwrite=True,
        )  # fmt: skip
        return {"index": str(path)}

    atlas = steps.run("atlas", step_atlas)
    # The compute time of every step, whether done now or by an earlier (interrupted) run.
    total = sum(steps.times.values())
    summary = {
        "seconds": total,
        "this_run_seconds": time.perf_counter() - t0,
        "step_seconds": steps.times,
        "seed": seed,
        "config": cfg.to_dict(),
        "accuracy": {
            "bcos_test_top1": ev["bcos"]["top1"],
            **{f"fact_{layer}_test_top1": ev["layers"][layer]["top1"] for layer in cfg.layers},
        },
        "evaluation": ev,
        "completeness_error_max": max(
            ev["layers"][layer]["max_abs_completeness_error"] for layer in cfg.layers
        ),
        "c2": {
            k: {
                layer: {"c2": v[layer]["c2"], "n_concepts": v[layer]["n_scored"]}
                for layer in cfg.layers
            }
            for k, v in c2.items()
            if k in ("fact", "channels")
        },
        "deletion_auc": deletion["auc"],
        "groundtruth": {k: v for k, v in gt.items() if k != "names"},
        "figures": figs["files"],
        "atlas": atlas["index"],
        "model": str(out / "model"),
    }
    summary["text"] = _summary_text(summary, out)
    atomic_write_json(out / SUMMARY_NAME, summary, default=_jsonable)
    return summary


def _headline(ev: dict, c2: dict, deletion: dict, gt: dict) -> dict[str, Any]:
    head: dict[str, Any] = {"B-cos test top-1": round(100 * ev["bcos"]["top1"], 2)}
    for layer, r in ev["layers"].items():
        head[f"FaCT {layer} test top-1"] = round(100 * r["top1"], 2)
        head[f"{layer} max completeness error"] = r["max_abs_completeness_error"]
        head[f"{layer} C2 FaCT"] = c2["fact"][layer]["c2"]
        head[f"{layer} C2 B-cos channels"] = c2["channels"][layer]["c2"]
    for layer, v in gt.get("layers", {}).items():
        head[f"{layer} ground-truth concepts recovered"] = v.get("fraction_recovered")
    return head


def _summary_text(s: dict[str, Any], out: Path) -> str:
    acc = s["accuracy"]
    lines = [
        f"fact demo finished in {s['seconds'] / 60:.1f} min -> {out}"
        + (
            f" (this run {s['this_run_seconds'] / 60:.1f} min, the rest resumed from earlier runs)"
            if s["this_run_seconds"] < 0.9 * s["seconds"]
            else ""
        ),
        f"  B-cos test accuracy      {100 * acc['bcos_test_top1']:.2f}%",
    ]
    for key, v in acc.items():
        if key.startswith("fact_"):
            lines.append(f"  FaCT {key[5:-10]:<19s} {100 * v:.2f}%")
    lines.append(
        f"  completeness error (max) {s['completeness_error_max']:.2e}  (logit - bias - sum of concept contributions)"
    )
    for layer in s["c2"].get("fact", {}):
        f, c = s["c2"]["fact"][layer]["c2"], s["c2"]["channels"][layer]["c2"]
        lines.append(f"  C2 {layer:<10s} FaCT {f:.3f} vs B-cos channels {c:.3f}")
    for layer, aucs in s["deletion_auc"].items():
        pretty = ", ".join(f"{m} {v:.3f}" for m, v in sorted(aucs.items(), key=lambda kv: kv[1]))
        lines.append(f"  deletion AUC {layer}: {pretty} (lower = finds the important concepts)")
    for layer, g in s["groundtruth"].get("layers", {}).items():
        lines.append(
            f"  ground truth {layer}: {100 * (g['fraction_recovered'] or 0):.0f}% of true concepts recovered "
            f"(B-cos channels {100 * (s['groundtruth']['channels'][layer]['fraction_recovered'] or 0):.0f}%), "
            f"mass in mask {g['mean_mass_in_mask'] or 0:.2f}, pixel AUROC {g['mean_pixel_auroc'] or 0:.2f}"
        )
    lines.append(f"  look at: {s['atlas']} (atlas), {out / 'figures'}, {out / SUMMARY_NAME}")
    return "\n".join(lines)
