"""The concept world generator: determinism, masks against pixels and geometry, the class
structure, the config, and every view of it (torch, Hugging Face, oracle features, image
source)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import defaultdict

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.path import Path

from fact_model.world import (
    CLASSES,
    CONCEPT_NAMES,
    SPLITS,
    ConceptWorld,
    WorldConfig,
    masks_from_bits,
    present_from_bits,
)
from fact_model.world import render as render_mod
from fact_model.world.dataset import WORLD_VERSION
from fact_model.world.render import (
    COLOUR_RGB,
    EYE_WHITE,
    HANDLE,
    HORN,
    HUB,
    PATTERN_INK,
    PUPIL,
    TYRE,
    ObjectParams,
    render,
)
from fact_model.world.vocabulary import COLOURS, PARTS, PATTERNS, SCENES, SHAPES

C = len(CLASSES)
BIT = {name: 1 << k for k, name in enumerate(CONCEPT_NAMES)}
QUIET = WorldConfig(noise=0.0, brightness_jitter=0.0)  # pixel values = palette colours
PART_RGB = {
    "wheels": {TYRE, HUB},
    "eyes": {EYE_WHITE, PUPIL},
    "handle": {HANDLE},
    "horns": {HORN},
}
WORLD = ConceptWorld()


def _colours(image: np.ndarray, mask: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(c) for c in px) for px in image[mask]}


def _off(o: ObjectParams) -> ObjectParams:
    """The object moved far off the canvas (not drawn)."""
    return o._replace(cx=-1e4, cy=-1e4)


def _scene_only(lay):
    return lay._replace(clutter=(), distractors=(), main=_off(lay.main))


def _alone(lay, obj: ObjectParams):
    """The layout's scene (same brightness and noise) with only ``obj`` on it."""
    return _scene_only(lay)._replace(main=obj)


# -- determinism -----------------------------------------------------------------------------


def _same(a, b) -> bool:
    return (
        np.array_equal(a.image, b.image)
        and a.label == b.label
        and np.array_equal(a.masks, b.masks)
        and np.array_equal(a.present, b.present)
        and np.array_equal(a.concept_bits, b.concept_bits)
    )


def test_same_seed_split_index_give_the_same_bytes_in_a_fresh_world() -> None:
    cfg = WorldConfig(seed=7, image_size=40)
    w1, w2 = ConceptWorld(cfg), ConceptWorld(WorldConfig.from_dict(cfg.to_dict()))
    for split in SPLITS:
        for i in (0, 5, 123_456):
            a, b = w1.sample(i, split), w2.sample(i, split)
            assert _same(a, b)
            assert a.image.dtype == np.uint8 and a.image.shape == (40, 40, 3)
            assert a.masks.dtype == bool and a.masks.shape == (len(CONCEPT_NAMES), 40, 40)
            assert a.concept_bits.dtype == np.int32


def test_seeds_and_splits_give_different_images_with_the_same_labels() -> None:
    worlds = [ConceptWorld(WorldConfig(seed=s, image_size=32)) for s in (0, 1)]
    for i in range(6):
        imgs = [w.sample(i, sp).image for w in worlds for sp in SPLITS]
        for a in range(len(imgs)):
            for b in range(a + 1, len(imgs)):
                assert not np.array_equal(imgs[a], imgs[b])
        assert {w.sample(i, sp).label for w in worlds for sp in SPLITS} == {i % C}


