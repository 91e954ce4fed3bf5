"""Named backbones and upsamplers: ``make_extractor("dinov2-small+loftup")``.

A spec is ``"<backbone>+<upsampler>"``. The backbone is a registered name (``dinov2-small``,
``dinov2-base``, ``dinov2-small-reg``, ...) or any DINOv2 Hub id / local directory; the
upsampler is a registered name (``loftup``, ``bilinear``). ``register_backbone`` and
``register_upsampler`` add others (e.g. AnyUp, CLIP) without touching this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from c2score.features.dinov2 import DEFAULT_DINOV2, Dinov2PatchFeatures
from c2score.features.loftup import DEFAULT_QUERY_CHUNK, LoftUpUpsampler
from c2score.features.upsample import BilinearUpsampler, UpsampledFeatureExtractor

DEFAULT_SPEC = "dinov2-small+loftup"
"""The paper's C2 features: DINOv2 ViT-S/14 upsampled by LoftUp."""

DINOV2_MODELS: dict[str, str] = {
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
    "dinov2-small-reg": "facebook/dinov2-with-registers-small",
    "dinov2-base-reg": "facebook/dinov2-with-registers-base",
    "dinov2-large-reg": "facebook/dinov2-with-registers-large",
    "dinov2-giant-reg": "facebook/dinov2-with-registers-giant",
}
"""Short names of the released DINOv2 models on the Hugging Face Hub."""

LOFTUP_FOR_BACKBONE: dict[str, str] = {
    "facebook/dinov2-small": "haiwen/loftup-dinov2s",
    "facebook/dinov2-with-registers-small": "haiwen/loftup-dinov2s_reg",
    "facebook/dinov2-base": "haiwen/loftup-dinov2b",
    "facebook/dinov2-with-registers-base": "haiwen/loftup-dinov2b_reg",
}
"""The official LoftUp checkpoint trained on each backbone's features."""


@dataclass(frozen=True)
class HubOptions:
    """How to fetch weights from the Hugging Face Hub (shared by backbone and upsampler)."""

    cache_dir: str | Path | None = None
    """Hub cache directory (None: the ``HF_HUB_CACHE`` default)."""
    local_files_only: bool = False
    """Never download; use only cached or local files (also implied by ``HF_HUB_OFFLINE=1``)."""
    token: str | bool | None = None
    """Access token for private repositories (None: the logged-in default)."""


@dataclass(frozen=True)
class UpsamplerRequest:
    """What an upsampler factory gets: the backbone it follows and the user's options."""

    backbone_id: str
    """Resolved backbone id or path (e.g. ``facebook/dinov2-small``)."""
    backbone: nn.Module
    """The built backbone (``dim`` gives the feature dimension)."""
    weights: str | None
    """Explicit upsampler weights (Hub repo id, directory or file); None: the default."""
    revision: str | None
    """Hub revision of the upsampler weights."""
    hub: HubOptions
    """Download options."""
    query_chunk_size: int | None
    """Attention chunking for attention-based upsamplers (None: unchunked)."""
    per_image: bool
    """Upsample each image of a batch separately (see :class:`LoftUpUpsampler`)."""


BackboneFactory = Callable[[str, str | None, HubOptions], nn.Module]
"""``factory(model id or path, revision, hub) -> PatchBackbone``."""
UpsamplerFactory = Callable[[UpsamplerRequest], nn.Module]
"""``factory(request) -> Upsampler``."""


def _dinov2(model_id: str, revision: str | None, hub: HubOptions) -> nn.Module:
    return Dinov2PatchFeatures.from_pretrained(
        model_id,
        revision=revision,
        cache_dir=hub.cache_dir,
        local_files_only=hub.local_files_only,
        token=hub.token,
    )


def _loftup(req: UpsamplerRequest) -> nn.Module:
    weights = req.weights or LOFTUP_FOR_BACKBONE.get(req.backbone_id)
    if weights is None:
        raise ValueError(
            f"no official LoftUp checkpoint is known for backbone {req.backbone_id!r} (known: "
            f"{sorted(LOFTUP_FOR_BACKBONE)}); pass the LoftUp weights explicitly "
            "(upsampler_weights=<Hub repo id, directory or pytorch_model.bin>)"
        )
    return LoftUpUpsampler.from_pretrained(
        weights,
        revision=req.revision,
        cache_dir=req.hub.cache_dir,
        local_files_only=req.hub.local_files_only,
        token=req.hub.token,
        per_image=req.per_image,
        query_chunk_size=req.query_chunk_size,
    )


