"""Trainer: schedules, learning on synthetic sparse data, scaling, dead/always-active tracking,
initialisation, validation and the NaN guard."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch

from topk_sae import (
    BiasFreeTopKSAE,
    TensorSource,
    TrainConfig,
    TrainingDivergedError,
    train,
)
from topk_sae import trainer as trainer_module
from topk_sae.checkpoint import CheckpointManager
from topk_sae.trainer import (
    LossParts,
    Schedule,
    compute_loss,
    estimate_input_stats,
    make_optimizer,
    training_step,
)

BASE = TrainConfig(
    n_latents=32,
    k=3,
    epochs=2,
    lr=1e-2,
    warmup_epochs=0.25,
    hold_epochs=0.25,
    progress=False,
    log_every=1,
)


def sparse_data(
    n: int = 1024, d: int = 16, atoms: int = 24, k: int = 3, seed: int = 0
) -> torch.Tensor:
    """Rows that are non-negative combinations of k of ``atoms`` random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=gen).argsort(dim=1)[:, :k]
    coef = torch.rand(n, k, generator=gen) + 0.5
    return torch.einsum("nk,nkd->nd", coef, dictionary[idx])


def test_schedule_warmup_hold_cosine() -> None:
    cfg = dataclasses.replace(BASE, epochs=10, warmup_epochs=2, hold_epochs=1, min_lr_ratio=0.1)
    sched = Schedule(cfg, steps_per_epoch=10, total_steps=100, d_in=16)
    factors = [sched.lr_factor(s) for s in range(100)]
    assert factors[:20] == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert factors[20:30] == pytest.approx([1.0] * 10)
    assert factors[30] == pytest.approx(1.0)
    assert factors[65] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 35 / 70)))
    assert all(a >= b for a, b in itertools.pairwise(factors[30:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_k_annealing_is_linear_to_k() -> None:
    cfg = dataclasses.replace(BASE, k_anneal_steps=10, k_anneal_start=13)
    sched = Schedule(cfg, steps_per_epoch=5, total_steps=20, d_in=16)
    assert [sched.k_at(s) for s in (0, 5, 10, 15)] == [13, 8, 3, 3]


def test_training_learns_sparse_data(tmp_path: Path) -> None:
    x = sparse_data()
    res = train(
        dataclasses.replace(BASE, epochs=10),
        TensorSource(x, batch_size=64),
        out_dir=tmp_path,
    )
    first, last = res.history[0], res.history[-1]
    assert last["fvu_batch"] < 0.5 * first["fvu_batch"]
    assert last["fvu_batch"] < 0.2
    # The saved model works on RAW features: full-set FVU about the per-dimension mean.
    model = BiasFreeTopKSAE.from_pretrained(res.model_dir)
    with torch.no_grad():
        recon = model(x).recon
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.2
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(32))
    assert len(res.epoch_stats) == 10
    assert (tmp_path / "history.json").is_file()


def test_input_scale_is_estimated_saved_and_makes_training_scale_free(tmp_path: Path) -> None:
    x = sparse_data(n=512)
    cfg = dataclasses.replace(BASE, epochs=1)
    a = train(cfg, TensorSource(x, batch_size=128), out_dir=tmp_path / "a")
    b = train(cfg, TensorSource(37.0 * x, batch_size=128), out_dir=tmp_path / "b")
    expected = math.sqrt(float(x.double().pow(2).sum(1).mean()))
    assert float(a.model.input_scale) == pytest.approx(expected, rel=1e-6)
    assert float(b.model.input_scale) == pytest.approx(37.0 * expected, rel=1e-6)
    torch.testing.assert_close(a.model.W_dec, b.model.W_dec, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.model.W_enc, b.model.W_enc, rtol=1e-4, atol=1e-5)
    loaded = BiasFreeTopKSAE.from_pretrained(b.model_dir)
    assert float(loaded.input_scale) == pytest.approx(37.0 * expected, rel=1e-6)


def test_dead_latents_are_tracked_and_auxk_turns_on(tmp_path: Path) -> None:
    x = sparse_data(n=512, atoms=4)  # only 4 directions: most of 32 latents cannot fire
    res = train(
        dataclasses.replace(BASE, epochs=3, dead_after_tokens=256, k_aux=8),
        TensorSource(x, batch_size=64),
        out_dir=tmp_path,
    )
    assert max(h["num_dead"] for h in res.history) > 0
    assert max(h["auxk"] for h in res.history) > 0
    assert all(h["num_dead"] == 0 for h in res.history[:3])  # nothing is dead before 256 rows
    assert res.epoch_stats[-1]["dead_fraction"] > 0


def test_always_active_latents_are_flagged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 16) * 0.05 + 3.0  # one dominant direction: some latent fires always
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(
            dataclasses.replace(BASE, epochs=1, k=8, always_active_threshold=0.9),
            TensorSource(x, batch_size=64),
            out_dir=tmp_path,
        )
    assert res.epoch_stats[0]["always_active_fraction"] >= 1 / 32
    assert res.epoch_stats[0]["mean_l0"] == pytest.approx(8.0)


def test_uncentred_features_warn_with_the_ratio(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = TensorSource(torch.randn(300, 8) + 5.0, batch_size=100)
    stats, _ = estimate_input_stats(source, max_rows=10_000)
    # ||mean|| = 5 sqrt(8), spread = sqrt(8) (unit variance per dimension)
    assert stats["mean_spread_ratio"] == pytest.approx(5.0, rel=0.1)
    with pytest.warns(UserWarning, match=r"uncentred: \|\|mean\|\| / spread = [45]\.\d\d"):
        res = train(dataclasses.replace(BASE, epochs=0.5), source, out_dir=tmp_path)
    assert res.input_stats["mean_spread_ratio"] == pytest.approx(stats["mean_spread_ratio"])
    centred = TensorSource(torch.randn(300, 8), batch_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(dataclasses.replace(BASE, epochs=0.5), centred, out_dir=tmp_path / "c")


def test_data_point_initialisation_uses_data_directions(tmp_path: Path) -> None:
    x = sparse_data(n=256)
    cfg = dataclasses.replace(BASE, init="data", data_init_blend=1.0, lr=1e-12, epochs=0.25)
    res = train(cfg, TensorSource(x, batch_size=64), out_dir=tmp_path)
    unit = x / x.norm(dim=1, keepdim=True)
    best = (res.model.W_dec @ unit.T).max(dim=1).values
    assert float(best.detach().min()) > 0.9999  # every atom is (almost exactly) a data point


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"k": 40}, "k=40 must be <= n_latents=32"),
        ({"n_latents": 0}, "n_latents must be a positive integer"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"always_active_threshold": 1.5}, "always_active_threshold"),
        ({"k_anneal_start": 2}, "k_anneal_start"),
    ],
)
def test_config_validation(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **changes)


