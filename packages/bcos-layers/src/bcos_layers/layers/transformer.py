"""B-cos transformer blocks (ViTc of B-cos-v2): attention, feed-forward, pre-norm encoder.

Attention uses a plain bias-free ``nn.Linear`` for ``q, k, v`` (as the official models) and a
B-cos output projection; in explanation mode ``q`` and ``k`` are detached, so the attention
matrix becomes a fixed (input-dependent) weight and the block stays dynamic-linear in ``v``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bcos_layers.layers.bcos import BcosLinear
from bcos_layers.layers.detachable import DetachableModule
from bcos_layers.layers.norms import DetachableLayerNorm

__all__ = ["Attention", "Encoder", "FeedForward", "Transformer"]

LayerFactory = Callable[..., nn.Module]


class Attention(DetachableModule):
    """Pre-norm multi-head self-attention on ``[B, N, D]`` tokens (no CLS token, no biases)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        linear_layer: LayerFactory = BcosLinear,
        norm_layer: LayerFactory = DetachableLayerNorm,
    ) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = norm_layer(dim)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = linear_layer(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1)
        )
        if self.explaining:
            q = q.detach()
            k = k.detach()
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.to_out(out)


class FeedForward(nn.Module):
    """Pre-norm MLP ``norm → linear1 → act → linear2`` (``act`` is Identity in B-cos ViTs)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        linear_layer: LayerFactory = BcosLinear,
        norm_layer: LayerFactory = DetachableLayerNorm,
        act_layer: LayerFactory = nn.Identity,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict(
                norm=norm_layer(dim),
                linear1=linear_layer(dim, hidden_dim),
                act=act_layer(),
                linear2=linear_layer(hidden_dim, dim),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """Transformer block: ``x = attn(x) + x; x = ff(x) + x``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        linear_layer: LayerFactory = BcosLinear,
        norm_layer: LayerFactory = DetachableLayerNorm,
        act_layer: LayerFactory = nn.Identity,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, linear_layer, norm_layer)
        self.ff = FeedForward(dim, mlp_dim, linear_layer, norm_layer, act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


class Transformer(nn.Sequential):
    """``depth`` encoders named ``encoder_0 .. encoder_{depth-1}`` (official key layout)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        linear_layer: LayerFactory = BcosLinear,
        norm_layer: LayerFactory = DetachableLayerNorm,
        act_layer: LayerFactory = nn.Identity,
    ) -> None:
        super().__init__(
            OrderedDict(
                (
                    f"encoder_{i}",
                    Encoder(dim, heads, dim_head, mlp_dim, linear_layer, norm_layer, act_layer),
                )
                for i in range(depth)
            )
        )
