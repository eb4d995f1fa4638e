"""The chat page (issue 28), in a real browser: Debian's Chromium driven by Playwright, against a server on
the demo model. The page's answer is the API's answer for the same request and seed, the canvas previews are
rendered while it streams, the stats are shown, Stop cancels the request on the server, errors are shown,
untrusted text is never HTML, the server's browser guards still apply, and ``--no-web`` serves no page.

Chromium is not optional here: without it these tests fail, naming the fix (``.ci/run`` installs it).

    PYTHONPATH=. python tests/server/test_server_web.py docs/images/chat-page.png   # the docs' screenshot
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import FAST, Hold, health

from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.server import BackgroundServer, create_app
from mlx_dgemma.server import cli as server_cli
from mlx_dgemma.server.protocol import APIError
from tests.conftest import DEMO24, DEMO_PROMPTS, HANG_S

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # reported by the browser fixture, as a failure naming the fix
    sync_playwright = None

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
WAIT_MS = HANG_S * 1000  # Playwright's waits are in milliseconds; each is a hang guard
SETTINGS = {"max-tokens": 40, "seed": 5, "steps": FAST["max_denoising_steps"]}


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium under Playwright (``playwright install`` downloads a browser CI cannot reach)."""
    if sync_playwright is None:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    if not CHROMIUM.exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the chat page's tests need a browser: apt-get install -y chromium "
            "(.ci/run does), or set CHROMIUM to one"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless=new"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def base(server: BackgroundServer) -> str:
    return server.url.removesuffix("/v1")


def open_page(browser: Browser, server: BackgroundServer, **context: Any) -> Page:
    """The chat page in a fresh context (no saved settings); ``page.problems`` collects its console errors,
    ``page.sent`` the bodies it posts to the chat endpoint."""
    page = browser.new_context(viewport={"width": 1280, "height": 800}, **context).new_page()
    page.problems, page.sent = [], []
    page.on(
        "request",
        lambda r: r.url.endswith("/v1/chat/completions") and page.sent.append(r.post_data_json),
    )
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    page.goto(f"{base(server)}/")
    page.wait_for_function(
        "() => !document.getElementById('model').textContent.includes('…')", timeout=WAIT_MS
    )
    return page


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    page = open_page(browser, server)
    yield page
    page.context.close()


def configure(page: Page, **fields: Any) -> None:
    page.click(".advanced summary")  # the seed and step fields are under "Advanced"
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answer(page: Page, n: int) -> dict[str, Any]:
    """The ``n``-th assistant bubble once its answer has ended (done, stopped or failed)."""
    page.wait_for_function(
        "n => { const a = document.querySelectorAll('.msg.assistant')[n]; "
        "return a && a.dataset.state !== 'streaming'; }",
        arg=n,
        timeout=WAIT_MS,
    )
    return page.evaluate(
        """n => {
            const a = document.querySelectorAll('.msg.assistant')[n];
            return {
                state: a.dataset.state, previews: Number(a.dataset.previews),
                content: a.querySelector('.content').textContent,
                preview: a.querySelector('.preview').textContent,
                stats: [...a.querySelectorAll('.stats .chip')].map(c => c.textContent),
                error: a.querySelector('.error')?.textContent ?? null,
            };
        }""",
        n,
    )


