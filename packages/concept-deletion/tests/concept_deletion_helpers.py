"""Small hand-built concept heads whose right answers are known (shared by the tests)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

SHAPES = {"BKHW": (5, 3, 2), "BTK": (4, 5), "BK": (5,)}


class LinearHead(nn.Module):
    """Bias-free linear head: ``logits[c] = sum(weight[c] * code)``; contributions are exact."""

    def __init__(self, code_shape: tuple[int, ...], n_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(
            torch.randn(n_classes, *code_shape, generator=gen, dtype=torch.float64)
        )

    def forward(self, codes: Tensor) -> Tensor:
        return codes.flatten(1) @ self.weight.flatten(1).T

    def contributions(self, codes: Tensor, targets: Tensor) -> Tensor:
        """Per-position contributions ``weight[target] * code`` (shape of the codes)."""
        return self.weight[targets] * codes


class SmoothHead(nn.Module):
    """A smooth non-linear head (tanh MLP on the flattened code)."""

    def __init__(self, code_shape: tuple[int, ...], n_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d = 1
        for s in code_shape:
            d *= s
        self.w1 = nn.Parameter(torch.randn(16, d, generator=gen, dtype=torch.float64) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(n_classes, 16, generator=gen, dtype=torch.float64))

    def forward(self, codes: Tensor) -> Tensor:
        return torch.tanh(codes.flatten(1) @ self.w1.T + 0.3) @ self.w2.T


def concept_sum(values: Tensor, layout: str) -> Tensor:
    """Sum a per-position map over positions -> (B, K)."""
    if layout == "BKHW":
        return values.sum((2, 3))
    if layout == "BTK":
        return values.sum(1)
    return values


def random_codes(layout: str, batch: int = 4, seed: int = 1, sparsity: float = 0.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.rand(batch, *SHAPES[layout], generator=gen, dtype=torch.float64)
    if sparsity:
        codes = codes * (torch.rand(codes.shape, generator=gen, dtype=torch.float64) > sparsity)
    return codes


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-10, rtol: float = 1e-7) -> None:
    """numpy's assert_allclose on tensors (torch.testing imports torch.distributed: slow)."""
    np.testing.assert_allclose(
        torch.as_tensor(actual).detach().cpu().double().numpy(),
        torch.as_tensor(expected).detach().cpu().double().numpy(),
        atol=atol,
        rtol=rtol,
    )
