"""The concept atlas in a real browser: headless system Chromium through Playwright, via file://.

Skipped only when no Chromium / Chrome executable can be found (``.ci/run`` installs the Debian
``chromium`` package). Playwright is used with ``executable_path`` and never downloads browsers.
The browser runs offline with networking features off; the site must work from disk alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from fact_model.atlas import build_atlas, example_spec
from fact_model.figures import fig_explanation, save_figure

EVIL_CLASS = "<img src=x onerror=alert(1)>"
EVIL_NAME = 'wheels & "spokes" <b>bold</b>'
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _find_browser() -> str | None:
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    for name in BROWSER_NAMES:
        candidate = Path("/usr/bin") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


BROWSER = _find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium/Chrome executable found (looked for chromium, chromium-browser, "
    "google-chrome on PATH and in /usr/bin); install one, e.g. `apt-get install chromium`",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("src")
    spec = example_spec(root, classes=["bus", EVIL_CLASS, "boat", "kite"])
    spec["concepts"][0]["name"] = EVIL_NAME
    # as fact atlas --names shows a CLIP-Dissect name's score (fact_model.report)
    spec["concepts"][0]["extra"] = {"name score (soft-WPMI)": -0.123456}
    # the misclassified image gets its explanation figure, rendered by fact_model.figures
    e = spec["explanations"][2]
    fig = fig_explanation(
        np.asarray(Image.open(root / e["image"]).convert("RGB")),
        e["predicted"],
        e["logit"],
        e["bias"],
        e["completeness_error"],
        [(k["concept"], k["value"]) for k in e["contributions"]],
        [np.asarray(Image.open(root / k["overlay"])) for k in e["contributions"]],
        other=e["other"],
    )
    save_figure(fig, root / "explanation_2.png", dpi=40)
    e["figure"] = "explanation_2.png"
    index = build_atlas(spec, tmp_path_factory.mktemp("atlas") / "site")
    return spec, index


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=BROWSER, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


class Watched:
    """A page plus everything that went wrong on it (script errors, console errors, dialogs)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        page.on(  # the site is self-contained: nothing but its own files is ever requested
            "request",
            lambda r: r.url.startswith("file://") or self.problems.append(f"request: {r.url}"),
        )
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url}"))
        page.on(
            "console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}")
        )
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context.new_page())
    yield w
    context.close()
    assert w.problems == [], w.problems


def _row_ids(page: Page) -> list[str]:
    return page.eval_on_selector_all("tr.concept-row", "rows => rows.map(r => r.dataset.id)")


def _title(c: dict[str, Any]) -> str:
    return c["name"] or f"{c['layer']} #{c['index']}"


def test_concept_list_renders_searches_and_sorts(site: tuple[dict, Path], watched: Watched) -> None:
    spec, index = site
    page = watched.page
    page.goto(index.as_uri())
    page.wait_for_selector("tr.concept-row")
    assert len(_row_ids(page)) == len(spec["concepts"]) == 10
    assert page.text_content("#count") == "10 of 10 concepts"
    # default order: frequency, descending
    by_freq = sorted(spec["concepts"], key=lambda c: -c["frequency"])
    assert _row_ids(page) == [c["id"] for c in by_freq]

    page.fill("#search", "spokes")
    assert _row_ids(page) == ["early:0"]
    page.fill("#search", "late:3")
    assert _row_ids(page) == ["late:3"]
    page.fill("#search", "kite")  # a class name: matches top classes and top-image labels
    expected = {
        c["id"]
        for c in spec["concepts"]
        if "kite" in c["top_classes"] or any(t["label"] == "kite" for t in c["top_images"])
    }
    assert expected and len(expected) < 10
    assert set(_row_ids(page)) == expected
    assert page.text_content("#count") == f"{len(expected)} of 10 concepts"
    page.fill("#search", "")
    assert len(_row_ids(page)) == 10

    page.select_option("#sort", "c2")  # descending; concepts without C2 last
    with_c2 = sorted((c for c in spec["concepts"] if c["c2"] is not None), key=lambda c: -c["c2"])
    without = [c["id"] for c in spec["concepts"] if c["c2"] is None]
    ids = _row_ids(page)
    assert ids[: len(with_c2)] == [c["id"] for c in with_c2]
    assert sorted(ids[len(with_c2) :]) == sorted(without)
    page.click("#order")
    assert _row_ids(page)[: len(with_c2)] == [c["id"] for c in reversed(with_c2)]


