"""B-cos DenseNets (B-cos-v2 ``models/densenet.py`` layout): no ReLU, no biases, AvgPool stem and
transitions, uncentered bias-free BatchNorm, a 1x1 B-cos classifier before global average
pooling, and a logit layer. Module names and state-dict keys equal the official ones.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcos_layers.layers import BatchNormUncentered2d, BcosConv2d, LogitLayer
from bcos_layers.models._base import BcosModelMixin

__all__ = ["BcosDenseNet"]

LayerFactory = Callable[..., nn.Module]
DEFAULT_CONV = partial(BcosConv2d, b=2, max_out=1)


class _DenseLayer(nn.Module):
    """``norm1 → conv1 (1x1, bn_size·k) → norm2 → conv2 (3x3, k)`` on the concatenated inputs."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        norm_layer: LayerFactory,
        conv_layer: LayerFactory,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(num_input_features)
        self.conv1 = conv_layer(num_input_features, bn_size * growth_rate, kernel_size=1)
        self.norm2 = norm_layer(bn_size * growth_rate)
        self.conv2 = conv_layer(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1)
        self.drop_rate = float(drop_rate)

    def forward(self, features: Tensor | list[Tensor]) -> Tensor:
        x = features if isinstance(features, Tensor) else torch.cat(features, 1)
        out = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """``denselayer1..L``; each sees the block input and all earlier layers' outputs."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        norm_layer: LayerFactory,
        conv_layer: LayerFactory,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}",
                _DenseLayer(
                    num_input_features + i * growth_rate,
                    growth_rate,
                    bn_size,
                    drop_rate,
                    norm_layer,
                    conv_layer,
                ),
            )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """``norm → conv (1x1, halves channels) → AvgPool2d(2, 2)``."""

    def __init__(self, cin: int, cout: int, norm_layer: LayerFactory, conv_layer: LayerFactory):
        super().__init__()
        self.norm = norm_layer(cin)
        self.conv = conv_layer(cin, cout, kernel_size=1)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class BcosDenseNet(BcosModelMixin, nn.Module):
    """B-cos DenseNet-BC.

    Args:
        growth_rate: channels added per dense layer (``k``).
        block_config: dense layers per block, e.g. ``(6, 12, 24, 16)`` for DenseNet-121.
        num_init_features: stem width.
        bn_size: bottleneck width factor (``bn_size · k`` channels after ``conv1``).
        drop_rate: dropout after each dense layer (0 for the released models).
        num_classes: output logits.
        in_chans: input channels (6 = RGB + inverse).
        small_inputs: CIFAR-style stem (3x3 conv only) instead of 7x7/s2 + norm + AvgPool.
        norm_layer, conv_layer: layer factories (see :class:`~bcos_layers.models.BcosResNet`).
        logit_bias: added to the logits; ``None`` means ``-log(num_classes - 1)``.
        logit_temperature: optional divisor of the logits.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 6,
        small_inputs: bool = False,
        norm_layer: LayerFactory = BatchNormUncentered2d,
        conv_layer: LayerFactory = DEFAULT_CONV,
        logit_bias: float | None = None,
        logit_temperature: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2 and logit_bias is None:
            raise ValueError("num_classes must be >= 2 (or pass an explicit logit_bias)")
        self.in_chans = in_chans
        self.num_classes = num_classes
        if small_inputs:
            stem = [("conv0", conv_layer(in_chans, num_init_features, kernel_size=3, padding=1))]
        else:
            stem = [
                (
                    "conv0",
                    conv_layer(in_chans, num_init_features, kernel_size=7, stride=2, padding=3),
                ),
                ("norm0", norm_layer(num_init_features)),
                ("pool0", nn.AvgPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(
                f"denseblock{i + 1}",
                _DenseBlock(num_layers, n, bn_size, growth_rate, drop_rate, norm_layer, conv_layer),
            )
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(
                    f"transition{i + 1}", _Transition(n, n // 2, norm_layer, conv_layer)
                )
                n //= 2
        self.features.add_module("norm5", norm_layer(n))
        self.num_features = n
        self.classifier = conv_layer(n, num_classes, kernel_size=1)
        self.logit_layer = LogitLayer(
            logit_temperature=logit_temperature,
            logit_bias=-math.log(num_classes - 1) if logit_bias is None else logit_bias,
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward_head(self, features: Tensor) -> Tensor:
        """1x1 B-cos classifier on the feature map, global average pool, logit layer."""
        out = F.adaptive_avg_pool2d(self.classifier(features), (1, 1))
        return self.logit_layer(torch.flatten(out, 1))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.forward_head(self.features(x))

    def get_classifier(self) -> nn.Module:
        """The 1x1 B-cos conv classifier (applied before pooling)."""
        return self.classifier
