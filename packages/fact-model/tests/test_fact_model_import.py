import importlib.metadata

import fact_model


def test_version_matches_metadata() -> None:
    assert fact_model.__version__ == importlib.metadata.version("fact-model")
