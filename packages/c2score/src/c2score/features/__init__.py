"""Per-pixel image features for the C2-score: DINOv2 patch features, LoftUp/bilinear upsampling.

``make_extractor("dinov2-small+loftup")`` builds the paper's feature pipeline; the pieces
(:class:`Dinov2PatchFeatures`, :class:`LoftUpUpsampler`, :class:`BilinearUpsampler`,
:class:`UpsampledFeatureExtractor`) can also be composed by hand. :class:`OracleFeatures`
serves user-supplied maps instead (validation against known parts).
"""

from c2score.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchBackbone,
    PixelFeatureExtractor,
    TwoStageFeatureExtractor,
    Upsampler,
    check_rgb_images,
    imagenet_normalize,
)
from c2score.features.dinov2 import DEFAULT_DINOV2, Dinov2PatchFeatures
from c2score.features.loftup import (
    DEFAULT_LOFTUP,
    LOFTUP_FILENAME,
    LoftUp,
    LoftUpCheckpointError,
    LoftUpUpsampler,
    LoftUpWithChannelNorm,
    from_training_state_dict,
    load_loftup,
    read_state_dict,
)
from c2score.features.oracle import IndexedFeatureExtractor, OracleFeatures
from c2score.features.registry import (
    DEFAULT_SPEC,
    DINOV2_MODELS,
    LOFTUP_FOR_BACKBONE,
    HubOptions,
    UpsamplerRequest,
    available_backbones,
    available_upsamplers,
    make_extractor,
    parse_spec,
    register_backbone,
    register_upsampler,
)
from c2score.features.upsample import BilinearUpsampler, UpsampledFeatureExtractor

__all__ = [
    "DEFAULT_DINOV2",
    "DEFAULT_LOFTUP",
    "DEFAULT_SPEC",
    "DINOV2_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOFTUP_FILENAME",
    "LOFTUP_FOR_BACKBONE",
    "BilinearUpsampler",
    "Dinov2PatchFeatures",
    "HubOptions",
    "IndexedFeatureExtractor",
    "LoftUp",
    "LoftUpCheckpointError",
    "LoftUpUpsampler",
    "LoftUpWithChannelNorm",
    "OracleFeatures",
    "PatchBackbone",
    "PixelFeatureExtractor",
    "TwoStageFeatureExtractor",
    "UpsampledFeatureExtractor",
    "Upsampler",
    "UpsamplerRequest",
    "available_backbones",
    "available_upsamplers",
    "check_rgb_images",
    "from_training_state_dict",
    "imagenet_normalize",
    "load_loftup",
    "make_extractor",
    "parse_spec",
    "read_state_dict",
    "register_backbone",
    "register_upsampler",
]
