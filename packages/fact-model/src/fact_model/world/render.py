"""Rendering of one concept-world image and its per-pixel ground truth.

An image is described by a :class:`Layout` (what is where, drawn from a numpy ``Generator`` by
:func:`sample_layout`) and drawn by :func:`render` with the painter's algorithm: the background
scene, clutter strokes, the distractor objects, then the main object on top (so the main object
is never occluded). Every drawing step writes the pixel colours *and* the pixel's set of
concepts, a bit field (bit ``k`` = concept ``k`` of :data:`~fact_model.world.vocabulary.
CONCEPT_NAMES`), so the ground-truth masks are exactly the pixels drawn for each concept:

* **shape** (e.g. ``circle``): the visible silhouette of an object's body, whatever is painted
  on it (colour, pattern ink, eyes, the part of a wheel that overlaps the body).
* **colour** (e.g. ``red``): the body pixels painted in the object colour (silhouette minus
  pattern ink and parts).
* **pattern** (``stripes`` / ``dots``): the body pixels painted in pattern ink.
* **part** (e.g. ``wheels``): every pixel of the part (tyre and hub, eye white and pupil, ...).
* **scene** (e.g. ``grass``): the background pixels that stay visible (not covered by clutter
  or objects).

Clutter pixels carry no concept. Brightness jitter and pixel noise are applied at the end to
the whole image and do not change the masks.

Determinism: layouts come only from the ``Generator`` passed in, and pixel geometry uses only
IEEE-754 float32 additions, multiplications, ``floor`` and comparisons (no transcendental
function on the pixel grid; per-object sines and cosines are rounded to float32 scalars) and
integer arithmetic, so the same layout gives the same bytes on every machine.

Speed: every primitive of an object is evaluated on the object's bounding window only (a disc
of :data:`EXTENT` radii, which holds its body and part), from separable outer sums of per-row
and per-column vectors (``a*dx[None, :] + b*dy[:, None]``), so an image costs a few dozen small
numpy operations (about 0.2 ms for 64x64 on one core).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from fact_model.world.vocabulary import (
    COLOURS,
    CONCEPT_NAMES,
    PARTS,
    PATTERNS,
    SHAPES,
    ClassSpec,
)

__all__ = [
    "COLOUR_RGB",
    "Layout",
    "ObjectParams",
    "SceneParams",
    "Stroke",
    "render",
    "sample_layout",
]

RGB = tuple[int, int, int]

_BIT: dict[str, int] = {name: 1 << k for k, name in enumerate(CONCEPT_NAMES)}
"""Concept name -> its bit in the concept bit field."""

COLOUR_RGB: dict[str, RGB] = {
    "red": (205, 35, 35),
    "yellow": (240, 200, 25),
    "blue": (35, 75, 210),
    "purple": (135, 45, 175),
}
PATTERN_INK: RGB = (245, 245, 240)
TYRE: RGB = (35, 35, 35)
HUB: RGB = (170, 170, 170)
EYE_WHITE: RGB = (250, 250, 250)
PUPIL: RGB = (15, 15, 15)
HANDLE: RGB = (115, 70, 30)
HORN: RGB = (235, 225, 185)

# Object geometry in object units (1 = the object's radius); w points "up" on the object.
SQUARE_HALF = 0.88
TRIANGLE_R = 1.4  # circumradius of the (upright) equilateral triangle
STAR_R = 1.45  # tip radius of the pentagram
# (top, bottom) of each body, where handles / horns and wheels attach.
_ANCHORS: dict[str, tuple[float, float]] = {
    "circle": (1.0, -1.0),
    "square": (SQUARE_HALF, -SQUARE_HALF),
    "triangle": (TRIANGLE_R, -TRIANGLE_R / 2),
    "star": (0.75, -1.05),
}
# Radius (in object units) of the smallest centred disc holding each body and each part.
_BODY_EXTENT: dict[str, float] = {
    "circle": 1.0,
    "square": SQUARE_HALF * math.sqrt(2.0),
    "triangle": TRIANGLE_R,
    "star": STAR_R,
}


def _part_extent(shape: str, part: str) -> float:
    top, bottom = _ANCHORS[shape]
    if part == "wheels":
        return math.hypot(0.55, bottom) + 0.34
    if part == "eyes":
        return math.hypot(0.32, 0.2) + 0.23
    if part == "handle":
        return abs(top - 0.1) + 0.55
    if part == "horns":
        return max(math.hypot(0.62, top + 0.6), math.hypot(0.6, top - 0.15))
    raise ValueError(f"unknown part {part!r}")


# Every primitive of an object (shape, part) lies within EXTENT[shape, part] radii of its
# centre (part None: the body alone); objects are drawn on that window only.
EXTENT: dict[tuple[str, str | None], float] = {
    (shape, part): max(_BODY_EXTENT[shape], 0.0 if part is None else _part_extent(shape, part))
    for shape in SHAPES
    for part in (None, *PARTS)
}
STRIPE_PERIOD, STRIPE_DUTY = 0.42, 0.45
DOT_PERIOD, DOT_RADIUS = 0.5, 0.16

_SCENE_RGB: dict[str, tuple[RGB, RGB]] = {
    "grass": ((70, 145, 45), (40, 100, 28)),  # base, blades
    "water": ((25, 110, 140), (120, 190, 210)),  # base, wave crests
    "sky": ((120, 175, 235), (190, 220, 250)),  # top, bottom of the gradient
    "tiles": ((205, 190, 160), (180, 165, 135)),  # tile, alternate tile
}
_TILE_GROUT: RGB = (110, 100, 90)
_CLOUD: RGB = (248, 248, 252)


class ObjectParams(NamedTuple):
    """One object (main or distractor): its concepts and its pose in pixels."""

    shape: str
    colour: str
    rgb: RGB
    """The colour after jitter."""
    pattern: str | None
    part: str | None
    cx: float
    """Centre, in pixels (pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``)."""
    cy: float
    radius: float
    """In pixels."""
    cos: float
    """Rotation of the object (float32-exact values)."""
    sin: float
    stripe_cos: float
    """Stripe direction in object coordinates."""
    stripe_sin: float
    phase_u: float
    """Pattern phases in periods."""
    phase_w: float


class Stroke(NamedTuple):
    """A clutter stroke: a thick segment (a blob when both ends coincide); no concept."""

    x0: float
    y0: float
    x1: float
    y1: float
    half_width: float
    rgb: RGB


class SceneParams(NamedTuple):
    """The background: its scene concept, two jittered colours and texture parameters."""

    name: str
    rgb0: RGB
    rgb1: RGB
    values: tuple[float, ...]
    """Scene-specific scalars (periods, phases, cloud discs)."""
    columns: np.ndarray | None
    """Grass: per-column blade phases, float32 (W,)."""


class Layout(NamedTuple):
    """Everything :func:`render` needs for one image (derive variants with ``_replace``)."""

    label: int
    scene: SceneParams
    clutter: tuple[Stroke, ...]
    distractors: tuple[ObjectParams, ...]
    main: ObjectParams
    brightness: int
    """Pixel values are scaled by ``brightness / 256``."""
    noise: np.ndarray | None
    """uint8 (H, W, 3) random bytes, mapped to pixel noise after the brightness scaling (see
    :func:`render`), or ``None``."""


# ---------------------------------------------------------------------------------------------
# Sampling


def _f32(*xs: float) -> list[float]:
    """``xs`` rounded to float32 (as Python floats), so that pixel arithmetic is float32-exact."""
    return np.array(xs, dtype=np.float32).tolist()


def _jitter(rgb: RGB, amount: float, u: list[float]) -> RGB:
    """``rgb`` with each channel offset by a uniform integer in [-amount, amount] (3 uniforms)."""
    a = int(amount)
    return tuple(  # type: ignore[return-value]
        min(255, max(0, c + int(v * (2 * a + 1)) - a)) for c, v in zip(rgb, u)
    )


def _object(
    rng: np.random.Generator,
    shape: str,
    colour: str,
    pattern: str | None,
    part: str | None,
    cx: float,
    cy: float,
    radius: float,
    max_rotation_deg: float,
    colour_jitter: float,
) -> ObjectParams:
    u = rng.random(7).tolist()
    theta = math.radians(max_rotation_deg) * (2.0 * u[0] - 1.0)
    alpha = math.pi * u[1]
    f = _f32(cx, cy, radius, math.cos(theta), math.sin(theta), math.cos(alpha), math.sin(alpha))
    phase_u, phase_w = _f32(u[2], u[3])
    rgb = _jitter(COLOUR_RGB[colour], colour_jitter, u[4:7])
    return ObjectParams(shape, colour, rgb, pattern, part, *f, phase_u, phase_w)


def sample_layout(
    rng: np.random.Generator, label: int, spec: ClassSpec, cfg: object, size: int
) -> Layout:
    """Draw the layout of one image of class ``label`` (``spec``) under ``cfg`` (a
    :class:`~fact_model.world.dataset.WorldConfig`), consuming only ``rng``."""
    c: Any = cfg  # a WorldConfig (not imported: the dataset module imports this one)
    u = rng.random(6).tolist()
    scene = _sample_scene(rng, spec.scenes[int(u[0] * len(spec.scenes))], size, c)
    clutter = tuple(_sample_stroke(rng, size) for _ in range(int(u[1] * (c.clutter + 1))))

    lo, hi = c.position_range
    cx, cy = size * (lo + (hi - lo) * u[2]), size * (lo + (hi - lo) * u[3])
    radius = size * (c.scale_range[0] + (c.scale_range[1] - c.scale_range[0]) * u[4])
    main = _object(
        rng,
        spec.shape,
        spec.colour,
        spec.pattern,
        spec.part,
        cx,
        cy,
        radius,
        c.max_rotation,
        c.colour_jitter,
    )
    brightness = round(256 * (1.0 + c.brightness_jitter * (2.0 * u[5] - 1.0)))

    distractors = []
    d_lo, d_hi = c.distractor_scale_range
    for _ in range(c.max_distractors):
        v = rng.random(7).tolist()
        if v[0] >= c.distractor_prob:
            continue
        r = size * (d_lo + (d_hi - d_lo) * v[1])
        # Rejection-sample a centre away from the main object (a few tries, then give up).
        tries = rng.random(16).tolist()
        span, min_d2 = size - 2 * r, (1.35 * radius + 1.2 * r) ** 2
        centre = None
        for t in range(0, 16, 2):
            dx, dy = r + span * tries[t], r + span * tries[t + 1]
            if (dx - cx) ** 2 + (dy - cy) ** 2 >= min_d2:
                centre = (dx, dy)
                break
        if centre is None:
            continue
        dx, dy = centre
        pat = int(v[4] * (len(PATTERNS) + 1))
        part = PARTS[int(v[5] * len(PARTS))] if v[6] < c.distractor_part_prob else None
        distractors.append(
            _object(
                rng,
                SHAPES[int(v[2] * len(SHAPES))],
                COLOURS[int(v[3] * len(COLOURS))],
                PATTERNS[pat] if pat < len(PATTERNS) else None,
                part,
                dx,
                dy,
                r,
                180.0,
                c.colour_jitter,
            )
        )
    noise = None
    if c.noise > 0:
        # Raw 64-bit draws read as little-endian bytes: the fastest way to many random bytes.
        n_words = -(-size * size * 3 // 8)
        raw = rng.bit_generator.random_raw(n_words).astype("<u8", copy=False).view(np.uint8)
        noise = raw[: size * size * 3].reshape(size, size, 3)
    return Layout(label, scene, clutter, tuple(distractors), main, brightness, noise)


def _sample_scene(rng: np.random.Generator, name: str, size: int, c: Any) -> SceneParams:
    u = rng.random(10).tolist()
    rgb0, rgb1 = _SCENE_RGB[name]
    rgb0, rgb1 = _jitter(rgb0, c.scene_jitter, u[4:7]), _jitter(rgb1, c.scene_jitter, u[7:10])
    columns = None
    values: tuple[float, ...]
    if name == "grass":
        values = tuple(_f32(1.0 / (6.0 + 5.0 * u[0]), 0.35 + 0.3 * u[1]))  # 1/period, duty
        columns = rng.random(size, dtype=np.float32)
    elif name == "water":
        period, amp, q = 5.0 + 4.0 * u[0], 0.3 + 0.5 * u[1], 10.0 + 12.0 * u[2]
        values = tuple(_f32(1.0 / period, amp, 1.0 / q, u[3]))
    elif name == "sky":
        discs: list[float] = []
        for _ in range(int(u[0] * 3)):
            v = rng.random(3).tolist()
            x, y, r = size * v[0], size * (0.05 + 0.35 * v[1]), size * (0.05 + 0.05 * v[2])
            for off in (-1.0, 0.0, 1.0):  # three overlapping discs make a cloud
                discs += [x + off * 1.2 * r, y + (0.3 * r if off else 0.0), r]
        values = tuple(_f32(*discs)) if discs else ()
    else:  # tiles
        period = size * (0.14 + 0.1 * u[0])
        values = tuple(_f32(1.0 / period, u[1], u[2], 1.6 / period))
    return SceneParams(name, rgb0, rgb1, values, columns)


def _sample_stroke(rng: np.random.Generator, size: int) -> Stroke:
    v = rng.random(8).tolist()
    x0, y0 = size * v[0], size * v[1]
    length = size * 0.25 * v[2]
    ang = 2 * math.pi * v[3]
    rgb = (int(v[5] * 256), int(v[6] * 256), int(v[7] * 256))
    return Stroke(
        *_f32(x0, y0, x0 + length * math.cos(ang), y0 + length * math.sin(ang), 0.6 + 1.2 * v[4]),
        rgb,
    )


# ---------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    """Pixel-centre coordinates ``0.5, 1.5, ...`` (float32, read-only)."""
    g = np.arange(size, dtype=np.float32) + np.float32(0.5)
    g.flags.writeable = False
    return g


def _frac(t: np.ndarray) -> np.ndarray:
    return t - np.floor(t)


class _Window(NamedTuple):
    """A clipped bounding window of the canvas with centred coordinate vectors."""

    rows: slice
    cols: slice
    dx: np.ndarray  # (w,) x - cx
    dy: np.ndarray  # (h,) y - cy


def _window(size: int, cx: float, cy: float, extent: float) -> _Window | None:
    i0, i1 = max(0, int(cy - extent)), min(size, int(cy + extent) + 2)
    j0, j1 = max(0, int(cx - extent)), min(size, int(cx + extent) + 2)
    if i0 >= i1 or j0 >= j1:
        return None
    g = _grid(size)
    return _Window(
        slice(i0, i1), slice(j0, j1), g[j0:j1] - np.float32(cx), g[i0:i1] - np.float32(cy)
    )


def _lin(win: _Window, a: float, b: float) -> np.ndarray:
    """``a * dx + b * dy`` on the window (h, w)."""
    return (np.float32(a) * win.dx)[None, :] + (np.float32(b) * win.dy)[:, None]


def _disc(win: _Window, px: float, py: float, r: float) -> np.ndarray:
    """Pixels within distance ``r`` of ``(px, py)`` (window-relative centre offsets)."""
    ex = win.dx - np.float32(px)
    ey = win.dy - np.float32(py)
    return (ex * ex)[None, :] + (ey * ey)[:, None] <= np.float32(r * r)


class _Frame(NamedTuple):
    """Object coordinates on a window: ``u`` (right) and ``w`` (up), in radii."""

    win: _Window
    o: ObjectParams

    def half_plane(self, nu: float, nw: float, d: float) -> np.ndarray:
        """``nu * u + nw * w <= d`` in object units."""
        o = self.o
        inv = 1.0 / o.radius
        a = (nu * o.cos + nw * o.sin) * inv
        b = (nu * o.sin - nw * o.cos) * inv
        return _lin(self.win, a, b) <= np.float32(d)

    def coord(self, nu: float, nw: float, scale: float, offset: float) -> np.ndarray:
        """``(nu * u + nw * w) * scale + offset``."""
        o = self.o
        s = scale / o.radius
        a = (nu * o.cos + nw * o.sin) * s
        b = (nu * o.sin - nw * o.cos) * s
        return _lin(self.win, a, b) + np.float32(offset)

    def disc(self, pu: float, pw: float, r: float) -> np.ndarray:
        """Disc of radius ``r`` around object point ``(pu, pw)`` (object units)."""
        o = self.o
        px = o.radius * (o.cos * pu + o.sin * pw)
        py = o.radius * (o.sin * pu - o.cos * pw)
        return _disc(self.win, px, py, o.radius * r)

    def triangle(self, pts: tuple[tuple[float, float], ...]) -> np.ndarray:
        """Filled triangle with counter-clockwise object-unit vertices ``pts``."""
        m = None
        for k in range(3):
            (u0, w0), (u1, w1) = pts[k], pts[(k + 1) % 3]
            nu, nw = w1 - w0, -(u1 - u0)  # outward normal of a counter-clockwise edge
            h = self.half_plane(nu, nw, nu * u0 + nw * w0)
            m = h if m is None else m & h
        assert m is not None
        return m


def _silhouette(f: _Frame) -> np.ndarray:
    shape = f.o.shape
    if shape == "circle":
        return f.disc(0.0, 0.0, 1.0)
    if shape == "square":
        u, w = f.coord(1, 0, 1.0, 0.0), f.coord(0, 1, 1.0, 0.0)
        return np.maximum(np.abs(u), np.abs(w)) <= np.float32(SQUARE_HALF)
    if shape == "triangle":  # apex up; edges at distance R/2 with normals at -90, 30, 150 deg
        d = TRIANGLE_R / 2
        c30 = math.sqrt(3) / 2
        return f.half_plane(0, -1, d) & f.half_plane(c30, 0.5, d) & f.half_plane(-c30, 0.5, d)
    if shape == "star":
        # A filled pentagram is the set of points inside at least 4 of the 5 half-planes of its
        # edge lines (normals at 90 + 72k deg, distance R cos 72 deg): the inner pentagon is
        # inside all five, each spike outside exactly one.
        d = STAR_R * math.cos(math.radians(72))
        count = sum(
            f.half_plane(math.cos(a), math.sin(a), d).view(np.uint8)
            for a in (math.radians(90 + 72 * k) for k in range(5))
        )
        return count >= 4
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(f: _Frame) -> np.ndarray:
    o = f.o
    if o.pattern == "stripes":
        t = f.coord(o.stripe_cos, o.stripe_sin, 1.0 / STRIPE_PERIOD, o.phase_u)
        return _frac(t) < np.float32(STRIPE_DUTY)
    if o.pattern == "dots":
        a = _frac(f.coord(1, 0, 1.0 / DOT_PERIOD, o.phase_u)) - np.float32(0.5)
        b = _frac(f.coord(0, 1, 1.0 / DOT_PERIOD, o.phase_w)) - np.float32(0.5)
        return a * a + b * b <= np.float32((DOT_RADIUS / DOT_PERIOD) ** 2)
    raise ValueError(f"unknown pattern {o.pattern!r}")


def _part(f: _Frame) -> list[tuple[np.ndarray, RGB]]:
    """The part's primitives, in drawing order, with their colours."""
    o = f.o
    top, bottom = _ANCHORS[o.shape]
    if o.part == "wheels":
        out = []
        for su in (-0.55, 0.55):
            out.append((f.disc(su, bottom, 0.34), TYRE))
            out.append((f.disc(su, bottom, 0.13), HUB))
        return out
    if o.part == "eyes":
        out = []
        for su in (-0.32, 0.32):
            out.append((f.disc(su, 0.2, 0.23), EYE_WHITE))
            out.append((f.disc(su, 0.2, 0.1), PUPIL))
        return out
    if o.part == "handle":  # upper half of a ring standing on the top of the body
        ring = f.disc(0.0, top - 0.1, 0.55) & ~f.disc(0.0, top - 0.1, 0.36)
        return [(ring & f.half_plane(0, -1, -(top - 0.15)), HANDLE)]
    if o.part == "horns":
        out = []
        for s in (-1.0, 1.0):
            base0, base1 = (s * 0.2, top - 0.15), (s * 0.6, top - 0.15)
            tip = (s * 0.62, top + 0.6)
            pts = (base0, base1, tip) if s > 0 else (base1, base0, tip)
            out.append((f.triangle(pts), HORN))
        return out
    raise ValueError(f"unknown part {o.part!r}")


