"""FaCT: B-cos networks with bias-free TopK SAEs inside, and exact concept explanations.

* :class:`FaCT` -- the model (:mod:`fact_model.model`), saved and loaded with
  ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (:mod:`fact_model.hub`);
* exact explanations with their completeness errors (:mod:`fact_model.explain`): concept
  contributions to logits (Eq. 9), concept input attributions (Eq. 12), attributions of a
  contribution (Eq. H.6) and cross-layer contributions (Eq. H.14);
* training: importance-sampled feature sets (Eq. A.1, :mod:`fact_model.features`), SAE sweeps
  selected by held-out FaCT accuracy (:mod:`fact_model.training`, :mod:`fact_model.pipeline`);
* analysis: evaluation, concept statistics (App. D), misclassification (Fig. 8), and the
  concept sets that ``concept_deletion`` and ``c2score`` consume (:mod:`fact_model.concepts`).
"""

from fact_model.concepts import LayerConcepts
from fact_model.consistency import c2_inputs, c2_score, deletion
from fact_model.data import IndexedImages, TensorImages, eval_transform_for, open_dataset
from fact_model.evaluation import EvalResult, evaluate
from fact_model.explain import (
    ConceptAttributions,
    ConceptContributions,
    CrossLayerContributions,
    channel_attributions,
    channel_contributions,
    concept_attributions,
    concept_contributions,
    contribution_attributions,
    cross_layer_contributions,
)
from fact_model.features import FeatureConfig, FeatureSet, extract_features, open_feature_set
from fact_model.misclassification import ConceptComparison, compare_classes
from fact_model.model import PAPER_LAYERS, BackboneSpec, FaCT, FaCTOutput, LayerInfo
from fact_model.pipeline import PAPER_SAE_CONFIGS, SweepGrid, train_fact
from fact_model.stats import ConceptStats, concept_statistics
from fact_model.training import HeldoutScorer, train_layer

__version__ = "0.1.0"

__all__ = [
    "PAPER_LAYERS",
    "PAPER_SAE_CONFIGS",
    "BackboneSpec",
    "ConceptAttributions",
    "ConceptComparison",
    "ConceptContributions",
    "ConceptStats",
    "CrossLayerContributions",
    "EvalResult",
    "FaCT",
    "FaCTOutput",
    "FeatureConfig",
    "FeatureSet",
    "HeldoutScorer",
    "IndexedImages",
    "LayerConcepts",
    "LayerInfo",
    "SweepGrid",
    "TensorImages",
    "__version__",
    "c2_inputs",
    "c2_score",
    "channel_attributions",
    "channel_contributions",
    "compare_classes",
    "concept_attributions",
    "concept_contributions",
    "concept_statistics",
    "contribution_attributions",
    "cross_layer_contributions",
    "deletion",
    "eval_transform_for",
    "evaluate",
    "extract_features",
    "open_dataset",
    "open_feature_set",
    "train_fact",
    "train_layer",
]
