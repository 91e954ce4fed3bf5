"""C2-score (paper Eq. 13-16) and concept deletion (Sec. 6, App. F) of a FaCT concept set.

:func:`c2_inputs` turns a :class:`~fact_model.concepts.LayerConcepts` and an image dataset into
what :func:`c2score.evaluate_c2` takes: the images the model saw (RGB, at the model's input
resolution), a sparse activation table of concept presences, and an attribution source that
computes the exact Eq. 12 maps of exactly the (image, concept) pairs the metric selects.
:func:`c2_score` runs it; :func:`deletion` runs :func:`concept_deletion.paper_protocol` with the
concept set as the ``ConceptModel`` and its exact contributions as the ``"contribution"``
measure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

import c2score
import concept_deletion
from fact_model.concepts import LayerConcepts
from fact_model.data import IndexedImages, SkipLog, image_loader, iterate, rank_share
from topk_sae import distributed as dist

__all__ = ["AttributionMaps", "ModelImages", "c2_inputs", "c2_score", "deletion"]


class ModelImages(Sequence[Tensor]):
    """The RGB images (3, H, W) in [0, 1] the model sees, in the order of ``indices`` (for the
    C2 feature extractor: attribution maps and features must cover the same pixels)."""

    def __init__(self, dataset: IndexedImages, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        x, reason, _ = self.dataset[self.indices[i]]
        if x is None:
            raise ValueError(f"image {self.indices[i]} is unreadable: {reason}")
        return x[:3]


class AttributionMaps:
    """``c2score`` attribution source: Eq. 12 maps of row ``i``'s image for given concepts."""

    def __init__(
        self,
        concepts: LayerConcepts,
        dataset: IndexedImages,
        indices: Sequence[int],
        device: Any = None,
    ) -> None:
        self.concepts = concepts
        self.dataset = dataset
        self.indices = list(indices)
        self.device = device

    def __call__(self, image_index: int, concept_ids: Tensor) -> Tensor:
        x, reason, _ = self.dataset[self.indices[int(image_index)]]
        if x is None:
            raise ValueError(f"image {self.indices[int(image_index)]} is unreadable: {reason}")
        x = x[None].to(self.device) if self.device is not None else x[None]
        ids = torch.as_tensor(concept_ids, dtype=torch.long, device=x.device)[None]
        return self.concepts.attributions(x, ids).attributions[0].detach().cpu()


def c2_inputs(
    concepts: LayerConcepts,
    dataset: IndexedImages,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    pixels: IndexedImages | None = None,
) -> tuple[ModelImages, c2score.ActivationTable, AttributionMaps, Tensor]:
    """(images, activation table, attribution source, labels) for :func:`c2score.evaluate_c2`.

    ``pixels``: the dataset whose first three channels, in [0, 1], are the images the feature
    extractor sees (default ``dataset``: the RGB half of a B-cos input). A concept method whose
    network takes other inputs (CRP's normalised RGB) passes its own ``dataset`` and the B-cos
    one here, so both are scored on the same pixels.

    The table holds the positive presences only (C2 selects images with presence > 0). Images
    that cannot be read are left out of every output (they get no row).

    Under ``torchrun`` each rank computes the presences of a contiguous share of the images and
    the shares are gathered in rank order: every rank gets the table of one process.
    """
    indices = rank_share(dataset, list(range(len(dataset))) if indices is None else indices)
    assert indices is not None
    rows, cols, vals, labels, kept = [], [], [], [], []
    log = SkipLog()
    loader = image_loader(dataset, batch_size=batch_size, indices=indices)
    for batch in tqdm(
        iterate(loader, log),
        total=len(loader),
        desc=f"presence {concepts.name}",
        disable=not progress or dist.rank() != 0,
    ):
        x = batch.images.to(device) if device is not None else batch.images
        p = concepts.presence(x).cpu()
        r, c = (p > 0).nonzero(as_tuple=True)
        rows.append(r + len(kept))
        cols.append(c)
        vals.append(p[r, c])
        kept += batch.indices.tolist()
        labels.append(batch.labels)
    if dist.is_distributed():  # every rank gathers, even one whose share is everything
        rows, cols, vals, labels, kept, log = _gather_shares(rows, cols, vals, labels, kept, log)
    if log.total:
        import warnings

        warnings.warn(f"C2 inputs: {log}", stacklevel=2)
    table = c2score.ActivationTable.from_sparse(
        torch.cat(rows) if rows else torch.empty(0, dtype=torch.long),
        torch.cat(cols) if cols else torch.empty(0, dtype=torch.long),
        torch.cat(vals) if vals else torch.empty(0),
        (len(kept), concepts.n_concepts),
    )
    images = ModelImages(dataset if pixels is None else pixels, kept)
    return (
        images,
        table,
        AttributionMaps(concepts, dataset, kept, device),
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
    )


