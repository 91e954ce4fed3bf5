"""The interface to a concept model, and chunked evaluation of its head on masked codes.

The package needs two things from a model: its concept codes for a batch of images, computed
once and cached, and its *head* ``h`` -- the layers after the concept layer, mapping a code
batch to logits. Every perturbation runs through ``h`` only; the backbone is never re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from concept_deletion.layout import Layout, apply_masks, check_codes

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "ConceptHead",
    "ConceptModel",
    "check_logits",
    "check_targets",
    "evaluate_masked",
    "rows_per_chunk",
    "target_logits",
]

#: Default memory budget: code elements per forward pass of the head (128 MiB in float32).
DEFAULT_MAX_ELEMENTS = 2**25


@runtime_checkable
class ConceptHead(Protocol):
    """Maps a batch of concept codes (layout ``BKHW``, ``BTK`` or ``BK``) to logits ``(B, C)``.

    Any ``nn.Module`` or plain callable fits. For FaCT: the SAE decoder and the rest of the
    network; for CRAFT-like models: ``u -> h(u W)``. It must treat batch items independently
    (e.g. batch norm in eval mode), since perturbed codes are batched together.
    """

    def __call__(self, codes: Tensor, /) -> Tensor: ...


@runtime_checkable
class ConceptModel(Protocol):
    """A model split at its concept layer: ``logits = head(codes(images))``."""

    def codes(self, images: Tensor, /) -> Tensor:
        """Concept codes of a batch of images, in the layout the caller declares."""
        ...

    def head(self, codes: Tensor, /) -> Tensor:
        """Logits ``(B, C)`` from a batch of (possibly perturbed) codes."""
        ...


def rows_per_chunk(code_shape: tuple[int, ...], max_elements: int) -> int:
    """How many codes of ``code_shape`` (no batch axis) fit in ``max_elements`` elements."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    per_row = 1
    for s in code_shape:
        per_row *= int(s)
    return max(1, max_elements // max(per_row, 1))


def check_targets(
    targets: Tensor | int | Sequence[int], batch: int, device: torch.device
) -> Tensor:
    """The explained class of each image as a ``(batch,)`` long tensor (an int: all images).

    Targets are class indices ``>= 0``: ``-1`` is refused rather than read as "the last class"
    (Python indexing), and so are non-integer dtypes (``1.7`` is not a class). The upper bound
    depends on the head and is checked where its logits are read (:func:`target_logits`).
    """
    t = torch.as_tensor(targets, device=device)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"targets must be an int or shape ({batch},), got {tuple(t.shape)}")
    if bool((t < 0).any()):
        first = int(torch.nonzero(t < 0)[0])
        raise ValueError(
            f"targets must be class indices >= 0, got {int(t[first])} for image {first} "
            "(negative indices do not count from the end here)"
        )
    return t


def target_logits(logits: Tensor, targets: Tensor | int) -> Tensor:
    """``logits[r, targets[r]]`` (or ``logits[:, targets]`` for an int), after checking that
    every target is a class of these ``(M, C)`` logits."""
    n_classes = logits.shape[1]
    top = targets if isinstance(targets, int) else int(targets.max()) if targets.numel() else 0
    if top >= n_classes or (isinstance(targets, int) and targets < 0):
        raise ValueError(
            f"target {top} is out of range for a head with {n_classes} classes: targets must "
            f"lie in [0, {n_classes})"
        )
    if isinstance(targets, int):
        return logits[:, targets]
    return logits.gather(1, targets[:, None].to(logits.device))[:, 0]


def check_logits(logits: Tensor, n_rows: int) -> Tensor:
    """``logits`` if it is a finite ``(n_rows, C)`` tensor, else a clear error."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n_rows:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the concept head must return logits of shape (B={n_rows}, C), got {shape}; wrap it "
            "so that it maps a code batch to a 2-D logit tensor"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "the concept head returned NaN/Inf logits for finite codes; scores and areas would "
            "be NaN (check the head, e.g. its dtype or a division by a masked-out quantity)"
        )
    return logits


def evaluate_masked(
    head: Callable[[Tensor], Tensor],
    codes: Tensor,
    layout: Layout | str,
    image_index: Tensor,
    masks: Callable[[int, int], Tensor],
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Iterator[tuple[int, int, Tensor]]:
    """Evaluate ``head(codes[image_index[r]] * masks(r))`` for all rows ``r``, in chunks.

    ``masks(start, stop)`` returns the concept-wise masks ``(stop - start, K)`` of those rows,
    so a design of any size is materialised one chunk at a time. Yields ``(start, stop,
    logits)`` per chunk; the chunk size keeps each head input under ``max_elements`` elements.
    Runs without autograd.
    """
    layout = check_codes(codes, layout)
    n_rows = int(image_index.shape[0])
    step = rows_per_chunk(tuple(codes.shape[1:]), max_elements)
    image_index = image_index.to(codes.device)
    with torch.no_grad():
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            m = masks(start, stop).to(device=codes.device)
            idx = image_index[start:stop]
            first = int(idx[0])
            # One image in the chunk: broadcast its code instead of copying it per row.
            one = bool((idx == first).all())
            src = codes[first : first + 1] if one else codes[idx]
            batch = apply_masks(src, m, layout)
            yield start, stop, check_logits(head(batch), stop - start)
