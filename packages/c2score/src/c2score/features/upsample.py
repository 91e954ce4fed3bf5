"""Upsampling patch features to pixels: the bilinear fallback and the two-stage extractor.

:class:`UpsampledFeatureExtractor` composes a :class:`~c2score.features.base.PatchBackbone`
with an :class:`~c2score.features.base.Upsampler`; it is the
:class:`~c2score.features.base.TwoStageFeatureExtractor` the metric uses (cache ``lowres``,
recompute ``upsample``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c2score.features.base import check_rgb_images


class BilinearUpsampler(nn.Module):
    """Bilinear interpolation of the patch grid to the image size (no learned parameters).

    ``align_corners=False`` puts each feature at the centre of the image region its patch
    covers, which is where a ViT patch token lives. The images only give the output size.
    """

    @torch.no_grad()
    def forward(self, lowres_BDhw: torch.Tensor, images_B3HW: torch.Tensor) -> torch.Tensor:
        if lowres_BDhw.ndim != 4 or images_B3HW.ndim != 4:
            raise ValueError(
                f"expected (B, D, h, w) features and (B, 3, H, W) images, got "
                f"{tuple(lowres_BDhw.shape)} and {tuple(images_B3HW.shape)}"
            )
        if lowres_BDhw.shape[0] != images_B3HW.shape[0]:
            raise ValueError(
                f"batch sizes differ: {lowres_BDhw.shape[0]} feature maps, "
                f"{images_B3HW.shape[0]} images"
            )
        return F.interpolate(
            lowres_BDhw.float(), size=images_B3HW.shape[-2:], mode="bilinear", align_corners=False
        )


class UpsampledFeatureExtractor(nn.Module):
    """Per-pixel features = upsampler(backbone(images), images) (paper Eq. 13's F(x)).

    ``lowres`` and ``upsample`` are exposed separately so that a caller can cache the small
    backbone output and recompute the (large) upsampled maps when needed; ``__call__`` runs
    both. All stages run without gradients and return float32 on the modules' device.
    """

    def __init__(self, backbone: nn.Module, upsampler: nn.Module) -> None:
        super().__init__()
        upsampler_dim = getattr(upsampler, "dim", None)
        if upsampler_dim is not None and upsampler_dim != backbone.dim:
            raise ValueError(
                f"upsampler expects {upsampler_dim}-d features but the backbone produces "
                f"{backbone.dim}-d ones; use an upsampler trained for this backbone"
            )
        self.backbone = backbone
        self.upsampler = upsampler

    @property
    def dim(self) -> int:
        """Feature dimension D (the backbone's)."""
        return int(self.backbone.dim)

    @torch.no_grad()
    def lowres(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Backbone patch features ``feats_BDhw`` of [0, 1] RGB images (cacheable)."""
        return self.backbone(images_B3HW)

    @torch.no_grad()
    def upsample(self, lowres_BDhw: torch.Tensor, images_B3HW: torch.Tensor) -> torch.Tensor:
        """``feats_BDHW`` at the images' resolution from (possibly cached) ``lowres`` features."""
        return self.upsampler(lowres_BDhw, images_B3HW)

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        check_rgb_images(images_B3HW)
        return self.upsample(self.lowres(images_B3HW), images_B3HW)
