"""FaCT save_pretrained / from_pretrained: directories, a real offline Hub cache, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from fact_model_helpers import fact, images

from fact_model import FaCT
from fact_model.hub import push_to_hub


def _same(a: FaCT, b: FaCT) -> None:
    x = images(3, seed=61)
    assert a.layers == b.layers
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """Lay out ``folder`` in a Hub cache the way huggingface_hub writes one: content-addressed
    blobs, ``refs/main`` and a snapshot of relative symlinks."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1), "blobs", blob.name))
    return commit


def test_round_trip_through_a_directory(tmp_path: Path) -> None:
    model = fact("vit")
    model.class_names = [f"class {i}" for i in range(10)]
    out = model.save_pretrained(
        tmp_path / "m", metadata={"evaluation": {model.layers[0]: {"top1": 0.5}}}
    )
    assert {"config.json", "README.md", "backbone.safetensors"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: fact-model") and "50.00" in card
    loaded = FaCT.from_pretrained(out)
    _same(model, loaded)
    assert loaded.class_names == model.class_names and loaded.spec == model.spec


def test_round_trip_through_an_offline_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = fact("resnet", ("layer3",))
    folder = model.save_pretrained(tmp_path / "m")
    commit = _hub_cache(tmp_path / "cache", "someone/fact-resnet.v1.5", folder)
    kw = {"cache_dir": tmp_path / "cache", "local_files_only": True}
    _same(model, FaCT.from_pretrained("someone/fact-resnet.v1.5", **kw))
    _same(model, FaCT.from_pretrained("someone/fact-resnet.v1.5", revision=commit, **kw))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        FaCT.from_pretrained("someone/not-cached", **kw)
    # A model inside a subfolder of a repository.
    nested = tmp_path / "nested"
    shutil.copytree(folder, nested / "resnet" / "layer3")
    _hub_cache(tmp_path / "cache2", "someone/zoo", nested)
    _same(
        model,
        FaCT.from_pretrained(
            "someone/zoo",
            subfolder="resnet/layer3",
            cache_dir=tmp_path / "cache2",
            local_files_only=True,
        ),
    )


def test_bad_files_and_configs_are_refused_clearly(tmp_path: Path) -> None:
    model = fact("densenet", ("features.norm5",))
    out = model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"neither|not an existing directory"):
        FaCT.from_pretrained(tmp_path / "missing" / "dir")
    config = json.loads((out / "config.json").read_text())

    def broken(change: dict, name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(out, d)
        (d / "config.json").write_text(json.dumps({**config, **change}))
        return d

    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        FaCT.from_pretrained(broken({"input_size": "32"}, "a"))
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        FaCT.from_pretrained(broken({"extra": 1}, "b"))
    with pytest.raises(ValueError, match=r"backbone\.official must be true or false"):
        FaCT.from_pretrained(broken({"backbone": {**config["backbone"], "official": "no"}}, "c"))
    with pytest.raises(ValueError, match="must stay inside"):
        FaCT.from_pretrained(
            broken({"layers": [{"name": "features.norm5", "subfolder": "../x"}]}, "d")
        )
    d = broken({}, "e")
    (d / "backbone.safetensors").write_bytes((d / "backbone.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"SHA\-256"):
        FaCT.from_pretrained(d)
    d = broken({}, "f")
    shutil.rmtree(d / "saes")
    with pytest.raises(FileNotFoundError, match="SAE of layer"):
        FaCT.from_pretrained(d)
    d = broken({}, "g")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FaCT.from_pretrained(d)


def test_push_passes_the_standard_arguments(tmp_path: Path) -> None:
    model = fact("resnet", ("layer3",))
    calls: dict = {}

    class Api:
        def create_repo(self, **kw):
            calls["create"] = kw

        def upload_folder(self, **kw):
            calls["upload"] = {
                **kw,
                "files": sorted(p.name for p in Path(kw["folder_path"]).rglob("*")),
            }
            return "commit-info"

    info = push_to_hub(
        model, "me/fact.v2", branch="dev", create_pr=True, commit_message="m", api=Api()
    )
    assert info == "commit-info"
    assert calls["create"]["repo_id"] == "me/fact.v2" and calls["create"]["exist_ok"]
    up = calls["upload"]
    assert (up["revision"], up["create_pr"], up["commit_message"], up["repo_type"]) == (
        "dev",
        True,
        "m",
        "model",
    )
    assert "config.json" in up["files"] and "model.safetensors" in up["files"]
