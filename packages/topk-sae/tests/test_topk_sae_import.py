import importlib.metadata

import topk_sae


def test_version_matches_metadata() -> None:
    assert topk_sae.__version__ == importlib.metadata.version("topk-sae")
