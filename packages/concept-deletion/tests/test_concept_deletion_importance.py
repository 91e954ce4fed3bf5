import math

import pytest
import torch
from concept_deletion_helpers import (
    SHAPES,
    LinearHead,
    SmoothHead,
    assert_close,
    concept_sum,
    random_codes,
)

from concept_deletion import (
    ImportanceConfig,
    class_importance,
    expand_class_importance,
    gradient_x_input,
    integrated_gradients,
    local_importance,
    occlusion,
    random_importance,
    saliency,
    sobol_total_indices,
)

TARGETS = torch.tensor([0, 2, 1, 0])


def test_gradient_x_input_equals_exact_contributions_of_a_linear_head(layout: str) -> None:
    head, codes = LinearHead(SHAPES[layout]), random_codes(layout)
    exact = concept_sum(head.contributions(codes, TARGETS), layout)
    assert_close(gradient_x_input(head, codes, TARGETS, layout), exact)
    # The contributions sum to the logit (no bias): the decomposition is complete.
    assert_close(exact.sum(1), head(codes)[torch.arange(4), TARGETS])
    # Supplied contributions (per position, or per concept) are reduced the same way.
    per_pos = head.contributions(codes, TARGETS)
    assert_close(
        local_importance("contribution", head, codes, TARGETS, layout, contributions=per_pos), exact
    )
    assert_close(
        local_importance("contribution", head, codes, TARGETS, layout, contributions=exact), exact
    )
    # For a bias-free linear head, IG and occlusion are exact as well.
    assert_close(integrated_gradients(head, codes, TARGETS, layout), exact)
    assert_close(occlusion(head, codes, TARGETS, layout), exact)


def test_saliency_of_a_linear_head_is_the_reduced_absolute_weight(layout: str) -> None:
    head, codes = LinearHead(SHAPES[layout]), random_codes(layout)
    w_abs = head.weight.detach()[TARGETS].abs()
    got = saliency(head, codes, TARGETS, layout)
    if layout == "BKHW":
        want = w_abs.amax((2, 3))
    elif layout == "BTK":
        want = w_abs.amax(1)
    else:
        want = w_abs
    assert_close(got, want)
    got_sum = saliency(head, codes, TARGETS, layout, ImportanceConfig(reduction="sum_abs"))
    assert_close(got_sum, concept_sum(w_abs, layout))


@pytest.mark.parametrize(("rule", "tol"), [("trapezoid", 2e-4), ("riemann_middle", 2e-4)])
def test_integrated_gradients_completeness_on_a_smooth_head(rule: str, tol: float) -> None:
    layout = "BKHW"
    head, codes = SmoothHead(SHAPES[layout]), 3 * random_codes(layout)
    ig = integrated_gradients(
        head, codes, TARGETS, layout, ImportanceConfig(ig_steps=64, ig_rule=rule)
    )
    rows = torch.arange(4)
    delta = head(codes)[rows, TARGETS] - head(torch.zeros_like(codes))[rows, TARGETS]
    err = (ig.sum(1) - delta).abs().max().item()
    assert err < tol * delta.abs().max().item()
    # Second-order rules: halving the step divides the error by about 4; left Riemann is worse.
    coarse = integrated_gradients(
        head, codes, TARGETS, layout, ImportanceConfig(ig_steps=8, ig_rule=rule)
    )
    left = integrated_gradients(
        head, codes, TARGETS, layout, ImportanceConfig(ig_steps=64, ig_rule="riemann_left")
    )
    assert (coarse.sum(1) - delta).abs().max().item() > 10 * err
    assert (left.sum(1) - delta).abs().max().item() > 10 * err


def test_gradient_measures_do_not_depend_on_the_memory_budget(layout: str) -> None:
    head, codes = SmoothHead(SHAPES[layout]), random_codes(layout)
    small = ImportanceConfig(max_elements=1, ig_steps=5)
    big = ImportanceConfig(ig_steps=5)
    for fn in (saliency, gradient_x_input, integrated_gradients, occlusion):
        assert_close(fn(head, codes, TARGETS, layout, small), fn(head, codes, TARGETS, layout, big))


@pytest.mark.parametrize(
    ("sequence", "scramble", "atol"), [("sobol", True, 0.005), ("random", False, 0.06)]
)
def test_sobol_total_indices_of_a_linear_head_match_the_analytic_values(
    layout: str, sequence: str, scramble: bool, atol: float
) -> None:
    # y = sum_k c_k m_k with m_k ~ U[0, 1) independent: ST_k = c_k^2 / sum_j c_j^2. Observed max
    # errors with 2048 designs: scrambled Sobol 0.0004, the default i.i.d. design 0.033.
    head, codes = LinearHead(SHAPES[layout]), random_codes(layout)
    c = concept_sum(head.contributions(codes, TARGETS), layout)
    want = c**2 / (c**2).sum(1, keepdim=True)
    cfg = ImportanceConfig(
        sobol_designs=2048, sobol_sequence=sequence, sobol_scramble=scramble, max_elements=5000
    )
    got = sobol_total_indices(head, codes, TARGETS, layout, cfg)
    assert_close(got, want, atol=atol, rtol=0)


