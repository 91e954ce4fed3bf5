"""The interface every per-pixel feature extractor of the C2-score implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PixelFeatureExtractor(Protocol):
    """Maps RGB images to dense per-pixel features at image resolution (paper Eq. 13).

    ``images_B3HW`` are float RGB in [0, 1] (no normalisation: the extractor applies its own);
    the result is ``feats_BDHW`` with the same H and W as the input. Implementations: DINOv2 +
    LoftUp, DINOv2 + bilinear upsampling, and an oracle that returns user-supplied maps.
    """

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        ...

    def __call__(self, images_B3HW: torch.Tensor) -> torch.Tensor: ...
