"""Oracle features: per-pixel feature maps supplied by the user instead of a foundation model.

With one-hot ground-truth part masks of a synthetic dataset as features, a concept that fires on
one part scores consistency close to 1 and a random concept close to 0, which validates the
metric against known concepts. Because the features belong to an image *index*, not to its
pixels, the oracle implements :class:`IndexedFeatureExtractor`, which the evaluation prefers
over the plain :class:`~c2score.features.base.PixelFeatureExtractor` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["IndexedFeatureExtractor", "OracleFeatures"]


@runtime_checkable
class IndexedFeatureExtractor(Protocol):
    """A feature extractor that needs to know which evaluation images it is given.

    An implementation may also have an ``n_images`` attribute (the number of images it holds
    features for, or None if unknown); :func:`~c2score.evaluate_c2` then refuses up front an
    activation table with more rows than that, instead of failing in the middle of the pass.
    """

    @property
    def dim(self) -> int: ...

    def features_at(self, image_indices: Sequence[int], images_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) features of images ``image_indices`` at the resolution of ``images_B3HW``."""
        ...


class OracleFeatures:
    """Serves user-supplied (D, h, w) feature maps per image index, resized to image resolution.

    ``maps`` is an (N, D, h, w) tensor, a sequence of (D, h, w) tensors, or a callable
    ``index -> (D, h, w)``; map i belongs to image i (row i of the activation table). Maps of
    another resolution than the image are resized bilinearly.
    """

    def __init__(
        self, maps: torch.Tensor | Sequence[torch.Tensor] | Callable[[int], torch.Tensor], dim: int
    ) -> None:
        self._dim = int(dim)
        if isinstance(maps, torch.Tensor) and (maps.ndim != 4 or maps.shape[1] != self._dim):
            raise ValueError(
                f"oracle feature maps must be an (N, {self._dim}, h, w) tensor (one (D, h, w) "
                f"map per image), got {tuple(maps.shape)}"
            )
        self._maps = maps

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def n_images(self) -> int | None:
        """Number of images with a map (None for a callable: unknown)."""
        return None if callable(self._maps) else len(self._maps)

    def _map(self, index: int) -> torch.Tensor:
        m = self._maps(index) if callable(self._maps) else self._maps[index]
        if m.ndim != 3 or m.shape[0] != self._dim:
            raise ValueError(
                f"oracle map of image {index} must be ({self._dim}, h, w), got {m.shape}"
            )
        return m.float()

    def features_at(self, image_indices: Sequence[int], images_B3HW: torch.Tensor) -> torch.Tensor:
        size = tuple(images_B3HW.shape[-2:])
        out = []
        for i in image_indices:
            m = self._map(int(i))
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
            out.append(m)
        return torch.stack(out).to(images_B3HW.device)

    def __call__(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            "OracleFeatures serves maps by image index: call features_at(indices, images) "
            "(evaluate_c2 does this automatically)"
        )
