"""DINOv2 patch features through ``transformers`` (the low-resolution stage of the C2 features).

The features are the final-LayerNorm-ed patch tokens of the last block -- in ``transformers``
``last_hidden_state`` is already layer-normed, so this is the analogue of torch-hub DINOv2's
``x_norm_patchtokens`` that LoftUp was trained on -- with the CLS token and any register tokens
dropped, reshaped to a (B, D, h, w) grid.

Position embeddings: the released models were trained on a 37 x 37 patch grid (518 px) and
are resized bicubically to other grids. The official non-register models
(``dinov2_vits14`` etc., the paper's backbone and the one LoftUp was trained on) do this with
``scale_factor=((h + 0.1) / 37, (w + 0.1) / 37)`` and no antialiasing, whereas transformers'
``Dinov2Model`` uses ``size=(h, w)``: the same grid size, but other sampling positions, which
moves the last-layer patch tokens by ~1 % (smooth embeddings) to ~12 % (rough ones) at every
size but 518 x 518. :class:`Dinov2PatchFeatures` therefore reproduces the official rule by
default. The register models (``dinov2_vits14_reg`` ...) officially use ``size=(h, w)`` with
antialiasing, which is what ``Dinov2WithRegistersModel`` does already.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

from c2score.features.base import check_rgb_images, imagenet_normalize

DEFAULT_DINOV2 = "facebook/dinov2-small"
"""The backbone of the paper's C2-score (ViT-S/14, D = 384)."""

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")

PosInterpolation = Literal["official", "transformers"]
"""How position embeddings are resized to the patch grid (see the module docstring)."""
_POS_INTERPOLATIONS = ("official", "transformers")
_OFFICIAL_OFFSET = 0.1
"""``interpolate_offset`` of the official non-register DINOv2 models (0 for the register ones)."""


