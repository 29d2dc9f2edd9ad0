"""The chat page in a real headless Chromium (Debian's), against a live `gemma4 serve`.

Screenshots of the main states go to $GEMMA4_SCREENSHOTS (default: build/screenshots)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from serving import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("GEMMA4_SCREENSHOTS", Path(__file__).parent.parent / "build" / "screenshots"))
# As the probe of this machine runs it: no sandbox as root, and nothing that phones home.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
INJECTION = [
    "Here is a script: <script>window.pwned = 'script'</script>",
    '<img src="x" onerror="window.pwned = \'img\'"> and <svg onload="window.pwned = \'svg\'"></svg>',
    "[click me](javascript:window.pwned='link') and ```\n<script>window.pwned='code'</script>\n```",
]

if not Path(CHROMIUM).is_file():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(checkpoints):
    running = Server(checkpoints("tiny-e2b"), "--quant", "int4", "--context", "2048", "--metrics")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 760}, accept_downloads=True)
    page = context.new_page()
    page.problems = []  # console errors and uncaught exceptions: none is allowed
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("#status.ok", timeout=60_000)
    yield page
    context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.keyboard.press("Enter")


def settle(page, timeout: float = 120_000) -> None:
    """Wait until no answer is running (the Send button is back)."""
    page.wait_for_selector("#send:not([hidden])", timeout=timeout)


def set_max_tokens(page, n: int) -> None:
    page.click("#toggle-settings")
    page.fill("#max-tokens", str(n))
    page.dispatch_event("#max-tokens", "change")
    page.click("#toggle-settings")


def wait_until(condition, timeout: float = 60) -> None:  # noqa: ANN001
    """Poll from Python: the page's CSP forbids the eval that Playwright's wait_for_function needs."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("the page never got there")
        time.sleep(0.05)


