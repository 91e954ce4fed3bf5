"""Whole-set SAE metrics against float64 brute force (numpy), independent of batching."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from topk_sae import BiasFreeTopKSAE, SparseCode, TensorSource
from topk_sae.metrics import (
    MetricsAccumulator,
    evaluate,
    firing_histogram,
    plot_firing_histogram,
)

N_LAT = 12


def _fake_batch(seed: int = 0, n: int = 60, d: int = 6) -> tuple[np.ndarray, ...]:
    """Uncentred inputs (two clusters far from 0), noisy reconstructions and codes with known
    firing: latent 0 fires on every row, latent 1 on 2/3 of rows, latents 10 and 11 never."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 50.0
    x[n // 2 :] += 3.0  # the second half sits elsewhere: per-batch means would be wrong
    recon = x + 0.3 * rng.normal(size=(n, d))
    k = 3
    idx = np.zeros((n, k), dtype=np.int64)
    val = rng.uniform(0.1, 1.0, size=(n, k))
    for i in range(n):
        idx[i] = [0, 1, 2 + i % 8] if i % 3 else [0, 2 + i % 8, 9]
    val[::5, 2] = 0.0  # a selected but zero value does not count as firing
    return x, recon, idx, val


def _brute(x: np.ndarray, recon: np.ndarray, idx: np.ndarray, val: np.ndarray) -> dict:
    fires = np.zeros(N_LAT)
    for row_idx, row_val in zip(idx, val):
        for j, v in zip(row_idx, row_val):
            fires[j] += v != 0
    freq = fires / len(x)
    sse = ((x - recon) ** 2).sum()
    return {
        "fvu": sse / ((x - x.mean(axis=0)) ** 2).sum(),
        "mse": sse / x.size,
        "l0": (val != 0).sum() / len(x),
        "freq": freq,
        "dead": (fires == 0).mean(),
        "dense": (freq > 0.6).mean(),
    }


def _accumulate(batch: tuple[np.ndarray, ...], batch_size: int) -> MetricsAccumulator:
    x, recon, idx, val = (torch.from_numpy(a) for a in batch)
    acc = MetricsAccumulator(N_LAT)
    for i in range(0, len(x), batch_size):
        s = slice(i, i + batch_size)
        acc.update(x[s].float(), recon[s].float(), SparseCode(val[s].float(), idx[s]))
    return acc


@pytest.mark.parametrize("batch_size", [1, 7, 30, 60])
def test_accumulator_equals_brute_force_for_any_batching(batch_size: int) -> None:
    batch = _fake_batch()
    # The accumulator sees float32 inputs: compare with the brute force on the same values.
    x, recon = (a.astype(np.float32).astype(np.float64) for a in batch[:2])
    val = batch[3].astype(np.float32).astype(np.float64)
    expect = _brute(x, recon, batch[2], val)
    m = _accumulate(batch, batch_size).compute()
    assert m.fvu == pytest.approx(expect["fvu"], rel=1e-10)
    assert m.explained_variance == pytest.approx(1 - expect["fvu"], rel=1e-10)
    assert m.mse == pytest.approx(expect["mse"], rel=1e-10)
    assert m.l0 == pytest.approx(expect["l0"], rel=1e-12)
    np.testing.assert_allclose(m.firing_frequency.numpy(), expect["freq"], rtol=0, atol=0)
    assert m.dead_fraction == pytest.approx(expect["dead"]) == 2 / N_LAT
    assert m.always_active_fraction == pytest.approx(expect["dense"]) == 2 / N_LAT
    assert m.num_rows == 60


def test_per_batch_or_about_zero_variance_would_be_detected() -> None:
    """The brute-force FVU differs clearly from the buggy variants, so the test above bites."""
    x, recon, _, _ = _fake_batch()
    right = _brute(*_fake_batch())["fvu"]
    halves = [slice(0, 30), slice(30, 60)]
    per_batch = np.mean(
        [((x[h] - recon[h]) ** 2).sum() / ((x[h] - x[h].mean(0)) ** 2).sum() for h in halves]
    )
    about_zero = ((x - recon) ** 2).sum() / (x**2).sum()
    assert abs(per_batch - right) > 0.1 * right
    assert about_zero < 0.01 * right
    m = _accumulate(_fake_batch(), 30).compute()
    assert m.fvu == pytest.approx(right, rel=1e-6)


def test_large_offset_does_not_cancel() -> None:
    """Features with mean 1e6 and unit spread: naive Σx² − (Σx)²/N in float64 loses digits."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 3)) + 1e6
    recon = x + rng.normal(size=x.shape)
    zeros = torch.zeros(4000, 1)
    acc = MetricsAccumulator(1)
    for i in range(0, 4000, 333):
        xs, rs = torch.from_numpy(x[i : i + 333]), torch.from_numpy(recon[i : i + 333])
        acc.update(xs, rs, SparseCode(zeros[: len(xs)], zeros[: len(xs)].long()))
    expect = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert acc.compute().fvu == pytest.approx(expect, rel=1e-9)


def test_evaluate_matches_brute_force_on_a_real_sae() -> None:
    torch.manual_seed(0)
    d, n = 8, 257
    sae = BiasFreeTopKSAE(d, N_LAT, 3, input_scale=2.0)
    x = torch.randn(n, d) + 3.0
    with torch.no_grad():
        recon, (val, idx) = sae(x)
    expect = _brute(x.double().numpy(), recon.double().numpy(), idx.numpy(), val.numpy())
    for batch_size in (16, 100, 1000):
        m = evaluate(sae, x, batch_size=batch_size)
        assert m.fvu == pytest.approx(expect["fvu"], rel=1e-6)
        assert m.l0 == pytest.approx(expect["l0"], abs=1e-12)
        np.testing.assert_allclose(m.firing_frequency.numpy(), expect["freq"], atol=1e-12)
        assert m.dead_fraction == pytest.approx(expect["dead"])

    # A batch source is read for one whole epoch and then put back where it was.
    src = TensorSource(x, batch_size=50, seed=3)
    src.set_epoch(4)
    it = iter(src)
    next(it)
    before = src.state_dict()
    m_src = evaluate(sae, src)
    assert m_src.num_rows == n
    assert m_src.fvu == pytest.approx(expect["fvu"], rel=1e-6)
    assert src.state_dict() == before


def test_always_active_threshold_is_configurable() -> None:
    batch = _fake_batch()
    x, recon, idx, val = (torch.from_numpy(a) for a in batch)
    # Frequencies: latent 0 fires on 1.0 of rows, latent 1 on 2/3, latents 2-9 on 0.1-0.37.
    for threshold, expected in [(0.6, 2), (0.99, 1), (1.0, 0), (0.05, 10)]:
        acc = MetricsAccumulator(N_LAT, always_active_threshold=threshold)
        acc.update(x, recon, SparseCode(val, idx))
        assert acc.compute().always_active_fraction == pytest.approx(expected / N_LAT)
    with pytest.raises(ValueError, match="always_active_threshold"):
        MetricsAccumulator(N_LAT, always_active_threshold=0.0)


def test_bad_input_and_empty_accumulator() -> None:
    acc = MetricsAccumulator(4)
    with pytest.raises(ValueError, match="no rows"):
        acc.compute()
    good = SparseCode(torch.ones(3, 2), torch.tensor([[0, 1], [1, 2], [2, 3]]))
    acc.update(torch.randn(3, 5), torch.zeros(3, 5), good)
    before = acc.compute()
    code = SparseCode(torch.ones(3, 2), torch.tensor([[0, 1], [1, 2], [2, 4]]))
    with pytest.raises(ValueError, match="n_latents=4"):
        acc.update(torch.randn(3, 5), torch.zeros(3, 5), code)
    after = acc.compute()  # the rejected batch left no trace
    assert (after.num_rows, after.fvu, after.l0) == (before.num_rows, before.fvu, before.l0)
    with pytest.raises(ValueError, match=r"\(N, d_in\)"):
        acc.update(torch.zeros(3, 5), torch.zeros(3, 4), code)


def test_state_dict_round_trip_continues_exactly() -> None:
    batch = _fake_batch()
    x, recon, idx, val = (torch.from_numpy(a) for a in batch)
    full = MetricsAccumulator(N_LAT)
    full.update(x, recon, SparseCode(val, idx))
    first = MetricsAccumulator(N_LAT)
    first.update(x[:25], recon[:25], SparseCode(val[:25], idx[:25]))
    second = MetricsAccumulator(N_LAT)
    second.load_state_dict(first.state_dict())
    second.update(x[25:], recon[25:], SparseCode(val[25:], idx[25:]))
    a, b = full.compute(), second.compute()
    assert a.fvu == pytest.approx(b.fvu, rel=1e-12)
    assert torch.equal(a.firing_frequency, b.firing_frequency)


def test_firing_histogram_matches_numpy() -> None:
    freq = torch.tensor([0.0, 0.0, 1e-4, 3e-4, 2e-3, 0.05, 0.5, 0.9, 1.0], dtype=torch.float64)
    hist = firing_histogram(freq, bins=8)
    assert hist.num_dead == 2
    assert hist.edges_log10[0] == -4.0 and hist.edges_log10[-1] == 0.0
    expect, edges = np.histogram(np.log10(freq[freq > 0].numpy()), bins=8, range=(-4.0, 0.0))
    np.testing.assert_array_equal(hist.counts.numpy(), expect)
    np.testing.assert_allclose(hist.edges_log10.numpy(), edges)
    clipped = firing_histogram(freq, bins=2, min_log10=-2.0)
    assert clipped.counts.tolist() == [3 + 1, 3]  # 1e-4, 3e-4, 2e-3 fall into the first bin
    with pytest.raises(ValueError, match="fractions"):
        firing_histogram(torch.tensor([1.5]))


def test_plot_firing_histogram(tmp_path: Path) -> None:
    # matplotlib (the `plot` extra) is in the test group, so this runs in CI: no skip.
    m = evaluate(BiasFreeTopKSAE(4, N_LAT, 2), torch.randn(64, 4))
    out = plot_firing_histogram(m, tmp_path / "plots" / "hist.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_firing_histogram(torch.tensor([0.5]), "unused.png")
    assert math.isfinite(firing_histogram(torch.tensor([0.5])).edges_log10[0].item())
