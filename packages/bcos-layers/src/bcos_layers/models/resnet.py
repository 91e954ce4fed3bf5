"""B-cos ResNets (B-cos-v2 ``models/resnet.py`` layout): no ReLU, no biases, AvgPool stem,
uncentered bias-free BatchNorm, a 1x1 B-cos classifier applied *before* global average pooling,
and a :class:`~bcos_layers.layers.LogitLayer` at the end. Module names and state-dict keys equal
the official ones, so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from bcos_layers.layers import BatchNormUncentered2d, BcosConv2d, LogitLayer
from bcos_layers.models._base import BcosModelMixin

__all__ = ["BasicBlock", "BcosResNet", "Bottleneck"]

LayerFactory = Callable[..., nn.Module]
DEFAULT_CONV = partial(BcosConv2d, b=2, max_out=1)


def _conv3x3(
    conv: LayerFactory, cin: int, cout: int, stride: int = 1, groups: int = 1
) -> nn.Module:
    return conv(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups)


def _conv1x1(conv: LayerFactory, cin: int, cout: int, stride: int = 1) -> nn.Module:
    return conv(cin, cout, kernel_size=1, stride=stride)


class _ResidualBlock(nn.Module):
    """What both block types share: optional stochastic depth, then the (downsampled) shortcut."""

    downsample: nn.Module | None
    stochastic_depth: StochasticDepth | None

    def _init_shortcut(self, downsample: nn.Module | None, stochastic_depth_prob: float) -> None:
        self.downsample = downsample
        self.stochastic_depth = (
            StochasticDepth(stochastic_depth_prob, "row") if stochastic_depth_prob else None
        )

    def _add_shortcut(self, out: Tensor, x: Tensor) -> Tensor:
        if self.stochastic_depth is not None:
            out = self.stochastic_depth(out)
        out += x if self.downsample is None else self.downsample(x)
        return out


class BasicBlock(_ResidualBlock):
    """Two 3x3 B-cos convs with norms and an identity (or 1x1-conv) shortcut; no ReLU."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: LayerFactory = BatchNormUncentered2d,
        conv_layer: LayerFactory = DEFAULT_CONV,
        stochastic_depth_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        self.conv1 = _conv3x3(conv_layer, inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(conv_layer, planes, planes)
        self.bn2 = norm_layer(planes)
        self._init_shortcut(downsample, stochastic_depth_prob)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self._add_shortcut(out, x)


class Bottleneck(_ResidualBlock):
    """1x1 → 3x3 (stride here, ResNet v1.5) → 1x1 (x4) B-cos convs with norms; no ReLU."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: LayerFactory = BatchNormUncentered2d,
        conv_layer: LayerFactory = DEFAULT_CONV,
        stochastic_depth_prob: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(conv_layer, inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(conv_layer, width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(conv_layer, width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self._init_shortcut(downsample, stochastic_depth_prob)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return self._add_shortcut(out, x)


class BcosResNet(BcosModelMixin, nn.Module):
    """B-cos ResNet / ResNeXt / Wide-ResNet.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (50/101/152).
        layers: number of blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes: output logits.
        in_chans: input channels (6 = RGB + inverse, see :class:`~bcos_layers.AddInverse`).
        groups, width_per_group: ResNeXt / wide variants (Bottleneck only).
        inplanes: stem width (64 for ImageNet models; smaller for tiny test models).
        small_inputs: CIFAR-style stem (3x3 conv, no pooling) instead of 7x7/s2 + AvgPool.
        stochastic_depth_prob: final drop probability, linearly increasing over blocks (0.1 for
            the ``_long`` checkpoints; identity in eval).
        norm_layer: norm factory (uncentered bias-free BatchNorm for the released models).
        conv_layer: B-cos conv factory (``b=2, max_out=1`` for the released models).
        logit_bias: added to the logits; ``None`` means ``-log(num_classes - 1)``.
        logit_temperature: optional divisor of the logits (``None`` for the released models).
        zero_init_residual: zero the last norm weight of each block.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 6,
        groups: int = 1,
        width_per_group: int = 64,
        inplanes: int = 64,
        small_inputs: bool = False,
        stochastic_depth_prob: float = 0.0,
        norm_layer: LayerFactory = BatchNormUncentered2d,
        conv_layer: LayerFactory = DEFAULT_CONV,
        logit_bias: float | None = None,
        logit_temperature: float | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) not in (3, 4) or min(layers) < 1:
            raise ValueError(f"layers must be 3 or 4 positive block counts, got {list(layers)}")
        if num_classes < 2 and logit_bias is None:
            raise ValueError("num_classes must be >= 2 (or pass an explicit logit_bias)")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.groups = groups
        self.base_width = width_per_group
        self._norm_layer = norm_layer
        self._conv_layer = conv_layer
        self._inplanes = inplanes
        self._total_blocks = sum(layers)
        self._built_blocks = 0
        self._sd_prob = stochastic_depth_prob

        if small_inputs:
            self.conv1 = _conv3x3(conv_layer, in_chans, inplanes)
            self.pool = None
        else:
            self.conv1 = conv_layer(in_chans, inplanes, kernel_size=7, stride=2, padding=3)
            self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(inplanes)
        self.layer1 = self._make_layer(block, inplanes, layers[0])
        self.layer2 = self._make_layer(block, inplanes * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, inplanes * 4, layers[2], stride=2)
        if len(layers) == 4:
            self.layer4 = self._make_layer(block, inplanes * 8, layers[3], stride=2)
            last = inplanes * 8
        else:
            self.layer4 = None
            last = inplanes * 4
        self.num_features = last * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = conv_layer(self.num_features, num_classes, kernel_size=1)
        self.logit_layer = LogitLayer(
            logit_temperature=logit_temperature,
            logit_bias=-math.log(num_classes - 1) if logit_bias is None else logit_bias,
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._conv_layer, self._inplanes, planes * block.expansion, stride),
                self._norm_layer(planes * block.expansion),
            )
        out = []
        for i in range(blocks):
            sd = self._sd_prob * self._built_blocks / max(self._total_blocks - 1, 1)
            out.append(
                block(
                    self._inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    groups=self.groups,
                    base_width=self.base_width,
                    norm_layer=self._norm_layer,
                    conv_layer=self._conv_layer,
                    stochastic_depth_prob=sd,
                )
            )
            self._built_blocks += 1
            self._inplanes = planes * block.expansion
        return nn.Sequential(*out)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and stages: ``[N, num_features, H/32, W/32]`` (before the classifier)."""
        x = self.bn1(self.conv1(x))
        if self.pool is not None:
            x = self.pool(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.layer4 is not None:
            x = self.layer4(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """1x1 B-cos classifier on the feature map, global average pool, logit layer."""
        return self.logit_layer(self.avgpool(self.fc(features)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The 1x1 B-cos conv classifier (applied before pooling)."""
        return self.fc
