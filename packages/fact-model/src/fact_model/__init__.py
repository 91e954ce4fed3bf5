"""FaCT: B-cos networks with bias-free TopK SAEs inside, and exact concept explanations.

* :class:`FaCT` -- the model (:mod:`fact_model.model`), saved and loaded with
  ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (:mod:`fact_model.hub`);
* exact explanations with their completeness errors (:mod:`fact_model.explain`): concept
  contributions to logits (Eq. 9), concept input attributions (Eq. 12), attributions of a
  contribution (Eq. H.6) and cross-layer contributions (Eq. H.14).
"""

from fact_model.explain import (
    ConceptAttributions,
    ConceptContributions,
    CrossLayerContributions,
    concept_attributions,
    concept_contributions,
    contribution_attributions,
    cross_layer_contributions,
)
from fact_model.model import PAPER_LAYERS, BackboneSpec, FaCT, FaCTOutput, LayerInfo

__version__ = "0.1.0"

__all__ = [
    "PAPER_LAYERS",
    "BackboneSpec",
    "ConceptAttributions",
    "ConceptContributions",
    "CrossLayerContributions",
    "FaCT",
    "FaCTOutput",
    "LayerInfo",
    "__version__",
    "concept_attributions",
    "concept_contributions",
    "contribution_attributions",
    "cross_layer_contributions",
]
