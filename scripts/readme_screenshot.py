"""The README's picture of the chat page: `gemma4 serve` with its default model (Google's Gemma 3
270M), one real answer, in Debian's Chromium.  python scripts/readme_screenshot.py [OUT.png]"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from playwright.sync_api import sync_playwright  # noqa: E402
from serving import Process, free_port  # noqa: E402

from gemma4.weights.default_model import default_model_path  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "docs" / "chat-page.png")
    port = free_port()
    server = Process([sys.executable, "-m", "gemma4.interfaces.cli", "serve", str(default_model_path()), "--port", str(port)], port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 620})
            page.goto(server.url)
            page.wait_for_selector("#status.ok")
            page.click("#toggle-settings")
            page.fill("#temperature", "0")
            page.dispatch_event("#temperature", "change")
            page.fill("#max-tokens", "80")
            page.dispatch_event("#max-tokens", "change")
            page.click("#toggle-settings")
            page.fill("#input", "Once upon a time, in a small village by the sea,")
            page.keyboard.press("Enter")
            page.wait_for_selector(".message.assistant .stats", timeout=120_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
