import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import bcos_layers


def test_version_matches_metadata() -> None:
    assert bcos_layers.__version__ == importlib.metadata.version("bcos-layers")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> set[str]:
    root = Path(bcos_layers.__file__).parent
    names: set[str] = set()
    for py in root.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(), str(py))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_declared_dependencies_are_exactly_the_imported_ones() -> None:
    """Installed metadata vs the package's imports: nothing declared and never imported (as
    huggingface-hub was), nothing imported and not declared (extras count as declared)."""
    declared, extras = set(), set()
    for req in importlib.metadata.requires("bcos-layers") or []:
        name = _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))
        (extras if "extra ==" in req else declared).add(name)
    dists = importlib.metadata.packages_distributions()
    third_party = _imported_top_level_modules() - set(sys.stdlib_module_names) - {"bcos_layers"}
    imported = {_norm(d) for m in third_party for d in dists.get(m, [m])}
    assert declared - imported == set(), "declared but never imported"
    assert imported - declared - extras == set(), "imported but not declared"
