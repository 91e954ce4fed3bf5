"""Official checkpoint loader: hashes, safe loading, clear errors, cache, safetensors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from bcos_layers import pretrained as P


def _tiny_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.linear.weight": torch.randn(4, 6, 3, 3, generator=g),
        "bn1.weight": torch.rand(4, generator=g),
        "bn1.running_var": torch.rand(4, generator=g) + 0.5,
        "bn1.num_batches_tracked": torch.tensor(7),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_hashed(obj: object, directory: Path, stem: str = "tiny") -> Path:
    """torch.save ``obj`` and name the file ``<stem>-<sha256[:10]>.pth`` like the release."""
    tmp = directory / f"{stem}.tmp"
    torch.save(obj, tmp)
    final = directory / f"{stem}-{_sha(tmp)[:10]}.pth"
    tmp.rename(final)
    return final


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- table


def test_official_table_is_consistent() -> None:
    for name, ckpt in P.OFFICIAL_CHECKPOINTS.items():
        assert ckpt.name == name
        assert ckpt.url == (
            "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights/" + ckpt.filename
        )
        assert ckpt.filename.endswith(f"-{ckpt.sha256_prefix}.pth")
        assert len(ckpt.sha256_prefix) == 10
        assert ckpt.resize_size == (232 if name.endswith("_long") else 256)
        assert ckpt.arch == name.removesuffix("_long")
    assert not set(P.OFFICIAL_CHECKPOINTS) & set(P.NOT_PORTED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.OFFICIAL_CHECKPOINTS["resnet50"].url = "x"  # type: ignore[misc]


def _official_entrypoints(bcos_oracle, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Every B-cos entrypoint of bcos 0.1.3 -> its URL and test transform, read off the oracle
    by calling the entrypoint with its model factory replaced (nothing is built or downloaded)."""
    pretrained = bcos_oracle("bcos.models.pretrained")
    Experiment = bcos_oracle("bcos.experiments.utils").Experiment
    seen: dict[str, tuple[str, str]] = {}

    def record(exp: str, *args: object, base_network: str = "bcos_final", **kw: object):
        return exp, base_network

    monkeypatch.setattr(pretrained, "_get_model", record)
    names = pretrained.list_available()
    assert sum(n.startswith("standard_") for n in names) == 8  # as NOT_PORTED's docstring says
    for name in names:
        if not name.startswith("standard_"):  # the non-B-cos baselines are out of scope
            seen[name] = getattr(pretrained, name)(pretrained=True)
    out = {}
    for name, (exp, base) in seen.items():
        test_tf = Experiment("ImageNet", base, exp).config["data"]["test_transform"]
        top1 = re.search(r"Acc@1\s*\|\s*([0-9.]+)%", getattr(pretrained, name).__doc__)
        out[name] = {
            "url": pretrained.URLS[base][exp],
            "resize": test_tf.resize.size,
            "crop": test_tf.center_crop.size,
            "top1": float(top1.group(1)),
        }
    return out