def _gather_shares(
    rows: list[Tensor],
    cols: list[Tensor],
    vals: list[Tensor],
    labels: list[Tensor],
    kept: list[int],
    log: SkipLog,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[int], SkipLog]:
    """Concatenate every rank's sparse presences in rank order (row numbers shifted)."""

    def cat(ts: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.cat(ts) if ts else torch.empty(0, dtype=dtype)

    mine = (
        cat(rows, torch.long), cat(cols, torch.long), cat(vals, torch.float32),
        cat(labels, torch.long), kept,
    )  # fmt: skip
    out_r, out_c, out_v, out_l, out_k = [], [], [], [], []
    for r, c, v, lab, k in dist.all_gather_object(mine):
        out_r.append(r + len(out_k))
        out_c.append(c)
        out_v.append(v)
        out_l.append(lab)
        out_k += k
    return out_r, out_c, out_v, out_l, out_k, log.gathered()


def c2_score(
    concepts: LayerConcepts,
    dataset: IndexedImages,
    extractor: Any,
    *,
    indices: Sequence[int] | None = None,
    config: c2score.EvalConfig | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: Any = None,
    per_class_baseline: bool = False,
    pixels: IndexedImages | None = None,
) -> c2score.C2Result:
    """C2-score of a concept set on ``dataset`` with a ``c2score`` feature extractor.

    ``extractor``: e.g. ``c2score.make_extractor("dinov2_vits14+loftup")`` (the paper's), or
    :class:`c2score.OracleFeatures` with ground-truth maps (the concept world). The feature
    extractor gets the images the B-cos model saw (its input resolution).
    """
    progress = True if config is None else config.progress
    images, table, source, labels = c2_inputs(
        concepts, dataset, indices=indices, batch_size=batch_size, device=device,
        progress=progress, pixels=pixels,
    )  # fmt: skip
    return c2score.evaluate_c2(
        images,
        table,
        source,
        extractor,
        config or c2score.EvalConfig(),
        work_dir=work_dir,
        baseline_groups=labels if per_class_baseline else None,
    )


class _PairDataset:
    """``dataset[i] -> (image, label)`` view for :func:`concept_deletion.paper_protocol`."""

    def __init__(self, dataset: IndexedImages) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> list[int]:
        return self.dataset.targets

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, label, _ = self.dataset[i]
        if x is None:
            raise ValueError(f"image {i} is unreadable: {label}")
        return x, int(label)


def deletion(
    concepts: LayerConcepts,
    dataset: IndexedImages,
    out_dir: str | os.PathLike[str],
    config: concept_deletion.ProtocolConfig | None = None,
    *,
    protected: Tensor | None = None,
    device: Any = None,
    progress: bool = True,
) -> list[concept_deletion.CurveResult]:
    """The paper's concept-deletion protocol on this concept set (resumable in ``out_dir``).

    The ``"contribution"`` measure is the exact Eq. 9 contribution (:meth:`LayerConcepts.
    contributions`); the other measures (saliency, Sobol, ...) come from ``concept_deletion``.
    """
    return concept_deletion.paper_protocol(
        _PairDataset(dataset),
        concepts,
        concepts.layout,
        out_dir,
        config or concept_deletion.ProtocolConfig(),
        contributions=concepts.contributions,
        protected=protected,
        device=device,
        progress=progress,
    )
