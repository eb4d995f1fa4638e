"""Guards against web pages: any page a browser shows can send requests to a server on ``localhost``.

- A page may POST a "simple" request (``Content-Type: text/plain``, no CORS preflight) whose body is JSON: JSON
  endpoints require ``Content-Type: application/json``, which a page can only send after a preflight, which
  CORS refuses unless ``--allowed-origins`` allows the page.
- DNS rebinding: a page at ``evil.example`` re-points its name at 127.0.0.1, and its requests to this server are
  then same-origin (the browser sends ``Host: evil.example:8080``), reading answers included. So a request's
  ``Host`` must name this server: ``localhost``, an IP address (a page whose origin is an address is that address's
  own server, not a rebound name), this machine's host name (``name`` or ``name.local``), or a name that
  ``--allowed-hosts`` adds (``*.example.com`` for a domain's subdomains, ``*`` for any: behind a reverse proxy that
  checks names itself). The port is not checked: rebinding cannot change it, and port forwarding does.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse

from mlx_dgemma.server.protocol import APIError

LOCAL_NAMES = ("localhost",)


def host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without the port, brackets or a final dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8080
        return header[1:].split("]", 1)[0]
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """ASGI middleware: HTTP requests whose ``Host`` is not one of this server's names are answered 400."""

    def __init__(self, app: Any, allowed: Iterable[str] = ()):
        self.app = app
        allowed = [host_name(a) if a.strip() != "*" else "*" for a in allowed if a.strip()]
        self.any = "*" in allowed
        own = socket.gethostname().lower().rstrip(".")
        self.names = frozenset(
            {*LOCAL_NAMES, own, f"{own}.local", *(a for a in allowed if not a.startswith("*"))}
        )
        self.suffixes = tuple(
            a[1:] for a in allowed if a.startswith("*.")
        )  # "*.example.com" -> ".example.com"

    def allows(self, header: str | None) -> bool:
        if header is None or self.any:  # no Host: not a browser (HTTP/1.0; h11 refuses HTTP/1.1 without one)
            return True
        name = host_name(header)
        return name in self.names or _is_address(name) or name.endswith(self.suffixes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [v for k, v in scope["headers"] if k == b"host"]
            header = headers[0].decode("latin-1") if len(headers) == 1 else None
            if len(headers) > 1 or not self.allows(header):
                shown = header if len(headers) == 1 else f"{len(headers)} Host headers"
                name = host_name(header) if header else "NAME"
                error = APIError(
                    400,
                    f"the Host header {shown!r} is not a name of this server (a web page may be "
                    f"rebinding its name to it): start the server with --allowed-hosts {name} "
                    "to serve it",
                    code="host_not_allowed",
                )
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_json_content_type(header: str | None) -> None:
    """``APIError(415)`` unless ``Content-Type`` is ``application/json`` (a charset, if any, UTF-8)."""
    media, *params = (header or "").split(";")
    charset = next(
        (
            p.split("=", 1)[1].strip().strip('"').lower()
            for p in params
            if p.split("=", 1)[0].strip().lower() == "charset" and "=" in p
        ),
        "utf-8",
    )
    if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        got = f"{header!r}" if header else "none"
        raise APIError(
            415,
            f"Content-Type must be application/json (got {got}): send the JSON body with "
            "'Content-Type: application/json'",
            code="unsupported_media_type",
        )
