"""Bias-free TopK sparse autoencoders and a streaming, resumable trainer.

``topk_sae.sweep.sweep`` is not re-exported here: a package attribute named ``sweep`` would
shadow the ``topk_sae.sweep`` module.
"""

from topk_sae.config import TrainConfig
from topk_sae.data import DEFAULT_BATCH_SIZE, BatchSource, TensorSource
from topk_sae.kernels import gather_preacts, sparse_decode
from topk_sae.metrics import (
    FiringHistogram,
    MetricsAccumulator,
    SAEMetrics,
    evaluate,
    firing_histogram,
)
from topk_sae.sae import BiasFreeTopKSAE, SAEOutput, SparseCode
from topk_sae.stability import StabilityResult, stability_score
from topk_sae.store import FeatureStoreWriter, ShardedFeatureStore, StoreSource, merge_stores
from topk_sae.sweep import RunResult, SweepResult, pareto_front, select_best
from topk_sae.trainer import TrainingDivergedError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "BatchSource",
    "BiasFreeTopKSAE",
    "FeatureStoreWriter",
    "FiringHistogram",
    "MetricsAccumulator",
    "RunResult",
    "SAEMetrics",
    "SAEOutput",
    "ShardedFeatureStore",
    "SparseCode",
    "StabilityResult",
    "StoreSource",
    "SweepResult",
    "TensorSource",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "__version__",
    "evaluate",
    "firing_histogram",
    "gather_preacts",
    "merge_stores",
    "pareto_front",
    "select_best",
    "sparse_decode",
    "stability_score",
    "train",
]
