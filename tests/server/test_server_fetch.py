"""The server's image fetcher and image decoding against hostile URLs and images (issue 26).

Every image host here listens on 127.0.0.1 in this process. Loopback is refused by default, so the tests of
refused addresses never connect anywhere (``fetch.connect`` is replaced by one that fails the test), and the
tests that need a fetch to happen allow local URLs. Addresses that are not loopback are only ever checked and
refused, or handed to a replaced resolver and connector that lead to 127.0.0.1: no traffic leaves the machine.
No assertion depends on how fast the machine is: waits are bounded only against a hang.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import httpx
import pytest
from test_vision_server import FAST, data_url, png

import mlx_dgemma.server.fetch as fetch
from mlx_dgemma.server import BackgroundServer, create_app
from mlx_dgemma.server.images import ImagePolicy, PixelBudget
from mlx_dgemma.server.protocol import APIError
from tests.conftest import HANG_S

BANNER = b"SSH-2.0-OpenSSH_9.6p1 SECRET-BANNER-7f3a\r\n"


def generic(host: str, timeout: float) -> str:
    """The one error text of a refused or failed fetch (after the ``where`` prefix)."""
    return (
        f"the image could not be fetched from {host!r}: check that the URL is public and answers with the "
        f"image within {timeout:g} s, or send the image as a data: URL"
    )


# --- an image host that misbehaves on request ----------------------------------------------------------------


class Host:
    """A raw TCP image host on 127.0.0.1: each path gets its own behaviour, from a valid PNG to a drip that
    never ends. ``requests`` records (path, headers) of what arrived; ``dripping`` is set when a drip starts
    and ``gone`` when its client has gone (the fetch was aborted)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.dripping, self.gone, self.stop = threading.Event(), threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(HANG_S)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
            except OSError:
                return
            lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            self.requests.append((path, headers))
            with contextlib.suppress(OSError):
                self.behaviours.get(path, _not_found)(self, conn)

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    behaviours: ClassVar[dict[str, Callable[[Host, socket.socket], None]]] = {}


def _answer(status: str, body: bytes = b"", headers: str = "") -> Callable[[Host, socket.socket], None]:
    def send(_: Host, conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body)

    return send


def _not_found(host: Host, conn: socket.socket) -> None:
    _answer("404 Not Found", b"nothing here: INTERNAL-SECRET-404")(host, conn)


def _drip(host: Host, conn: socket.socket) -> None:
    """A header that never ends, one byte at a time: every read gets a byte, so only a total deadline ends it."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
    host.dripping.set()
    try:
        while not host.stop.wait(0.05):
            conn.sendall(b"a")
    except OSError:
        host.gone.set()


def _redirect_to(url: str) -> Callable[[Host, socket.socket], None]:
    return _answer("302 Found", headers=f"Location: {url}\r\n")


Host.behaviours = {
    "/ok.png": _answer("200 OK", png(1), "Content-Type: image/png\r\n"),
    "/drip": _drip,
    "/bad-chunk": lambda h, c: c.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ-NOT-HEX\r\n"
    ),
    "/many-headers": lambda h, c: c.sendall(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n"
    ),
    "/long-header": lambda h, c: c.sendall(b"HTTP/1.1 200 OK\r\nX-Long: " + b"L" * 70_000 + b"\r\n\r\n"),
    "/banner": lambda h, c: c.sendall(BANNER),
    "/big": _answer("200 OK", b"x" * 4096),
    "/huge-declared": lambda h, c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\nxx"),
}


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    h = Host()
    yield h
    h.close()


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(max_concurrency=8)) as srv:
        yield srv


@pytest.fixture
def policy(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> Callable[..., ImagePolicy]:
    """Sets the module server's image policy for one test (requests read it as they arrive). Its fetch time is
    a hang guard unless the test sets one: a fetch that must succeed never races the default 10 s."""

    def use(**kw: Any) -> ImagePolicy:
        p = ImagePolicy(**{"timeout": HANG_S, **kw})
        monkeypatch.setattr(server.app.state.limits, "images", p)
        return p

    return use


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any connection attempt is recorded and refused: a refusal must come before connecting."""
    attempts: list[Any] = []

    def refuse(family: int, sockaddr: Any, timeout: float) -> socket.socket:
        attempts.append(sockaddr)
        raise ConnectionRefusedError("the test refuses every connection")

    monkeypatch.setattr(fetch, "connect", refuse)
    return attempts


