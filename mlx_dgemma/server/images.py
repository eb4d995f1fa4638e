"""Images of chat requests: ``image_url`` content parts as ``data:`` URLs, or http(s) URLs fetched here.

Fetching is ``server.fetch``: public addresses only unless allowed, one total deadline, bounded in number,
abandoned with its request, and one error text for every refused or failed fetch. Local paths are refused: a
client must not make the server read its files.

Decoding is bounded too: each image's size is read from its header before any pixel is decoded, a request's
images may hold at most ``request_pixels`` pixels in all (else 400), and the server decodes at most
``pixels_in_flight`` pixels at once (else 429, retry shortly), so that large images at once cannot multiply the
server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.model.image_processing import MAX_IMAGE_PIXELS, ImageInput, declared_size
from mlx_dgemma.prompt.multimodal import decode_data_url
from mlx_dgemma.server import fetch as fetching
from mlx_dgemma.server.protocol import APIError

log = logging.getLogger("mlx_dgemma.server")

IMAGE_PARTS = ("image_url", "input_image", "image")
REQUEST_PIXELS = MAX_IMAGE_PIXELS  # pixels of one request's images, in all (one image of the largest size)
PIXELS_IN_FLIGHT = (
    MAX_IMAGE_PIXELS  # pixels the server decodes at once, over all requests (one largest image)
)
POLL_S = 0.25  # how often a request that is fetching checks whether its client is still there

T = TypeVar("T")


class PixelBudget:
    """Pixels being decoded server-wide: a request reserves its images' pixels, or is refused at once."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self.lock:
            if self.used and self.used + pixels > self.total:
                raise APIError(
                    429,
                    "the server is decoding other large images: retry shortly",
                    type_="rate_limit_error",
                    code="server_busy",
                )
            self.used += pixels
        try:
            yield
        finally:
            with self.lock:
                self.used -= pixels


