"""Eval transforms: identical to the official B-cos-v2 presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bcos_layers.pretrained import OFFICIAL_CHECKPOINTS
from bcos_layers.transforms import eval_transform, transform_for

# registry name -> (bcos base experiment, experiment name) of the official entrypoint
OFFICIAL_EXPERIMENTS = {
    "resnet50": ("bcos_final", "resnet_50"),
    "resnet50_long": ("bcos_final_long", "resnet_50"),
    "densenet121": ("bcos_final", "densenet_121"),
    "densenet121_long": ("bcos_final_long", "densenet_121"),
    "vitc_s_patch1_14": ("vit_final", "bcos_vitc_s_patch1_14"),
}


def _image(width: int = 301, height: int = 257, seed: int = 0) -> Image.Image:
    """A non-square image with smooth structure and noise (resampling must be exact)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1) * 200
    arr = np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


# one per distinct (family, eval resize); every checkpoint's resize is checked against the
# oracle in test_bcos_layers_pretrained.py
@pytest.mark.parametrize("name", sorted(OFFICIAL_EXPERIMENTS))
def test_transform_for_matches_official_config(name: str, bcos_oracle) -> None:
    Experiment = bcos_oracle("bcos.experiments.utils").Experiment

    base, exp = OFFICIAL_EXPERIMENTS[name]
    official = Experiment("ImageNet", base, exp).config["data"]["test_transform"]
    assert official.resize.size == OFFICIAL_CHECKPOINTS[name].resize_size
    for seed, (w, h) in enumerate([(301, 257), (224, 400), (500, 240)]):
        img = _image(w, h, seed)
        ours, theirs = transform_for(name)(img), official(img)
        assert ours.shape == (6, 224, 224) and ours.dtype == torch.float32
        assert torch.equal(ours, theirs)


def test_eval_transform_content() -> None:
    img = _image()
    x = eval_transform(256)(img)
    assert torch.equal(x[3:], 1 - x[:3])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # With resize == crop == the image's shorter side, only the centre crop and scaling remain.
    square = _image(224, 224)
    y = eval_transform(224, 224)(square)
    expected = torch.from_numpy(np.array(square)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(y[:3], expected, rtol=0, atol=1e-7)


def test_non_rgb_images_become_rgb() -> None:
    gray = _image().convert("L")
    x = eval_transform()(gray)
    assert x.shape == (6, 224, 224)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    rgba = _image().convert("RGBA")
    assert torch.equal(eval_transform()(rgba), eval_transform()(_image()))


def test_resize_override_and_bad_input() -> None:
    img = _image()
    assert torch.equal(
        transform_for("resnet50_long", resize_size=256)(img), transform_for("resnet50")(img)
    )
    with pytest.raises(ValueError, match="available"):
        transform_for("resnet51")
    with pytest.raises(ValueError, match="does not implement its architecture"):
        transform_for("convnext_tiny")
    with pytest.raises(ValueError, match="crop_size <= resize_size"):
        eval_transform(200, 224)
    with pytest.raises(TypeError, match="PIL image"):
        eval_transform()(torch.zeros(3, 256, 256))
