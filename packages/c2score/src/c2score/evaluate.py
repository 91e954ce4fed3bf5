"""Streaming C2 evaluation: one pass over the images, resumable, memory independent of N.

Which images each concept needs is decided up front from the activation table
(:func:`~c2score.selection.select_images`), so one pass over the images suffices. Per image the
features F(x) are computed once, the attribution maps are fetched only for the concepts that
selected it (plus the random concepts of the baseline, which select every image), and the
*uncentred* embeddings e_c(x) = sum relu(A) F / sum relu(A) (Eq. 14) are kept; the per-image
spatial means of F are summed for the centring mean mu.

Why not fold the embeddings straight into the O(N * D) accumulators? Centring must come before
the normalisation u = (e - mu) / |e - mu|, and mu is only known after the pass. Since centring is
linear, e computed on centred features equals e - mu, so it is enough to keep e for the selected
pairs (top-k per concept, ~1 M x D at ImageNet scale, on disk in a work directory) and fold
u into the accumulators at the end. A second pass that recomputes the upsampled features
(LoftUp dominates the cost) would double the run time; upsampled features are never stored.

With a ``work_dir`` the pass writes a checkpoint (embedding shard + state, atomically) every
``checkpoint_every`` images; calling again with the same inputs resumes after the last one.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from c2score import _distributed as _dist
from c2score.baseline import RandomBaselineConfig, random_attribution
from c2score.consistency import ConsistencyAccumulator
from c2score.features.base import PixelFeatureExtractor
from c2score.features.oracle import IndexedFeatureExtractor
from c2score.io import (
    ActivationTable,
    AttributionSource,
    DenseAttributions,
    ImageLike,
    ImageLoadError,
    StoredAttributions,
    atomic_save_safetensors,
    atomic_write_text,
    load_activation_table,
    resize_maps,
    to_rgb_tensor,
)
from c2score.report import C2Result, UndefinedScoreWarning
from c2score.selection import Selection, SelectionConfig, select_images

__all__ = ["EvalConfig", "evaluate_c2"]

_STATE = "state.safetensors"
_FORMAT = 2
"""Version of what a work directory holds; part of the fingerprint, so that a directory
written under other rules (v1: top-k selection, mean(A) baseline weight, resize before relu)
is refused instead of mixed with new embeddings."""


@dataclass(frozen=True)
class EvalConfig:
    """Settings of :func:`evaluate_c2` (validated on construction)."""

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Which images each concept is scored on (the authors' top 5 %, at least 10; skip below 5)."""
    baseline: RandomBaselineConfig = field(default_factory=RandomBaselineConfig)
    """Random-concept baseline (3 seeds by default)."""
    batch_size: int = 8
    """Images per feature-extractor call (consecutive images of equal size are batched)."""
    checkpoint_every: int = 512
    """Images between checkpoints when a work directory is given."""
    device: str = "cpu"
    """Device the images and the embedding arithmetic go to (move the extractor yourself)."""
    map_chunk: int = 64
    """Attribution maps embedded per matrix product (bounds memory at chunk x H x W)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    relu_before_resize: bool = True
    """Clip attribution maps at 0 before resizing them to the image (the authors' order:
    ``clip(grad * img, 0)``, then bilinear resizing in their minimal version); False resizes
    first and clips after (which lets negative evidence bleed into neighbouring pixels)."""

    def __post_init__(self) -> None:
        if not isinstance(self.selection, SelectionConfig):
            raise TypeError(f"selection must be a SelectionConfig, got {self.selection!r}")
        if not isinstance(self.baseline, RandomBaselineConfig):
            raise TypeError(f"baseline must be a RandomBaselineConfig, got {self.baseline!r}")
        for name in ("batch_size", "checkpoint_every", "map_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be a positive integer, got {value!r}")
        for name in ("progress", "relu_before_resize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"EvalConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"EvalConfig.device {self.device!r} is not a torch device (e.g. 'cpu', 'cuda', "
                f"'cuda:1'): {e}"
            ) from None


class _Pass:
    """Accumulated state of the streaming pass (what a checkpoint holds)."""

    def __init__(self, dim: int, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.feat_sum_D = torch.zeros(dim, dtype=torch.float64)
        self.n_feat = 0
        self.next_image = 0
        self.n_shards = 0
        self.image_skips: Counter[str] = Counter()
        self.pair_skips: Counter[str] = Counter()
        self.skipped_examples: dict[str, str] = {}
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.memory_shards: list[dict[str, torch.Tensor]] = []

    # -- persistence ---------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "n_feat": self.n_feat,
            "next_image": self.next_image,
            "n_shards": self.n_shards,
            "image_skips": dict(self.image_skips),
            "pair_skips": dict(self.pair_skips),
            "skipped_examples": self.skipped_examples,
        }

    def flush(self, work_dir: Path | None) -> None:
        """Move buffered embeddings into a shard; with a work_dir, checkpoint atomically."""
        if self.buffer:
            shard = {k: torch.cat([b[k] for b in self.buffer]) for k in self.buffer[0]}
            self.buffer = []
            if work_dir is None:
                self.memory_shards.append(shard)
            else:
                atomic_save_safetensors(shard, work_dir / f"shard_{self.n_shards:06d}.safetensors")
            self.n_shards += 1
        if work_dir is not None:
            meta = {"json": json.dumps(self.meta())}
            atomic_save_safetensors({"feat_sum": self.feat_sum_D}, work_dir / _STATE, meta)

    @classmethod
    def resume(cls, work_dir: Path, dim: int, fingerprint: str) -> _Pass:
        state = cls(dim, fingerprint)
        path = work_dir / _STATE
        if not path.exists():
            return state
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["json"])
            feat_sum = f.get_tensor("feat_sum")
        if meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"{work_dir} holds a run with other inputs or settings (fingerprint mismatch); "
                "use a fresh work directory or delete it to start over"
            )
        state.feat_sum_D = feat_sum
        state.n_feat, state.next_image = meta["n_feat"], meta["next_image"]
        state.n_shards = meta["n_shards"]
        state.image_skips = Counter(meta["image_skips"])
        state.pair_skips = Counter(meta["pair_skips"])
        state.skipped_examples = meta["skipped_examples"]
        for orphan in work_dir.glob("shard_*.safetensors"):  # written after the last state
            if int(orphan.stem.split("_")[1]) >= state.n_shards:
                orphan.unlink()
        return state

    def shards(self, work_dir: Path | None) -> Iterator[dict[str, torch.Tensor]]:
        if work_dir is None:
            yield from self.memory_shards
        else:
            for i in range(self.n_shards):
                yield load_file(str(work_dir / f"shard_{i:06d}.safetensors"))

    def snapshot(self) -> tuple[Any, ...]:
        return (
            self.feat_sum_D.clone(),
            self.n_feat,
            Counter(self.image_skips),
            Counter(self.pair_skips),
            dict(self.skipped_examples),
            len(self.buffer),
        )

    def restore(self, snap: tuple[Any, ...]) -> None:
        self.feat_sum_D, self.n_feat, self.image_skips, self.pair_skips = snap[:4]
        self.skipped_examples = snap[4]
        del self.buffer[snap[5] :]

    def skip_image(self, index: int, reason: str, detail: str) -> None:
        self.image_skips[reason] += 1
        self.skipped_examples.setdefault(reason, f"image {index}: {detail}"[:300])


def _fingerprint(selection: Selection, dim: int, config: EvalConfig, group_N: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (selection.concept_ids, selection.pair_image, selection.pair_slot, group_N):
        h.update(t.numpy().tobytes())
    h.update(selection.pair_weight.numpy().tobytes())
    settings = [_FORMAT, dim, selection.n_images, asdict(config.baseline)]
    h.update(json.dumps([*settings, config.relu_before_resize]).encode())
    return h.hexdigest()[:32]


def _as_attribution_source(
    attributions: AttributionSource | torch.Tensor | str | Path, selection: Selection
) -> AttributionSource:
    """Wrap tensors / files and check up front that every selected pair has a map."""
    if isinstance(attributions, torch.Tensor):
        attributions = DenseAttributions(attributions)
    elif isinstance(attributions, (str, Path)):
        attributions = StoredAttributions(attributions)
    if isinstance(attributions, DenseAttributions):
        n, c = attributions.maps_NChw.shape[:2]
        if (n, c) != (selection.n_images, selection.n_concepts):
            raise ValueError(
                f"attribution maps cover {n} images x {c} concepts, the activation table "
                f"{selection.n_images} x {selection.n_concepts}"
            )
    if isinstance(attributions, StoredAttributions):
        concepts = selection.concept_ids[selection.pair_slot]
        miss = attributions.missing(selection.pair_image, concepts)
        if bool(miss.any()):
            i = int(torch.nonzero(miss)[0])
            raise ValueError(
                f"{attributions.path} lacks the maps of {int(miss.sum())} selected (image, "
                f"concept) pairs, e.g. image {int(selection.pair_image[i])}, concept "
                f"{int(concepts[i])}; store a map for every pair the selection needs"
            )
    return attributions


def _indexed_images(
    images: Sequence[ImageLike] | Iterable[ImageLike], start: int
) -> Iterator[tuple[int, ImageLike | Exception]]:
    """(index, image or the loading error) from ``start`` on, without loading skipped ones."""
    if isinstance(images, Sequence) or (
        hasattr(images, "__getitem__") and hasattr(images, "__len__")
    ):
        for i in range(start, len(images)):  # type: ignore[arg-type]
            try:
                yield i, images[i]  # type: ignore[index]
            except ImageLoadError as e:
                yield i, e
        return
    for i, im in enumerate(images):
        if i >= start:
            yield i, im


def _features(
    extractor: PixelFeatureExtractor | IndexedFeatureExtractor,
    indices: list[int],
    batch_B3HW: torch.Tensor,
    lowres_cache: Path | None,
) -> torch.Tensor:
    """Per-pixel features of a batch, through the low-resolution cache when one is given."""
    if isinstance(extractor, IndexedFeatureExtractor):
        return extractor.features_at(indices, batch_B3HW)
    lowres_fn = getattr(extractor, "lowres", None)
    upsample_fn = getattr(extractor, "upsample", None)
    if lowres_cache is None or lowres_fn is None or upsample_fn is None:
        return extractor(batch_B3HW)
    paths = [lowres_cache / f"{i:09d}.safetensors" for i in indices]
    size = torch.tensor(batch_B3HW.shape[-2:])
    lows: list[torch.Tensor | None] = []
    for p in paths:
        if not p.exists():
            lows.append(None)
            continue
        stored = load_file(str(p))
        if not torch.equal(stored["image_size"], size):
            raise ValueError(
                f"{p} was cached for a {stored['image_size'].tolist()} image, this one is "
                f"{size.tolist()}: use one low-res cache directory per preprocessing"
            )
        lows.append(stored["lowres"].to(batch_B3HW.device))
    todo = [b for b, low in enumerate(lows) if low is None]
    if todo:
        fresh = lowres_fn(batch_B3HW[todo])
        for b, low in zip(todo, fresh):
            lows[b] = low
            atomic_save_safetensors({"lowres": low.detach().cpu(), "image_size": size}, paths[b])
    return upsample_fn(torch.stack(lows), batch_B3HW)  # type: ignore[arg-type]


def _check_cache_owner(cache: Path, extractor: object) -> None:
    """Refuse a low-res cache directory written by another kind of extractor."""
    backbone = getattr(extractor, "backbone", extractor)
    config = getattr(getattr(backbone, "model", None), "config", None)
    owner: dict[str, str | int] = {
        "extractor": f"{type(extractor).__module__}.{type(extractor).__qualname__}",
        "backbone": type(backbone).__qualname__,
        "model": str(getattr(config, "_name_or_path", "")),
        "dim": int(extractor.dim),  # type: ignore[attr-defined]
    }
    rule = getattr(backbone, "pos_interpolation", None)  # DINOv2: features depend on it
    if rule is not None:
        owner["pos_interpolation"] = str(rule)
    path = cache / "owner.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != owner:
            raise ValueError(
                f"low-res cache {cache} belongs to {found}, not to {owner}: use one cache "
                "directory per backbone"
            )
    else:
        atomic_write_text(path, json.dumps(owner))


def _embed(maps_KHW: torch.Tensor, feats_DHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14 on uncentred features: (embeddings K x D, valid K) with relu'd maps as weights.

    The clip here is a no-op for maps clipped before resizing (the default) and the clip of
    resized maps otherwise."""
    a = maps_KHW.clamp_min(0).flatten(1)
    mass = a.sum(dim=1)
    emb = (a @ feats_DHW.flatten(1).T) / mass.clamp_min(torch.finfo(a.dtype).tiny)[:, None]
    return emb, mass > 0


