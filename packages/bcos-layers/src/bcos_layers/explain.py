"""Exact explanations of B-cos models: dynamic linear weights ``W(x)`` and contributions.

In explanation mode a B-cos network computes ``y = W(x) x`` with every dynamic factor detached,
so ``∂y/∂x = W(x)`` and the contributions ``x ⊙ W(x)`` sum to ``y`` exactly -- up to the
network's constant terms: the logit bias and, for ViTs, the fixed positional embedding. Both are
made explicit here (as leaves of the autograd graph), so that per sample

    contributions.sum() + bias + pos_emb == value        (completeness, float32 round-off)

and ``completeness_error`` reports the gap. Works batched: in eval mode samples never interact.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bcos_layers.explanation_mode import explanation_mode
from bcos_layers.layers.misc import LogitLayer, PosEmbSinCos2d

__all__ = ["CapturedOutput", "Explanation", "capture_output", "explain"]


class Explanation(NamedTuple):
    """Result of :func:`explain` (``B`` = batch size; ``[C, H, W]`` = the explained tensor).

    Attributes:
        weights: dynamic linear weights ``W(x) = ∂value/∂x`` in explanation mode, ``[B, C, H, W]``.
        contributions: ``x ⊙ W(x)``, ``[B, C, H, W]``.
        contribution_map: contributions summed over channels, ``[B, H, W]`` (for ViT tokens
            ``[B, N, D]`` with ``wrt``: summed over features, ``[B, N]``).
        value: the explained scalar per sample (e.g. the logit, bias included), ``[B]``.
        bias: contribution of the logit-layer bias to ``value``, ``[B]`` (0 if none).
        pos_emb: contribution of the fixed positional embedding (ViT), ``[B]`` (0 if none).
        completeness_error: ``value - contributions.sum() - bias - pos_emb``, ``[B]``.
        target: explained class per sample, ``[B]`` int64 (``None`` for a custom ``fn``).
        output: the model output (logits) ``[B, K]``; ``None`` when ``layer`` stopped early.
    """

    weights: Tensor
    contributions: Tensor
    contribution_map: Tensor
    value: Tensor
    bias: Tensor
    pos_emb: Tensor
    completeness_error: Tensor
    target: Tensor | None
    output: Tensor | None


class CapturedOutput(NamedTuple):
    """A module output held by a forward hook so that nothing downstream can write into it.

    Made by :func:`capture_output`; see there for the recipe.

    Attributes:
        tensor: the module's output values with an autograd identity of their own: gradients
            w.r.t. it (``torch.autograd.grad(value, captured.tensor)``) count only the paths
            through ``passthrough``, and ``tensor * grad`` are contributions of this output.
        passthrough: a copy of ``tensor``; the hook returns it, so the rest of the forward pass
            (including in-place ops such as a residual block's ``out += shortcut``) uses it.
        version: ``tensor._version`` when captured (see :meth:`check_unmodified`).
    """

    tensor: Tensor
    passthrough: Tensor
    version: int

    def check_unmodified(self, name: str = "the captured module output") -> None:
        """Raise ``RuntimeError`` if ``tensor``'s storage was written since the capture.

        ``tensor`` shares storage with the module's original output; code that kept a
        reference to that output (e.g. a module returning its input unchanged, whose caller
        then updates that input in place) could still change it. Then ``tensor`` no longer
        holds the module output and an explanation in its terms would be wrong.
        """
        if self.tensor._version != self.version:
            raise RuntimeError(
                f"{name} was modified in place after the module returned it (tensor version "
                f"{self.version} -> {self.tensor._version}); it no longer holds the module "
                "output, so an explanation in its terms would be wrong. Capture the output of "
                "a module whose result is not updated in place afterwards."
            )


def capture_output(out: Tensor) -> CapturedOutput:
    """Capture a module output in a forward hook so that later in-place ops cannot change it.

    Residual blocks add the shortcut **in place** into the tensor their last norm returned
    (``out = self.bn3(...); out += shortcut``), and in eval mode ``StochasticDepth`` returns its
    input unchanged; a hook that just keeps ``out`` therefore ends up holding the *block*
    output, and gradients w.r.t. it are those of the sum. Use instead::

        def hook(module, inputs, out):
            cap = capture_output(out)
            store["f"] = cap  # explain / splice in terms of cap.tensor
            return cap.passthrough  # the rest of the forward runs on the copy

    and, after the forward, ``store["f"].check_unmodified()`` before using ``cap.tensor``.
    ``cap.tensor`` is a view of ``out`` (no copy) with its own autograd node, so
    ``∂value/∂cap.tensor`` is the derivative w.r.t. this module's output only -- never through
    other users of the same tensor (a module that returns its input unchanged passes on a
    tensor other layers may also read). It stays connected to the graph above the module, so
    gradients w.r.t. the model input still flow through it. Costs one copy of the output.
    """
    if not isinstance(out, Tensor):
        raise TypeError(f"module output is a {type(out).__name__}, expected a Tensor")
    tensor = out.view_as(out)
    if not tensor.requires_grad and torch.is_grad_enabled():
        tensor = out.detach().requires_grad_(True)  # e.g. a constant: still differentiable
    return CapturedOutput(tensor, tensor.clone(), tensor._version)


class _StopForward(Exception):
    """Raised by a hook once the explained activation exists: the rest is not needed."""


def _is_logit_layer(m: nn.Module) -> bool:
    """Ours, or one with the same interface (``bcos.modules.logitlayer.LogitLayer``, bcos 0.1.3)."""
    return isinstance(m, LogitLayer) or (
        type(m).__name__ == "LogitLayer"
        and hasattr(m, "logit_bias")
        and hasattr(m, "logit_temperature")
    )


def _is_pos_emb(m: nn.Module) -> bool:
    """Ours, or the official ViT's ``bcos.models.vit.PosEmbSinCos2d`` (same forward)."""
    return isinstance(m, PosEmbSinCos2d) or type(m).__name__ == "PosEmbSinCos2d"


def _find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=5)
        raise ValueError(f"no module named {name!r} in {type(model).__name__}; close: {close}")
    return modules[name]


