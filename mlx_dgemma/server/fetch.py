"""Fetching a request's http(s) image URLs without letting clients reach the server's own machine or network.

A client that can send an image URL can make the server open a connection. So a fetch here:

* resolves the host once and refuses, before connecting, any address that is not public: loopback, private,
  link-local, shared (100.64/10), multicast, reserved and unspecified addresses, IPv4 and IPv6, including the
  IPv4 address inside an IPv4-mapped, IPv4-compatible, 6to4, Teredo or NAT64 IPv6 address. Every spelling of
  an address (``127.1``, ``2130706433``, ``0x7f000001``, ``[::ffff:127.0.0.1]``, ``localhost``) resolves to
  the address that is checked;
* connects to the address it checked (no second lookup a rebinding DNS server could answer differently), with
  the URL's host name as the HTTP ``Host``, the TLS server name and the name the certificate must match;
* follows at most ``MAX_REDIRECTS`` redirects, checking each hop as the first;
* ends within one total deadline, whatever the remote sends or withholds (the socket is shut down from the
  waiting thread at the deadline, or when the request is abandoned), and reads at most ``max_bytes``;
* runs on its own daemon thread, at most ``max_fetches`` at once server-wide (more: HTTP 429), so that slow
  image hosts can neither hold the threads text requests need nor keep the process from exiting;
* fails with ONE error text whatever went wrong (refused address, closed port, timeout, malformed HTTP, an HTTP
  error status): the answer tells a client nothing about what listens where, and never carries the remote's
  bytes. The reason is logged for the operator.

``--allow-image-hosts`` names hosts (or addresses, or networks) fetched even when private; with
``--allow-local-image-urls`` any address is fetched; ``--no-image-urls`` turns fetching off.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

log = logging.getLogger("mlx_dgemma.server")

MAX_IMAGE_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT = 10.0  # seconds for one fetch in all: resolving, connecting, redirects, headers and body
MAX_FETCHES = 4  # fetches in flight server-wide
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "mlx_dgemma-server"
_URL_SAFE = "/%:@!$&'()*+,;=-._~"  # kept as sent: reserved characters and escapes

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Not public, though some Python versions' ``is_global`` says otherwise.
_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "198.18.0.0/15",
        "240.0.0.0/4",
        "::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """A fetch that was refused or failed; ``reason`` is for the log only, never for the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FetchBusy(Exception):
    """Every fetch slot is taken."""


def embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo client, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or int(ip) >> 32 == 0:  # NAT64's well-known prefix; IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: Address) -> bool:
    """Whether ``ip`` (and any IPv4 address inside it) is a public unicast address."""
    inner = embedded_ipv4(ip)
    if inner is not None and not is_public(inner):
        return False
    bad = (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
        or any(ip in n for n in _NOT_PUBLIC if n.version == ip.version)
    )
    if isinstance(ip, ipaddress.IPv6Address):
        bad = bad or ip.is_site_local
    return not bad


