"""The paper's concept-deletion protocol as one resumable function (FaCT App. F).

50 random classes x 8 test images each (seeds fixed); for every measure, each image's
concepts are deleted in order of decreasing importance and the target (top-1) logit and the
accuracy over all images are followed. Each class's result is written atomically to
``<out_dir>/classes/<class>.json`` as soon as it is done, so an interrupted run resumes where it
stopped; the merged curves go to ``<out_dir>/deletion.json`` and CSVs.

Under ``torchrun`` (a ``torch.distributed`` process group of several ranks, all calling
:func:`paper_protocol` with the same arguments and an ``out_dir`` they share) rank r computes
the r-th contiguous share of the classes; after a barrier every rank merges all class files in
class order, so every rank returns the single-process curves and rank 0 writes the merged files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from concept_deletion.choices import ChoiceEnum
from concept_deletion.deletion import CurveResult, Mode, Schedule, Score, deletion_curve
from concept_deletion.fileio import read_json, write_atomic
from concept_deletion.head import ConceptModel
from concept_deletion.importance import (
    ImportanceConfig,
    Measure,
    class_importance,
    expand_class_importance,
    local_importance,
)
from concept_deletion.layout import Layout, check_codes
from concept_deletion.output import curves_from_json, curves_to_json, save_curves

__all__ = [
    "ComparisonConfig",
    "Ordering",
    "ProtocolConfig",
    "Target",
    "always_on_concepts",
    "compare_measures",
    "paper_protocol",
    "select_images",
]


class Ordering(ChoiceEnum, kind="ordering"):
    """Rank concepts per image (local) or by the class mean of the importances (global)."""

    LOCAL = "local"
    GLOBAL = "global"


class Target(ChoiceEnum, kind="target"):
    """Which logit of each image is explained: the top-1 prediction (paper) or the label."""

    PREDICTED = "predicted"
    LABEL = "label"


@dataclass(frozen=True)
class ComparisonConfig:
    """Which measures are compared, and how their deletion curves are taken.

    Attributes:
        measures: importance measures (``'contribution'`` needs the model's contributions).
        orderings: ``'local'`` (per-image ranking) and/or ``'global'`` (class-mean ranking).
        modes: ``'deletion'`` and/or ``'insertion'``.
        score: follow the target ``'logit'`` (paper) or its ``'probability'``.
        schedule: counts of deleted concepts (``'all'`` for small K; ``'geometric'`` or
            ``'linear'`` with ``n_steps`` for large K).
        n_steps: number of steps of a geometric or linear schedule.
        importance: settings of the measures (Sobol designs, IG steps, memory budget, ...).
    """

    measures: tuple[str, ...] = ("contribution", "saliency", "sobol", "random")
    orderings: tuple[str, ...] = ("local",)
    modes: tuple[str, ...] = ("deletion",)
    score: str = "logit"
    schedule: str = "geometric"
    n_steps: int = 50
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)

    def validate(self) -> None:
        """Refuse unknown or empty options with the shared :class:`ChoiceEnum` errors."""
        for name, parse in (
            ("measures", Measure.parse),
            ("orderings", Ordering.parse),
            ("modes", Mode.parse),
        ):
            values = getattr(self, name)
            # A bare string would iterate as characters ("sobol" -> 's', 'o', ...).
            if isinstance(values, str) or not isinstance(values, tuple | list) or not values:
                raise ValueError(
                    f"{name} must be a non-empty tuple of names, got {values!r} (e.g. "
                    f"{name}=({values!r},) for one)"
                )
            for value in values:
                parse(value)
        Score.parse(self.score)
        Schedule.parse(self.schedule)
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of :func:`paper_protocol` (defaults: the paper's App. F).

    Attributes:
        n_classes: number of randomly drawn classes (paper: 50).
        per_class: images per class (paper: 8 test images).
        seed: seed of the class and image draw.
        target: explained logit, ``'predicted'`` (top-1, as the paper) or ``'label'``.
        comparison: the measures and curve settings.
    """

    n_classes: int = 50
    per_class: int = 8
    seed: int = 0
    target: Target | str = Target.PREDICTED
    comparison: ComparisonConfig = field(default_factory=ComparisonConfig)

    def validate(self) -> None:
        self.comparison.validate()
        Target.parse(self.target)
        if self.n_classes < 1 or self.per_class < 1:
            raise ValueError("n_classes and per_class must be >= 1")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def select_images(
    labels: Sequence[int] | np.ndarray, n_classes: int = 50, per_class: int = 8, seed: int = 0
) -> dict[int, list[int]]:
    """Draw ``n_classes`` classes with at least ``per_class`` images, and ``per_class`` images of
    each (dataset indices, sorted), reproducibly from ``seed``."""
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= per_class]
    if eligible.size < n_classes:
        raise ValueError(
            f"only {eligible.size} classes have >= {per_class} images; lower n_classes "
            f"({n_classes}) or per_class"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=n_classes, replace=False))
    out = {}
    for c in chosen:
        idx = np.flatnonzero(labels == c)
        out[int(c)] = sorted(int(i) for i in rng.choice(idx, size=per_class, replace=False))
    return out