def test_links_open_concepts_and_explained_images(
    site: tuple[dict, Path], watched: Watched
) -> None:
    spec, index = site
    page = watched.page
    page.goto(index.as_uri())
    page.click('tr.concept-row[data-id="early:0"] a.concept-link')
    page.wait_for_selector("#concept-title")
    assert page.url.endswith("#/concept/early%3A0")
    assert page.text_content("#concept-title") == EVIL_NAME
    facts = page.eval_on_selector_all(".facts dt, .facts dd", "els => els.map(e => e.textContent)")
    i = facts.index("name score (soft-WPMI)")
    assert facts[i + 1] == "\u22120.1235"  # shown as a number, minus sign, 4 digits
    assert page.locator("#top-images figure").count() == 4

    page.click("text=Explained images")
    page.wait_for_selector("#image-list a.image-link")
    assert page.locator("#image-list a.image-link").count() == len(spec["explanations"])
    page.click('#image-list a.image-link[href="#/image/test-002"]')
    page.wait_for_selector("#image-title")
    assert "test-002" in page.text_content("#image-title")
    assert "misclassified" in page.text_content("#image-title")
    expl = spec["explanations"][2]
    links = page.locator("#contributions a.concept-link")
    assert links.count() == len(expl["contributions"])
    hrefs = links.evaluate_all("els => els.map(a => a.getAttribute('href'))")
    ranked = sorted(expl["contributions"], key=lambda k: -abs(k["value"]))
    assert hrefs == [f"#/concept/{quote(k['concept'], safe='')}" for k in ranked]
    completeness = page.text_content("#completeness")
    assert "completeness error 2.4e-7" in completeness
    # every picture of the page, the explanation figure included, loads from the site folder
    page.locator("img.card").scroll_into_view_if_needed()
    page.wait_for_function(
        "[...document.images].length > 0 && [...document.images].every(i => i.complete)"
    )
    sizes = page.eval_on_selector_all("img", "els => els.map(i => [i.naturalWidth, i.src])")
    assert all(w > 0 and src.startswith(index.parent.as_uri() + "/assets/") for w, src in sizes)
    figure_width = page.eval_on_selector("img.card", "i => i.naturalWidth")
    assert figure_width == Image.open(index.parent / page.get_attribute("img.card", "src")).width

    strongest = max(expl["contributions"], key=lambda k: abs(k["value"]))  # listed first
    concept = next(c for c in spec["concepts"] if c["id"] == strongest["concept"])
    links.first.click()
    page.wait_for_selector("#concept-title")
    assert page.text_content("#concept-title") == _title(concept)
    # and back: the concept page lists the explained images it contributes to
    assert page.locator('#used-in a[href="#/image/test-002"]').count() == 1


def test_html_in_data_is_shown_as_text(
    site: tuple[dict, Path], watched: Watched, tmp_path: Path
) -> None:
    _, index = site
    page = watched.page
    page.goto(index.as_uri())
    page.wait_for_selector("tr.concept-row")
    chips = page.eval_on_selector_all(".chip", "els => els.map(e => e.textContent)")
    assert EVIL_CLASS in chips
    injected = "document.querySelectorAll('img[src=\"x\"], [onerror], b').length"
    assert page.evaluate(injected) == 0
    page.goto(index.as_uri() + "#/concept/early%3A0")
    page.wait_for_selector("#top-images")
    assert page.text_content("#concept-title") == EVIL_NAME
    facts = page.eval_on_selector_all(".facts dt, .facts dd", "els => els.map(e => e.textContent)")
    i = facts.index("name score (soft-WPMI)")
    assert facts[i + 1] == "\u22120.1235"  # shown as a number, minus sign, 4 digits
    labels = page.eval_on_selector_all("#top-images .label", "els => els.map(e => e.textContent)")
    assert EVIL_CLASS in labels
    assert page.evaluate(injected) == 0

    page.goto(index.as_uri())
    page.wait_for_selector("tr.concept-row img")
    shot = tmp_path / "atlas.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size[0] == 1280 and img.size[1] >= 900