def ask(srv: BackgroundServer, image_url: str, timeout: float = HANG_S) -> httpx.Response:
    content = [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "What is it?"},
    ]
    return httpx.post(
        f"{srv.url}/chat/completions",
        timeout=timeout,
        json={"model": "default", "messages": [{"role": "user", "content": content}], **FAST},
    )


def error_of(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    return r.json()["error"]["message"]


# --- addresses ---------------------------------------------------------------------------------------------

LOCAL_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "0x7f.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "0.0.0.0",
    "0",
    "localhost",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "[fe80::1]",
    "[fc00::1]",
    "[::]",
    "224.0.0.1",
    "255.255.255.255",
]


@pytest.mark.parametrize("spelling", LOCAL_SPELLINGS)
def test_every_spelling_of_a_local_address_is_refused_before_connecting(server, no_connect, spelling):
    r = ask(server, f"http://{spelling}:{server.port}/health")  # the server's own port among them
    message = error_of(r)
    assert message.startswith("messages.0.content.0: the image could not be fetched from ")
    assert "public" in message and "data: URL" in message
    assert r.json()["error"]["code"] == "image_fetch_failed"
    assert no_connect == []


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("93.184.216.34", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("198.18.0.1", False),
        ("::1", False),
        ("::", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::127.0.0.1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fd12::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("2002:7f00:1::", False),
        ("2002:a00:1::", False),
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo carrying 127.0.0.1
        ("2001:db8::1", False),
    ],
)
def test_public_addresses(address, public):
    assert fetch.is_public(ipaddress.ip_address(address)) is public


def test_a_name_with_a_public_and_a_local_address_is_refused(monkeypatch, no_connect):
    monkeypatch.setattr(
        fetch,
        "resolve",
        lambda host, port: [(socket.AF_INET, ("93.184.216.34", port)), (socket.AF_INET, ("127.0.0.1", port))],
    )
    with pytest.raises(fetch.FetchError, match="not a public address"):
        fetch.Fetch(fetch.FetchPolicy()).get("http://mixed.test/x.png")
    assert no_connect == []


def test_the_allow_flags_make_a_local_fetch_work(server, host, policy, monkeypatch):
    policy(allow_local=True)
    assert ask(server, f"{host.url}/ok.png").status_code == 200
    policy(allow_hosts="127.0.0.0/8")
    assert ask(server, f"{host.url}/ok.png").status_code == 200
    policy(allow_hosts="10.0.0.0/8, images.test")
    error_of(ask(server, f"{host.url}/ok.png"))  # another network: still refused
    # A host name on the list is fetched whatever it resolves to (here, the test's host).
    monkeypatch.setattr(fetch, "resolve", lambda name, port: [(socket.AF_INET, ("127.0.0.1", port))])
    assert ask(server, f"http://images.test:{host.port}/ok.png").status_code == 200
    assert host.requests[-1][1]["host"] == f"images.test:{host.port}"
    error_of(ask(server, f"http://other.test:{host.port}/ok.png"))


def test_no_image_urls_refuses_every_url_but_data_urls(server, policy, no_connect):
    policy(fetch_urls=False)
    assert "--no-image-urls" in error_of(ask(server, "http://93.184.216.34/x.png"))
    assert ask(server, data_url(png(1))).status_code == 200
    assert no_connect == []


def test_a_redirect_to_a_local_address_is_refused(server, host, policy, monkeypatch):
    """A public-looking host (the test's resolver and connector lead it to the local host) redirects to
    loopback: the hop is checked like the first URL and refused, so the local URL is never requested."""
    policy()  # its time a hang guard: the public hop must be fetched within it
    where: list[Any] = []
    real_connect = fetch.connect

    def to_host(family: int, sockaddr: Any, timeout: float) -> socket.socket:
        where.append(sockaddr[0])
        assert sockaddr[0] == "93.184.216.34", "only the checked public address may be connected to"
        return real_connect(socket.AF_INET, ("127.0.0.1", host.port), timeout)

    def resolve(name: str, port: int) -> list[tuple[int, Any]]:
        if name == "public.test":
            return [(socket.AF_INET, ("93.184.216.34", port))]
        return real_resolve(name, port)

    real_resolve = fetch.resolve
    monkeypatch.setattr(fetch, "resolve", resolve)
    monkeypatch.setattr(fetch, "connect", to_host)
    monkeypatch.setitem(Host.behaviours, "/hop", _redirect_to(f"http://127.0.0.1:{host.port}/ok.png"))
    monkeypatch.setitem(Host.behaviours, "/hop-public", _redirect_to("/ok.png"))
    before = len(host.requests)
    assert generic("public.test", HANG_S) in error_of(ask(server, "http://public.test/hop"))
    assert host.paths()[before:] == ["/hop"]  # /ok.png was never asked for
    assert ask(server, "http://public.test/hop-public").status_code == 200  # a public hop is followed
    assert host.paths()[before:] == ["/hop", "/hop-public", "/ok.png"]
    assert set(where) == {"93.184.216.34"}


