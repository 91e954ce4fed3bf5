import importlib.metadata

import concept_deletion


def test_version_matches_metadata() -> None:
    assert concept_deletion.__version__ == importlib.metadata.version("concept-deletion")