def always_on_concepts(codes: Tensor, layout: Layout | str, min_fraction: float = 1.0) -> Tensor:
    """Indices of concepts active (non-zero somewhere) in at least ``min_fraction`` of the images.

    With ``min_fraction=1`` these are the "always-on" concepts of App. F (Fig. F2), which can be
    protected from deletion.
    """
    layout = check_codes(codes, layout)
    k_dim = layout.concept_dim
    other = tuple(d for d in range(1, codes.ndim) if d != k_dim)
    active = codes != 0
    if other:
        active = active.any(dim=other)
    frac = active.double().mean(dim=0)
    return torch.nonzero(frac >= min_fraction - 1e-12).flatten()


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group of > 1 ranks, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _rank_and_world()[1] > 1:
        dist.barrier()


def _dataset_labels(dataset: Any) -> list[int]:
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return [int(x) for x in getattr(dataset, attr)]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def compare_measures(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    targets: Tensor | int,
    layout: Layout | str,
    config: ComparisonConfig = ComparisonConfig(),
    *,
    labels: Tensor | None = None,
    contributions: Tensor | None = None,
    protected: Tensor | None = None,
) -> list[CurveResult]:
    """Deletion (insertion) curves of every configured measure and ordering on one code batch.

    Curves are named ``'<measure>/<ordering>'``. ``labels`` give the accuracy curves and are
    needed for the global (class-mean) ordering; ``contributions`` (shaped like the codes or
    ``(B, K)``) are needed for the ``'contribution'`` measure.
    """
    config.validate()
    layout = check_codes(codes, layout)
    out = []
    for name in config.measures:
        measure = Measure.parse(name)
        if measure is Measure.CONTRIBUTION and contributions is None:
            raise ValueError("measure 'contribution' needs the model's contributions")
        imp = local_importance(
            measure, head, codes, targets, layout, config.importance, contributions
        )
        for ordering in config.orderings:
            ranked = imp
            if Ordering.parse(ordering) is Ordering.GLOBAL:
                if labels is None:
                    raise ValueError("the global ordering needs the images' labels")
                ranked = expand_class_importance(*class_importance(imp, labels), labels)
            for mode in config.modes:
                curve = deletion_curve(
                    head,
                    codes,
                    targets,
                    ranked,
                    layout,
                    labels=labels,
                    protected=protected,
                    mode=mode,
                    schedule=config.schedule,
                    n_steps=config.n_steps,
                    score=config.score,
                    measure=f"{measure.value}/{ordering}",
                    max_elements=config.importance.max_elements,
                )
                out.append(curve)
    return out


def _run_class(
    cls: int,
    model: ConceptModel,
    images: Tensor,
    labels: Tensor,
    layout: Layout,
    config: ProtocolConfig,
    contributions: Callable[[Tensor, Tensor], Tensor] | None,
    protected: Tensor | None,
) -> list[CurveResult]:
    with torch.no_grad():
        codes = model.codes(images)
        check_codes(codes, layout)
        logits = model.head(codes)
    targets = logits.argmax(dim=1) if Target.parse(config.target) is Target.PREDICTED else labels
    contrib = None
    if "contribution" in config.comparison.measures:
        if contributions is None:
            raise ValueError("measure 'contribution' needs the `contributions` callable")
        contrib = contributions(codes, targets)
    # A different random order (and scrambled design) per class, reproducible from the seed.
    importance = config.comparison.importance
    comparison = dataclasses.replace(
        config.comparison, importance=dataclasses.replace(importance, seed=importance.seed + cls)
    )
    return compare_measures(
        model.head,
        codes,
        targets,
        layout,
        comparison,
        labels=labels,
        contributions=contrib,
        protected=protected,
    )


