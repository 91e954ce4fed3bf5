"""explanation_mode: walks the module tree on every entry, nests, restores state, sees new heads."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bcos_layers
from bcos_layers import BcosConv2d, BcosLinear, explanation_mode
from bcos_layers.explanation_mode import explainable_modules


def _states(model: nn.Module) -> list[bool]:
    return [m.is_in_explanation_mode for m in explainable_modules(model)]


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return bcos_layers.create("tiny_resnet")


def test_enter_exit_nesting_and_method(tiny: nn.Module) -> None:
    assert not any(_states(tiny))
    with tiny.explanation_mode():
        assert all(_states(tiny))
        with explanation_mode(tiny):
            assert all(_states(tiny))
        assert all(_states(tiny))  # inner exit restores the outer state, not "off"
        with explanation_mode(tiny, active=False):
            assert not any(_states(tiny))
        assert all(_states(tiny))
    assert not any(_states(tiny))


def test_restores_on_exception(tiny: nn.Module) -> None:
    with pytest.raises(RuntimeError, match="boom"), explanation_mode(tiny):
        raise RuntimeError("boom")
    assert not any(_states(tiny))


def test_reusing_one_context_object(tiny: nn.Module) -> None:
    ctx = tiny.explanation_mode()
    for _ in range(2):
        with ctx:
            assert all(_states(tiny))
        assert not any(_states(tiny))


def test_swapped_head_is_explained() -> None:
    """A head swapped in after first use is switched too (the official library misses it)."""
    model = bcos_layers.create("tiny_resnet")
    with model.explanation_mode():  # first use
        pass
    model.fc = BcosConv2d(model.num_features, 3, kernel_size=1)
    model.extra = nn.Sequential(BcosLinear(3, 3))  # an inserted module
    with model.explanation_mode():
        assert model.fc.is_in_explanation_mode
        assert model.extra[0].is_in_explanation_mode
    assert not model.fc.is_in_explanation_mode
    # and explanations with the new head are exact (complete)
    x = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(0))
    ex = bcos_layers.explain(model, x)
    assert (
        ex.completeness_error.abs().max() <= 1e-5 * ex.contributions.abs().flatten(1).sum(1).max()
    )


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_head_swapped_inside_the_block_is_explained_and_restored() -> None:
    """``model.fc = new`` inside ``with explanation_mode(model)``: the next forward switches it."""
    torch.manual_seed(0)
    model = bcos_layers.create("tiny_resnet")
    new_head = BcosConv2d(model.num_features, 10, kernel_size=1)
    x = _x()
    with model.explanation_mode():
        model.fc = new_head
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        assert new_head.is_in_explanation_mode
        (w,) = torch.autograd.grad(out[:, 3].sum(), xg)
        with explanation_mode(model, active=False):  # an inner "off" block wins, then restores
            model(x)
            assert not new_head.is_in_explanation_mode
        assert new_head.is_in_explanation_mode
    assert not any(_states(model))
    # the gradient taken inside the block is the exact dynamic linear map W(x) of the new head
    ex = bcos_layers.explain(model, x, 3)
    torch.testing.assert_close(w, ex.weights, rtol=1e-5, atol=1e-7 * float(ex.weights.abs().max()))
    # ... which is not the plain gradient
    xp = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xp)[:, 3].sum(), xp)
    assert not torch.allclose(plain, ex.weights, rtol=1e-2, atol=0.0)


def test_official_library_misses_swapped_head(bcos_oracle) -> None:
    """Documents the upstream bug our context manager fixes (bcos 0.1.3 caches the list)."""
    pretrained = bcos_oracle("bcos.models.pretrained")
    OfficialBcosConv2d = bcos_oracle("bcos.modules").BcosConv2d

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pretrained.resnet18(pretrained=False, num_classes=4).eval()
    with ref.explanation_mode():
        pass
    ref.fc = OfficialBcosConv2d(512, 4)
    with ref.explanation_mode():
        official_sees_it = ref.fc.is_in_explanation_mode
    with explanation_mode(ref):  # ours works on official models as well
        ours_sees_it = ref.fc.is_in_explanation_mode
    assert not official_sees_it
    assert ours_sees_it
