"""Shared test setup: the official ``bcos`` 0.1.3 package as a test-only oracle.

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
