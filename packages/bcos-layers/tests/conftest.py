"""Shared test setup: the official ``bcos`` 0.1.3 package as a test-only oracle, and a log of
``os.fsync`` / ``os.replace`` calls for the crash-safe-write tests (:func:`write_log`).

Tests that compare with the official library take it from the ``bcos_oracle`` fixture, never
from a module-level import, so a missing oracle cannot abort the collection of the whole suite.
Without ``bcos`` installed those tests are **skipped** with the reason and how to install it;
with ``BCOS_LAYERS_REQUIRE_ORACLE=1`` (set by every nox session) a missing oracle is an
**error** instead, so CI can never pass by silently skipping the parity tests.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REQUIRE_ORACLE_ENV = "BCOS_LAYERS_REQUIRE_ORACLE"


def load_oracle(module: str) -> ModuleType:
    """Import ``module`` of the official ``bcos`` package, or skip / fail the calling test."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        msg = (
            f"the official `bcos` package (test-only parity oracle, `bcos==0.1.3` in bcos-layers' "
            f"`test` dependency group) is not importable ({module}: {err}); install it with "
            "`uv sync --group test` (or `pip install bcos==0.1.3 einops`)"
        )
        if os.environ.get(REQUIRE_ORACLE_ENV) == "1":
            pytest.fail(f"{msg}. {REQUIRE_ORACLE_ENV}=1 makes this an error.", pytrace=False)
        pytest.skip(f"{msg}; set {REQUIRE_ORACLE_ENV}=1 to make this an error")


@pytest.fixture(scope="session")
def bcos_oracle() -> Callable[[str], ModuleType]:
    """``bcos_oracle("bcos.models.pretrained")`` -> the module (or skip / fail, see above)."""
    return load_oracle


class WriteLog:
    """The ``os.fsync`` and ``os.replace`` calls made while the :func:`write_log` fixture is
    active, in order: ``("fsync", (st_dev, st_ino))`` of the synced file or directory and
    ``("replace", destination)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def assert_durable(self, path: Path) -> None:
        """``path`` got its content the crash-safe way: its data (the inode it has now) was
        fsynced, then it was renamed into place, then its directory was fsynced."""
        path = Path(path)
        st, dst = os.stat(path), os.stat(path.parent)
        data, dirent = ("fsync", (st.st_dev, st.st_ino)), ("fsync", (dst.st_dev, dst.st_ino))
        replaced = [i for i, e in enumerate(self.events) if e == ("replace", str(path))]
        assert replaced, f"{path} was not put in place by os.replace: {self.events}"
        last = replaced[-1]
        assert data in self.events[:last], f"{path}: data not fsynced before the rename"
        assert dirent in self.events[last:], f"{path}: directory not fsynced after the rename"


@pytest.fixture
def write_log(monkeypatch: pytest.MonkeyPatch) -> WriteLog:
    """Record (and still perform) every ``os.fsync`` / ``os.replace`` of the test."""
    log = WriteLog()
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        st = os.fstat(fd)
        log.events.append(("fsync", (st.st_dev, st.st_ino)))
        fsync(fd)

    def logged_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw) -> None:
        replace(src, dst, **kw)
        log.events.append(("replace", os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return log
