"""Serialization: strict, pickle-free save/load, validated config and weights, loading from a
real (offline) huggingface_hub cache, and push_to_hub's commit arguments."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import CommitInfo
from safetensors.torch import load_file, save_file

from topk_sae import BiasFreeTopKSAE

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _model() -> BiasFreeTopKSAE:
    torch.manual_seed(0)
    model = BiasFreeTopKSAE(6, 20, 3, input_scale=7.5)
    with torch.no_grad():
        model.W_enc.add_(torch.randn_like(model.W_enc))
    return model


def put_in_hub_cache(
    cache: Path, repo_id: str, folder: Path, *, commit: str = COMMIT, subfolder: str = ""
) -> None:
    """Lay ``folder``'s files out as ``huggingface_hub`` caches a download: content-addressed
    blobs (sha256 for LFS files such as safetensors, git blob sha1 otherwise), symlinks to them
    in ``snapshots/<commit>/``, and ``refs/main`` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        link = repo / "snapshots" / commit / subfolder / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache with 'someone/sae-v1.5' (a dot in the name): main, an older commit, a subfolder."""
    root = tmp_path / "hub"
    model = _model()
    model.save_pretrained(tmp_path / "old")
    put_in_hub_cache(root, "someone/sae-v1.5", tmp_path / "old", commit=OTHER_COMMIT)
    with torch.no_grad():
        model.W_enc.mul_(2.0)
    model.save_pretrained(tmp_path / "new")
    put_in_hub_cache(root, "someone/sae-v1.5", tmp_path / "new")
    put_in_hub_cache(root, "someone/sae-v1.5", tmp_path / "new", subfolder="layer4")
    return root


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


def test_loads_from_a_real_offline_hub_cache(tmp_path: Path, cache: Path) -> None:
    kwargs: dict[str, Any] = {"cache_dir": cache, "local_files_only": True}
    new = BiasFreeTopKSAE.from_pretrained(tmp_path / "new")
    old = BiasFreeTopKSAE.from_pretrained(tmp_path / "old")
    main = BiasFreeTopKSAE.from_pretrained("someone/sae-v1.5", **kwargs)
    assert torch.equal(main.W_enc, new.W_enc)
    pinned = BiasFreeTopKSAE.from_pretrained("someone/sae-v1.5", revision=OTHER_COMMIT, **kwargs)
    assert torch.equal(pinned.W_enc, old.W_enc)
    sub = BiasFreeTopKSAE.from_pretrained("someone/sae-v1.5", subfolder="layer4", **kwargs)
    assert torch.equal(sub.W_enc, new.W_enc)
    with pytest.raises(FileNotFoundError, match=r"someone/sae-v2.*not found"):
        BiasFreeTopKSAE.from_pretrained("someone/sae-v2", **kwargs)
    with pytest.raises(FileNotFoundError, match=r"revision f{40}\) not found"):
        BiasFreeTopKSAE.from_pretrained("someone/sae-v1.5", revision="f" * 40, **kwargs)
    with pytest.raises(FileNotFoundError, match=r"layer3/config\.json .* not found"):
        BiasFreeTopKSAE.from_pretrained("someone/sae-v1.5", subfolder="layer3", **kwargs)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1")
def test_hf_hub_offline_reads_the_cache(cache: Path) -> None:
    model = BiasFreeTopKSAE.from_pretrained("someone/sae-v1.5", cache_dir=cache)
    assert model.n_latents == 20


def test_from_pretrained_builds_the_calling_class(tmp_path: Path, cache: Path) -> None:
    class MySAE(BiasFreeTopKSAE):
        pass

    _model().save_pretrained(tmp_path / "dir")
    assert type(MySAE.from_pretrained(tmp_path / "dir")) is MySAE
    hub = MySAE.from_pretrained("someone/sae-v1.5", cache_dir=cache, local_files_only=True)
    assert type(hub) is MySAE


def test_model_methods_take_and_forward_every_hub_argument(cache: Path) -> None:
    import inspect

    from topk_sae import hub

    for method, function in (
        (BiasFreeTopKSAE.from_pretrained, hub.from_pretrained),
        (BiasFreeTopKSAE.push_to_hub, hub.push_to_hub),
    ):
        own = list(inspect.signature(method).parameters.values())
        free = list(inspect.signature(function).parameters.values())[1:]  # less cls / model
        assert [(p.name, p.kind, p.default) for p in own if p.name != "self"] == [
            (p.name, p.kind, p.default) for p in free
        ]
    # force_download reaches hf_hub_download (which refuses it together with the cache only)
    with pytest.raises(ValueError, match="force_download"):
        BiasFreeTopKSAE.from_pretrained(
            "someone/sae-v1.5", cache_dir=cache, local_files_only=True, force_download=True
        )
    meta = BiasFreeTopKSAE.from_pretrained(
        "someone/sae-v1.5", cache_dir=cache, local_files_only=True, map_location="meta"
    )
    assert meta.W_enc.device.type == "meta"


def test_missing_local_directories_are_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    for missing in (
        str(tmp_path / "nope" / "deeper"),  # absolute
        "runs/sae--layer4",  # one slash but no valid repo id (before: HFValidationError)
        "./sae-v1.5",
        Path("someone/sae"),  # a Path is always local
    ):
        with pytest.raises(FileNotFoundError, match=r"local directory .* not found"):
            BiasFreeTopKSAE.from_pretrained(missing, local_files_only=True)
    _model().save_pretrained(tmp_path / "runs" / "sae-v1.5")  # a local dir wins over the Hub
    assert BiasFreeTopKSAE.from_pretrained("runs/sae-v1.5").n_latents == 20
    with pytest.raises(FileNotFoundError, match="is a file, not a model directory"):
        BiasFreeTopKSAE.from_pretrained(tmp_path / "runs" / "sae-v1.5" / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a directory written by save_pretrained"):
        BiasFreeTopKSAE.from_pretrained(tmp_path / "empty")


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != ...}))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"k": 2.9}, r"field 'k' must be a JSON integer, got 2\.9 \(float\)"),
        ({"k": "2"}, r"field 'k' must be a JSON integer, got '2' \(str\)"),
        ({"k": 3.0}, r"field 'k' must be a JSON integer, got 3\.0"),
        ({"d_in": True}, r"field 'd_in' must be a JSON integer, got True \(bool\)"),
        ({"metadata": []}, r"field 'metadata' must be a JSON object"),
        ({"b_dec": False}, r"unknown config.json fields \['b_dec'\]"),
        ({"k": ...}, r"config.json lacks the fields \['k'\]"),
        ({"k": 30}, r"config\.json: k=30 must be <= n_latents=20"),
        ({"k": 0}, r"config\.json: k must be a positive integer"),
        ({"model_type": "jumprelu"}, "model_type='jumprelu'"),
        ({"format_version": 2}, "unsupported format_version 2"),
    ],
)
def test_config_is_validated_field_by_field(tmp_path: Path, changes: dict, match: str) -> None:
    _model().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        BiasFreeTopKSAE.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights_is_rejected(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path)
    _edit_config(tmp_path, n_latents=24)
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


def _nan_in_dec(t: dict[str, torch.Tensor]) -> None:
    t["W_dec"][3, 1] = float("nan")


def _long_atom(t: dict[str, torch.Tensor]) -> None:
    t["W_dec"][5] *= 3.0


def _slightly_long_atom(t: dict[str, torch.Tensor]) -> None:
    t["W_dec"][5] *= 1.01


def _inf_in_enc(t: dict[str, torch.Tensor]) -> None:
    t["W_enc"][0, 0] = float("inf")


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_nan_in_dec, r"tensor 'W_dec' holds 1 NaN/Inf entries"),
        (_inf_in_enc, r"tensor 'W_enc' holds 1 NaN/Inf entries"),
        (_long_atom, r"atom 5 \(row of W_dec\) has norm 3,.* unit vectors"),
        (_slightly_long_atom, r"atom 5 \(row of W_dec\) has norm 1\.01"),
        (lambda t: t.update(input_scale=torch.tensor(-1.0)), "input_scale must be positive"),
        (lambda t: t.update(input_scale=torch.tensor(0.0)), "input_scale must be positive"),
        (
            lambda t: t.update(input_scale=torch.tensor(float("inf"))),
            "tensor 'input_scale' holds 1 NaN",
        ),
    ],
)
def test_weights_are_checked(tmp_path: Path, corrupt: Any, match: str) -> None:
    _model().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    corrupt(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {match}"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)


def test_atoms_saved_in_half_precision_load(tmp_path: Path) -> None:
    model = BiasFreeTopKSAE(256, 64, 4)
    model.save_pretrained(tmp_path)
    half = {k: v.half() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    save_file(half, str(tmp_path / "model.safetensors"))
    loaded = BiasFreeTopKSAE.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.W_dec, model.W_dec, rtol=1e-3, atol=1e-3)


class RecordingApi:
    """Stands in for ``HfApi`` (no network in tests): records what push_to_hub passes on and
    checks that the folder it uploads loads strictly."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.uploaded: list[str] = []

    def create_repo(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs: Any) -> CommitInfo:
        self.calls.append(("upload_folder", (), kwargs))
        self.uploaded = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        BiasFreeTopKSAE.from_pretrained(kwargs["folder_path"])  # what is uploaded loads
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'a' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description=kwargs["commit_description"] or "",
            oid="a" * 40,
            pr_url=None,
        )


