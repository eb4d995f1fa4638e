"""The server's ``image_url`` content parts: data: URLs, http(s) URLs from a loopback server, limits, errors,
and a prompt cache that reuses a cached image only when the pixels are the same.

The embedded demo model carries a tiny (untrained) vision tower, so images run through the whole path.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from mlx_dgemma.server import BackgroundServer, create_app
from tests.conftest import HANG_S

FAST = {"max_denoising_steps": 2, "max_tokens": 8, "seed": 0}


def png(value: int, size=(40, 32)) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(url: str, image_url: str, text: str = "What is in the image?", history: list | None = None):
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    messages = [*(history or []), {"role": "user", "content": content}]
    return httpx.post(
        f"{url}/chat/completions", json={"model": "default", "messages": messages, **FAST}, timeout=HANG_S
    )


class Images(http.server.BaseHTTPRequestHandler):
    """Serves /ok.png, a 404, /big.png (over the limit) and /slow.png (never finishes until released)."""

    release = threading.Event()

    def do_GET(self):
        if self.path == "/ok.png":
            body = png(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x89PNG")
            self.wfile.flush()
            self.release.wait(600)  # the fetch can only end by its own time limit
        elif self.path == "/big.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 4096)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Images.release.set()
    httpd.shutdown()


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(max_concurrency=4)) as srv:
        yield srv


def test_data_url_image_and_the_prompt_cache_keys_images_by_content(server):
    first = ask(server.url, data_url(png(1)))
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    assert usage["prompt_tokens"] > 100  # the image's soft tokens are in the prompt
    # The same prompt and image again: the whole prompt comes from the cache.
    again = ask(server.url, data_url(png(1))).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    # Same size (so the same token ids), other pixels: the cache must stop before the image.
    other = ask(server.url, data_url(png(2))).json()["usage"]
    assert other["prompt_tokens"] == usage["prompt_tokens"]
    assert other["prompt_tokens_details"]["cached_tokens"] < 10
    # The next turn of the conversation reuses the image it already encoded.
    answer = first.json()["choices"][0]["message"]["content"]
    history = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png(1))}},
                {"type": "text", "text": "What is in the image?"},
            ],
        },
        {"role": "assistant", "content": answer},
    ]
    turn = ask(server.url, data_url(png(3)), "And this one?", history)
    assert turn.status_code == 200, turn.text


def test_http_url_fetched_with_limits(server, image_host, monkeypatch):
    """(Loopback image hosts are refused by default: tests/test_server_fetch.py; allowed here.)"""
    from mlx_dgemma.server.images import ImagePolicy

    limits = server.app.state.limits
    # Fetches that must succeed (or reach the byte limit) get a hang guard for their time: a busy machine may
    # take longer than the default 10 s over loopback. Only /slow.png's fetch must time out (later, never not).
    monkeypatch.setattr(limits, "images", ImagePolicy(allow_local=True, timeout=HANG_S))
    ok = ask(server.url, f"{image_host}/ok.png")
    assert ok.status_code == 200, ok.text
    missing = ask(server.url, f"{image_host}/missing.png")
    assert missing.status_code == 400 and "could not be fetched" in missing.json()["error"]["message"]
    monkeypatch.setattr(limits, "images", ImagePolicy(allow_local=True, max_bytes=1024, timeout=HANG_S))
    big = ask(server.url, f"{image_host}/big.png")
    assert big.status_code == 400 and "1024-byte limit" in big.json()["error"]["message"]
    monkeypatch.setattr(limits, "images", ImagePolicy(allow_local=True, timeout=0.5))
    slow = ask(server.url, f"{image_host}/slow.png")
    assert slow.status_code == 400 and "within 0.5 s" in slow.json()["error"]["message"]


def test_bad_image_parts_are_400(server):
    bad = ask(server.url, "data:image/png;base64," + base64.b64encode(b"not a png").decode())
    assert bad.status_code == 400 and "cannot read" in bad.json()["error"]["message"]
    local = ask(server.url, "/etc/passwd")
    assert local.status_code == 400 and "data: or http(s)" in local.json()["error"]["message"]