def _official_interpolate_pos_encoding(
    self: nn.Module, embeddings: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """``Dinov2Embeddings.interpolate_pos_encoding`` with the official non-register rule.

    (1, 1 + M*M, D) pretrained embeddings -> (1, 1 + h*w, D) for an ``height`` x ``width`` image
    (h = height // p, w = width // p): the M x M patch part is resized bicubically in float32
    with ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)`` (so that the output is h x w and the
    sampling grid is the official one), no antialiasing; the CLS part is kept. The pretrained
    grid itself (a square image of M x M patches) is returned unchanged, as officially.
    """
    pos_1TD = self.position_embeddings
    n_pos = pos_1TD.shape[1] - 1
    if embeddings.shape[1] - 1 == n_pos and height == width:
        return pos_1TD
    patch_h, patch_w = self.patch_embeddings.patch_size
    h, w = height // patch_h, width // patch_w
    m = math.isqrt(n_pos)
    if m * m != n_pos:
        raise ValueError(f"{n_pos} position embeddings do not form a square grid")
    grid = pos_1TD[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    scale = ((h + _OFFICIAL_OFFSET) / m, (w + _OFFICIAL_OFFSET) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding grid {tuple(grid.shape[-2:])} != {(h, w)}")
    grid = grid.to(pos_1TD.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([pos_1TD[:, :1], grid], dim=1)


def _model_classes() -> dict[str, type[Dinov2Model] | type[Dinov2WithRegistersModel]]:
    """``model_type`` -> transformers class. Imported lazily: ``import transformers`` costs
    seconds and hundreds of MB, and most of c2score (the metric itself) never needs it."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}


def _hub_kwargs(
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """The Hugging Face download options that were actually given (None means library default)."""
    out: dict[str, Any] = {"local_files_only": local_files_only}
    if revision is not None:
        out["revision"] = revision
    if cache_dir is not None:
        out["cache_dir"] = str(cache_dir)
    if token is not None:
        out["token"] = token
    return out


class Dinov2PatchFeatures(nn.Module):
    """DINOv2 (with or without registers) as a :class:`~c2score.features.base.PatchBackbone`.

    Input: [0, 1] RGB ``images_B3HW``; ImageNet normalisation is applied inside. Output:
    ``feats_BDhw`` in float32 on the model's device, ``(h, w) = grid_size(H, W)``.

    Sizes that are not a multiple of the patch size: the image is bilinearly resized (with
    antialiasing) to the nearest multiple in each direction before the ViT, so the patch grid
    covers the *whole* image and stays aligned with it when the features are upsampled back to
    (H, W). (Feeding it as is would make the stride-p patch convolution silently drop the last
    H mod p rows and W mod p columns, shifting the grid relative to the image; cropping would
    do the same.) Sizes that are multiples are used unchanged; ``transformers`` interpolates
    the position embeddings to any grid. Images smaller than one patch are refused.

    ``pos_interpolation="official"`` (default) resizes the position embeddings as the official
    DINOv2 models do (for ``Dinov2Model``: bicubic with the +0.1 scale-factor offset, see the
    module docstring; ``Dinov2WithRegistersModel`` already follows its official rule);
    ``"transformers"`` keeps transformers' own rule. The rule is installed on
    ``model.embeddings`` (this wrapper takes the model over, and also puts it in eval mode).
    """

    def __init__(
        self,
        model: Dinov2Model | Dinov2WithRegistersModel,
        *,
        pos_interpolation: PosInterpolation = "official",
    ) -> None:
        super().__init__()
        if not isinstance(model, tuple(_model_classes().values())):
            raise TypeError(
                "expected a transformers Dinov2Model or Dinov2WithRegistersModel, got "
                f"{type(model).__name__}"
            )
        if pos_interpolation not in _POS_INTERPOLATIONS:
            raise ValueError(
                f"pos_interpolation must be 'official' or 'transformers', got {pos_interpolation!r}"
            )
        patch = model.config.patch_size
        if not isinstance(patch, int):
            raise ValueError(f"only square integer patch sizes are supported, got {patch!r}")
        self.pos_interpolation: PosInterpolation = pos_interpolation
        embeddings = model.embeddings
        embeddings.__dict__.pop("interpolate_pos_encoding", None)  # a rule installed earlier
        if pos_interpolation == "official" and model.config.model_type == "dinov2":
            embeddings.interpolate_pos_encoding = types.MethodType(
                _official_interpolate_pos_encoding, embeddings
            )
        self.model = model.eval()

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path = DEFAULT_DINOV2,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        pos_interpolation: PosInterpolation = "official",
    ) -> Dinov2PatchFeatures:
        """Load a ``Dinov2Model`` / ``Dinov2WithRegistersModel`` Hub id or local directory.

        The class is chosen from the checkpoint's ``config.json`` (``model_type``); checkpoints
        of task models (e.g. ``Dinov2ForImageClassification``) load their backbone.
        ``pos_interpolation``: see the class docstring.
        """
        if pos_interpolation not in _POS_INTERPOLATIONS:
            raise ValueError(
                f"pos_interpolation must be 'official' or 'transformers', got {pos_interpolation!r}"
            )
        kwargs = _hub_kwargs(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_id_or_path), **kwargs)
        model_cls = _model_classes().get(config.model_type)
        if model_cls is None:
            raise ValueError(
                f"{str(model_id_or_path)!r} is a {config.model_type!r} model; expected a DINOv2 "
                f"checkpoint (model_type one of {sorted(_MODEL_TYPES)}), e.g. {DEFAULT_DINOV2!r}"
            )
        model = model_cls.from_pretrained(str(model_id_or_path), config=config, **kwargs)
        return cls(model, pos_interpolation=pos_interpolation)

    @property
    def dim(self) -> int:
        """Feature dimension D (``hidden_size``: 384 for ViT-S)."""
        return int(self.model.config.hidden_size)

    @property
    def patch_size(self) -> int:
        """ViT patch size p in pixels (14 for the released DINOv2 models)."""
        return int(self.model.config.patch_size)

    @property
    def num_register_tokens(self) -> int:
        """Register tokens between CLS and the patches (0 without registers, 4 in releases)."""
        if self.model.config.model_type == "dinov2_with_registers":
            return int(self.model.config.num_register_tokens)
        return 0

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an H x W image: the nearest whole number of patches, >= 1."""
        p = self.patch_size
        if height < p or width < p:
            raise ValueError(
                f"image of {height}x{width} pixels is smaller than one DINOv2 patch ({p}x{p}); "
                f"resize images to at least {p} pixels per side (DINOv2 was trained at 224)"
            )
        return int(height / p + 0.5), int(width / p + 0.5)

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Patch features ``feats_BDhw`` of [0, 1] RGB images (see the class docstring)."""
        check_rgb_images(images_B3HW)
        b, _, height, width = images_B3HW.shape
        h, w = self.grid_size(height, width)
        p = self.patch_size
        param = next(self.model.parameters())
        x = images_B3HW.to(device=param.device, dtype=torch.float32)
        if (h * p, w * p) != (height, width):
            x = F.interpolate(
                x, size=(h * p, w * p), mode="bilinear", align_corners=False, antialias=True
            )
        x = imagenet_normalize(x).to(param.dtype)
        tokens_BTD = self.model(pixel_values=x).last_hidden_state
        skip = 1 + self.num_register_tokens
        if tokens_BTD.shape[1] != skip + h * w:
            raise RuntimeError(
                f"DINOv2 returned {tokens_BTD.shape[1]} tokens; expected 1 CLS + "
                f"{self.num_register_tokens} registers + {h}x{w} patches"
            )
        patches_BND = tokens_BTD[:, skip:].float()
        return patches_BND.reshape(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()
