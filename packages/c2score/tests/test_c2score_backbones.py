"""The two-stage extractor, the bilinear upsampler and the ``make_extractor`` registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from c2score.features import (
    BilinearUpsampler,
    Dinov2PatchFeatures,
    LoftUpUpsampler,
    LoftUpWithChannelNorm,
    PixelFeatureExtractor,
    TwoStageFeatureExtractor,
    UpsampledFeatureExtractor,
    Upsampler,
    make_extractor,
    parse_spec,
    register_upsampler,
    registry,
)

DIM = 32
TINY = {
    "image_size": 28,
    "patch_size": 14,
    "hidden_size": DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "layer_norm_eps": 1e-6,
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _loftup_state_dict(dim: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LoftUpWithChannelNorm(dim)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t.copy_(
                torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.2
            )
    return model.state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(root / "dino")
    torch.save(_loftup_state_dict(DIM, 1), root / "loftup.bin")
    torch.save(_loftup_state_dict(36, 2), root / "loftup36.bin")
    return {"dino": root / "dino", "loftup": root / "loftup.bin", "loftup36": root / "loftup36.bin"}


def _put_in_hub_cache(cache: Path, repo_id: str, sources: list[Path]) -> None:
    """Lay files out as ``huggingface_hub`` caches them (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for src in sources:
        shutil.copy(src, snapshot / src.name)


def test_default_spec_resolves_official_repos_offline(tmp_path: Path, files) -> None:
    """'dinov2-small+loftup' -> facebook/dinov2-small + haiwen/loftup-dinov2s, via the Hub cache."""
    cache = tmp_path / "hub"
    _put_in_hub_cache(cache, "facebook/dinov2-small", sorted(files["dino"].iterdir()))
    loftup_file = tmp_path / "pytorch_model.bin"
    shutil.copy(files["loftup"], loftup_file)
    _put_in_hub_cache(cache, "haiwen/loftup-dinov2s", [loftup_file])
    extractor = make_extractor(cache_dir=cache, local_files_only=True)
    pinned = make_extractor(
        cache_dir=cache, local_files_only=True, revision=COMMIT, upsampler_revision=COMMIT
    )
    assert pinned.dim == extractor.dim == DIM
    assert isinstance(extractor.upsampler, LoftUpUpsampler)
    assert isinstance(extractor, PixelFeatureExtractor)
    assert isinstance(extractor, TwoStageFeatureExtractor)
    images = torch.rand(2, 3, 30, 27)
    feats = extractor(images)
    assert feats.shape == (2, DIM, 30, 27) and torch.isfinite(feats).all()
    with pytest.raises(Exception, match=r"(?i)cache|offline|local|not found"):
        make_extractor("dinov2-base+loftup", cache_dir=cache, local_files_only=True)


def test_call_is_lowres_then_upsample(files) -> None:
    extractor = make_extractor(f"{files['dino']}+loftup", upsampler_weights=files["loftup"])
    images = torch.rand(3, 3, 28, 42)
    low = extractor.lowres(images)
    assert low.shape == (3, DIM, 2, 3)
    # Upsampling cached low-res features in another batch composition gives the same result.
    parts = torch.cat(
        [extractor.upsample(low[:1], images[:1]), extractor.upsample(low[1:], images[1:])]
    )
    torch.testing.assert_close(extractor(images), parts, rtol=1e-5, atol=1e-5)
    backbone = Dinov2PatchFeatures.from_pretrained(files["dino"])
    torch.testing.assert_close(low, backbone(images))


def test_bilinear_upsampler_puts_features_at_patch_centres(files) -> None:
    """A feature linear in the patch index interpolates to the pixel's patch coordinate."""
    h, w, p = 3, 4, 14
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, h, w)
    out = BilinearUpsampler()(torch.cat([rows, cols], 1), torch.rand(1, 3, h * p, w * p))
    assert out.shape == (1, 2, h * p, w * p)
    centre = (torch.arange(h * p) + 0.5) / p - 0.5  # pixel centre in patch units
    inner = slice(p // 2, (h - 1) * p + p // 2)  # between the first and last patch centres
    torch.testing.assert_close(out[0, 0, inner, 0], centre[inner])
    ext = make_extractor(f"{files['dino']}+bilinear")
    assert isinstance(ext.upsampler, BilinearUpsampler)
    assert ext(torch.rand(1, 3, 30, 20)).shape == (1, DIM, 30, 20)


def test_spec_parsing() -> None:
    assert parse_spec("dinov2-small+loftup") == ("dinov2-small", "loftup")
    assert parse_spec("dinov2-small+bilinear") == ("dinov2-small", "bilinear")
    assert parse_spec("facebook/dinov2-base") == ("facebook/dinov2-base", "loftup")
    assert parse_spec("/models/a+b/dino+bilinear") == ("/models/a+b/dino", "bilinear")
    with pytest.raises(ValueError, match="unknown upsampler 'anyup'"):
        parse_spec("dinov2-small+anyup")
    with pytest.raises(ValueError, match="names no backbone"):
        parse_spec("+loftup")


def test_loftup_needs_weights_for_an_unknown_backbone(files) -> None:
    with pytest.raises(ValueError, match="no official LoftUp checkpoint is known"):
        make_extractor(f"{files['dino']}+loftup")


def test_dimension_mismatch_between_backbone_and_loftup(files) -> None:
    with pytest.raises(ValueError, match="expects 36-d features but the backbone produces 32-d"):
        make_extractor(f"{files['dino']}+loftup", upsampler_weights=files["loftup36"])


def test_registering_another_upsampler(files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_UPSAMPLERS", dict(registry._UPSAMPLERS))  # undone afterwards

    class Nearest(torch.nn.Module):
        def forward(self, lowres, images):
            return torch.nn.functional.interpolate(lowres, size=images.shape[-2:], mode="nearest")

    register_upsampler("nearest-test", lambda request: Nearest())
    ext = make_extractor(f"{files['dino']}+nearest-test")
    assert isinstance(ext.upsampler, Upsampler)
    images = torch.rand(1, 3, 28, 28)
    out = ext(images)
    torch.testing.assert_close(
        out[:, :, :14, :14], ext.lowres(images)[:, :, :1, :1].expand(-1, -1, 14, 14)
    )


def test_extractor_checks_images(files) -> None:
    ext = UpsampledFeatureExtractor(
        Dinov2PatchFeatures.from_pretrained(files["dino"]), BilinearUpsampler()
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ext(torch.rand(1, 3, 28, 28) * 255)
    with pytest.raises(ValueError, match="smaller than one DINOv2 patch"):
        ext(torch.rand(1, 3, 10, 28))