def test_d_in_mismatch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="d_in=8 does not match the source's d_in=16"):
        train(
            dataclasses.replace(BASE, d_in=8), TensorSource(sparse_data(n=64), 32), out_dir=tmp_path
        )
    with pytest.raises(ValueError, match="2-D"):
        TensorSource(torch.randn(2, 3, 4))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    x = sparse_data(n=640)
    x[600] = float("nan")  # in the last batch of epoch 0 when unshuffled
    with pytest.raises(ValueError, match="non-finite features"):
        train(BASE, TensorSource(x, batch_size=64, shuffle=False), out_dir=tmp_path / "x")
    # The scale is estimated from the first batch only, so the NaN is met during training.
    cfg = dataclasses.replace(BASE, checkpoint_every=3, scale_estimation_rows=64)
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss .* step 9"):
        train(cfg, TensorSource(x, batch_size=64, shuffle=False), out_dir=tmp_path)
    ckpt = CheckpointManager(tmp_path).load_latest()
    assert ckpt is not None and ckpt.state["step"] == 9
    assert all(torch.isfinite(t).all() for t in ckpt.model.values())
    assert not (tmp_path / "model").exists()


def test_one_row_batches_with_dead_latents_train_without_nan(tmp_path: Path) -> None:
    # The reproduction of issue 9: 65 rows in batches of 64 leave a 1-row batch every epoch;
    # once a latent is dead, AuxK's normaliser (the residual variance) of that batch is 0.
    x = torch.randn(65, 8, generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(
        n_latents=32,
        k=2,
        epochs=4,
        lr=1e-2,
        warmup_epochs=0.5,
        hold_epochs=0.5,
        dead_after_tokens=10,
        k_aux=8,
        progress=False,
        log_every=1,
    )
    res = train(cfg, TensorSource(x, batch_size=64, seed=0), out_dir=tmp_path)
    one_row_steps = [h for h in res.history if h["step"] % 2 == 0]  # batches 64, 1, 64, 1, ...
    assert any(h["num_dead"] > 0 for h in one_row_steps)  # the AuxK path was taken
    assert all(h["auxk"] == 0.0 for h in one_row_steps)  # ... and skipped
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


@pytest.mark.parametrize("rows", ["one row", "identical rows"])
def test_auxk_without_residual_spread_is_zero_with_finite_gradient(rows: str) -> None:
    torch.manual_seed(0)
    model = BiasFreeTopKSAE(8, 32, 2)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::2] = True
    # Three identical float32 rows: the batch mean is off by rounding, so the residual variance
    # is ~1e-15 instead of 0 (before the fix: an AuxK loss of 4e15).
    x = torch.randn(1, 8) if rows == "one row" else torch.randn(1, 8).expand(3, 8).clone()
    parts = compute_loss(model, x, k=2, dead_n=dead, k_aux=8, auxk_coef=1 / 32)
    assert parts.forward.aux_recon_ND is not None  # dead latents were selected
    assert float(parts.auxk.detach()) == 0.0  # not NaN, not ~1e17 from a rounding-noise normaliser
    parts.total.backward(retain_graph=True)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The gradient is the reconstruction term's alone.
    model.zero_grad()
    parts.mse.backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    # With spread (distinct rows) the same dead latents give a positive AuxK loss.
    spread = compute_loss(model, torch.randn(16, 8), k=2, dead_n=dead, k_aux=8, auxk_coef=1 / 32)
    assert float(spread.auxk.detach()) > 0