def test_an_image_does_not_depend_on_request_order_batching_or_global_rng() -> None:
    w = ConceptWorld(WorldConfig(image_size=32))
    ref = [w.sample(i, "val") for i in range(12)]
    # Any order, repeats, any batch; other worlds and other splits in between.
    order = [11, 3, 3, 0, 7, 5]
    b = w.batch(order, "val")
    for n, i in enumerate(order):
        assert np.array_equal(b.images[n], ref[i].image)
        assert np.array_equal(b.masks[n], ref[i].masks)
        assert np.array_equal(b.present[n], ref[i].present)
        assert np.array_equal(b.concept_bits[n], ref[i].concept_bits)
        assert b.labels[n] == ref[i].label and b.indices[n] == i
    ConceptWorld(WorldConfig(seed=9, image_size=32)).batch(range(20), "val")
    w.images("train", 15)
    np.random.seed(123)
    torch.manual_seed(123)
    imgs, labels = w.images("val", 7, start=5)
    for n in range(7):
        assert np.array_equal(imgs[n], ref[5 + n].image) and labels[n] == ref[5 + n].label
    # The generator neither reads nor writes the global random states.
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    w.sample(3, "test")
    w.batch(range(4), "test")
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    # layout + render_layout is what sample does.
    image, bits = w.render_layout(w.layout(4, "val"))
    assert np.array_equal(image, ref[4].image) and np.array_equal(bits, ref[4].concept_bits)
    empty = w.batch([], "val")
    assert empty.images.shape == (0, 32, 32, 3) and empty.masks.shape == (0, 18, 32, 32)


# Digest of images 0..7 of the default train split (pixels and concept bits). If a change to the
# generator changes it on purpose, bump WORLD_VERSION (it reseeds every image and invalidates
# cached Hugging Face datasets) and record the new digest here.
GOLDEN = {2: "e08a148ce077858b"}


def test_default_world_images_are_pinned_by_world_version() -> None:
    b = WORLD.batch(range(8), "train")
    h = hashlib.sha256(b.images.tobytes() + b.concept_bits.astype("<i4").tobytes())
    assert h.hexdigest()[:16] == GOLDEN.get(WORLD_VERSION), (
        "the default world's images changed: bump WORLD_VERSION and update GOLDEN"
    )


# -- masks against pixels --------------------------------------------------------------------


def test_mask_contract_present_bits_and_decoding() -> None:
    b = WORLD.batch(range(2 * C), "test")
    for n in range(len(b.labels)):
        bits, masks = b.concept_bits[n], b.masks[n]
        for k in range(len(CONCEPT_NAMES)):
            assert np.array_equal(masks[k], (bits >> k) & 1 == 1)
            # Present concepts have pixels, absent ones none, and nothing else is flagged.
            assert b.present[n, k] == bool(masks[k].sum() > 0)
        assert (bits >> len(CONCEPT_NAMES) == 0).all()  # no stray bits
    assert np.array_equal(masks_from_bits(b.concept_bits), b.masks)
    assert np.array_equal(present_from_bits(b.concept_bits), b.present)
    assert np.array_equal(masks_from_bits(b.concept_bits[0]), b.masks[0])
    assert np.array_equal(present_from_bits(b.concept_bits[0]), b.present[0])
    s = WORLD.sample(0, "test")
    assert np.array_equal(s.present, s.masks.any(axis=(1, 2)))
    with pytest.raises(ValueError, match="integer array"):
        masks_from_bits(np.zeros((4, 4), np.float32))


def test_pixels_are_the_scene_the_clutter_and_the_objects_painted_in_order() -> None:
    """Each pixel shows the last thing drawn on it (scene, strokes, distractors, main object)
    with that thing's concepts; the main object is never covered."""
    w = WORLD
    n_strokes = n_stroke_images = 0
    for i in range(20):
        lay = w.layout(i, "val")
        image, bits = w.render_layout(lay)
        scene_bit = BIT[lay.scene.name]
        exp_image, exp_bits = w.render_layout(_scene_only(lay))
        assert (exp_bits == scene_bit).all()  # the scene alone: its concept everywhere
        c_image, c_bits = w.render_layout(_scene_only(lay)._replace(clutter=lay.clutter))
        stroke = c_bits == 0
        exp_image[stroke], exp_bits[stroke] = c_image[stroke], 0
        n_strokes += bool(lay.clutter)
        n_stroke_images += bool(stroke.any())
        for obj in (*lay.distractors, lay.main):
            o_image, o_bits = w.render_layout(_alone(lay, obj))
            on = (o_bits & scene_bit) == 0
            assert on.any()
            exp_image[on], exp_bits[on] = o_image[on], o_bits[on]
        assert np.array_equal(exp_bits, bits) and np.array_equal(exp_image, image)
    # Clutter strokes are drawn (pixels of no concept) in most images that have some.
    assert n_strokes >= 8 and n_stroke_images >= 0.8 * n_strokes


