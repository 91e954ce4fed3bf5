"""DINOv2 patch features: token bookkeeping (CLS, registers), normalisation, sizes, bad input."""

from __future__ import annotations

import copy
import math
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
    # token bookkeeping against the transformers model itself, so with its interpolation rule
    # (the official one is tested against an official-architecture reference below)
    backbone = Dinov2PatchFeatures.from_pretrained(
        model_dir, local_files_only=True, pos_interpolation="transformers"
    )
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
    backbone = Dinov2PatchFeatures.from_pretrained(plain_dir, pos_interpolation="transformers")
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


# --------------------------------------------------------------------------------------------
# Independent reference: the official DINOv2 ViT forward (facebookresearch/dinov2,
# vision_transformer.py), restated in plain torch from the published architecture: stride-p
# patch convolution, [CLS] + patches + interpolated position embeddings, registers inserted
# after the position embeddings, pre-norm blocks with LayerScale, final LayerNorm. Position
# embeddings of the pretrained M x M grid are resized bicubically; the non-register releases
# pass scale_factor = ((h + 0.1) / M, (w + 0.1) / M) without antialiasing, the register
# releases size = (h, w) with antialiasing; both interpolate in float32. Weights are read from
# the transformers model.
# --------------------------------------------------------------------------------------------


def official_pos_embed(
    pos_1TD: torch.Tensor, h: int, w: int, *, offset: float, antialias: bool
) -> torch.Tensor:
    n = pos_1TD.shape[1] - 1
    m = math.isqrt(n)
    if n == h * w and h == w:
        return pos_1TD
    grid = pos_1TD[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # float32, as official
    if offset:  # the scale factor, not the size, fixes the sampling positions
        grid = F.interpolate(
            grid,
            scale_factor=((h + offset) / m, (w + offset) / m),
            mode="bicubic",
            antialias=antialias,
        )
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    assert grid.shape[-2:] == (h, w)
    grid = grid.to(pos_1TD.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([pos_1TD[:, :1], grid], dim=1)


def official_patch_tokens(
    model: torch.nn.Module, x: torch.Tensor, *, offset: float, antialias: bool
) -> torch.Tensor:
    """Patch tokens (B, D, h, w) of normalised images ``x`` through the official forward."""
    sd, cfg = model.state_dict(), model.config
    p, d, heads = cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads
    eps = cfg.layer_norm_eps
    b, h, w = x.shape[0], x.shape[2] // p, x.shape[3] // p
    e = "embeddings."
    t = F.conv2d(x, sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"], stride=p)  # fmt: skip
    t = torch.cat([sd[e + "cls_token"].expand(b, 1, d), t.flatten(2).transpose(1, 2)], dim=1)
    t = t + official_pos_embed(sd[e + "position_embeddings"], h, w, offset=offset, antialias=antialias)  # fmt: skip
    n_reg = 0
    if e + "register_tokens" in sd:
        n_reg = sd[e + "register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd[e + "register_tokens"].expand(b, n_reg, d), t[:, 1:]], dim=1)

    def lin(name: str, v: torch.Tensor) -> torch.Tensor:
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def ln(name: str, v: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(v, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)

    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        y = ln(pre + "norm1", t)
        q, k, v = (
            lin(pre + f"attention.{n}_proj", y).view(b, -1, heads, d // heads).transpose(1, 2)
            for n in "qkv"
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        y = lin(pre + "attention.o_proj", att.transpose(1, 2).reshape(b, -1, d))
        t = t + sd[pre + "layer_scale1.lambda1"] * y
        y = lin(pre + "mlp.fc2", F.gelu(lin(pre + "mlp.fc1", ln(pre + "norm2", t))))
        t = t + sd[pre + "layer_scale2.lambda1"] * y
    t = ln("layernorm", t)[:, 1 + n_reg :]
    return t.reshape(b, h, w, d).permute(0, 3, 1, 2)


OFFICIAL = {**TINY, "image_size": 518}  # 37 x 37 pretrained positions, as the released models


def _random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (rough position embeddings, LayerScale and norm gains too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_gain = name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight"))
            p.copy_(1 + 0.2 * noise if is_gain else 0.3 * noise)
    return model.double().eval()


SIZES = [(224, 224), (224, 308), (98, 140), (518, 518)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_plain_dinov2_interpolates_position_embeddings_like_the_official_model(
    height: int, width: int
) -> None:
    model = _random_weights(Dinov2Model(Dinov2Config(**OFFICIAL)), seed=4)
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(5))
    x = ((images - MEAN) / STD).double()
    with torch.no_grad():
        official = official_patch_tokens(model, x, offset=0.1, antialias=False)
        size_rule = official_patch_tokens(model, x, offset=0.0, antialias=False)
    backbone = Dinov2PatchFeatures(copy.deepcopy(model))
    assert backbone.pos_interpolation == "official"
    # float64 model; the extractor returns float32 features, hence the float32 tolerance
    torch.testing.assert_close(backbone(images), official.float(), rtol=1e-5, atol=1e-5)
    hf_rule = Dinov2PatchFeatures(copy.deepcopy(model), pos_interpolation="transformers")
    torch.testing.assert_close(hf_rule(images), size_rule.float(), rtol=1e-5, atol=1e-5)
    rel = (size_rule - official).norm() / official.norm()
    if (height, width) == (518, 518):  # the pretrained grid itself: nothing is interpolated
        assert float(rel) == 0.0
    else:  # transformers' size=(h, w) rule really gives other features (~1 % here)
        assert float(rel) > 1e-3


@pytest.mark.parametrize(("height", "width"), SIZES[:2])
def test_register_dinov2_keeps_the_official_size_rule(height: int, width: int) -> None:
    config = Dinov2WithRegistersConfig(**OFFICIAL, num_register_tokens=4)
    model = _random_weights(Dinov2WithRegistersModel(config), seed=6)
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        official = official_patch_tokens(
            model, ((images - MEAN) / STD).double(), offset=0.0, antialias=True
        )
    for rule in ("official", "transformers"):  # the same for the register releases
        backbone = Dinov2PatchFeatures(copy.deepcopy(model), pos_interpolation=rule)
        torch.testing.assert_close(backbone(images), official.float(), rtol=1e-5, atol=1e-5)


def test_unknown_interpolation_rule_is_refused(plain_dir: Path) -> None:
    with pytest.raises(ValueError, match="pos_interpolation must be 'official' or 'transformers'"):
        Dinov2PatchFeatures.from_pretrained(plain_dir, pos_interpolation="bilinear")
