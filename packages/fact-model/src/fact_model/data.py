"""Image data for FaCT: torchvision ``ImageFolder``, Hugging Face ``datasets``, tensors, the
embedded concept world -- one loader that yields ``(images, labels, indices)`` batches.

Every source becomes an :class:`IndexedImages` dataset: item ``i`` is the B-cos input tensor of
image ``i`` (the backbone's evaluation transform: resize, centre crop, [0, 1], ``[x, 1 - x]``),
its label and ``i`` itself, so results can always be traced back to an image. An image that
cannot be read or transformed is **skipped, counted and reported** (never silently dropped):
each batch carries the ``(index, reason)`` of the items it skipped, and :class:`SkipLog` sums
them up for the final report.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bcos_layers import AddInverse, eval_transform

__all__ = [
    "Batch",
    "ImageSource",
    "IndexedImages",
    "SkipLog",
    "TensorImages",
    "eval_transform_for",
    "image_loader",
    "open_dataset",
]


class Batch(NamedTuple):
    """A batch of B-cos inputs with their labels, dataset indices and the skipped items."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    skipped: list[tuple[int, str]]


@dataclass
class SkipLog:
    """Unreadable images seen by a pass: counts per reason and a few examples."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def add(self, skipped: Sequence[tuple[int, str]]) -> None:
        for index, reason in skipped:
            key = reason.split(":", 1)[0]
            self.counts[key] += 1
            self.examples.setdefault(key, [])
            if len(self.examples[key]) < 5:
                self.examples[key].append(int(index))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipLog) -> None:
        """Add another pass's log (e.g. another rank's), keeping at most 5 examples a reason."""
        self.counts.update(other.counts)
        for key, ids in other.examples.items():
            mine = self.examples.setdefault(key, [])
            mine.extend(ids[: max(0, 5 - len(mine))])

    def gathered(self) -> SkipLog:
        """The log of all ranks of a process group merged in rank order (self in one process)."""
        from topk_sae import distributed as dist

        if not dist.is_distributed():
            return self
        merged = SkipLog()
        for log in dist.all_gather_object(self):
            merged.merge(log)
        return merged

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.total, "reasons": dict(self.counts), "examples": self.examples}

    def __str__(self) -> str:
        if not self.total:
            return "no image skipped"
        parts = [
            f"{n} x {reason} (e.g. indices {self.examples[reason]})"
            for reason, n in self.counts.items()
        ]
        return f"{self.total} unreadable image(s) skipped: " + "; ".join(parts)


class ImageSource(Dataset):
    """What a raw source must offer: ``len``, ``get(i) -> (image, label)`` and class names."""

    classes: list[str]

    def get(self, index: int) -> tuple[Any, int]:  # pragma: no cover - interface
        raise NotImplementedError


def _to_transformable(image: Any) -> Any:
    """PIL images stay PIL; uint8 HxWx3 arrays become PIL; CHW float tensors stay tensors."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"array images must be uint8 (H, W, 3), got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image if image.shape[2] != 1 else image[:, :, 0])
    return image


