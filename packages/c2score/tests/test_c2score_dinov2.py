"""DINOv2 patch features: token bookkeeping (CLS, registers), normalisation, sizes, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

from c2score.features import Dinov2PatchFeatures, PatchBackbone

TINY = {
    "image_size": 28,
    "patch_size": 14,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "layer_norm_eps": 1e-6,
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _save(Dinov2Model(Dinov2Config(**TINY)), tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def reg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    config = Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
    return _save(Dinov2WithRegistersModel(config), tmp_path_factory.mktemp("dinov2reg"))


def _hf_tokens(model_dir: Path, cls: type, pixels: torch.Tensor) -> torch.Tensor:
    """Oracle: the HF model itself on hand-normalised pixels, all output tokens."""
    model = cls.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(pixel_values=(pixels - MEAN) / STD).last_hidden_state


def _grid(tokens_BND: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens_BND.reshape(tokens_BND.shape[0], h, w, -1).permute(0, 3, 1, 2)


def _hf_patches(model_dir: Path, cls: type, pixels: torch.Tensor, skip: int) -> torch.Tensor:
    tokens = _hf_tokens(model_dir, cls, pixels)
    return _grid(tokens[:, skip:], pixels.shape[2] // 14, pixels.shape[3] // 14)


@pytest.mark.parametrize(
    ("fixture", "cls", "registers"),
    [("plain_dir", Dinov2Model, 0), ("reg_dir", Dinov2WithRegistersModel, 4)],
)
def test_patch_tokens_after_cls_and_registers(fixture, cls, registers, request) -> None:
    model_dir = request.getfixturevalue(fixture)
    backbone = Dinov2PatchFeatures.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(backbone, PatchBackbone)
    assert isinstance(backbone.model, cls)
    assert backbone.num_register_tokens == registers
    assert (backbone.dim, backbone.patch_size) == (32, 14)
    images = torch.rand(2, 3, 56, 42, generator=torch.Generator().manual_seed(2))
    feats = backbone(images)
    assert feats.shape == (2, 32, 4, 3) and feats.dtype == torch.float32
    tokens = _hf_tokens(model_dir, cls, images)
    assert tokens.shape[1] == 1 + registers + 4 * 3
    torch.testing.assert_close(feats, _grid(tokens[:, 1 + registers :], 4, 3), rtol=1e-5, atol=1e-5)
    if registers:  # forgetting the registers would shift the grid by 4 tokens
        assert not torch.allclose(feats, _grid(tokens[:, 1:13], 4, 3), atol=1e-2)


def test_features_are_layer_normed_patch_tokens(plain_dir: Path) -> None:
    """``last_hidden_state`` carries the final LayerNorm: each token has ~zero mean before affine."""
    backbone = Dinov2PatchFeatures.from_pretrained(plain_dir)
    ln = backbone.model.layernorm
    feats = backbone(torch.rand(1, 3, 28, 28))
    raw = (feats.permute(0, 2, 3, 1) - ln.bias) / ln.weight
    torch.testing.assert_close(raw.mean(-1), torch.zeros(1, 2, 2), atol=1e-4, rtol=0)


def test_non_multiple_size_is_resized_to_the_nearest_multiple(plain_dir: Path) -> None:
    backbone = Dinov2PatchFeatures.from_pretrained(plain_dir)
    images = torch.rand(1, 3, 60, 50)  # 60/14 = 4.3 -> 4 patches, 50/14 = 3.6 -> 4 patches
    assert backbone.grid_size(60, 50) == (4, 4)
    feats = backbone(images)
    resized = F.interpolate(images, size=(56, 56), mode="bilinear", antialias=True)
    expected = _hf_patches(plain_dir, Dinov2Model, resized, skip=1)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert backbone.grid_size(14, 20) == (1, 1)
    assert backbone.grid_size(21, 224) == (2, 16)


def test_image_smaller_than_a_patch_is_refused(plain_dir: Path) -> None:
    backbone = Dinov2PatchFeatures.from_pretrained(plain_dir)
    with pytest.raises(
        ValueError, match=r"13x40 pixels is smaller than one DINOv2 patch \(14x14\)"
    ):
        backbone(torch.rand(1, 3, 13, 40))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(3, 28, 28), r"\(B, 3, H, W\)"),
        (torch.rand(1, 1, 28, 28), r"\(B, 3, H, W\)"),
        (torch.rand(1, 4, 28, 28), r"\(B, 3, H, W\)"),
        ((255 * torch.rand(1, 3, 28, 28)).to(torch.uint8), "floating point"),
        (255 * torch.rand(1, 3, 28, 28), r"\[0, 1\]"),
        ((torch.rand(1, 3, 28, 28) - MEAN) / STD, r"\[0, 1\]"),
        (torch.full((1, 3, 28, 28), float("nan")), "NaN"),
    ],
)
def test_bad_images_are_refused(plain_dir: Path, images: torch.Tensor, match: str) -> None:
    backbone = Dinov2PatchFeatures.from_pretrained(plain_dir)
    with pytest.raises(ValueError, match=match):
        backbone(images)


def test_task_checkpoint_loads_its_backbone(tmp_path: Path, plain_dir: Path) -> None:
    torch.manual_seed(3)
    clf = Dinov2ForImageClassification(Dinov2Config(**TINY, num_labels=3))
    clf.save_pretrained(tmp_path)
    backbone = Dinov2PatchFeatures.from_pretrained(tmp_path)
    for name, p in clf.dinov2.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], p), name


def test_non_dinov2_checkpoint_is_refused(tmp_path: Path) -> None:
    ViTModel(
        ViTConfig(
            image_size=28,
            patch_size=14,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit' model; expected a DINOv2 checkpoint"):
        Dinov2PatchFeatures.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="Dinov2Model"):
        Dinov2PatchFeatures(ViTModel.from_pretrained(tmp_path))
