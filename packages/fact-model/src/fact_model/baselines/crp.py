"""CRP baseline concept set (Achtibat et al., Concept Relevance Propagation), as FaCT ran it.

App. C.3 of the paper: the official zennit-based implementation (``zennit-crp``, import
``crp``) on a standard torchvision network with the "EpsilonFlat" rule of the CRP paper. zennit
0.4.6 has no composite of that exact name; the CRP paper and its reference code use
``zennit.composites.EpsilonPlusFlat`` (flat rule on the first layer, z+ on convolutions,
epsilon on dense layers), which is the default here.

A concept is a channel ``k`` of one layer. Its attribution map is the conditional relevance
``R(x | y=target, layer=[k])`` at the input, summed over the colour channels; its relevance is
the layer relevance of the channel summed over positions (``crp.concepts.ChannelConcept
.attribute`` without the abs-norm), which by CRP's conservation equals the sum of its map.

Presence (what C2 thresholds at ``> 0``) is, by default, that relevance for the predicted
class (``presence="relevance"``, the concept's relevance as CRP defines it); ``"activation"``
uses the channel's activation summed over positions instead.

zennit and zennit-crp are the optional extra ``fact-model[crp]``; they are imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fact_model.explain import ConceptAttributions

__all__ = ["COMPOSITES", "CrpConcepts"]

# zennit 0.4.6 composites (``zennit.composites.Epsilon`` there is a rule, not a composite).
COMPOSITES = ("epsilon_plus_flat", "epsilon_plus", "epsilon_alpha2_beta1_flat")
PresenceKind = Literal["relevance", "activation"]


def _require_crp() -> tuple[Any, Any, Any]:
    try:
        import zennit.composites as composites
        import zennit.torchvision as canonizers
        from crp.attribution import CondAttribution
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the CRP baseline needs zennit and zennit-crp: install fact-model[crp]"
        ) from err
    return composites, canonizers, CondAttribution


def _default_canonizers(model: torch.nn.Module, canonizers: Any) -> list[Any]:
    try:
        from torchvision.models import VGG, ResNet
    except ImportError:  # pragma: no cover
        ResNet = VGG = ()  # type: ignore[assignment,misc]
    if isinstance(model, ResNet):
        return [canonizers.ResNetCanonizer()]
    if isinstance(model, VGG):
        return [canonizers.VGGCanonizer()]
    return [canonizers.SequentialMergeBatchNorm()]


class CrpConcepts:
    """Channels of one layer of a standard network as CRP concepts.

    Args:
        model: a torchvision-like classifier (put in eval mode here).
        layer: a module name of ``model`` (``dict(model.named_modules())``) whose output
            channels are the concepts (dim 1 of its output).
        composite: one of :data:`COMPOSITES` or a ready ``zennit`` composite.
        canonizers: zennit canonizers for a composite given by name (default: ResNetCanonizer
            for torchvision ResNets, VGGCanonizer for VGGs, else SequentialMergeBatchNorm).
        presence: ``"relevance"`` (default) or ``"activation"`` (see the module docstring).
        device: where to run (default: the model's device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layer: str,
        *,
        composite: str | Any = "epsilon_plus_flat",
        canonizers: Sequence[Any] | None = None,
        presence: PresenceKind = "relevance",
        device: Any = None,
    ) -> None:
        composites, canon_mod, CondAttribution = _require_crp()
        modules = dict(model.named_modules())
        if layer not in modules or layer == "":
            raise ValueError(f"layer {layer!r} is not a module of the model")
        if presence not in ("relevance", "activation"):
            raise ValueError(f"presence must be 'relevance' or 'activation', got {presence!r}")
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.layer = layer
        self.presence_kind: PresenceKind = presence
        if isinstance(composite, str):
            if composite not in COMPOSITES:
                raise ValueError(f"composite must be one of {COMPOSITES}, got {composite!r}")
            cls = {
                "epsilon_plus_flat": composites.EpsilonPlusFlat,
                "epsilon_plus": composites.EpsilonPlus,
                "epsilon_alpha2_beta1_flat": composites.EpsilonAlpha2Beta1Flat,
            }[composite]
            canon = (
                list(canonizers)
                if canonizers is not None
                else _default_canonizers(self.model, canon_mod)
            )
            self.composite_name = composite
            self.composite = cls(canonizers=canon)
        else:
            self.composite_name = type(composite).__name__
            self.composite = composite
        self._attribution = CondAttribution(self.model, no_param_grad=True)
        self.n_concepts = self._layer_channels(modules[layer])

    def _layer_channels(self, module: torch.nn.Module) -> int:
        out: list[int] = []
        handle = module.register_forward_hook(lambda _m, _i, o: out.append(int(o.shape[1])))
        try:
            size = getattr(self.model, "input_size", None) or 32
            with torch.no_grad():
                self.model(torch.zeros(1, 3, int(size), int(size), device=self.device))
        finally:
            handle.remove()
        if not out:
            raise ValueError(f"layer {self.layer!r} is not run in the forward pass")
        return out[0]

    @property
    def name(self) -> str:
        return f"CRP {self.layer}"

    def __repr__(self) -> str:
        return (
            f"CrpConcepts({self.name!r}, n_concepts={self.n_concepts}, "
            f"composite={self.composite_name!r})"
        )

    # ------------------------------------------------------------------ internals
    def _run(self, x: Tensor, conditions: list[dict[str, list[int]]]) -> Any:
        x = x.detach().to(self.device).requires_grad_(True)
        with torch.enable_grad():
            return self._attribution(
                x, conditions, self.composite, record_layer=[self.layer], exclude_parallel=False
            )

    def _targets(self, images: Tensor, targets: Tensor | int | Sequence[int] | None) -> Tensor:
        b = images.shape[0]
        if targets is None:
            with torch.no_grad():
                return self.model(images.to(self.device)).argmax(1).cpu()
        tgt = torch.as_tensor(targets).long().reshape(-1).cpu()
        tgt = tgt.expand(b) if tgt.numel() == 1 else tgt
        if tgt.shape != (b,):
            raise ValueError(f"targets must be an int or ({b},), got {tuple(tgt.shape)}")
        return tgt

    # ------------------------------------------------------------------ API
    def relevance(
        self, images: Tensor, targets: Tensor | int | Sequence[int] | None = None
    ) -> Tensor:
        """(B, K) CRP relevance of every channel for ``targets`` (default: predicted class):
        the layer relevance of ``R(x | y=target)`` summed over positions."""
        tgt = self._targets(images, targets)
        res = self._run(images, [{"y": [int(t)]} for t in tgt])
        rel = res.relevances[self.layer].detach()
        return rel.reshape(*rel.shape[:2], -1).sum(-1).cpu()

    def activations(self, images: Tensor) -> Tensor:
        """(B, K) the layer's activation summed over positions."""
        out: list[Tensor] = []
        module = dict(self.model.named_modules())[self.layer]
        handle = module.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
        try:
            with torch.no_grad():
                self.model(images.to(self.device))
        finally:
            handle.remove()
        a = out[0]
        return a.reshape(*a.shape[:2], -1).sum(-1).cpu()

    def presence(self, images: Tensor) -> Tensor:
        """(B, K) presence: predicted-class relevance (default) or summed activation."""
        if self.presence_kind == "activation":
            return self.activations(images)
        return self.relevance(images)

    def attributions(
        self,
        images: Tensor,
        concepts: int | Sequence[int] | Tensor,
        targets: Tensor | int | Sequence[int] | None = None,
    ) -> ConceptAttributions:
        """Conditional relevance maps ``R(x | y=target, layer=[k])`` of ``concepts`` (an int,
        ``(M,)`` or ``(B, M)``), summed over input channels: ``attributions`` is (B, M, H, W),
        ``value`` (B, M) the concepts' layer relevance, ``completeness_error`` their
        difference from the maps' sums (CRP's conservation error)."""
        b = images.shape[0]
        ids = torch.as_tensor(concepts).long().cpu()
        if ids.ndim == 0:
            ids = ids.reshape(1)
        if ids.ndim == 1:
            ids = ids[None].expand(b, -1)
        if ids.ndim != 2 or ids.shape[0] != b:
            raise ValueError(f"concepts must be an int, (M,) or ({b}, M), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_concepts):
            raise ValueError(f"concept ids must lie in [0, {self.n_concepts})")
        tgt = self._targets(images, targets)
        m = ids.shape[1]
        h, w = images.shape[-2:]
        maps = torch.zeros(b, m, h, w)
        value = torch.zeros(b, m)
        for i in range(b):
            if m == 0:
                continue
            conds = [{"y": [int(tgt[i])], self.layer: [int(k)]} for k in ids[i]]
            x = images[i : i + 1].repeat(m, *([1] * (images.ndim - 1)))
            res = self._run(x, conds)
            # CRP's heatmap is the input relevance already summed over the colour channels.
            heat = res.heatmap.detach()
            maps[i] = (heat.sum(1) if heat.ndim == 4 else heat).cpu()
            rel = res.relevances[self.layer].detach()
            rel = rel.reshape(m, rel.shape[1], -1).sum(-1).cpu()
            value[i] = rel[torch.arange(m), ids[i]]
        zero = torch.zeros(b, m)
        return ConceptAttributions(
            layer=self.layer,
            concepts=ids.clone(),
            value=value,
            attributions=maps,
            weights=None,
            pos_emb=zero,
            completeness_error=value - maps.sum((2, 3)),
        )
