"""Training loop of the bias-free TopK SAE: Adam, warm-up + cosine schedule, AuxK, dead and
always-active tracking, global input scaling, atomic checkpoints, exact resume and a NaN guard.

One optimizer step (the order of the FaCT release / dictionary_learning)::

    loss = mean_i ||x_i - x_hat_i||^2 + auxk_coef * AuxK      (x scaled by 1/input_scale)
    backward (sparse: only selected latents get encoder/decoder gradient)
    remove the gradient component parallel to each atom -> clip -> Adam -> renormalise atoms

Under ``torchrun`` (a process group of W > 1 ranks, see ``topk_sae.distributed``) every rank
reads the same global batch order and trains on its contiguous 1/W of each batch through
``DistributedDataParallel``. Every global quantity is reduced across ranks: the loss is scaled
so that DDP's gradient average equals the gradient of the single-process loss of the whole
batch, the AuxK normaliser is the residual variance of the whole batch, firing counts (hence
the dead set AuxK uses, L0 and the epoch statistics) are summed, and rank 0 alone writes
checkpoints, the history and the model. All state in a checkpoint is global, so a run resumes
with the same or a different number of ranks.

Why DDP and not FSDP: the largest dictionary of the paper (16,384 latents x 2,048 features,
encoder and decoder) is 268 MB of parameters, 1.1 GB with Adam's moments and the gradients,
which fits any training GPU many times over; what does not fit one device is the data, and
that is what DDP divides. FSDP would shard the parameters at the price of an all-gather before
every dense encoder matmul, i.e. more traffic per step for memory that is not short.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from topk_sae import distributed as dist
from topk_sae.checkpoint import CheckpointManager
from topk_sae.config import TrainConfig
from topk_sae.data import BatchSource
from topk_sae.fileio import atomic_write_text
from topk_sae.hub import load_state_strict
from topk_sae.sae import BiasFreeTopKSAE, TrainForward

AUXK_MIN_RELATIVE_SPREAD = 1e-6
"""AuxK is skipped on a batch whose residual variance about the batch mean is at most this
fraction of the residuals' mean squared norm (no spread: one row or identical rows)."""


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is kept."""


class TrainResult(NamedTuple):
    """Outcome of ``train``."""

    model: BiasFreeTopKSAE
    """The trained model (on the training device), with its ``input_scale`` set."""
    history: list[dict[str, Any]]
    """Per-step records every ``log_every`` steps (loss, mse, auxk, batch FVU, L0, dead, lr, k)."""
    epoch_stats: list[dict[str, Any]]
    """Per completed epoch: dead and always-active fractions, mean L0."""
    input_stats: dict[str, float]
    """``input_scale``, ``mean_norm``, ``spread``, ``mean_spread_ratio`` of the features."""
    model_dir: Path
    """``<out_dir>/model``: the final model written by ``save_pretrained``."""


class LossParts(NamedTuple):
    total: Tensor
    mse: Tensor
    auxk: Tensor
    forward: TrainForward


@dataclass(frozen=True)
class Schedule:
    """Step-indexed learning-rate multiplier and k (pure functions of the step: nothing to save)."""

    config: TrainConfig
    steps_per_epoch: int
    total_steps: int
    d_in: int

    def lr_factor(self, step: int) -> float:
        """Multiplier for the ``step``-th update (0-based): linear warm-up, hold, cosine."""
        cfg = self.config
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        hold = round(cfg.hold_epochs * self.steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        if step < warmup + hold:
            return 1.0
        decay = max(1, self.total_steps - warmup - hold)
        progress = min(1.0, (step - warmup - hold) / decay)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    def k_at(self, step: int) -> int:
        """k for the ``step``-th update: linear annealing from ``k_anneal_start`` to ``k``."""
        cfg = self.config
        if cfg.k_anneal_steps <= 0 or step >= cfg.k_anneal_steps:
            return cfg.k
        start = cfg.k_anneal_start or min(self.d_in, cfg.n_latents)
        start = max(start, cfg.k)
        return round(start + (cfg.k - start) * step / cfg.k_anneal_steps)


def compute_loss(
    model: BiasFreeTopKSAE,
    xs_ND: Tensor,
    *,
    k: int,
    dead_n: Tensor | None,
    k_aux: int,
    auxk_coef: float,
    bf16: bool = False,
) -> LossParts:
    """Reconstruction MSE (summed over features, mean over rows) + ``auxk_coef`` * AuxK.

    AuxK: the top ``k_aux`` dead latents reconstruct the detached residual ``e = x - x_hat``
    with the decoder alone (no bias); the loss is normalised by the residual's variance about
    its batch mean. Its gradient reaches the encoder through the selected dead pre-activations.

    A batch whose residuals have (almost) no spread -- one row, or identical rows -- has no
    usable normaliser: 0, or rounding noise of order ``eps^2 ||e||^2`` (about 1e-17 in
    float32), which would give a NaN gradient or a loss of 1e17. AuxK is then 0 for that batch
    (value *and* gradient): it is skipped when the variance is at most
    ``AUXK_MIN_RELATIVE_SPREAD`` times the residuals' mean squared norm.
    """
    fwd = model.train_forward(
        xs_ND, k=k, dead_n=dead_n if auxk_coef > 0 else None, k_aux=k_aux, bf16=bf16
    )
    mse = (fwd.recon_ND - xs_ND).pow(2).sum(dim=1).mean()
    auxk = xs_ND.new_zeros(())
    if fwd.aux_recon_ND is not None:
        residual = (xs_ND - fwd.recon_ND).detach()
        aux_err = (fwd.aux_recon_ND - residual).pow(2).sum(dim=1).mean()
        denom = (residual - residual.mean(dim=0)).pow(2).sum(dim=1).mean()
        usable = denom > AUXK_MIN_RELATIVE_SPREAD * residual.pow(2).sum(dim=1).mean()
        # Both branches of a where() are differentiated: divide by 1 where the normaliser is
        # unusable, so the skipped branch has a finite (zero-weighted) gradient, not NaN.
        auxk = torch.where(usable, aux_err / torch.where(usable, denom, 1.0), 0.0)
    return LossParts(mse + auxk_coef * auxk, mse, auxk, fwd)


def make_optimizer(
    model: BiasFreeTopKSAE,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Adam:
    """Adam over ``W_enc`` and ``W_dec``; the fused single-kernel update on CPU and CUDA.

    The update is O(n_latents · d_in) memory traffic per step whatever the sparsity; the fused
    kernel reads and writes each state tensor once instead of ~15 elementwise passes.
    """
    device = model.W_enc.device.type
    fused = device in ("cpu", "cuda") and model.W_enc.dtype == torch.float32
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, fused=fused or None)


def training_step(
    model: BiasFreeTopKSAE,
    optimizer: torch.optim.Optimizer,
    xs_ND: Tensor,
    *,
    k: int,
    dead_n: Tensor | None,
    k_aux: int,
    auxk_coef: float,
    grad_clip_norm: float | None,
    bf16: bool = False,
) -> tuple[LossParts, float, float]:
    """One full update on scaled rows: loss, sparse backward, remove the atom-parallel decoder
    gradient, clip, optimizer step, renormalise the atoms.

    Returns ``(loss parts, loss value, gradient norm)``; the gradient norm (before clipping) is
    computed whether or not ``grad_clip_norm`` is set, and when the loss or the gradient norm
    is not finite the parameters are left untouched (the caller decides what to do).
    """
    parts = compute_loss(
        model, xs_ND, k=k, dead_n=dead_n, k_aux=k_aux, auxk_coef=auxk_coef, bf16=bf16
    )
    loss_value = float(parts.total.detach())
    if not math.isfinite(loss_value):
        return parts, loss_value, math.nan
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    return parts, loss_value, _update(model, optimizer, grad_clip_norm)


def _update(
    model: BiasFreeTopKSAE, optimizer: torch.optim.Optimizer, grad_clip_norm: float | None
) -> float:
    """After backward: remove the atom-parallel decoder gradient, clip, step, renormalise.

    Returns the gradient norm before clipping; when it is not finite nothing is updated.
    """
    model.remove_parallel_grad_()
    if grad_clip_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm))
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = [torch.linalg.vector_norm(g) for g in grads]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
    optimizer.step()
    model.normalize_atoms_()
    return grad_norm


class _RankLoss(nn.Module):
    """One rank's share of the single-process loss of a global batch (for DDP).

    ``forward`` returns ``(objective, sse, aux_term, fwd)``: the objective is
    ``W / N * (sse + auxk_coef * aux_term)`` over this rank's rows, so that DDP's average of the
    W gradients is the gradient of ``mse + auxk_coef * AuxK`` over all N rows. A rank without
    rows (a last batch shorter than W) contributes exact zeros but joins every reduction.
    """

    def __init__(self, sae: BiasFreeTopKSAE) -> None:
        super().__init__()
        self.sae = sae

    def forward(
        self,
        xs_ND: Tensor,
        n_global: int,
        k: int,
        dead_n: Tensor | None,
        k_aux: int,
        auxk_coef: float,
        bf16: bool,
    ) -> tuple[Tensor, Tensor, Tensor, TrainForward | None]:
        sae = self.sae
        use_aux = auxk_coef > 0 and dead_n is not None and bool(dead_n.any())
        if xs_ND.shape[0] > 0:
            fwd = sae.train_forward(
                xs_ND, k=k, dead_n=dead_n if auxk_coef > 0 else None, k_aux=k_aux, bf16=bf16
            )
            sse = (fwd.recon_ND - xs_ND).pow(2).sum()
            recon = fwd.recon_ND
        else:
            fwd = None
            # Zero-valued but connected to both parameters, so DDP sees their (zero) gradients.
            sse = (sae.W_enc.sum() + sae.W_dec.sum()) * 0.0
            recon = xs_ND
        aux_term = torch.zeros((), device=xs_ND.device)
        if use_aux:
            # The residual variance about the mean of the WHOLE batch, in float64 (two passes,
            # as the single-process formula).
            residual = (xs_ND - recon).detach()
            r64 = residual.double()
            mean_D = dist.all_reduce_sum(r64.sum(dim=0)) / n_global
            spread = torch.stack([(r64 - mean_D).pow(2).sum(), r64.pow(2).sum()])
            denom, sq = (dist.all_reduce_sum(spread) / n_global).unbind()
            if denom > AUXK_MIN_RELATIVE_SPREAD * sq and fwd is not None:
                assert fwd.aux_recon_ND is not None
                aux_sum = (fwd.aux_recon_ND - residual).pow(2).sum()
                aux_term = aux_sum / denom.float()
        objective = (sse + auxk_coef * aux_term) * (dist.world_size() / n_global)
        return objective, sse.detach(), aux_term.detach(), fwd


def _global_spread(xs_ND: Tensor, n_global: int) -> float:
    """``mean_i ||x_i - mean||^2`` over the rows of all ranks (two passes, float64)."""
    x64 = xs_ND.double()
    mean_D = dist.all_reduce_sum(x64.sum(dim=0)) / n_global
    return float(dist.all_reduce_sum((x64 - mean_D).pow(2).sum()) / n_global)


def _data_parallel_step(
    ddp: nn.Module,
    model: BiasFreeTopKSAE,
    optimizer: torch.optim.Optimizer,
    xs_ND: Tensor,
    n_global: int,
    *,
    k: int,
    dead_n: Tensor | None,
    k_aux: int,
    auxk_coef: float,
    grad_clip_norm: float | None,
    bf16: bool,
) -> tuple[TrainForward | None, float, float, float, float]:
    """``training_step`` for one rank's rows under DDP; returns ``(forward, loss, grad norm,
    mse, auxk)`` with the loss, mse and auxk of the whole global batch (equal on every rank)."""
    objective, sse, aux_term, fwd = ddp(xs_ND, n_global, k, dead_n, k_aux, auxk_coef, bf16)
    sums = dist.all_reduce_sum(torch.stack([sse.double(), aux_term.double()])) / n_global
    mse, auxk = float(sums[0]), float(sums[1])
    loss_value = mse + auxk_coef * auxk
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss_value):
        return fwd, loss_value, math.nan, mse, auxk
    objective.backward()  # DDP averages the gradients over the ranks here
    return fwd, loss_value, _update(model, optimizer, grad_clip_norm), mse, auxk


def estimate_input_stats(
    source: BatchSource, max_rows: int, keep_rows: int = 0
) -> tuple[dict[str, float], Tensor | None]:
    """Global scale ``sqrt(mean ||x||^2)`` and the mean/spread ratio from the first rows.

    Reads epoch 0 from its start (up to ``max(max_rows, keep_rows)`` rows, in float64) and also
    returns the first ``keep_rows`` rows when asked (for data-point initialisation).
    """
    source.set_epoch(0)
    want = max(max_rows, keep_rows)
    sum_sq = 0.0
    sum_x = torch.zeros(source.d_in, dtype=torch.float64)
    count = 0
    kept: list[Tensor] = []
    for batch in source:
        batch = batch[: want - count]
        b64 = batch.to(torch.float64)
        sum_sq += float(b64.pow(2).sum())
        sum_x += b64.sum(dim=0)
        count += batch.shape[0]
        if keep_rows:
            kept.append(batch.float())
        if count >= want:
            break
    source.set_epoch(0)
    if count == 0:
        raise ValueError("the data source yielded no rows")
    mean = sum_x / count
    mean_sq_norm = sum_sq / count
    spread = math.sqrt(max(mean_sq_norm - float(mean.pow(2).sum()), 0.0))
    mean_norm = float(mean.norm())
    stats = {
        "input_scale": math.sqrt(mean_sq_norm),
        "mean_norm": mean_norm,
        "spread": spread,
        "mean_spread_ratio": mean_norm / spread if spread > 0 else math.inf,
        "rows": float(count),
    }
    return stats, (torch.cat(kept) if keep_rows else None)


def data_point_atoms(
    points_MD: Tensor, n_latents: int, blend: float, gen: torch.Generator
) -> Tensor:
    """Atoms ``normalise(blend * x_hat_i + (1 - blend) * g_hat_i)`` from random rows ``x_i``."""
    m = points_MD.shape[0]
    if m >= n_latents:
        pick = torch.randperm(m, generator=gen)[:n_latents]
    else:
        pick = torch.randint(0, m, (n_latents,), generator=gen)
    pts = points_MD[pick].float()
    pts = pts / pts.norm(dim=1, keepdim=True).clamp_min(1e-12)
    noise = torch.randn(n_latents, points_MD.shape[1], generator=gen)
    noise = noise / noise.norm(dim=1, keepdim=True)
    atoms = blend * pts + (1.0 - blend) * noise
    return atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _resolve_device(cfg: TrainConfig) -> torch.device:
    return dist.resolve_device(cfg.device)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _validate_source(cfg: TrainConfig, source: BatchSource) -> None:
    for attr in ("d_in", "num_rows", "set_epoch", "state_dict", "load_state_dict", "__iter__"):
        if not hasattr(source, attr):
            raise TypeError(
                f"source lacks {attr!r}: pass a topk_sae.TensorSource or another BatchSource"
            )
    if cfg.d_in is not None and cfg.d_in != source.d_in:
        raise ValueError(f"config d_in={cfg.d_in} does not match the source's d_in={source.d_in}")
    if source.num_rows <= 0 or len(source) <= 0:
        raise ValueError("the data source is empty")


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Config fields that must match to resume (bookkeeping fields may change)."""
    ignore = {"progress", "log_every", "checkpoint_every", "keep_checkpoints", "device"}
    return {k: v for k, v in cfg_dict.items() if k not in ignore}


