"""The concept world: procedural images built from a shared concept vocabulary, with exact
per-pixel ground truth, and the ground-truth evaluation of learned concepts.

See :class:`ConceptWorld` (the generator), :mod:`fact_model.world.vocabulary` (concepts and
classes) and :mod:`fact_model.world.groundtruth` (matching and localisation metrics).
"""

from fact_model.world.dataset import (
    SPLITS,
    ConceptWorld,
    WorldBatch,
    WorldConfig,
    WorldSample,
    WorldTorchDataset,
    masks_from_bits,
    present_from_bits,
)
from fact_model.world.vocabulary import CLASSES, CONCEPT_NAMES, ClassSpec, ConceptSpec

__all__ = [
    "CLASSES",
    "CONCEPT_NAMES",
    "SPLITS",
    "ClassSpec",
    "ConceptSpec",
    "ConceptWorld",
    "WorldBatch",
    "WorldConfig",
    "WorldSample",
    "WorldTorchDataset",
    "masks_from_bits",
    "present_from_bits",
]
