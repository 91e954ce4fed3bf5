"""SAE quality metrics accumulated over a whole data set (never averaged per batch).

* Fraction of variance unexplained ``FVU = Σ_n Σ_d (x − x̂)² / Σ_n Σ_d (x − mean_d)²`` with the
  total variance taken about the per-dimension mean of the whole set, numerator and
  denominator accumulated separately in float64; explained variance ``= 1 − FVU``. (Per-batch
  averages, variance about zero or about one scalar mean are common bugs in SAE libraries.)
* L0: mean number of nonzero code values per row.
* Dead fraction (latents that never fire on the set), always-active fraction (latents firing on
  more than ``always_active_threshold`` of the rows; 0.6 as in FaCT), per-latent firing
  frequencies and their log10 histogram.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from topk_sae import distributed as dist
from topk_sae.sae import SparseCode

__all__ = [
    "FiringHistogram",
    "MetricsAccumulator",
    "SAEMetrics",
    "evaluate",
    "firing_histogram",
    "plot_firing_histogram",
]


class SAEMetrics(NamedTuple):
    """Metrics of an SAE on a whole data set."""

    fvu: float
    """Fraction of variance unexplained (about the per-dimension mean); NaN if the set is
    constant."""
    explained_variance: float
    """``1 − fvu``."""
    mse: float
    """Mean squared error per element, ``Σ (x − x̂)² / (N · d_in)``."""
    l0: float
    """Mean number of nonzero code values per row."""
    dead_fraction: float
    """Fraction of latents that never fired."""
    always_active_fraction: float
    """Fraction of latents firing on more than ``always_active_threshold`` of the rows."""
    firing_frequency: Tensor
    """(n_latents,) float64: fraction of rows on which each latent fired."""
    num_rows: int
    """Rows evaluated."""
    always_active_threshold: float
    """Threshold used for ``always_active_fraction``."""

    def summary(self) -> dict[str, float]:
        """The scalar metrics as a JSON-friendly dict."""
        return {
            "fvu": self.fvu,
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "always_active_fraction": self.always_active_fraction,
            "num_rows": self.num_rows,
            "always_active_threshold": self.always_active_threshold,
        }


def _check_threshold(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"always_active_threshold must be in (0, 1], got {value}")
    return float(value)


class MetricsAccumulator:
    """Streaming accumulator of ``SAEMetrics``; feed it every batch with ``update``.

    The total variance is accumulated with Chan et al.'s pairwise update of per-dimension means
    and centred sums of squares in float64, which stays exact for uncentred features with a large
    mean (where ``Σx² − (Σx)²/N`` would cancel catastrophically). The result does not depend on
    how the set is cut into batches.

    Args:
        n_latents: dictionary size of the SAE.
        always_active_threshold: a latent firing on more than this fraction of rows is
            always-active.
    """

    def __init__(self, n_latents: int, *, always_active_threshold: float = 0.6) -> None:
        if isinstance(n_latents, bool) or not isinstance(n_latents, int) or n_latents <= 0:
            raise ValueError(f"n_latents must be a positive integer, got {n_latents!r}")
        self.n_latents = n_latents
        self.always_active_threshold = _check_threshold(always_active_threshold)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.num_rows = 0
        self._mean_D: Tensor | None = None  # float64 per-dimension mean
        self._m2_D: Tensor | None = None  # float64 Σ (x − mean)² per dimension
        self._sse = torch.zeros((), dtype=torch.float64)
        self._active = torch.zeros((), dtype=torch.int64)
        self._fires_L = torch.zeros(self.n_latents, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x_ND: Tensor, recon_ND: Tensor, code: SparseCode) -> None:
        """Add a batch: inputs, their reconstructions and sparse codes ``(values, indices)``."""
        values_NK, indices_NK = code
        if x_ND.ndim != 2 or recon_ND.shape != x_ND.shape:
            raise ValueError(
                f"x and its reconstruction must both be (N, d_in), got {tuple(x_ND.shape)} and "
                f"{tuple(recon_ND.shape)}"
            )
        n = x_ND.shape[0]
        if values_NK.shape != indices_NK.shape or values_NK.ndim != 2 or values_NK.shape[0] != n:
            raise ValueError(
                f"code values and indices must both be (N={n}, K), got {tuple(values_NK.shape)} "
                f"and {tuple(indices_NK.shape)}"
            )
        if n == 0:
            return
        if self._mean_D is not None and self._mean_D.shape[0] != x_ND.shape[1]:
            raise ValueError(
                f"d_in changed between batches: {self._mean_D.shape[0]} then {x_ND.shape[1]}"
            )
        # Accumulate on the batch's device (float64; MPS has none, so CPU there): no transfer
        # of whole batches to the host during GPU training.
        device = x_ND.device if x_ND.device.type != "mps" else torch.device("cpu")
        if self._fires_L.device != device:
            self._to(device)
        x = x_ND.detach().to(device, torch.float64)
        recon = recon_ND.detach().to(device, torch.float64)
        idx = indices_NK.detach()[values_NK.detach() != 0].to(device, torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_latents):
            raise ValueError(f"code indices must lie in [0, n_latents={self.n_latents})")
        # Batch statistics first, state updates last: a bad batch leaves the state untouched.
        batch_sse = (x - recon).square().sum()
        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).square().sum(dim=0)
        if self._mean_D is None or self._m2_D is None:
            self._mean_D, self._m2_D = batch_mean, batch_m2
        else:  # Chan et al.: merge (count, mean, M2) of the seen rows and of the batch
            total = self.num_rows + n
            delta = batch_mean - self._mean_D
            self._mean_D = self._mean_D + delta * (n / total)
            self._m2_D = self._m2_D + batch_m2 + delta.square() * (self.num_rows * n / total)
        self.num_rows += n
        self._sse += batch_sse
        self._active += idx.numel()
        self._fires_L += torch.bincount(idx, minlength=self.n_latents)

    def _to(self, device: torch.device) -> None:
        self._sse, self._active, self._fires_L = (
            t.to(device) for t in (self._sse, self._active, self._fires_L)
        )
        if self._mean_D is not None and self._m2_D is not None:
            self._mean_D, self._m2_D = self._mean_D.to(device), self._m2_D.to(device)

    def all_reduce(self) -> None:
        """Merge the accumulators of all ranks into every rank's (a no-op in one process).

        Exact merge of (count, mean, M2) over ranks (the parallel form of the batch merge in
        ``update``), counts summed; every rank then holds the statistics of all rows.
        """
        if not dist.is_distributed():
            return
        device = self._fires_L.device
        has = 0.0 if self._mean_D is None else 1.0
        d = 0 if self._mean_D is None else self._mean_D.shape[0]
        dims = dist.all_reduce_sum(torch.tensor([d * has, has], dtype=torch.float64))
        if float(dims[1]) == 0:
            return  # no rank saw a row
        d_all = round(float(dims[0] / dims[1]))
        n_r = torch.tensor(float(self.num_rows), dtype=torch.float64, device=device)
        mean_r = (
            self._mean_D
            if self._mean_D is not None
            else torch.zeros(d_all, dtype=torch.float64, device=device)
        )
        m2_r = (
            self._m2_D
            if self._m2_D is not None
            else torch.zeros(d_all, dtype=torch.float64, device=device)
        )
        n = dist.all_reduce_sum(n_r)
        if float(n) == 0:
            return
        mean = dist.all_reduce_sum(mean_r * n_r) / n
        m2 = dist.all_reduce_sum(m2_r + (mean_r - mean).square() * n_r)
        self.num_rows = int(n)
        self._mean_D, self._m2_D = mean, m2
        self._sse = dist.all_reduce_sum(self._sse)
        self._active = dist.all_reduce_sum(self._active)
        self._fires_L = dist.all_reduce_sum(self._fires_L)

    def compute(self) -> SAEMetrics:
        """Metrics over everything seen since the last ``reset``."""
        if self.num_rows == 0 or self._m2_D is None:
            raise ValueError("no rows were accumulated; call update() with at least one batch")
        total_var = float(self._m2_D.sum())
        sse = float(self._sse)
        fvu = sse / total_var if total_var > 0 else math.nan
        fires = self._fires_L.cpu()
        freq = fires.double() / self.num_rows
        return SAEMetrics(
            fvu=fvu,
            explained_variance=1.0 - fvu,
            mse=sse / (self.num_rows * self._m2_D.shape[0]),
            l0=float(self._active) / self.num_rows,
            dead_fraction=float((fires == 0).double().mean()),
            always_active_fraction=float((freq > self.always_active_threshold).double().mean()),
            firing_frequency=freq,
            num_rows=self.num_rows,
            always_active_threshold=self.always_active_threshold,
        )

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and counters to checkpoint the accumulator (e.g. inside a training run)."""

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.cpu()

        return {
            "num_rows": self.num_rows,
            "mean": cpu(self._mean_D),
            "m2": cpu(self._m2_D),
            "sse": cpu(self._sse),
            "active": cpu(self._active),
            "fires": cpu(self._fires_L),
            "always_active_threshold": self.always_active_threshold,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fires"].shape != (self.n_latents,):
            raise ValueError(
                f"state is for {state['fires'].shape[0]} latents, this accumulator has "
                f"{self.n_latents}"
            )
        self.num_rows = int(state["num_rows"])
        self._mean_D, self._m2_D = state["mean"], state["m2"]
        self._sse, self._active, self._fires_L = state["sse"], state["active"], state["fires"]
        self.always_active_threshold = _check_threshold(state["always_active_threshold"])


def _batches(data: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        if data.ndim != 2:
            raise ValueError(
                f"evaluate expects a 2-D (N, d_in) tensor, got shape {tuple(data.shape)}; flatten "
                "maps and tokens to rows first"
            )
        return (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    return data


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 4096,
    always_active_threshold: float = 0.6,
    distributed: bool | None = None,
) -> SAEMetrics:
    """Metrics of ``model`` (called as ``model(x) -> (recon, code)``) on a whole data set.

    ``data`` is an ``(N, d_in)`` tensor (cut into ``batch_size`` rows) or a batch source; a
    source with ``set_epoch``/``state_dict`` (e.g. ``TensorSource``, ``StoreSource``) is read for
    one full epoch and then restored to its previous position.

    ``distributed`` (default: whether a process group of several ranks is active): every rank
    evaluates its contiguous part of each batch and the accumulators are merged, so every rank
    returns the metrics of the whole set; all ranks must then call ``evaluate`` together.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_latents = int(model.n_latents)  # type: ignore[arg-type]
    acc = MetricsAccumulator(n_latents, always_active_threshold=always_active_threshold)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    saved = None
    if hasattr(data, "state_dict") and hasattr(data, "set_epoch"):
        saved = data.state_dict()  # type: ignore[union-attr]
        data.set_epoch(0)  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    try:
        split = dist.is_distributed() if distributed is None else distributed
        for x in _batches(data, batch_size):
            if split:
                x = x[dist.rank_slice(x.shape[0])]
                if x.shape[0] == 0:
                    continue
            x = x.to(device)
            recon, code = model(x)
            acc.update(x, recon, code)
        if split:
            acc.all_reduce()
    finally:
        model.train(was_training)
        if saved is not None:
            data.load_state_dict(saved)  # type: ignore[union-attr]
    return acc.compute()


class FiringHistogram(NamedTuple):
    """Histogram of log10 firing frequencies of the latents that fired at least once."""

    counts: Tensor
    """(bins,) int64 number of latents per bin."""
    edges_log10: Tensor
    """(bins + 1,) float64 bin edges in log10(frequency)."""
    num_dead: int
    """Latents that never fired (frequency 0, outside the log scale)."""


def firing_histogram(
    firing_frequency: Tensor, *, bins: int = 40, min_log10: float | None = None
) -> FiringHistogram:
    """Histogram of ``log10(frequency)`` over live latents, as plotted in the SAE literature.

    Bins span ``[min_log10, 0]``; ``None`` starts at the floor of the smallest live log10
    frequency. Live latents below ``min_log10`` are counted in the first bin.
    """
    if bins <= 0:
        raise ValueError(f"bins must be positive, got {bins}")
    freq = firing_frequency.detach().to("cpu", torch.float64)
    if freq.ndim != 1 or bool(((freq < 0) | (freq > 1)).any()):
        raise ValueError("firing_frequency must be a 1-D tensor of fractions in [0, 1]")
    live = freq[freq > 0]
    num_dead = int((freq == 0).sum())
    if min_log10 is None:
        min_log10 = math.floor(float(live.min().log10())) if live.numel() else -1.0
        if min_log10 >= 0:
            min_log10 = -1.0
    if not min_log10 < 0:
        raise ValueError(f"min_log10 must be negative, got {min_log10}")
    edges = torch.linspace(min_log10, 0.0, bins + 1, dtype=torch.float64)
    logs = live.log10().clamp(min_log10, 0.0)
    counts = torch.histc(logs, bins=bins, min=min_log10, max=0.0).round().to(torch.int64)
    return FiringHistogram(counts, edges, num_dead)


def plot_firing_histogram(
    metrics_or_frequency: SAEMetrics | Tensor,
    path: str | os.PathLike[str],
    *,
    bins: int = 40,
    title: str | None = None,
) -> Path:
    """Save a PNG of the log10 firing-frequency histogram (needs matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_firing_histogram needs matplotlib, which topk-sae does not install; "
            "run `pip install matplotlib` (or use firing_histogram() for the numbers)."
        ) from err
    if isinstance(metrics_or_frequency, SAEMetrics):
        freq = metrics_or_frequency.firing_frequency
        threshold: float | None = metrics_or_frequency.always_active_threshold
    else:
        freq, threshold = metrics_or_frequency, None
    hist = firing_histogram(freq, bins=bins)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    edges = hist.edges_log10.numpy()
    ax.stairs(hist.counts.numpy(), edges, fill=True, alpha=0.8)
    if threshold is not None:
        ax.axvline(math.log10(threshold), color="tab:red", linestyle="--", label="always-active")
        ax.legend()
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title or f"{len(freq)} latents, {hist.num_dead} dead (not shown)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
