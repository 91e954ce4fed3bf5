"""fact_model.atlas without a browser: spec validation, escaping, relocatability, overwrite rules."""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fact_model.atlas import MANIFEST_NAME, AtlasError, AtlasSpec, build_atlas, example_spec

EVIL_CLASS = "<img src=x onerror=alert(1)>"
EVIL_NAME = 'wheels & "spokes" </script><b>'
EVIL_TITLE = "Atlas <script>alert('t')</script> & co"


def _read_data(out: Path) -> dict[str, Any]:
    text = (out / "data.js").read_text("utf-8")
    match = re.search(r"^window\.FACT_ATLAS = (.*);$", text, re.MULTILINE)
    assert match, "data.js must assign window.FACT_ATLAS"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def _shared_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    s = example_spec(tmp_path_factory.mktemp("src"), classes=["bus", EVIL_CLASS, "boat", "kite"])
    s["concepts"][0]["name"] = EVIL_NAME
    s["title"] = EVIL_TITLE
    return s


@pytest.fixture
def spec(_shared_spec: dict[str, Any]) -> dict[str, Any]:
    """The example spec with hostile strings; its picture folder is shared: do not modify it."""
    return copy.deepcopy(_shared_spec)


def test_builds_a_complete_site(spec: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    index = build_atlas(spec, out)
    assert index == out / "index.html"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"index.html", "data.js", "app.js", "style.css", MANIFEST_NAME} <= names
    data = _read_data(out)
    assert [c["id"] for c in data["concepts"]] == [c["id"] for c in spec["concepts"]]
    assert data["classes"][1] == EVIL_CLASS and data["concepts"][0]["name"] == EVIL_NAME
    # every picture became an asset that exists and holds the source's bytes
    src_root = Path(spec["root"])
    for c_spec, c_out in zip(spec["concepts"], data["concepts"]):
        for key in ("card", "thumb"):
            assert (out / c_out[key]).read_bytes() == (src_root / c_spec[key]).read_bytes()
        for t_spec, t_out in zip(c_spec["top_images"], c_out["top_images"]):
            assert (out / t_out["image"]).read_bytes() == (src_root / t_spec["image"]).read_bytes()
            assert t_out["label"] == t_spec["label"] and t_out["presence"] == t_spec["presence"]
    wrong = data["explanations"][2]
    assert wrong["correct"] is False and data["explanations"][0]["correct"] is True
    assert wrong["figure"] is None
    assert [k["concept"] for k in wrong["contributions"]] == [
        k["concept"] for k in spec["explanations"][2]["contributions"]
    ]
    assert data["summary"] == [
        ["accuracy / B-cos", 0.97],
        ["accuracy / FaCT late", 0.955],
        ["seed", 0],
    ]
    assets = {n for n in names if n.startswith("assets/")}
    assert all(re.fullmatch(r"assets/[0-9a-f]{24}\.png", n) for n in assets)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "fact-atlas" and set(manifest["files"]) == names - {MANIFEST_NAME}


def test_same_picture_is_copied_once_and_builds_are_reproducible(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    spec["concepts"][1]["thumb"] = spec["concepts"][0]["thumb"]
    a, b = tmp_path / "a", tmp_path / "b"
    build_atlas(spec, a)
    build_atlas(AtlasSpec.from_dict(spec), b)
    assert (a / "data.js").read_bytes() == (b / "data.js").read_bytes()
    data = _read_data(a)
    assert data["concepts"][0]["thumb"] == data["concepts"][1]["thumb"]
    n_sources = len({p.read_bytes() for p in Path(spec["root"]).iterdir()})
    assert len(list((a / "assets").iterdir())) <= n_sources


def test_data_text_is_escaped_in_every_written_file(spec: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    build_atlas(spec, out)
    for path in out.rglob("*"):
        if path.suffix in {".html", ".js", ".css", ".json"}:
            text = path.read_text("utf-8")
            for raw in (EVIL_CLASS, EVIL_NAME, EVIL_TITLE, "<script>alert", "</script><b>"):
                assert raw not in text, f"{raw!r} appears unescaped in {path.name}"
    index = (out / "index.html").read_text("utf-8")
    assert f"<title>{html.escape(EVIL_TITLE)}</title>" in index
    assert index.count("<script") == 2  # data.js and app.js only; nothing inline
    data_js = (out / "data.js").read_text("utf-8")
    assert "<" not in data_js and ">" not in data_js and "&" not in data_js
    assert _read_data(out)["title"] == EVIL_TITLE  # escaped, not altered


def test_app_never_parses_data_as_html() -> None:
    app = resources.files("fact_model").joinpath("atlas_assets/app.js").read_text("utf-8")
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "fetch(",
        "XMLHttpRequest",
    ):
        assert sink not in app, f"app.js uses {sink}"


def test_site_is_relocatable(spec: dict[str, Any], tmp_path: Path) -> None:
    spec["root"] = str(shutil.copytree(spec["root"], tmp_path / "src"))
    out = tmp_path / "atlas"
    build_atlas(spec, out)
    index = (out / "index.html").read_text("utf-8")
    refs = re.findall(r'(?:src|href)="([^"]*)"', index)
    assert refs and all(not re.match(r"^(/|[a-z]+:)", r) for r in refs), refs
    for ref in refs:
        if not ref.startswith("#"):
            assert (out / ref).is_file(), ref
    root = str(Path(spec["root"]))
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".html", ".js", ".json"}:
            text = path.read_text("utf-8")
            assert root not in text and str(tmp_path) not in text, path.name
    moved = shutil.move(str(out), str(tmp_path / "elsewhere" / "atlas"))
    shutil.rmtree(spec["root"])  # the site needs neither its old place nor its sources
    data = _read_data(Path(moved))
    pictures = [c["thumb"] for c in data["concepts"]] + [e["image"] for e in data["explanations"]]
    for rel in pictures:
        assert not Path(rel).is_absolute() and Image.open(Path(moved) / rel).format == "PNG"