def metric(server, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def test_page_loads_and_shows_the_model(page, server):
    name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    assert page.inner_text("#model-name") == name
    assert "2,048 tokens context" in page.inner_text("#model-facts") and "in use" in page.inner_text("#model-facts")
    assert page.is_hidden("#attach")  # a text-only model: no attach control at all
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('button, input, textarea')]
        .filter(e => !e.getAttribute('aria-label') && !e.closest('label') && !e.textContent.trim()).map(e => e.outerHTML)""")
    assert unlabelled == []
    shot(page, "empty")
    assert page.problems == []


def test_a_message_gets_a_streamed_answer_with_its_numbers(page):
    set_max_tokens(page, 200)
    send(page, "Hello! Tell me about **Markdown**.")
    page.wait_for_selector("#stop:not([hidden])")
    seen = set()
    while page.is_visible("#stop"):  # the answer grows while it streams
        seen.add(len(page.inner_text(".message.assistant .markdown")))
        time.sleep(0.05)
    settle(page)
    assert len(seen) > 2
    stats = page.inner_text(".message.assistant .stats")
    assert re.search(r"[\d.]+ tok/s · first token [\d.]+ s · \d+ of \d+ prompt tokens cached · \d+ tokens", stats)
    assert page.inner_text(".message.user .text") == "Hello! Tell me about **Markdown**."
    assert page.inner_text("#conversations").startswith("Hello! Tell me about")
    shot(page, "answer")
    assert page.problems == []


def test_stop_ends_the_answer_and_frees_the_slot(page, server):
    set_max_tokens(page, 1800)
    cancelled = metric(server, 'gemma4_requests_total{finish_reason="cancelled"}')
    send(page, "Write a very long story.")
    wait_until(lambda: len(page.inner_text(".message.assistant .markdown")) > 20)
    page.keyboard.press("Escape")
    settle(page, 10_000)
    assert page.inner_text(".message.assistant .note") == "stopped"
    wait_until(lambda: metric(server, "gemma4_requests_running") == 0, timeout=10)
    assert metric(server, 'gemma4_requests_total{finish_reason="cancelled"}') == cancelled + 1
    assert page.problems == []


def test_reload_keeps_everything_and_conversations_can_be_managed(page):
    set_max_tokens(page, 8)
    send(page, "First conversation")
    settle(page)
    first_answer = page.inner_text(".message.assistant .markdown")
    page.click("#new-chat")
    set_max_tokens(page, 8)
    send(page, "Second conversation")
    settle(page)
    page.reload()
    page.wait_for_selector("#status.ok")
    assert page.inner_text(".message.user .text") == "Second conversation"
    titles = page.locator(".conversation").all_inner_texts()
    assert titles == ["Second conversation", "First conversation"]
    page.click("text=First conversation")
    assert page.inner_text(".message.assistant .markdown") == first_answer
    # Rename, export, delete.
    page.once("dialog", lambda dialog: dialog.accept("Renamed chat"))
    page.click("#toggle-settings")
    page.click("#rename")
    assert "Renamed chat" in page.locator(".conversation").all_inner_texts()
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["title"] == "Renamed chat" and [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete")
    assert page.locator(".conversation").all_inner_texts() == ["Second conversation"]
    assert page.problems == []


def test_edit_resend_and_regenerate(page):
    set_max_tokens(page, 6)
    page.click("#toggle-settings")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.click("#toggle-settings")
    send(page, "Original question")
    settle(page)
    answer = page.inner_text(".message.assistant .markdown")
    page.click("text=Regenerate")
    settle(page)
    assert page.locator(".message.assistant").count() == 1
    assert page.inner_text(".message.assistant .markdown") == answer  # greedy: the same answer again
    page.click(".message.user >> text=Edit")
    page.fill("textarea.edit", "Edited question")
    page.click("text=Save & send")
    settle(page)
    assert page.locator(".message.user .text").all_inner_texts() == ["Edited question"]
    assert page.locator(".message.assistant").count() == 1
    assert page.problems == []


def test_untrusted_answers_render_inert(page, tmp_path):
    conversation = {"title": "Injection", "messages": [m for text in INJECTION for m in ({"role": "user", "content": "hi"}, {"role": "assistant", "content": text})]}
    path = tmp_path / "injection.json"
    path.write_text(json.dumps(conversation))
    page.set_input_files("#import-file", str(path))
    page.wait_for_selector("text=Injection")
    assert page.locator(".message.assistant").count() == 3
    page.click("text=click me")
    time.sleep(0.5)
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("document.querySelectorAll('.markdown script, .markdown img, .markdown svg, [onerror], [onload]').length") == 0
    assert page.get_attribute("text=click me", "href") in (None, "")
    assert "<script>window.pwned = 'script'</script>" in page.inner_text(".message.assistant >> nth=0")  # shown, as text
    shot(page, "injection")

    # The same text streamed: the page renders it as it arrives, and it stays inert.
    def sse(route) -> None:  # noqa: ANN001
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        chunks += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for text in INJECTION for piece in (text[: len(text) // 2], text[len(text) // 2 :])]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", sse)
    page.click("#new-chat")
    send(page, "stream it")
    settle(page)
    page.click("text=click me")
    time.sleep(0.5)
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("document.querySelectorAll('.markdown script, .markdown img, [onerror], [onload]').length") == 0
    assert page.problems == []


def test_thinking_and_tool_calls_are_shown_apart(page):
    """Streamed as the server streams them (reasoning_content, then content, then a tool call)."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "The user wants the weather; ", "reasoning": "x"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "I will call the tool.", "reasoning": "x"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Let me check."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.fill("#input", "Weather in Paris?")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("Thanks")
    assert page.input_value("#input") == "Weather in Paris?\nThanks" and page.locator(".message").count() == 0
    page.keyboard.press("Enter")
    settle(page)
    assert page.inner_text(".message.assistant .reasoning summary") == "Thinking"
    assert not page.is_visible(".message.assistant .reasoning .text")  # collapsed until opened
    page.click(".message.assistant .reasoning summary")
    assert page.inner_text(".message.assistant .reasoning .text") == "The user wants the weather; I will call the tool."
    assert page.inner_text(".message.assistant .markdown") == "Let me check."
    assert page.inner_text(".message.assistant .tool-call") == 'get_weather({"city": "Paris"})'
    assert page.problems == []