def test_dns_rebinding_the_connection_goes_to_the_checked_address(host, monkeypatch):
    """The resolver answers a public address, then loopback (a rebinding DNS server): the fetch resolves once
    and connects to the address it checked, with the URL's name as Host."""
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    lookups: list[str] = []
    connected: list[Any] = []

    def resolve(name: str, port: int) -> list[tuple[int, Any]]:
        lookups.append(name)
        return [(socket.AF_INET, (next(answers), port))]

    def connect(family: int, sockaddr: Any, timeout: float) -> socket.socket:
        connected.append(sockaddr)  # stands in for the public host: leads to the test's host instead
        return socket.create_connection(("127.0.0.1", host.port), timeout)

    monkeypatch.setattr(fetch, "resolve", resolve)
    monkeypatch.setattr(fetch, "connect", connect)
    body = fetch.Fetch(fetch.FetchPolicy(timeout=HANG_S)).get(f"http://rebind.test:{host.port}/ok.png")
    assert body == png(1)
    assert lookups == ["rebind.test"] and connected == [("93.184.216.34", host.port)]
    assert host.requests[-1][1]["host"] == f"rebind.test:{host.port}"


def test_https_connects_to_the_checked_address_and_checks_the_hosts_certificate(host, monkeypatch, tmp_path):
    """TLS to the checked address, with the URL's host as server name (SNI) and as the name the certificate
    must carry: a certificate for another name fails like any fetch."""
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=images.test",
            "-addext",
            "subjectAltName=DNS:images.test",
        ],
        check=True,
        capture_output=True,
        timeout=HANG_S,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with server_ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(HANG_S)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += conn.recv(4096)
                    body = png(1)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(fetch, "tls_context", lambda: ssl.create_default_context(cafile=str(cert)))
    monkeypatch.setattr(fetch, "resolve", lambda name, p: [(socket.AF_INET, ("127.0.0.1", p))])
    try:
        got = fetch.Fetch(fetch.FetchPolicy(allow_hosts="images.test", timeout=HANG_S)).get(
            f"https://images.test:{port}/ok.png"
        )
        assert got == png(1) and names == ["images.test"]
        with pytest.raises(fetch.FetchError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            fetch.Fetch(fetch.FetchPolicy(allow_local=True, timeout=HANG_S)).get(
                f"https://other.test:{port}/ok.png"
            )
    finally:
        listener.close()


def test_redirects_are_bounded_and_paths_are_sent_escaped(host, monkeypatch):
    monkeypatch.setitem(Host.behaviours, "/loop", _redirect_to("/loop"))
    monkeypatch.setitem(Host.behaviours, "/a%20b%C3%A9.png", Host.behaviours["/ok.png"])
    local = fetch.Fetch(fetch.FetchPolicy(allow_local=True, timeout=HANG_S))
    with pytest.raises(fetch.FetchError, match="more than 3 redirects"):
        local.get(f"{host.url}/loop")
    assert local.get(f"{host.url}/a bé.png") == png(1)
    with pytest.raises(fetch.FetchError, match="credentials"):
        local.get(f"http://user:secret@127.0.0.1:{host.port}/ok.png")


# --- failures: one text, never the remote's bytes, 400 not 500 ------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/missing.png", "/bad-chunk", "/many-headers", "/long-header", "/banner", "/drip", "closed-port"]
)
def test_every_failed_fetch_is_the_same_400(server, host, policy, path):
    policy(allow_local=True, timeout=1)
    if path == "closed-port":
        closed = socket.socket()  # bound, not listening: the port is closed and stays ours
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/x.png"
    else:
        url = f"{host.url}{path}"
    r = ask(server, url)
    if path == "closed-port":
        closed.close()
    assert error_of(r) == "messages.0.content.0: " + generic("127.0.0.1", 1)
    for secret in (b"SECRET", b"OpenSSH", b"ZZZ", b"LLLL"):
        assert secret not in r.content
    # The same text as an address refused before connecting:
    policy(timeout=1)
    assert error_of(ask(server, url)) == "messages.0.content.0: " + generic("127.0.0.1", 1)


