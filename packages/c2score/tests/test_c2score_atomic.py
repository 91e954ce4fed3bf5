"""Atomic, durable writes: unique temporary file, fsync, os.replace, directory fsync; all writers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from c2score import ActivationTable, EvalConfig, evaluate_c2, save_activation_table
from c2score.io import atomic_path, atomic_save_safetensors, atomic_write_text


class SyncLog:
    """Records every os.fsync (kind of file and inode) and os.replace, in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.events.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
            real_fsync(fd)

        def replace(src: str | Path, dst: str | Path) -> None:
            self.events.append(("replace", os.stat(src).st_ino))
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def synced_files(self) -> set[int]:
        return {ino for kind, ino in self.events if kind == "file"}


@pytest.fixture
def sync_log(monkeypatch: pytest.MonkeyPatch) -> SyncLog:
    return SyncLog(monkeypatch)


def test_file_is_fsynced_replaced_then_its_directory_fsynced(
    tmp_path: Path, sync_log: SyncLog
) -> None:
    path = tmp_path / "report.json"
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    ino, dir_ino = path.stat().st_ino, tmp_path.stat().st_ino
    assert sync_log.events == [("file", ino), ("replace", ino), ("dir", dir_ino)]


def test_temporary_files_are_unique_and_beside_the_target(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    (tmp_path / "state.safetensors.tmp").mkdir()  # the old fixed temporary name is taken
    atomic_save_safetensors({"x": torch.arange(3)}, path)
    assert torch.equal(load_file(str(path))["x"], torch.arange(3))
    with atomic_path(path) as a, atomic_path(path) as b:  # two writers at once
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"  # b finished first, a replaced it: no torn mix
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state.safetensors",
        "state.safetensors.tmp",
    ]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "half \ud800 written")  # fails while writing
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_permissions_follow_the_umask_or_the_replaced_file(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")  # mkstemp alone would give 0600
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644
        old = tmp_path / "old.txt"
        old.write_text("x")
        old.chmod(0o640)
        atomic_write_text(old, "y")
        assert stat.S_IMODE(old.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


class TwoStage:
    """A tiny two-stage extractor (cacheable low-res stage), enough to drive every writer."""

    dim = 4
    patch_size = 2

    def lowres(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1)[:, :, ::2, ::2]

    def upsample(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(low, size=x.shape[-2:], mode="nearest")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.lowres(x), x)


def test_every_writer_of_the_package_is_atomic(tmp_path: Path, sync_log: SyncLog) -> None:
    g = torch.Generator().manual_seed(0)
    n = 24
    images = [torch.rand(3, 8, 8, generator=g) for _ in range(n)]
    acts = torch.rand(n, 3, generator=g)
    maps = torch.rand(n, 3, 8, 8, generator=g)
    save_activation_table(ActivationTable.from_dense(acts), tmp_path / "acts.safetensors")
    cfg = EvalConfig(checkpoint_every=5, progress=False)
    res = evaluate_c2(
        images,
        tmp_path / "acts.safetensors",
        maps,
        TwoStage(),
        cfg,
        work_dir=tmp_path / "run",
        lowres_cache=tmp_path / "cache",
    )
    res.save_json(tmp_path / "report.json")
    assert res.save_histogram(tmp_path / "hist.png")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > n + 4  # table, report, plot, state, shards, cache owner, n cache files
    not_synced = [p for p in written if p.stat().st_ino not in sync_log.synced_files()]
    assert not_synced == []
    assert not [p for p in written if p.name.endswith(".tmp")]
    with open(tmp_path / "hist.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
