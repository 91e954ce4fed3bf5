"""The concept atlas: a static, self-contained HTML site to browse a FaCT model's concepts.

:func:`build_atlas` turns an :class:`AtlasSpec` (or the equivalent JSON-able dict) into a folder
that works when ``index.html`` is opened straight from disk (``file://``; no server, no network,
no CDN): the data is a script, ``data.js``, that sets ``window.FACT_ATLAS``; ``app.js`` renders
it with DOM calls only (every data string goes through ``textContent`` / attributes, never
``innerHTML``), and every picture is copied into ``assets/`` under a content-hash name, so the
folder can be moved or zipped as a whole. Views (URL hash routes):

* ``#/`` -- the front page: title, summary, the concept list (search by id / name / class
  names; sort by frequency, C2, entropy, spatial extent or index; filter by layer);
* ``#/concept/<id>`` -- a concept: its card, statistics, top-activating images with their
  attributions, labels and presence, and the explained images it contributes to;
* ``#/images`` -- the explained images; ``#/image/<id>`` -- one decision: image, predicted
  class, logit, bias, completeness error, explanation figure, and its concept contributions,
  each linking to the concept.

Spec format (a dict with exactly these keys; ``?`` marks optional keys, which may be omitted or
``null``; unknown keys are errors so that typos do not pass silently)::

    {
      "title": str, "subtitle"?: str,
      "root": str,               # folder the relative picture paths are relative to
                                 # (absolute, or relative to the current directory)
      "classes": [str],          # all class names (unique); every label refers to one
      "layers": [{"name": str, "n_concepts": int}],
      "concepts": [{
        "id": str,               # unique, e.g. "layer4:123"
        "layer": str, "index": int,           # 0 <= index < the layer's n_concepts
        "name"?: str,            # a human label, if any
        "frequency": float,      # fraction of images the concept is active on, in [0, 1]
        "c2"?: float, "entropy"?: float, "spatial_extent"?: float,
        "top_classes"?: [str],   # classes it is most active on (default [])
        "card"?: path, "thumb"?: path,        # its card figure and a small picture
        "top_images"?: [{"image": path, "overlay"?: path, "label": str, "presence": float}],
        "extra"?: {str: number | str}         # further statistics, shown on its page
      }],
      "explanations"?: [{
        "id": str,               # unique
        "image": path, "overlay"?: path,      # the input and its B-cos explanation
        "label": str, "predicted": str,       # true and predicted class
        "correct"?: bool,        # default label == predicted; must agree with it if given
        "logit": float, "bias": float, "completeness_error": float,
        "layer": str,            # the concept layer of the contributions
        "figure"?: path,         # e.g. figures.fig_explanation saved as PNG
        "other"?: float,         # summed contribution of concepts not listed
        "contributions": [{"concept": concept id, "value": float, "overlay"?: path}]
      }],
      "summary"?: {str: number | str | bool | null | list of those | nested such dict}
    }

A *path* is a picture file (PNG, JPEG, GIF or WebP, checked by content), relative to ``root``
or absolute. Numbers must be finite. A concept referenced from an explanation must exist and
belong to the explanation's layer.

Writing: each file is written atomically (temporary file + rename). ``out_dir`` must be
missing, empty, or a previous atlas (it holds ``fact-atlas.json``, the manifest of the files an
atlas build wrote; a rebuild removes the previous build's files it no longer needs and nothing
else). Any other non-empty folder is refused unless ``overwrite=True``, which writes the atlas
files into it and leaves the other files alone.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fact_model._atomic import atomic_write_bytes

__all__ = [
    "MANIFEST_NAME",
    "AtlasError",
    "AtlasSpec",
    "ConceptSpec",
    "ContributionSpec",
    "ExplanationSpec",
    "LayerSpec",
    "TopImageSpec",
    "build_atlas",
    "example_spec",
]

MANIFEST_NAME = "fact-atlas.json"
"""The marker + manifest file of a built atlas (lists the files the build wrote)."""
ATLAS_FORMAT = "fact-atlas"
ATLAS_FORMAT_VERSION = 1
_STATIC_FILES = ("app.js", "style.css")
_IMAGE_EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp"}

Scalar = float | int | str | bool | None


class AtlasError(ValueError):
    """A spec that cannot be built, or an output folder that must not be written."""


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class LayerSpec:
    """A layer with concepts: its name (e.g. ``"layer4"``) and its number of concepts."""

    name: str
    n_concepts: int


@dataclass(frozen=True)
class TopImageSpec:
    """One top-activating image of a concept, with its attribution, class label and presence."""

    image: str
    label: str
    presence: float
    overlay: str | None = None


@dataclass(frozen=True)
class ConceptSpec:
    """A concept: id, layer/index, statistics, pictures (see the module docstring)."""

    id: str
    layer: str
    index: int
    frequency: float
    name: str | None = None
    c2: float | None = None
    entropy: float | None = None
    spatial_extent: float | None = None
    top_classes: tuple[str, ...] = ()
    card: str | None = None
    thumb: str | None = None
    top_images: tuple[TopImageSpec, ...] = ()
    extra: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContributionSpec:
    """A concept's contribution to an explained logit (Eq. 9), optionally with its attribution."""

    concept: str
    value: float
    overlay: str | None = None