def test_a_request_the_server_refuses_is_said(page):
    send(page, "word " * 2100)  # over the 2048-token context
    page.wait_for_selector(".message.assistant .error")
    assert "context is 2048 tokens" in page.inner_text(".message.assistant .error")
    assert "context is 2048 tokens" in page.inner_text("#banner")


def test_phone_width_dark_mode(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 800}, color_scheme="dark", is_mobile=True)
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_selector("#status.ok")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(22, 24, 28)"
    sidebar_left = lambda: page.evaluate("document.getElementById('sidebar').getBoundingClientRect().right")  # noqa: E731
    assert sidebar_left() <= 0  # out of the way until asked for
    page.click("#toggle-sidebar")
    page.wait_for_timeout(400)
    assert sidebar_left() > 0
    shot(page, "phone-dark")
    context.close()


def test_api_key_is_asked_once_and_a_wrong_one_is_said(browser, checkpoints):
    secured = Server(checkpoints("tiny-e2b"), "--api-key", "s3cret", "--context", "256")
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(secured.url)
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.click("#key-save")
        page.wait_for_selector("#key-dialog[open]")
        assert "refused" in page.inner_text("#key-reason")
        assert "missing or wrong API key" in page.inner_text("#banner")
        shot(page, "wrong-key")
        page.fill("#key-input", "s3cret")
        page.click("#key-save")
        page.wait_for_selector("#status.ok")
        page.reload()  # kept in the browser: not asked again
        page.wait_for_selector("#status.ok")
        assert not page.is_visible("#key-dialog")
    finally:
        context.close()
        secured.stop()


def test_an_unreachable_server_is_said(browser, checkpoints):
    gone = Server(checkpoints("tiny-e2b"), "--context", "256")
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(gone.url)
        page.wait_for_selector("#status.ok")
        gone.stop()
        send(page, "anyone there?")
        page.wait_for_selector(".message.assistant .error")
        assert "unreachable" in page.inner_text(".message.assistant .error")
        assert "unreachable" in page.inner_text("#banner")
    finally:
        context.close()


def test_attached_image_and_audio_reach_the_server(browser, checkpoints, tmp_path):
    """On a model with encoders the attach control appears; a picked image and a dropped audio clip
    show their token cost, travel with the message, and the server counts their tokens."""
    import numpy as np
    import soundfile
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    t = np.arange(16_000) / 16_000
    soundfile.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 16_000)
    multimodal = Server(checkpoints("tiny-e2b-mm"), "--quant", "int4", "--context", "2048", "--metrics")
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(multimodal.url)
        page.wait_for_selector("#status.ok")
        assert page.is_visible("#attach")
        set_max_tokens(page, 4)
        page.set_input_files("#attach-file", str(tmp_path / "noise.png"))
        page.wait_for_selector(".chip")
        assert re.search(r"noise\.png · image \d+x\d+: (\d+) tokens", page.inner_text("#attachments"))
        image_tokens = int(re.search(r": (\d+) tokens", page.inner_text("#attachments")).group(1))
        # Drag and drop, as a person would from a file manager.
        data = (tmp_path / "tone.wav").read_bytes()
        transfer = page.evaluate_handle("""bytes => { const t = new DataTransfer();
            t.items.add(new File([new Uint8Array(bytes)], 'tone.wav', { type: 'audio/wav' })); return t; }""", list(data))
        page.dispatch_event("body", "drop", {"dataTransfer": transfer})
        wait_until(lambda: "tone.wav · audio 1.0 s: 25 tokens" in page.inner_text("#attachments"))
        send(page, "What do you see and hear?")
        settle(page)
        assert page.get_attribute(".message.user img.thumbnail", "alt") == "noise.png"
        assert "audio: tone.wav · audio 1.0 s: 25 tokens" in page.inner_text(".message.user")
        prompt_tokens = int(re.search(r"of (\d+) prompt tokens", page.inner_text(".message.assistant .stats")).group(1))
        assert prompt_tokens > image_tokens + 25  # the image's and the clip's soft tokens reached the prompt
        assert metric(multimodal, "gemma4_prompt_tokens_total") == prompt_tokens
        shot(page, "attachments")
        assert problems == []
    finally:
        context.close()
        multimodal.stop()