def test_every_official_bcos_checkpoint_is_registered_with_url_hash_and_transform(
    bcos_oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table against the oracle: same entrypoint names, URLs (so file names and SHA-256
    prefixes), eval resize and crop, reported top-1; the only B-cos releases left out are the
    documented ones. The registry, created models and transforms use the same resize."""
    from bcos_layers.models import create
    from bcos_layers.transforms import transform_for

    official = _official_entrypoints(bcos_oracle, monkeypatch)
    assert set(official) == set(P.OFFICIAL_CHECKPOINTS) | set(P.NOT_PORTED)
    assert len(P.OFFICIAL_CHECKPOINTS) == 21
    for name, info in official.items():
        if name in P.NOT_PORTED:
            assert info["url"].endswith("/" + P.NOT_PORTED[name])
            continue
        ckpt = P.OFFICIAL_CHECKPOINTS[name]
        assert ckpt.url == info["url"], name
        assert ckpt.resize_size == info["resize"], name
        assert tuple(info["crop"]) in ((224,), (224, 224)), name
        assert ckpt.top1 == info["top1"], name
        assert ckpt.filename == info["url"].rsplit("/", 1)[1]
        assert ckpt.filename.removesuffix(".pth").endswith("-" + ckpt.sha256_prefix)
        with torch.device("meta"):
            cfg = create(name).pretrained_cfg
        assert (cfg.resize_size, cfg.crop_size) == (info["resize"], 224), name
        resize, crop = transform_for(name).transforms[1:3]
        assert (resize.size, crop.size) == (info["resize"], (224, 224)), name
    for name in ("convnext_tiny", "vgg11_bnu"):
        for call in (P.official_checkpoint, create):
            with pytest.raises(ValueError, match=rf"'{name}'.*does not implement its architecture"):
                call(name)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match=r"resnet50_long"):
        P.load_official_state_dict("resnet51")


# --------------------------------------------------------------------------- local files


def test_local_file_with_hash_in_name_loads_exactly(tmp_path: Path) -> None:
    state = _tiny_state()
    path = _save_hashed(state, tmp_path)
    with pytest.warns(UserWarning, match="not the official 'resnet50' release file"):
        loaded = P.load_official_state_dict("resnet50", file=path)
    _assert_same(loaded, state)
    assert all(v.device.type == "cpu" for v in loaded.values())


def test_wrong_hash_in_name_is_rejected_with_file_and_digests(tmp_path: Path) -> None:
    path = tmp_path / "resnet_50-ead259efe4.pth"  # the official name, but other content
    torch.save(_tiny_state(), path)
    with pytest.raises(P.CheckpointHashError) as info:
        P.load_official_state_dict("resnet50", file=path)
    msg = str(info.value)
    assert str(path) in msg and "ead259efe4" in msg and _sha(path) in msg
    assert "'-ead259efe4' in the file name" in msg


def test_truncated_file_is_reported_as_truncated(tmp_path: Path) -> None:
    path = _save_hashed(_tiny_state(), tmp_path)
    data = path.read_bytes()
    # Truncated under its original name: the hash catches it.
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(P.CheckpointHashError, match=path.name):
        P.load_official_state_dict("resnet50", file=path)
    # Truncated and renamed to match (or not hash-checked): torch.load fails -> clear error.
    half = data[: len(data) // 2]
    renamed = tmp_path / f"trunc-{hashlib.sha256(half).hexdigest()[:10]}.pth"
    renamed.write_bytes(half)
    with pytest.raises(P.CheckpointError, match="truncated or corrupt") as info:
        P.load_official_state_dict("resnet50", file=renamed)
    assert str(renamed) in str(info.value)
    with pytest.raises(P.CheckpointError, match="truncated or corrupt"):
        P.load_official_state_dict("resnet50", file=path, check_hash=False)


class _Evil:
    """Unpickling this would create a marker file: weights_only must never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_object_is_rejected_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _save_hashed({"weight": torch.zeros(2), "evil": _Evil(str(marker))}, tmp_path)
    with pytest.raises(P.CheckpointError, match="refusing to load") as info:
        P.load_official_state_dict("resnet50", file=path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # The oracle: a full unpickle would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"weight": torch.zeros(2), "step": 3}, r"non-tensor values \('step': int\)"),
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"state_dict": {"model.w": torch.zeros(1)}, "epoch": 1}, "training checkpoint"),
        ({1: torch.zeros(1)}, "non-string keys"),
    ],
)
def test_not_a_dict_of_tensors(tmp_path: Path, obj: object, match: str) -> None:
    path = _save_hashed(obj, tmp_path)
    with pytest.raises(P.CheckpointError, match=match):
        P.load_official_state_dict("densenet121", file=path)


def test_file_without_hash_needs_explicit_decision(tmp_path: Path) -> None:
    state = _tiny_state()
    path = tmp_path / "my_weights.pth"
    torch.save(state, path)
    with pytest.raises(P.CheckpointError, match=r"sha256=.*check_hash=False"):
        P.load_official_state_dict("resnet50", file=path)
    with pytest.warns(UserWarning):
        _assert_same(P.load_official_state_dict("resnet50", file=path, sha256=_sha(path)), state)
    with pytest.warns(UserWarning):
        _assert_same(
            P.load_official_state_dict("resnet50", file=path, sha256=_sha(path)[:12].upper()),
            state,
        )
    _assert_same(P.load_official_state_dict("resnet50", file=path, check_hash=False), state)
    with pytest.raises(P.CheckpointHashError):
        P.load_official_state_dict("resnet50", file=path, sha256="0" * 64)
    with pytest.raises(ValueError, match="hexadecimal"):
        P.load_official_state_dict("resnet50", file=path, sha256="xyz")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope-0123456789\.pth"):
        P.load_official_state_dict("resnet50", file=tmp_path / "nope-0123456789.pth")