class _Canvas:
    """Palette-indexed canvas: every pixel holds the index of a (colour, concept bits) entry.

    Drawing writes one uint16 per pixel; :meth:`finish` looks colours and bits up once, so the
    colour and the ground truth of a pixel can never disagree.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.index = np.zeros((size, size), dtype=np.uint16)
        self.rgb: list[int] = []  # flat r, g, b, r, g, b, ...
        self.bits: list[int] = []

    def entry(self, rgb: RGB, bits: int) -> int:
        """A new palette entry; returns its index."""
        self.rgb.extend(rgb)
        self.bits.append(bits)
        return len(self.bits) - 1

    def entries(self, rgb: np.ndarray, bits: int) -> int:
        """``len(rgb)`` new entries (uint8 (n, 3) colours) of the same bits; returns the first
        index."""
        k = len(self.bits)
        self.rgb.extend(rgb.ravel().tolist())
        self.bits.extend([bits] * len(rgb))
        return k

    def finish(
        self, brightness: int, noise: np.ndarray | None, noise_std: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The image (brightness-scaled palette colours, then the noise) and the bit field."""
        if len(self.bits) > 65536:
            raise ValueError("too many palette entries for a uint16 canvas")
        n = len(self.bits)
        pal = np.array(self.rgb, dtype=np.int32).reshape(n, 3)
        if brightness != 256:
            pal = np.minimum((pal * brightness + 128) >> 8, 255)
        size = self.size
        if noise is not None and noise_std > 0:
            # Look up v * 256 + noise byte in the noise table; the palette holds v * 256, one
            # 6-byte item per colour (a single take moves all three channels).
            pal16 = (pal << 8).astype(np.uint16)
            flat = pal16.view("V6")[:, 0].take(self.index).view(np.uint16)
            flat = flat.reshape(size, size, 3)
            flat |= noise
            image = _noise_table(float(noise_std)).take(flat)
        else:
            image = pal.astype(np.uint8).take(self.index, axis=0)
        return image, np.array(self.bits, dtype=np.int32).take(self.index)


