"""``fact demo`` pieces that the end-to-end integration test cannot pin down cheaply:
determinism of the B-cos training for a seed, and the refusal to mix runs in one folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fact_model.demo import DemoConfig, _datasets, _prepare_out, train_bcos


def _tiny() -> DemoConfig:
    return DemoConfig(
        world={"image_size": 32},
        n_train=96,
        n_test=24,
        epochs=1,
        batch_size=32,
        backbone_kwargs={"num_classes": 12, "inplanes": 8, "small_inputs": False},
    )


def _transform(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, 1 - x], dim=0)


def test_bcos_training_is_deterministic_for_a_seed() -> None:
    cfg = _tiny()
    train, _ = _datasets(cfg, _transform)
    a = train_bcos(cfg, train, seed=3, device="cpu", progress=False).state_dict()
    b = train_bcos(cfg, train, seed=3, device="cpu", progress=False).state_dict()
    c = train_bcos(cfg, train, seed=4, device="cpu", progress=False).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_output_folder_resumes_same_settings_and_refuses_others(tmp_path: Path) -> None:
    cfg, out = _tiny(), tmp_path / "out"
    _prepare_out(out, cfg, seed=0, overwrite=False)
    (out / "steps").mkdir()
    (out / "steps" / "backbone.json").write_text("{}")
    _prepare_out(out, cfg, seed=0, overwrite=False)  # same settings: resume, nothing removed
    assert (out / "steps" / "backbone.json").is_file()
    with pytest.raises(ValueError, match=r"other settings.*--overwrite"):
        _prepare_out(out, cfg, seed=1, overwrite=False)
    with pytest.raises(ValueError, match="other settings"):
        _prepare_out(out, DemoConfig.fast(), seed=0, overwrite=False)
    assert (out / "steps" / "backbone.json").is_file()
    _prepare_out(out, cfg, seed=1, overwrite=True)  # explicit: start over
    assert not (out / "steps").exists()
    assert json.loads((out / "demo.json").read_text())["seed"] == 1
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo output folder"):
        _prepare_out(stranger, cfg, seed=0, overwrite=False)
    assert (stranger / "thesis.tex").read_text() == "keep me"