class IndexedImages(Dataset):
    """``dataset[i] -> (image tensor, label, i)``, or ``(None, reason, i)`` if unreadable.

    Args:
        source: an :class:`ImageSource` (see :func:`open_dataset`).
        transform: PIL image (or [0, 1] CHW tensor) -> B-cos input tensor.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Any], Tensor]) -> None:
        self.source = source
        self.transform = transform
        self.classes = list(getattr(source, "classes", []))

    def __len__(self) -> int:
        return len(self.source)

    @property
    def targets(self) -> list[int]:
        """Labels of every item (read from the source without decoding images when possible)."""
        labels = getattr(self.source, "targets", None)
        if labels is not None:
            return [int(t) for t in labels]
        return [int(self.source.get(i)[1]) for i in range(len(self))]

    def __getitem__(self, index: int) -> tuple[Tensor | None, int | str, int]:
        try:
            image, label = self.source.get(index)
            x = self.transform(_to_transformable(image))
            if not isinstance(x, Tensor) or not torch.isfinite(x).all():
                return None, "bad-pixels: the transformed image is not a finite tensor", index
            return x, int(label), index
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # PIL raises UnidentifiedImageError (an OSError) for unreadable files.
            return None, f"{type(err).__name__}: {err}", index


def collate(items: Sequence[tuple[Tensor | None, int | str, int]]) -> Batch:
    """Stack the readable items; list the unreadable ones with their reason."""
    good = [(x, y, i) for x, y, i in items if x is not None]
    skipped = [(int(i), str(y)) for x, y, i in items if x is None]
    if not good:
        return Batch(
            torch.empty(0),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
            skipped,
        )
    shapes = {tuple(x.shape) for x, _, _ in good}
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch have different shapes {sorted(shapes)}: use a transform with a "
            "fixed crop (the B-cos eval transform crops to 224)"
        )
    return Batch(
        torch.stack([x for x, _, _ in good]),
        torch.tensor([y for _, y, _ in good], dtype=torch.long),
        torch.tensor([i for _, _, i in good], dtype=torch.long),
        skipped,
    )


WORKERS_ENV = "FACT_DATA_WORKERS"
"""Environment variable giving the default number of image-decoding worker processes of every
image pass (``fact ... --workers N`` sets it); unset: 0, decoding in the main process."""


def default_workers() -> int:
    """The number of loader workers when a pass is not given one (``$FACT_DATA_WORKERS``)."""
    raw = os.environ.get(WORKERS_ENV, "0")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{WORKERS_ENV}={raw!r} is not a number of worker processes") from None
    if n < 0:
        raise ValueError(f"{WORKERS_ENV} must be >= 0, got {n}")
    return n


def rank_share(dataset: IndexedImages, indices: Sequence[int] | None) -> list[int] | None:
    """This rank's contiguous share of ``indices`` (default: every image) under ``torchrun``;
    ``indices`` unchanged in one process. The shares concatenate, in rank order, to the whole."""
    from topk_sae import distributed as dist

    if not dist.is_distributed():
        return indices if indices is None else list(indices)
    everything = list(range(len(dataset))) if indices is None else list(indices)
    return everything[dist.rank_slice(len(everything))]


def image_loader(
    dataset: IndexedImages,
    *,
    batch_size: int = 64,
    indices: Sequence[int] | None = None,
    num_workers: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` (optionally a subset, in the given order) yielding
    :class:`Batch`; order is deterministic (no shuffling) whatever the number of workers.

    ``num_workers``: processes decoding images in parallel (``None``: :func:`default_workers`).
    On a GPU, JPEG decoding in one process caps a pass at a few hundred images per second.
    """
    from torch.utils.data import Subset

    data: Dataset = dataset if indices is None else Subset(dataset, list(indices))
    workers = default_workers() if num_workers is None else int(num_workers)
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=False,
    )