def _draw_object(cv: _Canvas, o: ObjectParams) -> None:
    win = _window(cv.size, o.cx, o.cy, EXTENT[o.shape, o.part] * o.radius)
    if win is None:
        return
    f = _Frame(win, o)
    idx = cv.index[win.rows, win.cols]
    shape_bit = _BIT[o.shape]
    sil = _silhouette(f)
    np.putmask(idx, sil, cv.entry(o.rgb, shape_bit | _BIT[o.colour]))
    if o.pattern is not None:
        ink = cv.entry(PATTERN_INK, shape_bit | _BIT[o.pattern])
        np.putmask(idx, sil & _pattern(f), ink)
    if o.part is not None:
        part_bit = _BIT[o.part]
        on_part = None
        for m, rgb in _part(f):
            np.putmask(idx, m, cv.entry(rgb, part_bit))
            cv.entry(rgb, part_bit | shape_bit)  # the same on the body: the next index
            on_part = m if on_part is None else on_part | m
        # A part pixel on the body keeps the body's shape bit (the silhouette is unchanged).
        assert on_part is not None
        np.add(idx, on_part & sil, out=idx)


@lru_cache(maxsize=64)
def _tile_lut(base: int) -> np.ndarray:
    """uint16 (16,): palette entry of a tiles pixel by its code ``8 * row_line + 4 * row_parity
    + 2 * col_line + col_parity`` (tile colours ``base``, ``base + 1``, grout ``base + 2``)."""
    code = np.arange(16)
    line = (code >> 3 & 1) | (code >> 1 & 1)
    parity = (code >> 2 & 1) ^ (code & 1)
    lut = np.where(line == 1, base + 2, base + parity).astype(np.uint16)
    lut.flags.writeable = False
    return lut


