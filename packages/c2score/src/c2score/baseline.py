"""The random concept of the C2 baseline (paper Eq. 16, App. C.3).

On every evaluation image the random concept has an attribution map m ~ U(0, 1)^(H x W),
*thresholded* at a level t ~ U(0, 1): A = m where m >= t, else 0. (The authors' code uses
``m.clip(min=t)``, a floor that keeps every pixel and makes the map nearly uniform for large t;
the paper describes a threshold, which is what we implement.) Its weight w (the "activation" of
Eq. 15) is, by default, the attribution mass sum(A), as the authors' ``attr.sum()`` and in line
with the completeness of B-cos / FaCT attributions (activation = sum of attributions);
``"mean"`` gives mean(A) (the same up to a constant factor when all images share one size, so
the same consistency; different with mixed sizes), ``"uniform"`` gives every image weight 1.
Each (seed, image) pair has its own generator, so maps do not depend on batch size, order or
resumption.

Per-group (per-class) baselines differ from the authors' in one respect: their class-specific
protocol (``std_concept_stats``) passes the random concept of each class through the same
top-5 % / at-least-10 selection as a real concept, with its weight as the activation, so it
is scored on the class's images of largest random mass only (10 of the 50 ImageNet validation
images of a class); ours scores it on every image of the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["RandomBaselineConfig", "random_attribution"]

_WEIGHTS = ("mass", "mean", "uniform")


@dataclass(frozen=True)
class RandomBaselineConfig:
    """Random-concept baseline settings."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One random concept per seed; the report gives their mean and standard deviation."""
    weight: Literal["mass", "mean", "uniform"] = "mass"
    """Weight of an image: the sum of its thresholded map ("mass", the authors' ``attr.sum()``),
    its mean ("mean") or 1 ("uniform")."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need at least one distinct seed, got {self.seeds}")
        if self.weight not in _WEIGHTS:
            raise ValueError(f"weight must be one of {', '.join(_WEIGHTS)}; got {self.weight!r}")


def _generator(seed: int, image_index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, image_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def random_attribution(
    seed: int, image_index: int, size: tuple[int, int], weight: str = "mass"
) -> tuple[torch.Tensor, float]:
    """The random concept's thresholded (H, W) map on image ``image_index`` and its weight
    (see :class:`RandomBaselineConfig`)."""
    g = _generator(seed, image_index)
    level = torch.rand((), generator=g)
    m_HW = torch.rand(size, generator=g)
    a_HW = torch.where(m_HW >= level, m_HW, torch.zeros(()))
    if weight == "mass":
        return a_HW, float(a_HW.double().sum())
    if weight == "mean":
        return a_HW, float(a_HW.double().mean())
    if weight == "uniform":
        return a_HW, 1.0
    raise ValueError(f"weight must be one of {', '.join(_WEIGHTS)}; got {weight!r}")
