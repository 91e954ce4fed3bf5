"""Concept statistics in one streaming pass over a dataset (paper Sec. 5, App. D).

Per concept of a :class:`~fact_model.concepts.LayerConcepts`:

* top-activating images by presence, kept in bounded per-concept top-k tables (``n x k``
  values and image ids; never a dense images x concepts table);
* firing frequency (fraction of images with presence > 0), dead (never fires) and always-on
  (fires on at least ``always_on_threshold`` of the images; the authors flag > 85 %);
* concept-label entropy (Eq. D.1-D.2): ``p_c(y) = sum_{x: label y} a_c(x) / sum_x a_c(x)`` of
  the positive presence mass, ``H_c = -sum_y p_c(y) log p_c(y)`` (nats; 0 for a concept of one
  class, ``log(#classes)`` for a uniform one);
* spatial extent (App. D.1), in a second pass over the top images only: the number of input
  pixels covering 80 % of the concept's positive Eq. 12 attribution, averaged over its top
  images.

Ties in the top-k tables are broken by the smaller image index, so the result equals a
brute-force sort of the full table.

Under ``torchrun`` (every rank calling :func:`concept_statistics`) each rank streams a
contiguous share of the images; counts and label masses are summed, the per-rank top-k tables
merged (the same tie rule, so the merge equals the single table), and the spatial-extent pass
is split over the (image, concepts) pairs: every rank returns the statistics of all images.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.concepts import LayerConcepts
from fact_model.data import IndexedImages, SkipLog, image_loader, iterate, rank_share
from topk_sae import distributed as dist

__all__ = ["ConceptStats", "TopK", "concept_statistics", "pixels_to_cover", "spatial_extent"]


class TopK:
    """Per-row top-``k`` (value, id) table merged batch by batch; ties -> smaller id first."""

    def __init__(self, rows: int, k: int) -> None:
        self.values = torch.full((rows, k), -math.inf, dtype=torch.float64)
        self.ids = torch.full((rows, k), -1, dtype=torch.long)
        self.k = k

    def update(self, values_RB: Tensor, ids_B: Tensor) -> None:
        """Merge candidates ``values_RB[r, b]`` for image ``ids_B[b]`` (only values > 0 count);
        ``ids`` may also be per row, ``(R, B)`` (e.g. another table's ids)."""
        v = values_RB.double().where(values_RB > 0, torch.tensor(-math.inf, dtype=torch.float64))
        ids = ids_B.long() if ids_B.ndim == 2 else ids_B.long()[None].expand(v.shape[0], -1)
        vals = torch.cat([self.values, v], 1)
        idx = torch.cat([self.ids, ids], 1)
        idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
        # Two stable sorts: by id ascending, then by value descending -> value desc, id asc.
        key = torch.where(idx < 0, torch.full_like(idx, torch.iinfo(torch.long).max), idx)
        order = key.argsort(dim=1, stable=True)
        vals, idx = vals.gather(1, order), idx.gather(1, order)
        order = (-vals).argsort(dim=1, stable=True)[:, : self.k]
        self.values, self.ids = vals.gather(1, order), idx.gather(1, order)


_STAT_TENSORS = (
    "frequency",
    "mean_presence",
    "dead",
    "always_on",
    "top_images",
    "top_values",
    "label_mass",
    "entropy",
    "spatial_extent",
)
"""The per-concept tensors of :class:`ConceptStats` (what :meth:`ConceptStats.save` writes)."""


class ConceptStats(NamedTuple):
    """Statistics of every concept of one concept set (n concepts, N images, C classes)."""

    name: str
    layer: str
    n_images: int
    frequency: Tensor
    """(n,) fraction of images where the concept is present (presence > 0)."""
    mean_presence: Tensor
    """(n,) mean positive presence over the images where it is present (0 if never)."""
    dead: Tensor
    """(n,) bool: never present."""
    always_on: Tensor
    """(n,) bool: present on at least ``always_on_threshold`` of the images."""
    always_on_threshold: float
    top_images: Tensor
    """(n, k) int64 dataset indices of the top-activating images (-1: fewer than k)."""
    top_values: Tensor
    """(n, k) their presences (-inf padding)."""
    label_mass: Tensor
    """(n, C) float64 positive presence mass per class."""
    entropy: Tensor
    """(n,) concept-label entropy in nats (Eq. D.1-D.2); NaN for dead concepts."""
    spatial_extent: Tensor
    """(n,) mean pixels covering 80 % of the positive attribution over the top images (NaN where
    not computed)."""
    skipped: dict[str, Any]

    def top_classes(self, concept: int, k: int = 3) -> list[int]:
        """The classes holding most of the concept's presence mass."""
        mass = self.label_mass[concept]
        order = mass.argsort(descending=True)[:k]
        return [int(c) for c in order if mass[c] > 0]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the statistics to one safetensors file, atomically (name, layer and the skip
        log go into its metadata); :meth:`load` reads it back exactly."""
        from safetensors.torch import save_file

        from fact_model._atomic import atomic_path

        tensors = {
            k: (v.to(torch.float64) if v.dtype == torch.bool else v).contiguous()
            for k in _STAT_TENSORS
            for v in [getattr(self, k)]
        }
        tensors["n_images"] = torch.tensor(self.n_images)
        tensors["always_on_threshold"] = torch.tensor(self.always_on_threshold, dtype=torch.float64)
        meta = {"format": "fact-concept-stats", "name": self.name, "layer": self.layer}
        meta["skipped"] = json.dumps(self.skipped, default=str)
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConceptStats:
        """Read statistics written by :meth:`save`; a clear error for any other file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        except Exception as e:
            raise ValueError(f"{path}: cannot read concept statistics ({e})") from e
        missing = [k for k in (*_STAT_TENSORS, "n_images", "always_on_threshold") if k not in t]
        if meta.get("format") != "fact-concept-stats" or missing:
            raise ValueError(
                f"{path} is not a concept-statistics file written by ConceptStats.save "
                f"(missing: {missing or 'format tag'})"
            )
        fields = {k: t[k] for k in _STAT_TENSORS}
        fields["dead"], fields["always_on"] = fields["dead"].bool(), fields["always_on"].bool()
        return cls(
            name=meta.get("name", ""),
            layer=meta.get("layer", ""),
            n_images=int(t["n_images"]),
            always_on_threshold=float(t["always_on_threshold"]),
            skipped=json.loads(meta.get("skipped", "{}")),
            **fields,
        )

    def summary(self) -> dict[str, Any]:
        alive = ~self.dead
        finite = torch.isfinite(self.spatial_extent)
        return {
            "concepts": int(self.frequency.numel()),
            "alive": int(alive.sum()),
            "dead": int(self.dead.sum()),
            "always_on": int(self.always_on.sum()),
            "mean_frequency_alive": float(self.frequency[alive].mean())
            if alive.any()
            else math.nan,
            "mean_entropy_alive": float(self.entropy[alive].mean()) if alive.any() else math.nan,
            "mean_spatial_extent": float(self.spatial_extent[finite].mean())
            if finite.any()
            else math.nan,
        }


def pixels_to_cover(attribution_MHW: Tensor, fraction: float = 0.8) -> Tensor:
    """(M,) number of pixels whose positive attribution reaches ``fraction`` of the total
    positive attribution (NaN when nothing is positive)."""
    pos = attribution_MHW.flatten(1).clamp_min(0).double()
    pos = pos.sort(dim=1, descending=True).values
    total = pos.sum(1, keepdim=True)
    need = (pos.cumsum(1) < fraction * total * (1 - 1e-9)).sum(1) + 1
    return torch.where(total[:, 0] > 0, need.double(), torch.full_like(total[:, 0], math.nan))


def spatial_extent(
    concepts: LayerConcepts,
    dataset: IndexedImages,
    top_images: Tensor,
    *,
    per_concept: int | None = None,
    fraction: float = 0.8,
    device: Any = None,
    progress: bool = True,
) -> Tensor:
    """(n,) mean pixels covering ``fraction`` of each concept's positive Eq. 12 attribution over
    its first ``per_concept`` top images (all by default); NaN for concepts without images."""
    n, k = top_images.shape
    per = k if per_concept is None else min(per_concept, k)
    pairs: dict[int, list[int]] = {}
    for c in range(n):
        for i in top_images[c, :per].tolist():
            if i >= 0:
                pairs.setdefault(i, []).append(c)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    todo = sorted(pairs.items())
    if dist.is_distributed():  # every rank holds the same table: split its images
        todo = todo[dist.rank_slice(len(todo))]
        progress = progress and dist.rank() == 0
    for image, cs in tqdm(todo, desc=f"extent {concepts.name}", disable=not progress):
        x, _, _ = dataset[image]
        if x is None:
            continue
        x = x[None].to(device) if device is not None else x[None]
        ids = torch.tensor(cs, dtype=torch.long)
        maps = concepts.attributions(x, ids[None].to(x.device)).attributions[0].detach().cpu()
        px = pixels_to_cover(maps, fraction)
        ok = torch.isfinite(px)
        total.index_add_(0, ids[ok], px[ok])
        count.index_add_(0, ids[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    total, count = dist.all_reduce_sum(total), dist.all_reduce_sum(count)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def concept_statistics(
    concepts: LayerConcepts,
    dataset: IndexedImages,
    *,
    indices: Sequence[int] | None = None,
    top_k: int = 10,
    always_on_threshold: float = 0.85,
    extent_images: int | None = 5,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
) -> ConceptStats:
    """Concept statistics of ``concepts`` on ``dataset`` (optionally a subset ``indices``).

    Memory is ``O(n * (top_k + C))`` whatever the dataset size. ``extent_images``: top images per
    concept used for the spatial extent (``0`` skips that second pass).
    """
    if not 0 < always_on_threshold <= 1:
        raise ValueError(f"always_on_threshold must be in (0, 1], got {always_on_threshold}")
    n = concepts.n_concepts
    n_classes = max(len(dataset.classes), max(dataset.targets, default=-1) + 1)
    top = TopK(n, top_k)
    fires = torch.zeros(n, dtype=torch.long)
    mass = torch.zeros(n, n_classes, dtype=torch.float64)
    seen = 0
    log = SkipLog()
    indices = rank_share(dataset, indices)
    show = progress and dist.rank() == 0
    loader = image_loader(dataset, batch_size=batch_size, indices=indices)
    for batch in tqdm(
        iterate(loader, log), total=len(loader), desc=f"stats {concepts.name}", disable=not show
    ):
        x = batch.images.to(device) if device is not None else batch.images
        p = concepts.presence(x).detach().cpu().double()  # (B, n)
        pos = p.clamp_min(0)
        fires += (p > 0).sum(0)
        mass.index_add_(1, batch.labels, pos.T)
        top.update(p.T, batch.indices)
        seen += p.shape[0]
    if dist.is_distributed():
        fires, mass = dist.all_reduce_sum(fires), dist.all_reduce_sum(mass)
        seen = int(dist.all_reduce_sum(torch.tensor(seen)))
        merged = TopK(n, top_k)
        for values, ids in dist.all_gather_object((top.values, top.ids)):
            merged.update(values, ids)
        top = merged
        log = log.gathered()
    if seen == 0:
        raise ValueError(f"no image could be read ({log})")
    total = mass.sum(1)
    prob = mass / total.clamp_min(1e-300)[:, None]
    ent = -(prob * prob.clamp_min(1e-300).log()).sum(1)
    dead = fires == 0
    ent = torch.where(dead, torch.full_like(ent, math.nan), ent)
    extent = torch.full((n,), math.nan, dtype=torch.float64)
    if extent_images:
        extent = spatial_extent(
            concepts, dataset, top.ids, per_concept=extent_images, device=device, progress=progress
        )
    freq = fires.double() / seen
    return ConceptStats(
        concepts.name,
        concepts.layer,
        seen,
        freq,
        torch.where(fires > 0, total / fires.clamp_min(1), torch.zeros_like(total)),
        dead,
        freq >= always_on_threshold,
        always_on_threshold,
        top.ids,
        top.values,
        mass,
        ent,
        extent,
        log.summary(),
    )