def _bilinear(req: UpsamplerRequest) -> nn.Module:
    if req.weights is not None:
        raise ValueError("the bilinear upsampler has no weights; drop upsampler_weights")
    return BilinearUpsampler()


_BACKBONES: dict[str, tuple[str, BackboneFactory]] = {
    name: (model_id, _dinov2) for name, model_id in DINOV2_MODELS.items()
}
_UPSAMPLERS: dict[str, UpsamplerFactory] = {"loftup": _loftup, "bilinear": _bilinear}


def register_backbone(name: str, model_id: str, factory: BackboneFactory) -> None:
    """Make ``name`` usable in specs: ``factory(model_id, revision, hub)`` builds the backbone."""
    if "+" in name:
        raise ValueError(f"backbone names cannot contain '+': {name!r}")
    _BACKBONES[name] = (model_id, factory)


def register_upsampler(name: str, factory: UpsamplerFactory) -> None:
    """Make ``name`` usable after the ``+`` of a spec."""
    if "+" in name:
        raise ValueError(f"upsampler names cannot contain '+': {name!r}")
    _UPSAMPLERS[name] = factory


def available_backbones() -> list[str]:
    """Registered backbone names (any DINOv2 Hub id or local directory also works)."""
    return sorted(_BACKBONES)


def available_upsamplers() -> list[str]:
    """Registered upsampler names."""
    return sorted(_UPSAMPLERS)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"<backbone>+<upsampler>"``; without a known ``+<upsampler>`` suffix: LoftUp.

    Only the last ``+`` counts and only if a registered upsampler follows, so local paths
    containing ``+`` still work.
    """
    backbone, sep, upsampler = spec.rpartition("+")
    if sep and upsampler in _UPSAMPLERS:
        if not backbone:
            raise ValueError(f"spec {spec!r} names no backbone, e.g. {DEFAULT_SPEC!r}")
        return backbone, upsampler
    if sep and not Path(spec).exists():
        raise ValueError(
            f"unknown upsampler {upsampler!r} in spec {spec!r}; known: {available_upsamplers()}"
        )
    return spec, "loftup"


def make_extractor(
    spec: str = DEFAULT_SPEC,
    *,
    revision: str | None = None,
    upsampler_weights: str | Path | None = None,
    upsampler_revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    device: str | torch.device | None = None,
    query_chunk_size: int | None = DEFAULT_QUERY_CHUNK,
    per_image: bool = True,
) -> UpsampledFeatureExtractor:
    """Build the per-pixel feature extractor named by ``spec`` (e.g. ``"dinov2-small+loftup"``).

    ``revision`` pins the backbone repo, ``upsampler_revision`` the upsampler's; weights for
    LoftUp default to the official checkpoint of the backbone and can be overridden with
    ``upsampler_weights`` (a Hub repo id, a directory or a ``pytorch_model.bin``).
    """
    backbone_name, upsampler_name = parse_spec(spec)
    hub = HubOptions(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    model_id, backbone_factory = _BACKBONES.get(backbone_name, (backbone_name, _dinov2))
    backbone = backbone_factory(model_id, revision, hub)
    upsampler = _UPSAMPLERS[upsampler_name](
        UpsamplerRequest(
            backbone_id=model_id,
            backbone=backbone,
            weights=None if upsampler_weights is None else str(upsampler_weights),
            revision=upsampler_revision,
            hub=hub,
            query_chunk_size=query_chunk_size,
            per_image=per_image,
        )
    )
    extractor = UpsampledFeatureExtractor(backbone, upsampler)
    if device is not None:
        extractor = extractor.to(device)
    return extractor.eval()


__all__ = [
    "DEFAULT_DINOV2",
    "DEFAULT_SPEC",
    "DINOV2_MODELS",
    "LOFTUP_FOR_BACKBONE",
    "BackboneFactory",
    "HubOptions",
    "UpsamplerFactory",
    "UpsamplerRequest",
    "available_backbones",
    "available_upsamplers",
    "make_extractor",
    "parse_spec",
    "register_backbone",
    "register_upsampler",
]