# --------------------------------------------------------------------------- download + cache


@pytest.fixture
def fake_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point 'resnet50' at a file:// URL of a tiny state dict; cache under TORCH_HOME."""
    src_dir = tmp_path / "release"
    src_dir.mkdir()
    state = _tiny_state()
    src = _save_hashed(state, src_dir, "resnet_50")
    sha = src.name.removesuffix(".pth").rsplit("-", 1)[1]
    fake = dataclasses.replace(
        P.OFFICIAL_CHECKPOINTS["resnet50"], url=src.as_uri(), filename=src.name, sha256_prefix=sha
    )
    monkeypatch.setitem(P.OFFICIAL_CHECKPOINTS, "resnet50", fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return state, src, fake


def test_cache_dir_honours_torch_home(fake_release, tmp_path: Path) -> None:
    assert P.checkpoint_dir() == tmp_path / "torch_home" / "hub" / "checkpoints"
    assert P.checkpoint_dir(tmp_path / "x") == tmp_path / "x"


def test_download_then_cache(fake_release, tmp_path: Path) -> None:
    state, src, fake = fake_release
    loaded = P.load_official_state_dict("resnet50", progress=False)
    _assert_same(loaded, state)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / fake.filename
    assert cached.read_bytes() == src.read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == [fake.filename]  # no temp files left
    release = src.read_bytes()
    src.unlink()  # the second load must come from the cache
    _assert_same(P.load_official_state_dict("resnet50", progress=False), state)
    # A corrupted cache file is detected, and force=True downloads again.
    cached.write_bytes(release[:-10])
    with pytest.raises(P.CheckpointHashError, match=r"(?s)cache.*force=True") as info:
        P.load_official_state_dict("resnet50", progress=False)
    assert str(cached) in str(info.value)
    src.write_bytes(release)
    assert P.download_official("resnet50", progress=False, force=True) == cached
    assert cached.read_bytes() == release


def test_download_and_conversion_are_crash_safe(fake_release, tmp_path: Path, write_log) -> None:
    """Cache file and converted files: data fsynced, os.replace'd into place, directory fsynced
    (bcos_layers.fileio); nothing else is left in the directories."""
    _, src, fake = fake_release
    cached = P.download_official("resnet50", progress=False)
    write_log.assert_durable(cached)
    assert cached.read_bytes() == src.read_bytes()
    assert os.listdir(cached.parent) == [fake.filename]
    out = P.convert_to_safetensors(src, tmp_path / "st", arch="resnet50")
    for name in ("model.safetensors", "config.json"):
        write_log.assert_durable(out / name)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_download_with_bad_hash_leaves_nothing(fake_release, tmp_path: Path, monkeypatch) -> None:
    _, _, fake = fake_release
    bad = dataclasses.replace(fake, sha256_prefix="0123456789")
    monkeypatch.setitem(P.OFFICIAL_CHECKPOINTS, "resnet50", bad)
    with pytest.raises(P.CheckpointHashError, match="0123456789"):
        P.load_official_state_dict("resnet50", progress=False)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_download_failure_suggests_local_file(fake_release, tmp_path: Path, monkeypatch) -> None:
    _, _, fake = fake_release
    gone = dataclasses.replace(fake, url=(tmp_path / "missing.pth").as_uri())
    monkeypatch.setitem(P.OFFICIAL_CHECKPOINTS, "resnet50", gone)
    with pytest.raises(P.CheckpointError, match="file=<path>"):
        P.load_official_state_dict("resnet50", progress=False)


def test_hash_arguments_only_for_local_files() -> None:
    with pytest.raises(ValueError, match="local file"):
        P.load_official_state_dict("resnet50", sha256="0" * 10)
    with pytest.raises(ValueError, match="local file"):
        P.load_official_state_dict("resnet50", check_hash=False)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(tmp_path: Path) -> None:
    state = _tiny_state()
    path = _save_hashed(state, tmp_path)
    out = P.convert_to_safetensors(path, tmp_path / "st", arch="resnet50")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "resnet50" and config["source_sha256"] == _sha(path)
    loaded = P.load_safetensors_checkpoint(out)
    assert loaded.arch == "resnet50"
    _assert_same(loaded.state_dict, state)
    _assert_same(P.load_safetensors_checkpoint(out / "model.safetensors").state_dict, state)
    with pytest.raises(P.CheckpointError, match="not 'densenet121'"):
        P.load_safetensors_checkpoint(out, arch="densenet121")


def test_convert_needs_arch_unless_release_name(tmp_path: Path) -> None:
    path = _save_hashed(_tiny_state(), tmp_path)
    with pytest.raises(ValueError, match="arch="):
        P.convert_to_safetensors(path, tmp_path / "st")
    with pytest.raises(FileNotFoundError, match="neither an official checkpoint name"):
        P.convert_to_safetensors(tmp_path / "nothing.pth", tmp_path / "st")


def test_convert_official_name_uses_cache(fake_release, tmp_path: Path) -> None:
    state, _, fake = fake_release
    out = P.convert_to_safetensors("resnet50", tmp_path / "st", progress=False)
    loaded = P.load_safetensors_checkpoint(out, arch="resnet50")
    _assert_same(loaded.state_dict, state)
    assert loaded.config["checkpoint"] == "resnet50" and loaded.config["source"] == fake.url
    with pytest.raises(ValueError, match="holds 'resnet50' weights"):
        P.convert_to_safetensors("resnet50", tmp_path / "st2", arch="densenet121")


def test_official_loader_accepts_converted_checkpoints(tmp_path: Path) -> None:
    state = _tiny_state()
    out = P.convert_to_safetensors(_save_hashed(state, tmp_path), tmp_path / "st", arch="resnet50")
    _assert_same(P.load_official_state_dict("resnet50_long", file=out), state)
    _assert_same(P.load_official_state_dict("resnet50", file=out / "model.safetensors"), state)
    with pytest.raises(P.CheckpointError, match="for architecture 'resnet50', not 'densenet121'"):
        P.load_official_state_dict("densenet121", file=out)


def test_safetensors_loader_is_strict(tmp_path: Path) -> None:
    out = P.convert_to_safetensors(
        _save_hashed(_tiny_state(), tmp_path), tmp_path / "st", arch="resnet50"
    )
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "arch": "densenet121"}))
    with pytest.raises(P.CheckpointError, match="written for arch 'resnet50'"):
        P.load_safetensors_checkpoint(out)
    config_path.write_text(json.dumps({"arch": "resnet50"}))
    with pytest.raises(P.CheckpointError, match="not a bcos-layers checkpoint config"):
        P.load_safetensors_checkpoint(out)
    config_path.write_text(json.dumps(config))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(P.CheckpointError, match="truncated"):
        P.load_safetensors_checkpoint(out)
    config_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        P.load_safetensors_checkpoint(out)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert P.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(c.url in listed for c in P.OFFICIAL_CHECKPOINTS.values())
    path = _save_hashed(_tiny_state(), tmp_path)
    assert P.main(["convert", str(path), str(tmp_path / "cli"), "--arch", "densenet121"]) == 0
    assert P.load_safetensors_checkpoint(tmp_path / "cli").arch == "densenet121"