def evaluate_c2(
    images: Sequence[ImageLike] | Iterable[ImageLike],
    activations: ActivationTable | torch.Tensor | str | Path,
    attributions: AttributionSource | torch.Tensor | str | Path,
    extractor: PixelFeatureExtractor | IndexedFeatureExtractor,
    config: EvalConfig = EvalConfig(),
    work_dir: str | Path | None = None,
    lowres_cache: str | Path | None = None,
    baseline_groups: torch.Tensor | Sequence[int] | None = None,
) -> C2Result:
    """C2-score of a concept method (paper Eq. 13-16) in one streaming pass over ``images``.

    ``images`` are in the order of the activation table's rows (an :class:`~c2score.io.ImageFolder`,
    or any sequence / iterable of PIL images or tensors); ``activations`` is an images x concepts
    table (tensor, :class:`~c2score.io.ActivationTable` or safetensors path); ``attributions``
    gives maps A_c(x) per (image, concepts) (callable, (N, C, h, w) tensor or safetensors path);
    ``extractor`` gives per-pixel features. ``work_dir`` makes the pass resumable;
    ``lowres_cache`` stores the extractor's low-resolution features (if it has ``lowres`` and
    ``upsample``) for later runs. ``baseline_groups`` (one label per image, e.g. the class)
    switches to the per-group baseline of the authors' class-specific protocol: one random
    concept per group and seed, over that group's images (centred by the global mean), averaged
    over the groups.

    Under ``torchrun`` (a ``torch.distributed`` process group of several ranks, every rank
    calling ``evaluate_c2`` with the same inputs) rank r streams the r-th contiguous share of
    the images, with its own checkpoints in ``work_dir/rank-r-of-W``; the centring mean, the
    per-concept sums of Eq. 15 and the skip counts are then summed over the ranks, so every
    rank returns the single-process result (to float64 summation order).
    """
    if not isinstance(activations, (ActivationTable, torch.Tensor)):
        activations = load_activation_table(activations)
    table = (
        ActivationTable.from_dense(activations)
        if isinstance(activations, torch.Tensor)
        else activations
    )
    if table.n_images == 0 or table.n_concepts == 0:
        raise ValueError(
            f"the activation table has no {'images' if table.n_images == 0 else 'concepts'} "
            f"({table.n_images} x {table.n_concepts}): nothing to score; it needs one row per "
            "image and one column per concept"
        )
    if hasattr(images, "__len__") and len(images) != table.n_images:  # type: ignore[arg-type]
        raise ValueError(
            f"{len(images)} images but the activation table has {table.n_images} rows; row i "  # type: ignore[arg-type]
            "of the table must belong to the i-th image"
        )
    n_known = getattr(extractor, "n_images", None)
    if isinstance(n_known, int) and n_known < table.n_images:
        raise ValueError(
            f"the feature extractor holds feature maps for {n_known} images, but the activation "
            f"table has {table.n_images} rows; give one (D, h, w) map per image, in table order"
        )
    selection = select_images(table, config.selection)
    group_N, n_groups = _groups(baseline_groups, table.n_images)
    source = _as_attribution_source(attributions, selection)
    dim = int(extractor.dim)
    rank, world = _dist.rank_and_world()
    wdir = Path(work_dir) if work_dir is not None else None
    if wdir is not None and world > 1:
        wdir = wdir / f"rank-{rank:05d}-of-{world:05d}"
    cache = Path(lowres_cache) if lowres_cache is not None else None
    for d in (wdir, cache):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    if cache is not None:
        if rank == 0:
            _check_cache_owner(cache, extractor)
        _dist.barrier()  # rank 0 has claimed the cache before the others check it
        if rank != 0:
            _check_cache_owner(cache, extractor)
    fingerprint = _fingerprint(selection, dim, config, group_N)
    state = _Pass.resume(wdir, dim, fingerprint) if wdir is not None else _Pass(dim, fingerprint)
    lo, hi = _dist.share(table.n_images)
    state.next_image = max(state.next_image, lo)

    _stream(
        images, table.n_images, selection, source, extractor, config, state, wdir, cache, group_N,
        stop=hi,
    )  # fmt: skip
    if world > 1:
        _sum_over_ranks(state)
    return _finalise(selection, state, wdir, dim, config, n_groups)


