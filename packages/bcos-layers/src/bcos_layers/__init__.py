"""B-cos networks: dynamic-linear layers, model zoo, official B-cos-v2 checkpoints, exact explanations."""

from bcos_layers.explanation_mode import explanation_mode
from bcos_layers.layers import (
    AddInverse,
    Attention,
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    DetachableGroupNorm2d,
    DetachableLayerNorm,
    DetachableModule,
    Encoder,
    FeedForward,
    LayerNorm2d,
    LogitLayer,
    PosEmbSinCos2d,
    Transformer,
)
from bcos_layers.models import create, list_models

__version__ = "0.1.0"

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
    "PosEmbSinCos2d",
    "Transformer",
    "__version__",
    "create",
    "explanation_mode",
    "list_models",
]