def api_answer(server: BackgroundServer, messages: list[dict[str, str]]) -> dict[str, Any]:
    """What the API answers for the page's settings: the same request, not streamed, without previews."""
    body = {
        "messages": messages,
        "max_tokens": SETTINGS["max-tokens"],
        "seed": SETTINGS["seed"],
        "max_denoising_steps": SETTINGS["steps"],
    }
    response = httpx.post(f"{server.url}/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def check_shown(shown: dict[str, Any], expected: dict[str, Any]) -> None:
    """The bubble shows the API's answer, with its stats, and rendered at least one canvas preview."""
    text, stats, usage = (
        expected["choices"][0]["message"]["content"],
        expected["diffusion"],
        expected["usage"],
    )
    # The page renders ``code`` and **bold**: an answer with such marks would not read back as typed.
    assert not {"`", "*"} & set(text), f"pick another seed or prompt: the answer has markdown marks: {text!r}"
    assert shown["state"] == "done" and shown["error"] is None, shown
    assert shown["content"] == text
    assert shown["preview"] == ""  # cleared: every canvas committed
    assert shown["previews"] == stats["decoder_passes"] >= 1  # one preview a denoising step, each rendered
    chips = " | ".join(shown["stats"])
    canvases = f"{stats['canvases']} canvas" + ("" if stats["canvases"] == 1 else "es")
    assert canvases in shown["stats"], chips
    assert f"{stats['decoder_passes']} decoder pass" in chips, chips
    assert f"{usage['completion_tokens']} completion tokens" in shown["stats"], chips
    assert f"{usage['prompt_tokens']} prompt tokens" in chips, chips
    per_forward = next(float(c.split()[0]) for c in shown["stats"] if c.endswith("tokens/forward"))
    assert per_forward == pytest.approx(stats["tokens_per_forward"], abs=0.006)


def test_the_page_answers_as_the_api_does(page, server):
    """Two turns typed into the page: each answer is the API's for the same conversation and seed, streamed
    with its canvas previews, then its stats. The second message carries HTML and markdown: shown as text."""
    configure(page, **SETTINGS)
    first = DEMO_PROMPTS[0]
    send(page, first)
    shown = answer(page, 0)
    expected = api_answer(server, [{"role": "user", "content": first}])
    check_shown(shown, expected)

    hostile = "<img src=x onerror=\"document.title='pwned'\"> `code` **bold**"
    page.fill("#prompt", DEMO_PROMPTS[1])
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    page.type("#prompt", hostile)
    assert page.locator(".msg.user").count() == 1
    page.press("#prompt", "Enter")
    shown = answer(page, 1)
    second = f"{DEMO_PROMPTS[1]}\n{hostile}"
    reply = expected["choices"][0]["message"]["content"]
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
    ]
    check_shown(shown, api_answer(server, history))
    assert page.sent[1]["messages"] == history
    assert page.sent[1]["stream_options"] == {"include_usage": True, "include_previews": True}
    user = page.locator(".msg.user").nth(1)
    assert user.locator(".content").text_content() == second.replace("`", "").replace("**", "")
    assert user.locator("code").text_content() == "code" and user.locator("strong").text_content() == "bold"
    assert page.locator("#log img").count() == 0 and page.title() != "pwned"
    assert page.problems == []


def test_stop_cancels_the_request_on_the_server(page, server, monkeypatch):
    """Stop aborts the fetch; the server cancels the generation on the disconnect; the stopped turn, which has
    no answer, is left out of the next request (chat templates want user and assistant turns to alternate)."""
    configure(page, **SETTINGS)
    cancelled = health(server)["cancelled"]
    hold = Hold(
        monkeypatch
    )  # the generation waits until released: Stop comes before the answer, on any machine
    send(page, DEMO_PROMPTS[2])
    assert hold.reached.wait(HANG_S)
    page.click("#stop")
    shown = answer(page, 0)
    assert shown["state"] == "stopped" and shown["content"] == "" and "stopped" in shown["stats"], shown
    hold.release()
    deadline = time.monotonic() + HANG_S  # a hang guard: the worker notices the cancel at its next step
    while health(server)["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the server never cancelled the stopped request"
        time.sleep(0.05)
    monkeypatch.undo()  # the next answer runs freely

    send(page, DEMO_PROMPTS[0])
    alone = [{"role": "user", "content": DEMO_PROMPTS[0]}]
    check_shown(answer(page, 1), api_answer(server, alone))
    assert page.sent[1]["messages"] == alone
    assert page.problems == []


def test_an_http_error_is_shown(page):
    configure(page, **{**SETTINGS, "max-tokens": -5})
    send(page, "Hello")
    shown = answer(page, 0)
    assert shown["state"] == "error" and shown["error"].startswith("HTTP 400: "), shown
    assert "max_tokens" in shown["error"]
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    # Chromium logs the failed request itself; the page's script raised nothing.
    assert all("status of 400" in p for p in page.problems), page.problems


def test_an_error_event_in_the_stream_is_shown(page):
    """``data: {"error": ...}`` after the stream began (the server's shape, from ``APIError.body``): the text
    committed so far stays, the error is shown under it. The stream is played by the browser's router: a real
    server sends this only when it fails or shuts down mid-answer."""
    error = APIError(503, "the server is shutting down: retry later", code="shutting_down").body()
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [], "preview": {"text": "Hel", "canvas": 0, "step": 2}},
        {"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
        error,
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
    )
    send(page, "Hello")
    shown = answer(page, 0)
    assert shown["state"] == "error" and shown["error"] == error["error"]["message"], shown
    assert shown["content"] == "Hello" and shown["previews"] == 1 and shown["preview"] == ""
    assert page.problems == []


