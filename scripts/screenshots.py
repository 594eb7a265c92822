"""Screenshots of a built leaderboard's landing page, for README: the top of the page and the across-models view.

    python scripts/screenshots.py docs/leaderboard-example

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (the project's `test` extra); the page is
opened over file://, offline, with the flags the browser tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    site = Path(argv[0]).resolve()
    index = site / "index.html"
    if not index.is_file():
        print(f"screenshots: {index} does not exist (build the site with jtc leaderboard first)", file=sys.stderr)
        return 2
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(index.as_uri())
        page.screenshot(path=str(site / "screenshot.png"))
        page.locator("#across-models").screenshot(path=str(site / "screenshot-across-models.png"))
        browser.close()
    if errors:
        print("screenshots: the page raised errors: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(f"{site / 'screenshot.png'}\n{site / 'screenshot-across-models.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
