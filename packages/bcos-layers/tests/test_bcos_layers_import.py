import importlib.metadata

import bcos_layers


def test_version_matches_metadata() -> None:
    assert bcos_layers.__version__ == importlib.metadata.version("bcos-layers")