def paper_protocol(
    dataset: Any,
    model: ConceptModel,
    layout: Layout | str,
    out_dir: str | os.PathLike[str],
    config: ProtocolConfig = ProtocolConfig(),
    *,
    labels: Sequence[int] | None = None,
    contributions: Callable[[Tensor, Tensor], Tensor] | None = None,
    protected: Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[CurveResult]:
    """Run the paper's concept-deletion evaluation; resumable; returns the merged curves.

    Args:
        dataset: indexable, ``dataset[i] -> (image, label)``; an image may also be a cached
            code if ``model.codes`` is the identity. Labels are read from ``labels``, else
            ``dataset.targets``/``.labels``, else by indexing every item.
        model: a :class:`ConceptModel` (``codes(images)`` and ``head(codes)``).
        layout: layout of the codes (``'BKHW'``, ``'BTK'``, ``'BK'``).
        out_dir: results folder (per-class files, merged JSON/CSV).
        config: the protocol settings.
        contributions: ``(codes, targets) -> tensor`` of model-inherent contributions (FaCT
            Eq. 9), shaped like the codes or ``(B, K)``; needed for measure ``'contribution'``.
        protected: concepts never deleted (e.g. :func:`always_on_concepts` of training codes).
        device: where images are sent before ``model.codes``.
    """
    config.validate()
    layout = Layout.parse(layout)
    out = Path(out_dir)
    labels_list = list(labels) if labels is not None else _dataset_labels(dataset)
    if len(labels_list) != len(dataset):
        raise ValueError(f"{len(labels_list)} labels for a dataset of {len(dataset)} items")
    selection = select_images(labels_list, config.n_classes, config.per_class, config.seed)
    meta = _jsonable(
        {
            "config": dataclasses.asdict(config),
            "layout": layout.value,
            "protected": None if protected is None else torch.as_tensor(protected).tolist(),
            "selection": {str(k): v for k, v in selection.items()},
        }
    )
    meta_path = out / "protocol.json"
    rank, world = _rank_and_world()
    if meta_path.exists():
        if read_json(meta_path) != json.loads(json.dumps(meta)):
            raise ValueError(
                f"{meta_path} was written with other settings or another dataset; use a new "
                "out_dir or delete the old results"
            )
    elif rank == 0:
        write_atomic(meta_path, json.dumps(meta, indent=1))
    items = list(selection.items())
    if world > 1:  # compute this rank's share of the classes, then merge every class file
        base, extra = divmod(len(items), world)
        lo = rank * base + min(rank, extra)
        mine = items[lo : lo + base + (1 if rank < extra else 0)]
        for cls, indices in tqdm(mine, desc="classes", disable=not progress or rank != 0):
            path = out / "classes" / f"{cls}.json"
            if not path.exists():
                _compute_class(
                    cls, indices, path, dataset, model, labels_list, layout, config,
                    contributions, protected, device,
                )  # fmt: skip
        _barrier()
        progress = False
    merged: dict[tuple[str, str], CurveResult] = {}
    for cls, indices in tqdm(items, desc="classes", disable=not progress):
        path = out / "classes" / f"{cls}.json"
        if path.exists():
            try:
                curves = curves_from_json(path.read_text(encoding="utf-8"))
            except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
                raise ValueError(
                    f"{path} is not a class result written by paper_protocol ({err!r}); delete "
                    "it and rerun to recompute that class"
                ) from err
        else:
            curves = _compute_class(
                cls, indices, path, dataset, model, labels_list, layout, config, contributions,
                protected, device,
            )  # fmt: skip
        for c in curves:
            key = (c.measure, c.mode)
            merged[key] = merged[key].merge(c) if key in merged else c
    result = list(merged.values())
    if rank == 0:
        save_curves(result, out)
    _barrier()
    return result


def _compute_class(
    cls: int,
    indices: list[int],
    path: Path,
    dataset: Any,
    model: ConceptModel,
    labels_list: list[int],
    layout: Layout,
    config: ProtocolConfig,
    contributions: Callable[[Tensor, Tensor], Tensor] | None,
    protected: Tensor | None,
    device: torch.device | str | None,
) -> list[CurveResult]:
    """Curves of one class, written atomically to ``path``."""
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
    if device is not None:
        images = images.to(device)
    y = torch.as_tensor([labels_list[i] for i in indices], device=images.device)
    curves = _run_class(cls, model, images, y, layout, config, contributions, protected)
    write_atomic(path, curves_to_json(curves))
    return curves
