"""B-cos training support: loss parity with bcos 0.1.3, the uniform prior, AGC, a tiny run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bcos_layers.training import (
    EpochStats,
    UniformOffLabelBCELoss,
    adaptive_clip_grad_,
    evaluate,
    train_one_epoch,
    uniform_prior_logit_bias,
)


def test_logit_bias_gives_uniform_prior() -> None:
    assert uniform_prior_logit_bias(1000) == -math.log(999) == pytest.approx(-6.906754778648554)
    for c in (2, 10, 1000):
        assert torch.sigmoid(
            torch.tensor(uniform_prior_logit_bias(c), dtype=torch.float64)
        ).item() == pytest.approx(1 / c, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        uniform_prior_logit_bias(1)


@pytest.mark.parametrize("off_label", [None, 2e-3])
def test_loss_matches_official(off_label: float | None, bcos_oracle) -> None:
    UniformOffLabelsBCEWithLogitsLoss = bcos_oracle(
        "bcos.modules.losses"
    ).UniformOffLabelsBCEWithLogitsLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    labels = torch.randint(0, 7, (5,), generator=g)
    dense = torch.softmax(torch.randn(5, 7, generator=g), 1)  # e.g. mixup targets
    for reduction in ("mean", "sum", "none"):
        ours = UniformOffLabelBCELoss(off_label, reduction)
        theirs = UniformOffLabelsBCEWithLogitsLoss(reduction, off_label)
        for target in (labels, dense):
            torch.testing.assert_close(ours(logits, target), theirs(logits, target), rtol=0, atol=0)


def test_loss_targets_and_zero_gradient_at_the_prior() -> None:
    loss_fn = UniformOffLabelBCELoss()
    c = 5
    labels = torch.tensor([0, 3])
    t = loss_fn.targets(torch.zeros(2, c), labels)
    assert torch.equal(t[0], torch.tensor([1.0, 0.2, 0.2, 0.2, 0.2]))
    assert torch.equal(t[1], torch.tensor([0.2, 0.2, 0.2, 1.0, 0.2]))
    # An untrained model (pre-bias output 0) predicts 1/C: off-label logits get no gradient.
    logits = torch.full((2, c), uniform_prior_logit_bias(c), requires_grad=True)
    loss_fn(logits, labels).backward()
    grad = logits.grad
    assert grad is not None
    on = torch.nn.functional.one_hot(labels, c).bool()
    assert grad[~on].abs().max() < 1e-8
    assert (grad[on] < 0).all()  # the true class is pushed up
    # off_label=0 is plain one-hot BCE (the official class would silently use 1/C here).
    plain = UniformOffLabelBCELoss(off_label=0.0)
    x = torch.randn(2, c)
    torch.testing.assert_close(
        plain(x, labels),
        nn.functional.binary_cross_entropy_with_logits(x, on.float()),
    )


def test_loss_bad_input() -> None:
    loss_fn = UniformOffLabelBCELoss()
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        loss_fn(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class indices"):
        loss_fn(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        loss_fn(torch.zeros(2, 4, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="off_label"):
        UniformOffLabelBCELoss(off_label=1.0)


def _official_agc(bcos_oracle):
    """bcos.training.agc without bcos.training/__init__ (which needs pytorch_lightning)."""
    bcos = bcos_oracle("bcos")

    path = Path(bcos.__file__).parent / "training" / "agc.py"
    spec = importlib.util.spec_from_file_location("_bcos_agc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.adaptive_clip_grad_


def test_agc_matches_official(bcos_oracle) -> None:
    official = _official_agc(bcos_oracle)
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 6, 3, 3), (10, 16), (16,), (100, 2048, 1, 1), (), (1,)]
    ours = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    for a, b in zip(ours, theirs):
        # Per-unit gradient scales spanning 1e-5..0.1 so that some units are clipped, others not.
        unit_shape = (a.shape[0], *[1] * (a.ndim - 1)) if a.ndim > 1 else ()
        scale = 0.1 * torch.rand(unit_shape, generator=g) ** 4
        grad = torch.randn(a.shape, generator=g) * scale
        a.grad, b.grad = grad.clone(), grad.clone()
    before = [p.grad.clone() for p in ours]
    adaptive_clip_grad_(ours)
    official(theirs)
    clipped_any = unclipped_any = False
    for a, b, g0 in zip(ours, theirs, before):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
        clipped_any |= not torch.equal(a.grad, g0)
        unclipped_any |= bool((a.grad == g0).any())
    assert clipped_any and unclipped_any


def _colour_data(n: int, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: images dominated by red, green, blue or yellow, with noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1, 0.1, 0.1], [0.1, 1, 0.1], [0.1, 0.1, 1], [1, 1, 0.1]])
    y = torch.randint(0, 4, (n,), generator=g)
    rgb = colours[y][:, :, None, None] * 0.6 + 0.4 * torch.rand(n, 3, size, size, generator=g)
    rgb = rgb.clamp(0, 1)
    return torch.cat([rgb, 1 - rgb], 1), y


def test_train_tiny_bcos_resnet_learns() -> None:
    from bcos_layers.models import create

    torch.manual_seed(0)
    model = create("tiny_resnet", num_classes=4)
    x, y = _colour_data(96)
    xv, yv = _colour_data(64, seed=1)
    loader = list(zip(x.split(16), y.split(16)))
    val = list(zip(xv.split(32), yv.split(32)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = evaluate(model, val, progress=False)
    assert isinstance(before, EpochStats) and before.num_samples == 64
    first = train_one_epoch(model, loader, optimizer, progress=False)
    for _ in range(6):  # eval mode lags: BatchNorm running variances need a few epochs
        last = train_one_epoch(model, loader, optimizer, progress=False)
    after = evaluate(model, val, progress=False)
    assert last.loss < first.loss
    assert after.loss < before.loss
    assert last.accuracy == 1.0
    assert after.accuracy >= 0.9 > before.accuracy + 0.3
    # With soft off-label targets 1/C the loss is bounded below by the targets' entropy.
    t = torch.tensor([1.0] + [0.25] * 3)
    floor = float(-(t * t.clamp_min(1e-12).log() + (1 - t) * (1 - t).clamp_min(1e-12).log()).mean())
    assert floor <= last.loss < floor + 0.01


def test_train_one_epoch_steps_scheduler_and_stops() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(6 * 12 * 12, 4))
    x, y = _colour_data(40)
    loader = list(zip(x.split(8), y.split(8)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    stats = train_one_epoch(
        model, loader, optimizer, scheduler=scheduler, max_steps=3, progress=False
    )
    assert stats.num_samples == 24
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # dense (mixup-style) targets are accepted; accuracy uses their argmax
    dense = [(xb, nn.functional.one_hot(yb, 4).float()) for xb, yb in loader]
    assert train_one_epoch(model, dense, optimizer, progress=False).num_samples == 40
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(model, [], optimizer, progress=False)
    with pytest.raises(FloatingPointError, match="step 0"):
        train_one_epoch(model, [(x[:2] * float("nan"), y[:2])], optimizer, progress=False)