def _sum_over_ranks(state: _Pass) -> None:
    """Replace this rank's centring sum and skip records by those of all ranks."""
    state.feat_sum_D = _dist.all_reduce_sum(state.feat_sum_D)
    state.n_feat = int(_dist.all_reduce_sum(torch.tensor(state.n_feat)))
    image_skips, pair_skips, examples = Counter(), Counter(), {}
    for img, pair, ex in _dist.gather(
        (dict(state.image_skips), dict(state.pair_skips), state.skipped_examples)
    ):
        image_skips.update(img)
        pair_skips.update(pair)
        for reason, text in ex.items():
            examples.setdefault(reason, text)
    state.image_skips, state.pair_skips, state.skipped_examples = image_skips, pair_skips, examples


def _groups(labels: torch.Tensor | Sequence[int] | None, n_images: int) -> tuple[torch.Tensor, int]:
    """Dense group index per image (0 .. G-1) and G; one group when no labels are given."""
    if labels is None:
        return torch.zeros(n_images, dtype=torch.int64), 1
    lab = torch.as_tensor(labels)
    if lab.shape != (n_images,) or lab.is_floating_point():
        raise ValueError(
            f"baseline_groups must hold one integer label per image ({n_images}), got "
            f"{tuple(lab.shape)} {lab.dtype}"
        )
    uniq, group_N = torch.unique(lab, return_inverse=True)
    return group_N.long(), len(uniq)


