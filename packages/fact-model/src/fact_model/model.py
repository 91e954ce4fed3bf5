"""The FaCT model: a B-cos network with bias-free TopK SAEs spliced in at named layers.

``FaCT(backbone, {"layer4": sae})`` replaces the output of ``backbone.layer4`` by the SAE
reconstruction (paper Eq. 6-7). Because the forward pass uses only the reconstruction and every
layer is dynamic-linear without biases, every logit is exactly a sum of concept contributions
(Eq. 9) and every concept activation exactly a sum of pixel contributions (Eq. 12); see
:mod:`fact_model.explain`. The backbone is copied by default, so the network passed in is left
untouched and two FaCT models never share mutable state.
"""

from __future__ import annotations

import contextlib
import copy as _copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bcos_layers import explanation_mode
from fact_model.chain import ForwardChain
from fact_model.splice import (
    ConceptLayer,
    Layout,
    Recorder,
    StopForward,
    concept_layers,
    decode_dense,
    find_module,
    layout_of,
    set_module,
)
from topk_sae import BiasFreeTopKSAE, SparseCode

__all__ = ["PAPER_LAYERS", "BackboneSpec", "FaCT", "FaCTOutput", "LayerInfo"]

PAPER_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet50": ("layer2", "layer3", "layer4"),
    "resnet50_long": ("layer2", "layer3", "layer4"),
    "densenet121": ("features.transition2", "features.transition3", "features.norm5"),
    "densenet121_long": ("features.transition2", "features.transition3", "features.norm5"),
    "vitc_s_patch1_14": tuple(f"0.transformer.encoder_{i}" for i in (4, 8, 9, 10)),
}
"""The layers the paper decomposes (App. A, Table A1), per official backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild the backbone: a ``bcos_layers`` registry name and constructor arguments.

    Attributes:
        name: ``bcos_layers.create`` name (``"resnet50_long"``, ``"densenet121_long"``, ...).
        kwargs: constructor overrides (JSON values), e.g. ``{"num_classes": 10}``.
        official: the weights are the official B-cos-v2 checkpoint of ``name`` (saved as a
            reference and re-downloaded, hash-checked, on load) rather than stored weights.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    official: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs), "official": self.official}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        unknown = sorted(set(data) - {"name", "kwargs", "official"})
        if unknown:
            raise ValueError(f"unknown backbone fields {unknown}; expected name, kwargs, official")
        name, kwargs, official = data.get("name"), data.get("kwargs", {}), data.get("official")
        if not isinstance(name, str) or not name:
            raise ValueError(f"backbone.name must be a non-empty string, got {name!r}")
        if not isinstance(kwargs, dict):
            raise ValueError(f"backbone.kwargs must be an object, got {type(kwargs).__name__}")
        if not isinstance(official, bool):
            raise ValueError(f"backbone.official must be true or false, got {official!r}")
        return cls(name, dict(kwargs), official)

    def build(self, *, pretrained: bool = False) -> nn.Module:
        """Build the backbone (eval mode); ``pretrained`` loads the official weights."""
        import bcos_layers

        model = bcos_layers.create(self.name, pretrained=pretrained, **self.kwargs)
        model.fact_backbone_spec = self
        return model


class LayerInfo(NamedTuple):
    """A decomposed layer: its name, code layout, SAE size and the feature shape it saw."""

    name: str
    layout: Layout
    d_in: int
    n_latents: int
    k: int
    feature_shape: tuple[int, ...]
    """Shape of the layer output (without batch) for the probe input."""


class FaCTOutput(NamedTuple):
    """One forward pass: logits (``None`` if it stopped early) and, per recorded layer, the
    layer's features, its sparse code and the reconstruction passed downstream."""

    logits: Tensor | None
    features: dict[str, Tensor]
    codes: dict[str, SparseCode]
    recon: dict[str, Tensor]