def parse_hosts(text: str | Iterable[str] | None) -> tuple[frozenset[str], tuple[Network, ...]]:
    """``--allow-image-hosts`` entries: host names (matched exactly, case-insensitively) and addresses or
    networks (``10.0.0.5``, ``10.0.0.0/8``, ``::1``; matched against the resolved address)."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    names, nets = set(), []
    for item in (i.strip().strip("[]").lower() for i in items):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.add(item.rstrip("."))
    return frozenset(names), tuple(nets)


@dataclass
class FetchPolicy:
    """Which image URLs the server fetches, and within what limits (one per app, shared by its requests)."""

    enabled: bool = True  # False: http(s) image URLs are refused (data: URLs only)
    allow_local: bool = False  # True: any address, loopback and private included
    allow_hosts: str | Iterable[str] | None = (
        None  # host names, addresses or networks fetched even if private
    )
    timeout: float = FETCH_TIMEOUT
    max_bytes: int = MAX_IMAGE_BYTES
    max_fetches: int = MAX_FETCHES
    names: frozenset[str] = field(init=False)
    networks: tuple[Network, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names, self.networks = parse_hosts(self.allow_hosts)
        self.slots = threading.BoundedSemaphore(self.max_fetches)

    def allows(self, host: str, ip: Address) -> bool:
        inner = embedded_ipv4(ip)
        return (
            self.allow_local
            or is_public(ip)
            or host.lower().rstrip(".") in self.names
            or any(
                a in n for a in (ip, inner) if a is not None for n in self.networks if n.version == a.version
            )
        )


def resolve(host: str, port: int) -> list[tuple[int, Any]]:
    """``(family, sockaddr)`` of each address of ``host`` (the one DNS lookup of a fetch; tests replace it)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def connect(family: int, sockaddr: Any, timeout: float) -> socket.socket:
    """A TCP connection to exactly ``sockaddr`` (tests replace it to see where a fetch connects)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def tls_context() -> ssl.SSLContext:
    """The TLS settings of https fetches: the system's certificate authorities, host names checked (tests
    replace it to trust their own authority)."""
    return ssl.create_default_context()


class _Call:
    """One fetch on its thread: the socket it uses (shut down to abort it) and its outcome."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.aborted = False
        self.done = threading.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.aborted:
            raise FetchError("deadline passed" if left <= 0 else "abandoned")
        return left

    def track(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            if self.aborted and sock is not None:
                _shut(sock)

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            if self.sock is not None:
                _shut(self.sock)
        self.done.set()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on the socket


class Fetch:
    """What one request's fetches share: the policy and an abandon switch (``cancel``)."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.calls: set[_Call] = set()
        self.cancelled = False
        self.lock = threading.Lock()

    def cancel(self) -> None:
        """Abandon this request's fetches (its client left): their sockets are shut down at once."""
        with self.lock:
            self.cancelled = True
            calls = list(self.calls)
        for call in calls:
            call.abort()

    def get(self, url: str) -> bytes:
        """The body at ``url``; ``FetchError`` (the reason for the log), ``FetchBusy`` (no free slot)."""
        policy = self.policy
        if not policy.slots.acquire(blocking=False):
            raise FetchBusy()
        call = _Call(time.monotonic() + policy.timeout)
        with self.lock:
            if self.cancelled:
                policy.slots.release()
                raise FetchError("abandoned")
            self.calls.add(call)
        thread = threading.Thread(target=self._run, args=(call, url), name="image-fetch", daemon=True)
        try:
            thread.start()
        except BaseException:
            policy.slots.release()
            raise
        try:
            if not call.done.wait(max(0.0, call.deadline - time.monotonic())):
                call.abort()
                raise FetchError(f"no complete answer within {policy.timeout:g} s")
            if call.result is None:
                call.abort()
                if isinstance(call.error, TooLarge):
                    raise call.error
                if call.error is None:
                    raise FetchError("abandoned")
                raise FetchError(_reason(call.error))
            return call.result
        finally:
            with self.lock:
                self.calls.discard(call)

    def _run(self, call: _Call, url: str) -> None:
        try:
            call.result = _get(url, call, self.policy)
        except BaseException as e:  # every failure is the same answer; the reason is logged
            call.error = e
        finally:
            call.track(None)
            self.policy.slots.release()
            call.done.set()


def _reason(e: BaseException) -> str:
    if isinstance(e, FetchError):
        return e.reason
    return f"{type(e).__name__}: {str(e)[:200]!r}"


def _get(url: str, call: _Call, policy: FetchPolicy) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _once(url, call, policy)
        if status not in REDIRECTS:
            return body
        if not location:
            raise FetchError(f"HTTP {status} without a Location")
        url = urljoin(url, location)
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _once(url: str, call: _Call, policy: FetchPolicy) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location of a redirect, body of a 200)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"a redirect to a {scheme or 'schemeless'} URL")
    host = parts.hostname
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise FetchError("a bad port") from None
    if not host:
        raise FetchError("no host")
    if parts.username is not None or parts.password is not None:
        raise FetchError("credentials in the URL")
    call.remaining()
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise FetchError(f"cannot resolve {host!r}: {e}") from None
    if not addresses:
        raise FetchError(f"{host!r} has no address")
    for _, sockaddr in addresses:  # every address must pass: a name may mix public and internal ones
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not policy.allows(host, ip):
            raise FetchError(
                f"{host!r} resolves to {ip}, which is not a public address (see --allow-image-hosts)"
            )
    sock, error = None, None
    for family, sockaddr in addresses:
        try:
            sock = connect(family, sockaddr, call.remaining())
            break
        except OSError as e:
            error = e
    if sock is None:
        raise FetchError(f"cannot connect to {host!r}: {error}")
    call.track(sock)
    try:
        if scheme == "https":
            sock.settimeout(call.remaining())
            sock = tls_context().wrap_socket(sock, server_hostname=host)  # SNI, and the certificate of host
            call.track(sock)
        return _exchange(sock, parts, host, port, scheme, call, policy.max_bytes)
    finally:
        call.track(None)
        sock.close()


def _exchange(
    sock: socket.socket, parts: Any, host: str, port: int, scheme: str, call: _Call, max_bytes: int
) -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection(host, port)
    conn.sock = sock  # already connected, to the checked address: ``connect`` (a second lookup) never runs
    default = 443 if scheme == "https" else 80
    name = f"[{host}]" if ":" in host else host
    path = quote(parts.path or "/", safe=_URL_SAFE)  # a space or a non-ASCII letter, as a browser sends it
    if parts.query:
        path += "?" + quote(parts.query, safe=_URL_SAFE + "?")
    sock.settimeout(call.remaining())
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", name if port == default else f"{name}:{port}")
    conn.putheader("User-Agent", USER_AGENT)
    conn.putheader("Accept", "image/*")
    conn.putheader("Connection", "close")
    conn.endheaders()
    response = conn.getresponse()
    if response.status in REDIRECTS:
        return response.status, response.getheader("Location"), b""
    if response.status != 200:
        raise FetchError(f"HTTP {response.status}")
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise TooLarge(max_bytes)
    chunks, size = [], 0
    while True:
        sock.settimeout(call.remaining())
        chunk = response.read1(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(max_bytes)
        chunks.append(chunk)
    return 200, None, b"".join(chunks)


class TooLarge(Exception):
    """The image is over the byte limit (told to the client: an allowed host answered, nothing is probed)."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self.max_bytes = max_bytes
