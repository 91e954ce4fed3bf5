"""Every file the package writes (curves JSON/CSV, protocol state, per-class results, figures)
goes through one atomic writer: unique temporary file in the target's directory, fsync,
os.replace, directory fsync, usual permissions; corrupt files are errors that name them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from concept_deletion_helpers import SHAPES, LinearHead, random_codes

from concept_deletion import (
    ComparisonConfig,
    CurveResult,
    ProtocolConfig,
    deletion_curve,
    paper_protocol,
    plot_curves,
    random_importance,
    save_curves,
)
from concept_deletion.fileio import read_json, write_atomic

HEAD = LinearHead(SHAPES["BK"])


class CachedCodes:
    """A concept model whose "images" are already codes."""

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def head(self, u: torch.Tensor) -> torch.Tensor:
        return HEAD(u)


def run_protocol(out: Path) -> list[CurveResult]:
    """The paper protocol on 2 classes x 2 images of 6 cached codes, random measure only."""
    images = random_codes("BK", batch=6, seed=3)
    dataset = [(images[i], i % 2) for i in range(6)]
    cfg = ProtocolConfig(
        n_classes=2, per_class=2, comparison=ComparisonConfig(measures=("random",))
    )
    return paper_protocol(dataset, CachedCodes(), "BK", out, cfg, progress=False)


class FsyncLog:
    """Records what each real ``os.fsync`` call flushed: ``('dir' | 'file', inode)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def synced(self, path: Path) -> tuple[bool, bool]:
        """Whether ``path``'s final content and its directory were fsynced."""
        return ("file", path.stat().st_ino) in self.calls, (
            "dir",
            path.parent.stat().st_ino,
        ) in self.calls


def test_write_atomic_syncs_file_and_directory_with_usual_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FsyncLog(monkeypatch)
    target = tmp_path / "sub" / "out.json"
    write_atomic(target, '{"a": 1}\r\n')
    assert target.read_bytes() == b'{"a": 1}\r\n'  # newlines as given
    assert log.synced(target) == (True, True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    target.chmod(0o640)
    write_atomic(target, b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "curves.json"
    write_atomic(target, "old")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "new \ud800")  # a lone surrogate cannot be encoded
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.json"]


def test_curves_figures_and_protocol_files_are_all_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = random_codes("BK")
    curve = deletion_curve(HEAD, codes, 0, random_importance(codes, "BK"), "BK", measure="m")
    log = FsyncLog(monkeypatch)
    paths = save_curves([curve], tmp_path / "curves")
    plot_curves([curve], tmp_path / "fig" / "deletion.png")
    written = [*paths.values(), tmp_path / "fig" / "deletion.png"]
    # paper_protocol: protocol.json, classes/<c>.json and the merged files.
    run = tmp_path / "run"
    run_protocol(run)
    written += [run / "protocol.json", run / "classes" / "0.json", run / "classes" / "1.json"]
    written += [run / "deletion.json", run / "deletion_curves.csv", run / "deletion_auc.csv"]
    for path in written:
        assert log.synced(path) == (True, True), path
    assert (tmp_path / "fig" / "deletion.png").read_bytes()[:4] == b"\x89PNG"
    for folder in (tmp_path / "curves", tmp_path / "fig", run, run / "classes"):
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], folder


def test_corrupt_result_files_are_errors_that_name_them(tmp_path: Path) -> None:
    bad = tmp_path / "protocol.json"
    bad.write_text('{"config": {"n_cl')  # truncated
    with pytest.raises(ValueError, match=r"protocol\.json is not valid JSON"):
        read_json(bad)
    first = run_protocol(tmp_path / "run")
    class_file = tmp_path / "run" / "classes" / "1.json"
    class_file.write_text(class_file.read_text()[:50])
    with pytest.raises(ValueError, match=r"classes/1\.json is not a class result .* delete it"):
        run_protocol(tmp_path / "run")
    class_file.unlink()  # as the message says: the class is recomputed, identically
    again = run_protocol(tmp_path / "run")
    np.testing.assert_array_equal(again[0].scores, first[0].scores)
