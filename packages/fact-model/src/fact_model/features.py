"""Importance-sampled feature sets for SAE training (paper App. A, Eq. A.1).

For every training image, M positions of the layer's output are drawn **without replacement**
with probability proportional to the absolute B-cos contribution of each position to the
predicted logit in the original B-cos model (``|sum_c f_c(p) * d logit / d f_c(p)|`` in
explanation mode), and their feature vectors stored. The paper holds out 50 images per class
and chooses M so that a set stays under 170 GB (for ResNet-50 ``layer4``: M = 16 of 49).

Sampling uses the Gumbel-top-k trick (the top M of ``log w + Gumbel noise`` is distributed as
successive sampling without replacement, i.e. ``torch.multinomial(w, M)``) with noise drawn
from a generator seeded by ``(seed, image index)``: the draw of an image does not depend on the
batch it is in, so an interrupted extraction resumes to exactly the vectors of an
uninterrupted run. Positions with zero contribution are never drawn; an image with fewer than
M positive positions contributes all of them.

Vectors go to two ``topk-sae`` sharded stores, ``train/`` and ``heldout/``, with per-row
``image_index``, ``position`` and ``label``. Provenance (backbone, layer, weights hash,
transform, seed, M, split) lives in the store attributes and is checked when training from a
store. Shards are flushed only at batch boundaries, and the progress record is committed with
them atomically, so a crash loses at most the rows of unflushed batches.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bcos_layers import explanation_mode
from fact_model._atomic import atomic_write_json
from fact_model.data import IndexedImages, SkipLog, image_loader
from fact_model.splice import ConceptLayer, Recorder, find_module, set_module
from topk_sae import FeatureStoreWriter, ShardedFeatureStore, merge_stores
from topk_sae import distributed as dist
from topk_sae.store import MERGE_PLAN_NAME

__all__ = [
    "PAPER_BUDGET_BYTES",
    "FeatureConfig",
    "FeatureSet",
    "extract_features",
    "heldout_split",
    "open_feature_set",
    "position_weights",
    "sample_positions",
    "samples_per_image",
]

PAPER_BUDGET_BYTES = 170 * 10**9
"""The paper's cap on one feature set (App. A): 170 GB."""
FORMAT = "fact-features"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureConfig:
    """How a feature set is built (everything that determines its rows, with the data).

    Attributes:
        layer: the backbone module whose output is sampled (e.g. ``"layer4"``).
        samples_per_image: M, positions drawn per image; ``None`` derives it from
            ``budget_bytes`` (:func:`samples_per_image`).
        budget_bytes: storage budget of the training set when M is derived (paper: 170 GB).
        heldout_per_class: images per class held out for checkpoint selection (paper: 50);
            0 holds out nothing.
        seed: seed of the held-out split and of the position sampling.
        batch_size: images per forward/backward pass.
        dtype: on-disk dtype of the vectors (``float32``, ``float16`` or ``bfloat16``).
        flush_rows: rows per shard (a shard is written at the first batch boundary past it).
        autocast_bf16: run the backbone forward and the contribution backward in bfloat16
            autocast (faster on GPUs with bf16 tensor cores). The stored vectors are then the
            bf16 network's; it is recorded in the provenance, so such a set is never mixed with
            a float32 one. Explanations and completeness checks always run in float32.
    """

    layer: str
    samples_per_image: int | None = None
    budget_bytes: int = PAPER_BUDGET_BYTES
    heldout_per_class: int = 50
    seed: int = 0
    batch_size: int = 64
    dtype: str = "float32"
    flush_rows: int = 1 << 16
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"layer must be a module name, got {self.layer!r}")
        m = self.samples_per_image
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise ValueError(f"samples_per_image must be a positive integer or None, got {m!r}")
        for name in ("budget_bytes", "batch_size", "flush_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.heldout_per_class, int) or self.heldout_per_class < 0:
            raise ValueError(f"heldout_per_class must be >= 0, got {self.heldout_per_class!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")


class FeatureSet(NamedTuple):
    """An extracted feature set: the two stores and what they were made from."""

    root: Path
    train: ShardedFeatureStore
    heldout: ShardedFeatureStore | None
    provenance: dict[str, Any]
    heldout_indices: list[int]
    """Dataset indices of the held-out images (FaCT accuracy for checkpoint selection)."""
    skipped: dict[str, Any]
    """Unreadable images: counts per reason and examples."""


# ----------------------------------------------------------------------------- sampling
def sample_positions(
    weights_BP: Tensor, m: int, generators: Sequence[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """Draw ``m`` positions per row without replacement, with probability proportional to the
    (non-negative) weights; one generator per row.

    Returns ``(positions (B, m) int64, count (B,))``: a row with fewer than ``m`` positive
    weights gets all of them (ordered by the draw) and ``count`` says how many are valid; the
    rest of its row is padding (-1).
    """
    if weights_BP.ndim != 2 or len(generators) != weights_BP.shape[0]:
        raise ValueError("weights must be (B, P) with one generator per row")
    if bool((weights_BP < 0).any()) or not bool(torch.isfinite(weights_BP).all()):
        raise ValueError("sampling weights must be finite and non-negative")
    p = weights_BP.shape[1]
    m = min(m, p)
    w = weights_BP.double().cpu()
    u = torch.stack([torch.rand(p, generator=g, dtype=torch.float64) for g in generators])
    # Gumbel-top-k: argtop_m(log w - log(-log u)) ~ successive sampling without replacement.
    keys = torch.where(w > 0, w.log() - (-u.clamp_min(1e-300).log()).log(), -math.inf)
    top = keys.topk(m, dim=1)
    valid = torch.isfinite(top.values)
    positions = torch.where(valid, top.indices, torch.full_like(top.indices, -1))
    return positions, valid.sum(1)


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one image's draw: a function of (seed, image index) only."""
    digest = hashlib.sha256(f"fact-features:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def samples_per_image(
    n_images: int, channels: int, positions: int, budget_bytes: int, itemsize: int = 4
) -> int:
    """M from a storage budget: ``floor(budget / (n_images * channels * itemsize))``, at least 1
    and at most the number of positions (App. A: at most 170 GB per set)."""
    if n_images <= 0:
        return min(positions, 1)
    m = budget_bytes // (n_images * channels * itemsize)
    return int(max(1, min(positions, m)))


def heldout_split(labels: Sequence[int], per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): ``per_class`` random images of every class held out
    (all of a class's images if it has fewer; paper App. A: 50 per class)."""
    labels_np = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xFAC7])
    held: list[int] = []
    for cls in np.unique(labels_np):
        members = np.flatnonzero(labels_np == cls)
        take = min(per_class, len(members))
        held += rng.choice(members, size=take, replace=False).tolist() if take else []
    held_set = set(held)
    train = [i for i in range(len(labels_np)) if i not in held_set]
    return train, sorted(held)


# ----------------------------------------------------------------------------- contributions
class _Tap:
    """A private copy of a B-cos backbone with a recording tap at ``layer``."""

    def __init__(self, backbone: nn.Module, layer: str) -> None:
        from fact_model.model import FaCT

        if isinstance(backbone, FaCT):
            backbone = backbone.backbone_module()
        self.model = copy.deepcopy(backbone).eval()
        set_module(self.model, layer, ConceptLayer(find_module(self.model, layer), None, layer))
        self.tap = self.model.get_submodule(layer)
        assert isinstance(self.tap, ConceptLayer)


def position_weights(
    backbone: nn.Module | _Tap, x: Tensor, layer: str, *, autocast_bf16: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. A.1 weights: ``|contribution|`` of every position of ``layer`` to the predicted
    logit, in the original B-cos model (explanation mode).

    Returns ``(weights (B, P), features (B, P, C), predicted (B,))``, positions row-major
    (``h * W + w`` for maps, the token index for ViT layers).
    """
    tap = backbone if isinstance(backbone, _Tap) else _Tap(backbone, layer)
    rec = Recorder(leaf_codes=True)
    tap.tap.recorder = rec
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    try:
        with torch.enable_grad(), explanation_mode(tap.model), autocast:
            logits = tap.model(x)
            feats = rec.features
            assert feats is not None
            pred = logits.float().argmax(1)
            (g,) = torch.autograd.grad(logits.gather(1, pred[:, None]).float().sum(), feats)
    finally:
        tap.tap.recorder = None
    feats, g = feats.detach().float(), g.float()
    if feats.ndim == 4:
        contrib = (feats * g).sum(1).flatten(1)  # (B, H*W)
        rows = feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
    elif feats.ndim == 3:
        contrib = (feats * g).sum(2)  # (B, T)
        rows = feats
    else:
        raise ValueError(f"layer {layer!r} output {tuple(feats.shape)} is neither a map nor tokens")
    return contrib.abs(), rows, pred


def _weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        t = value.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _provenance(
    backbone: nn.Module, config: FeatureConfig, m: int, dataset: IndexedImages, describe: str | None
) -> dict[str, Any]:
    from fact_model.model import FaCT, _infer_spec

    plain = backbone.backbone_module() if isinstance(backbone, FaCT) else backbone
    spec = _infer_spec(plain)
    cfg = getattr(plain, "pretrained_cfg", None)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": spec.to_dict() if spec is not None else type(plain).__name__,
        "weights_sha256": _weights_hash(plain),
        "layer": config.layer,
        "transform": repr(getattr(dataset, "transform", None))
        if cfg is None
        else {"resize": cfg.resize_size, "crop": cfg.crop_size},
        "seed": config.seed,
        "samples_per_image": m,
        "heldout_per_class": config.heldout_per_class,
        "dataset": describe or f"{type(dataset.source).__name__} of {len(dataset)} images",
        "n_images": len(dataset),
        "sampling": "gumbel-top-k |B-cos contribution to the predicted logit| (Eq. A.1)",
        # Only when set: stores extracted before this option existed keep their provenance.
        **({"autocast": "bfloat16"} if config.autocast_bf16 else {}),
    }


def _check_provenance(path: Path, expected: dict[str, Any]) -> None:
    if not (path / "manifest.json").exists():
        return
    stored = ShardedFeatureStore(path, allow_incomplete=True).attributes.get("provenance")
    if stored is None:
        raise ValueError(
            f"{path} is a feature store without FaCT provenance; use another directory"
        )
    diff = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
    if diff:
        detail = "; ".join(
            f"{k}: stored {stored.get(k)!r}, now {expected.get(k)!r}" for k in diff[:4]
        )
        raise ValueError(
            f"the feature store {path} was extracted with other settings ({detail}); it belongs "
            "to another model, layer or dataset. Use a new output directory."
        )


def _extract_split(
    tap: _Tap,
    dataset: IndexedImages,
    indices: list[int],
    path: Path,
    provenance: dict[str, Any],
    config: FeatureConfig,
    m: int,
    device: Any,
    progress: bool,
    desc: str,
) -> ShardedFeatureStore:
    _check_provenance(path, provenance)
    dtype = getattr(torch, config.dtype)
    channels = int(provenance["channels"])
    writer = FeatureStoreWriter(
        path,
        channels,
        dtype=dtype,
        shard_rows=1 << 62,  # shards are cut by this function, at batch boundaries only
        metadata=("image_index", "position", "label"),
        attributes={"provenance": provenance},
    )
    done = int(writer.attributes.get("images_done", 0))
    skipped: list[list[Any]] = list(writer.attributes.get("skipped", []))
    if writer.attributes.get("finished") and done == len(indices):
        writer.close()
        return ShardedFeatureStore(path)
    todo = indices[done:]
    loader = image_loader(dataset, batch_size=config.batch_size, indices=todo)
    bar = tqdm(total=len(indices), initial=done, desc=desc, unit="img", disable=not progress)
    log = SkipLog()
    try:
        for batch in loader:
            log.add(batch.skipped)
            skipped += [[i, r] for i, r in batch.skipped]
            n_items = len(batch.indices) + len(batch.skipped)
            if len(batch.indices):
                x = batch.images.to(device) if device is not None else batch.images
                weights, rows, _ = position_weights(
                    tap, x, config.layer, autocast_bf16=config.autocast_bf16
                )
                gens = [image_generator(config.seed, int(i)) for i in batch.indices]
                pos, _ = sample_positions(weights.cpu(), m, gens)
                rows = rows.cpu()
                keep = pos >= 0
                b_idx = torch.arange(len(pos))[:, None].expand_as(pos)[keep]
                p_idx = pos[keep]
                writer.append(
                    rows[b_idx, p_idx].to(dtype),
                    image_index=batch.indices[b_idx],
                    position=p_idx,
                    label=batch.labels[b_idx],
                )
            done += n_items
            bar.update(n_items)
            if writer.num_pending >= config.flush_rows:
                writer.attributes.update(images_done=done, skipped=skipped)
                writer.flush()  # shard + progress record, one atomic manifest write
        writer.attributes.update(images_done=done, skipped=skipped, finished=True)
        writer.close()
    finally:
        bar.close()
    return ShardedFeatureStore(path)


def _extract_split_sharded(
    tap: _Tap,
    dataset: IndexedImages,
    indices: list[int],
    path: Path,
    provenance: dict[str, Any],
    config: FeatureConfig,
    m: int,
    device: Any,
    progress: bool,
    desc: str,
) -> ShardedFeatureStore:
    """``_extract_split`` across the ranks of a process group: rank r extracts its contiguous
    share of ``indices`` into ``<path>.parts/rank-r-of-W`` (resumable on its own), then rank 0
    merges the parts in rank order into ``path`` -- the rows and order of one process."""
    world, rank = dist.world_size(), dist.rank()
    hashes = dist.all_gather_object(provenance["weights_sha256"])
    if len(set(hashes)) > 1:
        raise ValueError(
            "the ranks hold different backbones (weights hashes "
            f"{sorted({h[:12] for h in hashes})}); load the same weights on every rank (or seed "
            "a random initialisation identically) before extracting"
        )
    plan = path / MERGE_PLAN_NAME
    if (path / "manifest.json").is_file() and not plan.exists():
        _check_provenance(path, provenance)
        dist.barrier()
        return ShardedFeatureStore(path)
    parts_root = path.with_name(path.name + ".parts")
    names = [f"rank-{r:05d}-of-{world:05d}" for r in range(world)]
    if not plan.exists():
        if parts_root.is_dir():
            other = sorted(p.name for p in parts_root.iterdir() if p.name not in names)
            if other:
                raise ValueError(
                    f"{parts_root} holds the partial extraction of another number of ranks "
                    f"({other[:2]}); resume it with that many ranks, or delete {parts_root} "
                    "to start this split again"
                )
        share = indices[dist.rank_slice(len(indices))]
        _extract_split(
            tap, dataset, share, parts_root / names[rank], {**provenance, "rank": f"{rank}/{world}"},
            config, m, device, progress and rank == 0, f"{desc} rank 0/{world}",
        )  # fmt: skip
    dist.barrier()
    if rank == 0:
        parts = [parts_root / n for n in names]
        skipped: list[Any] = []
        if not plan.exists():
            for part in parts:
                skipped += ShardedFeatureStore(part).attributes.get("skipped", [])
        merge_stores(
            parts,
            path,
            attributes={
                "provenance": provenance,
                "images_done": len(indices),
                "skipped": skipped,
                "finished": True,
            },
        )
        shutil.rmtree(parts_root, ignore_errors=True)
    dist.barrier()
    return ShardedFeatureStore(path)


def extract_features(
    backbone: nn.Module,
    dataset: IndexedImages,
    out_dir: str | os.PathLike[str],
    config: FeatureConfig,
    *,
    device: Any = None,
    progress: bool = True,
    describe: str | None = None,
) -> FeatureSet:
    """Extract (or resume extracting) the importance-sampled feature set of ``config.layer``.

    ``backbone``: the B-cos network (or a FaCT model: its original backbone is used).
    ``describe``: how the dataset is named in the provenance (e.g. ``"imagefolder:/data/train"``).
    Running it again on a finished set returns it; on a set from another model, layer, dataset
    or setting it raises instead of mixing rows.

    Under ``torchrun`` (a process group of several ranks; call it on every rank with the same
    arguments and an ``out_dir`` all ranks share) each rank extracts a contiguous share of the
    images and rank 0 merges the shares: the result has the same vectors in the same order as
    one process. An interrupted run resumes per rank with the same number of ranks.
    ``device="cuda"`` then means ``cuda:LOCAL_RANK``; nothing goes to CUDA unless asked.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tap = _Tap(backbone, config.layer)
    if device is not None:
        device = dist.resolve_device(device)
        tap.model.to(device)
    labels = dataset.targets
    train_idx, held_idx = heldout_split(labels, config.heldout_per_class, config.seed)
    # Shape of the layer output (one probe image) for M and the channel count.
    probe = next(i for i in range(len(dataset)) if dataset[i][0] is not None)
    x0 = dataset[probe][0][None]
    x0 = x0.to(device) if device is not None else x0
    _, rows0, _ = position_weights(tap, x0, config.layer, autocast_bf16=config.autocast_bf16)
    positions, channels = int(rows0.shape[1]), int(rows0.shape[2])
    itemsize = getattr(torch, config.dtype).itemsize
    m = config.samples_per_image or samples_per_image(
        len(train_idx), channels, positions, config.budget_bytes, itemsize
    )
    m = min(m, positions)
    prov = _provenance(backbone, config, m, dataset, describe)
    prov.update(channels=channels, positions=positions)
    split_info = {"train": len(train_idx), "heldout": held_idx, "provenance": prov}
    if dist.rank() == 0:
        atomic_write_json(root / "split.json", split_info)
    extract = _extract_split_sharded if dist.is_distributed() else _extract_split
    train = extract(
        tap,
        dataset,
        train_idx,
        root / "train",
        {**prov, "split": "train"},
        config,
        m,
        device,
        progress,
        f"features {config.layer} (train)",
    )
    held = None
    if held_idx:
        held = extract(
            tap,
            dataset,
            held_idx,
            root / "heldout",
            {**prov, "split": "heldout"},
            config,
            m,
            device,
            progress,
            f"features {config.layer} (held-out)",
        )
    return _feature_set(root, train, held, prov, held_idx)


def _feature_set(
    root: Path,
    train: ShardedFeatureStore,
    held: ShardedFeatureStore | None,
    prov: dict[str, Any],
    held_idx: list[int],
) -> FeatureSet:
    skipped = list(train.attributes.get("skipped", [])) + (
        list(held.attributes.get("skipped", [])) if held else []
    )
    log = SkipLog()
    log.add([(int(i), str(r)) for i, r in skipped])
    return FeatureSet(root, train, held, prov, held_idx, log.summary())


def open_feature_set(
    path: str | os.PathLike[str], *, backbone: nn.Module | None = None, layer: str | None = None
) -> FeatureSet:
    """Open a finished feature set; with ``backbone`` / ``layer``, check it was made from them
    (same weights hash and layer) -- a set from another model or layer is refused."""
    root = Path(path)
    if not (root / "train" / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a FaCT feature set (no train/manifest.json); run `fact features` first"
        )
    train = ShardedFeatureStore(root / "train")
    prov = dict(train.attributes.get("provenance", {}))
    if prov.get("format") != FORMAT:
        raise ValueError(
            f"{root / 'train'} has no FaCT provenance; it was not written by fact features"
        )
    if layer is not None and prov.get("layer") != layer:
        raise ValueError(f"the feature set {root} is of layer {prov.get('layer')!r}, not {layer!r}")
    if backbone is not None:
        from fact_model.model import FaCT

        plain = backbone.backbone_module() if isinstance(backbone, FaCT) else backbone
        if _weights_hash(plain) != prov.get("weights_sha256"):
            raise ValueError(
                f"the feature set {root} was extracted from another backbone (weights hash "
                f"{str(prov.get('weights_sha256'))[:12]}... differs from this model's)"
            )
    held = (
        ShardedFeatureStore(root / "heldout")
        if (root / "heldout" / "manifest.json").is_file()
        else None
    )
    split = root / "split.json"
    held_idx = []
    if split.is_file():
        import json

        held_idx = [int(i) for i in json.loads(split.read_text())["heldout"]]
    prov.pop("split", None)
    return _feature_set(root, train, held, prov, held_idx)


def config_dict(config: FeatureConfig) -> dict[str, Any]:
    return asdict(config)
