"""One base for the package's string options: ``parse`` accepts a member or its value."""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class ChoiceEnum(StrEnum):
    """A ``StrEnum`` whose ``parse`` names the option and its valid values on a bad input.

    Subclasses name the argument they are with a class keyword: ``class Mode(ChoiceEnum,
    kind="mode")``; ``Mode.parse("remove")`` then raises ``mode must be one of 'deletion',
    'insertion', got 'remove'`` (instead of the enum's own "'remove' is not a valid Mode").
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
            raise ValueError(f"{cls._choice_kind} must be one of {names}, got {value!r}") from None
