"""Make docs/playground.png: the playground in Chromium on the bundled model, after a two-turn
conversation (a picture, then an edit of it).

    .venv/bin/python -m tests.playground_screenshot [--out docs/playground.png]

Needs torch for the first export of the bundled model's package (cached afterwards under
build/test-cache, as the tests' is), Playwright and Debian's chromium. Not a test: it writes
into docs/.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tests._server import API_KEY, LiveServer, free_port, start_serve, wait_ready
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS, enter_key, generate, wait_for_picture

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KILN_TEST_CACHE", ROOT / "build" / "test-cache"))  # as tests/conftest.py
TURNS = [("a red circle on a blue background", {"Images (n)": "2", "Seed": "1"}), ("a red circle on a green background", {"Images (n)": "2"})]


def serve_bundled(base: Path) -> LiveServer:
    from export.package import build_package
    from kiln.default_model import DEFAULT_MODEL

    package = build_package(DEFAULT_MODEL, CACHE / "packages", target="cpu").resolve()
    port = free_port()
    config = (
        f"""
[server]
host = "127.0.0.1"
port = {port}

[[models]]
name = "kiln-shapes"
package = "{package}"
aliases = ["gpt-4o", "dall-e-3", "dall-e-2"]
default_size = "256x256"
max_side = 256

[workers]
local = 1
threads = 2
max_batch = 2
warmup_sizes = ["256x256"]

[images]
dir = "{base / "images"}"
"""
    )
    proc, log = start_serve(base, config, {**os.environ, "KILN_API_KEYS": API_KEY})
    server = LiveServer(url=f"http://127.0.0.1:{port}", key=API_KEY, images=base / "images", worker="", log=log, proc=proc)
    wait_ready(server.url, 180, proc, log)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="kiln-playground-shot-") as tmp:
        server = serve_bundled(Path(tmp))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1000, "height": 900}, device_scale_factor=1, color_scheme="light")
                page.set_default_timeout(60_000)
                page.goto(server.url + "/")
                enter_key(page)
                for prompt, controls in TURNS:
                    generate(page, prompt, **controls)
                    wait_for_picture(page, prompt, int(controls.get("Images (n)", "1")))
                page.get_by_label("Prompt", exact=True).fill("a red square on a green background")
                page.evaluate("window.scrollTo(0, 0)")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
