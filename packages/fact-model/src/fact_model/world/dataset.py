"""The concept world: a deterministic, on-the-fly image generator with per-pixel ground truth.

``ConceptWorld(WorldConfig(seed=0)).sample(i, "test")`` is image ``i`` of the test split: its
pixels, its class, and a boolean mask per vocabulary concept. The same ``(seed, split, index)``
always gives the same bytes (each image has its own ``numpy.random.Generator`` seeded from that
triple; no global random state is read or written), and the three splits are independent
streams. The world also serves as a torchvision-style dataset (:meth:`ConceptWorld.
torch_dataset`), a Hugging Face ``datasets.Dataset`` (:meth:`ConceptWorld.hf_dataset`) and as
oracle features for ``c2score`` (:meth:`ConceptWorld.oracle_extractor`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fact_model.world.render import Layout, render, sample_layout
from fact_model.world.vocabulary import (
    CLASSES,
    CONCEPT_NAMES,
    ClassSpec,
    ConceptSpec,
    build_concepts,
)

if TYPE_CHECKING:
    import datasets

    from c2score import OracleFeatures

__all__ = [
    "SPLITS",
    "ConceptWorld",
    "WorldBatch",
    "WorldConfig",
    "WorldSample",
    "WorldTorchDataset",
    "masks_from_bits",
    "present_from_bits",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Part of every image's seed and of the hf_dataset fingerprint: bump it whenever a change to the
# generator changes the images, so cached datasets of the old world are never reused.
WORLD_VERSION = 2


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def _range(name: str, value: object, lo: float, hi: float) -> tuple[float, float]:
    pair = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else ()
    if len(pair) != 2 or not all(_is_real(v) for v in pair) or not lo <= pair[0] <= pair[1] <= hi:
        raise ValueError(
            f"{name} must be a pair (low, high) with {lo} <= low <= high <= {hi}, got {value!r}"
        )
    return float(pair[0]), float(pair[1])


def _prob(name: str, value: object) -> None:
    if not _is_real(value) or not 0.0 <= value <= 1.0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


_INT_FIELDS = ("image_size", "seed", "max_distractors", "clutter")
_REAL_FIELDS = (
    "max_rotation",
    "distractor_prob",
    "distractor_part_prob",
    "noise",
    "colour_jitter",
    "scene_jitter",
    "brightness_jitter",
)


@dataclass(frozen=True)
class WorldConfig:
    """Size, seed and difficulty of a concept world. All fields have working defaults.

    Lengths relative to the image are fractions of ``image_size``.
    """

    image_size: int = 64
    """Height = width of the images, in pixels (at least 16)."""
    seed: int = 0
    """Seed of the world: with the split and the index it determines every image."""
    scale_range: tuple[float, float] = (0.17, 0.24)
    """Radius of the main object, drawn uniformly from this range (fraction of the image)."""
    position_range: tuple[float, float] = (0.36, 0.64)
    """Each coordinate of the main object's centre is uniform in this range (fraction)."""
    max_rotation: float = 25.0
    """The main object is rotated by a uniform angle in [-max_rotation, max_rotation] degrees
    (distractors by any angle)."""
    max_distractors: int = 2
    """Number of distractor slots; each holds a distractor with ``distractor_prob``."""
    distractor_prob: float = 0.5
    """Probability of each distractor slot being used."""
    distractor_scale_range: tuple[float, float] = (0.07, 0.11)
    """Radius of distractor objects (fraction); its high end may not exceed the low end of
    ``scale_range``, so that the main object stays the largest one."""
    distractor_part_prob: float = 0.4
    """Probability that a distractor carries a part (its shape, colour and pattern are always
    uniform over the vocabulary, plain pattern included)."""
    clutter: int = 3
    """At most this many clutter strokes (uniform count in [0, clutter]), random colour, no
    concept."""
    noise: float = 6.0
    """Standard deviation of the (triangular, integer) pixel noise, in 0-255 units; 0 disables."""
    colour_jitter: float = 20.0
    """Each RGB channel of an object colour is offset by a uniform integer in +-colour_jitter."""
    scene_jitter: float = 12.0
    """The same for the two colours of the background scene."""
    brightness_jitter: float = 0.1
    """The whole image is scaled by a uniform factor in [1 - b, 1 + b] before the noise."""

    def __post_init__(self) -> None:
        if not _is_int(self.image_size) or self.image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {self.image_size!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        # Ranges are stored as tuples of floats whatever sequence was given (hashable, and
        # to_dict / from_dict round-trip them).
        for name, lo, hi in (
            ("scale_range", 0.02, 0.35),
            ("position_range", 0.0, 1.0),
            ("distractor_scale_range", 0.02, 0.35),
        ):
            object.__setattr__(self, name, _range(name, getattr(self, name), lo, hi))
        if self.distractor_scale_range[1] > self.scale_range[0]:
            raise ValueError(
                "distractor_scale_range must lie below scale_range (the main object is the "
                f"largest one): its high {self.distractor_scale_range[1]} exceeds scale_range's "
                f"low {self.scale_range[0]}"
            )
        if not _is_real(self.max_rotation) or not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation!r}")
        if not _is_int(self.max_distractors) or self.max_distractors < 0:
            raise ValueError(
                f"max_distractors must be an integer >= 0, got {self.max_distractors!r}"
            )
        if not _is_int(self.clutter) or self.clutter < 0:
            raise ValueError(f"clutter must be an integer >= 0, got {self.clutter!r}")
        _prob("distractor_prob", self.distractor_prob)
        _prob("distractor_part_prob", self.distractor_part_prob)
        for name in ("noise", "colour_jitter", "scene_jitter"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_real(self.brightness_jitter) or not 0.0 <= self.brightness_jitter < 1.0:
            raise ValueError(f"brightness_jitter must be in [0, 1), got {self.brightness_jitter!r}")
        # Plain Python numbers from here on (numpy scalars, ints given for floats), so that
        # equal settings give equal configs, dicts and fingerprints.
        for name in _INT_FIELDS:
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _REAL_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists); ``WorldConfig.from_dict`` inverts it."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WorldConfig fields {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@lru_cache(maxsize=8)
def _bit_values(n_concepts: int) -> np.ndarray:
    """int32 (n_concepts, 1, 1): ``1 << k`` (read-only)."""
    if not 0 <= n_concepts <= 31:
        raise ValueError(f"n_concepts must be in [0, 31] (int32 bit fields), got {n_concepts}")
    k = (np.int32(1) << np.arange(n_concepts, dtype=np.int32))[:, None, None]
    k.flags.writeable = False
    return k


