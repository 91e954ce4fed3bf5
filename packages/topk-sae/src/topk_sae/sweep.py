"""Hyper-parameter sweeps over (k, n_latents, lr), checkpoint selection and the Pareto front.

``sweep`` trains every grid point with ``topk_sae.train`` (one sub-directory per run, each run
resumable), scores it on a held-out split with a user-supplied function (default: explained
variance; FaCT passes held-out accuracy with the SAE spliced in) and records the results in an
atomically written ``sweep.json``, so an interrupted sweep continues where it stopped.
``select_best`` picks per k the best runs, preferring fewer dead / always-active latents among
near-ties (FaCT, Sec. 4: top runs per TopK by held-out accuracy, ties broken by dead and
always-active latents); ``pareto_front`` lists the runs not beaten on both sparsity and score.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from torch import Tensor
from tqdm.auto import tqdm

from topk_sae import distributed as dist
from topk_sae.config import TrainConfig
from topk_sae.data import BatchSource
from topk_sae.fileio import atomic_write_json, read_json
from topk_sae.metrics import SAEMetrics, evaluate
from topk_sae.sae import BiasFreeTopKSAE
from topk_sae.trainer import TrainingDivergedError, train

__all__ = [
    "RunResult",
    "ScoreFn",
    "SweepResult",
    "pareto_front",
    "select_best",
    "sweep",
]

RESULTS_NAME = "sweep.json"
RESULTS_VERSION = 1

ScoreFn = Callable[[BiasFreeTopKSAE, Any], float]
"""``score_fn(model, heldout) -> float``, higher is better."""


class RunResult(NamedTuple):
    """One grid point: its hyper-parameters, held-out score and held-out metrics."""

    name: str
    k: int
    n_latents: int
    lr: float
    score: float
    """Held-out score (higher is better); NaN if training diverged."""
    explained_variance: float
    l0: float
    dead_fraction: float
    always_active_fraction: float
    model_dir: str
    """Directory of the trained model (``BiasFreeTopKSAE.from_pretrained`` loads it)."""
    error: str | None = None
    """Why training failed, or ``None``."""

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.score)


class SweepResult(NamedTuple):
    """All runs of a sweep, the selection per k and the Pareto front."""

    runs: list[RunResult]
    best_per_k: dict[int, list[RunResult]]
    pareto: list[RunResult]
    path: Path
    """The ``sweep.json`` holding these results."""


def run_name(k: int, n_latents: int, lr: float) -> str:
    """Directory name of a grid point, e.g. ``k32-n16384-lr0.001``."""
    return f"k{k}-n{n_latents}-lr{lr:g}"


def _grid_config(base: TrainConfig) -> dict[str, Any]:
    """The base config without the swept fields (what must not change when resuming)."""
    out = base.to_dict()
    for key in ("k", "n_latents", "lr", "progress"):
        out.pop(key)
    return out


def _positive_ints(name: str, values: Iterable[int]) -> list[int]:
    out = list(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {out!r}")
    return out


def select_best(
    runs: Sequence[RunResult], *, tolerance: float = 0.005, top: int = 1
) -> dict[int, list[RunResult]]:
    """Per k, the ``top`` best runs: runs within ``tolerance`` of the best score count as tied
    and come first, ordered by fewer dead + always-active latents, then by score; the others
    follow by score. Failed runs are never selected."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if top <= 0:
        raise ValueError(f"top must be positive, got {top}")
    out: dict[int, list[RunResult]] = {}
    for k in sorted({r.k for r in runs}):
        ok = [r for r in runs if r.k == k and r.ok]
        if not ok:
            continue
        best = max(r.score for r in ok)
        tied = [r for r in ok if r.score >= best - tolerance]
        rest = [r for r in ok if r.score < best - tolerance]
        tied.sort(key=lambda r: (r.dead_fraction + r.always_active_fraction, -r.score, r.name))
        rest.sort(key=lambda r: (-r.score, r.name))
        out[k] = (tied + rest)[:top]
    return out


def pareto_front(runs: Sequence[RunResult], *, x: Literal["l0", "k"] = "l0") -> list[RunResult]:
    """Runs not dominated in (sparsity ``x``, lower is better; score, higher is better), sorted by
    ``x``. A run is dominated when another is at least as sparse and at least as good, and
    strictly better in one of the two. Failed runs are left out."""
    if x not in ("l0", "k"):
        raise ValueError(f"x must be 'l0' or 'k', got {x!r}")
    ok = [r for r in runs if r.ok]

    def dominated(r: RunResult) -> bool:
        rx = getattr(r, x)
        return any(
            getattr(o, x) <= rx and o.score >= r.score and (getattr(o, x) < rx or o.score > r.score)
            for o in ok
        )

    return sorted((r for r in ok if not dominated(r)), key=lambda r: (getattr(r, x), -r.score))


