"""Exact concept explanations of a FaCT model, each with its completeness error.

Inside B-cos explanation mode every dynamic factor is detached, so the network after a concept
layer is a linear map of the codes and the network before it a linear map of the input. Hence:

* **Eq. 9** -- concept contributions to a logit: ``logit - bias = sum_k c_k`` with
  ``c_k = sum_{positions} u_k * d logit / d u_k`` (:func:`concept_contributions`);
* **Eq. 12** -- concept attribution at the input: ``presence_k = sum_pixels x * W_k(x)`` with
  ``presence_k = sum_{positions} u_k`` and ``W_k = d presence_k / d x`` (:func:`concept_attributions`);
* **Eq. H.6** -- the input attribution of one concept's contribution to a logit (App. H.2):
  the same with the positions weighted by ``d logit / d u_k`` (:func:`contribution_attributions`);
* **Eq. H.14** -- cross-layer contributions (App. H.3): each early concept's contribution to
  a late concept's presence (:func:`cross_layer_contributions`).

Every result carries ``completeness_error`` = explained value minus the sum of its parts (and
minus the constant terms: the logit bias; for ViTs the fixed positional embedding, reported
separately as ``pos_emb``), which is float32 round-off (~1e-6 relative) for every input.
All functions are batched (samples never interact in eval mode) and leave the model unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bcos_layers.layers.misc import PosEmbSinCos2d
from fact_model.model import FaCT
from topk_sae import SparseCode

__all__ = [
    "ConceptAttributions",
    "ConceptContributions",
    "CrossLayerContributions",
    "channel_attributions",
    "channel_contributions",
    "concept_attributions",
    "concept_contributions",
    "contribution_attributions",
    "cross_layer_contributions",
    "scatter_concepts",
]


class ConceptContributions(NamedTuple):
    """Eq. 9: contributions of every concept of ``layer`` to the explained logits.

    ``B`` images, ``T`` explained logits per image, ``n`` concepts (SAE latents).
    """

    layer: str
    targets: Tensor
    """(B, T) int64: the explained classes."""
    logits: Tensor
    """(B, T): the explained logits (bias included)."""
    bias: float
    """The logit bias (the same constant for every logit)."""
    contributions: Tensor
    """(B, T, n): contribution of each concept, summed over positions (Eq. 9)."""
    presence: Tensor
    """(B, n): concept presence, the code summed over positions."""
    completeness_error: Tensor
    """(B, T): ``logit - bias - sum_k contributions``; float32 round-off."""
    output: Tensor
    """(B, C): all logits of the FaCT model."""

    def top(self, k: int = 5, target: int = 0) -> list[list[tuple[int, float]]]:
        """Per image, the ``k`` concepts with the largest contribution to logit ``target``."""
        c = self.contributions[:, target]
        vals, idx = c.topk(min(k, c.shape[1]), dim=1)
        return [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]

    def coverage(self, fraction: float = 0.8, target: int = 0) -> Tensor:
        """(B,) number of concepts needed to cover ``fraction`` of the positive contribution
        (App. B: 80%)."""
        return concepts_to_cover(self.contributions[:, target], fraction)


class ConceptAttributions(NamedTuple):
    """Eq. 12 (or H.6): input attributions of ``M`` concepts per image.

    ``value`` is the explained scalar per (image, concept): the presence (Eq. 12) or the
    contribution to a logit (Eq. H.6).
    """

    layer: str
    concepts: Tensor
    """(B, M) int64: the explained concepts."""
    value: Tensor
    """(B, M): the explained values."""
    attributions: Tensor
    """(B, M, H, W): pixel contributions ``sum_channels x * W(x)``."""
    weights: Tensor | None
    """(B, M, C, H, W): the dynamic linear maps ``W(x)`` (for B-cos explanation images), or
    ``None`` when not kept."""
    pos_emb: Tensor
    """(B, M): contribution of the fixed positional embedding (ViTs; 0 otherwise)."""
    completeness_error: Tensor
    """(B, M): ``value - sum attributions - pos_emb``; float32 round-off."""


class CrossLayerContributions(NamedTuple):
    """Eq. H.14: contributions of the concepts of ``early`` to concepts of ``late``."""

    early: str
    late: str
    late_concepts: Tensor
    """(B, M) int64: the explained late concepts."""
    presence: Tensor
    """(B, M): their presence (the explained values)."""
    contributions: Tensor
    """(B, M, n_early): contribution of every early concept to each late concept."""
    completeness_error: Tensor
    """(B, M): ``presence - sum contributions``."""


# ----------------------------------------------------------------------------- helpers
def scatter_concepts(code: SparseCode, per_entry: Tensor, n_latents: int) -> Tensor:
    """Sum a per-entry quantity of a sparse code over positions into ``(B, n_latents)``.

    ``per_entry`` has the shape of ``code.values`` ((B, K, H, W) or (B, T, K)); entries with the
    same latent at different positions add up.
    """
    values, indices = code
    b = values.shape[0]
    out = per_entry.new_zeros(b, n_latents)
    return out.scatter_add_(1, indices.reshape(b, -1), per_entry.reshape(b, -1))


def concepts_to_cover(contrib_BK: Tensor, fraction: float = 0.8) -> Tensor:
    """(B,) smallest number of concepts whose positive contributions reach ``fraction`` of the
    total positive contribution (0 when no contribution is positive)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    pos = contrib_BK.clamp_min(0).sort(dim=1, descending=True).values
    total = pos.sum(1, keepdim=True)
    csum = pos.cumsum(1)
    need = (csum < fraction * total * (1 - 1e-6)).sum(1) + 1
    return torch.where(total[:, 0] > 0, need, torch.zeros_like(need))


