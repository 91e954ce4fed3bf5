"""Inputs: activation tables, stored attribution maps, image decoding and folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from c2score import (
    ActivationTable,
    ImageFolder,
    StoredAttributions,
    load_activation_table,
    save_activation_table,
)
from c2score.io import ImageLoadError, pil_to_tensor, to_rgb_tensor


def test_activation_tables_round_trip(tmp_path: Path) -> None:
    dense = torch.rand(5, 3)
    save_activation_table(ActivationTable.from_dense(dense), tmp_path / "d.safetensors")
    assert torch.equal(load_activation_table(tmp_path / "d.safetensors").dense, dense)
    sp = ActivationTable.from_sparse(
        torch.tensor([0, 4]), torch.tensor([2, 1]), torch.tensor([0.5, 2.0]), (5, 3)
    )
    save_activation_table(sp, tmp_path / "s.safetensors")
    back = load_activation_table(tmp_path / "s.safetensors")
    assert (back.n_images, back.n_concepts) == (5, 3) and torch.equal(back.values, sp.values)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="activation table needs"):
        load_activation_table(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_activation_table(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="float"):
        ActivationTable.from_dense(torch.ones(2, 2, dtype=torch.long))


def test_stored_attributions_by_pair_and_dense(tmp_path: Path) -> None:
    maps = torch.rand(4, 5, 6)
    save_file(
        {
            "image_index": torch.tensor([3, 0, 3, 1]),
            "concept_index": torch.tensor([2, 7, 0, 2]),
            "maps": maps,
        },
        str(tmp_path / "p.safetensors"),
    )
    st = StoredAttributions(tmp_path / "p.safetensors")
    got = st(3, torch.tensor([0, 2]))
    assert torch.equal(got, maps[[2, 0]])
    miss = st.missing(torch.tensor([3, 3, 2, 0, 0]), torch.tensor([2, 1, 2, 7, 9]))
    assert miss.tolist() == [False, True, True, False, True]
    dense = torch.rand(3, 2, 4, 4)
    save_file({"maps": dense}, str(tmp_path / "d.safetensors"))
    sd = StoredAttributions(tmp_path / "d.safetensors")
    assert torch.equal(sd(1, torch.tensor([1, 0])), dense[1, [1, 0]])
    save_file(
        {
            "image_index": torch.tensor([0, 0]),
            "concept_index": torch.tensor([1, 1]),
            "maps": torch.rand(2, 3, 3),
        },
        str(tmp_path / "dup.safetensors"),
    )
    with pytest.raises(ValueError, match="twice"):
        StoredAttributions(tmp_path / "dup.safetensors")


def test_image_modes_are_converted_to_rgb_in_unit_range() -> None:
    gray = Image.fromarray(np.full((4, 5), 255, np.uint8), "L")
    t = pil_to_tensor(gray)
    assert t.shape == (3, 4, 5) and float(t.min()) == 1.0
    rgba = Image.fromarray(
        np.dstack([np.full((4, 5, 3), 51, np.uint8), np.zeros((4, 5), np.uint8)]), "RGBA"
    )
    assert torch.allclose(pil_to_tensor(rgba), torch.full((3, 4, 5), 0.2))  # alpha dropped
    deep = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))  # 16-bit grayscale
    assert deep.mode.startswith("I")
    assert pil_to_tensor(deep)[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-4)
    pal = Image.fromarray(np.zeros((3, 3), np.uint8), "L").convert("P")
    assert pil_to_tensor(pal).shape == (3, 3, 3)
    assert to_rgb_tensor(torch.full((1, 2, 2), 255, dtype=torch.uint8)).shape == (3, 2, 2)
    assert to_rgb_tensor(torch.rand(4, 2, 2)).shape == (3, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_tensor(torch.full((3, 2, 2), 3.0))
    with pytest.raises(ValueError, match="C, H, W"):
        to_rgb_tensor(torch.rand(2, 2, 2))


def test_image_folder_orders_by_relative_path_and_flags_broken_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/x.png", "a.png", "c.JPG"):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(
            tmp_path / name, format="PNG" if name.endswith("png") else "JPEG"
        )
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    folder = ImageFolder(tmp_path, resize=16, crop=16)
    assert [p.relative_to(tmp_path).as_posix() for p in folder.files] == [
        "a.png",
        "b/x.png",
        "broken.png",
        "c.JPG",
    ]
    assert folder[0].shape == (3, 16, 16)
    with pytest.raises(ImageLoadError, match="unreadable_image"):
        folder[2]
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path / "b" / ".." / "b", extensions=(".gif",))


def test_pil_preprocessing_is_the_authors_torchvision_transform(tmp_path: Path) -> None:
    """Resize(256) + CenterCrop(224) on the 8-bit PIL image, ToTensor, Normalize: bit for bit."""
    from torchvision import transforms as T

    from c2score.features import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize
    from c2score.io import preprocess_pil

    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 417)[None, :, None] * np.linspace(0.2, 1, 300)[:, None, None]
    arr = np.clip(smooth + rng.normal(0, 20, (300, 417, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "b_gray.png")  # grayscale: converted to RGB
    authors = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    folder = ImageFolder(tmp_path, resize=256, crop=224, preprocessing="pil")
    for i, name in enumerate(("a.png", "b_gray.png")):
        with Image.open(tmp_path / name) as im:
            expected = authors(im.convert("RGB"))  # torchvision's default loader converts
            assert torch.equal(preprocess_pil(im, 256, 224), folder[i])
        assert folder[i].shape == (3, 224, 224)
        assert torch.equal(imagenet_normalize(folder[i][None])[0], expected)
    # the default float pipeline is another one (resize after conversion to float)
    assert not torch.equal(ImageFolder(tmp_path, resize=256, crop=224)[0], folder[0])
    with pytest.raises(ValueError, match="preprocessing must be 'float' or 'pil'"):
        ImageFolder(tmp_path, preprocessing="PIL")  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match="smaller_than_crop"):
        ImageFolder(tmp_path, crop=301, preprocessing="pil")[0]
