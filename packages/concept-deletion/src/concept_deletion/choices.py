"""One base for the package's string options: ``parse`` accepts a member or its value."""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class ChoiceEnum(StrEnum):
    """A ``StrEnum`` whose ``parse`` names the option and its valid values on a bad input.

    Subclasses say what they are with a class keyword: ``class Layout(ChoiceEnum, kind="code
    layout")``; ``Layout.parse("x")`` then raises ``unknown code layout 'x'; use one of ...``.
    """

    def __init_subclass__(cls, *, kind: str = "option", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._choice_kind = kind

    @classmethod
    def parse(cls, value: Self | str) -> Self:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown {cls._choice_kind} {value!r}; use one of {names}") from None
