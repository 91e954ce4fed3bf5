"""B-cos layers: dynamic-linear conv/linear, bias-free norms, transformer blocks, small helpers."""

from bcos_layers.layers.bcos import BcosConv2d, BcosLinear, NormedConv2d, NormedLinear
from bcos_layers.layers.detachable import DetachableModule
from bcos_layers.layers.misc import AddInverse, LogitLayer, PosEmbSinCos2d
from bcos_layers.layers.norms import (
    BatchNormUncentered2d,
    DetachableGroupNorm2d,
    DetachableLayerNorm,
    LayerNorm2d,
)
from bcos_layers.layers.transformer import Attention, Encoder, FeedForward, Transformer

__all__ = [
    "AddInverse",
    "Attention",
    "BatchNormUncentered2d",
    "BcosConv2d",
    "BcosLinear",
    "DetachableGroupNorm2d",
    "DetachableLayerNorm",
    "DetachableModule",
    "Encoder",
    "FeedForward",
    "LayerNorm2d",
    "LogitLayer",
    "NormedConv2d",
    "NormedLinear",
    "PosEmbSinCos2d",
    "Transformer",
]
