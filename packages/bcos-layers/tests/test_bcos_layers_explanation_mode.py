"""explanation_mode: walks the module tree on every entry, nests, restores state, sees new heads."""

from __future__ import annotations

import importlib
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


def test_official_library_misses_swapped_head() -> None:
    """Documents the upstream bug our context manager fixes (bcos 0.1.3 caches the list)."""
    pretrained = importlib.import_module(
        "bcos.models.pretrained"
    )  # the oracle is in the test group: never skip
    from bcos.modules import BcosConv2d as OfficialBcosConv2d

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
