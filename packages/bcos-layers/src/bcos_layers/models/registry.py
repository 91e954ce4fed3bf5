"""Model registry: ``create("resnet50", pretrained=True)`` like timm / torch.hub.

Every entry builds the architecture of the official B-cos-v2 entrypoint of the same name. With
``pretrained`` the official weights (or a local file) are loaded **strictly**: keys and shapes are
validated against the model before any tensor is copied, so a mismatch raises a clear error and
leaves the model untouched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bcos_layers.models.densenet import BcosDenseNet
from bcos_layers.models.resnet import BasicBlock, BcosResNet, Bottleneck
from bcos_layers.models.vit import build_vitc

__all__ = [
    "OFFICIAL_LOGIT_BIAS",
    "ModelInfo",
    "PretrainedCfg",
    "create",
    "list_models",
    "load_state_dict_strict",
]


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry.

    Attributes:
        name: registry name (= official entrypoint name where one exists).
        builder: ``builder(**kwargs) -> nn.Module``.
        resize_size: eval resize before the 224 center crop (232 for ``_long``, else 256).
        description: one line for :func:`list_models` users.
    """

    name: str
    builder: Callable[..., nn.Module]
    resize_size: int
    description: str


@dataclass(frozen=True)
class PretrainedCfg:
    """What a model was built as; attached to every created model as ``model.pretrained_cfg``.

    Attributes:
        name: registry name.
        resize_size: eval resize (Resize → CenterCrop(crop_size) → [0,1] → AddInverse).
        crop_size: eval center crop.
        source: ``None`` (random init), ``"official"`` or the path of the loaded file.
    """

    name: str
    resize_size: int
    crop_size: int = 224
    source: str | None = None


def _resnet(block: type, layers: list[int], **kw: object) -> nn.Module:
    return BcosResNet(block, layers, **kw)  # type: ignore[arg-type]


_REGISTRY: dict[str, ModelInfo] = {}


def _register(name: str, builder: Callable[..., nn.Module], description: str, resize: int = 256):
    _REGISTRY[name] = ModelInfo(name, builder, resize, description)