def _check_images(model: FaCT, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise ValueError(
            "x must be a float image batch (B, C, H, W) as the backbone expects (6 channels for "
            "B-cos: use model.transform / bcos_layers.AddInverse)"
        )
    if model.backbone.training:
        raise ValueError("explanations need model.eval() (batch statistics would mix samples)")
    return x.detach()


def _targets(targets: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    """(B, T) target classes: predicted class (None), one class for all, per image, or (B, T)."""
    b, c = logits.shape
    if targets is None:
        return logits.argmax(1, keepdim=True)
    t = torch.as_tensor(targets, device=logits.device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(b, 1)
    elif t.ndim == 1:
        t = t[:, None] if t.shape[0] == b else t[None].expand(b, -1)
    if t.ndim != 2 or t.shape[0] != b:
        raise ValueError(
            f"targets must be an int, (B,), (T,) or (B, T); got shape {tuple(t.shape)}"
        )
    if bool(((t < 0) | (t >= c)).any()):
        raise ValueError(f"target classes must lie in [0, {c}), got {t.unique().tolist()}")
    return t


def _concept_ids(
    concepts: int | Sequence[int] | Tensor, b: int, n: int, device: torch.device
) -> Tensor:
    """(B, M) concept indices from an int, (M,) (same for every image) or (B, M)."""
    c = torch.as_tensor(concepts, device=device)
    if c.is_floating_point() or c.dtype == torch.bool:
        raise TypeError(f"concepts must be integer indices, got {c.dtype}")
    c = c.long()
    if c.ndim == 0:
        c = c.expand(b, 1)
    elif c.ndim == 1:
        c = c[None].expand(b, -1)
    if c.ndim != 2 or c.shape[0] != b:
        raise ValueError(f"concepts must be an int, (M,) or (B={b}, M); got shape {tuple(c.shape)}")
    if c.numel() and bool(((c < 0) | (c >= n)).any()):
        raise ValueError(f"concept indices must lie in [0, {n}), got {c.unique().tolist()[:10]}")
    return c


@contextlib.contextmanager
def _position_leaves(model: nn.Module) -> Iterator[list[Tensor]]:
    """Make the ViT positional embeddings autograd leaves for one forward pass (its term is
    then ``sum leaf * grad``); yields the list the leaves are appended to."""
    leaves: list[Tensor] = []

    def hook(mod: nn.Module, inputs: tuple[Tensor, ...], pe: Tensor) -> Tensor:
        leaf = pe.expand(inputs[0].shape[0], *pe.shape).clone().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PosEmbSinCos2d)
    ]
    try:
        yield leaves
    finally:
        for h in handles:
            h.remove()


def _leaf_term(leaves: list[Tensor], grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """``sum leaf * grad`` per sample: the contribution of constant terms made leaves."""
    total = like.new_zeros(like.shape[0])
    for leaf, g in zip(leaves, grads):
        if g is not None:
            total = total + (leaf.detach() * g).flatten(1).sum(1)
    return total


def _to_input(
    x: Tensor, xg: Tensor, value_BM: Tensor, pes: list[Tensor], keep_weights: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Backpropagate each column of ``value_BM`` (in the graph of ``xg``) to the input: pixel
    contributions ``(B, M, H, W)``, optionally ``W(x)`` ``(B, M, C, H, W)``, and the constant
    positional-embedding term ``(B, M)``."""
    b, m = value_BM.shape
    maps, weights, pe_terms = [], [], []
    for j in range(m):
        grads = torch.autograd.grad(
            value_BM[:, j].sum(), [xg, *pes], retain_graph=j + 1 < m, allow_unused=True
        )
        w = grads[0] if grads[0] is not None else torch.zeros_like(xg)
        maps.append((x * w).sum(1))
        if keep_weights:
            weights.append(w)
        pe_terms.append(_leaf_term(pes, grads[1:], x))
    if not m:
        return x.new_zeros(b, 0, *x.shape[2:]), None, x.new_zeros(b, 0)
    return (
        torch.stack(maps, 1),
        torch.stack(weights, 1) if keep_weights else None,
        torch.stack(pe_terms, 1),
    )


# ----------------------------------------------------------------------------- Eq. 9
def concept_contributions(
    model: FaCT,
    x: Tensor,
    targets: int | Sequence[int] | Tensor | None = None,
    *,
    layer: str | None = None,
) -> ConceptContributions:
    """Eq. 9: every concept's exact contribution to the logits ``targets`` (default: predicted).

    One forward pass in explanation mode with the codes of ``layer`` (default: the last
    decomposed layer) as autograd leaves, then one backward pass per explained logit through
    the network after the layer only.
    """
    x = _check_images(model, x)
    info = model.layer_info(layer)
    with torch.enable_grad(), model.explanation_mode():
        out = model.forward_with_codes(x, layers=[info.name], leaf_codes=True)
        assert out.logits is not None
        code = out.codes[info.name]
        tgt = _targets(targets, out.logits)
        contribs = []
        for t in range(tgt.shape[1]):
            y = out.logits.gather(1, tgt[:, t : t + 1]).sum()
            (g,) = torch.autograd.grad(y, code.values, retain_graph=t + 1 < tgt.shape[1])
            contribs.append(scatter_concepts(code, code.values.detach() * g, info.n_latents))
    logits = out.logits.detach()
    explained = logits.gather(1, tgt)
    contributions = torch.stack(contribs, dim=1)
    bias = model.logit_bias
    error = explained - bias - contributions.sum(2)
    presence = scatter_concepts(code, code.values.detach(), info.n_latents)
    return ConceptContributions(
        info.name, tgt, explained, bias, contributions, presence, error, logits
    )


# ----------------------------------------------------------------------------- Eq. 12 / H.6
def _attribute(
    model: FaCT,
    x: Tensor,
    concepts: int | Sequence[int] | Tensor,
    layer: str | None,
    targets: int | Sequence[int] | Tensor | None,
    weighted: bool,
    keep_weights: bool,
) -> ConceptAttributions:
    x = _check_images(model, x)
    info = model.layer_info(layer)
    b = x.shape[0]
    ids = _concept_ids(concepts, b, info.n_latents, x.device)
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad(), model.explanation_mode(), _position_leaves(model.backbone) as pes:
        out = model.forward_with_codes(
            xg, layers=[info.name], stop_after=None if weighted else info.name
        )
        code = out.codes[info.name]
        values = code.values
        if weighted:
            assert out.logits is not None
            tgt = _targets(targets, out.logits)
            if tgt.shape[1] != 1:
                raise ValueError("contribution_attributions explains one logit per image")
            y = out.logits.gather(1, tgt).sum()
            (g,) = torch.autograd.grad(y, values, retain_graph=True)
            per_entry = g.detach() * values  # Eq. H.3: positions weighted by d logit / d u
        else:
            per_entry = values  # Eq. 10: uniform sum over positions
        explained = scatter_concepts(code, per_entry, info.n_latents)  # (B, n), in the graph
        value = explained.gather(1, ids)  # (B, M)
        attributions, weights, pos_emb = _to_input(x, xg, value, pes, keep_weights)
    value = value.detach()
    error = value - attributions.flatten(2).sum(2) - pos_emb
    return ConceptAttributions(info.name, ids, value, attributions, weights, pos_emb, error)


def concept_attributions(
    model: FaCT,
    x: Tensor,
    concepts: int | Sequence[int] | Tensor,
    *,
    layer: str | None = None,
    keep_weights: bool = True,
) -> ConceptAttributions:
    """Eq. 12: exact input attribution of each concept's presence (code summed over positions).

    ``concepts``: one index for all images, ``(M,)`` for all images, or ``(B, M)``. The forward
    pass stops at ``layer``; one backward pass to the input per explained concept.
    """
    return _attribute(model, x, concepts, layer, None, weighted=False, keep_weights=keep_weights)


def contribution_attributions(
    model: FaCT,
    x: Tensor,
    concepts: int | Sequence[int] | Tensor,
    targets: int | Sequence[int] | Tensor | None = None,
    *,
    layer: str | None = None,
    keep_weights: bool = True,
) -> ConceptAttributions:
    """Eq. H.6 (App. H.2): exact input attribution of each concept's contribution to a logit
    (default: the predicted class); ``value`` equals the Eq. 9 contribution."""
    return _attribute(model, x, concepts, layer, targets, weighted=True, keep_weights=keep_weights)


# ----------------------------------------------------------------------------- Eq. H.14
def cross_layer_contributions(
    model: FaCT,
    x: Tensor,
    late_concepts: int | Sequence[int] | Tensor,
    *,
    early: str,
    late: str,
) -> CrossLayerContributions:
    """Eq. H.14 (App. H.3): contribution of every ``early`` concept to ``late`` concepts.

    The presence of a late concept is a linear function of the early codes in explanation mode
    (B-cos layers between the two SAEs, the late SAE's bias-free encoder and its fixed
    ReLU/TopK gating), so it is exactly the sum of ``u_early * d presence / d u_early``.
    """
    x = _check_images(model, x)
    order = model.layers
    if early not in order or late not in order:
        raise ValueError(f"early and late must be decomposed layers of this model: {list(order)}")
    if order.index(early) >= order.index(late):
        raise ValueError(f"{early!r} must come before {late!r} in the network ({list(order)})")
    e_info, l_info = model.layer_info(early), model.layer_info(late)
    b = x.shape[0]
    ids = _concept_ids(late_concepts, b, l_info.n_latents, x.device)
    m = ids.shape[1]
    with torch.enable_grad(), model.explanation_mode():
        # Leaf codes at the early layer; the late layer's codes stay in the graph above them.
        out = model.forward_with_codes(x, layers=[early, late], leaf_codes=[early], stop_after=late)
        e_code, l_code = out.codes[early], out.codes[late]
        presence = scatter_concepts(l_code, l_code.values, l_info.n_latents).gather(1, ids)
        contribs = []
        for j in range(m):
            (g,) = torch.autograd.grad(
                presence[:, j].sum(), e_code.values, retain_graph=j + 1 < m, allow_unused=True
            )
            g = torch.zeros_like(e_code.values) if g is None else g
            contribs.append(scatter_concepts(e_code, e_code.values.detach() * g, e_info.n_latents))
    contributions = torch.stack(contribs, 1) if m else x.new_zeros(b, 0, e_info.n_latents)
    presence = presence.detach()
    error = presence - contributions.sum(2)
    return CrossLayerContributions(early, late, ids, presence, contributions, error)


# ----------------------------------------------------------------------------- B-cos channels
def _positions_sum(features: Tensor) -> Tensor:
    """(B, C) per-channel sum over positions of a map (B, C, H, W) or tokens (B, T, C)."""
    return features.sum((2, 3)) if features.ndim == 4 else features.sum(1)


def channel_contributions(
    model: FaCT,
    x: Tensor,
    targets: int | Sequence[int] | Tensor | None = None,
    *,
    layer: str | None = None,
) -> ConceptContributions:
    """The paper's baseline concept set: the B-cos network's own channels at ``layer``.

    In the original B-cos model (SAEs bypassed) the logit is exactly the sum over channels of
    ``sum_{positions} f_c * d logit / d f_c`` (B-cos layer-level completeness); same result
    type as :func:`concept_contributions`, with channels in place of concepts. ``presence`` is
    the channel summed over positions (B-cos channels can be negative).
    """
    x = _check_images(model, x)
    name = model.layer_info(layer).name
    with torch.enable_grad(), model.bcos_mode(), model.explanation_mode():
        out = model.forward_with_codes(x, layers=[name], leaf_codes=True)
        assert out.logits is not None
        feats = out.features[name]
        tgt = _targets(targets, out.logits)
        contribs = []
        for t in range(tgt.shape[1]):
            y = out.logits.gather(1, tgt[:, t : t + 1]).sum()
            (g,) = torch.autograd.grad(y, feats, retain_graph=t + 1 < tgt.shape[1])
            contribs.append(_positions_sum(feats.detach() * g))
    logits = out.logits.detach()
    explained = logits.gather(1, tgt)
    contributions = torch.stack(contribs, dim=1)
    bias = model.logit_bias
    error = explained - bias - contributions.sum(2)
    presence = _positions_sum(feats.detach())
    return ConceptContributions(name, tgt, explained, bias, contributions, presence, error, logits)


def channel_attributions(
    model: FaCT,
    x: Tensor,
    channels: int | Sequence[int] | Tensor,
    *,
    layer: str | None = None,
    keep_weights: bool = True,
) -> ConceptAttributions:
    """Eq. 12 for B-cos channels: input attribution of each channel summed over positions, in
    the original B-cos model (SAEs bypassed)."""
    x = _check_images(model, x)
    name = model.layer_info(layer).name
    xg = x.clone().requires_grad_(True)
    with (
        torch.enable_grad(),
        model.bcos_mode(),
        model.explanation_mode(),
        _position_leaves(model.backbone) as pes,
    ):
        feats = model.forward_with_codes(xg, layers=[name], stop_after=name).features[name]
        presence = _positions_sum(feats)
        ids = _concept_ids(channels, x.shape[0], presence.shape[1], x.device)
        value = presence.gather(1, ids)
        attributions, weights, pos_emb = _to_input(x, xg, value, pes, keep_weights)
    value = value.detach()
    error = value - attributions.flatten(2).sum(2) - pos_emb
    return ConceptAttributions(name, ids, value, attributions, weights, pos_emb, error)
