"""Training support for B-cos classifiers: the B-cos BCE loss, AGC, a minimal epoch loop.

B-cos-v2 trains every ImageNet model with binary cross-entropy on sigmoid outputs
(``UniformOffLabelsBCEWithLogitsLoss``): the true class has target 1 and every other class
the *uniform* target ``1/C``. Together with the logit bias ``-log(C - 1)`` of the model's
logit layer (:func:`uniform_prior_logit_bias`), a model whose pre-bias outputs are 0 predicts
exactly ``1/C`` for every class, so off-label logits start at their target and receive no
gradient. Gradients are clipped with adaptive gradient clipping (AGC, Brock et al. 2021;
``use_agc=True`` in the B-cos-v2 configs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "EpochStats",
    "UniformOffLabelBCELoss",
    "adaptive_clip_grad_",
    "evaluate",
    "train_one_epoch",
    "uniform_prior_logit_bias",
]


def uniform_prior_logit_bias(num_classes: int) -> float:
    """``-log(C - 1)``: the logit bias for which a zero pre-bias output has sigmoid ``1/C``.

    ``sigmoid(-log(C-1)) = 1 / (1 + (C-1)) = 1/C``. The released B-cos-v2 models use it with
    ``C = 1000`` (``-6.906754778648554``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return -math.log(num_classes - 1)


class UniformOffLabelBCELoss(nn.Module):
    """BCE-with-logits with target 1 for the label and ``off_label`` (default ``1/C``) elsewhere.

    Targets are class indices ``[N]`` or dense ``[N, C]`` (e.g. from mixup; every entry is raised
    to at least ``off_label``, as in B-cos-v2). Matches ``bcos.modules.losses.
    UniformOffLabelsBCEWithLogitsLoss``, except that ``off_label=0.0`` here means plain one-hot
    BCE (the official class treats 0.0 like ``None``).

    Args:
        off_label: target of the non-label classes; ``None`` for ``1/C``.
        reduction: ``"mean"`` (over all N·C entries, as the official loss), ``"sum"`` or
            ``"none"``.
    """

    def __init__(self, off_label: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if off_label is not None and not 0.0 <= off_label < 1.0:
            raise ValueError(f"off_label must be in [0, 1) or None, got {off_label}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.off_label = off_label
        self.reduction = reduction

    def targets(self, logits_NC: Tensor, target: Tensor) -> Tensor:
        """Dense ``[N, C]`` targets for ``target`` (class indices or dense)."""
        if logits_NC.ndim != 2:
            raise ValueError(f"expected logits of shape [N, C], got {tuple(logits_NC.shape)}")
        n, c = logits_NC.shape
        off = 1.0 / c if self.off_label is None else self.off_label
        if target.shape == logits_NC.shape:
            dense = target.to(logits_NC.dtype)
        elif target.shape == (n,) and not target.is_floating_point():
            if n and (int(target.min()) < 0 or int(target.max()) >= c):
                raise ValueError(
                    f"class indices must be in [0, {c - 1}], got range "
                    f"[{int(target.min())}, {int(target.max())}]"
                )
            dense = F.one_hot(target.long(), c).to(logits_NC.dtype)
        else:
            raise ValueError(
                f"target must be class indices of shape [{n}] (integer) or dense targets of "
                f"shape {tuple(logits_NC.shape)}, got {tuple(target.shape)} ({target.dtype})"
            )
        return dense.clamp(min=off)

    def forward(self, logits_NC: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            logits_NC, self.targets(logits_NC, target), reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"off_label={self.off_label}, reduction={self.reduction!r}"


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Iterable[Tensor] | Tensor, clip_factor: float = 0.01, eps: float = 1e-3
) -> None:
    """Unit-wise adaptive gradient clipping, in place (Brock et al. 2021, NFNets).

    For each output unit (row of a weight; the whole tensor for vectors and scalars) the
    gradient norm is limited to ``clip_factor * max(||w||, eps)``:
    ``g <- g * clip_factor * max(||w||, eps) / ||g||`` where it is larger.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.ndim)) if p.squeeze().ndim > 1 else None
        w_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=dims is not None)
        g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=dims is not None)
        max_norm = w_norm.clamp(min=eps) * clip_factor
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-6), 1.0)
        p.grad.mul_(scale)


class EpochStats(NamedTuple):
    """Summary of one pass over a data loader."""

    loss: float
    """Sample-weighted mean of the per-batch losses."""
    accuracy: float
    """Top-1 accuracy in [0, 1] (dense targets count their argmax as the label)."""
    num_samples: int
    """Samples seen."""


Batch = tuple[Tensor, Tensor]


def _run_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    step: Callable[[Tensor, Tensor], Tensor],
    device: torch.device | str | None,
    progress: bool,
    desc: str,
    max_steps: int | None,
) -> EpochStats:
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for i, batch in enumerate(bar):
        if max_steps is not None and i >= max_steps:
            break
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("the loader must yield (inputs, targets) pairs")
        x, y = batch
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = step(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {loss.item()} at step {i}")
        n = x.shape[0]
        labels = y.argmax(1) if y.ndim == 2 else y
        total_loss += float(loss) * n
        correct += int((logits.detach().argmax(1) == labels).sum())
        seen += n
        bar.set_postfix(loss=total_loss / seen, acc=correct / seen)
    if seen == 0:
        raise ValueError(f"{desc}: the loader yielded no batches")
    return EpochStats(total_loss / seen, correct / seen, seen)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: nn.Module | None = None,
    device: torch.device | str | None = None,
    agc_clip_factor: float | None = 0.01,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> EpochStats:
    """One training epoch: forward, B-cos BCE loss, backward, AGC, optimizer (and scheduler) step.

    Args:
        model: a classifier returning logits ``[N, C]`` (with its logit bias).
        loader: yields ``(inputs, targets)``; targets are class indices or dense ``[N, C]``.
        optimizer: steps once per batch.
        loss_fn: default :class:`UniformOffLabelBCELoss` ``()``.
        device: move batches there (the model must already be on it).
        agc_clip_factor: adaptive gradient clipping factor (B-cos-v2 uses 0.01); None disables.
        scheduler: stepped after every optimizer step (per-step schedules).
        max_steps: stop after this many batches.
        progress: show a tqdm bar with running loss and accuracy.
    """
    loss_fn = UniformOffLabelBCELoss() if loss_fn is None else loss_fn
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()

    def step(logits: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if agc_clip_factor is not None:
            adaptive_clip_grad_(params, clip_factor=agc_clip_factor)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss.detach()

    return _run_epoch(model, loader, step, device, progress, "train", max_steps)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    loss_fn: nn.Module | None = None,
    device: torch.device | str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> EpochStats:
    """Loss and top-1 accuracy of ``model`` (in eval mode) over ``loader``."""
    loss_fn = UniformOffLabelBCELoss() if loss_fn is None else loss_fn
    model.eval()
    return _run_epoch(model, loader, loss_fn, device, progress, "eval", max_steps)