# --------------------------------------------------------------------------- online (opt-in)


@pytest.mark.skipif(
    os.environ.get("FACT_ONLINE_TESTS") != "1", reason="downloads ~32 MB; set FACT_ONLINE_TESTS=1"
)
def test_online_download_real_checkpoint(bcos_oracle) -> None:
    """The real release file: download (or cache), hash, strict load, same logits as bcos."""
    official = bcos_oracle("bcos.models.pretrained")

    from bcos_layers.models import create

    state = P.load_official_state_dict("densenet121")
    assert len(state) == 605
    assert state["features.conv0.linear.weight"].shape == (64, 6, 7, 7)
    assert state["classifier.linear.weight"].shape == (1000, 1024, 1, 1)
    ours = create("densenet121", pretrained=True)
    theirs = official.densenet121(pretrained=False).eval()
    theirs.load_state_dict(state, strict=True)
    rgb = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([rgb, 1 - rgb], 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- with the model zoo


def _randomized_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every float entry randomized (so defaults cannot pass as loaded)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v + seed
        for k, v in model.state_dict().items()
    }


def test_official_arch_round_trips_through_create(tmp_path: Path) -> None:
    from bcos_layers.models import create

    state = _randomized_state(create("densenet121"), seed=1)
    path = _save_hashed(state, tmp_path, "densenet_121_finetuned")
    with pytest.warns(UserWarning, match="not the official 'densenet121' release file"):
        model = create("densenet121", pretrained=path)
    _assert_same(model.state_dict(), state)
    # The same weights via safetensors.
    out = P.convert_to_safetensors(path, tmp_path / "st", arch="densenet121")
    loaded = P.load_safetensors_checkpoint(out, arch="densenet121")
    again = create(loaded.arch, pretrained=out / "model.safetensors")
    _assert_same(again.state_dict(), state)