def train(
    config: TrainConfig,
    source: BatchSource,
    *,
    out_dir: str | Path,
    resume: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    data_parallel: bool | None = None,
) -> TrainResult:
    """Train a bias-free TopK SAE on ``source``; checkpoints and the final model go to ``out_dir``.

    With ``resume=True`` an existing checkpoint in ``out_dir`` is continued (it must have been
    written with the same config and data); the result is bit-identical on CPU to an
    uninterrupted run when ``config.deterministic`` is set. ``resume=False`` deletes existing
    checkpoints first. ``callback(step, metrics)`` runs after every step (and its checkpoint).
    Raises ``TrainingDivergedError`` on a NaN/Inf loss or gradient, keeping the last good
    checkpoint.

    Under a process group of several ranks (``torchrun``; see the module docstring) call it on
    every rank with the same config, source and ``out_dir`` (a directory every rank can read;
    rank 0 writes it): each rank trains on its part of every batch and the result equals the
    single-process run up to float32 reduction order. ``config.device="cuda"`` then means
    ``cuda:LOCAL_RANK``. ``data_parallel=False`` trains in this process alone even inside a
    process group (one run per rank, e.g. a sweep split by grid point); ``None``: data-parallel
    whenever a process group of several ranks is active.
    """
    cfg = config
    _validate_source(cfg, source)
    device = _resolve_device(cfg)
    distributed = dist.is_distributed() if data_parallel is None else bool(data_parallel)
    if distributed and not dist.is_distributed():
        raise ValueError("data_parallel=True needs an initialised process group of > 1 ranks")
    is_main = dist.rank() == 0 or not distributed
    sync = dist.barrier if distributed else (lambda: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)
    if not resume and is_main:
        ckpts.clear()
    sync()
    d_in = source.d_in
    steps_per_epoch = len(source)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    sched = Schedule(cfg, steps_per_epoch, total_steps, d_in)
    dead_after = cfg.dead_after_tokens or max(1, source.num_rows // 2)

    with _deterministic(cfg.deterministic, device):
        gen = torch.Generator().manual_seed(cfg.seed)
        model = BiasFreeTopKSAE(d_in, cfg.n_latents, cfg.k, generator=gen)
        ckpt = ckpts.load_latest() if resume else None
        if ckpt is not None:
            saved_cfg = ckpt.state["config"]
            if _comparable(saved_cfg) != _comparable(cfg.to_dict()):
                diff = sorted(
                    k
                    for k in _comparable(cfg.to_dict())
                    if _comparable(saved_cfg).get(k) != cfg.to_dict()[k]
                )
                raise ValueError(
                    f"{ckpt.path} was written with a different config (fields {diff}); use "
                    "another out_dir or resume=False to start over"
                )
            load_state_strict(model, ckpt.model, str(ckpt.path))
            input_stats = ckpt.state["input_stats"]
        else:
            input_stats, points = estimate_input_stats(
                source,
                cfg.scale_estimation_rows,
                keep_rows=max(cfg.n_latents, cfg.scale_estimation_rows)
                if cfg.init == "data"
                else 0,
            )
            if cfg.input_scale is not None:
                input_stats["input_scale"] = float(cfg.input_scale)
            if not (math.isfinite(input_stats["input_scale"]) and input_stats["input_scale"] > 0):
                raise ValueError(
                    f"cannot scale the inputs: estimated scale {input_stats['input_scale']} "
                    "(all-zero or non-finite features? check the data for NaN/Inf)"
                )
            if is_main and input_stats["mean_spread_ratio"] > cfg.uncentered_warn_ratio:
                warnings.warn(
                    f"features are strongly uncentred: ||mean|| / spread = "
                    f"{input_stats['mean_spread_ratio']:.2f} > {cfg.uncentered_warn_ratio}. A "
                    "bias-free SAE cannot learn this offset; expect dead latents unless you use "
                    "init='data', k-annealing and AuxK (see the topk-sae README).",
                    stacklevel=2,
                )
            with torch.no_grad():
                model.input_scale.fill_(input_stats["input_scale"])
                if cfg.init == "data":
                    assert points is not None
                    atoms = data_point_atoms(points, cfg.n_latents, cfg.data_init_blend, gen)
                    model.W_dec.copy_(atoms)
                    model.W_enc.copy_(atoms)
            del points
        model.to(device)
        ddp: nn.Module | None = None
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(
                _RankLoss(model), device_ids=[device.index] if device.type == "cuda" else None
            )
        opt = make_optimizer(model, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
        tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.int64, device=device)
        epoch_fires = torch.zeros(cfg.n_latents, dtype=torch.int64, device=device)
        history: list[dict[str, Any]] = []
        epoch_stats: list[dict[str, Any]] = []
        step, epoch, epoch_rows, epoch_l0_sum = 0, 0, 0, 0.0
        if ckpt is not None:
            opt.load_state_dict(ckpt.optimizer)
            tokens_since_fired.copy_(ckpt.trainer["tokens_since_fired"])
            epoch_fires.copy_(ckpt.trainer["epoch_fires"])
            st = ckpt.state
            step, epoch = int(st["step"]), int(st["epoch"])
            epoch_rows, epoch_l0_sum = int(st["epoch_rows"]), float(st["epoch_l0_sum"])
            history, epoch_stats = st["history"], st["epoch_stats"]
            source.load_state_dict(st["source"])
        else:
            source.set_epoch(0)

        def save_checkpoint() -> Path:
            return ckpts.save(
                step,
                dict(model.state_dict()),
                opt.state_dict(),
                {"tokens_since_fired": tokens_since_fired, "epoch_fires": epoch_fires},
                {
                    "epoch": epoch,
                    "epoch_rows": epoch_rows,
                    "epoch_l0_sum": epoch_l0_sum,
                    "source": source.state_dict(),
                    "history": history,
                    "epoch_stats": epoch_stats,
                    "input_stats": input_stats,
                    "config": cfg.to_dict(),
                    "total_steps": total_steps,
                },
            )

        def close_epoch() -> None:
            nonlocal epoch_rows, epoch_l0_sum
            if epoch_rows == 0:
                return
            freq = epoch_fires.double() / epoch_rows
            epoch_stats.append(
                {
                    "epoch": epoch,
                    "rows": epoch_rows,
                    "dead_fraction": float((epoch_fires == 0).double().mean()),
                    "always_active_fraction": float(
                        (freq > cfg.always_active_threshold).double().mean()
                    ),
                    "mean_l0": epoch_l0_sum / epoch_rows,
                }
            )
            epoch_fires.zero_()
            epoch_rows, epoch_l0_sum = 0, 0.0

        sync()  # every rank has read the checkpoint before rank 0 may write the next
        bar = tqdm(
            total=total_steps,
            initial=step,
            disable=not (cfg.progress and is_main),
            desc="topk-sae",
            unit="step",
        )
        try:
            while step < total_steps:
                exhausted = True
                for batch in source:
                    n_global = int(batch.shape[0])
                    if distributed:  # this rank's contiguous part of the global batch
                        batch = batch[dist.rank_slice(n_global)]
                    xs = batch.to(device=device, dtype=torch.float32, non_blocking=True)
                    xs = xs / model.input_scale
                    k_now = sched.k_at(step)
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * sched.lr_factor(step)
                    dead_n = tokens_since_fired >= dead_after
                    step_args: dict[str, Any] = {
                        "k": k_now,
                        "dead_n": dead_n,
                        "k_aux": cfg.k_aux,
                        "auxk_coef": cfg.auxk_coef,
                        "grad_clip_norm": cfg.grad_clip_norm,
                        "bf16": cfg.autocast_bf16,
                    }
                    if ddp is None:
                        parts, loss_value, grad_norm = training_step(model, opt, xs, **step_args)
                        fwd: TrainForward | None = parts.forward
                        mse_value, auxk_value = (
                            float(parts.mse.detach()),
                            float(parts.auxk.detach()),
                        )
                    else:
                        fwd, loss_value, grad_norm, mse_value, auxk_value = _data_parallel_step(
                            ddp, model, opt, xs, n_global, **step_args
                        )
                    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                        raise TrainingDivergedError(
                            f"non-finite {what} ({loss_value=}, {grad_norm=}) at step {step} "
                            f"(epoch {epoch}); the update was not applied. Last good "
                            f"checkpoint: {ckpts.latest_path()}. Check the inputs for NaN/Inf "
                            "or lower the learning rate."
                        )

                    # Firing statistics (a latent fires when its selected value is > 0), summed
                    # over the ranks: the dead set AuxK uses is that of the whole batch.
                    if fwd is not None:
                        fired_idx = fwd.indices_NK[fwd.values_NK > 0]
                        counts = torch.bincount(fired_idx, minlength=cfg.n_latents)
                    else:
                        counts = torch.zeros_like(epoch_fires)
                    if distributed:
                        counts = dist.all_reduce_sum(counts)
                    num_dead = int(dead_n.sum()) if cfg.auxk_coef > 0 else 0
                    tokens_since_fired += n_global
                    tokens_since_fired[counts > 0] = 0
                    epoch_fires += counts
                    epoch_rows += n_global
                    l0 = float(counts.sum()) / n_global
                    epoch_l0_sum += l0 * n_global
                    step += 1
                    bar.update(1)
                    metrics = {
                        "step": step,
                        "epoch": epoch,
                        "lr": opt.param_groups[0]["lr"],
                        "k": k_now,
                        "loss": loss_value,
                        "mse": mse_value,
                        "auxk": auxk_value,
                        "l0": l0,
                        "num_dead": num_dead,
                        "dead_fraction": num_dead / cfg.n_latents,
                    }
                    if step % cfg.log_every == 0 or step == total_steps:
                        with torch.no_grad():
                            if ddp is None:
                                var = float((xs - xs.mean(dim=0)).pow(2).sum(dim=1).mean())
                            else:
                                var = _global_spread(xs, n_global)
                            metrics["fvu_batch"] = mse_value / var if var > 0 else math.nan
                        history.append(metrics)
                        bar.set_postfix(loss=f"{loss_value:.4g}", dead=num_dead)
                    if is_main and (step % cfg.checkpoint_every == 0 or step == total_steps):
                        save_checkpoint()
                    if callback is not None:
                        callback(step, metrics)
                    if step >= total_steps:
                        exhausted = False
                        break
                if exhausted:
                    close_epoch()
                    epoch += 1
                    source.set_epoch(epoch)
            close_epoch()  # a fractional last epoch
        finally:
            bar.close()
            if ddp is not None:
                # DDP holds gloo work objects in reference cycles; a process group torn down
                # (or an interpreter finalised) while they live can abort the process.
                del ddp
                gc.collect()

    model.eval()
    model_dir = out / "model"
    if is_main:
        model.save_pretrained(
            model_dir,
            metadata={
                "train_config": cfg.to_dict(),
                "input_stats": input_stats,
                "steps": total_steps,
                "final_epoch_stats": epoch_stats[-1] if epoch_stats else None,
            },
        )
        atomic_write_text(
            out / "history.json",
            json.dumps(
                {"history": history, "epoch_stats": epoch_stats, "input_stats": input_stats}
            ),
        )
    sync()  # the model directory is complete before any rank reads it
    return TrainResult(model, history, epoch_stats, input_stats, model_dir)