def _ambiguous(t: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose texture coordinate lies within float32 rounding of a decision boundary."""
    f = t - np.floor(t)
    return (np.abs(f - threshold) < 1e-4) | (f < 1e-4) | (f > 1 - 1e-4)


def test_scene_textures_match_their_definition() -> None:
    """Each scene's texture recomputed in float64 from its parameters (grass blades, water
    crests, sky gradient with cloud discs, a checkerboard of tiles with grout lines)."""
    w = ConceptWorld(QUIET)
    size = QUIET.image_size
    g = np.arange(size) + 0.5
    y, x = g[:, None] * np.ones(size), np.ones(size)[:, None] * g
    found = {}
    for i in range(200):
        lay = w.layout(i, "test")
        if lay.scene.name != "sky" or lay.scene.values:  # a sky with clouds
            found.setdefault(lay.scene.name, lay)
        if len(found) == len(SCENES):
            break
    for name, lay in found.items():
        sc = lay.scene
        image, bits = w.render_layout(_scene_only(lay))
        assert (bits == BIT[name]).all()
        v = sc.values
        expect = np.empty((size, size, 3), int)
        skip = np.zeros((size, size), bool)
        if name == "grass":
            t = y * v[0] + sc.columns[None, :].astype(float)
            expect[:] = sc.rgb0
            expect[(t - np.floor(t)) < v[1]] = sc.rgb1
            skip = _ambiguous(t, v[1])
        elif name == "water":
            wave = np.abs(2 * ((x * v[2] + v[3]) % 1.0) - 1)
            t = y * v[0] + v[1] * wave
            expect[:] = sc.rgb0
            expect[(t - np.floor(t)) < 0.22] = sc.rgb1
            skip = _ambiguous(t, 0.22) | _ambiguous(x * v[2] + v[3], 0.5)
        elif name == "sky":
            tt = g / size
            grad = np.rint(np.outer(1 - tt, sc.rgb0) + np.outer(tt, sc.rgb1))
            expect[:] = grad[:, None, :]
            for k in range(0, len(v), 3):
                d = np.hypot(x - v[k], y - v[k + 1])
                expect[d <= v[k + 2]] = render_mod._CLOUD
                skip |= np.abs(d - v[k + 2]) < 1e-3
        else:
            tx, ty = x * v[0] + v[1], y * v[0] + v[2]
            odd = (np.floor(tx) + np.floor(ty)) % 2 == 1
            expect[:] = sc.rgb0
            expect[odd] = sc.rgb1
            expect[((tx % 1) < v[3]) | ((ty % 1) < v[3])] = render_mod._TILE_GROUT
            skip = _ambiguous(tx, v[3]) | _ambiguous(ty, v[3])
        assert skip.mean() < 0.05, name
        assert np.array_equal(image[~skip], expect[~skip]), name
        assert len(_colours(image, ~skip)) >= (size if name == "sky" else 2)


def test_mask_pixels_have_the_concept_colours_exactly_without_noise() -> None:
    w = ConceptWorld(QUIET)
    jit = int(QUIET.colour_jitter)
    seen = set()
    for i in range(3 * C):
        lay = w.layout(i, "train")
        image, bits = w.render_layout(lay)
        objects = (*lay.distractors, lay.main)
        for o in objects:
            assert all(abs(a - b) <= jit for a, b in zip(o.rgb, COLOUR_RGB[o.colour]))
        masks = masks_from_bits(bits)
        for name in COLOURS:
            m = masks[CONCEPT_NAMES.index(name)]
            if m.any():
                seen.add(name)
                assert _colours(image, m) <= {o.rgb for o in objects if o.colour == name}
        for name in PATTERNS:
            m = masks[CONCEPT_NAMES.index(name)]
            assert not m.any() or _colours(image, m) == {PATTERN_INK}
        for name in PARTS:
            m = masks[CONCEPT_NAMES.index(name)]
            assert _colours(image, m) <= PART_RGB[name]
        # The scene's pixels: its two jittered colours (and its grout / gradient / clouds).
        sc = lay.scene
        m = masks[CONCEPT_NAMES.index(sc.name)]
        nominal = render_mod._SCENE_RGB[sc.name]
        for got, nom in zip((sc.rgb0, sc.rgb1), nominal):
            assert all(abs(a - b) <= int(QUIET.scene_jitter) for a, b in zip(got, nom))
        allowed = {sc.rgb0, sc.rgb1}
        if sc.name == "tiles":
            allowed.add(render_mod._TILE_GROUT)
        if sc.name == "sky":
            t = (np.arange(QUIET.image_size) + 0.5) / QUIET.image_size
            grad = np.rint(np.outer(1 - t, sc.rgb0) + np.outer(t, sc.rgb1)).astype(int)
            allowed = {tuple(map(int, r)) for r in grad} | {render_mod._CLOUD}
        assert _colours(image, m) <= allowed
    assert seen == set(COLOURS)


def test_colour_masks_are_near_the_nominal_colour_with_jitter_brightness_and_noise() -> None:
    cfg = WORLD.config
    bj = cfg.brightness_jitter + 1 / 512  # the factor is rounded to 1/256
    noise_max = math.ceil(math.sqrt(6.0) * cfg.noise)  # triangular noise on [-a, a]
    b = WORLD.batch(range(2 * C), "val")
    worst = 0.0
    for name, nominal in COLOUR_RGB.items():
        k = CONCEPT_NAMES.index(name)
        for c in range(3):
            vals = b.images[..., c][b.masks[:, k]].astype(float)
            bound = cfg.colour_jitter * (1 + bj) + nominal[c] * bj + 0.5 + noise_max + 1
            dev = np.abs(vals - nominal[c]).max()
            assert dev <= bound, (name, c, dev, bound)
            worst = max(worst, dev)
    assert worst > cfg.colour_jitter  # the noise and brightness do move the pixels


def test_noise_and_brightness_are_as_documented() -> None:
    w = WORLD
    diffs = []
    for i in range(8):
        lay = w.layout(i, "train")
        noisy, bits = w.render_layout(lay)
        clean, clean_bits = render(lay, w.image_size, 0.0)  # same layout without the noise
        assert np.array_equal(bits, clean_bits)
        flat = render(lay._replace(brightness=256), w.image_size, 0.0)[0].astype(int)
        expect = np.minimum((flat * lay.brightness + 128) >> 8, 255)
        assert np.array_equal(clean, expect)
        assert abs(lay.brightness / 256 - 1) <= w.config.brightness_jitter + 1 / 512
        inner = (clean > 20) & (clean < 235)  # no clipping there
        diffs.append((noisy.astype(int) - clean)[inner])
    d = np.concatenate(diffs)
    assert abs(d.mean()) < 0.2
    assert d.std() == pytest.approx(w.config.noise, rel=0.05)
    assert np.abs(d).max() <= math.ceil(math.sqrt(6.0) * w.config.noise)


def _object(shape, pattern=None, part=None, theta_deg=0.0, radius=14.0, cx=48.3, cy=47.6):
    t = math.radians(theta_deg)
    c, s = np.float32([math.cos(t), math.sin(t)]).tolist()
    return ObjectParams(
        shape, "blue", (35, 75, 210), pattern, part, cx, cy, radius, c, s, 0.6, 0.8, 0.3, 0.7
    )


def _quiet_layout(size=96):
    w = ConceptWorld(dataclasses.replace(QUIET, image_size=size))
    return w, _scene_only(w.layout(0, "train"))


def test_object_masks_follow_the_documented_kinds() -> None:
    """shape = silhouette whatever is painted on it; colour = silhouette minus pattern and part;
    pattern inside the body; part = all its pixels, with the shape bit where it is on the body."""
    w, base = _quiet_layout()
    for shape in SHAPES:
        plain = w.render_layout(base._replace(main=_object(shape)))[1]
        silhouette = (plain & BIT[shape]) != 0
        assert np.array_equal(
            plain[silhouette], np.full(silhouette.sum(), BIT[shape] | BIT["blue"])
        )
        for pattern in (None, *PATTERNS):
            for part in (None, *PARTS):
                o = _object(shape, pattern, part)
                image, bits = w.render_layout(base._replace(main=o))
                m = {n: (bits & BIT[n]) != 0 for n in (shape, "blue", *PATTERNS, *PARTS)}
                assert np.array_equal(m[shape], silhouette)  # parts never grow the body
                pat = m[pattern] if pattern else np.zeros_like(silhouette)
                prt = m[part] if part else np.zeros_like(silhouette)
                assert np.array_equal(m["blue"], silhouette & ~pat & ~prt)
                assert not (pat & ~silhouette).any()
                assert pattern is None or pat.any()
                assert part is None or prt.any()
                others = [n for n in (*PATTERNS, *PARTS) if n not in (pattern, part)]
                assert not any(m[n].any() for n in others)
                # Part pixels are exactly those of the part drawn without a pattern.
                if part:
                    bare = w.render_layout(base._replace(main=_object(shape, None, part)))[1]
                    assert np.array_equal(prt, (bare & BIT[part]) != 0)
                    assert (bits[prt & ~silhouette] == BIT[part]).all()
                    assert _colours(image, prt) <= PART_RGB[part]
                assert _colours(image, m["blue"]) == {(35, 75, 210)}


def _inside(shape: str, x, y, cx, cy, r, scale):
    """Independent float64 geometry of an unrotated body (apex / tip up on screen)."""
    dx, dy = (x - cx) / scale, (y - cy) / scale
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.88 * r
    if shape == "triangle":
        R = 1.4 * r
        pts = [
            (0, -R),
            (R * math.sin(math.radians(60)), R / 2),
            (-R * math.sin(math.radians(60)), R / 2),
        ]
    else:  # a pentagram: 5 tips at 1.45 r, 5 inner corners
        R = 1.45 * r
        r_in = R * math.cos(math.radians(72)) / math.cos(math.radians(36))
        pts = []
        for k in range(10):
            a = math.radians(90 + 36 * k)
            rad = R if k % 2 == 0 else r_in
            pts.append((rad * math.cos(a), -rad * math.sin(a)))  # screen y points down
    path = Path([*pts, pts[0]], closed=True)
    return path.contains_points(np.stack([dx.ravel(), dy.ravel()], 1)).reshape(dx.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_match_independent_geometry(shape: str) -> None:
    w, base = _quiet_layout()
    o = _object(shape)
    bits = w.render_layout(base._replace(main=o))[1]
    mask = (bits & BIT[shape]) != 0
    y, x = np.mgrid[0:96, 0:96] + 0.5
    inner = _inside(shape, x, y, o.cx, o.cy, o.radius, 0.97)
    outer = _inside(shape, x, y, o.cx, o.cy, o.radius, 1.03)
    assert inner.sum() > 100
    assert not (inner & ~mask).any() and not (mask & ~outer).any()
    # Rotation keeps the area; the body's farthest pixel turns with the angle.
    for theta in (25.0, -40.0, 90.0):
        rot = (
            w.render_layout(base._replace(main=_object(shape, theta_deg=theta)))[1] & BIT[shape]
        ) != 0
        assert rot.sum() == pytest.approx(mask.sum(), rel=0.08)
        if shape in ("triangle", "star"):
            d2 = (x - o.cx) ** 2 + (y - o.cy) ** 2
            far = np.argwhere(rot & (d2 >= d2[rot].max() - 1e-6))[0]
            ang = math.degrees(math.atan2(far[1] + 0.5 - o.cx, -(far[0] + 0.5 - o.cy)))
            period = 120 if shape == "triangle" else 72
            off = (ang - theta) % period
            assert min(off, period - off) < 8, (theta, ang)


def test_every_primitive_lies_inside_its_objects_drawing_window(monkeypatch) -> None:
    """No part is cut off by the window an object is drawn on (all shape and part pairs)."""
    w, base = _quiet_layout(112)
    objects = [
        _object(s, "stripes", p, theta, radius=18.0, cx=56.2, cy=55.7)
        for s in SHAPES
        for p in (None, *PARTS)
        for theta in (0.0, 45.0, 90.0, 180.0, 250.0)
    ]
    drawn = [w.render_layout(base._replace(main=o))[1] for o in objects]
    extent = dict(render_mod.EXTENT)
    monkeypatch.setattr(render_mod, "EXTENT", defaultdict(lambda: 3.0))
    y, x = np.mgrid[0:112, 0:112] + 0.5
    for o, bits in zip(objects, drawn):
        wide = w.render_layout(base._replace(main=o))[1]
        assert np.array_equal(bits, wide), (o.shape, o.part, o.cos, o.sin)
        on = (bits & ~BIT[base.scene.name]) != 0
        reach = np.sqrt((x - o.cx) ** 2 + (y - o.cy) ** 2)[on].max()
        assert reach <= extent[o.shape, o.part] * o.radius + 1.0


# -- classes ---------------------------------------------------------------------------------


def test_class_structure_shared_and_specific_concepts() -> None:
    w = WORLD
    assert w.num_classes == C >= 10 and len(set(w.classes)) == C
    assert w.concept_names == list(CONCEPT_NAMES) and len(set(CONCEPT_NAMES)) == w.n_concepts
    combos = {(c.shape, c.colour, c.pattern, c.part) for c in CLASSES}
    assert len(combos) == C  # the main object alone determines the class
    for spec in w.concepts:
        users = tuple(ci for ci, c in enumerate(CLASSES) if spec.name in c.concept_names())
        assert spec.classes == users and spec.shared == (len(users) > 1)
    object_concepts = [s for s in w.concepts if s.kind != "scene"]
    assert sum(s.shared for s in object_concepts) >= 8
    specific = {s.name for s in w.concepts if len(s.classes) == 1}
    assert specific == {"star", "horns"}
    assert {s.kind for s in w.concepts} == {"shape", "colour", "pattern", "part", "scene"}
    # Minimal pairs: for each object kind, two classes differing in that kind only.
    fields = ("shape", "colour", "pattern", "part")
    for f in fields:
        rest = [g for g in fields if g != f]
        assert any(
            getattr(a, f) != getattr(b, f) and all(getattr(a, g) == getattr(b, g) for g in rest)
            for a in CLASSES
            for b in CLASSES
        ), f
    for c in CLASSES:
        assert len(c.scenes) == 2 and set(c.scenes) <= set(SCENES)


def test_labels_are_index_mod_classes_and_images_show_their_class() -> None:
    w = WORLD
    n = 3 * C
    b = w.batch(range(n), "train")
    assert b.labels.tolist() == [i % C for i in range(n)]
    assert w.images("train", n)[1].tolist() == b.labels.tolist()
    assert [w.label(i, "test") for i in range(n)] == b.labels.tolist()
    scene_idx = [CONCEPT_NAMES.index(s) for s in SCENES]
    for i in range(n):
        spec = CLASSES[i % C]
        present = {CONCEPT_NAMES[k] for k in np.flatnonzero(b.present[i])}
        own = {x for x in (spec.shape, spec.colour, spec.pattern, spec.part) if x}
        assert own <= present
        assert b.present[i, scene_idx].sum() == 1 and present & set(SCENES) <= set(spec.scenes)
        # The main object carries exactly the class's object concepts and is the largest.
        lay = w.layout(i, "train")
        _, bits = w.render_layout(_alone(lay, lay.main))
        main = {CONCEPT_NAMES[k] for k in np.flatnonzero(present_from_bits(bits))}
        assert main - set(SCENES) == own
        assert all(d.radius < lay.main.radius for d in lay.distractors)
    # Distractors appear and carry vocabulary concepts.
    layouts = [w.layout(i, "train") for i in range(n)]
    assert sum(len(lay.distractors) for lay in layouts) > n // 2


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 8),
        ("image_size", 64.0),
        ("image_size", True),
        ("seed", -1),
        ("seed", 1.5),
        ("scale_range", (0.3, 0.2)),
        ("scale_range", (0.2,)),
        ("scale_range", (0.2, 0.5)),
        ("scale_range", 0.2),
        ("position_range", (-0.1, 0.5)),
        ("position_range", (0.2, math.nan)),
        ("distractor_scale_range", (0.1, 0.2)),  # not below scale_range
        ("max_rotation", 200.0),
        ("max_rotation", math.nan),
        ("max_distractors", -1),
        ("max_distractors", 1.0),
        ("distractor_prob", 1.5),
        ("distractor_part_prob", -0.1),
        ("clutter", -2),
        ("noise", -1.0),
        ("noise", math.nan),
        ("colour_jitter", math.inf),
        ("scene_jitter", -3),
        ("brightness_jitter", 1.0),
        ("brightness_jitter", "0.1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        WorldConfig(**{field: value})


def test_config_round_trip_and_normalisation() -> None:
    cfg = WorldConfig(
        image_size=48,
        seed=3,
        scale_range=[0.18, 0.2],
        noise=4,
        max_distractors=np.int64(3),
        distractor_prob=np.float64(0.25),
    )
    assert cfg.scale_range == (0.18, 0.2) and isinstance(cfg.noise, float)
    assert type(cfg.max_distractors) is int
    d = cfg.to_dict()
    assert d["scale_range"] == [0.18, 0.2]
    assert WorldConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert hash(WorldConfig.from_dict(d)) == hash(cfg)
    assert WorldConfig.from_dict(WorldConfig().to_dict()) == WorldConfig()
    assert WorldConfig(noise=6) == WorldConfig(noise=6.0)
    with pytest.raises(ValueError, match=r"unknown WorldConfig fields.*'colour'"):
        WorldConfig.from_dict({**d, "colour": 1})
    with pytest.raises(TypeError, match="WorldConfig"):
        ConceptWorld({"seed": 1})  # type: ignore[arg-type]
    # Fingerprints identify the images.
    w = ConceptWorld(cfg)
    fp = w.fingerprint("train", 10)
    assert fp == ConceptWorld(WorldConfig.from_dict(d)).fingerprint("train", 10)
    others = {
        w.fingerprint("val", 10),
        w.fingerprint("train", 11),
        w.fingerprint("train", 10, start=1),
        ConceptWorld(dataclasses.replace(cfg, seed=4)).fingerprint("train", 10),
    }
    assert fp not in others and len(others) == 4


def test_bad_indices_splits_and_counts_are_refused() -> None:
    w = ConceptWorld(WorldConfig(image_size=16))
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="index"):
            w.sample(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*train, val, test"):
        w.sample(0, "validation")
    with pytest.raises(ValueError, match="unknown split"):
        w.batch([0], "dev")
    with pytest.raises(ValueError, match="n must be"):
        w.images("train", -1)
    with pytest.raises(ValueError, match="n must be"):
        w.torch_dataset("train", 0)
    assert w.images("train", 0)[0].shape == (0, 16, 16, 3)
    assert w.sample(np.int64(3)).label == 3


# -- views: torch, Hugging Face, oracle, image source ----------------------------------------


def test_torch_dataset_matches_sample() -> None:
    w = ConceptWorld(WorldConfig(image_size=24, seed=2))
    ref = [w.sample(i, "test") for i in range(4, 10)]
    for in_memory in (True, False):
        ds = w.torch_dataset("test", 6, start=4, in_memory=in_memory)
        assert len(ds) == 6 and ds.classes == w.classes
        assert ds.targets == [s.label for s in ref] == [(4 + k) % C for k in range(6)]
        for k in (0, 5, -1):
            x, y = ds[k]
            s = ref[k]
            assert x.dtype == torch.float32 and x.shape == (3, 24, 24)
            assert torch.equal(x, torch.from_numpy(s.image).permute(2, 0, 1).float() / 255)
            assert y == s.label and ds.world_index(k % 6) == 4 + k % 6
        with pytest.raises(IndexError):
            ds[6]
    flip = w.torch_dataset("test", 2, start=4, transform=lambda t: t.flip(-1))
    assert torch.equal(flip[1][0], w.torch_dataset("test", 2, start=4)[1][0].flip(-1))
    loader = torch.utils.data.DataLoader(w.torch_dataset("test", 6, start=4), batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 24, 24) and yb.tolist() == [s.label for s in ref[:4]]


def test_hf_dataset_rows_equal_samples(tmp_path) -> None:
    w = ConceptWorld(WorldConfig(image_size=20, seed=5))
    ds = w.hf_dataset("val", 3, start=2, cache_dir=tmp_path)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3 and str(ds.split) == "val"
    expected = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=w.classes),
            "index": datasets.Value("int64"),
            "present": datasets.List(datasets.Value("bool"), length=18),
            "concept_bits": datasets.Array2D(shape=(20, 20), dtype="int32"),
        }
    )
    assert ds.features == expected == w.hf_features()
    assert ds.features["label"].names == w.classes
    for k, row in enumerate(ds):
        s = w.sample(2 + k, "val")
        assert row["index"] == 2 + k and row["label"] == s.label
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), s.image)  # lossless
        bits = np.asarray(row["concept_bits"], dtype=np.int32)
        assert np.array_equal(bits, s.concept_bits)
        assert np.array_equal(masks_from_bits(bits), s.masks)
        assert row["present"] == s.present.tolist()
    # Another range in the same cache is another dataset, not the cached one.
    other = w.hf_dataset("val", 3, start=0, cache_dir=tmp_path)
    assert other["index"] == [0, 1, 2]
    assert np.array_equal(np.asarray(other[2]["image"]), w.sample(2, "val").image)
    with pytest.raises(ValueError, match="n must be"):
        w.hf_dataset("val", 0, cache_dir=tmp_path)


def test_oracle_features_are_the_masks_plus_a_nothing_channel() -> None:
    w = ConceptWorld(WorldConfig(image_size=32))
    assert w.oracle_dim == w.n_concepts + 1
    for i in range(6):
        s = w.sample(i, "test")
        o = w.oracle_features(i, "test")
        assert o.dtype == torch.float32 and o.shape == (w.oracle_dim, 32, 32)
        assert torch.equal(o[:-1], torch.from_numpy(s.masks).float())
        assert torch.equal(o[-1], torch.from_numpy(s.concept_bits == 0).float())
        assert (o.sum(0) >= 1).all()  # every pixel has a channel
        nothing = o[-1] == 1
        assert (o[:-1, nothing] == 0).all()
    ex = w.oracle_extractor("test", start=2)
    assert ex.dim == w.oracle_dim
    full = ex.features_at([0, 3], torch.zeros(2, 3, 32, 32))
    assert torch.equal(
        full, torch.stack([w.oracle_features(2, "test"), w.oracle_features(5, "test")])
    )
    # At another image resolution the maps are resized bilinearly (c2score's OracleFeatures).
    small = ex.features_at([1], torch.zeros(1, 6, 16, 16))
    ref = F.interpolate(
        w.oracle_features(3, "test")[None], size=(16, 16), mode="bilinear", align_corners=False
    )
    assert small.shape == (1, w.oracle_dim, 16, 16) and torch.allclose(small, ref)
    with pytest.raises(ValueError, match="split"):
        w.oracle_extractor("nope")


def test_world_source_images_equal_the_world() -> None:
    from fact_model.data import IndexedImages, open_dataset
    from fact_model.world_source import WorldImages

    cfg = WorldConfig(image_size=24)
    w = ConceptWorld(cfg)
    src = WorldImages("test", 4, config=cfg, start=3)
    assert len(src) == 4 and src.classes == w.classes
    assert src.targets == [(3 + k) % C for k in range(4)]
    for k in range(4):
        x, y = src.get(k)
        s = w.sample(src.world_index(k), "test")
        assert src.world_index(k) == 3 + k
        assert torch.equal(x, torch.from_numpy(s.image).permute(2, 0, 1).float() / 255)
        assert y == s.label
    spec = open_dataset("world:val:3")
    assert isinstance(spec, WorldImages) and spec.split == "val" and len(spec) == 3
    assert torch.equal(spec.get(2)[0], WORLD.torch_dataset("val", 3)[2][0])
    items = IndexedImages(spec, transform=lambda t: t)
    x, y, i = items[1]
    assert i == 1 and y == 1 % C and torch.equal(x, spec.get(1)[0])
    assert WorldImages.from_spec("train:2", config=cfg).images.shape == (2, 3, 24, 24)
    with pytest.raises(ValueError, match="world\\[:SPLIT\\[:N\\]\\]"):
        WorldImages.from_spec("a:1:2")
