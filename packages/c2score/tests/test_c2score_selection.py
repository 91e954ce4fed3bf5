"""Image selection (App. C.3): the authors' rule a > min(q95 of the positives, 11th largest)."""

import math

import pytest
import torch

from c2score import ActivationTable, SelectionConfig, n_to_select, select_images


@pytest.mark.parametrize(
    ("n_active", "expected"),
    [(0, 0), (4, 4), (5, 5), (10, 10), (11, 10), (200, 10), (201, 10), (221, 11), (1000, 50)],
)
def test_n_to_select_edges(n_active: int, expected: int) -> None:
    assert n_to_select(n_active) == expected


def test_n_to_select_is_ceil_of_five_percent_of_n_minus_one_but_at_least_ten() -> None:
    for n in range(11, 5000):
        assert n_to_select(n) == max(10, math.ceil((n - 1) * 5 / 100)), n


def authors_rule(col: torch.Tensor) -> list[int]:
    """The authors' get_indices_to_explain(quantile=0.95, base_cnt=10), restated from
    shared/reference/official-fact-release.md section 7, on one float32 column."""
    col = col.float()
    positives = col[col > 0]
    if len(positives) <= 10:
        return (col > 0).nonzero().flatten().tolist()
    thr = min(torch.quantile(positives, 0.95), torch.topk(positives, 11).values[-1])
    return (col > thr).nonzero().flatten().tolist()


def _dense_and_sparse(acts: torch.Tensor) -> list:
    nz = acts.nonzero()
    sparse = ActivationTable.from_sparse(nz[:, 0], nz[:, 1], acts[nz[:, 0], nz[:, 1]], acts.shape)
    return [
        select_images(acts, SelectionConfig(min_images=2)),
        select_images(sparse, SelectionConfig(min_images=2), block_concepts=3),
    ]


def _chosen(sel, concept: int) -> list[int]:
    slot = sel.concept_ids.tolist().index(concept)
    return sorted(sel.pair_image[sel.pair_slot == slot].tolist())


@pytest.mark.parametrize("n_active", [201, 221, 401, 461, 641, 681, 1941, 2761])
def test_n_equal_to_1_mod_20_follows_the_authors_rule(n_active: int) -> None:
    """At n = 201 the authors take 10 images, not ceil(0.05 * 201) = 11; float32 rounding in
    torch.quantile can add one back (n = 461, 641, ... with these values): reproduce both."""
    g = torch.Generator().manual_seed(n_active)
    col = torch.zeros(3000)
    rows = torch.randperm(3000, generator=g)[:n_active]
    col[rows] = torch.randperm(100_000, generator=g)[:n_active].float() + 1
    expected = authors_rule(col)
    for sel in _dense_and_sparse(col[:, None]):
        assert _chosen(sel, 0) == expected
    if n_active == 201:
        assert len(expected) == 10


def test_selection_equals_the_authors_rule_on_random_columns() -> None:
    g = torch.Generator().manual_seed(3)
    n_images, n_concepts = 2500, 40
    acts = torch.rand(n_images, n_concepts, generator=g)
    fraction = torch.rand(n_concepts, generator=g) ** 2  # 0 .. 100 % of the images active
    acts[torch.rand(n_images, n_concepts, generator=g) > fraction] = 0.0
    acts[:, 5] = torch.where(acts[:, 5] > 0, (acts[:, 5] * 4).ceil(), 0.0)  # heavy ties
    acts[:8, 6], acts[8:, 6] = 1.0, 0.0  # 8 active: all of them
    acts[:, 7] = 0.0
    acts[:201, 7] = torch.linspace(1, 2, 201)  # n = 201
    for sel in _dense_and_sparse(acts):
        for c in sel.concept_ids.tolist():
            assert _chosen(sel, c) == authors_rule(acts[:, c]), c
        assert torch.equal(
            sel.pair_weight, acts[sel.pair_image, sel.concept_ids[sel.pair_slot]].double()
        )


def _column(n_active: int, n_images: int = 1200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    col = torch.zeros(n_images)
    rows = torch.randperm(n_images, generator=g)[:n_active]
    col[rows] = torch.rand(n_active, generator=g) + 0.1
    inactive = (col == 0).nonzero().flatten()
    col[inactive[:50]] = -1.0  # negative activations never count as active
    return col


@pytest.mark.parametrize(
    ("n_active", "kept"), [(0, 0), (4, 0), (5, 5), (10, 10), (11, 10), (1000, 50)]
)
def test_selection_edges_pick_the_top_images(n_active: int, kept: int) -> None:
    col = _column(n_active)
    sel = select_images(col[:, None])
    if kept == 0:
        assert len(sel.concept_ids) == 0
        reason = "no_active_images" if n_active == 0 else "too_few_images"
        assert sel.skipped[reason].tolist() == [0]
        return
    assert sel.concept_ids.tolist() == [0] and sel.n_selected.tolist() == [kept]
    chosen = set(sel.pair_image.tolist())
    active = (col > 0).nonzero().flatten()
    top = active[torch.argsort(col[active], descending=True)][:kept]
    assert chosen == set(top.tolist())
    assert torch.allclose(sel.pair_weight, col[sel.pair_image].double())
    assert bool((sel.pair_weight > 0).all())


def test_ties_at_the_threshold_are_all_left_out() -> None:
    col = torch.zeros(300)
    col[100:300] = 1.0  # 200 active, all tied: q95 = 11th largest = 1, nothing is above it
    sel = select_images(col[:, None])
    assert len(sel.concept_ids) == 0 and sel.skipped["too_few_images"].tolist() == [0]
    col = torch.zeros(60)
    col[:50] = torch.linspace(0.1, 0.5, 50)
    col[50:55] = 1.0  # the 10th..14th largest tie; the top 9 lie above them
    col[55:] = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])
    col[40:44] = torch.tensor([1.5, 1.6, 1.7, 1.8])
    sel = select_images(col[:, None])
    assert sorted(sel.pair_image.tolist()) == [40, 41, 42, 43, 55, 56, 57, 58, 59]


