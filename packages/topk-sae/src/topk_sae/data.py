"""Batch sources: the protocol the trainer consumes, and an in-memory implementation.

A batch source yields the float32 ``(N, d_in)`` batches of ONE epoch per ``__iter__`` call, in an
order fixed by ``set_epoch`` (and the source's seed), and can save and restore its position
inside an epoch so that a killed run resumes on exactly the batch it would have seen next.
``TensorSource`` serves an in-memory tensor; the on-disk ``ShardedFeatureStore`` source in
``topk_sae.store`` implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

DEFAULT_BATCH_SIZE = 32786
"""The FaCT authors' batch size (sic: 32,786, not 32,768)."""


@runtime_checkable
class BatchSource(Protocol):
    """What ``topk_sae.train`` needs from its data.

    Contract:

    * ``d_in``: feature dimension; ``num_rows``: rows in one epoch.
    * ``set_epoch(e)`` fixes the order of epoch ``e`` (deterministic given the source's seed)
      and rewinds to its first batch.
    * ``__iter__`` yields the remaining batches of the current epoch as float32 tensors
      ``(n, d_in)`` with ``n <= batch_size`` (only the last batch may be short) and then stops;
      the trainer moves them to its device (a source may already yield them there).
    * ``__len__`` is the number of batches in one full epoch.
    * ``state_dict()`` returns a JSON-serialisable dict with the epoch and the number of batches
      already yielded in it; ``load_state_dict(state)`` restores it so that the next ``__iter__``
      continues with the next batch, bit-identical to an uninterrupted iteration.
    """

    d_in: int
    num_rows: int
    batch_size: int

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[Tensor]: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorSource:
    """Batches of an in-memory ``(num_rows, d_in)`` tensor, reshuffled every epoch.

    The permutation of epoch ``e`` is drawn from a generator seeded with ``seed + e``, so it
    depends only on (seed, epoch): resuming never needs to store the permutation.
    """

    def __init__(
        self,
        features_ND: Tensor,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not isinstance(features_ND, Tensor) or features_ND.ndim != 2:
            shape = tuple(getattr(features_ND, "shape", ()))
            raise ValueError(
                f"TensorSource needs a 2-D (num_rows, d_in) tensor, got shape {shape}; flatten "
                "maps (B, C, H, W) with x.permute(0, 2, 3, 1).reshape(-1, C) and tokens "
                "(B, T, D) with x.reshape(-1, D) first."
            )
        if features_ND.shape[0] == 0 or features_ND.shape[1] == 0:
            raise ValueError(
                f"TensorSource got an empty tensor of shape {tuple(features_ND.shape)}"
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not features_ND.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got {features_ND.dtype}")
        self.features_ND = features_ND
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_rows = int(features_ND.shape[0])
        self.d_in = int(features_ND.shape[1])
        self._epoch = 0
        self._position = 0  # batches already yielded in the current epoch

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)
        self._position = 0

    def _order(self) -> Tensor | None:
        if not self.shuffle:
            return None
        gen = torch.Generator().manual_seed(self.seed + self._epoch)
        return torch.randperm(self.num_rows, generator=gen)

    def __iter__(self) -> Iterator[Tensor]:
        order = self._order()
        while self._position < len(self):
            start = self._position * self.batch_size
            stop = min(start + self.batch_size, self.num_rows)
            rows = (
                self.features_ND[start:stop]
                if order is None
                else self.features_ND[order[start:stop]]
            )
            self._position += 1
            yield rows.to(dtype=torch.float32)  # stays on the tensor's device

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "TensorSource",
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_rows", "batch_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's source has {key}={state[key]}, this "
                    f"TensorSource has {key}={getattr(self, key)}; resume with the same data and "
                    "batch size."
                )
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
