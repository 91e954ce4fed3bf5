import itertools

import numpy as np
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
from torch import Tensor, nn

from concept_deletion import (
    deletion_curve,
    deletion_order,
    deletion_schedule,
    gradient_x_input,
    random_importance,
    trapezoid_auc,
)

TARGETS = torch.tensor([0, 2, 1, 0])


def _rank_importance(order: tuple[int, ...], k: int) -> Tensor:
    """Importance under which concepts are deleted in exactly ``order``."""
    imp = torch.empty(k, dtype=torch.float64)
    imp[list(order)] = -torch.arange(k, dtype=torch.float64)
    return imp


def test_gradient_x_input_gives_the_optimal_deletion_curve_of_a_linear_head(layout: str) -> None:
    # Brute force over all 5! deletion orders of each image: GxI reaches the lowest logit at
    # every count (hence the lowest AUC), and the best insertion curve.
    head, codes = LinearHead(SHAPES[layout]), random_codes(layout)
    k = 5
    gxi = gradient_x_input(head, codes, TARGETS, layout)
    curve = deletion_curve(head, codes, TARGETS, gxi, layout)
    ins = deletion_curve(head, codes, TARGETS, gxi, layout, mode="insertion")
    assert curve.counts.tolist() == list(range(k + 1))
    orders = list(itertools.permutations(range(k)))
    all_del, all_ins = [], []
    for order in orders:
        imp = _rank_importance(order, k).expand(4, k)
        all_del.append(deletion_curve(head, codes, TARGETS, imp, layout).scores)
        all_ins.append(deletion_curve(head, codes, TARGETS, imp, layout, mode="insertion").scores)
    del_bs, ins_bs = np.stack(all_del), np.stack(all_ins)  # (orders, B, S)
    np.testing.assert_allclose(curve.scores, del_bs.min(0), atol=1e-12)
    np.testing.assert_allclose(ins.scores, ins_bs.max(0), atol=1e-12)
    aucs = [trapezoid_auc(curve.fractions, s.mean(0)) for s in del_bs]
    assert curve.auc_score <= min(aucs) + 1e-12
    # ... and the curve is the logit minus the cumulated largest contributions.
    contrib = concept_sum(head.contributions(codes, TARGETS), layout).detach()
    top = torch.sort(contrib, dim=1, descending=True).values
    full = contrib.sum(1, keepdim=True)
    want = torch.cat([full, full - top.cumsum(1)], dim=1)
    np.testing.assert_allclose(curve.scores, want.numpy(), atol=1e-12)