class ImagePolicy:
    """How a server takes images: which URLs it fetches (``FetchPolicy``) and its pixel budgets."""

    def __init__(
        self,
        fetch_urls: bool = True,
        allow_local: bool = False,
        allow_hosts: str | Iterable[str] | None = None,
        timeout: float = fetching.FETCH_TIMEOUT,
        max_bytes: int = fetching.MAX_IMAGE_BYTES,
        max_fetches: int = fetching.MAX_FETCHES,
        request_pixels: int = REQUEST_PIXELS,
        pixels_in_flight: int = PIXELS_IN_FLIGHT,
    ):
        if not timeout > 0 or max_fetches < 1 or max_bytes < 1 or request_pixels < 1 or pixels_in_flight < 1:
            raise DGemmaError("the image timeout, fetch count, byte and pixel limits must be positive")
        self.fetch = fetching.FetchPolicy(
            fetch_urls, allow_local, allow_hosts, timeout, max_bytes, max_fetches
        )
        self.request_pixels = request_pixels
        self.pixels = PixelBudget(max(pixels_in_flight, request_pixels))
        self.scopes: set[Scope] = set()
        self.closing = False

    def shutdown(self) -> None:
        """Abandon every fetch in progress and refuse new ones (the server is stopping: SIGTERM, Ctrl-C)."""
        self.closing = True
        for scope in list(self.scopes):
            scope.fetch.cancel()

    async def run(self, request: Any, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread, its image fetches under this policy; they are abandoned (their sockets
        shut down) when the client disconnects or the request is cancelled."""
        scope = Scope(self)
        token = _SCOPE.set(scope)
        try:
            task = asyncio.ensure_future(
                asyncio.to_thread(fn, *args)
            )  # the task copies the context: the scope
        finally:
            _SCOPE.reset(token)
        self.scopes.add(scope)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if scope.fetch.calls and await request.is_disconnected():
                    scope.fetch.cancel()
        except BaseException:  # cancelled (the server stops): abandon the fetches; the thread's error is moot
            scope.fetch.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise
        finally:
            self.scopes.discard(scope)


class Scope:
    """One request's view of the policy: its fetches (to abandon together)."""

    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self.fetch = fetching.Fetch(policy.fetch)


_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("mlx_dgemma_image_scope", default=None)
_DEFAULT: list[ImagePolicy] = []


def current() -> Scope:
    """The running request's scope (``ImagePolicy.run``), else one under the default policy."""
    scope = _SCOPE.get()
    if scope is None:
        if not _DEFAULT:
            _DEFAULT.append(ImagePolicy())
        scope = Scope(_DEFAULT[0])
    return scope


def image_of(part: dict[str, Any], where: str, max_bytes: int | None = None) -> bytes:
    """The encoded image an ``image_url`` part names (``{"image_url": {"url": ...}}`` or ``{"image_url": ...}``)."""
    scope = current()
    max_bytes = scope.policy.fetch.max_bytes if max_bytes is None else max_bytes
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
            raise APIError(
                400, f"{where}: the image is {len(data)} bytes, over the {max_bytes}-byte limit", where
            )
        return data
    if url[:8].lower().startswith(("http://", "https://")):
        return fetch(url, where, scope)
    raise APIError(400, f"{where}: image urls must be data: or http(s) URLs", where)


def fetch(url: str, where: str, scope: Scope | None = None) -> bytes:
    """GET ``url`` under the scope's policy; every refusal or failure is the same APIError(400)."""
    scope = scope or current()
    policy = scope.policy.fetch
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    shown = host if len(host) <= 80 else host[:77] + "..."
    if not policy.enabled:
        raise APIError(
            400,
            f"{where}: this server does not fetch image URLs (it runs with --no-image-urls): send "
            "the image as a data: URL",
            where,
        )
    try:
        if scope.policy.closing:
            raise fetching.FetchError("the server is shutting down")
        return scope.fetch.get(url)
    except fetching.FetchBusy:
        raise APIError(
            429,
            f"{where}: the server is fetching {policy.max_fetches} images already: retry shortly",
            where,
            type_="rate_limit_error",
            code="server_busy",
        ) from None
    except fetching.TooLarge as e:
        raise APIError(
            400,
            f"{where}: the image at {shown} is over the {e.max_bytes}-byte limit: send a smaller image",
            where,
        ) from None
    except fetching.FetchError as e:
        if scope.policy.closing:
            raise APIError(
                503,
                "the server is shutting down: retry on another server or later",
                type_="server_error",
                code="shutting_down",
            ) from None
        log.info("image fetch of %r refused or failed: %s", url[:200], e.reason)
    raise APIError(
        400,
        f"{where}: the image could not be fetched from {shown!r}: check that the URL is public and "
        f"answers with the image within {policy.timeout:g} s, or send the image as a data: URL",
        where,
        code="image_fetch_failed",
    )


def image_prompt(model: Any, ids: list[int], parts: list[tuple[str, dict]]) -> Any:
    """Fetch or decode a request's images, check their declared sizes against the pixel budgets (before any
    pixel is decoded), then process them and expand their placeholders (``multimodal.prepare``)."""
    from mlx_dgemma.prompt.multimodal import prepare

    scope = current()
    data = [image_of(part, where) for where, part in parts]
    total = 0
    for (where, _), image in zip(parts, data):
        try:
            width, height = declared_size(image)
        except DGemmaError as e:
            raise APIError(400, f"{where}: {e}", where) from None
        total += width * height
    limit = scope.policy.request_pixels
    if total > limit:
        raise APIError(
            400,
            f"messages: the request's images hold {total} pixels, over the server's {limit}-pixel "
            "limit per request: send fewer or smaller images",
            "messages",
        )
    with scope.policy.pixels.reserve(total):
        return prepare(model, ids, cast(list[ImageInput], data))  # list[bytes]: prepare only reads it
