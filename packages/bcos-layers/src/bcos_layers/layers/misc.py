"""Small parameter-free B-cos building blocks: input encoding, logit layer, positional embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AddInverse", "LogitLayer", "PosEmbSinCos2d"]


class AddInverse(nn.Module):
    """Encode an image in ``[0, 1]`` as ``[x, 1 - x]`` along the channel dim (RGB → 6 channels).

    B-cos models need it because the cosine of a dynamic-linear unit cannot tell a dark pixel
    from a missing one; with the inverse channels every colour has the same input norm.
    """

    def __init__(self, dim: int = -3) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, 1 - x], dim=self.dim)


class LogitLayer(nn.Module):
    """``x / temperature + logit_bias`` (each optional): the only bias of a B-cos classifier.

    The released models use ``logit_bias = -log(num_classes - 1)`` (so a zero pre-bias output
    has sigmoid probability ``1 / num_classes``) and no temperature.
    """

    def __init__(
        self, logit_temperature: float | None = None, logit_bias: float | None = None
    ) -> None:
        super().__init__()
        self.logit_temperature = logit_temperature
        self.logit_bias = logit_bias

    def forward(self, x: Tensor) -> Tensor:
        if self.logit_temperature is not None:
            x = x / self.logit_temperature
        if self.logit_bias is not None:
            x = x + self.logit_bias
        return x

    def extra_repr(self) -> str:
        return f"logit_temperature={self.logit_temperature}, logit_bias={self.logit_bias}"


class PosEmbSinCos2d(nn.Module):
    """Fixed 2D sine-cosine positional embedding for a ``[B, H, W, D]`` token grid → ``[H*W, D]``.

    ``pe = [sin(x ω), cos(x ω), sin(y ω), cos(y ω)]`` with ``ω_k = T^(-k / (D/4 - 1))``, tokens
    row-major, ``x`` the column index. It is added to the tokens, i.e. it is a bias of the ViT;
    :func:`bcos_layers.explain` reports its contribution separately.
    """

    def __init__(self, temperature: float = 10_000) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, patches: Tensor) -> Tensor:
        h, w, dim = patches.shape[-3:]
        if dim % 4:
            raise ValueError(f"sin-cos embedding needs a feature dim divisible by 4, got {dim}")
        device = patches.device
        y, x = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        omega = torch.arange(dim // 4, device=device) / (dim // 4 - 1)
        omega = 1.0 / (self.temperature**omega)
        y = y.flatten()[:, None] * omega[None, :]
        x = x.flatten()[:, None] * omega[None, :]
        return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).type(patches.dtype)