def test_random_order_lies_above_the_exact_contributions() -> None:
    layout = "BKHW"
    shape = (32, 2, 2)
    head = LinearHead(shape, seed=4)
    codes = torch.rand(6, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    exact = deletion_curve(
        head, codes, targets, gradient_x_input(head, codes, targets, layout), layout
    )
    rand_aucs = []
    for seed in range(5):
        r = deletion_curve(head, codes, targets, random_importance(codes, layout, seed), layout)
        assert np.all(r.mean_score >= exact.mean_score - 1e-12)
        rand_aucs.append(r.auc_score)
    spread = exact.mean_score[0] - exact.mean_score.min()
    assert np.mean(rand_aucs) - exact.auc_score > 0.2 * spread


def test_insertion_mirrors_deletion(layout: str) -> None:
    head, codes = SmoothHead(SHAPES[layout]), random_codes(layout)
    imp = random_importance(codes, layout, seed=7)
    dele = deletion_curve(head, codes, TARGETS, imp, layout)
    ins_rev = deletion_curve(head, codes, TARGETS, -imp, layout, mode="insertion")
    # Deleting the top-c keeps the bottom K-c: inserting in reverse order, K-c of them.
    np.testing.assert_allclose(dele.scores, ins_rev.scores[:, ::-1], atol=1e-12)
    rows = torch.arange(4)
    np.testing.assert_allclose(dele.scores[:, 0], head(codes)[rows, TARGETS].detach().numpy())
    zero = head(torch.zeros_like(codes))[rows, TARGETS].detach().numpy()
    np.testing.assert_allclose(dele.scores[:, -1], zero)
    np.testing.assert_allclose(ins_rev.scores[:, 0], zero)


class RecordingHead(nn.Module):
    """Wraps a head and keeps every code batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, codes: Tensor) -> Tensor:
        self.seen.append(codes.clone())
        return self.inner(codes)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_protected_concepts_are_never_deleted(mode: str) -> None:
    layout = "BKHW"
    codes = random_codes(layout)
    head = RecordingHead(SmoothHead(SHAPES[layout]))
    imp = torch.zeros(4, 5)
    imp[:, 3] = 10.0  # the most important concept, but protected
    curve = deletion_curve(
        head, codes, TARGETS, imp, layout, protected=torch.tensor([3]), mode=mode, max_elements=30
    )
    assert curve.n_eligible == 4 and curve.counts.tolist() == [0, 1, 2, 3, 4]
    seen = torch.cat(head.seen)  # (B * S, K, H, W) in image-major order
    assert seen.shape[0] == 4 * 5
    original = codes.repeat_interleave(5, dim=0)
    assert_close(seen[:, 3], original[:, 3])
    others = seen[:, [0, 1, 2, 4]].flatten(2).abs().sum(-1)  # (rows, 4) present or not
    n_present = (others > 0).sum(1).view(4, 5)
    want = torch.tensor([4, 3, 2, 1, 0]) if mode == "deletion" else torch.tensor([0, 1, 2, 3, 4])
    assert torch.equal(n_present, want.expand(4, 5))
    mask = torch.zeros(5, dtype=torch.bool)
    mask[3] = True
    again = deletion_curve(head, codes, TARGETS, imp, layout, protected=mask, mode=mode)
    np.testing.assert_allclose(again.scores, curve.scores, atol=1e-12)
    assert deletion_order(imp, mask)[:, 3].eq(5).all()


def test_chunked_evaluation_equals_unchunked(layout: str) -> None:
    head, codes = SmoothHead(SHAPES[layout]), random_codes(layout)
    imp = random_importance(codes, layout, seed=3)
    labels = torch.tensor([0, 1, 1, 2])
    one = deletion_curve(head, codes, TARGETS, imp, layout, labels=labels, max_elements=1)
    odd = deletion_curve(head, codes, TARGETS, imp, layout, labels=labels, max_elements=77)
    big = deletion_curve(head, codes, TARGETS, imp, layout, labels=labels)
    for c in (one, odd):
        np.testing.assert_allclose(c.scores, big.scores, atol=1e-12)
        np.testing.assert_array_equal(c.correct, big.correct)


def test_probability_and_accuracy_are_computed_from_the_logits() -> None:
    # Two concepts vote for classes 0 and 1; deleting concept 0 flips image 0 to class 1.
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    head = lambda u: u @ weight.T  # noqa: E731
    codes = torch.ones(2, 2, dtype=torch.float64)
    imp = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = deletion_curve(
        head, codes, 0, imp, "BK", labels=torch.tensor([0, 1]), score="probability", measure="m"
    )
    # Image 0 (logits 3, 1): then concept 0 deleted (0, 1), then both (0, 0): p(class 0).
    p_full, p_one = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(1.0))
    np.testing.assert_allclose(c.scores[0], [p_full, p_one, 0.5])
    np.testing.assert_array_equal(c.correct, [[True, False, True], [False, False, False]])
    np.testing.assert_allclose(c.accuracy, [0.5, 0.0, 0.5])
    assert c.auc_accuracy == pytest.approx(0.25 * 0.5 + 0.25 * 0.5)


def test_schedules() -> None:
    assert deletion_schedule(4).tolist() == [0, 1, 2, 3, 4]
    lin = deletion_schedule(1000, "linear", 10)
    assert lin.tolist() == list(range(0, 1001, 100))
    geo = deletion_schedule(4096, "geometric", 13)
    assert geo[0] == 0 and geo[1] == 1 and geo[-1] == 4096 and np.all(np.diff(geo) > 0)
    np.testing.assert_allclose(np.diff(np.log(geo[1:])), np.log(2), rtol=1e-3)
    assert deletion_schedule(5, "geometric", 50).tolist() == list(range(6))
    with pytest.raises(ValueError, match="schedule must be one of"):
        deletion_schedule(5, "cubic")


def test_every_schedule_spans_zero_to_all_concepts() -> None:
    # Before: geometric with n_steps=1 gave [0, 1], a curve that stopped at 1/K.
    assert deletion_schedule(4096, "geometric", 1).tolist() == [0, 4096]
    assert deletion_schedule(4096, "geometric", 2).tolist() == [0, 1, 4096]
    assert deletion_schedule(4096, "linear", 1).tolist() == [0, 4096]
    for n in range(1, 40):
        for steps in range(1, 45):
            for schedule in ("all", "linear", "geometric"):
                counts = deletion_schedule(n, schedule, steps)
                assert counts[0] == 0 and counts[-1] == n, (n, steps, schedule)
                assert np.all(np.diff(counts) > 0)
                if schedule == "geometric" and steps < n:
                    assert counts.size <= steps + 1


def test_one_step_geometric_curve_ends_with_everything_deleted() -> None:
    head, codes = LinearHead(SHAPES["BK"]), random_codes("BK")
    imp = random_importance(codes, "BK")
    curve = deletion_curve(head, codes, 0, imp, "BK", schedule="geometric", n_steps=1)
    np.testing.assert_array_equal(curve.fractions, [0.0, 1.0])
    np.testing.assert_allclose(curve.scores[:, -1], 0.0)  # bias-free head on the empty code
    np.testing.assert_allclose(curve.scores[:, 0], head(codes)[:, 0].detach().numpy())
    assert curve.auc_score == pytest.approx(curve.mean_score[0] / 2)


def test_trapezoid_auc_refuses_unsorted_out_of_range_or_nan_inputs() -> None:
    y = np.array([3.0, 2.0, 1.0, 0.0])
    assert trapezoid_auc([0, 0.25, 0.5, 1], y) == pytest.approx(0.625 + 0.375 + 0.25)
    bad = [
        ([0, 0.5, 0.25, 1], r"strictly increasing .* got 0\.5 then 0\.25 at positions 1, 2"),
        ([0, 0.5, 0.5, 1], "strictly increasing"),
        ([0, 0.5, 1, 1.5], r"must lie in \[0, 1\], got the range \[0, 1\.5\]"),
        ([-0.1, 0.5, 0.7, 1], r"must lie in \[0, 1\]"),
        ([0, np.nan, 0.5, 1], "finite"),
    ]
    for x, match in bad:
        with pytest.raises(ValueError, match=match):
            trapezoid_auc(x, y)
    with pytest.raises(ValueError, match="finite"):
        trapezoid_auc([0, 0.25, 0.5, 1], [1.0, np.nan, 0.0, 0.0])


def test_geometric_schedule_samples_the_same_curve(layout: str) -> None:
    head, codes = SmoothHead(SHAPES[layout]), random_codes(layout)
    imp = random_importance(codes, layout, seed=1)
    full = deletion_curve(head, codes, TARGETS, imp, layout)
    part = deletion_curve(head, codes, TARGETS, imp, layout, schedule="geometric", n_steps=3)
    np.testing.assert_allclose(part.scores, full.scores[:, part.counts], atol=1e-12)


def test_trapezoid_auc_and_bad_inputs() -> None:
    x, y = np.linspace(0, 1, 7), np.random.default_rng(0).random(7)
    assert trapezoid_auc(x, y) == pytest.approx(np.trapezoid(y, x))
    head, codes = LinearHead(SHAPES["BK"]), random_codes("BK")
    with pytest.raises(ValueError, match="importance must be"):
        deletion_curve(head, codes, 0, torch.zeros(4, 3), "BK")
    with pytest.raises(ValueError, match="NaN"):
        deletion_curve(head, codes, 0, torch.full((4, 5), float("nan")), "BK")
    with pytest.raises(ValueError, match="logits of shape"):
        deletion_curve(lambda u: u.sum(1), codes, 0, torch.zeros(4, 5), "BK")
    with pytest.raises(ValueError, match="protected concept indices"):
        deletion_curve(head, codes, 0, torch.zeros(4, 5), "BK", protected=torch.tensor([9]))