# The B-cos-v2 ImageNet models (official entrypoint names and hyperparameters, bcos 0.1.3
# ``models/pretrained.py`` + ``experiments/ImageNet/*/experiment_parameters.py``).
for _n, _block, _layers, _kw in [
    ("resnet18", BasicBlock, [2, 2, 2, 2], {}),
    ("resnet34", BasicBlock, [3, 4, 6, 3], {}),
    ("resnet50", Bottleneck, [3, 4, 6, 3], {}),
    ("resnet101", Bottleneck, [3, 4, 23, 3], {}),
    ("resnet152", Bottleneck, [3, 8, 36, 3], {}),
    ("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
]:
    _register(_n, partial(_resnet, _block, _layers, **_kw), f"B-cos {_n} (B-cos-v2 layout)")
for _n, _layers in [("resnet50", [3, 4, 6, 3]), ("resnet152", [3, 8, 36, 3])]:
    _register(
        f"{_n}_long",
        partial(_resnet, Bottleneck, _layers, stochastic_depth_prob=0.1),
        f"B-cos {_n}, long schedule (stochastic depth 0.1; checkpoint bcos_final_long)",
        resize=232,
    )
for _n, _growth, _blocks, _init in [
    ("densenet121", 32, (6, 12, 24, 16), 64),
    ("densenet161", 48, (6, 12, 36, 24), 96),
    ("densenet169", 32, (6, 12, 32, 32), 64),
    ("densenet201", 32, (6, 12, 48, 32), 64),
]:
    _register(
        _n,
        partial(BcosDenseNet, growth_rate=_growth, block_config=_blocks, num_init_features=_init),
        f"B-cos DenseNet-{_n[8:]} (B-cos-v2 layout)",
    )
_register(
    "densenet121_long",
    BcosDenseNet,
    "B-cos DenseNet-121, long schedule (checkpoint bcos_final_long)",
    resize=232,
)
# ViTs: (dim, depth, heads, mlp_dim) of Ti/S/B/L; the ViTc models trade one encoder (L: of 14)
# for the conv stem and see 14x14 tokens of a x16 stem, the Simple ViTs 16x16 patches.
_VIT_SIZES = {"ti": (192, 12, 3, 768), "s": (384, 12, 6, 1536), "b": (768, 12, 12, 3072),
              "l": (1024, 14, 16, 4096)}  # fmt: skip
_VITC_STEMS = {"ti": (24, 48, 96, 192), "s": (48, 96, 192, 384),
               "b": (64, 128, 128, 256, 256, 512), "l": (64, 128, 128, 256, 256, 512)}  # fmt: skip
for _size, (_dim, _depth, _heads, _mlp) in _VIT_SIZES.items():
    _vit = {"dim": _dim, "heads": _heads, "mlp_dim": _mlp}
    _register(
        f"vitc_{_size}_patch1_14",
        partial(build_vitc, depth=_depth - 1, conv_stem=_VITC_STEMS[_size], **_vit),
        f"B-cos ViTc-{_size.upper()}: conv stem (x16) + {_depth - 1} encoders, 14x14 tokens",
    )
    _register(
        f"simple_vit_{_size}_patch16_224",
        partial(build_vitc, depth=_depth, conv_stem=None, patch_size=16, **_vit),
        f"B-cos Simple ViT-{_size.upper()}: 16x16 patches + {_depth} encoders",
    )
_register(
    "tiny_resnet",
    partial(_resnet, BasicBlock, [1, 1, 1, 1], inplanes=8, num_classes=10),
    "tiny B-cos ResNet for tests (BasicBlock [1,1,1,1], width 8, 10 classes)",
)
_register(
    "tiny_resnet_bottleneck",
    partial(_resnet, Bottleneck, [1, 1, 1, 1], inplanes=8, num_classes=10),
    "tiny B-cos ResNet for tests (Bottleneck [1,1,1,1], width 8, 10 classes)",
)
_register(
    "tiny_densenet",
    partial(
        BcosDenseNet,
        growth_rate=8,
        block_config=(2, 2, 2, 2),
        num_init_features=16,
        bn_size=2,
        num_classes=10,
    ),
    "tiny B-cos DenseNet for tests (growth 8, blocks (2,2,2,2), 10 classes)",
)
_register(
    "tiny_vitc",
    partial(
        build_vitc, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64, conv_stem=(12, 24, 32)
    ),
    "tiny B-cos ViTc for tests (stem x8, dim 32, 2 encoders, 10 classes)",
)


def list_models() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, but validated first.

    Raises ``ValueError`` listing missing keys, unexpected keys and shape mismatches (naming
    ``source``) before anything is copied, so a failed load leaves the model unchanged.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if missing or unexpected or shapes or not_tensors:

        def fmt(title: str, items: list[str]) -> str:
            more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
            return f"\n  {title} ({len(items)}): {items[:10]}{more}" if items else ""

        raise ValueError(
            f"{source} does not match {type(model).__name__} (is it for another architecture?)"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("shape mismatches", shapes)
            + fmt("non-tensor values", not_tensors)
            + "\nNothing was loaded."
        )
    model.load_state_dict(state_dict, strict=True)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    from safetensors.torch import load_file

    return load_file(str(path))


OFFICIAL_LOGIT_BIAS: float = -math.log(1000 - 1)
"""``-log(999) = -6.907``: the logit bias of every official B-cos-v2 ImageNet entrypoint, which
takes it from its ImageNet config whatever ``num_classes`` is passed."""


def create(
    name: str,
    *,
    pretrained: bool | str | os.PathLike[str] = False,
    official_logit_bias: bool = False,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model (in eval mode) and optionally load weights strictly.

    The logit bias defaults to ``-log(num_classes - 1)`` (a zero pre-bias output then has
    sigmoid ``1/C``, B-cos-v2's uniform prior), for any ``num_classes``; an explicit
    ``logit_bias=`` (``0.0`` included) is used as given. The official entrypoints differ:
    ``bcos.models.pretrained.resnet50(num_classes=10)`` keeps the ImageNet ``-log(999)``, their
    CNNs turn ``logit_bias=0.0`` into ``-log(num_classes - 1)`` and their ViTs ignore
    ``logit_bias``. ``official_logit_bias=True`` gives the official model's bias
    (:data:`OFFICIAL_LOGIT_BIAS`) for any ``num_classes``, e.g. to rebuild a model fine-tuned
    with the official code.

    Args:
        name: one of :func:`list_models`.
        pretrained: ``False`` (random init), ``True`` (official B-cos-v2 checkpoint of ``name``,
            downloaded and hash-checked by :mod:`bcos_layers.pretrained`), or a local path. For
            official names the path goes through
            :func:`bcos_layers.pretrained.load_official_state_dict` (``.pth`` with the SHA-256
            prefix in its name, or a converted safetensors checkpoint of the same architecture).
            For other names: a converted directory, a plain ``.safetensors`` file, or a
            ``torch.save``'d state dict (loaded with ``weights_only=True``).
        official_logit_bias: use the official entrypoints' ``-log(999)`` instead of
            ``-log(num_classes - 1)`` (see above); only for the official models, and not
            together with ``logit_bias=``.
        **kwargs: constructor overrides (e.g. ``num_classes``, ``logit_bias``); with
            ``pretrained`` the strict load reports any resulting mismatch with the checkpoint.

    Returns the model in eval mode (explanations need eval-mode norms), with
    ``model.pretrained_cfg`` (:class:`PretrainedCfg`) attached.
    """
    if name not in _REGISTRY:
        from bcos_layers.pretrained import NOT_PORTED, official_checkpoint

        if name in NOT_PORTED:
            official_checkpoint(name)  # raises: released, but the architecture is not ported
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    info = _REGISTRY[name]
    if official_logit_bias:
        from bcos_layers.pretrained import OFFICIAL_CHECKPOINTS

        if name not in OFFICIAL_CHECKPOINTS:
            raise ValueError(
                f"official_logit_bias=True: {name!r} has no official counterpart; "
                "pass logit_bias=... instead"
            )
        if "logit_bias" in kwargs:
            raise ValueError(
                "pass either official_logit_bias=True or logit_bias=..., not both "
                f"(official_logit_bias means logit_bias={OFFICIAL_LOGIT_BIAS!r})"
            )
        kwargs["logit_bias"] = OFFICIAL_LOGIT_BIAS
    model = info.builder(**kwargs)
    source: str | None = None
    resize = info.resize_size
    if pretrained is not False and pretrained is not None:
        from bcos_layers import pretrained as official

        if pretrained is True:
            if name not in official.OFFICIAL_CHECKPOINTS:
                raise ValueError(
                    f"no official checkpoint for {name!r}; official ones: "
                    f"{', '.join(sorted(official.OFFICIAL_CHECKPOINTS))}. Pass a file path instead."
                )
            state = official.load_official_state_dict(name)
            source = "official"
            resize = official.OFFICIAL_CHECKPOINTS[name].resize_size
        else:
            path = Path(pretrained).expanduser()
            if name in official.OFFICIAL_CHECKPOINTS:  # hash / architecture checked there
                state = official.load_official_state_dict(name, file=path)
            elif path.is_dir():  # written by bcos_layers.pretrained.convert_to_safetensors
                state = official.load_safetensors_checkpoint(path, arch=name).state_dict
            elif path.suffix == ".safetensors":
                state = _read_safetensors(path)
            else:  # our own models: a safe weights_only load, no hash convention
                state, _ = official.load_state_dict_file(path, check_hash=False)
            source = str(path)
        load_state_dict_strict(model, state, source=f"checkpoint {source!r} for {name!r}")
    model.pretrained_cfg = PretrainedCfg(name=name, resize_size=resize, source=source)
    return model.eval()
