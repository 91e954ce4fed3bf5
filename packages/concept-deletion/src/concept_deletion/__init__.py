"""Concept-deletion metric and concept-importance measures for any concept model.

Give it a model's concept codes (cached once) and its head ``h`` (codes -> logits); it ranks
concepts by importance measures (model-inherent contributions, Saliency, Gradient x Input,
Integrated Gradients, Sobol total indices, occlusion, random), deletes them in that order
through ``h`` only, and reports deletion/insertion curves and their areas (FaCT Sec. 6, App. F).
"""

from concept_deletion.deletion import (
    CurveResult,
    Mode,
    Schedule,
    Score,
    deletion_curve,
    deletion_order,
    deletion_schedule,
    trapezoid_auc,
)
from concept_deletion.head import (
    DEFAULT_MAX_ELEMENTS,
    ConceptHead,
    ConceptModel,
    evaluate_masked,
)
from concept_deletion.importance import (
    IGRule,
    ImportanceConfig,
    Measure,
    active_concepts,
    class_importance,
    expand_class_importance,
    gradient_x_input,
    integrated_gradients,
    local_importance,
    occlusion,
    random_importance,
    saliency,
    sobol_total_indices,
)
from concept_deletion.layout import Layout, Reduction, apply_masks, check_codes, reduce_positions
from concept_deletion.output import curves_from_json, curves_to_json, save_curves
from concept_deletion.plot import plot_curves
from concept_deletion.protocol import (
    ComparisonConfig,
    Ordering,
    ProtocolConfig,
    Target,
    always_on_concepts,
    compare_measures,
    paper_protocol,
    select_images,
)
from concept_deletion.sobol import QMCSequence, jansen_total_indices, quasi_random_design

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "ComparisonConfig",
    "ConceptHead",
    "ConceptModel",
    "CurveResult",
    "IGRule",
    "ImportanceConfig",
    "Layout",
    "Measure",
    "Mode",
    "Ordering",
    "ProtocolConfig",
    "QMCSequence",
    "Reduction",
    "Schedule",
    "Score",
    "Target",
    "__version__",
    "active_concepts",
    "always_on_concepts",
    "apply_masks",
    "check_codes",
    "class_importance",
    "compare_measures",
    "curves_from_json",
    "curves_to_json",
    "deletion_curve",
    "deletion_order",
    "deletion_schedule",
    "evaluate_masked",
    "expand_class_importance",
    "gradient_x_input",
    "integrated_gradients",
    "jansen_total_indices",
    "local_importance",
    "occlusion",
    "paper_protocol",
    "plot_curves",
    "quasi_random_design",
    "random_importance",
    "reduce_positions",
    "saliency",
    "save_curves",
    "select_images",
    "sobol_total_indices",
    "trapezoid_auc",
]
