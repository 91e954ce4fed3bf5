"""Crash-safe file writes and file reads whose errors name the file (used by every writer here).

``atomic_write(path, write)`` is the one way this package writes a file: ``write`` fills a
unique temporary file made by ``tempfile.mkstemp`` in the destination's directory, the file is
fsynced, ``os.replace`` puts it in place, and the directory is fsynced so that the rename itself
survives a power loss. Readers therefore see the old file or the new one, never a torn mix, and
two writers of the same path never share a temporary file. The new file gets the permissions of
the file it replaces, or ``0o666`` minus the umask (not ``mkstemp``'s private ``0o600``).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "atomic_save_tensors",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_directory",
    "load_tensors",
    "read_json",
    "unique_temp_dir",
]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk; a no-op where the
    platform or file system cannot fsync directories (Windows, some network file systems)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def unique_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` (``tempfile.mkdtemp``) with the usual
    permissions (``0o777`` minus the umask), to be filled and then renamed into place."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_UMASK)
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a fresh temporary file next to it, which
    is fsynced and renamed over ``path`` (then the directory is fsynced). Returns ``path``.

    On any error (also ``KeyboardInterrupt``) the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(data, **dumps_kwargs)`` to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs))


def atomic_save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """``safetensors.torch.save_file`` (CPU copies of ``tensors``) to ``path`` atomically."""
    cpu = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU (never unpickles).

    A truncated or corrupt file is a ``ValueError`` that names it (instead of a bare
    ``SafetensorError``).
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"{path} does not exist") from err
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: "
            "write it again (or download it again, e.g. from_pretrained(..., "
            "force_download=True))"
        ) from err


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a truncated or corrupt file is a ``ValueError`` that names it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it is truncated or corrupt: write it again "
            "(or download it again, e.g. from_pretrained(..., force_download=True))"
        ) from err
