"""The playground page (server/playground/) in a real Chromium, against a live server and a real
worker on the tiny model: a prompt, its progress and previews, the decoded picture, the
conversation's edits, a painted mask, the errors a person sees, and cancel.

The browser is Debian's `chromium` (`.ci/run` installs it) driven by Playwright, headless, with
background networking off; without it these tests skip and say why. Some error paths (429, 504,
a connection dropped mid-stream) are the page's own handling of answers the server tests already
pin, so they are served by Playwright's request interception rather than provoked in the server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests._server import API_KEY, MODEL, shared_server
from tests._workers import wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM = Path(os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
STATIC = Path(__file__).resolve().parents[1] / "server" / "playground"
PAGE_FILES = sorted(p.name for p in STATIC.iterdir() if p.suffix in (".html", ".js", ".css"))
CHAT = "/v1/chat/completions"
TIMEOUT_MS = 30_000

# Records, from inside the page, every progress value and preview the page showed: a generation on
# the tiny model is quick, so the test reads what happened rather than racing to see it.
WATCH_PAGE = """
window.__seen = {progress: 0, previews: 0};
new MutationObserver((records) => {
  for (const r of records) {
    const t = r.target;
    if (t.tagName === "PROGRESS" && t.value > 0) window.__seen.progress += 1;
    if (t.tagName === "IMG" && t.classList.contains("preview") && t.src.startsWith("data:image/jpeg")) window.__seen.previews += 1;
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["value", "src"]});
// The multipart bodies the page sent (Chromium does not hand a request's file parts to Playwright).
window.__forms = [];
const pageFetch = window.fetch;
window.fetch = async (url, options) => {
  if (options && options.body instanceof FormData) {
    const fields = {};
    for (const [name, value] of options.body.entries()) {
      fields[name] = typeof value === "string" ? value : btoa(String.fromCharCode(...new Uint8Array(await value.arrayBuffer())));
    }
    window.__forms.push({url: String(url), fields});
  }
  return pageFetch(url, options);
};
"""


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium; .ci/run does) or set KILN_CHROMIUM")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live):
    """The playground, opened fresh (empty local storage); fails the test on any script error or
    CSP violation the page logged."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    # A refused request (401, 429, ...) is logged by Chromium as "Failed to load resource": expected here.
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.add_init_script(WATCH_PAGE)
    page.goto(live.url + "/")
    yield page
    context.close()
    assert problems == []


def enter_key(page, key: str = API_KEY) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")


def generate(page, prompt: str, **controls: str) -> None:
    """Type the prompt, set the named controls (by label), click Generate."""
    for label, value in controls.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate").click()


def wait_for_picture(page, prompt: str, count: int = 1):
    """The answer's pictures, once decoded: <img> elements whose alt text is the prompt."""
    images = page.get_by_alt_text(prompt, exact=True)
    images.nth(count - 1).wait_for()
    decoded = "([alt, n]) => { const imgs = [...document.querySelectorAll('img.result')].filter(i => i.alt === alt);" \
        " return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    wait_in_page(page, decoded, [prompt, count])
    return images


def wait_in_page(page, function: str, arg=None, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Until `function(arg)` is true in the page. (Playwright's wait_for_function evaluates a
    string, which the page's CSP forbids; evaluate() goes through the debugger protocol.)"""
    if not wait_for(lambda: page.evaluate(function, arg), timeout):
        raise AssertionError(f"not true within {timeout:g} s: {function}")


def seen(page) -> dict:
    return page.evaluate("window.__seen")


def sent_forms(page) -> list[tuple[str, dict[str, str]]]:
    """The multipart/form-data requests the page sent: (url, fields; files as base64)."""
    return [(form["url"], form["fields"]) for form in page.evaluate("window.__forms")]


def png_file(tmp_path: Path, colour=(200, 30, 30), size=(64, 64)) -> Path:
    path = tmp_path / "picture.png"
    Image.new("RGB", size, colour).save(path)
    return path


# ---- the page, without a browser ---------------------------------------------------------------


def test_page_and_its_files_are_open_and_served_with_a_strict_csp(live):
    for path in ("/", "/playground"):
        r = httpx.get(live.url + path, timeout=10)  # no API key
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data:" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    kinds = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in STATIC.iterdir():
        r = httpx.get(f"{live.url}/playground/{path.name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == kinds[path.suffix], path.name
        assert r.content == path.read_bytes() and r.headers["content-security-policy"] == csp
    for missing in ("nothing.js", "%2e%2e", "..%2fplayground.py", ".hidden.js"):
        assert httpx.get(f"{live.url}/playground/{missing}", timeout=10).status_code == 404, missing
    assert httpx.get(live.url + "/v1/models", timeout=10).status_code == 401  # the page is open, the API is not


def test_page_has_no_inline_code_and_fetches_nothing_from_elsewhere():
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html, re.IGNORECASE), "inline style"
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html)), "inline script"
    for name in PAGE_FILES:
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://", text), f"{name} names another origin"
        assert "innerHTML" not in text and "eval(" not in text


# ---- in the browser ----------------------------------------------------------------------------


def test_prompt_shows_progress_previews_then_a_decoded_picture_with_the_prompt_as_alt_text(page, live):
    prompt = "a red circle on a blue background"
    enter_key(page)
    generate(page, prompt, Steps="24")
    wait_for_picture(page, prompt)
    assert seen(page)["progress"] > 0  # the progress bars moved with the stream's progress chunks
    assert seen(page)["previews"] > 0  # and the model's previews were shown while it drew
    caption = page.locator(".result-figure figcaption").inner_text()
    assert re.search(r"seed \d+ · 64×64 · \d+\.\d s", caption), caption
    download = page.get_by_role("link", name="Download")
    assert download.get_attribute("href").startswith(live.url + "/v1/images/files/")
    # The key stays in this browser's storage, never in the URL.
    assert page.evaluate("localStorage.getItem('kiln.playground.apiKey')") == API_KEY
    assert API_KEY not in page.url


def test_copy_as_curl_and_python_show_the_exact_request_without_the_key(page):
    prompt = "a blue square"
    enter_key(page)
    generate(page, prompt, Seed="7")
    wait_for_picture(page, prompt)
    page.get_by_role("button", name="Copy as curl").click()
    snippet = page.locator("pre.snippet")
    curl = snippet.inner_text()
    assert CHAT in curl and "$KILN_API_KEY" in curl and API_KEY not in curl
    body = json.loads(re.search(r"-d '(.*)'$", curl, re.DOTALL).group(1))
    assert body["messages"] == [{"role": "user", "content": prompt}] and body["seed"] == 7 and body["stream"] is True
    page.get_by_role("button", name="Copy as Python (openai)").click()
    python = snippet.inner_text()
    assert "client.chat.completions.create(" in python and '"seed": 7' not in python and "seed=7" in python
    assert 'os.environ["KILN_API_KEY"]' in python and API_KEY not in python
    compile(python, "snippet.py", "exec")


def test_bad_key_shows_the_401_in_words_and_the_key_can_be_forgotten(page):
    enter_key(page, "not-the-key")
    error = page.locator("#api-key-error")
    error.wait_for()
    assert "did not accept this API key" in error.inner_text()
    assert page.get_by_label("API key").get_attribute("aria-invalid") == "true"
    page.get_by_role("button", name="Forget key").click()
    assert page.get_by_label("API key").input_value() == ""
    assert page.evaluate("localStorage.getItem('kiln.playground.apiKey')") is None


def test_cancel_closes_the_stream_and_the_server_cancels_the_work(page, live):
    before = live.metric("kiln_cancellations_total", route=CHAT)
    enter_key(page)
    page.get_by_label("Size", exact=True).select_option("custom")
    # About 1.5 s of denoising on the tiny model: long enough to cancel in the middle.
    generate(page, "a long one", **{"Custom size (W×H)": "128x128", "Steps": "150", "Images (n)": "2"})
    wait_in_page(page, "() => window.__seen.progress > 0")  # denoising has started
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("Cancelled.", exact=True).first.wait_for()
    assert wait_for(lambda: live.metric("kiln_cancellations_total", route=CHAT) == before + 1, 15)
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.locator("img.result").count() == 0


def test_next_prompt_sends_the_history_and_edits_the_last_picture(page):
    enter_key(page)
    generate(page, "a red circle")
    first = wait_for_picture(page, "a red circle").first.get_attribute("src")
    with page.expect_request(lambda r: r.url.endswith(CHAT)) as sent:
        page.get_by_label("Prompt", exact=True).fill("now on a green background")
        page.get_by_label("Prompt", exact=True).press("Enter")  # the keyboard path
    wait_for_picture(page, "now on a green background")
    messages = sent.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"][0] == {"type": "image_url", "image_url": {"url": first}}
    page.get_by_role("button", name="New conversation").click()
    assert page.locator("li.turn").count() == 0


def test_a_dropped_picture_starts_an_edit(page, tmp_path):
    enter_key(page)
    data = base64.b64encode(png_file(tmp_path).read_bytes()).decode()
    page.evaluate(
        """(b64) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], "red.png", {type: "image/png"}));
          document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    page.get_by_text("red.png (64×64)").wait_for()
    with page.expect_request(lambda r: r.url.endswith(CHAT)) as sent:
        generate(page, "a green circle")
    wait_for_picture(page, "a green circle")
    [user] = sent.value.post_data_json["messages"]
    assert user["content"][0] == {"type": "text", "text": "a green circle"}
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert not page.locator("#attachment").is_visible()  # sent: the next prompt edits the answer instead


def test_a_chosen_or_pasted_picture_is_attached(page, tmp_path):
    page.locator("#attach-file").set_input_files(png_file(tmp_path))
    page.get_by_text("picture.png (64×64)").wait_for()
    page.get_by_role("button", name="Remove picture").click()
    page.get_by_label("Prompt", exact=True).focus()
    page.evaluate(
        """() => {
          const canvas = document.createElement("canvas");
          canvas.width = 32; canvas.height = 48;
          const bytes = Uint8Array.from(atob(canvas.toDataURL().split(",")[1]), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
          document.activeElement.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
        }"""
    )
    page.get_by_text("pasted.png (32×48)").wait_for()


def test_a_painted_mask_is_sent_to_images_edits_transparent_where_painted(page):
    enter_key(page)
    generate(page, "a red circle")
    wait_for_picture(page, "a red circle")
    page.get_by_role("button", name="Paint a mask on picture 1").click()
    canvas = page.get_by_label("Mask: paint over the region to repaint")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.locator("#attachment-caption", has_text="the painted part is redrawn").wait_for()
    generate(page, "a green circle")
    wait_for_picture(page, "a green circle")
    [(url, fields)] = sent_forms(page)
    assert url.endswith("/v1/images/edits")
    assert fields["prompt"] == "a green circle" and fields["model"] == page.get_by_label("Model").input_value()
    picture = Image.open(io.BytesIO(base64.b64decode(fields["image"])))
    mask = Image.open(io.BytesIO(base64.b64decode(fields["mask"])))
    assert mask.size == picture.size == (64, 64) and mask.mode == "RGBA"
    alpha = mask.getchannel("A")
    assert alpha.getpixel((32, 32)) == 0  # painted: transparent, repainted (OpenAI's rule)
    assert alpha.getpixel((32, 4)) == 255 and alpha.getpixel((2, 32)) == 255  # unpainted: kept


def test_the_models_loras_are_offered_and_add_their_tag_to_the_prompt(page):
    """/v1/models lists a model's LoRAs; the page offers them under the model. (The shared server's
    model has none, so its listing is given two; asking for one then is the server's real 400.)"""

    def with_loras(route):
        listing = route.fetch().json()
        for model in listing["data"]:
            model["loras"] = ["ink", "style"] if model["id"] == "gpt-4o" else []
        route.fulfill(json=listing)

    page.route("**/v1/models", with_loras)
    enter_key(page)
    page.get_by_label("Model").select_option("gpt-4o")
    offered = page.locator("#loras")
    offered.wait_for()
    assert offered.inner_text() == "LoRAs: ink, style"
    page.get_by_label("Prompt", exact=True).fill("a cat")
    page.get_by_role("button", name="Add the LoRA style to the prompt").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == "a cat <lora:style:0.8>"
    page.get_by_role("button", name="Generate").click()
    error = page.locator("#prompt-error")
    error.wait_for()
    assert "no LoRA named 'style'" in error.inner_text()
    page.get_by_label("Model").select_option(MODEL)
    assert offered.is_hidden()


def test_a_400_appears_next_to_the_control_it_names(page):
    enter_key(page)
    generate(page, "too many", **{"Images (n)": "3"})  # the test server allows n <= 2
    error = page.locator("#n-error")
    error.wait_for()
    assert "n" in error.inner_text() and "(400)" in error.inner_text()
    assert page.get_by_label("Images (n)").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Images (n)").evaluate("el => el === document.activeElement")


@pytest.mark.parametrize(
    "status, code, expected",
    [
        (429, "queue_full", "its queue is full (429). Try again in 7 s."),
        (503, "service_unavailable", "No engine worker is ready right now (503)"),
        (504, "timeout", "took longer than the server's time limit (504)"),
    ],
)
def test_busy_unavailable_and_timeout_answers_are_explained(page, status, code, expected):
    body = {"error": {"message": "refused", "type": "server_error", "param": None, "code": code}}
    page.route("**" + CHAT, lambda route: route.fulfill(status=status, headers={"retry-after": "7"}, json=body))
    enter_key(page)
    generate(page, "anything")
    error = page.locator("#generate-error")
    error.wait_for()
    assert expected in error.inner_text()
    assert page.get_by_role("button", name="Generate").is_enabled()


def test_a_dropped_connection_never_hangs_the_page(page):
    enter_key(page)
    page.route("**" + CHAT, lambda route: route.abort("connectionreset"))
    generate(page, "first try")
    page.get_by_text("Lost the connection to the server").first.wait_for()
    # A stream cut after its first events (no [DONE]) ends the turn the same way.
    cut = 'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    page.unroute("**" + CHAT)
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=cut))
    generate(page, "second try")
    page.get_by_text("closed before the answer was complete").first.wait_for()
    assert page.get_by_role("button", name="Generate").is_enabled()


def test_pictures_show_when_the_page_is_opened_at_another_name_of_the_server(page, live):
    """The server names its pictures by its configured address (127.0.0.1 here); a person may open
    http://localhost:PORT/ instead, where the CSP allows this origin's pictures only."""
    page.goto(live.url.replace("127.0.0.1", "localhost") + "/")
    enter_key(page)
    generate(page, "a purple circle")
    picture = wait_for_picture(page, "a purple circle").first.get_attribute("src")
    assert picture.startswith(live.url.replace("127.0.0.1", "localhost") + "/v1/images/files/")
    generate(page, "a purple circle on a white background")  # its URL, sent back in the history, is still this server's
    wait_for_picture(page, "a purple circle on a white background")


def test_works_at_phone_width(browser, live):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.add_init_script(WATCH_PAGE)
    page.goto(live.url + "/playground")
    enter_key(page)
    generate(page, "a small yellow star")
    wait_for_picture(page, "a small yellow star")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing wider than the phone
    assert page.get_by_role("button", name="Generate").is_visible()
    context.close()