def _draw_scene(cv: _Canvas, s: SceneParams) -> None:
    size = cv.size
    g = _grid(size)
    v = s.values
    bit = _BIT[s.name]
    idx = cv.index
    if s.name == "grass":
        inv_p, duty = v
        assert s.columns is not None
        blade = _frac((g * np.float32(inv_p))[:, None] + s.columns[None, :]) < np.float32(duty)
        base = cv.entry(s.rgb0, bit)
        cv.entry(s.rgb1, bit)  # base + 1
        np.add(blade, np.uint16(base), out=idx)
    elif s.name == "water":
        inv_p, amp, inv_q, phase = v
        wave = np.abs(np.float32(2) * _frac(g * np.float32(inv_q) + np.float32(phase)) - 1)
        crest = _frac((g * np.float32(inv_p))[:, None] + np.float32(amp) * wave[None, :]) < 0.22
        base = cv.entry(s.rgb0, bit)
        cv.entry(s.rgb1, bit)  # base + 1
        np.add(crest, np.uint16(base), out=idx)
    elif s.name == "sky":  # a vertical gradient (one palette entry per row) and clouds
        t = (np.arange(size) + 0.5) / size
        rows = np.rint(np.outer(1 - t, s.rgb0) + np.outer(t, s.rgb1)).astype(np.uint8)
        first = cv.entries(rows, bit)
        idx[:] = np.arange(first, first + size, dtype=np.uint16)[:, None]
        cloud = None
        for k in range(0, len(v), 3):
            x, y, r = v[k : k + 3]
            win = _window(size, x, y, r)
            if win is not None:
                cloud = cv.entry(_CLOUD, bit) if cloud is None else cloud
                np.putmask(idx[win.rows, win.cols], _disc(win, 0.0, 0.0, r), cloud)
    else:  # tiles: a checkerboard of two tile colours with grout lines
        inv_p, ox, oy, grout = v
        tx = g * np.float32(inv_p) + np.float32(ox)
        ty = g * np.float32(inv_p) + np.float32(oy)
        # Per row and per column: (on a grout line) * 2 + (parity of the tile number); a pixel's
        # entry is grout on either line, else tile colour 0 / 1 by the parity of the tile sum.
        fx, fy = np.floor(tx), np.floor(ty)
        col = (tx - fx < np.float32(grout)).view(np.uint8) * 2 + (fx % 2).astype(np.uint8)
        row = (ty - fy < np.float32(grout)).view(np.uint8) * 8 + (fy % 2).astype(np.uint8) * 4
        base = cv.entry(s.rgb0, bit)
        cv.entry(s.rgb1, bit)  # base + 1
        cv.entry(_TILE_GROUT, bit)  # base + 2
        _tile_lut(base).take(row[:, None] + col[None, :], out=idx)