def test_tiny_model_round_trips_through_create(tmp_path: Path) -> None:
    from bcos_layers.models import create

    state = _randomized_state(create("tiny_resnet"), seed=2)
    path = _save_hashed(state, tmp_path, "tiny_resnet")
    _assert_same(create("tiny_resnet", pretrained=path).state_dict(), state)


def test_other_architecture_is_rejected_and_nothing_is_loaded(tmp_path: Path) -> None:
    from bcos_layers.models import BasicBlock, BcosResNet, create, load_state_dict_strict

    # A deeper tiny ResNet: every key of tiny_resnet is present with the same shape, plus more.
    # torch's own strict load would copy the shared keys before raising; ours must not.
    bigger = BcosResNet(BasicBlock, [2, 1, 1, 1], inplanes=8, num_classes=10)
    path = _save_hashed(_randomized_state(bigger, seed=3), tmp_path, "bigger")
    state = P.load_state_dict_file(path)[0]
    model = create("tiny_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): \['layer1\.1\.") as info:
        load_state_dict_strict(model, state, source=str(path))
    assert str(path) in str(info.value)
    _assert_same(model.state_dict(), before)
    # A DenseNet state dict for a ResNet: missing and unexpected keys are both listed.
    dense = _save_hashed(_randomized_state(create("tiny_densenet"), seed=4), tmp_path, "dense")
    with pytest.raises(ValueError, match=r"(?s)missing keys.*conv1\.linear\.weight.*unexpected"):
        create("tiny_resnet", pretrained=dense)


def test_a_newly_registered_official_model_loads_through_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create("vitc_ti_patch1_14", pretrained=True): its registered entry downloads (here from a
    file:// stand-in of the release, same entry otherwise), verifies and loads strictly."""
    from bcos_layers.models import create
    from bcos_layers.transforms import transform_for

    name = "vitc_ti_patch1_14"
    state = _randomized_state(create(name), seed=3)
    (tmp_path / "release").mkdir()
    src = _save_hashed(state, tmp_path / "release", "bcos_vitc_ti_patch1_14")
    sha = src.name.removesuffix(".pth").rsplit("-", 1)[1]
    entry = P.OFFICIAL_CHECKPOINTS[name]
    assert entry.filename == "bcos_vitc_ti_patch1_14-ddd6193a77.pth"
    fake = dataclasses.replace(entry, url=src.as_uri(), filename=src.name, sha256_prefix=sha)
    monkeypatch.setitem(P.OFFICIAL_CHECKPOINTS, name, fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    model = create(name, pretrained=True)
    _assert_same(model.state_dict(), state)
    assert model.pretrained_cfg.source == "official"
    assert model.pretrained_cfg.resize_size == 256
    assert transform_for(name).transforms[1].size == 256
