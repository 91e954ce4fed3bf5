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
from topk_sae.checkpoint import CheckpointManager
from topk_sae.trainer import Schedule, estimate_input_stats

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