@dataclass(frozen=True)
class ExplanationSpec:
    """One explained decision (see the module docstring). ``correct=None`` means derive it."""

    id: str
    image: str
    label: str
    predicted: str
    logit: float
    bias: float
    completeness_error: float
    layer: str
    contributions: tuple[ContributionSpec, ...]
    correct: bool | None = None
    overlay: str | None = None
    figure: str | None = None
    other: float | None = None


@dataclass(frozen=True)
class AtlasSpec:
    """Everything the atlas shows. Build from a dict with :meth:`from_dict`; see module doc."""

    title: str
    root: str
    classes: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    concepts: tuple[ConceptSpec, ...]
    explanations: tuple[ExplanationSpec, ...] = ()
    subtitle: str = ""
    summary: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AtlasSpec:
        """Parse and type-check a JSON-able spec dict (cross-references: :meth:`validate`)."""
        return _parse_spec(data)

    def validate(self) -> None:
        """Check cross-references (layers, classes, concept ids); raises :class:`AtlasError`."""
        _validate_spec(self)


# --------------------------------------------------------------------------- parsing


def _keys(
    d: Any, where: str, required: Sequence[str], optional: Sequence[str]
) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise AtlasError(f"{where} must be an object (dict), got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise AtlasError(f"{where} is missing required key(s) {missing}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise AtlasError(
            f"{where} has unknown key(s) {unknown}; allowed: {sorted([*required, *optional])}"
        )
    return d


def _str(v: Any, where: str, *, optional: bool = False, nonempty: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise AtlasError(f"{where} must be a string, got {type(v).__name__} {v!r}")
    if nonempty and not v:
        raise AtlasError(f"{where} must not be empty")
    return v


def _num(v: Any, where: str, *, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise AtlasError(f"{where} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise AtlasError(f"{where} must be finite, got {v}")
    return float(v)


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise AtlasError(f"{where} must be an integer, got {type(v).__name__} {v!r}")
    return v


def _list(v: Any, where: str, *, optional: bool = False) -> list[Any]:
    if v is None and optional:
        return []
    if isinstance(v, str | bytes) or not isinstance(v, Sequence):
        raise AtlasError(f"{where} must be a list, got {type(v).__name__}")
    return list(v)


def _parse_top_image(d: Any, where: str) -> TopImageSpec:
    d = _keys(d, where, ("image", "label", "presence"), ("overlay",))
    return TopImageSpec(
        image=_str(d["image"], f"{where}.image"),
        label=_str(d["label"], f"{where}.label"),
        presence=_num(d["presence"], f"{where}.presence"),
        overlay=_str(d.get("overlay"), f"{where}.overlay", optional=True),
    )


def _parse_extra(v: Any, where: str) -> dict[str, float | int | str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise AtlasError(f"{where} must be an object of name -> number or string")
    out: dict[str, float | int | str] = {}
    for k, x in v.items():
        key = _str(k, f"{where} key")
        out[key] = x if isinstance(x, str) else _num(x, f"{where}[{k!r}]")
    return out


def _parse_concept(d: Any, where: str) -> ConceptSpec:
    d = _keys(
        d,
        where,
        ("id", "layer", "index", "frequency"),
        (
            "name",
            "c2",
            "entropy",
            "spatial_extent",
            "top_classes",
            "card",
            "thumb",
            "top_images",
            "extra",
        ),
    )
    frequency = _num(d["frequency"], f"{where}.frequency")
    if not 0.0 <= frequency <= 1.0:
        raise AtlasError(f"{where}.frequency must be a fraction in [0, 1], got {frequency}")
    return ConceptSpec(
        id=_str(d["id"], f"{where}.id"),
        layer=_str(d["layer"], f"{where}.layer"),
        index=_int(d["index"], f"{where}.index"),
        frequency=frequency,
        name=_str(d.get("name"), f"{where}.name", optional=True),
        c2=_num(d.get("c2"), f"{where}.c2", optional=True),
        entropy=_num(d.get("entropy"), f"{where}.entropy", optional=True),
        spatial_extent=_num(d.get("spatial_extent"), f"{where}.spatial_extent", optional=True),
        top_classes=tuple(
            _str(c, f"{where}.top_classes[{i}]")
            for i, c in enumerate(
                _list(d.get("top_classes"), f"{where}.top_classes", optional=True)
            )
        ),
        card=_str(d.get("card"), f"{where}.card", optional=True),
        thumb=_str(d.get("thumb"), f"{where}.thumb", optional=True),
        top_images=tuple(
            _parse_top_image(t, f"{where}.top_images[{i}]")
            for i, t in enumerate(_list(d.get("top_images"), f"{where}.top_images", optional=True))
        ),
        extra=_parse_extra(d.get("extra"), f"{where}.extra"),
    )


def _parse_explanation(d: Any, where: str) -> ExplanationSpec:
    d = _keys(
        d,
        where,
        (
            "id",
            "image",
            "label",
            "predicted",
            "logit",
            "bias",
            "completeness_error",
            "layer",
            "contributions",
        ),
        ("correct", "overlay", "figure", "other"),
    )
    contributions = []
    for i, c in enumerate(_list(d["contributions"], f"{where}.contributions")):
        cw = f"{where}.contributions[{i}]"
        c = _keys(c, cw, ("concept", "value"), ("overlay",))
        contributions.append(
            ContributionSpec(
                concept=_str(c["concept"], f"{cw}.concept"),
                value=_num(c["value"], f"{cw}.value"),
                overlay=_str(c.get("overlay"), f"{cw}.overlay", optional=True),
            )
        )
    correct = d.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise AtlasError(f"{where}.correct must be true or false, got {correct!r}")
    error = _num(d["completeness_error"], f"{where}.completeness_error")
    if error < 0:
        raise AtlasError(f"{where}.completeness_error is an absolute error, got {error} < 0")
    return ExplanationSpec(
        id=_str(d["id"], f"{where}.id"),
        image=_str(d["image"], f"{where}.image"),
        label=_str(d["label"], f"{where}.label"),
        predicted=_str(d["predicted"], f"{where}.predicted"),
        logit=_num(d["logit"], f"{where}.logit"),
        bias=_num(d["bias"], f"{where}.bias"),
        completeness_error=error,
        layer=_str(d["layer"], f"{where}.layer"),
        contributions=tuple(contributions),
        correct=correct,
        overlay=_str(d.get("overlay"), f"{where}.overlay", optional=True),
        figure=_str(d.get("figure"), f"{where}.figure", optional=True),
        other=_num(d.get("other"), f"{where}.other", optional=True),
    )


def _parse_spec(data: Mapping[str, Any]) -> AtlasSpec:
    d = _keys(
        data,
        "spec",
        ("title", "root", "classes", "layers", "concepts"),
        ("subtitle", "explanations", "summary"),
    )
    layers = []
    for i, layer in enumerate(_list(d["layers"], "spec.layers")):
        lw = f"spec.layers[{i}]"
        layer = _keys(layer, lw, ("name", "n_concepts"), ())
        layers.append(
            LayerSpec(
                _str(layer["name"], f"{lw}.name"), _int(layer["n_concepts"], f"{lw}.n_concepts")
            )
        )
    summary = d.get("summary") or {}
    if not isinstance(summary, Mapping):
        raise AtlasError("spec.summary must be an object of name -> value")
    return AtlasSpec(
        title=_str(d["title"], "spec.title"),
        subtitle=_str(d.get("subtitle") or "", "spec.subtitle", nonempty=False),
        root=_str(d["root"], "spec.root"),
        classes=tuple(
            _str(c, f"spec.classes[{i}]") for i, c in enumerate(_list(d["classes"], "spec.classes"))
        ),
        layers=tuple(layers),
        concepts=tuple(
            _parse_concept(c, f"spec.concepts[{i}]")
            for i, c in enumerate(_list(d["concepts"], "spec.concepts"))
        ),
        explanations=tuple(
            _parse_explanation(e, f"spec.explanations[{i}]")
            for i, e in enumerate(_list(d.get("explanations"), "spec.explanations", optional=True))
        ),
        summary=dict(summary),
    )


def _flatten_summary(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Scalar]]:
    """Summary entries as ordered ``(key, value)`` pairs; nested dicts become ``a / b`` keys."""
    out: list[tuple[str, Scalar]] = []
    for k, v in summary.items():
        key = f"{prefix}{_str(k, f'spec.summary key {prefix}')}"
        where = f"spec.summary[{key!r}]"
        if isinstance(v, Mapping):
            out.extend(_flatten_summary(v, f"{key} / "))
        elif isinstance(v, str | bool | int) or v is None:  # bool is an int: kept as is
            out.append((key, v))
        elif isinstance(v, float):
            out.append((key, _num(v, where)))
        elif isinstance(v, Sequence):
            items = [x if isinstance(x, str | bool) or x is None else _num(x, where) for x in v]
            out.append((key, ", ".join("null" if x is None else str(x) for x in items)))
        else:
            raise AtlasError(
                f"{where} must be a number, string, bool, null, list or object, "
                f"got {type(v).__name__}"
            )
    return out


def _validate_spec(spec: AtlasSpec) -> None:
    if not spec.classes:
        raise AtlasError("spec.classes is empty; list the dataset's class names")
    dup = _duplicates(spec.classes)
    if dup:
        raise AtlasError(f"spec.classes has duplicate names {dup}")
    classes = set(spec.classes)
    layers = {}
    for i, layer in enumerate(spec.layers):
        if layer.n_concepts < 1:
            raise AtlasError(f"spec.layers[{i}].n_concepts must be >= 1, got {layer.n_concepts}")
        if layer.name in layers:
            raise AtlasError(f"spec.layers has layer {layer.name!r} twice")
        layers[layer.name] = layer
    dup = _duplicates([c.id for c in spec.concepts])
    if dup:
        raise AtlasError(f"spec.concepts has duplicate ids {dup}")
    dup = _duplicates([(c.layer, c.index) for c in spec.concepts])
    if dup:
        raise AtlasError(f"spec.concepts has several concepts at (layer, index) {dup}")

    def known_class(name: str, where: str) -> None:
        if name not in classes:
            raise AtlasError(f"{where} is {name!r}, which is not in spec.classes")

    for i, c in enumerate(spec.concepts):
        where = f"spec.concepts[{i}] ({c.id!r})"
        if c.layer not in layers:
            raise AtlasError(f"{where}.layer {c.layer!r} is not in spec.layers {sorted(layers)}")
        if not 0 <= c.index < layers[c.layer].n_concepts:
            raise AtlasError(
                f"{where}.index {c.index} is outside [0, "
                f"{layers[c.layer].n_concepts}) of layer {c.layer!r}"
            )
        for j, name in enumerate(c.top_classes):
            known_class(name, f"{where}.top_classes[{j}]")
        for j, t in enumerate(c.top_images):
            known_class(t.label, f"{where}.top_images[{j}].label")
    concepts = {c.id: c for c in spec.concepts}
    dup = _duplicates([e.id for e in spec.explanations])
    if dup:
        raise AtlasError(f"spec.explanations has duplicate ids {dup}")
    for i, e in enumerate(spec.explanations):
        where = f"spec.explanations[{i}] ({e.id!r})"
        known_class(e.label, f"{where}.label")
        known_class(e.predicted, f"{where}.predicted")
        if e.correct is not None and e.correct != (e.label == e.predicted):
            raise AtlasError(
                f"{where}.correct is {e.correct} but label {e.label!r} and "
                f"predicted {e.predicted!r} say otherwise; omit it to derive it"
            )
        if e.layer not in layers:
            raise AtlasError(f"{where}.layer {e.layer!r} is not in spec.layers {sorted(layers)}")
        for j, contrib in enumerate(e.contributions):
            cw = f"{where}.contributions[{j}].concept"
            concept = concepts.get(contrib.concept)
            if concept is None:
                raise AtlasError(
                    f"{cw} refers to unknown concept {contrib.concept!r}; every "
                    "referenced concept must be listed in spec.concepts"
                )
            if concept.layer != e.layer:
                raise AtlasError(
                    f"{cw} {contrib.concept!r} is in layer {concept.layer!r}, not "
                    f"the explanation's layer {e.layer!r}"
                )
        dup = _duplicates([c.concept for c in e.contributions])
        if dup:
            raise AtlasError(f"{where}.contributions lists concept(s) {dup} more than once")
    _flatten_summary(spec.summary)


def _duplicates(items: Sequence[Any]) -> list[Any]:
    seen, dup = set(), []
    for x in items:
        if x in seen and x not in dup:
            dup.append(x)
        seen.add(x)
    return dup


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (:mod:`fact_model._atomic`), readable by all like a web page."""
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)  # the temporary file was private (mkstemp); a site is meant to be read


class _Assets:
    """Copies pictures into ``assets/`` under content-hash names (deduplicated, safe, stable)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_source: dict[Path, str] = {}
        self.blobs: dict[str, bytes] = {}

    def add(self, path: str | None, where: str) -> str | None:
        if path is None:
            return None
        src = Path(path).expanduser()
        src = src if src.is_absolute() else self.root / src
        src = src.resolve()
        if src in self.by_source:
            return self.by_source[src]
        if not src.is_file():
            raise AtlasError(
                f"{where}: picture file {str(src)!r} does not exist (paths are "
                f"relative to spec.root {str(self.root)!r} unless absolute)"
            )
        try:
            with Image.open(src) as im:
                fmt = im.format
        except (UnidentifiedImageError, OSError) as err:
            raise AtlasError(f"{where}: {str(src)!r} is not a readable image ({err})") from None
        if fmt not in _IMAGE_EXT:
            raise AtlasError(
                f"{where}: {str(src)!r} is a {fmt} image; the atlas takes {sorted(_IMAGE_EXT)}"
            )
        data = src.read_bytes()
        name = f"assets/{hashlib.sha256(data).hexdigest()[:24]}{_IMAGE_EXT[fmt]}"
        self.blobs[name] = data
        self.by_source[src] = name
        return name


def _site_data(spec: AtlasSpec, assets: _Assets) -> dict[str, Any]:
    """The ``window.FACT_ATLAS`` object: the spec with picture paths replaced by asset names."""
    concepts = []
    for i, c in enumerate(spec.concepts):
        where = f"spec.concepts[{i}] ({c.id!r})"
        concepts.append(
            {
                "id": c.id,
                "layer": c.layer,
                "index": c.index,
                "name": c.name,
                "frequency": c.frequency,
                "c2": c.c2,
                "entropy": c.entropy,
                "spatial_extent": c.spatial_extent,
                "top_classes": list(c.top_classes),
                "card": assets.add(c.card, f"{where}.card"),
                "thumb": assets.add(c.thumb, f"{where}.thumb"),
                "top_images": [
                    {
                        "image": assets.add(t.image, f"{where}.top_images[{j}].image"),
                        "overlay": assets.add(t.overlay, f"{where}.top_images[{j}].overlay"),
                        "label": t.label,
                        "presence": t.presence,
                    }
                    for j, t in enumerate(c.top_images)
                ],
                "extra": [[k, v] for k, v in c.extra.items()],
            }
        )
    explanations = []
    for i, e in enumerate(spec.explanations):
        where = f"spec.explanations[{i}] ({e.id!r})"
        explanations.append(
            {
                "id": e.id,
                "label": e.label,
                "predicted": e.predicted,
                "correct": e.label == e.predicted,
                "logit": e.logit,
                "bias": e.bias,
                "completeness_error": e.completeness_error,
                "layer": e.layer,
                "other": e.other,
                "image": assets.add(e.image, f"{where}.image"),
                "overlay": assets.add(e.overlay, f"{where}.overlay"),
                "figure": assets.add(e.figure, f"{where}.figure"),
                "contributions": [
                    {
                        "concept": c.concept,
                        "value": c.value,
                        "overlay": assets.add(c.overlay, f"{where}.contributions[{j}].overlay"),
                    }
                    for j, c in enumerate(e.contributions)
                ],
            }
        )
    return {
        "format": ATLAS_FORMAT,
        "version": ATLAS_FORMAT_VERSION,
        "title": spec.title,
        "subtitle": spec.subtitle,
        "classes": list(spec.classes),
        "layers": [{"name": layer.name, "n_concepts": layer.n_concepts} for layer in spec.layers],
        "summary": [[k, v] for k, v in _flatten_summary(spec.summary)],
        "concepts": concepts,
        "explanations": explanations,
    }


def _script_json(data: Any, indent: int | None = None) -> str:
    """JSON that is also safe to embed in HTML / JS: no raw ``<``, ``>``, ``&`` (or U+2028/9).

    With ``ensure_ascii`` every non-ASCII character is a ``\\uXXXX`` escape; those three can
    only occur inside JSON strings, where their escapes decode to the same characters.
    """
    separators = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(
        data, ensure_ascii=True, allow_nan=False, indent=indent, separators=separators
    )
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _index_html(title: str) -> bytes:
    template = resources.files("fact_model").joinpath("atlas_assets/index.html").read_text("utf-8")
    return template.replace("{{TITLE}}", html.escape(title, quote=True)).encode("utf-8")


def _previous_manifest(out: Path) -> list[str] | None:
    """The files listed by a previous build's manifest, or ``None`` if ``out`` is no atlas."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != ATLAS_FORMAT:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def _is_own_file(rel: str) -> bool:
    """Whether ``rel`` is a name this module writes (guards deletion of stale files)."""
    if rel in (*_STATIC_FILES, "index.html", "data.js"):
        return True
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] == "assets" and parts[1] not in ("", ".", "..")


def build_atlas(
    spec: AtlasSpec | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the concept atlas for ``spec`` into ``out_dir``; returns the path of index.html.

    ``spec`` is an :class:`AtlasSpec` or its dict form (module docstring). Everything is
    validated and every picture read before anything is written, so a bad spec leaves
    ``out_dir`` untouched. Raises :class:`AtlasError` (a ``ValueError``) for a bad spec, a
    missing or unreadable picture, or a non-empty ``out_dir`` that is not a previous atlas
    (unless ``overwrite``).
    """
    parsed = spec if isinstance(spec, AtlasSpec) else AtlasSpec.from_dict(spec)
    parsed.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AtlasError(f"out_dir {str(out)!r} exists and is not a folder")
    previous = _previous_manifest(out) if out.is_dir() else None
    if out.is_dir() and previous is None and any(out.iterdir()) and not overwrite:
        raise AtlasError(
            f"out_dir {str(out)!r} is not empty and holds no previous atlas ({MANIFEST_NAME}); "
            "choose an empty or new folder, or pass overwrite=True to write the atlas files "
            "into it anyway"
        )
    root = Path(parsed.root).expanduser().resolve()
    if not root.is_dir():
        raise AtlasError(f"spec.root {parsed.root!r} is not a folder (resolved to {str(root)!r})")
    assets = _Assets(root)
    data = _site_data(parsed, assets)

    files: dict[str, bytes] = dict(assets.blobs)
    static = resources.files("fact_model").joinpath("atlas_assets")
    for name in _STATIC_FILES:
        files[name] = static.joinpath(name).read_bytes()
    files["data.js"] = (
        "// Generated by fact_model.atlas.build_atlas; the atlas data (JSON).\n"
        f"window.FACT_ATLAS = {_script_json(data)};\n"
    ).encode()
    files["index.html"] = _index_html(parsed.title)

    out.mkdir(parents=True, exist_ok=True)
    # Pictures and data first, index.html last: an interrupted build never shows half a site
    # from a fresh folder; the manifest is written last so a rebuild can clean up after it.
    for name in sorted(files, key=lambda n: (n == "index.html", n)):
        _write_atomic(out / name, files[name])
    manifest = {
        "format": ATLAS_FORMAT,
        "version": ATLAS_FORMAT_VERSION,
        "title": parsed.title,
        "files": sorted(files),
    }
    _write_atomic(out / MANIFEST_NAME, (_script_json(manifest, indent=1) + "\n").encode("utf-8"))
    for rel in previous or []:
        if rel not in files and _is_own_file(rel):
            (out / rel).unlink(missing_ok=True)
    return out / "index.html"


# --------------------------------------------------------------------------- example


def example_spec(
    folder: str | os.PathLike[str],
    *,
    classes: Sequence[str] = ("bus", "cat", "boat", "kite"),
    seed: int = 0,
) -> dict[str, Any]:
    """Write a small made-up atlas input (PNG files) into ``folder`` and return its spec dict.

    For trying the atlas without a model and for tests: 16 x 16 coloured images with RGBA
    "attributions", 2 layers (``early`` with 4 concepts, ``late`` with 6), 3 explained images
    (the last one misclassified). The numbers are invented, but consistent: each explanation's
    ``logit`` equals its contributions + ``other`` + ``bias`` up to ``completeness_error``.
    """
    if len(classes) < 2:
        raise ValueError("example_spec needs at least two class names")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]

    def save(name: str, array: np.ndarray) -> str:
        Image.fromarray(array).save(root / name, format="PNG")
        return name

    def image(name: str) -> str:
        a = np.empty((16, 16, 3), np.uint8)
        a[...] = rng.integers(40, 215, 3)
        cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 6)
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        return save(name, a)

    def overlay(name: str) -> str:
        a = np.zeros((16, 16, 4), np.uint8)
        a[..., :3] = rng.integers(60, 256, 3)
        cy, cx = rng.uniform(4, 12, 2)
        a[..., 3] = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12)).astype(np.uint8)
        return save(name, a)

    def card(name: str, tops: list[dict[str, Any]]) -> str:
        """A montage: the top images over their attributions (over black), 4x enlarged."""
        top_row = [np.asarray(Image.open(root / t["image"]).convert("RGB")) for t in tops]
        bottom_row = []
        for t in tops:
            rgba = np.asarray(Image.open(root / t["overlay"]).convert("RGBA"), np.float32) / 255
            bottom_row.append((255 * rgba[..., :3] * rgba[..., 3:]).astype(np.uint8))
        grid = np.concatenate([np.concatenate(top_row, 1), np.concatenate(bottom_row, 1)], 0)
        return save(name, grid.repeat(4, 0).repeat(4, 1))

    concepts = []
    for layer, count in (("early", 4), ("late", 6)):
        for k in range(count):
            cid = f"{layer}:{k}"
            tops = [
                {
                    "image": image(f"{layer}_{k}_top{j}.png"),
                    "overlay": overlay(f"{layer}_{k}_top{j}_attr.png"),
                    "label": classes[(k + j // 2) % len(classes)],
                    "presence": round(float(rng.uniform(0.5, 5.0)), 3),
                }
                for j in range(4)
            ]
            concepts.append(
                {
                    "id": cid,
                    "layer": layer,
                    "index": k,
                    "name": None if k % 3 == 2 else f"{layer} pattern {k}",
                    "frequency": round(float(rng.uniform(0.01, 0.6)), 4),
                    "c2": None if k == 1 else round(float(rng.uniform(0.0, 0.6)), 3),
                    "entropy": round(float(rng.uniform(0.0, 2.0)), 3),
                    "spatial_extent": round(float(rng.uniform(5, 200)), 1),
                    "top_classes": sorted({t["label"] for t in tops})[:3],
                    "card": card(f"{layer}_{k}_card.png", tops),
                    "thumb": tops[0]["overlay"],
                    "top_images": tops,
                }
            )
    explanations = []
    for i in range(3):
        label = classes[i % len(classes)]
        predicted = label if i < 2 else classes[(i + 1) % len(classes)]
        values = [round(float(v), 3) for v in rng.uniform(-0.5, 2.0, 4)]
        other, bias = 0.25, -1.0986
        explanations.append(
            {
                "id": f"test-{i:03d}",
                "image": image(f"explained_{i}.png"),
                "overlay": overlay(f"explained_{i}_attr.png"),
                "label": label,
                "predicted": predicted,
                "logit": sum(values) + other + bias,
                "bias": bias,
                "completeness_error": 2.4e-7,
                "layer": "late",
                "other": other,
                "figure": None,
                "contributions": [
                    {
                        "concept": f"late:{k}",
                        "value": v,
                        "overlay": overlay(f"explained_{i}_c{k}.png"),
                    }
                    for k, v in enumerate(values)
                ],
            }
        )
    return {
        "title": "Example concept atlas",
        "subtitle": "made-up concepts, for trying the atlas",
        "root": str(root.resolve()),
        "classes": list(classes),
        "layers": [{"name": "early", "n_concepts": 4}, {"name": "late", "n_concepts": 6}],
        "concepts": concepts,
        "explanations": explanations,
        "summary": {"accuracy": {"B-cos": 0.97, "FaCT late": 0.955}, "seed": seed},
    }