def _logit_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that add a logit bias (``bcos_layers.LogitLayer`` or the official one)."""
    return [
        m for m in model.modules() if type(m).__name__ == "LogitLayer" and hasattr(m, "logit_bias")
    ]


class FaCT(nn.Module):
    """A B-cos network whose named layers are decomposed into concepts by bias-free TopK SAEs.

    Args:
        backbone: a B-cos model (``bcos_layers.create(...)``, in eval mode).
        saes: ``{layer name: SAE}``; the layer is any name of ``backbone.named_modules()``
            whose output is a (B, C, H, W) map or (B, T, D) tokens with ``C = D = sae.d_in``.
        copy: work on deep copies of the backbone and the SAEs (default), leaving the objects
            passed in untouched; ``False`` splices into ``backbone`` itself.
        input_size: side of the square probe image used to check the layers' shapes; default
            the backbone's ``pretrained_cfg.crop_size`` or 224.
        spec: how to rebuild the backbone for :meth:`save_pretrained` (default: from the
            backbone's ``fact_backbone_spec`` / ``pretrained_cfg``).
        class_names: optional class names (saved with the model, used in reports).
    """

    def __init__(
        self,
        backbone: nn.Module,
        saes: Mapping[str, BiasFreeTopKSAE],
        *,
        copy: bool = True,
        input_size: int | None = None,
        spec: BackboneSpec | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not saes:
            raise ValueError("FaCT needs at least one {layer name: SAE}")
        if any(isinstance(m, ConceptLayer) for m in backbone.modules()):
            raise ValueError(
                "the backbone already holds concept layers; pass the plain B-cos network "
                "(e.g. fact.backbone_module() of an existing FaCT model)"
            )
        self.spec = spec or _infer_spec(backbone)
        cfg = getattr(backbone, "pretrained_cfg", None)
        self.pretrained_cfg = cfg
        self.input_size = int(input_size or getattr(cfg, "crop_size", None) or 224)
        self.class_names = list(class_names) if class_names is not None else None
        if copy:
            backbone = _copy.deepcopy(backbone)
            saes = {name: _copy.deepcopy(sae) for name, sae in saes.items()}
        names = list(saes)
        for a in names:
            for b in names:
                if a != b and b.startswith(a + "."):
                    raise ValueError(
                        f"layers {a!r} and {b!r} are nested; decompose layers that follow one "
                        "another, not one inside the other"
                    )
        shapes = _probe_shapes(backbone, names, self.input_size)
        for name in names:
            sae = saes[name]
            shape = shapes[name]
            layout = layout_of(torch.empty((1, *shape)))
            channels = shape[0] if layout == "BKHW" else shape[1]
            if not isinstance(sae, BiasFreeTopKSAE):
                raise TypeError(
                    f"the SAE for {name!r} must be a topk_sae.BiasFreeTopKSAE, got "
                    f"{type(sae).__name__}"
                )
            if sae.d_in != channels:
                same = [
                    n
                    for n, s in _all_shapes(backbone, self.input_size).items()
                    if _channels(s) == sae.d_in
                ][:6]
                raise ValueError(
                    f"the SAE for layer {name!r} has d_in={sae.d_in}, but that layer outputs "
                    f"{channels} channels (shape {tuple(shape)}). Train the SAE on this layer's "
                    f"features, or use it at a layer with {sae.d_in} channels"
                    + (f", e.g. {same}" if same else "")
                    + "."
                )
            set_module(backbone, name, ConceptLayer(find_module(backbone, name), sae, name))
        self.backbone = backbone
        self.eval()  # explanations need eval-mode norms; call .train() explicitly to fine-tune
        self._shapes = {n: tuple(shapes[n]) for n in names}

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> tuple[str, ...]:
        """The decomposed layers, in module order (= forward order for the model zoo)."""
        return tuple(name for name, _ in concept_layers(self.backbone))

    def concept_layer(self, layer: str | None = None) -> ConceptLayer:
        """The :class:`ConceptLayer` of ``layer`` (default: the only / last one)."""
        layers = dict(concept_layers(self.backbone))
        if layer is None:
            return layers[self.layers[-1]]
        if layer not in layers:
            raise ValueError(f"{layer!r} is not a decomposed layer of this model: {list(layers)}")
        return layers[layer]

    def sae(self, layer: str | None = None) -> BiasFreeTopKSAE:
        """The SAE at ``layer`` (default: the last decomposed layer)."""
        return self.concept_layer(layer).sae

    def layer_info(self, layer: str | None = None) -> LayerInfo:
        cl = self.concept_layer(layer)
        shape = self._shapes[cl.layer_name]
        layout: Layout = "BKHW" if len(shape) == 3 else "BTK"
        sae = cl.sae
        return LayerInfo(cl.layer_name, layout, sae.d_in, sae.n_latents, sae.k, shape)

    @property
    def num_classes(self) -> int:
        n = getattr(self.backbone, "num_classes", None)
        if n is None:
            raise AttributeError("the backbone does not say how many classes it has")
        return int(n)

    @property
    def logit_bias(self) -> float:
        """The constant the logit layer adds to every logit (the network's only bias)."""
        total = 0.0
        for m in _logit_layers(self.backbone):
            if m.logit_bias is not None:
                total += float(m.logit_bias)
        return total

    def chain(self) -> ForwardChain:
        """The backbone's forward chain (for heads: the network after a layer)."""
        return ForwardChain(self.backbone)

    def backbone_module(self) -> nn.Module:
        """A plain copy of the original B-cos network (concept layers removed)."""
        plain = _copy.deepcopy(self.backbone)
        for name, cl in list(concept_layers(plain)):
            set_module(plain, name, cl.module)
        return plain

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def bcos_mode(self) -> Iterator[FaCT]:
        """Inside the block the SAEs are bypassed: the model is the original B-cos network."""
        layers = [cl for _, cl in concept_layers(self.backbone)]
        saved = [cl.bypass for cl in layers]
        try:
            for cl in layers:
                cl.bypass = True
            yield self
        finally:
            for cl, state in zip(layers, saved):
                cl.bypass = state

    @contextlib.contextmanager
    def only(self, layers: str | Sequence[str]) -> Iterator[FaCT]:
        """Inside the block only the SAEs of ``layers`` are in place (the others bypassed): the
        FaCT model of those layers alone, e.g. to evaluate each layer's model separately."""
        keep = {layers} if isinstance(layers, str) else set(layers)
        unknown = keep - set(self.layers)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not decomposed layers: {list(self.layers)}")
        cls = [cl for _, cl in concept_layers(self.backbone)]
        saved = [cl.bypass for cl in cls]
        try:
            for cl in cls:
                cl.bypass = cl.layer_name not in keep
            yield self
        finally:
            for cl, state in zip(cls, saved):
                cl.bypass = state

    def explanation_mode(self, active: bool = True) -> explanation_mode:
        """Detach every dynamic factor (B-cos explanation mode) inside a ``with`` block."""
        return explanation_mode(self, active)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits of the FaCT model (the backbone with every SAE in place)."""
        return self.backbone(x)

    def forward_with_codes(
        self,
        x: Tensor,
        *,
        layers: Sequence[str] | None = None,
        leaf_codes: bool | Sequence[str] = False,
        stop_after: str | None = None,
    ) -> FaCTOutput:
        """Forward pass that keeps features, codes and reconstructions of ``layers`` (all).

        ``leaf_codes`` (``True`` or the names of some layers) makes the code values fresh
        autograd leaves: gradients of later values w.r.t. the codes, with no graph through the
        earlier layers. ``stop_after`` ends the pass once that layer is recorded (``logits`` is
        then ``None``). In :meth:`bcos_mode` only features are recorded.
        """
        wanted = list(self.layers if layers is None else layers)
        if stop_after is not None and stop_after not in wanted:
            wanted.append(stop_after)
        leaf = set(wanted) if leaf_codes is True else set(leaf_codes or ())
        recorders: dict[str, Recorder] = {}
        for name in wanted:
            cl = self.concept_layer(name)
            recorders[name] = Recorder(leaf_codes=name in leaf, stop=(name == stop_after))
            cl.recorder = recorders[name]
        logits = None
        try:
            logits = self.backbone(x)
        except StopForward:
            pass
        finally:
            for name in wanted:
                self.concept_layer(name).recorder = None
        missing = [n for n, r in recorders.items() if r.features is None]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass")
        return FaCTOutput(
            logits,
            {n: r.features for n, r in recorders.items() if r.features is not None},
            {n: r.code for n, r in recorders.items() if r.code is not None},
            {n: r.recon for n, r in recorders.items() if r.recon is not None},
        )

    def encode(self, x: Tensor, layer: str | None = None) -> SparseCode:
        """The sparse concept code of ``layer`` for the images ``x`` (stops after the layer)."""
        layer = layer or self.layers[-1]
        return self.forward_with_codes(x, layers=[layer], stop_after=layer).codes[layer]

    def dense_codes(self, x: Tensor, layer: str | None = None) -> Tensor:
        """Dense codes ``(B, n, H, W)`` (maps) or ``(B, T, n)`` (tokens) of ``layer``."""
        info = self.layer_info(layer)
        code = self.encode(x, info.name)
        return code.to_dense(info.n_latents, dim=1 if info.layout == "BKHW" else -1)

    def head(self, codes: Tensor, layer: str | None = None) -> Tensor:
        """Logits from dense codes of ``layer``: decode, then the rest of the network."""
        info = self.layer_info(layer)
        recon = decode_dense(self.sae(info.name), codes, info.layout)
        return self.chain().tail(info.name, recon)

    # ------------------------------------------------------------------ explanations
    def explain(
        self,
        x: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        *,
        layer: str | None = None,
    ) -> Any:
        """Eq. 9 for the predicted class (or ``target``): see :func:`fact_model.concept_contributions`."""
        from fact_model.explain import concept_contributions

        return concept_contributions(self, x, target, layer=layer)

    def concept_attributions(
        self, x: Tensor, concepts: Any, *, layer: str | None = None, keep_weights: bool = True
    ) -> Any:
        """Eq. 12 input attributions: see :func:`fact_model.concept_attributions`."""
        from fact_model.explain import concept_attributions

        return concept_attributions(self, x, concepts, layer=layer, keep_weights=keep_weights)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any:
        """Write ``config.json``, the SAEs, backbone weights (or reference) and a model card;
        see :func:`fact_model.hub.save_pretrained`."""
        from fact_model.hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: Any, **kwargs: Any) -> FaCT:
        """Load strictly from a directory or a Hub repo; see :func:`fact_model.hub.from_pretrained`."""
        from fact_model.hub import from_pretrained

        return from_pretrained(name_or_path, cls=cls, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload to a Hub model repository; see :func:`fact_model.hub.push_to_hub`."""
        from fact_model.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ inputs
    def transform(self, image: Any) -> Tensor:
        """The evaluation transform of the backbone: PIL image -> 6-channel tensor."""
        from fact_model.data import eval_transform_for

        return eval_transform_for(self)(image)


def _infer_spec(backbone: nn.Module) -> BackboneSpec | None:
    spec = getattr(backbone, "fact_backbone_spec", None)
    if isinstance(spec, BackboneSpec):
        return spec
    cfg = getattr(backbone, "pretrained_cfg", None)
    if cfg is not None and getattr(cfg, "name", None):
        return BackboneSpec(cfg.name, {}, official=getattr(cfg, "source", None) == "official")
    return None


def _channels(shape: tuple[int, ...]) -> int | None:
    if len(shape) == 3:
        return shape[0]
    if len(shape) == 2:
        return shape[1]
    return None


def _probe_input(backbone: nn.Module, size: int) -> Tensor:
    param = next(backbone.parameters())
    in_chans = int(getattr(backbone, "in_chans", 6))
    return torch.zeros(1, in_chans, size, size, dtype=param.dtype, device=param.device)


def _all_shapes(backbone: nn.Module, size: int) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every module that returns a tensor, for a probe input."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in backbone.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, Tensor):
                shapes[name] = tuple(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            backbone(_probe_input(backbone, size))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _probe_shapes(
    backbone: nn.Module, names: Sequence[str], size: int
) -> dict[str, tuple[int, ...]]:
    for name in names:
        find_module(backbone, name)
    shapes = _all_shapes(backbone, size)
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name not in shapes:
            raise ValueError(f"layer {name!r} did not run (or returned no tensor) on a probe input")
        shape = shapes[name]
        if len(shape) not in (2, 3):
            raise ValueError(
                f"layer {name!r} outputs shape {(1, *shape)}; a concept layer needs a "
                "(B, C, H, W) feature map or (B, T, D) tokens"
            )
        out[name] = shape
    return out
