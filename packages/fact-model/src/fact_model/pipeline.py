"""The FaCT training pipeline: feature sets -> SAE sweeps -> selection -> one saved model.

``train_fact`` runs, per layer, :func:`~fact_model.features.extract_features` (App. A, Eq. A.1),
:func:`~fact_model.training.train_layer` (the sweep, selected by held-out FaCT accuracy) and
then assembles the FaCT model with the selected SAE of every layer, evaluates it on the
held-out images and saves it. Every stage is resumable in ``out_dir``::

    out_dir/features/<layer>/   importance-sampled feature set (train/ and heldout/ stores)
    out_dir/sweeps/<layer>/     one sub-directory per SAE run + sweep.json
    out_dir/model/              the FaCT model (save_pretrained)
    out_dir/train_report.json   what was selected, held-out accuracies
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fact_model._atomic import atomic_write_json
from fact_model.data import IndexedImages
from fact_model.evaluation import evaluate
from fact_model.features import FeatureConfig, extract_features
from fact_model.model import FaCT
from fact_model.training import describe_runs, train_layer
from topk_sae import TrainConfig
from topk_sae import distributed as dist

__all__ = ["PAPER_SAE_CONFIGS", "SweepGrid", "paper_grid", "train_fact"]

PAPER_SAE_CONFIGS: dict[tuple[str, str], tuple[float, int, int]] = {
    # (backbone, layer) -> (learning rate, concepts K, TopK k): paper Table A1
    ("resnet50_long", "layer4"): (1e-3, 16384, 16),
    ("resnet50_long", "layer3"): (1e-3, 16384, 32),
    ("resnet50_long", "layer2"): (1e-3, 8192, 32),
    ("densenet121_long", "features.norm5"): (1e-3, 16384, 16),
    ("densenet121_long", "features.transition3"): (1e-3, 16384, 32),
    ("densenet121_long", "features.transition2"): (1e-4, 8192, 32),
    ("vitc_s_patch1_14", "0.transformer.encoder_10"): (1e-3, 8192, 32),
    ("vitc_s_patch1_14", "0.transformer.encoder_9"): (1e-4, 16384, 32),
    ("vitc_s_patch1_14", "0.transformer.encoder_8"): (1e-3, 8192, 32),
    ("vitc_s_patch1_14", "0.transformer.encoder_4"): (1e-4, 16384, 64),
}
"""The released checkpoints' configurations (App. A, Table A1)."""


@dataclass(frozen=True)
class SweepGrid:
    """SAE hyper-parameters swept per layer (the paper: lr x K x k, App. A)."""

    k: tuple[int, ...] = (16,)
    n_latents: tuple[int, ...] = (16384,)
    lr: tuple[float, ...] = (1e-3,)


def paper_grid(backbone: str, layer: str) -> SweepGrid | None:
    """The Table A1 configuration of ``(backbone, layer)`` as a one-point grid, if it has one."""
    cfg = PAPER_SAE_CONFIGS.get((backbone, layer)) or PAPER_SAE_CONFIGS.get(
        (
            backbone.replace("resnet50", "resnet50_long").replace(
                "densenet121", "densenet121_long"
            ),
            layer,
        )
    )
    if cfg is None:
        return None
    lr, n, k = cfg
    return SweepGrid((k,), (n,), (lr,))


@dataclass(frozen=True)
class TrainSettings:
    """Everything of ``train_fact`` besides the model, data and layers."""

    features: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`~fact_model.features.FeatureConfig` (besides ``layer``)."""
    sae: TrainConfig = field(default_factory=lambda: TrainConfig(n_latents=16384, k=16))
    """The SAE training settings (its k / n_latents / lr are replaced by the grid)."""
    sae_batch_size: int = 32786
    image_batch_size: int = 64
    top: int = 2
    parallel: str = "data"
    """Under ``torchrun``: ``"data"`` (each SAE run data-parallel) or ``"grid"`` (one grid point
    per rank); see :func:`~fact_model.training.train_layer`."""


def train_fact(
    backbone: nn.Module,
    dataset: IndexedImages,
    layers: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    grids: dict[str, SweepGrid],
    settings: TrainSettings = TrainSettings(),
    dataset_name: str | None = None,
    device: Any = None,
    progress: bool = True,
) -> tuple[FaCT, dict[str, Any]]:
    """Train and select one SAE per layer, assemble, evaluate on the held-out images, save.

    Runs under ``torchrun`` as well (every rank calls it with the same arguments): extraction,
    SAE training and evaluation are then split across the ranks, and rank 0 writes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if device is not None:
        device = dist.resolve_device(device)  # "cuda" under torchrun: this rank's GPU
    saes, report = {}, {"layers": {}, "dataset": dataset_name}
    heldout: list[int] = []
    for layer in layers:
        grid = grids[layer]
        fcfg = FeatureConfig(layer=layer, **settings.features)
        fs = extract_features(
            backbone, dataset, out / "features" / layer, fcfg, device=device, progress=progress,
            describe=dataset_name,
        )  # fmt: skip
        heldout = fs.heldout_indices
        trained = train_layer(
            backbone, fs, out / "sweeps" / layer, settings.sae, heldout_dataset=dataset,
            k=grid.k, n_latents=grid.n_latents, lr=grid.lr, top=settings.top,
            sae_batch_size=settings.sae_batch_size, image_batch_size=settings.image_batch_size,
            device=device, progress=progress, parallel=settings.parallel,
        )  # fmt: skip
        saes[layer] = trained.sae
        report["layers"][layer] = {
            "grid": asdict(grid),
            "feature_set": {
                "rows": fs.train.num_rows,
                "heldout_rows": fs.heldout.num_rows if fs.heldout else 0,
                "samples_per_image": fs.provenance["samples_per_image"],
                "skipped": fs.skipped,
            },
            "selected": describe_runs(trained.selected),
            "runs": describe_runs(trained.sweep.runs),
            "bcos_heldout_top1": trained.bcos_heldout_accuracy,
        }
    model = FaCT(backbone, saes, class_names=getattr(dataset, "classes", None) or None)
    if device is not None:
        model.to(device)
    ev = evaluate(
        model,
        dataset,
        indices=heldout,
        batch_size=settings.image_batch_size,
        device=device,
        progress=progress,
    )
    report["heldout_evaluation"] = ev.to_dict()
    metadata = {
        "evaluation": {"bcos": ev.bcos._asdict(), **{k: v._asdict() for k, v in ev.layers.items()}},
        "evaluation_split": "held-out training images",
        "training_data": dataset_name or "not recorded",
        "selected": {layer: report["layers"][layer]["selected"][0] for layer in layers},
    }
    if dist.rank() == 0:  # under torchrun every rank computed the same model and report
        model.save_pretrained(out / "model", metadata=metadata)
        atomic_write_json(out / "train_report.json", report, default=str)
    dist.barrier()
    return model, report