def sweep(
    base_config: TrainConfig,
    source: BatchSource,
    heldout: Tensor | BatchSource,
    *,
    out_dir: str | os.PathLike[str],
    k: Sequence[int],
    n_latents: Sequence[int],
    lr: Sequence[float],
    score_fn: ScoreFn | None = None,
    tolerance: float = 0.005,
    top: int = 1,
    eval_batch_size: int = 4096,
    retry_failed: bool = False,
    progress: bool = True,
    parallel: Literal["data", "grid"] = "data",
) -> SweepResult:
    """Train and score every point of the grid ``k x n_latents x lr``; see the module docstring.

    Args:
        base_config: every other training setting (its k, n_latents and lr are replaced).
        source: training batches (rewound by ``train`` for each run).
        heldout: held-out rows (tensor or batch source) for the score and the metrics.
        out_dir: sweep directory: ``runs/<name>/`` per grid point and ``sweep.json``.
        k, n_latents, lr: the grid.
        score_fn: ``score_fn(model, heldout) -> float``, higher is better; ``None`` uses the
            held-out explained variance.
        tolerance: score difference under which runs count as tied in ``select_best``.
        top: runs kept per k by ``select_best``.
        eval_batch_size: batch size of the held-out evaluation when ``heldout`` is a tensor.
        retry_failed: train again the runs recorded as failed (diverged); by default they are
            kept as failed.
        progress: show a tqdm bar over the grid.
        parallel: under ``torchrun``, ``"data"`` trains every run data-parallel on all ranks;
            ``"grid"`` gives each rank its own grid points (point i to rank i mod W), trained
            and scored in that process alone, then gathers the results -- W runs at once, which
            scales better than one data-parallel run when reading the features is the limit.
            ``score_fn`` must then not use collectives. Without a process group both are the
            single-process sweep.
    """
    if parallel not in ("data", "grid"):
        raise ValueError(f"parallel must be 'data' or 'grid', got {parallel!r}")
    by_grid = parallel == "grid" and dist.is_distributed()
    ks = _positive_ints("k", k)
    ns = _positive_ints("n_latents", n_latents)
    lrs = [float(v) for v in lr]
    if not lrs or any(not v > 0 for v in lrs):
        raise ValueError(f"lr must be a non-empty list of positive numbers, got {list(lr)!r}")
    bad = [(kk, nn) for kk in ks for nn in ns if kk > nn]
    if bad:
        raise ValueError(f"k must be <= n_latents for every grid point; invalid (k, n): {bad}")
    grid = list(itertools.product(ks, ns, lrs))
    names = [run_name(*point) for point in grid]
    if len(set(names)) != len(names):
        raise ValueError(f"the grid has duplicate points: {names}")

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / RESULTS_NAME
    fixed = _grid_config(base_config)
    recorded: dict[str, dict[str, Any]] = {}
    if results_path.exists():
        saved = read_json(results_path)
        if saved.get("version") != RESULTS_VERSION:
            raise ValueError(f"{results_path} has an unknown version {saved.get('version')!r}")
        if saved["base_config"] != json.loads(json.dumps(fixed)):
            changed = sorted(key for key in fixed if saved["base_config"].get(key) != fixed[key])
            raise ValueError(
                f"{results_path} was written with a different base config (fields {changed}); "
                "use another out_dir to sweep with new settings."
            )
        recorded = dict(saved["runs"])

    def save() -> list[RunResult]:
        runs = [RunResult(**recorded[n]) for n in names if n in recorded]
        best = select_best(runs, tolerance=tolerance, top=top)
        front = pareto_front(runs)
        if dist.rank() != 0:  # under torchrun rank 0 writes (the merged record, by grid point)
            return runs
        atomic_write_json(
            results_path,
            {
                "version": RESULTS_VERSION,
                "base_config": fixed,
                "grid": {"k": ks, "n_latents": ns, "lr": lrs},
                "runs": recorded,
                "best_per_k": {str(kk): [r.name for r in rs] for kk, rs in best.items()},
                "pareto_l0": [r.name for r in front],
                "tolerance": tolerance,
            },
            indent=1,
            allow_nan=True,
        )
        return runs

    for i, ((kk, nn, rate), name) in enumerate(
        zip(tqdm(grid, desc="sweep", disable=not progress or dist.rank() != 0), names, strict=True)
    ):
        if by_grid and i % dist.world_size() != dist.rank():
            continue  # another rank's grid point
        done = recorded.get(name)
        if done is not None and (done["error"] is None or not retry_failed):
            continue
        run_dir = root / "runs" / name
        config = dataclasses.replace(
            base_config, k=kk, n_latents=nn, lr=rate, progress=base_config.progress and not by_grid
        )
        try:
            # one grid point per rank: train it in this process alone
            alone: dict[str, Any] = {"data_parallel": False} if by_grid else {}
            trained = train(config, source, out_dir=run_dir, resume=True, **alone)
        except TrainingDivergedError as err:
            nan = math.nan
            recorded[name] = RunResult(
                name, kk, nn, rate, nan, nan, nan, nan, nan, str(run_dir), error=str(err)
            )._asdict()
            save()
            continue
        metrics: SAEMetrics = evaluate(
            trained.model,
            heldout,
            batch_size=eval_batch_size,
            always_active_threshold=base_config.always_active_threshold,
            distributed=False if by_grid else None,
        )
        if score_fn is None:
            score = metrics.explained_variance
        else:
            score = float(score_fn(trained.model, heldout))
        recorded[name] = RunResult(
            name=name,
            k=kk,
            n_latents=nn,
            lr=rate,
            score=score,
            explained_variance=metrics.explained_variance,
            l0=metrics.l0,
            dead_fraction=metrics.dead_fraction,
            always_active_fraction=metrics.always_active_fraction,
            model_dir=str(trained.model_dir),
        )._asdict()
        save()

    if by_grid:  # every rank's runs, merged in grid order on every rank
        for theirs in dist.all_gather_object(recorded):
            recorded.update(theirs)
    runs = save()
    dist.barrier()
    return SweepResult(
        runs=runs,
        best_per_k=select_best(runs, tolerance=tolerance, top=top),
        pareto=pareto_front(runs),
        path=results_path,
    )
