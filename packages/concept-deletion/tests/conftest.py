"""Fixtures of the concept-deletion tests."""

import pytest
from concept_deletion_helpers import SHAPES


@pytest.fixture(params=sorted(SHAPES))
def layout(request: pytest.FixtureRequest) -> str:
    return request.param
