"""Training configuration of a bias-free TopK SAE (documented field by field) and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (together with the data source and seed).

    Defaults follow the FaCT authors' recipe: Adam(0.9, 0.999), one epoch of linear warm-up,
    one epoch at the peak rate, cosine decay to 0, 16 epochs, gradient clipping at 1.0, AuxK with
    256 auxiliary latents and coefficient 1/32, latents dead after half an epoch without firing.
    The batch size belongs to the data source (``TensorSource(..., batch_size=32786)``).
    """

    n_latents: int
    """Number of dictionary atoms (the paper uses 8192 or 16384)."""
    k: int
    """Active latents per input vector (TopK; the paper uses 16, 32 or 64)."""
    d_in: int | None = None
    """Feature dimension; ``None`` takes it from the source, otherwise it must match the source."""
    epochs: float = 16.0
    """Passes over the data; fractional values stop mid-epoch."""
    lr: float = 1e-3
    """Peak learning rate of Adam."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    warmup_epochs: float = 1.0
    """Linear warm-up from 0 to ``lr`` over this many epochs."""
    hold_epochs: float = 1.0
    """Epochs at the peak rate after warm-up, before the cosine decay starts."""
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at ``lr * min_lr_ratio``."""
    grad_clip_norm: float | None = 1.0
    """Global gradient-norm clipping (after removing the atom-parallel decoder component)."""
    k_aux: int = 256
    """Auxiliary latents (among the dead ones) that reconstruct the residual in the AuxK loss."""
    auxk_coef: float = 1.0 / 32.0
    """Weight of the AuxK loss; 0 disables it."""
    dead_after_tokens: int | None = None
    """A latent is dead after this many input vectors without firing; ``None``: half an epoch."""
    always_active_threshold: float = 0.6
    """A latent is always-active when it fires on more than this fraction of an epoch's inputs."""
    init: Literal["random", "data"] = "random"
    """``random``: Gaussian atoms; ``data``: atoms from random (scaled) data points, which keeps
    latents of a bias-free SAE on uncentred features from being dead at initialisation."""
    data_init_blend: float = 0.8
    """For ``init='data'``: atom = normalise(blend * data_point + (1 - blend) * gaussian)."""
    k_anneal_steps: int = 0
    """Steps of linear k-annealing from ``k_anneal_start`` down to ``k``; 0 disables it."""
    k_anneal_start: int | None = None
    """Initial k of the annealing; ``None``: ``min(d_in, n_latents)``."""
    input_scale: float | None = None
    """Global input scale; ``None`` estimates ``sqrt(mean ||x||^2)`` from the data."""
    scale_estimation_rows: int = 65536
    """Rows read from the start of epoch 0 to estimate the scale and the mean/spread ratio."""
    uncentered_warn_ratio: float = 1.0
    """Warn when ||mean|| / spread of the features exceeds this (dead-latent risk, see README)."""
    seed: int = 0
    """Seed of the initialisation (the source has its own seed for the data order)."""
    device: str | None = None
    """Torch device: ``cpu`` (also ``None``), ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when
    available). Nothing goes to CUDA unless asked; under ``torchrun`` a bare ``cuda`` means
    ``cuda:LOCAL_RANK``."""
    autocast_bf16: bool = False
    """Run the dense encoder matmul in bfloat16 autocast (selected values are recomputed in
    float32; the loss is accumulated in float32)."""
    deterministic: bool = False
    """Call ``torch.use_deterministic_algorithms(True)`` during the run (exact resume on CPU)."""
    checkpoint_every: int = 500
    """Write an atomic checkpoint every this many optimizer steps (and at the end)."""
    keep_checkpoints: int = 1
    """How many most recent checkpoints to keep on disk."""
    log_every: int = 50
    """Record a history entry every this many steps."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        validate_config(self)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        return cls(**data)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the offending field and how to fix it."""
    _positive_int("n_latents", cfg.n_latents)
    _positive_int("k", cfg.k)
    if cfg.k > cfg.n_latents:
        raise ValueError(f"k={cfg.k} must be <= n_latents={cfg.n_latents}")
    if cfg.d_in is not None:
        _positive_int("d_in", cfg.d_in)
    if not cfg.epochs > 0:
        raise ValueError(f"epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ValueError(f"adam_betas must be two numbers in [0, 1), got {cfg.adam_betas}")
    for name in ("warmup_epochs", "hold_epochs", "auxk_coef"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.grad_clip_norm is not None and not cfg.grad_clip_norm > 0:
        raise ValueError(f"grad_clip_norm must be > 0 or None, got {cfg.grad_clip_norm}")
    _positive_int("k_aux", cfg.k_aux)
    if cfg.dead_after_tokens is not None:
        _positive_int("dead_after_tokens", cfg.dead_after_tokens)
    if not 0 < cfg.always_active_threshold <= 1:
        raise ValueError(
            f"always_active_threshold must be in (0, 1], got {cfg.always_active_threshold}"
        )
    if cfg.init not in ("random", "data"):
        raise ValueError(f"init must be 'random' or 'data', got {cfg.init!r}")
    if not 0 <= cfg.data_init_blend <= 1:
        raise ValueError(f"data_init_blend must be in [0, 1], got {cfg.data_init_blend}")
    if cfg.k_anneal_steps < 0:
        raise ValueError(f"k_anneal_steps must be >= 0, got {cfg.k_anneal_steps}")
    if cfg.k_anneal_start is not None:
        _positive_int("k_anneal_start", cfg.k_anneal_start)
        if not cfg.k <= cfg.k_anneal_start <= cfg.n_latents:
            raise ValueError(
                f"k_anneal_start={cfg.k_anneal_start} must lie in [k, n_latents] = "
                f"[{cfg.k}, {cfg.n_latents}]"
            )
    if cfg.input_scale is not None and not cfg.input_scale > 0:
        raise ValueError(f"input_scale must be > 0 or None, got {cfg.input_scale}")
    _positive_int("scale_estimation_rows", cfg.scale_estimation_rows)
    _positive_int("checkpoint_every", cfg.checkpoint_every)
    _positive_int("keep_checkpoints", cfg.keep_checkpoints)
    _positive_int("log_every", cfg.log_every)
