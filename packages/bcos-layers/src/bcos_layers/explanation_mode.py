"""``explanation_mode(model)``: detach every dynamic factor of a B-cos model inside a ``with``.

The module tree is walked when the block is entered (never cached), and again at every forward
call of ``model`` inside the block: heads replaced or modules inserted after the model was built
-- even inside the block -- are switched too (the official library caches the list on first use
and silently misses them). Blocks nest, and on exit -- also on an exception -- every module gets
back the state it had before the block switched it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["explainable_modules", "explanation_mode"]


def explainable_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule (the model included) that has an explanation-mode switch."""
    return [m for m in model.modules() if callable(getattr(m, "set_explanation_mode", None))]


class _Entry:
    """What one entry of the block switched (to restore it) and the re-walk hook."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, bool]] = []
        self.seen: set[int] = set()  # ids of modules in `saved` (kept alive by `saved`)
        self.handle: RemovableHandle | None = None


class explanation_mode:
    """Context manager putting every detachable module of ``model`` in (or out of) explanation mode.

    Args:
        model: any ``nn.Module``; every submodule with ``set_explanation_mode`` is switched,
            including official ``bcos`` modules.
        active: ``True`` to explain (detach dynamic factors), ``False`` to force normal mode
            inside an outer explanation-mode block.

    While the block is open, a forward pre-hook on ``model`` re-walks the tree before each
    ``model(...)`` call and switches modules that appeared since (e.g. ``model.fc = new_head``
    inside the block); they are restored on exit like the others. A submodule called directly
    (``model.layer3(x)``) does not trigger the re-walk.
    """

    def __init__(self, model: nn.Module, active: bool = True) -> None:
        self.model = model
        self.active = active
        self._entries: list[_Entry] = []

    def _switch_new(self, entry: _Entry) -> None:
        for m in explainable_modules(self.model):
            if id(m) not in entry.seen:
                entry.seen.add(id(m))
                entry.saved.append((m, bool(getattr(m, "is_in_explanation_mode", False))))
                m.set_explanation_mode(self.active)

    def __enter__(self) -> nn.Module:
        entry = _Entry()
        try:
            self._switch_new(entry)
        except BaseException:
            self._restore(entry)
            raise

        def rewalk(module: nn.Module, args: Any) -> None:
            self._switch_new(entry)

        entry.handle = self.model.register_forward_pre_hook(rewalk)
        self._entries.append(entry)
        return self.model

    @staticmethod
    def _restore(entry: _Entry) -> None:
        if entry.handle is not None:
            entry.handle.remove()
        for m, state in reversed(entry.saved):
            m.set_explanation_mode(state)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore(self._entries.pop())
