"""The concept world as an image source of :mod:`fact_model.data` (``world[:SPLIT[:N]]``)."""

from __future__ import annotations

from typing import Any

import torch

from fact_model.data import ImageSource
from fact_model.world import ConceptWorld, WorldConfig

__all__ = ["DEFAULT_SIZES", "WorldImages"]

DEFAULT_SIZES = {"train": 10_000, "val": 2_000, "test": 2_000}
"""Images per split when a spec gives no count."""


class WorldImages(ImageSource):
    """Images ``start .. start + n - 1`` of one split of a :class:`ConceptWorld`, in memory.

    Items are ``(float (3, H, W) in [0, 1], label)``; ``world_index(i)`` maps item ``i`` back to
    the world (for its ground-truth masks and oracle features).
    """

    def __init__(
        self,
        split: str = "train",
        n: int | None = None,
        *,
        config: WorldConfig | None = None,
        start: int = 0,
    ) -> None:
        self.world = ConceptWorld(config)
        self.split, self.start = split, int(start)
        self.n = int(n if n is not None else DEFAULT_SIZES.get(split, 2_000))
        images, labels = self.world.images(split, self.n, self.start)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.targets = [int(t) for t in labels]
        self.classes = self.world.classes

    @classmethod
    def from_spec(cls, rest: str, split: str | None = None, **kwargs: Any) -> WorldImages:
        """``SPLIT[:N]`` as in the dataset spec ``world:test:500``."""
        parts = [p for p in rest.split(":") if p] if rest else []
        if len(parts) > 2:
            raise ValueError(f"world spec is world[:SPLIT[:N]], got world:{rest}")
        spl = parts[0] if parts else (split or "train")
        n = int(parts[1]) if len(parts) == 2 else None
        return cls(spl, n, **kwargs)

    def __len__(self) -> int:
        return self.n

    def world_index(self, i: int) -> int:
        return self.start + int(i)

    def get(self, index: int) -> tuple[Any, int]:
        return self.images[index].float().div(255.0), self.targets[index]
