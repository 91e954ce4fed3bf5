"""Bias-free TopK sparse autoencoders and a streaming, resumable trainer."""

from topk_sae.config import TrainConfig
from topk_sae.data import DEFAULT_BATCH_SIZE, BatchSource, TensorSource
from topk_sae.kernels import gather_preacts, sparse_decode
from topk_sae.sae import BiasFreeTopKSAE, SAEOutput, SparseCode
from topk_sae.trainer import TrainingDivergedError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "BatchSource",
    "BiasFreeTopKSAE",
    "SAEOutput",
    "SparseCode",
    "TensorSource",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "__version__",
    "gather_preacts",
    "sparse_decode",
    "train",
]
