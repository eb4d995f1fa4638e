"""Images of chat requests: ``image_url`` content parts as ``data:`` URLs, or http(s) URLs fetched here.

A fetch is bounded in size (``MAX_IMAGE_BYTES``) and in total time (``FETCH_TIMEOUT`` seconds), and every
failure is an HTTP 400 naming the URL and the reason. Local paths are refused: a client must not make the
server read its files.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from ..multimodal import decode_data_url
from .protocol import APIError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT = 10.0
IMAGE_PARTS = ("image_url", "input_image", "image")


def image_of(part: dict[str, Any], where: str, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
    """The encoded image an ``image_url`` part names (``{"image_url": {"url": ...}}`` or ``{"image_url": ...}``)."""
    max_bytes = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    timeout = FETCH_TIMEOUT if timeout is None else timeout
    url = part.get("image_url", part.get("image"))
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: an image_url part needs a url (a data: URL or http(s) URL)", where)
    if url.startswith("data:"):
        try:
            data = decode_data_url(url)
        except ValueError as e:  # GenerationError
            raise APIError(400, f"{where}: {e}", where) from None
        if len(data) > max_bytes:
            raise APIError(400, f"{where}: the image is {len(data)} bytes, over the {max_bytes}-byte limit", where)
        return data
    if url.startswith(("http://", "https://")):
        return fetch(url, where, max_bytes, timeout)
    raise APIError(400, f"{where}: image urls must be data: or http(s) URLs", where)


def fetch(url: str, where: str, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = FETCH_TIMEOUT) -> bytes:
    """GET ``url``: at most ``max_bytes`` bytes within ``timeout`` seconds in all, else APIError(400)."""
    deadline = time.monotonic() + timeout
    short = url if len(url) <= 80 else url[:77] + "..."
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mlx_dgemma-server"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise APIError(400, f"{where}: the image at {short} is {declared} bytes, over the {max_bytes}-byte "
                                    "limit", where)
            chunks, size = [], 0
            while chunk := response.read(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(400, f"{where}: the image at {short} is over the {max_bytes}-byte limit", where)
                if time.monotonic() > deadline:
                    raise APIError(400, f"{where}: fetching {short} took over {timeout:g} s", where)
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{where}: fetching {short} failed: HTTP {e.code}", where) from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"{where}: fetching {short} failed: {reason}", where) from None
