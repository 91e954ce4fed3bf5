"""What every model of the zoo shares: input validation and the explanation helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bcos_layers.explanation_mode import explanation_mode

if TYPE_CHECKING:
    from bcos_layers.explain import Explanation

__all__ = ["BcosModelMixin", "check_image_batch"]


def check_image_batch(
    x: object,
    *,
    in_chans: int,
    dtype: torch.dtype,
    multiple_of: int = 1,
    model: str = "model",
) -> None:
    """Raise a clear error unless ``x`` is a finite ``[N, in_chans, H, W]`` batch of ``dtype``.

    One elementwise pass over ``x`` (NaN/Inf check) and a few shape comparisons: cheap next to a
    forward. The check is per element, never on a sum: a float16 sum overflows at 65,504 (a
    224x224 image of ones already does), a float32 sum at ~3.4e38, and either would refuse a
    finite input.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{model} expects a torch.Tensor [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add a batch dim with x[None])" if x.dim() == 3 else ""
        raise ValueError(
            f"{model} expects a 4D batch [N, {in_chans}, H, W], got shape {tuple(x.shape)}{hint}"
        )
    c = x.shape[1]
    if c != in_chans:
        if in_chans == 2 * c:
            raise ValueError(
                f"{model} expects {in_chans} input channels but got {c}: B-cos models take "
                f"[x, 1 - x]; apply bcos_layers.AddInverse() (part of "
                f"bcos_layers.transforms.eval_transform) to the image batch first"
            )
        raise ValueError(
            f"{model} expects {in_chans} input channels, got {c} (shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{model} expects a floating-point image in [0, 1], got dtype {x.dtype}; "
            f"convert e.g. with x.float() / 255"
        )
    if x.dtype != dtype:
        raise TypeError(
            f"{model} has {dtype} weights but got a {x.dtype} input; cast the input with "
            f"x.to({dtype}) or the model with model.to({x.dtype})"
        )
    h, w = x.shape[-2:]
    if h == 0 or w == 0 or h % multiple_of or w % multiple_of:
        raise ValueError(
            f"{model} needs a non-empty spatial size divisible by {multiple_of} (its stem "
            f"downsamples by {multiple_of}), got {h}x{w}; resize/crop e.g. to 224x224"
        )
    with torch.no_grad():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{model} got an input containing NaN or Inf values")


class BcosModelMixin:
    """Explanation helpers for a B-cos model (inherit before ``nn.Module``).

    Attributes:
        validate_inputs: check shape/dtype/finiteness of every batch at the model entry
            (one cheap elementwise pass); set to ``False`` to skip.
    """

    in_chans: int
    validate_inputs: bool = True
    to_probabilities = staticmethod(torch.sigmoid)  # B-cos models are trained with BCE

    def explanation_mode(self, active: bool = True) -> explanation_mode:
        """``with model.explanation_mode(): ...`` -- see :class:`bcos_layers.explanation_mode`."""
        assert isinstance(self, nn.Module)
        return explanation_mode(self, active)

    def explain(
        self,
        x: Tensor,
        target: int | Tensor | None = None,
        **kwargs: object,
    ) -> Explanation:
        """Dynamic linear weights and contributions of a logit; see :func:`bcos_layers.explain`."""
        from bcos_layers.explain import explain

        assert isinstance(self, nn.Module)
        return explain(self, x, target, **kwargs)  # type: ignore[arg-type]

    def _check_input(self, x: Tensor, multiple_of: int = 1) -> None:
        if self.validate_inputs:
            param = next(self.parameters())  # type: ignore[attr-defined]
            check_image_batch(
                x,
                in_chans=self.in_chans,
                dtype=param.dtype,
                multiple_of=multiple_of,
                model=type(self).__name__,
            )
