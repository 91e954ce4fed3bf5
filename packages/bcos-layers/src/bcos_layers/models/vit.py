"""B-cos ViTs: Simple ViT with a convolutional stem (ViTc) or plain 16x16 patches (B-cos-v2
``models/vit.py`` layout).

``vitc_s_patch1_14`` = ``Sequential(SimpleViT, LogitLayer)``, so every key starts with ``0.``
like the official checkpoint. Stem: B-cos 3x3 convs + GroupNorm(1) (x16 downsampling at 224 →
14x14 tokens), B-cos patch linear, fixed sin-cos positional embedding, pre-norm encoders with
bias-free LayerNorms, token mean-pool, LN + B-cos linear head.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from bcos_layers.layers import (
    BcosConv2d,
    BcosLinear,
    DetachableLayerNorm,
    LayerNorm2d,
    LogitLayer,
    PosEmbSinCos2d,
    Transformer,
)
from bcos_layers.models._base import BcosModelMixin

__all__ = ["BcosViTClassifier", "PatchRearrange", "SimpleViT"]

LayerFactory = Callable[..., nn.Module]


class PatchRearrange(nn.Module):
    """``[B, C, H·p, W·p] → [B, H, W, p·p·C]`` (einops ``b c (h p1) (w p2) -> b h w (p1 p2 c)``)."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if p == 1:
            return x.permute(0, 2, 3, 1)
        b, c, hp, wp = x.shape
        x = x.reshape(b, c, hp // p, p, wp // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, hp // p, wp // p, p * p * c)


def make_conv_stem(
    in_chans: int,
    channels: Sequence[int],
    conv_layer: LayerFactory,
    norm_layer: LayerFactory,
    act_layer: LayerFactory,
) -> tuple[nn.Sequential, int]:
    """``[conv3x3, norm, act] x len(channels)``; stride 2 where the width grows. Returns (stem, stride)."""
    mods: list[nn.Module] = []
    stride = 1
    for cout in channels:
        s = 2 if cout > in_chans else 1
        stride *= s
        mods += [conv_layer(in_chans, cout, kernel_size=3, stride=s, padding=1), norm_layer(cout)]
        mods.append(act_layer())
        in_chans = cout
    return nn.Sequential(*mods), stride


class SimpleViT(BcosModelMixin, nn.Module):
    """B-cos Simple ViT(-C) backbone + head, without the logit layer.

    Args:
        num_classes: output features of the head.
        dim: token width; ``heads`` attention heads of ``dim // heads`` channels.
        depth: number of encoder blocks (11 for ViTc-S: 12 minus one for the conv stem).
        mlp_dim: hidden width of the feed-forward blocks.
        patch_size: patch size after the stem (1 for ViTc).
        conv_stem: output widths of the stem convs (``None``: patchify the input directly).
        in_chans: input channels (6 = RGB + inverse).
        linear_layer, norm_layer, conv_layer, norm2d_layer, act_layer: layer factories.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        patch_size: int = 1,
        conv_stem: Sequence[int] | None = None,
        in_chans: int = 6,
        linear_layer: LayerFactory = BcosLinear,
        norm_layer: LayerFactory = DetachableLayerNorm,
        conv_layer: LayerFactory = BcosConv2d,
        norm2d_layer: LayerFactory = LayerNorm2d,
        act_layer: LayerFactory = nn.Identity,
    ) -> None:
        super().__init__()
        if dim % heads or dim % 4:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) and by 4")
        self.in_chans = in_chans
        self.num_classes = num_classes
        embed: OrderedDict[str, nn.Module] = OrderedDict()
        stride = 1
        patch_in = in_chans
        if conv_stem:
            embed["conv_stem"], stride = make_conv_stem(
                in_chans, conv_stem, conv_layer, norm2d_layer, act_layer
            )
            patch_in = conv_stem[-1]
        embed["rearrage"] = PatchRearrange(patch_size)  # (sic) official module name
        embed["linear"] = linear_layer(patch_in * patch_size * patch_size, dim)
        self.to_patch_embedding = nn.Sequential(embed)
        self.input_multiple = stride * patch_size
        self.positional_embedding = PosEmbSinCos2d()
        self.transformer = Transformer(
            dim, depth, heads, dim // heads, mlp_dim, linear_layer, norm_layer, act_layer
        )
        self.to_latent = nn.Identity()
        self.linear_head = nn.Sequential(
            OrderedDict(norm=norm_layer(dim), linear=linear_layer(dim, num_classes))
        )

    def forward_tokens(self, img: Tensor) -> Tensor:
        """Token features after the last encoder: ``[B, h·w, dim]`` (row-major token grid)."""
        x = self.to_patch_embedding(img)
        pe = self.positional_embedding(x)
        return self.transformer(x.flatten(1, 2) + pe)

    def forward(self, img: Tensor) -> Tensor:
        self._check_input(img, self.input_multiple)
        return self.linear_head(self.to_latent(self.forward_tokens(img).mean(dim=1)))


class BcosViTClassifier(BcosModelMixin, nn.Sequential):
    """``Sequential(SimpleViT, LogitLayer)``: the official wrapper (keys prefixed ``0.``)."""

    def __init__(self, vit: SimpleViT, logit_layer: LogitLayer) -> None:
        super().__init__(vit, logit_layer)
        self.in_chans = vit.in_chans
        self.num_classes = vit.num_classes

    @property
    def validate_inputs(self) -> bool:  # type: ignore[override]
        """Input checks happen in the backbone (module ``0``); this flag forwards to it."""
        return self[0].validate_inputs

    @validate_inputs.setter
    def validate_inputs(self, value: bool) -> None:
        self[0].validate_inputs = value

    def get_classifier(self) -> nn.Module:
        """The B-cos linear classifier of the head."""
        return self[0].linear_head.linear


def build_vitc(
    *,
    num_classes: int = 1000,
    dim: int = 384,
    depth: int = 11,
    heads: int = 6,
    mlp_dim: int = 1536,
    conv_stem: Sequence[int] | None = (48, 96, 192, 384),
    patch_size: int = 1,
    in_chans: int = 6,
    logit_bias: float | None = None,
    logit_temperature: float | None = None,
) -> BcosViTClassifier:
    """A B-cos ViT classifier (defaults: ViTc-S, ``vitc_s_patch1_14``).

    ``conv_stem=None, patch_size=16`` gives the plain B-cos Simple ViT (``simple_vit_*_patch16_224``).
    """
    if num_classes < 2 and logit_bias is None:
        raise ValueError("num_classes must be >= 2 (or pass an explicit logit_bias)")
    vit = SimpleViT(
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        patch_size=patch_size,
        conv_stem=None if conv_stem is None else list(conv_stem),
        in_chans=in_chans,
    )
    bias = math.log(1 / (num_classes - 1)) if logit_bias is None else logit_bias
    return BcosViTClassifier(vit, LogitLayer(logit_temperature, bias))
