"""Crash-safe writes: every file the package writes goes through one atomic helper (unique
temporary file, fsync, os.replace, directory fsync); corrupt files are named in the error."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from topk_sae import BiasFreeTopKSAE, TensorSource, TrainConfig, fileio, train
from topk_sae.store import FeatureStoreWriter
from topk_sae.sweep import sweep

Event = tuple[str, str, str]


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Record every fsync (with the path of its file descriptor), os.replace and os.rename."""
    if not sys.platform.startswith("linux"):
        pytest.skip("resolves file descriptors through /proc/self/fd")
    events: list[Event] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def check_durable_replaces(events: list[Event], root: Path) -> set[str]:
    """Every replace under ``root``: a uniquely named temporary file in the destination's
    directory, fsynced before, the directory fsynced after; every rename (checkpoint
    directories) likewise. Returns the names of the files written. Replaces elsewhere are not
    ours (Python's import system writes ``__pycache__`` files with ``os.replace`` when a module
    is first imported during the test, as in a fresh environment)."""
    written = set()
    root_s = str(root.resolve())
    for i, (kind, src, dst) in enumerate(events):
        if kind == "fsync" or not os.path.realpath(dst).startswith(root_s + os.sep):
            continue
        before = [path for k, path, _ in events[:i] if k == "fsync"]
        after = [path for k, path, _ in events[i + 1 :] if k == "fsync"]
        assert os.path.dirname(src) == os.path.dirname(dst), (src, dst)
        if kind == "replace":
            name = os.path.basename(dst)
            written.add(name)
            tmp = os.path.basename(src)
            assert tmp.startswith(f".{name}.") and tmp != f".{name}.tmp", tmp  # mkstemp's name
            assert src in before, f"{dst} was not fsynced before os.replace"
        assert os.path.dirname(dst) in after, f"directory of {dst} not fsynced after {kind}"
    return written


def test_every_writer_is_atomic_and_durable(tmp_path: Path, syscalls: list[Event]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    with FeatureStoreWriter(tmp_path / "store", d_in=6, shard_rows=40) as writer:
        writer.append(x)
    cfg = TrainConfig(n_latents=8, k=2, epochs=1, checkpoint_every=1, progress=False)
    sweep(cfg, TensorSource(x, batch_size=32), x, out_dir=tmp_path / "sweep", k=[2],
          n_latents=[8], lr=[1e-3], progress=False)  # fmt: skip
    written = check_durable_replaces(syscalls, tmp_path)
    on_disk = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk <= written, f"written without the atomic helper: {on_disk - written}"
    assert {"manifest.json", "shard-000001.safetensors", "sweep.json", "history.json",
            "latest.json", "state.json", "optimizer.safetensors", "trainer.safetensors",
            "model.safetensors", "config.json", "README.md"} <= on_disk  # fmt: skip
    assert any(kind == "rename" for kind, _, _ in syscalls)  # checkpoint directories
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no leftovers


def test_atomic_write_keeps_the_old_file_on_error_and_sets_normal_permissions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.json"
    fileio.atomic_write_json(path, {"v": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~fileio._UMASK  # not mkstemp's 0o600
    path.chmod(0o640)

    def fail(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fileio.atomic_write(path, fail)
    assert fileio.read_json(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    fileio.atomic_write_json(path, {"v": 2})
    assert fileio.read_json(path) == {"v": 2}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced file keeps its mode


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_corrupt_checkpoint_file_is_named(tmp_path: Path, name: str) -> None:
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(n_latents=8, k=2, epochs=1, checkpoint_every=1, progress=False)
    train(cfg, TensorSource(x, batch_size=32), out_dir=tmp_path)
    (latest,) = (tmp_path / "checkpoints").glob("step-*")
    _truncate(latest / name)
    with pytest.raises(ValueError, match=rf"{latest / name}.*truncated or corrupt"):
        train(cfg, TensorSource(x, batch_size=32), out_dir=tmp_path)


def test_corrupt_saved_model_files_are_named(tmp_path: Path) -> None:
    BiasFreeTopKSAE(6, 8, 2).save_pretrained(tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)
    BiasFreeTopKSAE(6, 8, 2).save_pretrained(tmp_path)
    _truncate(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        BiasFreeTopKSAE.from_pretrained(tmp_path)
