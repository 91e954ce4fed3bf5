"""Crash-safe file writes: every file this package writes goes through :func:`write_atomic`.

The data goes to a fresh temporary file that ``tempfile.mkstemp`` creates in the destination's
directory (a unique name, so two writers never share it, and the same file system, so the
rename is atomic); the file is fsynced, ``os.replace`` puts it in place and the directory is
fsynced so that the rename survives a power loss too. A reader (or a resumed protocol run)
therefore finds the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["fsync_directory", "read_json", "write_atomic"]


def _current_umask() -> int:
    # The umask can only be read by setting it; done once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (e.g. a rename into it) to disk. Does nothing on Windows or
    on file systems that cannot fsync a directory."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Replace ``path`` atomically by ``data`` (``str`` is written as UTF-8, newlines as given).

    The new file keeps the permissions of the file it replaces, or gets the usual ``0o666``
    minus the umask (not ``mkstemp``'s private ``0o600``). On any error, also an interrupt, the
    temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a corrupt or truncated one is a ``ValueError`` that names it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it to have it written again"
        ) from err
