"""The chat page (``GET /``): static files from ``server/web/`` (no build step, no CDN: it works offline).

The page talks only to this server's own API (same origin), so it needs, and enables, no CORS. Its responses
carry a Content-Security-Policy that allows scripts, styles and requests from this origin only: even text
that escaped the page's own escaping could run no script and reach no other host. The ``Host`` guard
(``guards.py``) is middleware and applies here as everywhere; a GET has no body, so the JSON content-type
check does not apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).with_name("web")

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it: no clickjacking
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: never an older server's page against a newer API
}


class _Static(StaticFiles):
    """Starlette's static files (path checks, ETags, HEAD), with the page's security headers."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its script, styles and icon under ``/static/``."""
    app.mount("/static", _Static(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=HEADERS)