def test_a_drip_is_ended_by_the_total_deadline(host):
    """Every read gets a byte before any per-read timeout: only a deadline for the whole fetch ends it, and
    its socket is shut down (the host sees its client go)."""
    host.gone.clear()
    done = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            fetch.Fetch(fetch.FetchPolicy(allow_local=True, timeout=1)).get(f"{host.url}/drip")
        except BaseException as e:
            outcome.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(HANG_S), "the fetch did not end"
    assert isinstance(outcome[0], fetch.FetchError) and "within 1 s" in outcome[0].reason
    assert host.gone.wait(HANG_S), "the fetch's socket was not shut down"


def test_sizes_over_the_byte_limit(server, host, policy):
    policy(allow_local=True, max_bytes=1024)
    assert "1024-byte limit" in error_of(ask(server, f"{host.url}/big"))
    assert "1024-byte limit" in error_of(ask(server, f"{host.url}/huge-declared"))


# --- fetches are bounded in number and abandoned with their request -----------------------------------------


def _post_raw(srv: BackgroundServer, image_url: str) -> socket.socket:
    """A chat request on a raw socket, so that the test can drop the connection while the fetch runs."""
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "hi"}]
    body = json.dumps({"messages": [{"role": "user", "content": content}], **FAST}).encode()
    sock = socket.create_connection((srv.host, srv.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (srv.host.encode(), srv.port, len(body), body)
    )
    return sock


def test_fetches_are_bounded_and_abandoned_with_their_client(server, host, policy):
    """One fetch slot, a fetch that would drip for 10 minutes: a second fetch is a 429 at once, text requests
    and /health still answer, and when the first client leaves, its fetch is aborted (not left to its
    deadline)."""
    policy(allow_local=True, timeout=600, max_fetches=1)
    host.dripping.clear()
    host.gone.clear()
    client = _post_raw(server, f"{host.url}/drip")
    try:
        assert host.dripping.wait(HANG_S)
        second = ask(server, f"{host.url}/ok.png")
        assert second.status_code == 429 and second.json()["error"]["code"] == "server_busy"
        assert second.headers["retry-after"] == "1"
        text = httpx.post(
            f"{server.url}/chat/completions",
            timeout=HANG_S,
            json={"messages": [{"role": "user", "content": "Hello"}], **FAST},
        )
        assert text.status_code == 200, text.text
        assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=HANG_S).status_code == 200
    finally:
        client.close()
    assert host.gone.wait(HANG_S), "the abandoned fetch still runs"
    # Its slot is free again once the fetch thread has ended.
    for _ in range(HANG_S * 10):
        r = ask(server, f"{host.url}/ok.png")
        if r.status_code != 429:
            break
        host.stop.wait(0.1)
    assert r.status_code == 200, r.text


# --- images: sizes read from the header, pixel budgets ----------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header declares ``width`` x ``height`` pixels (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding any image fails the request with a 500: a refusal must come from the header alone."""
    from PIL import ImageFile

    def load(self: Any) -> Any:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("size", [(13000, 13000), (20000, 20000), (8193, 8192), (2**31 - 1, 2**31 - 1)])
def test_an_image_bomb_is_refused_from_its_header(server, no_decoding, size):
    data = png_declaring(*size)
    assert len(data) < 100
    message = error_of(ask(server, data_url(data)))
    assert "too large" in message and "downscale" in message


def test_the_per_request_pixel_budget(server, policy, no_decoding):
    policy(request_pixels=2000)  # two 40x32 images: 2560 pixels
    content = [{"type": "image_url", "image_url": {"url": data_url(png(i))}} for i in (1, 2)]
    r = httpx.post(
        f"{server.url}/chat/completions",
        timeout=HANG_S,
        json={"messages": [{"role": "user", "content": [*content, {"type": "text", "text": "hi"}]}], **FAST},
    )
    message = error_of(r)
    assert "2560 pixels" in message and "2000-pixel limit per request" in message


