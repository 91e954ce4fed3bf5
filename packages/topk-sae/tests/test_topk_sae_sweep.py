"""Sweeps: selection and Pareto logic on hand-made results, and a tiny resumable grid."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import topk_sae.sweep as sweep_module
from topk_sae import BiasFreeTopKSAE, TensorSource, TrainConfig
from topk_sae.metrics import evaluate
from topk_sae.sweep import RunResult, SweepResult, pareto_front, select_best, sweep


def _run(name: str, k: int, score: float, dead: float = 0.0, dense: float = 0.0, l0: float = 0):
    return RunResult(name, k, 64, 1e-3, score, score, l0 or float(k), dead, dense, f"/{name}")


def test_select_best_prefers_fewer_dead_among_near_ties() -> None:
    runs = [
        _run("a", 16, 0.900, dead=0.30),
        _run("b", 16, 0.897, dead=0.05),  # within 0.005 of a, far fewer dead latents
        _run("c", 16, 0.896, dead=0.01, dense=0.10),  # tied too, but 0.11 bad latents
        _run("d", 16, 0.850, dead=0.00),  # clean but clearly worse
        _run("e", 32, 0.950, dead=0.20),
        _run("f", 32, 0.930, dead=0.00),  # not a near-tie of e
        _run("g", 32, float("nan")),  # diverged
    ]
    best = select_best(runs, tolerance=0.005, top=3)
    assert [r.name for r in best[16]] == ["b", "c", "a"]
    assert [r.name for r in best[32]] == ["e", "f"]
    # Without a tolerance only exact ties count: the best score wins.
    assert [r.name for r in select_best(runs, tolerance=0.0)[16]] == ["a"]
    # A wide tolerance makes d a tie as well, and it has no bad latents at all.
    assert [r.name for r in select_best(runs, tolerance=0.1)[16]] == ["d"]
    with pytest.raises(ValueError, match="tolerance"):
        select_best(runs, tolerance=-1)


def _dominates(o: RunResult, r: RunResult) -> bool:
    return o.l0 <= r.l0 and o.score >= r.score and (o.l0 < r.l0 or o.score > r.score)


def test_pareto_front_matches_brute_force_definition() -> None:
    runs = [
        _run("a", 8, 0.70, l0=8),
        _run("b", 16, 0.80, l0=16),
        _run("c", 16, 0.75, l0=15),
        _run("d", 32, 0.78, l0=31),  # dominated by b (sparser and better)
        _run("e", 32, 0.90, l0=32),
        _run("f", 64, 0.90, l0=60),  # dominated by e (equal score, less sparse)
        _run("g", 8, 0.70, l0=8),  # duplicate of a: neither dominates, both stay
        _run("h", 4, float("nan"), l0=4),
    ]
    front = pareto_front(runs)
    assert [r.name for r in front] == ["a", "g", "c", "b", "e"]
    ok = [r for r in runs if r.ok]
    brute = {r.name for r in ok if not any(_dominates(o, r) for o in ok)}
    assert {r.name for r in front} == brute
    by_k = pareto_front(runs, x="k")
    assert [r.name for r in by_k] == ["a", "g", "b", "e"]


@pytest.fixture()
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 8, generator=gen)
    codes = torch.rand(320, 6, generator=gen) * (torch.rand(320, 6, generator=gen) < 0.4)
    x = codes @ basis + 0.01 * torch.randn(320, 8, generator=gen)
    return x[:256], x[256:]


def _base() -> TrainConfig:
    return TrainConfig(
        n_latents=8, k=1, epochs=2, warmup_epochs=0.5, hold_epochs=0.5, k_aux=4, progress=False
    )


def test_tiny_sweep_trains_scores_selects_and_resumes(
    tmp_path: Path, tiny_data: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    train_x, heldout = tiny_data
    calls: list[str] = []
    real_train = sweep_module.train

    def counting_train(config, source, *, out_dir, resume=True):  # type: ignore[no-untyped-def]
        calls.append(Path(out_dir).name)
        return real_train(config, source, out_dir=out_dir, resume=resume)

    monkeypatch.setattr(sweep_module, "train", counting_train)
    grid = {"k": [1, 3], "n_latents": [8], "lr": [1e-3, 1e-2]}

    def run_grid() -> SweepResult:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the "uncentred features" diagnostic
            return sweep(
                _base(),
                TensorSource(train_x, batch_size=64),
                heldout,
                out_dir=tmp_path,
                progress=False,
                **grid,
            )

    result = run_grid()
    names = ["k1-n8-lr0.001", "k1-n8-lr0.01", "k3-n8-lr0.001", "k3-n8-lr0.01"]
    assert calls == names
    assert [r.name for r in result.runs] == names
    for r in result.runs:
        assert r.ok
        model = BiasFreeTopKSAE.from_pretrained(r.model_dir)
        assert (model.k, model.n_latents) == (r.k, r.n_latents)
        # The recorded score is the held-out explained variance of the saved model.
        assert r.score == pytest.approx(evaluate(model, heldout).explained_variance, rel=1e-9)
        assert r.l0 <= r.k
    assert sorted(result.best_per_k) == [1, 3]
    for k, best in result.best_per_k.items():
        assert best[0].score >= max(r.score for r in result.runs if r.k == k) - 0.005
    assert result.pareto and all(r.ok for r in result.pareto)
    saved = json.loads(result.path.read_text())
    assert set(saved["runs"]) == set(names)
    assert saved["best_per_k"] == {
        str(k): [r.name for r in v] for k, v in result.best_per_k.items()
    }

    # Re-running skips finished runs; a run missing from the results (killed before it was
    # recorded) is trained again -- resumed from its own checkpoints -- and only that one.
    del saved["runs"]["k3-n8-lr0.01"]
    result.path.write_text(json.dumps(saved))
    calls.clear()
    again = run_grid()
    assert calls == ["k3-n8-lr0.01"]
    assert [r.score for r in again.runs] == pytest.approx([r.score for r in result.runs])

    # A custom score function decides the selection (FaCT passes held-out accuracy here).
    custom = sweep(
        _base(),
        TensorSource(train_x, batch_size=64),
        heldout,
        out_dir=tmp_path / "custom",
        score_fn=lambda model, data: -float(model.k) + 0.01 * len(data),
        progress=False,
        k=[1, 3],
        n_latents=[8],
        lr=[1e-3],
    )
    assert [r.score for r in custom.runs] == [-1.0 + 0.64, -3.0 + 0.64]
    assert [r.name for r in custom.best_per_k[1]] == ["k1-n8-lr0.001"]
    assert [r.k for r in pareto_front(custom.runs, x="k")] == [1]  # sparser and better


def test_sweep_refuses_a_changed_base_config_and_bad_grids(
    tmp_path: Path, tiny_data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    train_x, heldout = tiny_data
    src = TensorSource(train_x, batch_size=64)
    with pytest.raises(ValueError, match=r"k must be <= n_latents.*\(16, 8\)"):
        sweep(_base(), src, heldout, out_dir=tmp_path, k=[16], n_latents=[8], lr=[1e-3])
    with pytest.raises(ValueError, match="lr"):
        sweep(_base(), src, heldout, out_dir=tmp_path, k=[1], n_latents=[8], lr=[])
    (tmp_path / "sweep.json").write_text(
        json.dumps({"version": 1, "base_config": {"epochs": 99}, "runs": {}})
    )
    with pytest.raises(ValueError, match="different base config"):
        sweep(_base(), src, heldout, out_dir=tmp_path, k=[1], n_latents=[8], lr=[1e-3])


def test_diverged_runs_are_recorded_not_selected(
    tmp_path: Path, tiny_data: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    train_x, heldout = tiny_data

    def diverging_train(config, source, *, out_dir, resume=True):  # type: ignore[no-untyped-def]
        raise sweep_module.TrainingDivergedError("loss became NaN at step 3")

    monkeypatch.setattr(sweep_module, "train", diverging_train)
    result = sweep(
        _base(),
        TensorSource(train_x, batch_size=64),
        heldout,
        out_dir=tmp_path,
        k=[1],
        n_latents=[8],
        lr=[1e3],
        progress=False,
    )
    (run,) = result.runs
    assert not run.ok and "NaN" in (run.error or "") and math.isnan(run.score)
    assert result.best_per_k == {} and result.pareto == []
