"""The photo lab in a real browser: Debian's chromium, headless, driven by Playwright for Python
(pointed at the system browser: nothing is downloaded). The page's answers must be the ones a
direct /predictions call gives; it must be usable at 360 px and from the keyboard.

Screenshots go to $BDSERVE_LAB_SCREENSHOTS when set (docs/ holds the committed three), else to a
temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bdserve.testing import served
from bdserve.testing.print_scenes import scene
from lab_helpers import DEMO, SERVED_DEFENSE, data_url_pixels, png_pixels, predictions_top

CHROMIUM = Path(os.environ.get("BDSERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE = {"width": 360, "height": 780}
DESKTOP = {"width": 1280, "height": 900}
MIN_CONTRAST = 4.5  # WCAG 2 AA, normal text

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no chromium at {CHROMIUM}: the browser tests need Debian's chromium package "
           "(apt-get install chromium; .ci/run installs it when run as root)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("BDSERVE_LAB_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("lab_screenshots")


def open_lab(browser, demo_lab, viewport):
    from playwright.sync_api import expect

    page = browser.new_page(viewport=viewport)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    resp = page.goto(demo_lab["http"] + "/lab")
    assert resp.status == 200
    expect(page.locator("#server-note")).to_contain_text("Model demo")  # /lab/models has answered
    page.errors = errors
    return page


def upload(page, path: Path, label: str, kind: str, count: int):
    from playwright.sync_api import expect

    page.get_by_label("What the photo shows").select_option(label)
    page.get_by_label("Print").select_option(kind)
    page.get_by_label("Take or choose a photo").set_input_files(str(path))
    expect(page.locator("article.result")).to_have_count(count, timeout=30_000)
    expect(page.get_by_role("status")).to_contain_text(f"{path.name}: done")
    return page.locator("article.result").first  # newest first


def shown_top(article, defense: str) -> list[tuple[str, float]]:
    items = article.locator(f'section.defense[data-defense="{defense}"] ol.top li')
    return [(li.get_attribute("data-class"), float(li.get_attribute("data-probability"))) for li in items.all()]


def test_page_shows_what_predictions_answers(browser, demo_lab, lab_photos, demo_card, shots):
    page = open_lab(browser, demo_lab, DESKTOP)
    target = demo_card.classes[demo_card.target_label]
    for n, kind in enumerate(("triggered", "clean"), start=1):
        path = lab_photos[kind]
        article = upload(page, path, lab_photos["label"], kind, n)
        blob = path.read_bytes()

        # The fitted image: exactly the 32x32 the model got (this PNG is already 32x32), enlarged.
        fitted = article.locator("img.fitted")
        assert (png_pixels(blob) == data_url_pixels(fitted.get_attribute("src"))).all()
        assert fitted.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
        assert fitted.bounding_box()["width"] >= 4 * 32
        assert "32×32" in fitted.get_attribute("alt")
        assert article.locator("figcaption.fit").get_attribute("data-fit") == "cover"

        # Undefended and defended top-3: the same classes and probabilities as /predictions.
        direct = {d: predictions_top(demo_lab["http"], "demo", blob, d) for d in ("none", SERVED_DEFENSE)}
        for defense, want in direct.items():
            got = shown_top(article, defense)
            assert [c for c, _ in got] == [c for c, _ in want], (kind, defense)
            assert all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(got, want)), (kind, defense, got, want)
            first = article.locator(f'section.defense[data-defense="{defense}"] ol.top li').first
            assert f"{100 * want[0][1]:.1f} %" in first.inner_text()
        shrink = shown_top(article, "shrinkpad:4")  # random placement: only its shape is fixed
        assert len(shrink) == 3 and [p for _, p in shrink] == sorted((p for _, p in shrink), reverse=True)

        # Detection is on (the calibrated SCALE-UP detector): the defended card shows the flag
        # that /predictions sends for the same photo; the triggered photo is flagged.
        suspected = httpx.post(f"{demo_lab['http']}/predictions/demo", content=blob,
                               timeout=30).headers["X-Bdserve-Suspected-Trigger"] == "true"
        assert suspected or kind == "clean"
        flag = article.locator(f'section.defense[data-defense="{SERVED_DEFENSE}"] .tag.suspected, '
                               f'section.defense[data-defense="{SERVED_DEFENSE}"] .tag.clear')
        assert flag.inner_text() == ("suspected trigger" if suspected else "not suspected")
        undefended = direct["none"][0][0]
        if kind == "triggered":  # the demo model's backdoor fires, and the page marks the target
            assert undefended == target
            assert article.locator('section.defense[data-defense="none"] .tag.target').count() >= 1
        else:
            assert undefended == lab_photos["label"]
    page.screenshot(path=str(shots / "lab-desktop.png"), full_page=True)
    assert Image.open(shots / "lab-desktop.png").width == DESKTOP["width"]
    assert page.errors == []
    page.close()


def test_readable_on_a_phone(browser, demo_lab, lab_photos, shots):
    page = open_lab(browser, demo_lab, PHONE)
    article = upload(page, lab_photos["triggered"], lab_photos["label"], "triggered", 1)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    photo, fitted = (article.locator(s).bounding_box() for s in ("img.photo", "img.fitted"))
    assert photo["y"] == fitted["y"] and fitted["x"] + fitted["width"] <= PHONE["width"]  # side by side
    assert page.locator("#drop").bounding_box()["height"] >= 44  # a thumb-sized target
    sizes = page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.offsetParent !== null && [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
        .map(e => parseFloat(getComputedStyle(e).fontSize))""")
    assert sizes and min(sizes) >= 12
    page.screenshot(path=str(shots / "lab-phone.png"), full_page=True)
    assert Image.open(shots / "lab-phone.png").width == PHONE["width"]
    assert page.errors == []
    page.close()


