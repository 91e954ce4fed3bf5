import pytest
import torch
from concept_deletion_helpers import assert_close

from concept_deletion import Layout, Reduction, apply_masks, check_codes, reduce_positions


def test_check_codes_rejects_wrong_rank_and_dtype() -> None:
    with pytest.raises(ValueError, match="needs 4 dims"):
        check_codes(torch.zeros(2, 3), "BKHW")
    with pytest.raises(TypeError, match="floating-point"):
        check_codes(torch.zeros(2, 3, dtype=torch.long), "BK")
    with pytest.raises(ValueError, match="layout must be one of"):
        check_codes(torch.zeros(2, 3), "KB")
    assert check_codes(torch.zeros(2, 3, 4), "BTK") is Layout.BTK


@pytest.mark.parametrize(
    ("layout", "shape", "k_axis"),
    [("BKHW", (2, 3, 4, 5), 1), ("BTK", (2, 4, 3), 2), ("BK", (2, 3), 1)],
)
def test_apply_masks_scales_each_concept_at_every_position(
    layout: str, shape: tuple[int, ...], k_axis: int
) -> None:
    codes = torch.rand(shape)
    masks = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])
    out = apply_masks(codes, masks, layout)
    for m in range(2):
        for k in range(3):
            assert_close(out[m].select(k_axis - 1, k), codes[m].select(k_axis - 1, k) * masks[m, k])
    with pytest.raises(ValueError, match="masks must be"):
        apply_masks(codes, torch.ones(2, 4), layout)


def test_reductions_against_explicit_loops() -> None:
    x = torch.randn(2, 3, 4, 5)
    flat = x.flatten(2)
    assert_close(reduce_positions(x, "BKHW", "sum"), flat.sum(-1))
    assert_close(reduce_positions(x, "BKHW", "mean"), flat.mean(-1))
    assert_close(reduce_positions(x, "BKHW", "max_abs"), flat.abs().max(-1).values)
    assert_close(reduce_positions(x, "BKHW", "sum_abs"), flat.abs().sum(-1))
    assert_close(reduce_positions(x, "BKHW", "mean_abs"), flat.abs().mean(-1))
    tok = x.flatten(2).transpose(1, 2)  # (B, T, K)
    assert_close(reduce_positions(tok, "BTK", Reduction.MAX_ABS), flat.abs().amax(-1))
    v = torch.randn(2, 3)
    assert_close(reduce_positions(v, "BK", "sum"), v)
    assert_close(reduce_positions(v, "BK", "max_abs"), v.abs())
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_positions(x, "BKHW", "median")
