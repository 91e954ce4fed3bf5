"""Concept-code layouts, shape checks, concept-wise masking and spatial reduction.

A concept code holds one coefficient per concept and (optionally) per position:

* ``BKHW``: convolutional codes, ``(batch, concepts, height, width)``;
* ``BTK``: token codes (ViTs), ``(batch, tokens, concepts)``;
* ``BK``: one vector per image, ``(batch, concepts)``.

Every perturbation in this package is concept-wise: one factor per concept, the same at every
position (as CRAFT's multiplicative masks), so a mask is always ``(M, K)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from concept_deletion.choices import ChoiceEnum

__all__ = ["Layout", "Reduction", "apply_masks", "check_codes", "num_concepts", "reduce_positions"]


class Layout(ChoiceEnum, kind="layout"):
    """Where the concept axis sits in a code tensor."""

    BKHW = "BKHW"
    BTK = "BTK"
    BK = "BK"

    @property
    def ndim(self) -> int:
        return len(self.value)

    @property
    def concept_dim(self) -> int:
        """Index of the concept axis (K) in a batched code tensor."""
        return self.value.index("K")


class Reduction(ChoiceEnum, kind="reduction"):
    """How a per-position importance map is reduced to one value per concept.

    ``sum``/``mean`` keep the sign (for additive measures such as Gradient x Input, the signed
    sum over positions is the concept's contribution); the ``*_abs`` variants reduce ``|.|``.
    """

    SUM = "sum"
    MEAN = "mean"
    SUM_ABS = "sum_abs"
    MEAN_ABS = "mean_abs"
    MAX_ABS = "max_abs"


def check_codes(codes: Tensor, layout: Layout | str, name: str = "codes") -> Layout:
    """Validate a batched code tensor against ``layout``; return the parsed layout."""
    layout = Layout.parse(layout)
    if not isinstance(codes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.ndim != layout.ndim:
        raise ValueError(
            f"{name} has shape {tuple(codes.shape)} ({codes.ndim} dims) but layout "
            f"{layout.value!r} needs {layout.ndim} dims {tuple(layout.value)}; pass the right "
            "layout or add the batch dimension (codes[None])"
        )
    if not codes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {codes.dtype}")
    if codes.shape[layout.concept_dim] == 0 or codes.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch or concept axis: {tuple(codes.shape)}")
    finite = torch.isfinite(codes)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[0].tolist()
        raise ValueError(
            f"{name} hold {int((~finite).sum())} NaN/Inf entries (first at index {tuple(bad)}); "
            "every measure and curve would silently be NaN: fix or drop those images"
        )
    return layout


def num_concepts(codes: Tensor, layout: Layout | str) -> int:
    """Number of concepts K of a batched code tensor."""
    layout = check_codes(codes, layout)
    return codes.shape[layout.concept_dim]


def _mask_view(masks_MK: Tensor, layout: Layout) -> Tensor:
    """Reshape ``(M, K)`` masks to broadcast against ``(M, *code)`` in ``layout``."""
    if layout is Layout.BKHW:
        return masks_MK[:, :, None, None]
    if layout is Layout.BTK:
        return masks_MK[:, None, :]
    return masks_MK


def apply_masks(codes: Tensor, masks_MK: Tensor, layout: Layout | str) -> Tensor:
    """Multiply codes by concept-wise masks: ``codes[m] * masks[m, k]`` at every position.

    ``codes`` is ``(M, ...)`` (one code per mask) or ``(1, ...)`` (one code for all masks).
    """
    layout = Layout.parse(layout)
    k = codes.shape[layout.concept_dim]
    if masks_MK.ndim != 2 or masks_MK.shape[1] != k:
        raise ValueError(f"masks must be (M, K={k}), got {tuple(masks_MK.shape)}")
    return codes * _mask_view(masks_MK.to(codes.dtype), layout)


def reduce_positions(values: Tensor, layout: Layout | str, reduction: Reduction | str) -> Tensor:
    """Reduce a per-position map with the layout of the codes to ``(B, K)``."""
    layout = check_codes(values, layout, name="importance map")
    reduction = Reduction.parse(reduction)
    if layout is Layout.BK:
        return values.abs() if reduction.value.endswith("_abs") else values
    dims = (2, 3) if layout is Layout.BKHW else (1,)
    if reduction is Reduction.SUM:
        return values.sum(dims)
    if reduction is Reduction.MEAN:
        return values.mean(dims)
    if reduction is Reduction.SUM_ABS:
        return values.abs().sum(dims)
    if reduction is Reduction.MEAN_ABS:
        return values.abs().mean(dims)
    return values.abs().amax(dims)