def test_refuses_a_foreign_folder_unless_overwrite(spec: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(AtlasError, match="not empty and holds no previous atlas"):
        build_atlas(spec, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    build_atlas(spec, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "index.html").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(AtlasError, match="not a folder"):
        build_atlas(spec, tmp_path / "file", overwrite=True)


def test_rebuild_of_a_previous_atlas_replaces_only_its_own_files(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "atlas"
    build_atlas(spec, out)
    (out / "README.txt").write_text("mine")
    before = set((out / "assets").iterdir())
    smaller = copy.deepcopy(spec)
    smaller["concepts"] = [c for c in spec["concepts"] if c["layer"] == "late"]
    smaller["layers"] = [layer for layer in spec["layers"] if layer["name"] == "late"]
    smaller["title"] = "second build"
    build_atlas(smaller, out)  # a previous atlas: no overwrite needed
    data = _read_data(out)
    assert data["title"] == "second build" and len(data["concepts"]) == 6
    after = set((out / "assets").iterdir())
    assert after < before  # the early concepts' pictures were removed
    used = {c["thumb"] for c in data["concepts"]} | {c["card"] for c in data["concepts"]}
    assert used <= {p.relative_to(out).as_posix() for p in after}
    assert (out / "README.txt").read_text() == "mine"
    assert not list(out.rglob("*.tmp"))


def _expect(spec: dict[str, Any], tmp_path: Path, match: str) -> None:
    out = tmp_path / "never"
    with pytest.raises(AtlasError, match=match):
        build_atlas(spec, out)
    assert not out.exists()  # a bad spec writes nothing


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("classes"), r"spec is missing required key\(s\) \['classes'\]"),
        (
            lambda s: s["concepts"][3].pop("frequency"),
            r"spec\.concepts\[3\] is missing required key\(s\) \['frequency'\]",
        ),
        (lambda s: s["concepts"][0].update(c2_score=0.3), r"unknown key\(s\) \['c2_score'\]"),
        (
            lambda s: s["explanations"][1]["contributions"][0].update(concept="late:99"),
            r"contributions\[0\]\.concept refers to unknown concept 'late:99'",
        ),
        (
            lambda s: s["explanations"][0]["contributions"][0].update(concept="early:0"),
            r"is in layer 'early', not the explanation's layer 'late'",
        ),
        (
            lambda s: s["concepts"][2].update(card="missing.png"),
            r"spec\.concepts\[2\] \('early:2'\)\.card: picture file .*missing\.png' does not exist",
        ),
        (
            lambda s: s["concepts"][0]["top_images"][1].update(label="zebra"),
            r"top_images\[1\]\.label is 'zebra', which is not in spec\.classes",
        ),
        (lambda s: s["concepts"][0].update(index=4), r"index 4 is outside \[0, 4\)"),
        (lambda s: s["concepts"][1].update(id="early:0"), r"duplicate ids \['early:0'\]"),
        (lambda s: s["concepts"][0].update(entropy=float("nan")), r"entropy must be finite"),
        (lambda s: s["concepts"][0].update(frequency=True), r"frequency must be a number"),
        (lambda s: s["concepts"][0].update(frequency=12.0), r"frequency must be a fraction"),
        (lambda s: s["explanations"][2].update(correct=True), r"correct is True but label"),
        (lambda s: s["explanations"][0].update(predicted="plane"), r"'plane', which is not in"),
        (lambda s: s["concepts"][0].update(layer="layer9"), r"'layer9' is not in spec\.layers"),
        (lambda s: s.update(summary={"x": object()}), r"spec\.summary\['x'\] must be a number"),
        (lambda s: s.update(root="/nonexistent/fact-atlas-root"), r"spec\.root .* is not a folder"),
        (lambda s: s.update(concepts="late:0"), r"spec\.concepts must be a list"),
    ],
)
def test_spec_errors_are_clear(spec: dict[str, Any], tmp_path: Path, edit: Any, match: str) -> None:
    edit(spec)
    _expect(spec, tmp_path, match)


def test_a_picture_must_be_an_image(spec: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    spec["explanations"][0]["image"] = str(tmp_path / "notes.png")  # absolute paths work too
    _expect(spec, tmp_path, r"notes\.png' is not a readable image")
    Image.new("RGB", (4, 4)).save(tmp_path / "pic.bmp")
    spec["explanations"][0]["image"] = str(tmp_path / "pic.bmp")
    _expect(spec, tmp_path, r"is a BMP image; the atlas takes")