# ----------------------------------------------------------------------------- sources
class FolderImages(ImageSource):
    """A torchvision ``ImageFolder`` tree (``root/<class>/<image>``); images are opened lazily."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        # Identity loader: files are opened in get(), where a failure is caught and reported.
        self.folder = ImageFolder(str(root), loader=lambda path: path)
        self.classes = list(self.folder.classes)
        self.targets = list(self.folder.targets)

    def __len__(self) -> int:
        return len(self.folder)

    def get(self, index: int) -> tuple[Any, int]:
        path, label = self.folder.samples[index]
        with Image.open(path) as img:
            img.load()
            return img.copy(), int(label)


class HFImages(ImageSource):
    """A Hugging Face ``datasets`` image dataset (e.g. an ImageNet-1k copy the user has)."""

    def __init__(
        self, dataset: Any, image_column: str | None = None, label_column: str | None = None
    ) -> None:
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"expected a datasets.Dataset (map-style, e.g. load_dataset(..., split='train')), got "
                f"{type(dataset).__name__}"
            )
        feats = dataset.features
        if image_column is None:
            found = [k for k, v in feats.items() if isinstance(v, datasets.Image)]
            if not found:
                raise ValueError(f"no image column (datasets.Image feature) among {list(feats)}")
            image_column = found[0]
        if label_column is None:
            found = [k for k in ("label", "labels", "fine_label") if k in feats]
            if not found:
                raise ValueError(f"no label column ('label'/'labels') among {list(feats)}")
            label_column = found[0]
        label_feature = feats[label_column]
        self.classes = list(getattr(label_feature, "names", []) or [])
        self.dataset = dataset
        self.image_column, self.label_column = image_column, label_column
        # Decoding is done in get() so that a broken image is caught per item.
        self._raw = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.targets = list(dataset[label_column])

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Any, int]:
        import io

        row = self._raw[index]
        item = row[self.image_column]
        if item.get("bytes") is not None:
            img = Image.open(io.BytesIO(item["bytes"]))
        else:
            img = Image.open(item["path"])
        img.load()
        return img, int(row[self.label_column])


class TensorImages(ImageSource):
    """In-memory images: (N, 3, H, W) float in [0, 1] or uint8, with labels."""

    def __init__(
        self, images: Tensor, labels: Tensor | Sequence[int], classes: Sequence[str] | None = None
    ) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (3, 6):
            raise ValueError(
                f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', None)}"
            )
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images = images
        self.targets = [int(t) for t in labels]
        n = int(labels.max()) + 1 if len(labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n)]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        if img.dtype == torch.uint8:
            img = img.float() / 255
        return img, self.targets[index]


class _TensorTransform:
    """B-cos input for tensors already at the model's resolution ([0, 1] RGB -> 6 channels)."""

    def __init__(self, pil_transform: Callable[[Any], Tensor]) -> None:
        self.pil_transform = pil_transform
        self.add_inverse = AddInverse()

    def __call__(self, image: Any) -> Tensor:
        if isinstance(image, Tensor):
            if image.shape[0] == 6:
                return image.float()
            if image.min() < 0 or image.max() > 1:
                raise ValueError("tensor images must lie in [0, 1]")
            return self.add_inverse(image.float())
        return self.pil_transform(image)


def eval_transform_for(model: Any) -> Callable[[Any], Tensor]:
    """The evaluation transform of a FaCT model or B-cos backbone (PIL or [0, 1] tensors)."""
    cfg = getattr(model, "pretrained_cfg", None)
    resize = getattr(cfg, "resize_size", None)
    crop = getattr(cfg, "crop_size", None) or getattr(model, "input_size", None) or 224
    return _TensorTransform(eval_transform(int(resize or crop), int(crop)))


def open_dataset(spec: str | Any, *, split: str | None = None) -> ImageSource:
    """An :class:`ImageSource` from a spec string or an object.

    Specs: ``imagefolder:PATH``; ``hf:NAME[:SPLIT]`` (``datasets.load_dataset``, uses the local
    cache offline); ``hf-disk:PATH[:SPLIT]`` (``datasets.load_from_disk``); ``world[:SPLIT]``
    (the embedded concept world). Objects: a ``datasets.Dataset`` or an :class:`ImageSource`.
    """
    if isinstance(spec, ImageSource):
        return spec
    if not isinstance(spec, str):
        return HFImages(spec)
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder":
        if not rest:
            raise ValueError("imagefolder needs a path: imagefolder:/data/imagenet/train")
        return FolderImages(rest)
    if kind in ("hf", "hf-disk"):
        import datasets

        name, _, spl = rest.rpartition(":") if rest.count(":") else (rest, "", "")
        spl = spl or split or "train"
        if kind == "hf":
            return HFImages(datasets.load_dataset(name, split=spl))
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if spl not in loaded:
                raise ValueError(f"{name} has splits {list(loaded)}, not {spl!r}")
            loaded = loaded[spl]
        return HFImages(loaded)
    if kind == "world":
        from fact_model.world_source import WorldImages

        return WorldImages.from_spec(rest, split)
    raise ValueError(
        f"unknown dataset spec {spec!r}; use imagefolder:PATH, hf:NAME[:SPLIT], "
        "hf-disk:PATH[:SPLIT] or world[:SPLIT]"
    )


def iterate(loader: DataLoader, log: SkipLog | None = None) -> Iterator[Batch]:
    """Batches of ``loader``, recording skipped items in ``log``; empty batches are dropped."""
    for batch in loader:
        if log is not None:
            log.add(batch.skipped)
        if batch.images.numel():
            yield batch