def _targets(target: int | Tensor | None, out: Tensor) -> Tensor:
    b, k = out.shape
    if target is None:
        return out.argmax(1)
    t = torch.as_tensor(target, device=out.device)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must be an int or an integer tensor, got {t.dtype}")
    t = t.long().expand(b) if t.dim() == 0 else t.long()
    if t.shape != (b,):
        raise ValueError(f"target must be an int or have shape [{b}], got {tuple(t.shape)}")
    if bool(((t < 0) | (t >= k)).any()):
        raise ValueError(f"target indices must lie in [0, {k}), got {t.tolist()}")
    return t


def explain(
    model: nn.Module,
    x: Tensor,
    target: int | Tensor | None = None,
    *,
    layer: str | None = None,
    fn: Callable[[Tensor], Tensor] | None = None,
    wrt: str | None = None,
) -> Explanation:
    """Explain one scalar per sample of a B-cos ``model`` (in eval mode) on the batch ``x``.

    Args:
        model: a B-cos model (any module with explanation-mode layers). Models of the
            official ``bcos`` package work too: their ``LogitLayer`` and ``PosEmbSinCos2d``
            are recognised (by class name and interface), so ``bias`` and ``pos_emb`` are
            reported as for ours.
        x: the input batch, e.g. ``[B, 6, H, W]``; not modified.
        target: class to explain for every sample (int), per sample (``[B]``), or ``None`` for
            the predicted class. Only for logits (``layer is None`` and ``fn is None``).
        layer: name of a module (``model.named_modules()``) whose output is explained instead
            of the logits; the forward pass stops there.
        fn: maps the explained tensor (the logits, or ``layer``'s output) to one value per
            sample ``[B]``, e.g. ``lambda a: a[:, 7].sum((1, 2))`` (channel 7 of a CNN layer).
        wrt: explain in terms of this module's output instead of the input ``x`` (e.g.
            ``"layer3"``: ``weights`` = ``∂value/∂f``, ``contributions`` = ``f ⊙ weights``).
            ``f`` is exactly what the module returned, even where the model later updates
            that tensor in place (``layer3.5.bn3`` in a ResNet block, before ``out +=
            shortcut``; see :func:`capture_output`): then the shortcut's share is not part of
            the contributions and shows up in ``completeness_error``. A module output that is
            changed in place through another reference raises ``RuntimeError``.

    Returns:
        An :class:`Explanation` (all tensors detached).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor (a batch of B-cos model inputs)")
    if model.training:
        raise ValueError(
            "explain() needs model.eval(): in training mode batch statistics mix samples and "
            "the model is not a per-sample dynamic-linear map"
        )
    if layer is not None and target is not None:
        raise ValueError("target selects a logit; with layer=... pass fn to pick the value")
    if layer is not None and fn is None:
        raise ValueError("layer=... needs fn mapping that layer's output to one value per sample")
    if fn is not None and target is not None:
        raise ValueError("pass either target (a logit) or fn (a custom value), not both")

    x = x.detach().clone().requires_grad_(True)
    batch = x.shape[0]
    bias_leaves: list[Tensor] = []
    pe_leaves: list[Tensor] = []
    captured: dict[str, Tensor] = {}
    wrt_capture: list[CapturedOutput] = []
    handles = []

    def logit_hook(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        if mod.logit_bias is None:
            return None
        z = inputs[0]
        if mod.logit_temperature is not None:
            z = z / mod.logit_temperature
        leaf = torch.full_like(z, float(mod.logit_bias)).requires_grad_(True)
        replaced = z + leaf
        if not torch.equal(replaced.detach(), out.detach()):  # another layer with this name
            warnings.warn(
                f"{type(mod).__module__}.{type(mod).__name__} does not compute "
                "x / logit_temperature + logit_bias; its bias is not separated and counts "
                "towards completeness_error",
                UserWarning,
                stacklevel=2,
            )
            return None
        bias_leaves.append(leaf)
        return replaced

    def pe_hook(mod: PosEmbSinCos2d, inputs: tuple[Tensor, ...], pe: Tensor) -> Tensor:
        leaf = pe.expand(inputs[0].shape[0], *pe.shape).clone().requires_grad_(True)
        if wrt is None or "wrt" in captured:  # upstream of `wrt` it is part of f
            pe_leaves.append(leaf)
        return leaf

    def capture_layer(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"module output is a {type(out).__name__}, expected a Tensor")
        captured["layer"] = out
        raise _StopForward  # nothing downstream runs, so nothing can modify `out`

    def capture_wrt(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        cap = capture_output(out)
        wrt_capture.append(cap)
        captured["wrt"] = cap.tensor
        return cap.passthrough

    try:
        for m in model.modules():
            if _is_logit_layer(m):
                handles.append(m.register_forward_hook(logit_hook))
            elif _is_pos_emb(m):
                handles.append(m.register_forward_hook(pe_hook))
        if wrt is not None:
            handles.append(_find_module(model, wrt).register_forward_hook(capture_wrt))
        if layer is not None:
            handles.append(_find_module(model, layer).register_forward_hook(capture_layer))
        with torch.enable_grad(), explanation_mode(model):
            out: Tensor | None = None
            with contextlib.suppress(_StopForward):
                out = model(x)
            explained = captured["layer"] if layer is not None else out
            assert explained is not None
            tgt: Tensor | None = None
            if fn is not None:
                value = fn(explained)
            else:
                if explained.dim() != 2:
                    raise ValueError(
                        f"model output has shape {tuple(explained.shape)}; pass fn to reduce it"
                    )
                tgt = _targets(target, explained)
                value = explained.gather(1, tgt[:, None])[:, 0]
            if value.shape != (batch,):
                raise ValueError(
                    f"fn must return one value per sample [{batch}], got {tuple(value.shape)}"
                )
            if wrt is not None and "wrt" not in captured:
                raise ValueError(f"module {wrt!r} did not run before the explained value")
            if len(wrt_capture) > 1:
                raise ValueError(
                    f"module {wrt!r} ran {len(wrt_capture)} times in one forward pass; "
                    "explain in terms of a module that runs once"
                )
            if wrt_capture:
                wrt_capture[0].check_unmodified(f"the output of module {wrt!r}")
            base = captured["wrt"] if wrt is not None else x
            leaves = [base, *bias_leaves, *pe_leaves]
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    def term(ls: list[Tensor], gs: tuple[Tensor | None, ...]) -> Tensor:
        total = torch.zeros(batch, dtype=value.dtype, device=value.device)
        for leaf, g in zip(ls, gs):
            if g is not None:
                total = total + (leaf.detach() * g).flatten(1).sum(1)
        return total

    weights = grads[0] if grads[0] is not None else torch.zeros_like(base)
    base = base.detach()
    contributions = base * weights
    nb = len(bias_leaves)
    bias = term(bias_leaves, grads[1 : 1 + nb])
    pos_emb = term(pe_leaves, grads[1 + nb :])
    value = value.detach()
    error = value - (contributions.flatten(1).sum(1) + bias + pos_emb)
    if contributions.dim() == 4:  # images / CNN feature maps [B, C, H, W] -> [B, H, W]
        contribution_map = contributions.sum(1)
    elif contributions.dim() == 3:  # ViT tokens [B, N, D] -> [B, N]
        contribution_map = contributions.sum(-1)
    else:
        contribution_map = contributions
    return Explanation(
        weights=weights,
        contributions=contributions,
        contribution_map=contribution_map,
        value=value,
        bias=bias,
        pos_emb=pos_emb,
        completeness_error=error,
        target=tgt,
        output=None if out is None else out.detach(),
    )
