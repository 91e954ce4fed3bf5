"""Cross-package checks on the workspace as a whole."""

import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))


@pytest.mark.parametrize("member", MEMBERS, ids=lambda p: p.name)
def test_member_imports_and_layout(member: Path) -> None:
    data = tomllib.loads((member / "pyproject.toml").read_text())
    meta = data["project"]
    backend = data.get("tool", {}).get("uv", {}).get("build-backend", {})
    import_name = backend.get("module-name", meta["name"].replace("-", "_"))
    assert (member / "src" / import_name / "__init__.py").is_file()
    assert (member / "README.md").is_file()
    module = importlib.import_module(import_name)
    assert module.__version__ == meta["version"]
