"""Crash-safe writes: every file bcos-layers writes (PNG images, converted checkpoints,
downloads) is written through :func:`atomic_path`.

The writer fills a fresh temporary file made by ``tempfile.mkstemp`` in the destination's own
directory (a unique name, so concurrent writers never share it, on the same file system, so the
rename is atomic); on success the file is fsynced, ``os.replace``'d over the destination and the
directory is fsynced so that the rename itself survives a power cut. A reader therefore sees the
previous file or the complete new one, never a torn one; on any error (also ``KeyboardInterrupt``)
the temporary file is removed and the destination is left untouched.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "fsync_directory", "write_bytes_atomic"]


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import (not thread-safe later).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op on Windows and on file
    systems that do not support fsync on a directory."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a unique temporary path next to ``path``; on a clean exit it replaces ``path``.

    Write the complete new content to the yielded path by any means (``open``, ``PIL``'s
    ``save``, ``torch.hub.download_url_to_file``; replacing the temporary file by another one is
    fine). Then: fsync of the data, ``os.replace`` onto ``path``, fsync of the directory. The
    result keeps the permissions of the file it replaces, or gets ``0o666`` minus the umask as
    a plain ``open`` would (not ``mkstemp``'s private ``0o600``). Missing parent directories are
    created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # O_RDWR: fsync on a read-only descriptor fails on Windows
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` by ``data`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
