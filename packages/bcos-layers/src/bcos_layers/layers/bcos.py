"""B-cos convolution and linear layers (dynamic-linear transforms, B-cos paper Eq. 3).

``out = |cos(x, ŵ)|^(B-1) · (ŵᵀx)`` with unit-norm weights ``ŵ``. The op order follows the
official ``bcos`` 0.1.3 library exactly, so official checkpoints give bitwise-identical outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import linalg as LA

from bcos_layers.layers.detachable import DetachableModule

__all__ = ["BcosConv2d", "BcosLinear", "NormedConv2d", "NormedLinear"]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class NormedConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` whose filters are re-normalized to unit L2 norm on every call."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / LA.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, None)


class NormedLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose rows are re-normalized to unit L2 norm on every call."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight / LA.vector_norm(self.weight, dim=1, keepdim=True)
        return F.linear(x, w, None)


def _dynamic_scale(lin: Tensor, norm: Tensor, b: float, detach: bool) -> Tensor:
    """``|cos|^(B-1)`` from the linear output and the input norm (detached in explanation mode)."""
    if detach:  # no autograd below: compute in place (same values)
        if b == 2:
            return lin.detach().abs().div_(norm.detach())
        return (lin.detach() / norm.detach()).abs_().add_(1e-6).pow_(b - 1)
    if b == 2:
        return lin.abs() / norm
    return ((lin / norm).abs() + 1e-6).pow(b - 1)


def _inplace_scaled(lin: Tensor, norm: Tensor, b: float) -> Tensor:
    """``_dynamic_scale(lin, norm, b) * lin`` without autograd, reusing one buffer (same bits)."""
    if b == 2:
        return lin.abs().div_(norm).mul_(lin)
    return (lin / norm).abs_().add_(1e-6).pow_(b - 1).mul_(lin)


class BcosConv2d(DetachableModule):
    """B-cos 2D convolution: unit-norm filters, output scaled by ``|cos|^(B-1)``, optional MaxOut.

    The only parameter is ``linear.weight`` ``[out_channels * max_out, in_channels / groups,
    kh, kw]`` (official key layout). There is no bias: B-cos networks are bias-free so that their
    outputs are exact sums of input contributions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        b: float = 2,
        max_out: int = 1,
        bias: bool = False,
    ) -> None:
        if bias:
            raise ValueError(
                "BcosConv2d has no bias (B-cos networks are bias-free); use bias=False"
            )
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                f"divisible by groups ({groups})"
            )
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.b = b
        self.max_out = max_out
        self.patch_size = self.kernel_size[0] * self.kernel_size[1]
        self.linear = NormedConv2d(
            in_channels,
            out_channels * max_out,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        # A 1x1/s1 unpadded window needs no pooling: the patch norm is the pixel norm.
        self._pointwise = (
            self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride == (1, 1)
        )

    def patch_norms(self, x: Tensor) -> Tensor:
        """L2 norm of every input patch the filters see, ``sqrt(Σ x² + 1e-6)``: ``[N, 1|O, H', W']``."""
        if self.dilation != (1, 1):  # windowed sums of squares per group via a ones kernel
            ones = x.new_ones(self.groups, self.in_channels // self.groups, *self.kernel_size)
            sq = F.conv2d(x * x, ones, None, self.stride, self.padding, self.dilation, self.groups)
            norms = sq.add_(1e-6).sqrt_()
            if self.groups > 1:
                norms = norms.repeat_interleave(self.out_channels // self.groups, dim=1)
            return norms
        if self._pointwise and self.groups == 1:
            # avg_pool2d with a 1x1/s1 window is an exact copy: skip it (same bits, less work).
            # (Strided 1x1: squaring only the sampled pixels would change the reduction's
            # summation order and hence the last bits, so that case takes the general path.)
            return (x**2).sum(1, keepdim=True).add_(1e-6).sqrt_()
        sq = x**2
        if self.groups == 1:
            sq = sq.sum(1, keepdim=True)
        else:
            sq = sq.unflatten(1, (self.groups, self.in_channels // self.groups)).sum(2)
        # in place after the pooling: same values, fewer temporaries (no backward needs them)
        norms = (
            F.avg_pool2d(sq, self.kernel_size, stride=self.stride, padding=self.padding)
            .mul_(self.patch_size)
            .add_(1e-6)
            .sqrt_()
        )
        if self.groups > 1:
            norms = norms.repeat_interleave(self.out_channels // self.groups, dim=1)
        return norms

    def forward(self, x: Tensor) -> Tensor:
        lin = self.linear(x)
        if self.max_out > 1:
            lin = lin.unflatten(1, (self.out_channels, self.max_out)).max(dim=2).values
        if self.b == 1:
            return lin
        if not torch.is_grad_enabled():  # inference: the same ops, computed in place
            return _inplace_scaled(lin, self.patch_norms(x), self.b)
        if self.explaining:  # the norm is detached anyway: no autograd graph for it
            with torch.no_grad():
                norm = self.patch_norms(x)
            return _dynamic_scale(lin, norm, self.b, True) * lin
        return _dynamic_scale(lin, self.patch_norms(x), self.b, False) * lin

    def extra_repr(self) -> str:
        return f"B={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class BcosLinear(DetachableModule):
    """B-cos linear layer: unit-norm rows, output scaled by ``|cos|^(B-1)``, optional MaxOut.

    Only parameter: ``linear.weight`` ``[out_features * max_out, in_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        b: float = 2,
        max_out: int = 1,
    ) -> None:
        if bias:
            raise ValueError(
                "BcosLinear has no bias (B-cos networks are bias-free); use bias=False"
            )
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.b = b
        self.max_out = max_out
        self.linear = NormedLinear(
            in_features, out_features * max_out, bias=False, device=device, dtype=dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        lin = self.linear(x)
        if self.max_out > 1:
            lin = lin.unflatten(-1, (self.out_features, self.max_out)).max(dim=-1).values
        if self.b == 1:
            return lin
        norm = LA.vector_norm(x, dim=-1, keepdim=True) + 1e-12
        if not torch.is_grad_enabled():
            return _inplace_scaled(lin, norm, self.b)
        return _dynamic_scale(lin, norm, self.b, self.explaining) * lin

    def extra_repr(self) -> str:
        return f"B={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")
