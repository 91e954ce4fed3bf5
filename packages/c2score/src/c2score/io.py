"""Inputs of the C2-score: activation tables, attribution maps and images; atomic writes.

File formats (all safetensors, never pickle):

* activation table, dense: key ``activations``, float (N images, C concepts);
* activation table, sparse: keys ``image_index`` (P,), ``concept_index`` (P,) int, ``values``
  (P,) float and ``shape`` (2,) int = (N, C); missing entries are 0 (inactive);
* attribution maps: keys ``image_index`` (P,), ``concept_index`` (P,) int and ``maps``
  (P, h, w) float, one map per (image, concept) pair, at any resolution (they are resized
  bilinearly to the image resolution); or a dense key ``maps`` (N, C, h, w).

Images: a folder (every image file below it, recursively, ordered by sorted relative POSIX path:
row i of the activation table belongs to the i-th file) or any sequence / iterable of PIL images
or (3|1|4, H, W) tensors. Grayscale is repeated to RGB, alpha is dropped, palette / CMYK images
are converted, 16-bit and 32-bit images are rescaled from their full range to [0, 1].
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "ActivationTable",
    "AttributionSource",
    "DenseAttributions",
    "ImageFolder",
    "ImageLoadError",
    "StoredAttributions",
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_write_text",
    "load_activation_table",
    "open_safetensors",
    "pil_to_tensor",
    "preprocess_pil",
    "save_activation_table",
    "to_rgb_tensor",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")

ImageLike = Image.Image | torch.Tensor | np.ndarray
"""What an image source may yield: a PIL image or a (C, H, W) tensor / array."""


@functools.cache
def _new_file_mode() -> int:
    """Permissions of a newly created file under the process umask (mkstemp itself uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; Windows cannot open directories)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (e.g. certain network mounts) do not support it
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; it replaces ``path`` atomically.

    The temporary file is unique (``tempfile.mkstemp`` in the target's own directory, so that
    concurrent writers never share it and ``os.replace`` stays on one file system). When the
    ``with`` body returns, the file is fsynced, moved over ``path`` with ``os.replace`` and the
    directory is fsynced: after a crash ``path`` holds the old or the new content, never a
    torn mix. If the body raises, the temporary file is removed and ``path`` is untouched.
    The new file gets the permissions of the file it replaces (else the umask default).

    Every writer of c2score (reports, tables, checkpoints, caches, plots) goes through this.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` atomically and durably (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def open_safetensors(path: str | Path, what: str) -> Any:
    """``safe_open(path)``, with the file and its role named when it does not exist or is not
    a safetensors file (safetensors' own error says neither)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{what} {path} is not a readable safetensors file: {e}") from None


# ----------------------------------------------------------------------------- activations


@dataclass
class ActivationTable:
    """Concept activations a_c(x) of N images x C concepts, dense or sparse (COO)."""

    n_images: int
    n_concepts: int
    dense: torch.Tensor | None = None
    """(N, C) activations, or None for a sparse table."""
    image_index: torch.Tensor | None = None
    """(P,) int64 rows of the stored entries (sparse tables)."""
    concept_index: torch.Tensor | None = None
    """(P,) int64 columns of the stored entries (sparse tables)."""
    values: torch.Tensor | None = None
    """(P,) activations of the stored entries (sparse tables); absent entries are 0."""

    @classmethod
    def from_dense(cls, acts_NC: torch.Tensor) -> ActivationTable:
        if acts_NC.ndim != 2 or not acts_NC.is_floating_point():
            raise ValueError(
                f"a dense activation table is a float (images, concepts) matrix, got "
                f"{tuple(acts_NC.shape)} {acts_NC.dtype}"
            )
        return cls(int(acts_NC.shape[0]), int(acts_NC.shape[1]), dense=acts_NC)

    @classmethod
    def from_sparse(
        cls,
        image_index: torch.Tensor,
        concept_index: torch.Tensor,
        values: torch.Tensor,
        shape: tuple[int, int],
    ) -> ActivationTable:
        n, c = int(shape[0]), int(shape[1])
        image_index, concept_index = image_index.long().flatten(), concept_index.long().flatten()
        values = values.flatten()
        if not (len(image_index) == len(concept_index) == len(values)):
            raise ValueError(
                "sparse activation table: image_index, concept_index and values differ in length "
                f"({len(image_index)}, {len(concept_index)}, {len(values)})"
            )
        if not values.is_floating_point():
            raise ValueError(f"sparse activation values must be float, got {values.dtype}")
        if len(values) and (
            int(image_index.min()) < 0
            or int(image_index.max()) >= n
            or int(concept_index.min()) < 0
            or int(concept_index.max()) >= c
        ):
            raise ValueError(f"sparse activation table: an index lies outside the shape {(n, c)}")
        key = image_index * c + concept_index
        if len(torch.unique(key)) != len(key):
            raise ValueError("sparse activation table: an (image, concept) entry is repeated")
        return cls(n, c, image_index=image_index, concept_index=concept_index, values=values)

    def sparse_sorted_by_concept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, concepts, values) sorted by concept, then value descending, then image."""
        assert self.values is not None and self.image_index is not None
        assert self.concept_index is not None
        # Three stable sorts from the least to the most significant key.
        order = torch.argsort(self.image_index, stable=True)
        vals = torch.where(torch.isfinite(self.values), self.values, 0.0)
        order = order[torch.argsort(vals[order], descending=True, stable=True)]
        order = order[torch.argsort(self.concept_index[order], stable=True)]
        return self.image_index[order], self.concept_index[order], self.values[order]


def load_activation_table(path: str | Path) -> ActivationTable:
    """Read a dense or sparse activation table from safetensors (see the module docstring)."""
    path = Path(path)
    with open_safetensors(path, "activation table") as f:
        keys = set(f.keys())
        if "activations" in keys:
            return ActivationTable.from_dense(f.get_tensor("activations"))
        need = {"image_index", "concept_index", "values", "shape"}
        if need <= keys:
            shape = f.get_tensor("shape").tolist()
            if len(shape) != 2:
                raise ValueError(f"{path}: 'shape' must hold (n_images, n_concepts), got {shape}")
            return ActivationTable.from_sparse(
                f.get_tensor("image_index"),
                f.get_tensor("concept_index"),
                f.get_tensor("values"),
                (shape[0], shape[1]),
            )
    raise ValueError(
        f"{path} holds keys {sorted(keys)}; an activation table needs 'activations' (dense "
        "images x concepts) or 'image_index', 'concept_index', 'values', 'shape' (sparse)"
    )


def save_activation_table(table: ActivationTable, path: str | Path) -> None:
    """Write ``table`` in the format :func:`load_activation_table` reads."""
    if table.dense is not None:
        atomic_save_safetensors({"activations": table.dense}, path)
        return
    assert table.image_index is not None and table.concept_index is not None
    assert table.values is not None
    atomic_save_safetensors(
        {
            "image_index": table.image_index,
            "concept_index": table.concept_index,
            "values": table.values,
            "shape": torch.tensor([table.n_images, table.n_concepts]),
        },
        path,
    )


# ----------------------------------------------------------------------------- attributions


class AttributionSource(Protocol):
    """Gives the attribution maps A_c(x) of the concepts that selected an image (Eq. 13)."""

    def __call__(self, image_index: int, concept_ids: torch.Tensor) -> torch.Tensor:
        """(K, h, w) maps of concepts ``concept_ids`` (K,) on image ``image_index``."""
        ...


class DenseAttributions:
    """Attribution maps held as one (N, C, h, w) tensor (small problems, tests)."""

    def __init__(self, maps_NChw: torch.Tensor) -> None:
        if maps_NChw.ndim != 4:
            raise ValueError(f"dense attribution maps must be (N, C, h, w), got {maps_NChw.shape}")
        self.maps_NChw = maps_NChw

    def __call__(self, image_index: int, concept_ids: torch.Tensor) -> torch.Tensor:
        return self.maps_NChw[image_index, concept_ids.long()]


class StoredAttributions:
    """Per-(image, concept) maps from a safetensors file, read row by row (never all at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open_safetensors(self.path, "attribution file")
        keys = set(self._file.keys())
        if "maps" not in keys:
            raise ValueError(f"{self.path} has no 'maps' key (keys: {sorted(keys)})")
        self._maps = self._file.get_slice("maps")
        shape = self._maps.get_shape()
        self.dense = "image_index" not in keys
        if self.dense:
            if len(shape) != 4:
                raise ValueError(f"{self.path}: dense 'maps' must be (N, C, h, w), got {shape}")
            self.n_images, self.n_concepts = int(shape[0]), int(shape[1])
            return
        if not {"image_index", "concept_index"} <= keys or len(shape) != 3:
            raise ValueError(
                f"{self.path}: pair maps need 'image_index' (P,), 'concept_index' (P,) and "
                f"'maps' (P, h, w); got keys {sorted(keys)}, maps {shape}"
            )
        img = self._file.get_tensor("image_index").long()
        con = self._file.get_tensor("concept_index").long()
        if not (len(img) == len(con) == shape[0]):
            raise ValueError(f"{self.path}: index and map counts differ")
        self._n_concepts_key = int(con.max()) + 1 if len(con) else 1
        key = img * self._n_concepts_key + con
        self._sorted_keys, self._rows = torch.sort(key)
        if len(key) and bool((self._sorted_keys[1:] == self._sorted_keys[:-1]).any()):
            raise ValueError(f"{self.path}: an (image, concept) map is stored twice")

    def missing(self, image_index: torch.Tensor, concept_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the (image, concept) pairs that have no stored map."""
        if self.dense:
            return (image_index >= self.n_images) | (concept_ids >= self.n_concepts)
        out_of_range = concept_ids >= self._n_concepts_key
        key = image_index * self._n_concepts_key + concept_ids.clamp(max=self._n_concepts_key - 1)
        pos = torch.searchsorted(self._sorted_keys, key).clamp(max=len(self._sorted_keys) - 1)
        found = self._sorted_keys[pos] == key if len(self._sorted_keys) else key < 0
        return out_of_range | ~found

    def __call__(self, image_index: int, concept_ids: torch.Tensor) -> torch.Tensor:
        if self.dense:
            row = self._maps[image_index : image_index + 1]
            return row[0, concept_ids.long()]
        key = image_index * self._n_concepts_key + concept_ids.long()
        pos = torch.searchsorted(self._sorted_keys, key)
        rows = self._rows[pos.clamp(max=len(self._rows) - 1)].tolist()
        return torch.stack([self._maps[r : r + 1][0] for r in rows]) if rows else torch.zeros(0)


def resize_maps(maps_Khw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize attribution maps to the image resolution (no-op when it matches)."""
    maps_Khw = maps_Khw.float()
    if tuple(maps_Khw.shape[-2:]) == tuple(size):
        return maps_Khw
    return F.interpolate(maps_Khw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# ----------------------------------------------------------------------------- images


class ImageLoadError(RuntimeError):
    """An image that cannot be read; the evaluation skips it and counts the reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> float RGB (3, H, W) in [0, 1] (grayscale, alpha, 16-bit handled)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        full = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 2**32 - 1
        arr = np.clip(arr / full, 0.0, 1.0)
        t = torch.from_numpy(arr).float()[None]
    elif mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        t = torch.from_numpy(np.clip(arr / scale, 0.0, 1.0)).float()[None]
    else:
        rgb = image.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr, 1 -> RGB (alpha dropped)
        t = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
        t = t.float() / 255.0
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


def to_rgb_tensor(image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """A PIL image, or a (C, H, W) tensor / array with C in {1, 3, 4}, -> float (3, H, W) in [0, 1].

    Integer tensors are scaled by their dtype's maximum (uint8 by 255, int16/int32 by 65535);
    float tensors must already lie in [0, 1].
    """
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)
    t = torch.as_tensor(image)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image tensor must be (C, H, W) with C in 1, 3, 4; got {t.shape}")
    if t.shape[0] == 4:
        t = t[:3]
    if not t.is_floating_point():
        t = t.float() / (255.0 if t.dtype == torch.uint8 else 65535.0)
    elif t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(
            f"float image values must lie in [0, 1] (got {float(t.min()):.3g}..{float(t.max()):.3g})"
        )
    t = t.float()
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


def preprocess(image_3HW: torch.Tensor, resize: int | None, crop: int | None) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (bilinear, antialiased), then centre-crop ``crop``."""
    from torchvision.transforms.v2 import functional as TF

    if resize:
        image_3HW = TF.resize(image_3HW, [resize], antialias=True).clamp(0, 1)
    if crop:
        if min(image_3HW.shape[-2:]) < crop:
            raise ImageLoadError(
                "smaller_than_crop", f"image {tuple(image_3HW.shape[-2:])} < crop {crop}"
            )
        image_3HW = TF.center_crop(image_3HW, [crop, crop])
    return image_3HW


def preprocess_pil(
    image: Image.Image, resize: int | None = 256, crop: int | None = 224
) -> torch.Tensor:
    """The authors' ImageNet preprocessing, bit for bit: float RGB (3, H, W) in [0, 1].

    ``image.convert("RGB")`` (torchvision's default image loader), then torchvision's
    ``Resize(resize)`` (shorter side, bilinear, on the 8-bit PIL image: PIL's own resampling)
    and ``CenterCrop(crop)``, then ``ToTensor``. The extractors apply ``Normalize`` (ImageNet
    mean/std) themselves. ``None`` (or 0) skips a step. Resizing the 8-bit image rounds to 8
    bits after resampling, which is why this differs (by up to ~1/255 on natural images) from
    :func:`preprocess` on the float image.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    rgb = image.convert("RGB")
    if resize:
        rgb = TF.resize(rgb, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if crop:
        if min(rgb.size) < crop:  # torchvision would pad with black instead
            raise ImageLoadError("smaller_than_crop", f"image {rgb.size[::-1]} < crop {crop}")
        rgb = TF.center_crop(rgb, [crop, crop])
    return TF.to_tensor(rgb)


Preprocessing = Literal["float", "pil"]
"""How :class:`ImageFolder` resizes and crops: on the float image (:func:`preprocess`) or on
the 8-bit PIL image as the authors (:func:`preprocess_pil`)."""


class ImageFolder(Sequence[torch.Tensor]):
    """Every image file below ``root`` (recursive), ordered by sorted relative POSIX path.

    ``folder[i]`` is the preprocessed float RGB (3, H, W) image in [0, 1]; an unreadable file
    raises :class:`ImageLoadError` (the evaluation counts it and goes on).

    ``preprocessing="float"`` (default) decodes every mode at full precision (16-bit images
    too, see :func:`pil_to_tensor`) and resizes the float image (:func:`preprocess`);
    ``"pil"`` is the authors' pipeline exactly (:func:`preprocess_pil`: torchvision's
    ``Resize``/``CenterCrop`` on the 8-bit RGB image, then ``ToTensor``).
    """

    def __init__(
        self,
        root: str | Path,
        resize: int | None = None,
        crop: int | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        preprocessing: Preprocessing = "float",
    ) -> None:
        if preprocessing not in ("float", "pil"):
            raise ValueError(
                f"preprocessing must be 'float' or 'pil' (the authors' torchvision pipeline on "
                f"the 8-bit image), got {preprocessing!r}"
            )
        self.preprocessing = preprocessing
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} does not exist")
        exts = {e.lower() for e in extensions}
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise ValueError(f"no image files ({', '.join(sorted(exts))}) below {self.root}")
        self.resize, self.crop = resize, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        path = self.files[index]
        try:
            with Image.open(path) as im:
                im.load()
                if self.preprocessing == "pil":
                    return preprocess_pil(im, self.resize, self.crop)
                t = pil_to_tensor(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageLoadError("unreadable_image", f"{path}: {e}") from e
        return preprocess(t, self.resize, self.crop)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]