def test_images_decoding_at_once_are_bounded_server_wide_and_health_answers(server, policy, monkeypatch):
    """While one request's image is being decoded (held here), a second one that would take the server past
    its pixels in flight is a 429 at once, and /health answers."""
    import mlx_dgemma.prompt.multimodal as multimodal

    policy(request_pixels=1500, pixels_in_flight=2000)  # one 40x32 image (1280 pixels) at a time
    entered, release = threading.Event(), threading.Event()
    real = multimodal.process_images

    def held(*args: Any, **kwargs: Any) -> Any:
        assert not entered.is_set(), "a second request decoded past the budget"
        entered.set()
        assert release.wait(HANG_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(multimodal, "process_images", held)
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(ask(server, data_url(png(1)))))
    t.start()
    try:
        assert entered.wait(HANG_S)
        second = ask(server, data_url(png(2)))
        assert (
            second.status_code == 429 and "decoding other large images" in second.json()["error"]["message"]
        )
        assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=HANG_S).status_code == 200
    finally:
        release.set()
        t.join(HANG_S)
    assert first[0].status_code == 200, first[0].text


def test_the_server_wide_pixel_budget():
    budget = PixelBudget(100)
    with budget.reserve(60):
        with pytest.raises(APIError) as e, budget.reserve(60):
            pass
        assert e.value.status == 429
        with budget.reserve(40):
            assert budget.used == 100
    assert budget.used == 0
    with budget.reserve(500):  # alone, a request within its own budget always runs
        assert budget.used == 500
    assert budget.used == 0


# --- the command line and SIGINT -------------------------------------------------------------------------------


def test_sigint_stops_the_server_during_a_dripping_fetch(host):
    """Ctrl-C while a fetch drips (its deadline 10 minutes away) ends the server as SIGTERM does: the fetch is
    abandoned (its client told 503), and the process ends by the signal, without a traceback."""
    host.dripping.clear()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_dgemma.server",
            "--port",
            "0",
            "--allow-local-image-urls",
            "--image-fetch-timeout",
            "600",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url_box: list[str] = []
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            for line in proc.stderr:
                lines.append(line)
                if " on http://" in line:
                    url_box.append(line.split(" on ", 1)[1].strip())
                    found.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert found.wait(HANG_S), "".join(lines)

        class Srv:
            url = url_box[0]
            host, port = "127.0.0.1", int(url_box[0].rsplit(":", 1)[1].split("/")[0])

        client = _post_raw(Srv, f"{host.url}/drip")  # type: ignore[arg-type]
        assert host.dripping.wait(HANG_S)
        proc.send_signal(signal.SIGINT)
        proc.wait(HANG_S)
        client.settimeout(HANG_S)
        answer = client.recv(65536)
        client.close()
        reader.join(HANG_S)
        assert proc.returncode == -signal.SIGINT, "".join(lines)
        assert "Traceback" not in "".join(lines), "".join(lines)
        assert answer.startswith(b"HTTP/1.1 503") and b"shutting_down" in answer, answer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail("SIGINT did not stop the server")


def test_the_image_flags_reach_the_app(monkeypatch):
    import mlx_dgemma.server.cli as cli

    seen: dict[str, Any] = {}

    def fake_create_app(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise fetch.FetchError("stop here")  # not a DGemmaError: propagates out of main

    monkeypatch.setattr(cli, "create_app", fake_create_app)
    monkeypatch.setattr(cli, "bind", lambda host, port: None)
    with pytest.raises(fetch.FetchError):
        cli.main(["--allow-image-hosts", "images.lan,10.0.0.0/8", "--image-fetch-timeout", "3"])
    images = seen["images"]
    assert images.fetch.names == {"images.lan"} and images.fetch.timeout == 3 and not images.fetch.allow_local
    assert images.fetch.allows("images.lan", ipaddress.ip_address("192.168.0.1"))
    assert images.fetch.allows("x", ipaddress.ip_address("10.2.3.4"))
    assert not images.fetch.allows("x", ipaddress.ip_address("192.168.0.1"))
    with pytest.raises(fetch.FetchError):
        cli.main(["--no-image-urls", "--allow-local-image-urls"])
    assert seen["images"].fetch.allow_local and not seen["images"].fetch.enabled
