"""The B-cos-v2 model zoo (official key layout: ResNets, ResNeXt, DenseNets, ViTs), test models."""

from bcos_layers.models._base import BcosModelMixin, check_image_batch
from bcos_layers.models.densenet import BcosDenseNet
from bcos_layers.models.registry import (
    OFFICIAL_LOGIT_BIAS,
    ModelInfo,
    PretrainedCfg,
    create,
    list_models,
    load_state_dict_strict,
)
from bcos_layers.models.resnet import BasicBlock, BcosResNet, Bottleneck
from bcos_layers.models.vit import BcosViTClassifier, SimpleViT, build_vitc

__all__ = [
    "OFFICIAL_LOGIT_BIAS",
    "BasicBlock",
    "BcosDenseNet",
    "BcosModelMixin",
    "BcosResNet",
    "BcosViTClassifier",
    "Bottleneck",
    "ModelInfo",
    "PretrainedCfg",
    "SimpleViT",
    "build_vitc",
    "check_image_batch",
    "create",
    "list_models",
    "load_state_dict_strict",
]
