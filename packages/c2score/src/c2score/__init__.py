"""C2-score: concept consistency with DINOv2 features upsampled by LoftUp, for any concept method.

Paper Eq. 13-16: per concept, the attribution-weighted mean of centred per-pixel features on
each of its top-activating images; the weighted mean pairwise cosine of these embeddings; minus
the same for a random concept. :func:`evaluate_c2` computes it in one streaming pass.
"""

from c2score.baseline import RandomBaselineConfig, random_attribution
from c2score.consistency import (
    ConsistencyAccumulator,
    pairwise_consistency_dense,
    weighted_consistency,
)
from c2score.evaluate import EvalConfig, evaluate_c2
from c2score.features import make_extractor
from c2score.features.base import PixelFeatureExtractor
from c2score.features.oracle import IndexedFeatureExtractor, OracleFeatures
from c2score.io import (
    ActivationTable,
    DenseAttributions,
    ImageFolder,
    StoredAttributions,
    load_activation_table,
    save_activation_table,
)
from c2score.report import C2Result, UndefinedScoreWarning
from c2score.selection import Selection, SelectionConfig, n_to_select, select_images

__version__ = "0.1.0"

__all__ = [
    "ActivationTable",
    "C2Result",
    "ConsistencyAccumulator",
    "DenseAttributions",
    "EvalConfig",
    "ImageFolder",
    "IndexedFeatureExtractor",
    "OracleFeatures",
    "PixelFeatureExtractor",
    "RandomBaselineConfig",
    "Selection",
    "SelectionConfig",
    "StoredAttributions",
    "UndefinedScoreWarning",
    "__version__",
    "evaluate_c2",
    "load_activation_table",
    "make_extractor",
    "n_to_select",
    "pairwise_consistency_dense",
    "random_attribution",
    "save_activation_table",
    "select_images",
    "weighted_consistency",
]