def _min_side(extractor: object) -> int:
    """Smallest usable image side: the backbone's patch size where it declares one."""
    for obj in (extractor, getattr(extractor, "backbone", None)):
        p = getattr(obj, "patch_size", None)
        if isinstance(p, int) and p > 0:
            return p
    return 1


def _stream(
    images: Sequence[ImageLike] | Iterable[ImageLike],
    n_images: int,
    selection: Selection,
    source: AttributionSource,
    extractor: PixelFeatureExtractor | IndexedFeatureExtractor,
    config: EvalConfig,
    state: _Pass,
    wdir: Path | None,
    cache: Path | None,
    group_N: torch.Tensor,
    stop: int | None = None,
) -> None:
    """Stream images ``state.next_image`` .. ``stop - 1`` (default: all) through the pass."""
    stop = n_images if stop is None else stop
    device = torch.device(config.device)
    min_side = _min_side(extractor)
    dim = int(extractor.dim)
    n_slots = len(selection.concept_ids)
    first = _dist.share(n_images)[0]
    bar = tqdm(
        total=stop - first,
        initial=state.next_image - first,
        desc="c2score",
        disable=not config.progress or _dist.rank_and_world()[0] != 0,
    )
    batch: list[tuple[int, torch.Tensor]] = []
    since_checkpoint = 0

    def run_batch() -> None:
        nonlocal since_checkpoint
        if batch:
            idx = [i for i, _ in batch]
            x = torch.stack([t for _, t in batch]).to(device)
            with torch.inference_mode():
                feats = _features(extractor, idx, x, cache)
            if feats.shape[:2] != (len(idx), dim) or feats.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"the feature extractor returned {tuple(feats.shape)} for images "
                    f"{tuple(x.shape)}; expected (B, {dim}, H, W) at image resolution"
                )
            snapshot = state.snapshot()
            try:
                for b, i in enumerate(idx):
                    rand_slot = n_slots + int(group_N[i]) * len(config.baseline.seeds)
                    _process_image(i, feats[b].float(), selection, source, rand_slot, config, state)
            except BaseException:
                state.restore(snapshot)  # all of a batch or nothing: checkpoints stay exact
                raise
            since_checkpoint += len(idx)
            bar.update(len(idx))
            state.next_image = idx[-1] + 1
            batch.clear()
        if wdir is not None and since_checkpoint >= config.checkpoint_every:
            state.flush(wdir)
            since_checkpoint = 0

    try:
        last = _loop(
            images, n_images, selection.bad_images, state, batch, config, min_side, run_batch, bar,
            stop,
        )  # fmt: skip
    except BaseException:
        bar.close()
        if wdir is not None:  # save what is complete before the error surfaces
            state.flush(wdir)
        raise
    state.next_image = max(state.next_image, last + 1)
    state.flush(wdir)
    bar.close()
    if state.next_image < stop:
        raise ValueError(
            f"only {state.next_image} images for the {n_images} rows of the activation table "
            "(progress saved)"
        )


