"""B-cos networks: dynamic-linear layers, model zoo, official B-cos-v2 checkpoints, exact explanations."""

from bcos_layers.explain import CapturedOutput, Explanation, capture_output, explain
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

# Checkpoints, transforms, visualization and training live in their own modules; their main
# entry points are re-exported here.
from bcos_layers.pretrained import OFFICIAL_CHECKPOINTS, load_official_state_dict
from bcos_layers.training import UniformOffLabelBCELoss
from bcos_layers.transforms import eval_transform
from bcos_layers.visualize import contribution_heatmap, explanation_rgba, save_explanation_png

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "AddInverse",
    "Attention",
    "BatchNormUncentered2d",
    "BcosConv2d",
    "BcosLinear",
    "CapturedOutput",
    "DetachableGroupNorm2d",
    "DetachableLayerNorm",
    "DetachableModule",
    "Encoder",
    "Explanation",
    "FeedForward",
    "LayerNorm2d",
    "LogitLayer",
    "PosEmbSinCos2d",
    "Transformer",
    "UniformOffLabelBCELoss",
    "__version__",
    "capture_output",
    "contribution_heatmap",
    "create",
    "eval_transform",
    "explain",
    "explanation_mode",
    "explanation_rgba",
    "list_models",
    "load_official_state_dict",
    "save_explanation_png",
]