def _check_bits(bits: np.ndarray) -> np.ndarray:
    bits = np.asarray(bits)
    if bits.ndim < 2 or not np.issubdtype(bits.dtype, np.integer):
        raise ValueError(
            f"bits must be an integer array (..., H, W), got {bits.dtype} {bits.shape}"
        )
    return bits


def masks_from_bits(bits: np.ndarray, n_concepts: int = len(CONCEPT_NAMES)) -> np.ndarray:
    """Boolean masks ``(..., n_concepts, H, W)`` from concept bit fields ``(..., H, W)``:
    ``masks[..., k, i, j] = (bits[..., i, j] >> k) & 1``."""
    bits = _check_bits(bits)
    k = _bit_values(n_concepts)
    h, w = bits.shape[-2:]
    out = np.empty((*bits.shape[:-2], n_concepts, h, w), dtype=bool)
    # One image at a time: the (n_concepts, H, W) temporaries stay in cache.
    flat_bits, flat_out = bits.reshape(-1, h, w), out.reshape(-1, n_concepts, h, w)
    for b, o in zip(flat_bits, flat_out):
        np.not_equal(b[None] & k, 0, out=o)
    return out


def present_from_bits(bits: np.ndarray, n_concepts: int = len(CONCEPT_NAMES)) -> np.ndarray:
    """bool ``(..., n_concepts)``: ``masks_from_bits(bits).any((-2, -1))``, without the masks."""
    bits = _check_bits(bits)
    h, w = bits.shape[-2:]
    union = np.bitwise_or.reduce(bits.reshape(*bits.shape[:-2], h * w), axis=-1)
    return (union[..., None] & _bit_values(n_concepts)[:, 0, 0]) != 0


