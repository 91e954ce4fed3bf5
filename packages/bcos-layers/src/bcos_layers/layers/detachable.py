"""The explanation-mode switch shared by every dynamic-linear layer.

In explanation mode a B-cos network's dynamic factors (the ``|cos|`` scale, the input-patch norm,
the LayerNorm variance, attention queries/keys) are detached from the autograd graph, so the
network becomes an explicit linear map ``y = W(x) x`` whose input gradient is ``W(x)``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["DetachableModule"]


class DetachableModule(nn.Module):
    """Base class for modules with an explanation mode (detached dynamic weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.explaining: bool = False

    def set_explanation_mode(self, active: bool = True) -> None:
        """Turn explanation mode on (detach dynamic factors) or off."""
        self.explaining = bool(active)

    @property
    def is_in_explanation_mode(self) -> bool:
        """Whether the module currently detaches its dynamic factors."""
        return self.explaining
