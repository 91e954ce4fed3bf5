import importlib.metadata

import c2score


def test_version_matches_metadata() -> None:
    assert c2score.__version__ == importlib.metadata.version("fact-c2score")
