"""``explanation_mode(model)``: detach every dynamic factor of a B-cos model inside a ``with``.

The module tree is walked when the block is entered (never cached), so heads replaced or modules
inserted after the model was built are switched too (the official library caches the list on
first use and silently misses them). Blocks nest, and on exit -- also on an exception -- every
module gets back the state it had on entry.
"""

from __future__ import annotations

from types import TracebackType

from torch import nn

__all__ = ["explainable_modules", "explanation_mode"]


def explainable_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule (the model included) that has an explanation-mode switch."""
    return [m for m in model.modules() if callable(getattr(m, "set_explanation_mode", None))]


class explanation_mode:
    """Context manager putting every detachable module of ``model`` in (or out of) explanation mode.

    Args:
        model: any ``nn.Module``; every submodule with ``set_explanation_mode`` is switched,
            including official ``bcos`` modules.
        active: ``True`` to explain (detach dynamic factors), ``False`` to force normal mode
            inside an outer explanation-mode block.
    """

    def __init__(self, model: nn.Module, active: bool = True) -> None:
        self.model = model
        self.active = active
        self._saved: list[list[tuple[nn.Module, bool]]] = []

    def __enter__(self) -> nn.Module:
        saved = []
        try:
            for m in explainable_modules(self.model):
                saved.append((m, bool(getattr(m, "is_in_explanation_mode", False))))
                m.set_explanation_mode(self.active)
        except BaseException:
            for m, state in reversed(saved):
                m.set_explanation_mode(state)
            raise
        self._saved.append(saved)
        return self.model

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for m, state in reversed(self._saved.pop()):
            m.set_explanation_mode(state)