def _loop(
    images: Sequence[ImageLike] | Iterable[ImageLike],
    n_images: int,
    bad_images: torch.Tensor,
    state: _Pass,
    batch: list[tuple[int, torch.Tensor]],
    config: EvalConfig,
    min_side: int,
    run_batch: Callable[[], None],
    bar: tqdm,
    stop: int | None = None,
) -> int:
    """Feed images (up to ``stop``, exclusive) into batches; returns the last index seen."""
    bad_rows = torch.zeros(n_images + 1, dtype=torch.bool)
    bad_rows[bad_images] = True
    last = state.next_image - 1
    for i, item in _indexed_images(images, state.next_image):
        if stop is not None and stop < n_images and i >= stop:
            break  # the next rank's share
        if i >= n_images:
            run_batch()
            raise ValueError(
                f"more images than the {n_images} rows of the activation table (progress saved)"
            )
        last = i
        reason, detail, t = _check_image(item, min_side)
        if bad_rows[i]:
            reason, detail, t = "non_finite_activations", "the whole activation row", None
        if t is None:
            run_batch()  # keep "images < next_image are done" exact for checkpoints
            state.skip_image(i, reason, detail)
            state.next_image = i + 1
            bar.update(1)
            continue
        if batch and (len(batch) >= config.batch_size or batch[0][1].shape != t.shape):
            run_batch()
        batch.append((i, t))
    run_batch()
    return last


