"""Designs and the Jansen estimator of Sobol total indices (CRAFT's estimator).

With ``N`` designs in ``d`` dimensions, a point set in ``2d`` dimensions gives two matrices
``A, B`` of shape ``(N, d)``; ``C_i`` is ``A`` with column ``i`` taken from ``B``. The Jansen
estimator of the total index of input ``i`` is

    ST_i = sum_n (f(A)_n - f(C_i)_n)^2 / (2 N Var[f(A)]),   Var with ddof 1,

as CRAFT's ``JansenEstimator`` (the variance is floored at 1e-12, as xplique's). ``f(B)`` is
not needed, so it is never evaluated. The ``N d`` rows of all ``C_i`` are generated in chunks,
so memory does not grow with ``N`` or ``d``.

**Design.** The default is i.i.d. uniform Monte Carlo (``sequence='random'``): every design
value is ``U[0, 1)`` and independent of the others, so the estimate is unbiased for every input
at any ``d``. CRAFT's design, the unscrambled Halton sequence (``sequence='halton'``), is kept
for reproduction, but it is biased whenever ``d`` is large against ``N``: input ``j`` of Halton
point ``n`` is ``n / p_j`` for ``n < p_j`` (``p_j`` the ``j``-th prime), so with the paper's
``N = 4`` and thousands of concepts nearly every design value is close to 0 and the columns of
``A`` and ``B`` differ by ``n |1/p_i - 1/p_{d+i}|``, which shrinks with ``i``: the indices then
follow the concept index (Spearman -1 against it on an equal-weight linear head at d = 4096),
not the function. Scrambled Sobol or Halton (``scramble=True``) are unbiased too; the Sobol
sequence exists up to 10,600 inputs, scrambled Halton is practical only for small ``d`` (its
digit permutations take memory growing like the sum of the first ``2d`` primes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import qmc
from torch import Tensor

from concept_deletion.choices import ChoiceEnum

__all__ = ["QMCSequence", "jansen_total_indices", "quasi_random_design"]

#: Upper limit of scipy's Sobol generator (direction numbers available).
_SOBOL_MAX_DIM = 21201
#: Largest dimension of a scrambled Halton design (scipy keeps a digit permutation of length
#: p for every prime base p, in int64: 0.47 GB at 2048 dimensions, 34 GB at 16384).
_SCRAMBLED_HALTON_MAX_DIM = 2048


class QMCSequence(ChoiceEnum, kind="sequence"):
    """Point set of the Sobol design: ``random`` (i.i.d. uniform, unbiased at any dimension;
    the default), or the quasi-random ``halton`` (unscrambled: CRAFT's and the paper's design)
    and ``sobol`` sequences."""

    RANDOM = "random"
    HALTON = "halton"
    SOBOL = "sobol"


def quasi_random_design(
    n_designs: int,
    dim: int,
    sequence: QMCSequence | str = QMCSequence.RANDOM,
    scramble: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Matrices ``A, B`` of shape ``(n_designs, dim)`` in ``[0, 1)`` from one ``2 dim`` point set.

    ``random`` (default): i.i.d. uniform from ``numpy.random.default_rng(seed)``, unbiased at
    any ``dim``. ``halton`` / ``sobol``: the two halves of one ``2 dim``-dimensional scipy
    sequence; unscrambled (``scramble=False``), ``halton`` is CRAFT's design (its first point is
    all zeros), biased when ``dim`` is large against ``n_designs`` (see the module docstring);
    ``scramble=True`` randomises them (seeded by ``seed``).
    """
    if n_designs < 2:
        raise ValueError(f"the Jansen estimator needs n_designs >= 2, got {n_designs}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    sequence = QMCSequence.parse(sequence)
    if sequence is QMCSequence.RANDOM:
        if scramble:
            raise ValueError(
                "scramble applies to the 'halton' and 'sobol' sequences; the 'random' design "
                "is i.i.d. uniform already (pass scramble=False, or a sequence to scramble)"
            )
        ab = np.random.default_rng(seed).random((n_designs, 2 * dim))
        return ab[:, :dim], ab[:, dim:]
    rng = np.random.default_rng(seed) if scramble else None
    if sequence is QMCSequence.HALTON:
        if scramble and 2 * dim > _SCRAMBLED_HALTON_MAX_DIM:
            raise ValueError(
                f"a scrambled Halton design in {2 * dim} dimensions ({dim} inputs) needs one "
                "digit permutation per prime base, far too much memory above "
                f"{_SCRAMBLED_HALTON_MAX_DIM} dimensions; use sequence='random' (unbiased at "
                "any size) or sequence='sobol' with scramble=True"
            )
        sampler = qmc.Halton(2 * dim, scramble=scramble, rng=rng)
        ab = sampler.random(n_designs)
    else:
        if 2 * dim > _SOBOL_MAX_DIM:
            raise ValueError(
                f"scipy's Sobol sequence supports at most {_SOBOL_MAX_DIM} dimensions, but "
                f"{dim} inputs need {2 * dim}; use sequence='random'"
            )
        sampler = qmc.Sobol(2 * dim, scramble=scramble, rng=rng)
        # Sobol points are balanced at powers of two; draw that many and keep n_designs.
        m = int(np.ceil(np.log2(n_designs)))
        ab = sampler.random_base2(m)[:n_designs]
    return ab[:, :dim].astype(np.float64), ab[:, dim:].astype(np.float64)


def jansen_total_indices(
    f: Callable[[Tensor], Tensor],
    dim: int,
    n_designs: int,
    *,
    sequence: QMCSequence | str = QMCSequence.RANDOM,
    scramble: bool = False,
    seed: int = 0,
    indices: Sequence[int] | Tensor | None = None,
    chunk_rows: int = 4096,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Total Sobol indices of ``f`` on ``[0, 1)^dim`` (Jansen estimator).

    The design is :func:`quasi_random_design`'s (default: i.i.d. uniform, unbiased at any
    ``dim``; ``sequence='halton'`` is CRAFT's).

    ``f`` maps points ``(M, dim)`` to outputs ``(M,)``; it is called with at most
    ``chunk_rows`` points at a time. ``indices`` restricts the estimate to some inputs (others
    get 0); it costs ``n_designs * (1 + len(indices))`` evaluations of ``f``.
    """
    a_np, b_np = quasi_random_design(n_designs, dim, sequence, scramble, seed)
    a = torch.as_tensor(a_np, dtype=dtype, device=device)
    b = torch.as_tensor(b_np, dtype=dtype, device=device)
    if indices is None:
        idx = torch.arange(dim, device=a.device)
    else:
        idx = torch.as_tensor(indices, dtype=torch.long, device=a.device).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= dim):
            raise ValueError(
                f"indices must lie in [0, {dim}), got range [{idx.min()}, {idx.max()}]"
            )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    def call(points: Tensor) -> Tensor:
        out = f(points)
        if not isinstance(out, Tensor) or out.shape != (points.shape[0],):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"f must return shape ({points.shape[0]},), got {shape}")
        return out.detach().to(dtype=dtype, device=a.device)

    f_a = torch.cat([call(a[s : s + chunk_rows]) for s in range(0, n_designs, chunk_rows)])
    var = torch.clamp(f_a.var(correction=1), min=1e-12)
    n = n_designs
    total = torch.zeros(dim, dtype=dtype, device=a.device)
    n_rows = n * idx.numel()
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        rows = torch.arange(start, stop, device=a.device)
        concept, design = idx[rows // n], rows % n
        points = a[design]  # advanced indexing copies
        points[torch.arange(stop - start, device=a.device), concept] = b[design, concept]
        sq = (f_a[design] - call(points)) ** 2
        total.index_add_(0, concept, sq)
    return total / (2 * n * var)
