"""Bad targets, NaN codes and NaN logits are refused with clear errors by every measure and by
the deletion curve (before: -1 silently explained the last class under Sobol and occlusion,
out-of-range targets gave raw torch errors, NaN codes gave NaN areas)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from concept_deletion_helpers import SHAPES, LinearHead, random_codes
from torch import Tensor

from concept_deletion import (
    ImportanceConfig,
    deletion_curve,
    local_importance,
    sobol_total_indices,
)

LAYOUT = "BKHW"
HEAD = LinearHead(SHAPES[LAYOUT], n_classes=3)
CODES = random_codes(LAYOUT)  # 4 images, 5 concepts
CFG = ImportanceConfig(sobol_designs=2, ig_steps=2)
MEASURES = ("saliency", "gradient_x_input", "integrated_gradients", "sobol", "occlusion")


def _measure(name: str) -> Callable[[Tensor | int, Tensor], Tensor]:
    return lambda t, codes: local_importance(name, HEAD, codes, t, LAYOUT, CFG)


def _curve(t: Tensor | int, codes: Tensor) -> Tensor:
    imp = torch.rand(codes.shape[0], codes.shape[1], dtype=torch.float64)
    return torch.as_tensor(deletion_curve(HEAD, codes, t, imp, LAYOUT).scores)


CALLS = {**{m: _measure(m) for m in MEASURES}, "deletion_curve": _curve}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (-1, r"class indices >= 0, got -1 for image 0"),
        (torch.tensor([0, 1, -2, 0]), r"got -2 for image 2"),
        (3, r"target 3 is out of range for a head with 3 classes: targets must lie in \[0, 3\)"),
        (torch.tensor([0, 7, 1, 2]), r"target 7 is out of range .* \[0, 3\)"),
        (torch.tensor([0.0, 1.5, 1.0, 2.0]), r"integer class indices, got dtype torch\.float32"),
    ],
)
def test_bad_targets_are_refused_by_every_measure_and_the_curve(
    name: str, targets: Tensor | int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        CALLS[name](targets, CODES)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_last_class_is_a_valid_target(name: str) -> None:
    assert torch.isfinite(CALLS[name](2, CODES)).all()


def test_sobol_checks_targets_even_for_an_image_with_no_active_concept() -> None:
    codes = CODES.clone()
    codes[1] = 0  # nothing to evaluate for image 1 (skip_inactive)
    assert torch.equal(sobol_total_indices(HEAD, codes, 0, LAYOUT, CFG)[1], torch.zeros(5))
    with pytest.raises(ValueError, match="target 3 is out of range"):
        sobol_total_indices(HEAD, codes[1:2], 3, LAYOUT, CFG)


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_codes_are_refused(name: str, bad: float) -> None:
    codes = CODES.clone()
    codes[2, 3, 1, 0] = bad
    with pytest.raises(ValueError, match=r"codes hold 1 NaN/Inf entries \(first at index \(2, 3"):
        CALLS[name](0, codes)


def test_nan_logits_of_the_head_are_refused_by_the_curve() -> None:
    # A head that normalises by the code's total gives 0/0 once every concept is deleted.
    def head(u: Tensor) -> Tensor:
        return HEAD(u / u.sum((1, 2, 3), keepdim=True))

    imp = torch.rand(4, 5, dtype=torch.float64)
    assert np.isfinite(deletion_curve(HEAD, CODES, 0, imp, LAYOUT).auc_score)
    with pytest.raises(ValueError, match="NaN/Inf logits"):  # before: auc_score nan
        deletion_curve(head, CODES, 0, imp, LAYOUT)