def _check_image(
    item: ImageLike | Exception, min_side: int
) -> tuple[str, str, torch.Tensor | None]:
    """(reason, detail, None) for an unusable image, else ("", "", RGB tensor)."""
    if isinstance(item, ImageLoadError):
        return item.reason, str(item), None
    try:
        t = to_rgb_tensor(item)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        return "invalid_image", str(e), None
    if min(t.shape[-2:]) < min_side:
        return "smaller_than_patch", f"{tuple(t.shape[-2:])} < {min_side}", None
    return "", "", t


def _process_image(
    i: int,
    feats_DHW: torch.Tensor,
    selection: Selection,
    source: AttributionSource,
    rand_slot: int,
    config: EvalConfig,
    state: _Pass,
) -> None:
    """Centring sum and uncentred embeddings (selected concepts + random concepts) of one image."""
    if not bool(torch.isfinite(feats_DHW).all()):
        state.skip_image(i, "non_finite_features", "the extractor returned NaN or inf")
        return
    size = (int(feats_DHW.shape[-2]), int(feats_DHW.shape[-1]))
    state.feat_sum_D += feats_DHW.double().mean(dim=(1, 2)).cpu()
    state.n_feat += 1

    slots, weights = selection.pairs_of(i)
    out_slot, out_w, out_e = [], [], []
    for k0 in range(0, len(slots), config.map_chunk):
        s, w = slots[k0 : k0 + config.map_chunk], weights[k0 : k0 + config.map_chunk]
        maps = torch.as_tensor(source(i, selection.concept_ids[s]))
        if maps.ndim != 3 or maps.shape[0] != len(s):
            raise ValueError(
                f"attributions({i}, {len(s)} concepts) returned {tuple(maps.shape)}; expected "
                f"({len(s)}, h, w)"
            )
        maps = maps.to(feats_DHW.device)
        if config.relu_before_resize:
            maps = maps.clamp_min(0)  # NaN / inf survive the clip and are counted below
        maps = resize_maps(maps, size)
        finite = torch.isfinite(maps).flatten(1).all(dim=1)
        state.pair_skips["non_finite_attribution"] += int((~finite).sum())
        maps = torch.where(finite[:, None, None], maps, torch.zeros((), device=maps.device))
        emb, nonzero = _embed(maps, feats_DHW)
        state.pair_skips["empty_attribution"] += int((finite & ~nonzero).sum())
        keep = (finite & nonzero).cpu()
        out_slot.append(s[keep])
        out_w.append(w[keep])
        out_e.append(emb.cpu()[keep])

    seeds = config.baseline.seeds
    rand = [random_attribution(seed, i, size, config.baseline.weight) for seed in seeds]
    maps_R = torch.stack([a for a, _ in rand]).to(feats_DHW.device)
    emb_R, nonzero_R = _embed(maps_R, feats_DHW)
    keep_R = nonzero_R.cpu()
    out_slot.append((rand_slot + torch.arange(len(seeds)))[keep_R])
    out_w.append(torch.tensor([w for _, w in rand], dtype=torch.float64)[keep_R])
    out_e.append(emb_R.cpu()[keep_R])

    slot_K = torch.cat(out_slot).long()
    state.buffer.append(
        {
            "slot": slot_K,
            "image": torch.full_like(slot_K, i),
            "weight": torch.cat(out_w).double(),
            "emb": torch.cat(out_e).float(),
        }
    )


