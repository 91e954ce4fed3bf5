"""Evaluation transforms of the B-cos-v2 checkpoints (PIL image -> 6-channel tensor).

B-cos models take ``[r, g, b, 1-r, 1-g, 1-b]`` in ``[0, 1]`` and no mean/std normalization
(bcos-v2 ``data/presets.py``, ``ImageNetClassificationPresetEval(is_bcos=True)``):
``Resize(resize, BILINEAR, antialias=True) -> CenterCrop(224) -> PILToTensor ->
ConvertImageDtype(float) -> AddInverse``. The ``_long`` CNN checkpoints were evaluated with
``resize=232``, the others with 256.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from bcos_layers.layers import AddInverse
from bcos_layers.pretrained import official_checkpoint

__all__ = ["ConvertRGB", "eval_transform", "transform_for"]


class ConvertRGB:
    """Convert a PIL image of any mode (grayscale, palette, RGBA, CMYK) to RGB.

    Without it a grayscale image would become a 2-channel tensor after ``AddInverse``. RGB
    images pass through unchanged, so the pipeline stays identical to the official one.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"the B-cos eval transform takes a PIL image, got {type(img).__name__}; "
                "open files with PIL.Image.open(path)"
            )
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> T.Compose:
    """The B-cos-v2 evaluation pipeline: PIL image -> float tensor ``[6, crop, crop]`` in [0, 1].

    ``Resize(resize_size)`` scales the shorter side (bilinear, antialiased), then a centre crop.
    """
    if not (isinstance(resize_size, int) and isinstance(crop_size, int)):
        raise TypeError("resize_size and crop_size must be ints")
    if crop_size < 1 or resize_size < crop_size:
        raise ValueError(
            f"need 1 <= crop_size <= resize_size, got resize_size={resize_size}, "
            f"crop_size={crop_size}"
        )
    return T.Compose(
        [
            ConvertRGB(),
            T.Resize(resize_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(crop_size),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            AddInverse(),
        ]
    )


def transform_for(name: str, *, resize_size: int | None = None) -> T.Compose:
    """The evaluation transform of official checkpoint ``name`` (232 for ``_long`` CNNs, else 256).

    ``resize_size`` overrides the checkpoint's value (FaCT evaluates every model with 256).
    """
    ckpt = official_checkpoint(name)
    return eval_transform(resize_size or ckpt.resize_size)
