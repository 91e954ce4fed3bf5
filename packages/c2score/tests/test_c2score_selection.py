"""Image selection (App. C.3): top 5 % of the active images, at least 10, skip below 5."""

import math

import pytest
import torch

from c2score import ActivationTable, SelectionConfig, n_to_select, select_images


@pytest.mark.parametrize(
    ("n_active", "expected"),
    [(0, 0), (4, 4), (5, 5), (10, 10), (11, 10), (199, 10), (200, 10), (201, 11), (1000, 50)],
)
def test_n_to_select_edges(n_active: int, expected: int) -> None:
    assert n_to_select(n_active) == expected


def test_n_to_select_is_ceil_of_five_percent_but_at_least_ten() -> None:
    for n in range(11, 5000):
        assert n_to_select(n) == max(10, math.ceil(n * 5 / 100)), n


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


def test_ties_are_broken_by_lower_image_index() -> None:
    col = torch.zeros(300)
    col[100:300] = 1.0  # 200 active, all tied: k = 10
    sel = select_images(col[:, None])
    assert sel.pair_image.tolist() == list(range(100, 110))


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
    acts[:, 5] = torch.where(acts[:, 5] > 0, 0.25, 0.0)  # ties
    nz = acts.nonzero()
    sparse = ActivationTable.from_sparse(nz[:, 0], nz[:, 1], acts[nz[:, 0], nz[:, 1]], (500, 30))
    a, b = select_images(acts), select_images(sparse, block_concepts=7)
    for x, y in zip(a[:6], b[:6]):
        assert torch.equal(x, y)
    assert {k: v.tolist() for k, v in a.skipped.items()} == {
        k: v.tolist() for k, v in b.skipped.items()
    }
    assert a.skipped["no_active_images"].tolist() == [3]
    assert a.skipped["too_few_images"].tolist() == [4]


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


def test_dense_selection_equals_a_naive_reference_under_heavy_ties() -> None:
    g = torch.Generator().manual_seed(5)
    acts = torch.randint(0, 4, (900, 12), generator=g).float() / 3  # values in {0, 1/3, 2/3, 1}
    acts[:, 0] = torch.randint(0, 2, (900,), generator=g).float()  # ~450 active, all tied
    sel = select_images(acts, block_concepts=5)
    for s, c in enumerate(sel.concept_ids.tolist()):
        col = acts[:, c].tolist()
        active = sorted((i for i in range(900) if col[i] > 0), key=lambda i: (-col[i], i))
        chosen = sel.pair_image[sel.pair_slot == s].tolist()
        assert sorted(chosen) == sorted(active[: n_to_select(len(active))])