def test_sobol_on_codes_skips_inactive_concepts_exactly_and_streams() -> None:
    layout = "BKHW"
    head, codes = SmoothHead(SHAPES[layout]), random_codes(layout)
    codes[:, 1] = 0  # concept 1 inactive in every image
    codes[0, 3] = 0
    full = sobol_total_indices(
        head, codes, TARGETS, layout, ImportanceConfig(sobol_designs=16, skip_inactive=False)
    )
    skip = sobol_total_indices(head, codes, TARGETS, layout, ImportanceConfig(sobol_designs=16))
    tiny_chunks = sobol_total_indices(
        head, codes, TARGETS, layout, ImportanceConfig(sobol_designs=16, max_elements=7)
    )
    assert torch.equal(full[:, 1], torch.zeros(4)) and full[0, 3] == 0
    assert_close(skip, full)
    assert_close(tiny_chunks, full)
    assert (full[:, [0, 2, 4]] > 0).all()
    subset = sobol_total_indices(
        head, codes, TARGETS, layout, ImportanceConfig(sobol_designs=16), concepts=[2, 4]
    )
    assert_close(subset[:, [2, 4]], full[:, [2, 4]])
    assert torch.equal(subset[:, [0, 1, 3]], torch.zeros(4, 3, dtype=subset.dtype))


def test_random_importance_is_seeded_and_uniform() -> None:
    codes = torch.zeros(3, 4, 1000)
    a, b = random_importance(codes, "BTK", seed=1), random_importance(codes, "BTK", seed=1)
    assert torch.equal(a, b) and a.shape == (3, 1000)
    assert not torch.equal(a, random_importance(codes, "BTK", seed=2))
    assert abs(a.mean().item() - 0.5) < 0.02


def test_class_importance_is_the_class_mean() -> None:
    imp = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([7, 3, 7])
    classes, per_class = class_importance(imp, labels)
    assert classes.tolist() == [3, 7]
    assert_close(per_class, torch.tensor([[3.0, 2.0], [3.0, 2.5]]))
    assert_close(
        expand_class_importance(classes, per_class, labels),
        torch.tensor([[3.0, 2.5], [3.0, 2.0], [3.0, 2.5]]),
    )
    with pytest.raises(ValueError, match="no class importance"):
        expand_class_importance(classes, per_class, torch.tensor([4]))


def test_bad_inputs_give_clear_errors() -> None:
    head, codes = LinearHead(SHAPES["BK"]), random_codes("BK")
    with pytest.raises(ValueError, match="needs the model's contributions"):
        local_importance("contribution", head, codes, TARGETS, "BK")
    with pytest.raises(ValueError, match="measure must be one of"):
        local_importance("lime", head, codes, TARGETS, "BK")
    with pytest.raises(ValueError, match="targets must be"):
        saliency(head, codes, torch.tensor([0, 1]), "BK")
    with pytest.raises(ValueError, match="contributions must have the shape"):
        local_importance("contribution", head, codes, TARGETS, "BK", contributions=torch.ones(3))
    with pytest.raises(ValueError, match="n_designs >= 2"):
        sobol_total_indices(head, codes, TARGETS, "BK", ImportanceConfig(sobol_designs=1))
    assert math.isfinite(float(saliency(head, codes, 0, "BK").sum()))


def test_every_head_call_respects_the_memory_budget() -> None:
    layout = "BKHW"
    inner, codes = SmoothHead(SHAPES[layout]), random_codes(layout)
    sizes: list[int] = []

    def head(u: torch.Tensor) -> torch.Tensor:
        sizes.append(u.numel())
        return inner(u)

    budget = 3 * 5 * 3 * 2  # three codes of (5, 3, 2) per forward pass
    cfg = ImportanceConfig(sobol_designs=64, ig_steps=9, max_elements=budget)
    for measure in ("sobol", "occlusion", "integrated_gradients", "saliency"):
        sizes.clear()
        local_importance(measure, head, codes, TARGETS, layout, cfg)
        assert sizes and max(sizes) <= budget, measure
    # Sobol: 64 designs x (5 + 1) rows per image, all streamed in chunks of 3 codes, and one
    # code to check the targets first.
    sizes.clear()
    sobol_total_indices(head, codes, TARGETS, layout, cfg)
    assert sum(sizes) == 4 * 64 * 6 * 30 + 30  # + one code: the up-front check of the targets
