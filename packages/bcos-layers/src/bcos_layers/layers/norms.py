"""Bias-free normalization layers of the released B-cos-v2 models.

* :class:`BatchNormUncentered2d` (CNNs): divides by the running standard deviation, never
  subtracts a mean and has no bias, so the layer is linear in its input (``x ↦ γ x / σ``).
* :class:`DetachableLayerNorm` and :class:`DetachableGroupNorm2d` (ViT): centered, bias-free;
  in explanation mode only the variance is detached, so the centering stays a linear map.

State-dict keys match the official library: BN keeps ``running_mean`` (never used) and
``num_batches_tracked`` so official checkpoints load with ``strict=True``; there is no ``bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcos_layers.layers.detachable import DetachableModule

__all__ = [
    "BatchNormUncentered2d",
    "DetachableGroupNorm2d",
    "DetachableLayerNorm",
    "LayerNorm2d",
]


class BatchNormUncentered2d(nn.BatchNorm2d, DetachableModule):
    """Uncentered, bias-free BatchNorm: ``out = γ · x / sqrt(var + eps)`` per channel.

    Training mode normalizes by the biased batch variance over ``(N, H, W)`` (computed from the
    detached input in explanation mode) and tracks it in ``running_var``; eval mode uses
    ``running_var``. ``running_mean`` is registered for checkpoint compatibility only.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        DetachableModule.__init__(self)
        nn.BatchNorm2d.__init__(
            self, num_features, eps, momentum, True, True, device=device, dtype=dtype
        )
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            factor = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked)
            stats_in = x.detach() if self.explaining else x
            var = stats_in.var(dim=(0, 2, 3), unbiased=False)
            if self.track_running_stats:
                with torch.no_grad():
                    self.running_var.copy_((1 - factor) * self.running_var + factor * var.detach())
        else:
            var = self.running_var
        out = x / (var + self.eps).sqrt()[None, :, None, None]
        if not torch.is_grad_enabled():  # inference: scale in place (same bits)
            return out.mul_(self.weight[None, :, None, None])
        return self.weight[None, :, None, None] * out

    def _get_name(self) -> str:
        return "BatchNormUncentered2dNoBias"


class DetachableLayerNorm(nn.LayerNorm, DetachableModule):
    """Centered LayerNorm over the last dims, without bias; explanation mode detaches the variance."""

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        DetachableModule.__init__(self)
        nn.LayerNorm.__init__(self, normalized_shape, eps, True, device=device, dtype=dtype)
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.explaining:
            return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)
        dims = tuple(range(-len(self.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        out = (x - mean) / (var.detach() + self.eps).sqrt_()
        return self.weight * out

    def _get_name(self) -> str:
        return "DetachableLayerNormNoBias"


class DetachableGroupNorm2d(nn.GroupNorm, DetachableModule):
    """Centered GroupNorm for ``[N, C, H, W]`` without bias; explanation mode detaches the variance."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        DetachableModule.__init__(self)
        nn.GroupNorm.__init__(self, num_groups, num_channels, eps, True, device=device, dtype=dtype)
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.explaining:
            return F.group_norm(x, self.num_groups, self.weight, None, self.eps)
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.num_groups, c // self.num_groups, *x.shape[2:])
        var, mean = torch.var_mean(
            grouped, dim=tuple(range(2, grouped.dim())), unbiased=False, keepdim=True
        )
        out = ((grouped - mean) / (var.detach() + self.eps).sqrt()).reshape(x.shape)
        return self.weight[None, :, None, None] * out

    def _get_name(self) -> str:
        return f"{type(self).__name__}NoBias"


class LayerNorm2d(DetachableGroupNorm2d):
    """LayerNorm over ``(C, H, W)`` of an image tensor: ``GroupNorm(1, C)`` without bias."""

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, num_channels, eps, device=device, dtype=dtype)
