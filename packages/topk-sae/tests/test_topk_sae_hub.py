"""Serialization: strict, pickle-free save/load, Hub ids (offline) and push_to_hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from topk_sae import BiasFreeTopKSAE
from topk_sae import hub as hub_module


def _model() -> BiasFreeTopKSAE:
    torch.manual_seed(0)
    model = BiasFreeTopKSAE(6, 20, 3, input_scale=7.5)
    with torch.no_grad():
        model.W_enc.add_(torch.randn_like(model.W_enc))
    return model


def test_round_trip_is_exact_and_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    model.save_pretrained(tmp_path, metadata={"layer": "layer4"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["d_in"] == 6 and config["n_latents"] == 20 and config["k"] == 3
    assert config["metadata"] == {"layer": "layer4"}
    assert "input scale" in (tmp_path / "README.md").read_text()

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = BiasFreeTopKSAE.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert float(loaded.input_scale) == 7.5
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x).recon, model(x).recon, rtol=0, atol=0)


def test_config_that_does_not_match_the_weights_is_rejected(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_latents"] = 24
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"'W_dec' has shape \(20, 6\) but the config implies \(24, 6\)"
    ):
        BiasFreeTopKSAE.from_pretrained(tmp_path)


def test_missing_or_extra_tensors_are_rejected(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, "b_dec": torch.zeros(6)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['b_dec'\]"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)
    del tensors["input_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['input_scale'\]"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)


def test_bad_config_and_bad_scale_are_rejected(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "jumprelu"}))
    with pytest.raises(ValueError, match="model_type='jumprelu'"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "k": 30}))
    with pytest.raises(ValueError, match="k=30 must be <= n_latents=20"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, "input_scale": torch.tensor(-1.0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="input_scale must be positive"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hub"):
        BiasFreeTopKSAE.from_pretrained(tmp_path / "nope" / "deeper")


def test_hub_id_downloads_config_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "snapshot")
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None, **_: Any) -> str:
        calls.append((repo_id, filename, revision))
        return str(tmp_path / "snapshot" / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = BiasFreeTopKSAE.from_pretrained("someone/fact-sae", revision="v1")
    assert sorted(calls) == [
        ("someone/fact-sae", "config.json", "v1"),
        ("someone/fact-sae", "model.safetensors", "v1"),
    ]
    assert torch.equal(loaded.W_enc, model.W_enc)


def test_push_to_hub_uploads_a_loadable_folder(tmp_path: Path) -> None:
    class FakeApi:
        def __init__(self) -> None:
            self.created: dict[str, Any] = {}
            self.uploaded: list[str] = []

        def create_repo(self, **kwargs: Any) -> None:
            self.created = kwargs

        def upload_folder(self, *, repo_id: str, folder_path: str, **_: Any) -> str:
            self.uploaded = sorted(p.name for p in Path(folder_path).iterdir())
            BiasFreeTopKSAE.from_pretrained(folder_path)  # what was uploaded loads strictly
            return f"https://huggingface.co/{repo_id}/commit/abc"

    api = FakeApi()
    url = hub_module.push_to_hub(_model(), "me/sae", private=True, api=api)
    assert url.endswith("/commit/abc")
    assert api.created["repo_id"] == "me/sae" and api.created["private"] is True
    assert api.uploaded == ["README.md", "config.json", "model.safetensors"]