@dataclass(frozen=True, eq=False)
class WorldSample:
    """One image with its ground truth."""

    image: np.ndarray
    """uint8 (H, W, 3)."""
    label: int
    """Class index (into :attr:`ConceptWorld.classes`)."""
    masks: np.ndarray
    """bool (n_concepts, H, W): the pixels of each concept; all False for an absent concept."""
    present: np.ndarray
    """bool (n_concepts,): ``masks.any((1, 2))``."""
    concept_bits: np.ndarray = field(repr=False)
    """int32 (H, W) packed form of ``masks`` (bit k = concept k; see :func:`masks_from_bits`)."""


@dataclass(frozen=True, eq=False)
class WorldBatch:
    """Stacked :class:`WorldSample` fields of several images."""

    images: np.ndarray
    """uint8 (N, H, W, 3)."""
    labels: np.ndarray
    """int64 (N,)."""
    masks: np.ndarray
    """bool (N, n_concepts, H, W)."""
    present: np.ndarray
    """bool (N, n_concepts)."""
    concept_bits: np.ndarray = field(repr=False)
    """int32 (N, H, W)."""
    indices: np.ndarray = field(repr=False)
    """int64 (N,): the world indices of the images."""

    def images_tensor(self) -> torch.Tensor:
        """float32 (N, 3, H, W) in [0, 1], the model's input layout."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)


def _check_split(split: str) -> int:
    try:
        return SPLITS.index(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}") from None


def _check_index(index: int) -> int:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"image index must be a non-negative integer, got {index!r}")
    return int(index)


class ConceptWorld:
    """A procedural world of images made of concepts, with exact per-pixel ground truth.

    Class ``c`` is the main object's combination of shape, colour, pattern and part from the
    shared vocabulary (see :mod:`fact_model.world.vocabulary`), in one of the class's two
    scenes; position, scale, rotation, colour jitter, clutter, distractor objects (which carry
    vocabulary concepts but not the class), brightness and noise vary freely. Labels are
    balanced by construction: image ``i`` of any split has class ``i % num_classes``.
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = WorldConfig() if config is None else config
        if not isinstance(self.config, WorldConfig):
            raise TypeError(f"config must be a WorldConfig, got {type(self.config).__name__}")
        self.class_specs: tuple[ClassSpec, ...] = CLASSES
        self._concepts = build_concepts(self.class_specs)

    def __repr__(self) -> str:
        return f"ConceptWorld({self.config!r})"

    # -- vocabulary ------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        """Class names, index = label."""
        return [c.name for c in self.class_specs]

    @property
    def num_classes(self) -> int:
        return len(self.class_specs)

    @property
    def concepts(self) -> list[ConceptSpec]:
        """The ground-truth concepts, index = mask channel = bit."""
        return list(self._concepts)

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self._concepts]

    @property
    def n_concepts(self) -> int:
        return len(self._concepts)

    @property
    def oracle_dim(self) -> int:
        """Channels of :meth:`oracle_features`: one per concept plus the "nothing" channel."""
        return self.n_concepts + 1

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # -- single images ---------------------------------------------------------------------

    def label(self, index: int, split: str = "train") -> int:
        """Class of image ``index`` (``index % num_classes``; the split does not matter)."""
        _check_split(split)
        return _check_index(index) % self.num_classes

    def rng(self, index: int, split: str = "train") -> np.random.Generator:
        """The image's own generator, seeded from ``(WORLD_VERSION, seed, split, index)``."""
        sid = _check_split(split)
        return np.random.default_rng([WORLD_VERSION, self.config.seed, sid, _check_index(index)])

    def layout(self, index: int, split: str = "train") -> Layout:
        """What image ``index`` shows (for re-rendering variants in tests and figures)."""
        label = self.label(index, split)
        return sample_layout(
            self.rng(index, split), label, self.class_specs[label], self.config, self.image_size
        )

    def render_layout(self, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint8 (H, W, 3), concept bits int32 (H, W))`` of a layout."""
        return render(layout, self.image_size, self.config.noise)

    def sample(self, index: int, split: str = "train") -> WorldSample:
        """Image ``index`` of ``split`` with its label and ground-truth masks."""
        lay = self.layout(index, split)
        image, bits = self.render_layout(lay)
        masks = masks_from_bits(bits, self.n_concepts)
        return WorldSample(image, lay.label, masks, present_from_bits(bits, self.n_concepts), bits)

    def oracle_features(self, index: int, split: str = "train") -> torch.Tensor:
        """float32 (n_concepts + 1, H, W) multi-hot concept membership of every pixel.

        Channel ``k < n_concepts`` is concept ``k``'s mask; the last channel marks pixels of no
        concept (clutter). Meant as one-hot-style ground-truth features for ``c2score``.
        """
        return self._oracle_from_bits(self._bits(index, split))

    def oracle_extractor(self, split: str = "test", start: int = 0) -> OracleFeatures:
        """``c2score.OracleFeatures`` whose image ``p`` is world image ``start + p`` of ``split``
        (the order of :meth:`torch_dataset` ``(split, n, start=start)``)."""
        from c2score import OracleFeatures

        _check_split(split)
        start = _check_index(start)
        return OracleFeatures(
            lambda p: self.oracle_features(start + int(p), split), self.oracle_dim
        )

    def _bits(self, index: int, split: str) -> np.ndarray:
        return self.render_layout(self.layout(index, split))[1]

    def _oracle_from_bits(self, bits: np.ndarray) -> torch.Tensor:
        out = np.empty((self.oracle_dim, *bits.shape), dtype=np.float32)
        out[:-1] = masks_from_bits(bits, self.n_concepts)
        out[-1] = bits == 0
        return torch.from_numpy(out)

    # -- many images -----------------------------------------------------------------------

    def batch(self, indices: Sequence[int] | np.ndarray, split: str = "train") -> WorldBatch:
        """The images ``indices`` of ``split``, stacked (same bytes as :meth:`sample` each)."""
        _check_split(split)
        idx = [_check_index(i) for i in indices]
        size = self.image_size
        images = np.empty((len(idx), size, size, 3), dtype=np.uint8)
        bits = np.empty((len(idx), size, size), dtype=np.int32)
        labels = np.empty(len(idx), dtype=np.int64)
        for n, i in enumerate(idx):
            lay = self.layout(i, split)
            images[n], bits[n] = self.render_layout(lay)
            labels[n] = lay.label
        masks = masks_from_bits(bits, self.n_concepts)
        present = present_from_bits(bits, self.n_concepts)
        return WorldBatch(images, labels, masks, present, bits, np.asarray(idx, dtype=np.int64))

    def images(self, split: str, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Only pixels and labels of images ``start .. start + n - 1``: uint8 (n, H, W, 3) and
        int64 (n,) (skips the masks; the fast path for training data)."""
        _check_split(split)
        start = _check_index(start)
        if not _is_int(n) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        size = self.image_size
        out = np.empty((n, size, size, 3), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        for k in range(n):
            lay = self.layout(start + k, split)
            out[k] = self.render_layout(lay)[0]
            labels[k] = lay.label
        return out, labels

    def torch_dataset(
        self,
        split: str,
        n: int,
        *,
        start: int = 0,
        in_memory: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> WorldTorchDataset:
        """A ``torch.utils.data.Dataset`` of images ``start .. start + n - 1`` of ``split``.

        Items are ``(float32 (3, H, W) in [0, 1], label)``; ``.targets`` and ``.classes`` as
        in torchvision datasets. ``in_memory`` renders all images once up front (uint8, 12 KiB
        per 64x64 image); otherwise each item is rendered when it is read.
        """
        return WorldTorchDataset(
            self, split, n, start=start, in_memory=in_memory, transform=transform
        )

    def fingerprint(self, split: str, n: int, start: int = 0) -> str:
        """Stable id of the images ``start .. start + n - 1`` of ``split`` (hex, 32 chars)."""
        payload = {
            "world_version": WORLD_VERSION,
            "config": self.config.to_dict(),
            "classes": [list(map(str, c)) for c in self.class_specs],
            "split": split,
            "n": n,
            "start": start,
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def hf_features(self) -> datasets.Features:
        """The ``datasets.Features`` of :meth:`hf_dataset`."""
        import datasets

        size = self.image_size
        return datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=self.classes),
                "index": datasets.Value("int64"),
                "present": datasets.List(datasets.Value("bool"), length=self.n_concepts),
                "concept_bits": datasets.Array2D(shape=(size, size), dtype="int32"),
            }
        )

    def hf_dataset(
        self,
        split: str,
        n: int,
        *,
        start: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> datasets.Dataset:
        """Images ``start .. start + n - 1`` of ``split`` as a Hugging Face ``datasets.Dataset``.

        Columns: ``image`` (``datasets.Image``, stored as lossless PNG, so it decodes to the
        exact pixels), ``label`` (``ClassLabel`` with :attr:`classes`), ``index`` (the world
        index), ``present`` (``n_concepts`` booleans) and ``concept_bits`` (int32 (H, W),
        ``Array2D``): the concept masks packed as bits, decoded by :func:`masks_from_bits`
        (``masks_from_bits(np.asarray(row["concept_bits"]))``). Built with
        ``Dataset.from_generator`` under the explicit :meth:`fingerprint`, written to
        ``cache_dir`` (default: the ``datasets`` cache) and reused from there; no network.
        """
        import datasets

        _check_split(split)
        start = _check_index(start)
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        n = int(n)
        return datasets.Dataset.from_generator(
            _hf_rows,
            features=self.hf_features(),
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            gen_kwargs={"config": self.config.to_dict(), "split": split, "start": start, "n": n},
            fingerprint=self.fingerprint(split, n, start),
            split=datasets.Split(split),
        )


def _hf_rows(config: dict[str, Any], split: str, start: int, n: int) -> Iterator[dict[str, Any]]:
    world = ConceptWorld(WorldConfig.from_dict(config))
    for i in range(start, start + n):
        s = world.sample(i, split)
        yield {
            "image": s.image,
            "label": s.label,
            "index": i,
            "present": s.present.tolist(),
            "concept_bits": s.concept_bits,
        }


class WorldTorchDataset(Dataset):
    """Torch view of a contiguous range of one split (see :meth:`ConceptWorld.torch_dataset`)."""

    def __init__(
        self,
        world: ConceptWorld,
        split: str,
        n: int,
        *,
        start: int = 0,
        in_memory: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        _check_split(split)
        start = _check_index(start)
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        n = int(n)
        self.world, self.split, self.start, self.n = world, split, start, n
        self.transform = transform
        self.classes: list[str] = world.classes
        self.targets: list[int] = [world.label(start + k, split) for k in range(n)]
        self._images: torch.Tensor | None = None
        if in_memory:
            images, _ = world.images(split, n, start)
            self._images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return self.n

    def world_index(self, i: int) -> int:
        """World index of item ``i``."""
        return self.start + i

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for a dataset of {self.n} images")
        i %= self.n
        if self._images is not None:
            x = self._images[i].float().div_(255.0)
        else:
            lay = self.world.layout(self.start + i, self.split)
            img = self.world.render_layout(lay)[0]
            x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]