def test_non_finite_columns_are_skipped_and_counted() -> None:
    acts = torch.rand(40, 3)
    acts[5, 1] = float("nan")
    acts[7, 2] = float("inf")
    sel = select_images(acts)
    assert sel.concept_ids.tolist() == [0]
    assert sel.skipped["non_finite_activations"].tolist() == [1, 2]


def test_an_all_nan_row_excludes_the_image_not_every_concept() -> None:
    acts = torch.rand(40, 3) + 0.1
    acts[6] = float("nan")
    acts[9, 2] = float("nan")
    sel = select_images(acts)
    assert sel.bad_images.tolist() == [6]
    assert sel.concept_ids.tolist() == [0, 1]
    assert sel.skipped["non_finite_activations"].tolist() == [2]
    assert 6 not in sel.pair_image.tolist()
    nz = acts.isfinite().logical_not() | (acts != 0)
    idx = nz.nonzero()
    sparse = ActivationTable.from_sparse(idx[:, 0], idx[:, 1], acts[idx[:, 0], idx[:, 1]], (40, 3))
    other = select_images(sparse)
    assert other.bad_images.tolist() == [6] and torch.equal(other.pair_image, sel.pair_image)


def test_sparse_and_dense_tables_select_the_same_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    acts = torch.rand(500, 30, generator=g)
    acts[acts < 0.7] = 0.0
    acts[:, 3] = 0.0
    acts[:, 4] = 0.0
    acts[:3, 4] = 0.5
    acts[:, 5] = torch.where(acts[:, 5] > 0, 0.25, 0.0)  # all tied: none above the threshold
    nz = acts.nonzero()
    sparse = ActivationTable.from_sparse(nz[:, 0], nz[:, 1], acts[nz[:, 0], nz[:, 1]], (500, 30))
    a, b = select_images(acts), select_images(sparse, block_concepts=7)
    for x, y in zip(a[:6], b[:6]):
        assert torch.equal(x, y)
    assert {k: v.tolist() for k, v in a.skipped.items()} == {
        k: v.tolist() for k, v in b.skipped.items()
    }
    assert a.skipped["no_active_images"].tolist() == [3]
    assert a.skipped["too_few_images"].tolist() == [4, 5]


def test_pairs_of_image_match_the_selection() -> None:
    acts = torch.rand(60, 8)
    sel = select_images(acts, SelectionConfig(min_top=4, min_images=3))
    for i in range(60):
        slots, w = sel.pairs_of(i)
        for s, wi in zip(slots.tolist(), w.tolist()):
            assert wi == pytest.approx(float(acts[i, sel.concept_ids[s]]))
    assert int(sel.image_ptr[-1]) == len(sel.pair_image) == int(sel.n_selected.sum())


def test_bad_config_and_tables_raise() -> None:
    with pytest.raises(ValueError, match="top_fraction"):
        SelectionConfig(top_fraction=0.0)
    with pytest.raises(ValueError, match="min_images"):
        SelectionConfig(min_images=1)
    with pytest.raises(ValueError, match="repeated"):
        ActivationTable.from_sparse(
            torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([1.0, 2.0]), (2, 2)
        )
    with pytest.raises(ValueError, match="outside"):
        ActivationTable.from_sparse(
            torch.tensor([2]), torch.tensor([0]), torch.tensor([1.0]), (2, 2)
        )


def test_dense_selection_equals_the_authors_rule_under_heavy_ties() -> None:
    g = torch.Generator().manual_seed(5)
    acts = torch.randint(0, 60, (900, 12), generator=g).float() / 59  # 59 levels: many ties
    acts[:, 0] = torch.randint(0, 2, (900,), generator=g).float()  # ~450 active, all tied
    sel = select_images(acts, block_concepts=5)
    assert sel.concept_ids.tolist() == list(range(1, 12))  # column 0: nothing above the tie
    for c in sel.concept_ids.tolist():
        assert _chosen(sel, c) == authors_rule(acts[:, c])
    assert sel.skipped["too_few_images"].tolist() == [0]
