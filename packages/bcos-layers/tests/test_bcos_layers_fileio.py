"""Crash-safe writes (bcos_layers.fileio) and that every writer of the package uses them."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bcos_layers
from bcos_layers import visualize
from bcos_layers.fileio import atomic_path, write_bytes_atomic


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_is_fsynced_renamed_then_directory_fsynced(tmp_path: Path, write_log) -> None:
    path = tmp_path / "new" / "dir" / "file.bin"  # missing parents are created
    assert write_bytes_atomic(path, b"payload") == path
    assert path.read_bytes() == b"payload"
    write_log.assert_durable(path)
    assert os.listdir(path.parent) == ["file.bin"]


def test_new_files_get_open_permissions_replaced_files_keep_theirs(tmp_path: Path) -> None:
    new = write_bytes_atomic(tmp_path / "new.bin", b"x")
    assert _mode(new) == 0o666 & ~_umask()  # as open() would, not mkstemp's 0o600
    old = tmp_path / "old.bin"
    old.write_bytes(b"old")
    os.chmod(old, 0o640)
    write_bytes_atomic(old, b"new")
    assert old.read_bytes() == b"new" and _mode(old) == 0o640


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, error: type[BaseException]
) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(error), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the ne")
        raise error()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_concurrent_writers_use_distinct_temporaries_in_the_target_dir(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    with atomic_path(path) as a, atomic_path(path) as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert a.name.startswith(".file.bin.") and b.name.startswith(".file.bin.")
        a.write_bytes(b"first")
        b.write_bytes(b"second")
    assert path.read_bytes() == b"first"  # the outer writer finished last
    assert os.listdir(tmp_path) == ["file.bin"]


def _rgba() -> np.ndarray:
    return np.random.default_rng(0).random((12, 10, 4)).astype(np.float32)


def test_png_writers_are_crash_safe(tmp_path: Path, write_log) -> None:
    a = visualize.save_explanation_png(_rgba(), tmp_path / "e.png")
    b = visualize.save_contribution_png(np.linspace(-1, 1, 120).reshape(12, 10), tmp_path / "c.png")
    for path, size in ((a, (10, 12)), (b, (10, 12))):
        write_log.assert_durable(path)
        assert _mode(path) == 0o666 & ~_umask()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == size
    assert sorted(os.listdir(tmp_path)) == ["c.png", "e.png"]


def test_png_writer_failing_mid_write_keeps_the_old_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = visualize.save_explanation_png(_rgba(), tmp_path / "e.png")
    before = path.read_bytes()

    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG truncated")
        else:
            Path(fp).write_bytes(b"\x89PNG truncated")  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        visualize.save_explanation_png(1 - _rgba(), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["e.png"]


# Any write primitive outside fileio.py would be a writer that bypasses atomic_path.
_RAW_WRITES = re.compile(
    r"\bos\.(replace|rename)\(|\bshutil\.move\(|\btempfile\b|\.write_(bytes|text)\(|"
    r"\bopen\([^)]*['\"][wax]b?\+?['\"]|\btorch\.save\(|\bsave_file\(|\.savefig\("
)


def test_no_module_writes_files_except_through_fileio() -> None:
    root = Path(bcos_layers.__file__).parent
    offenders = [
        f"{py.relative_to(root)}:{i}: {line.strip()}"
        for py in sorted(root.rglob("*.py"))
        if py.name != "fileio.py"
        for i, line in enumerate(py.read_text().splitlines(), 1)
        if _RAW_WRITES.search(line)
    ]
    assert offenders == []
