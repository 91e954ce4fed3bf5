"""The concept vocabulary of the concept world and the classes built from it.

Every class is a *combination* of concepts from one shared vocabulary: the main object's shape,
colour, surface pattern and part, and the background scene it may appear in (two scenes per
class). Most concepts are shared by several classes (the point of FaCT's shared concept basis);
``star`` and ``horns`` belong to one class only (class-specific concepts). Distractor objects
carry concepts of the vocabulary too, so the mere presence of a concept in an image never
determines the class: the model has to find the main (largest) object and read its combination.

Concept indices are positions in :data:`CONCEPT_NAMES`; concept ``k`` is bit ``k`` of the
per-pixel concept bit field (see :mod:`fact_model.world.render`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = [
    "CLASSES",
    "CONCEPT_KINDS",
    "CONCEPT_NAMES",
    "ClassSpec",
    "ConceptKind",
    "ConceptSpec",
    "build_concepts",
    "concept_index",
]

ConceptKind = Literal["shape", "colour", "pattern", "part", "scene"]
CONCEPT_KINDS: tuple[ConceptKind, ...] = ("shape", "colour", "pattern", "part", "scene")

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "yellow", "blue", "purple")
# "plain" (no pattern) is not a concept: nothing is drawn, so it has no pixels to point at.
PATTERNS = ("stripes", "dots")
PARTS = ("eyes", "wheels", "handle", "horns")
SCENES = ("grass", "water", "sky", "tiles")

_KIND_OF: dict[str, ConceptKind] = {
    **{n: "shape" for n in SHAPES},
    **{n: "colour" for n in COLOURS},
    **{n: "pattern" for n in PATTERNS},
    **{n: "part" for n in PARTS},
    **{n: "scene" for n in SCENES},
}
CONCEPT_NAMES: tuple[str, ...] = SHAPES + COLOURS + PATTERNS + PARTS + SCENES


class ConceptSpec(NamedTuple):
    """One ground-truth concept of the world."""

    name: str
    """Readable name, unique in the vocabulary (e.g. ``"stripes"``)."""
    kind: ConceptKind
    """``"shape"``, ``"colour"``, ``"pattern"``, ``"part"`` or ``"scene"``."""
    classes: tuple[int, ...]
    """Indices of the classes whose definition uses the concept (scenes: the classes that may
    appear in it)."""
    shared: bool
    """``len(classes) > 1``: the concept is shared across classes, not class-specific."""


class ClassSpec(NamedTuple):
    """A class: the main object's combination of concepts and the scenes it appears in."""

    name: str
    shape: str
    colour: str
    pattern: str | None
    """``None`` for a plain surface."""
    part: str | None
    """``None`` for an object without parts."""
    scenes: tuple[str, ...]
    """The background is drawn uniformly from these."""

    def concept_names(self) -> tuple[str, ...]:
        """The vocabulary concepts the class uses (object concepts, then its scenes)."""
        own = (self.shape, self.colour, self.pattern, self.part)
        return tuple(c for c in own if c is not None) + self.scenes


# Four minimal pairs make every kind of object concept necessary: ladybug/strawberry differ only
# in shape, toolbox/giftbox only in colour, buggy/racecar only in pattern, teapot/monster only in
# part (and each pair shares its scenes).
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("ladybug", "circle", "red", "dots", "eyes", ("grass", "tiles")),
    ClassSpec("strawberry", "triangle", "red", "dots", "eyes", ("grass", "tiles")),
    ClassSpec("toolbox", "square", "red", "stripes", "handle", ("tiles", "water")),
    ClassSpec("giftbox", "square", "purple", "stripes", "handle", ("tiles", "water")),
    ClassSpec("buggy", "circle", "blue", None, "wheels", ("grass", "sky")),
    ClassSpec("racecar", "circle", "blue", "stripes", "wheels", ("grass", "sky")),
    ClassSpec("teapot", "circle", "purple", None, "handle", ("sky", "water")),
    ClassSpec("monster", "circle", "purple", None, "eyes", ("sky", "water")),
    ClassSpec("bus", "square", "yellow", None, "wheels", ("tiles", "grass")),
    ClassSpec("owl", "triangle", "yellow", "dots", "eyes", ("grass", "sky")),
    ClassSpec("sailboat", "triangle", "blue", "stripes", None, ("water", "sky")),
    ClassSpec("imp", "star", "purple", "stripes", "horns", ("tiles", "water")),
)


def concept_index(name: str) -> int:
    """Index (= bit) of concept ``name``; a clear error for unknown names."""
    try:
        return CONCEPT_NAMES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown concept {name!r}; the vocabulary is {', '.join(CONCEPT_NAMES)}"
        ) from None


def build_concepts(classes: tuple[ClassSpec, ...] = CLASSES) -> list[ConceptSpec]:
    """The :class:`ConceptSpec` list (in :data:`CONCEPT_NAMES` order) for ``classes``."""
    users: dict[str, list[int]] = {n: [] for n in CONCEPT_NAMES}
    for ci, spec in enumerate(classes):
        for name in spec.concept_names():
            concept_index(name)  # validates the name
            users[name].append(ci)
    return [ConceptSpec(n, _KIND_OF[n], tuple(users[n]), len(users[n]) > 1) for n in CONCEPT_NAMES]