def _draw_stroke(cv: _Canvas, s: Stroke) -> None:
    ex, ey = s.x1 - s.x0, s.y1 - s.y0
    extent = max(abs(ex), abs(ey)) + s.half_width + 1
    win = _window(cv.size, s.x0, s.y0, extent)
    if win is None:
        return
    # Distance to the segment: project on it, clamp the parameter to [0, 1].
    l2 = ex * ex + ey * ey
    if l2 > 0:
        h = np.clip(_lin(win, ex / l2, ey / l2), 0, 1)
        px = win.dx[None, :] - np.float32(ex) * h
        py = win.dy[:, None] - np.float32(ey) * h
    else:
        px, py = win.dx[None, :], win.dy[:, None]
    m = px * px + py * py <= np.float32(s.half_width * s.half_width)
    np.putmask(cv.index[win.rows, win.cols], m, cv.entry(s.rgb, 0))


@lru_cache(maxsize=8)
def _noise_table(std: float) -> np.ndarray:
    """uint8 (256 * 256,) table: ``table[v * 256 + b]`` = pixel value ``v`` plus the noise of
    random byte ``b``, clipped to [0, 255].

    The noise is triangular on [-a, a] with ``a = sqrt(6) std`` (standard deviation ``std``),
    discretised by its inverse CDF at ``(b + 0.5) / 256`` (only ``sqrt``, which IEEE-754
    rounds exactly, so the table is the same on every machine), rounded to integers.
    """
    a = math.sqrt(6.0) * std
    p = (np.arange(256) + 0.5) / 256
    x = np.where(p < 0.5, a * (np.sqrt(2 * p) - 1), a * (1 - np.sqrt(2 * (1 - p))))
    delta = np.rint(x).astype(np.int32)
    table = np.clip(np.arange(256, dtype=np.int32)[:, None] + delta[None, :], 0, 255)
    table = table.astype(np.uint8).ravel()
    table.flags.writeable = False
    return table


def render(layout: Layout, size: int, noise_std: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``layout``: the uint8 (H, W, 3) image and its int32 (H, W) concept bit field.

    Bit ``k`` of ``bits[i, j]`` is set when pixel ``(i, j)`` belongs to concept ``k`` (see the
    module docstring for what each kind covers). ``noise_std`` scales the layout's noise bytes
    (see :func:`_noise_table`); pass the config's ``noise``.
    """
    cv = _Canvas(size)
    _draw_scene(cv, layout.scene)
    for s in layout.clutter:
        _draw_stroke(cv, s)
    for o in layout.distractors:
        _draw_object(cv, o)
    _draw_object(cv, layout.main)
    return cv.finish(layout.brightness, layout.noise, noise_std)