def test_narrow_screens_and_dark_mode(browser, server):
    """One column on a phone (no wider than the screen, settings behind a button); dark colours on request."""
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = open_page(browser, server, color_scheme=scheme)
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.context.close()
    assert backgrounds["light"] != backgrounds["dark"]

    page = open_page(browser, server)
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert not page.is_visible("#settings")
    page.click("#toggle-settings")
    assert page.is_visible("#settings") and page.get_attribute("#toggle-settings", "aria-expanded") == "true"
    assert page.problems == []
    page.context.close()


def test_the_browser_guards_apply_to_the_page(server):
    """The page is same-origin only: no CORS, a Content-Security-Policy that allows this origin alone; the
    Host guard refuses a rebound name on the page as on the API, and POSTs still need a JSON content type."""
    url = base(server)
    page = httpx.get(f"{url}/", headers={"Origin": "https://evil.example"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "access-control-allow-origin" not in page.headers
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    script = httpx.get(f"{url}/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["x-content-type-options"] == "nosniff"
    for path in ("/", "/static/app.js"):
        refused = httpx.get(f"{url}{path}", headers={"Host": "evil.example"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
    for path in ("/static/../web.py", "/static/%2e%2e/web.py", "/static/missing.js"):
        assert httpx.get(f"{url}{path}").status_code == 404, path
    simple = httpx.post(
        f"{server.url}/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert simple.status_code == 415


def test_no_web_serves_the_api_only():
    with BackgroundServer(create_app(str(DEMO24), web=False)) as srv:
        for path in ("/", "/static/app.js"):
            assert httpx.get(f"{base(srv)}{path}").status_code == 404, path
        assert httpx.get(f"{srv.url}/models").status_code == 200


def test_the_no_web_flag(monkeypatch):
    assert server_cli.build_parser().parse_args([]).web is True
    seen: dict[str, Any] = {}

    def create(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise DGemmaError("stopped by the test before loading")

    monkeypatch.setattr(server_cli, "create_app", create)
    with pytest.raises(SystemExit):
        server_cli.main(["--no-web", "--port", "0"])
    assert seen["web"] is False


def save_screenshot(path: Path) -> None:
    """The docs' picture: the embedded model, one answer done and the next mid-stream (its canvas dimmed)."""
    prompts = [
        DEMO_PROMPTS[0],
        "Extract the people as JSON: Bob (51) works as an editor in Lima and speaks French. "
        "Ana, 29, a nurse from Porto, speaks Spanish and English.",
    ]
    with BackgroundServer(create_app()) as srv, chromium() as b:
        page = open_page(b, srv, device_scale_factor=1)
        send(page, prompts[0])
        answer(page, 0)
        for _ in range(5):  # the canvas may finish before the picture: ask again
            send(page, prompts[1])
            n = page.locator(".msg.assistant").count() - 1
            mid_stream = (
                "n => { const a = document.querySelectorAll('.msg.assistant')[n]; "
                "return a.dataset.state !== 'streaming' "
                "|| (a.querySelector('.preview').textContent && Number(a.dataset.previews) > 12); }"
            )
            page.wait_for_function(mid_stream, arg=n, timeout=WAIT_MS)
            streaming = page.locator(".msg.assistant").nth(n).get_attribute("data-state") == "streaming"
            if streaming:
                page.screenshot(path=str(path))
            answer(page, n)
            if streaming:
                print(f"saved {path}")
                return
        raise SystemExit("the answers finished before a mid-stream picture: run again")


if __name__ == "__main__":
    save_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "chat-page.png"))
