"""Concept sets of a FaCT model, in the form the metric packages consume without glue code.

A :class:`LayerConcepts` is one set of concepts at one layer -- the SAE latents of FaCT, or the
B-cos network's own channels at the same layer (the paper's baseline) -- with

* ``codes(images)`` and ``head(codes)``: :class:`concept_deletion.ConceptModel` (the head is the
  SAE decoder and the rest of the network, run from the layer on, never the backbone again);
* ``contributions(codes, targets)``: the exact Eq. 9 contributions for the deletion measure
  ``"contribution"``;
* ``presence(images)`` and ``attributions(images, concepts)``: the activation table and the
  Eq. 12 attribution maps of the C2-score (see :mod:`fact_model.consistency`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from fact_model.explain import (
    ConceptAttributions,
    ConceptContributions,
    channel_attributions,
    channel_contributions,
    concept_attributions,
    concept_contributions,
)
from fact_model.model import FaCT
from fact_model.splice import Layout, decode_dense

__all__ = ["ConceptKind", "LayerConcepts", "head_contributions"]

ConceptKind = Literal["sae", "channels"]


def head_contributions(
    model: FaCT, head: Callable[[Tensor], Tensor], codes: Tensor, targets: Tensor | int,
    layout: Layout,
) -> Tensor:  # fmt: skip
    """(B, K) ``codes * d logit / d codes`` of the target logits through ``head``, summed over
    positions, in ``model``'s explanation mode: there the head is linear in the codes, so the
    contributions add up to the logit minus the bias (Eq. 9). Shared by every concept set
    whose head runs the B-cos network (FaCT latents, channels, CRAFT)."""
    b = codes.shape[0]
    tgt = torch.as_tensor(targets, device=codes.device).long().reshape(-1)
    tgt = tgt.expand(b) if tgt.numel() == 1 else tgt
    if tgt.shape != (b,):
        raise ValueError(f"targets must be an int or ({b},), got {tuple(tgt.shape)}")
    leaf = codes.detach().requires_grad_(True)
    with torch.enable_grad(), model.explanation_mode():
        logits = head(leaf)
        (g,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), leaf)
    per = leaf.detach() * g
    return per.sum((2, 3)) if layout == "BKHW" else per.sum(1)


class LayerConcepts:
    """The concepts of one layer of a FaCT model (``kind="sae"``) or its B-cos channels.

    Args:
        model: the FaCT model (eval mode).
        layer: a decomposed layer (default: the last one).
        kind: ``"sae"`` -- the SAE latents, in the FaCT model; ``"channels"`` -- the channels of
            the layer's output, in the original B-cos network (every SAE bypassed).
    """

    def __init__(self, model: FaCT, layer: str | None = None, kind: ConceptKind = "sae") -> None:
        if kind not in ("sae", "channels"):
            raise ValueError(f"kind must be 'sae' or 'channels', got {kind!r}")
        self.model = model
        self.info = model.layer_info(layer)
        self.layer = self.info.name
        self.kind = kind
        self._chain = model.chain()
        self._chain.index(self.layer)  # a clear error if the head cannot start at this layer
        self.layout: Layout = self.info.layout
        self.n_concepts = self.info.n_latents if kind == "sae" else self.info.d_in

    @property
    def name(self) -> str:
        return f"FaCT {self.layer}" if self.kind == "sae" else f"B-cos channels {self.layer}"

    def __repr__(self) -> str:
        return f"LayerConcepts({self.name!r}, n_concepts={self.n_concepts}, layout={self.layout!r})"

    @property
    def concept_dim(self) -> int:
        return 1 if self.layout == "BKHW" else 2

    # ------------------------------------------------------------------ ConceptModel
    def codes(self, images: Tensor) -> Tensor:
        """Dense codes of ``images``: ``(B, K, H, W)`` or ``(B, T, K)`` (no autograd)."""
        with torch.no_grad():
            if self.kind == "sae":
                return self.model.dense_codes(images, self.layer)
            with self.model.bcos_mode():
                out = self.model.forward_with_codes(
                    images, layers=[self.layer], stop_after=self.layer
                )
            # Maps (B, C, H, W) and tokens (B, T, C) already have the channels on the K axis.
            return out.features[self.layer]

    def head(self, codes: Tensor) -> Tensor:
        """Logits from (possibly perturbed) dense codes: the network after the layer."""
        if self.kind == "sae":
            return self._chain.tail(
                self.layer, decode_dense(self.model.sae(self.layer), codes, self.layout)
            )
        with self.model.bcos_mode():
            return self._chain.tail(self.layer, codes)

    def contributions(self, codes: Tensor, targets: Tensor | int) -> Tensor:
        """(B, K) exact Eq. 9 contributions of the codes to the target logits, through the head.

        In explanation mode the head is linear in the codes, so ``codes * d logit / d codes``
        summed over positions adds up to the logit minus the bias.
        """
        return head_contributions(self.model, self.head, codes, targets, self.layout)

    # ------------------------------------------------------------------ explanations
    def explain(
        self, images: Tensor, targets: int | Sequence[int] | Tensor | None = None
    ) -> ConceptContributions:
        """Eq. 9 for ``targets`` (default: predicted class) with its completeness error."""
        if self.kind == "sae":
            return concept_contributions(self.model, images, targets, layer=self.layer)
        return channel_contributions(self.model, images, targets, layer=self.layer)

    def presence(self, images: Tensor) -> Tensor:
        """(B, K) concept presence: the codes summed over positions (Eq. 10)."""
        codes = self.codes(images)
        return codes.sum((2, 3)) if self.layout == "BKHW" else codes.sum(1)

    def attributions(
        self, images: Tensor, concepts: int | Sequence[int] | Tensor, *, keep_weights: bool = False
    ) -> ConceptAttributions:
        """Eq. 12 input attributions of ``concepts`` (an int, ``(M,)`` or ``(B, M)``)."""
        if self.kind == "sae":
            return concept_attributions(
                self.model, images, concepts, layer=self.layer, keep_weights=keep_weights
            )
        return channel_attributions(
            self.model, images, concepts, layer=self.layer, keep_weights=keep_weights
        )