def _nan_gradient_from_call(monkeypatch: pytest.MonkeyPatch, bad_call: int) -> None:
    """Make the ``bad_call``-th loss (0-based) have a finite value but a NaN gradient."""
    calls = itertools.count()
    original = trainer_module.compute_loss

    def poisoned(model: BiasFreeTopKSAE, *args: object, **kwargs: object) -> LossParts:
        parts = original(model, *args, **kwargs)
        if next(calls) != bad_call:
            return parts
        zero = model.W_dec.sum() - model.W_dec.sum().detach()  # 0, with gradient 1
        return parts._replace(total=parts.total + 0.0 * torch.sqrt(zero))  # d sqrt(0) = inf

    monkeypatch.setattr(trainer_module, "compute_loss", poisoned)


def test_nan_gradient_without_clipping_is_never_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_gradient_from_call(monkeypatch, bad_call=0)
    torch.manual_seed(0)
    model = BiasFreeTopKSAE(16, 32, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, lr=1e-2)
    _, loss, grad_norm = training_step(
        model, opt, sparse_data(n=64), k=3, dead_n=None, k_aux=8, auxk_coef=0.0, grad_clip_norm=None
    )
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_nan_gradient_without_clipping_stops_before_any_checkpoint_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_gradient_from_call(monkeypatch, bad_call=2)
    cfg = dataclasses.replace(BASE, grad_clip_norm=None, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError, match=r"non-finite gradient norm .* at step 2 "):
        train(cfg, TensorSource(sparse_data(n=256), batch_size=64), out_dir=tmp_path)
    ckpt = CheckpointManager(tmp_path).load_latest()
    assert ckpt is not None and ckpt.state["step"] == 2  # the last good one, before the bad step
    assert all(torch.isfinite(t).all() for t in ckpt.model.values())
    assert all(torch.isfinite(t).all() for t in ckpt.optimizer["state"][0].values())
