"""The built leaderboard in headless Chromium over file://: tables, charts, escaping and sorting."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_leaderboard import EVIL_NAME, TASKS, lm_eval_out, results_tree, site  # noqa: F401  (session fixtures)

# realdata: it builds on test_leaderboard's lm_eval run, which reads the bundled corpora
pytestmark = [pytest.mark.slow, pytest.mark.realdata]

CHROMIUM = Path("/usr/bin/chromium")
# Offline and quiet: no sandbox (root in a container), no GPU, no background traffic or updates.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.dialogs = []  # every alert/confirm that fires (there must be none)
    pg.errors = []

    def on_dialog(dialog):
        pg.dialogs.append(dialog.message)
        dialog.dismiss()

    pg.on("dialog", on_dialog)
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    context.close()


def _column(page, header: str) -> list[float]:
    index = page.eval_on_selector_all("#ranking thead th", "(ths, h) => ths.findIndex(th => th.textContent.trim() === h)", header)
    assert index >= 0, header
    return [float(v) for v in page.eval_on_selector_all(
        "#ranking tbody tr", "(rows, i) => rows.map(r => r.cells[i].getAttribute('data-sort'))", index)]


def test_index_in_the_browser(page, site, tmp_path):
    page.goto((site / "index.html").as_uri())
    rows = page.locator("#ranking tbody tr")
    assert rows.count() == len(TASKS)
    assert page.locator("#ranking").is_visible()
    # escaping: the name shows as text, and nothing ran
    name = page.locator("#ranking tbody tr td.name a").first
    assert name.inner_text() == EVIL_NAME and name.is_visible()
    assert page.get_by_text("<script>", exact=False).first.is_visible()

    # sorting: click the P@1 header, the rows come back in ascending P@1; click again, descending
    before = _column(page, "P@1")
    page.locator("#ranking thead th", has_text="P@1").first.click()
    ascending = _column(page, "P@1")
    assert ascending == sorted(before) and ascending != before
    assert page.locator("#ranking thead th[aria-sort='ascending']").inner_text().startswith("P@1")
    page.locator("#ranking thead th", has_text="P@1").first.click()
    assert _column(page, "P@1") == sorted(before, reverse=True)

    shot = tmp_path / "leaderboard-index.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 0
    assert page.dialogs == [] and page.errors == []


def test_model_page_in_the_browser(page, site, tmp_path):
    page.goto((site / "index.html").as_uri())
    page.locator("#ranking tbody tr td.name a").first.click()  # the link works from file://
    assert page.url.endswith(".html") and "/model-" in page.url
    assert page.locator("h1").inner_text() == EVIL_NAME
    charts = page.locator("svg.chart")
    assert charts.count() == 6
    for k in range(charts.count()):
        chart = charts.nth(k)
        chart.scroll_into_view_if_needed()
        assert chart.is_visible()
        box = chart.bounding_box()
        assert box["width"] > 300 and box["height"] > 150
        assert chart.locator("polyline").count() == 3
    assert page.locator("svg.heatmap").first.is_visible()
    # a family's per-layer table opens, and its header sorts it
    family = page.locator("details.family").first
    family.locator("summary").click()
    table = family.locator("table.comparison")
    assert table.is_visible()
    table.locator("thead th", has_text="p (Holm)").click()
    assert table.locator("thead th[aria-sort='ascending']").count() == 1

    shot = tmp_path / "leaderboard-model.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert page.dialogs == [] and page.errors == []


def test_pages_read_without_script(browser, site):
    context = browser.new_context(java_script_enabled=False)
    pg = context.new_page()
    pg.goto((site / "index.html").as_uri())
    assert pg.locator("#ranking tbody tr").count() == len(TASKS)
    pg.goto((site / "transfer.html").as_uri())
    assert pg.locator("#no-transfer").is_visible()
    context.close()