def test_push_to_hub_passes_branch_pr_and_message_and_returns_the_commit_info() -> None:
    api = RecordingApi()
    info = _model().push_to_hub(
        "me/sae-v1.5",
        private=True,
        token="hf_x",
        branch="layer4",
        create_pr=True,
        commit_message="SAE for layer4",
        commit_description="k=3",
        api=api,
    )
    assert isinstance(info, CommitInfo) and info.oid == "a" * 40
    assert info.commit_message == "SAE for layer4"
    (_, args, repo), (_, bargs, branch), (_, _, upload) = api.calls
    assert (args, repo) == (
        ("me/sae-v1.5",),
        {"token": "hf_x", "private": True, "repo_type": "model", "exist_ok": True},
    )
    assert bargs == ("me/sae-v1.5",) and branch["branch"] == "layer4" and branch["exist_ok"]
    assert upload["repo_id"] == "me/sae-v1.5" and upload["revision"] == "layer4"
    assert upload["create_pr"] is True and upload["token"] == "hf_x"
    assert upload["commit_message"] == "SAE for layer4"
    assert upload["commit_description"] == "k=3"
    assert api.uploaded == ["README.md", "config.json", "model.safetensors"]
    default = RecordingApi()
    _model().push_to_hub("me/sae", api=default)
    assert [name for name, _, _ in default.calls] == ["create_repo", "upload_folder"]
    assert default.calls[-1][2]["revision"] is None
    assert default.calls[-1][2]["create_pr"] is False