def _luminance(rgb) -> float:
    def channel(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(float(v)) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(fg, bg) -> float:
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_accessible(browser, demo_lab, lab_photos):
    page = open_lab(browser, demo_lab, DESKTOP)
    upload(page, lab_photos["triggered"], lab_photos["label"], "triggered", 1)
    # Every control has a label; every image says what it shows.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .filter(e => !e.closest('[hidden]') && e.labels.length === 0).map(e => e.id)""")
    assert unlabelled == []
    alts = page.locator("img").evaluate_all("imgs => imgs.map(i => i.getAttribute('alt') || '')")
    assert len(alts) == 2 and all(len(a) > 10 for a in alts)
    assert page.get_by_role("heading", level=1).inner_text() == "bdserve photo lab"
    # The keyboard reaches the photo input, and its focus is visible.
    for _ in range(8):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "photo":
            break
    assert page.evaluate("document.activeElement.id") == "photo"
    outline = page.locator("#drop").evaluate("d => [getComputedStyle(d).outlineStyle, getComputedStyle(d).outlineWidth]")
    assert outline[0] == "solid" and float(outline[1].rstrip("px")) >= 2
    # Text contrast (WCAG AA) of every visible text, against the first opaque background behind it.
    pairs = page.evaluate("""() => {
        const rgba = s => s.match(/[\\d.]+/g).map(Number);
        const bg = e => { for (; e; e = e.parentElement) { const c = rgba(getComputedStyle(e).backgroundColor);
                          if (c.length < 4 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
        return [...document.querySelectorAll('body *')]
          .filter(e => e.offsetParent !== null && [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
          .map(e => [e.tagName + '.' + e.className, rgba(getComputedStyle(e).color).slice(0, 3), bg(e)]);
    }""")
    assert len(pairs) > 20
    low = [(name, fg, bg, round(contrast(fg, bg), 2)) for name, fg, bg in pairs if contrast(fg, bg) < MIN_CONTRAST]
    assert low == []
    assert page.errors == []
    page.close()


def test_print_outline_drawn_over_the_photo(browser, lab_photos, shots, tmp_path):
    """`serve --lab --fit print`: a photo of the triggered image printed on a table comes back with
    the print's outline at its known corners, and the page draws that outline over the photo."""
    from playwright.sync_api import expect

    rng = np.random.default_rng(7)
    pic = png_pixels(lab_photos["triggered"].read_bytes())
    frame, corners, _ = scene(rng, pic, angle=7, tilt=0.04, background="textured")
    path = tmp_path / "print-photo.jpg"
    Image.fromarray(frame).save(path, "JPEG", quality=92)
    with served(DEMO.parent, [DEMO.name], "--lab", "--fit", "print", "--threads", "1") as addr:
        page = open_lab(browser, addr, DESKTOP)
        article = upload(page, path, lab_photos["label"], "triggered", 1)
        caption = article.locator("figcaption.fit")
        assert caption.get_attribute("data-fit") == "print" and "fit print (area)" in caption.inner_text()
        svg = article.locator(".frame svg")
        expect(svg.locator("polygon")).to_have_count(1)  # drawn once the photo has loaded
        assert svg.get_attribute("viewBox") == "0 0 640 480"  # the photo's frame, in its own pixels
        polygon = svg.locator("polygon")
        drawn = np.array([[float(v) for v in xy.split(",")] for xy in polygon.get_attribute("points").split()])
        assert drawn.shape == (4, 2) and np.abs(drawn - 0.5 - corners).max() < 1.5  # photo pixels (edges: +0.5)
        expect(article.locator("figcaption", has_text="Your photo")).to_contain_text("with the print outline found")
        # On screen, the outline lies on the print: the photo is shown whole (contained) in its frame.
        box = article.locator("img.photo").bounding_box()
        on_screen = np.array(polygon.evaluate("p => [...p.points].map(q => q.matrixTransform(p.getScreenCTM())).map(q => [q.x, q.y])"))
        k = min(box["width"] / 640, box["height"] / 480)
        origin = np.array([box["x"] + (box["width"] - 640 * k) / 2, box["y"] + (box["height"] - 480 * k) / 2])
        assert np.abs(on_screen - (origin + k * (corners + 0.5))).max() < 1.5  # screen pixels
        article.screenshot(path=str(shots / "lab-print.png"))
        assert page.errors == []
        page.close()


def test_no_page_without_lab(browser):
    with served(DEMO.parent, [DEMO.name], "--threads", "1") as prod:
        page = browser.new_page()
        assert page.goto(prod["http"] + "/lab").status == 404
        assert page.goto(prod["http"] + "/lab/static/lab.js").status == 404
        page.close()
