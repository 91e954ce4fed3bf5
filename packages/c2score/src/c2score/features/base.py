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


@runtime_checkable
class TwoStageFeatureExtractor(PixelFeatureExtractor, Protocol):
    """A :class:`PixelFeatureExtractor` split into a cacheable and a recomputed stage.

    ``lowres`` runs the expensive backbone once per image and returns small patch features
    (``feats_BDhw``, e.g. 16x16 for DINOv2 at 224 px) that a caller may cache; ``upsample``
    lifts them to image resolution, guided by the same images. ``__call__`` is both in a row.
    """

    def lowres(self, images_B3HW: torch.Tensor) -> torch.Tensor: ...

    def upsample(self, lowres_BDhw: torch.Tensor, images_B3HW: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PatchBackbone(Protocol):
    """A foundation model that maps [0, 1] RGB images to low-resolution patch features.

    ``__call__(images_B3HW) -> feats_BDhw`` with a grid (h, w) determined by the backbone (for a
    ViT, roughly H / patch_size by W / patch_size). DINOv2 is one; CLIP/SigLIP would be others.
    """

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        ...

    def __call__(self, images_B3HW: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Upsampler(Protocol):
    """Lifts patch features to image resolution, guided by the images they were computed from.

    ``__call__(lowres_BDhw, images_B3HW) -> feats_BDHW``; the images are [0, 1] RGB (each
    upsampler applies its own normalisation) and fix the output size (H, W).
    """

    def __call__(self, lowres_BDhw: torch.Tensor, images_B3HW: torch.Tensor) -> torch.Tensor: ...


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet, used by DINOv2 and by the LoftUp guidance image."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet."""


def imagenet_normalize(images_B3HW: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per RGB channel: [0, 1] images to the input scale of DINOv2/LoftUp."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images_B3HW.dtype, device=images_B3HW.device)
    std = torch.tensor(IMAGENET_STD, dtype=images_B3HW.dtype, device=images_B3HW.device)
    return (images_B3HW - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def check_rgb_images(images_B3HW: torch.Tensor, *, tolerance: float = 1e-3) -> None:
    """Raise ``ValueError`` unless ``images_B3HW`` is a finite float (B, 3, H, W) batch in [0, 1].

    Catches the usual mistakes early (a single image without batch axis, grayscale/RGBA, uint8
    or 0..255 values, already-normalised inputs) instead of producing silently wrong features.
    """
    if not isinstance(images_B3HW, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images_B3HW).__name__}")
    if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W) (RGB, batch first), got {tuple(images_B3HW.shape)}; "
            "add a batch axis with x[None] and convert grayscale/RGBA images to RGB"
        )
    if not images_B3HW.is_floating_point():
        raise ValueError(
            f"images must be floating point RGB in [0, 1], got dtype {images_B3HW.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if images_B3HW.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images_B3HW.shape)}")
    if not bool(torch.isfinite(images_B3HW).all()):
        raise ValueError("images contain NaN or infinite values")
    lo, hi = torch.aminmax(images_B3HW.detach())
    lo_f, hi_f = float(lo), float(hi)
    if lo_f < -tolerance or hi_f > 1 + tolerance:
        raise ValueError(
            f"images must be RGB in [0, 1] (the extractor normalises them itself), got values in "
            f"[{lo_f:.3g}, {hi_f:.3g}]; pass x / 255 for 0..255 images and do not apply "
            "ImageNet normalisation beforehand"
        )
