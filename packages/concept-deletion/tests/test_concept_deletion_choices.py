"""Every string option is parsed by ChoiceEnum and refused with one message format:
"<argument> must be one of <values>, got <value>" (not "'x' is not a valid Mode")."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from concept_deletion_helpers import SHAPES, LinearHead, random_codes

from concept_deletion import (
    ComparisonConfig,
    ImportanceConfig,
    ProtocolConfig,
    check_codes,
    deletion_curve,
    integrated_gradients,
    local_importance,
    quasi_random_design,
    reduce_positions,
)

HEAD, CODES = LinearHead(SHAPES["BK"]), random_codes("BK")
IMP = torch.rand(4, 5, dtype=torch.float64)


def _curve(**kwargs: object) -> Callable[[], object]:
    return lambda: deletion_curve(HEAD, CODES, 0, IMP, "BK", **kwargs)


CASES: list[tuple[Callable[[], object], str]] = [
    (_curve(mode="remove"), "mode must be one of 'deletion', 'insertion', got 'remove'"),
    (_curve(score="logits"), "score must be one of 'logit', 'probability', got 'logits'"),
    (_curve(schedule="log"), "schedule must be one of 'all', 'linear', 'geometric', got 'log'"),
    (
        lambda: integrated_gradients(HEAD, CODES, 0, "BK", ImportanceConfig(ig_rule="simpson")),
        "ig_rule must be one of 'riemann_left', 'riemann_right', 'riemann_middle', "
        "'trapezoid', got 'simpson'",
    ),
    (
        lambda: local_importance("lime", HEAD, CODES, 0, "BK"),
        "measure must be one of 'contribution', 'saliency', 'gradient_x_input', "
        "'integrated_gradients', 'sobol', 'occlusion', 'random', got 'lime'",
    ),
    (lambda: check_codes(CODES, "KB"), "layout must be one of 'BKHW', 'BTK', 'BK', got 'KB'"),
    (
        lambda: reduce_positions(CODES, "BK", "median"),
        "reduction must be one of 'sum', 'mean', 'sum_abs', 'mean_abs', 'max_abs', got 'median'",
    ),
    (
        lambda: quasi_random_design(4, 3, sequence="lhs"),
        "sequence must be one of 'random', 'halton', 'sobol', got 'lhs'",
    ),
    (
        lambda: ComparisonConfig(orderings=("locl",)).validate(),
        "ordering must be one of 'local', 'global', got 'locl'",
    ),
    (
        lambda: ComparisonConfig(modes=("remove",)).validate(),
        "mode must be one of 'deletion', 'insertion', got 'remove'",
    ),
    (
        lambda: ComparisonConfig(score="prob").validate(),
        "score must be one of 'logit', 'probability', got 'prob'",
    ),
    (
        lambda: ComparisonConfig(schedule="log").validate(),
        "schedule must be one of 'all', 'linear', 'geometric', got 'log'",
    ),
    (
        lambda: ProtocolConfig(target="top1").validate(),
        "target must be one of 'predicted', 'label', got 'top1'",
    ),
]


@pytest.mark.parametrize(("call", "message"), CASES)
def test_bad_options_name_the_argument_and_its_values(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_comparison_config_refuses_a_bare_string_empty_tuples_and_no_steps() -> None:
    # A bare string would iterate as characters: "sobol" -> 's', 'o', ...
    with pytest.raises(ValueError, match=r"measures must be a non-empty tuple.*\('sobol',\)"):
        ComparisonConfig(measures="sobol").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modes must be a non-empty tuple"):
        ComparisonConfig(modes=()).validate()
    with pytest.raises(ValueError, match="n_steps must be >= 1, got 0"):
        ComparisonConfig(n_steps=0).validate()
    ComparisonConfig(measures=["sobol"], orderings=("global",)).validate()  # lists are fine