def _finalise(
    selection: Selection,
    state: _Pass,
    wdir: Path | None,
    dim: int,
    config: EvalConfig,
    n_groups: int,
) -> C2Result:
    """Centre, normalise and fold the stored embeddings; Eq. 15 per concept and Eq. 16."""
    n_slots = len(selection.concept_ids)
    seeds = config.baseline.seeds
    if state.n_feat == 0:
        raise ValueError(f"no image could be used: {_skip_summary(state)}; nothing to score")
    mu_D = state.feat_sum_D / state.n_feat
    acc = ConsistencyAccumulator(n_slots + n_groups * len(seeds), dim)
    pair_skips = Counter(state.pair_skips)
    zero_centred = 0
    for shard in state.shards(wdir):
        used = acc.add_embeddings(shard["slot"], shard["emb"], shard["weight"], centre_D=mu_D)
        zero_centred += int((~used).sum())
    if _dist.rank_and_world()[1] > 1:  # this rank folded its own embeddings: sum the folds
        for name in ("sum_wu_CD", "sum_w_C", "sum_w2_C", "count_C"):
            setattr(acc, name, _dist.all_reduce_sum(getattr(acc, name)))
        zero_centred = int(_dist.all_reduce_sum(torch.tensor(zero_centred)))
    pair_skips["zero_centred_embedding"] += zero_centred

    cons = acc.consistency()
    counts = acc.count_C
    scored = counts[:n_slots] >= config.selection.min_images
    skipped = {k: v.tolist() for k, v in selection.skipped.items()}
    skipped["too_few_valid_images"] = selection.concept_ids[~scored].tolist()
    concept_cons = cons[:n_slots][scored]
    # (G, S) random-concept consistencies; groups with < 2 embeddings have none (NaN)
    base_GS = cons[n_slots:].view(n_groups, len(seeds))
    valid_G = torch.isfinite(base_GS).all(dim=1)
    base = base_GS[valid_G].mean(dim=0) if bool(valid_G.any()) else base_GS[0]
    mean_c = float(concept_cons.mean()) if len(concept_cons) else float("nan")
    base_mean = float(base.mean())
    base_std = float(base.std()) if len(base) > 1 else 0.0
    reason = _undefined_reason(len(concept_cons), skipped, base_mean, state.n_feat, n_groups)
    if reason is not None:
        warnings.warn(f"C2 is undefined (NaN): {reason}", UndefinedScoreWarning, stacklevel=3)
    return C2Result(
        undefined_reason=reason,
        c2=mean_c - base_mean,
        mean_consistency=mean_c,
        baseline_mean=base_mean,
        baseline_std=base_std,
        baseline_per_seed={s: float(v) for s, v in zip(seeds, base.tolist())},
        concept_ids=selection.concept_ids[scored].tolist(),
        consistency=concept_cons.tolist(),
        n_images_per_concept=counts[:n_slots][scored].tolist(),
        skipped_concepts=skipped,
        skipped_images=dict(state.image_skips),
        skipped_pairs={k: v for k, v in pair_skips.items() if v},
        n_images=selection.n_images,
        n_images_used=state.n_feat,
        n_concepts=selection.n_concepts,
        feature_dim=dim,
        baseline_per_group=base_GS.mean(dim=1).tolist() if n_groups > 1 else None,
        config={
            "selection": asdict(config.selection),
            "baseline": {**asdict(config.baseline), "seeds": list(seeds), "groups": n_groups},
            "centring": "mean of per-image spatial means of the features over the images used",
            "skipped_image_examples": state.skipped_examples,
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
    )


def _skip_summary(state: _Pass) -> str:
    """'35 x invalid_image (e.g. image 0: ...), 1 x ...': the skipped images by reason."""
    if not state.image_skips:
        return "no image was processed"
    return ", ".join(
        f"{n} x {reason} (e.g. {state.skipped_examples.get(reason, '?')})"
        for reason, n in state.image_skips.most_common()
    )


def _undefined_reason(
    n_scored: int, skipped: dict[str, list[int]], base_mean: float, n_used: int, n_groups: int
) -> str | None:
    """Why C2 is NaN, or None when both of its terms are numbers."""
    reasons = []
    if n_scored == 0:
        by_reason = ", ".join(f"{len(v)} x {k}" for k, v in skipped.items() if v)
        reasons.append(f"no concept could be scored ({by_reason or 'no concepts'})")
    if not math.isfinite(base_mean):
        where = "in at least one group" if n_groups > 1 else f"got {n_used}"
        reasons.append(f"the random baseline needs at least 2 usable images ({where})")
    return "; ".join(reasons) or None
