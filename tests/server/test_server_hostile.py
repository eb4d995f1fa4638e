"""The server against hostile and heavy clients (issue 16): body limits, off-loop CPU work, bounded requests,
slow connections, slots freed on time, 400s instead of 500s, startup errors before loading, and shutdown.

Every test that needs a request held mid-generation holds it with ``Hold`` (an event), never a race.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from test_server import FAST, HELLO, Hold, base, health, send_raw

import mlx_dgemma.server.worker as worker_module
from mlx_dgemma.server import BackgroundServer, create_app, main
from mlx_dgemma.server.net import FloodLog
from tests.conftest import DEMO24, HANG_S


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=2, max_body_bytes=64 * 1024)) as srv:
        yield srv


def post(srv: BackgroundServer, body: Any, path: str = "chat/completions", **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{srv.url}/{path}", content=content, headers={"content-type": "application/json"}, timeout=600, **kw
    )


def wait_for(condition: Any, what: str, bound_s: float = HANG_S) -> None:
    """Polls ``condition`` until true; the bound only guards against a hang (it is not a timing assumption)."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# --- bodies ------------------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(server):
    prompt = "word " * 20000  # 100 kB > the 64 kB limit
    r = post(server, {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4})
    assert r.status_code == 413
    error = r.json()["error"]
    assert "max-body-bytes" in error["message"] and str(64 * 1024) in error["message"]
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is applied while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(
        f"{server.url}/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=600,
    )
    assert r.status_code == 413


def test_health_answers_while_a_prompt_is_tokenized(server, monkeypatch):
    """The CPU work of a request (JSON, template, tokenizer) runs off the event loop: hold the tokenizer and
    /health still answers."""
    import mlx_dgemma.server.app as app_module

    entered, release = threading.Event(), threading.Event()
    real = app_module.plan

    def slow_plan(*args: Any, **kwargs: Any):
        entered.set()
        assert release.wait(600)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "plan", slow_plan)
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(r=post(server, {"messages": HELLO, "max_tokens": 2, **FAST}))
    )
    t.start()
    try:
        assert entered.wait(600)
        r = httpx.get(
            f"{base(server)}/health", timeout=300
        )  # would time out with the loop blocked (held 600 s)
        assert r.status_code == 200
    finally:
        release.set()
        t.join(600)
    assert result["r"].status_code == 200


def test_a_body_that_never_finishes_is_408(server, monkeypatch):
    monkeypatch.setattr(server.app.state.limits, "body_timeout_s", 0.5)
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"messages": '
        )  # and then nothing more
        s.settimeout(600)
        answer = b""
        while b"did not arrive" not in answer and (part := s.recv(4096)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', "messages.0.content"),
        (b'{"model": "\\udfff", "messages": []}', "model"),
        (b"[" * 30000 + b"]" * 30000, None),
        (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", None),
    ],
    ids=["surrogate", "surrogate-model", "deep", "big-integer"],
)
def test_hostile_json_is_400_not_500(server, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


# --- bounded requests ---------------------------------------------------------------------------------------


def test_denoising_steps_are_bounded_by_the_model(server):
    from mlx_dgemma.server.protocol import max_steps

    limit = max_steps(server.app.state.served.model)
    r = post(server, {"messages": HELLO, "max_tokens": 2, "max_denoising_steps": 10**9})
    assert r.status_code == 400 and f"at most {limit}" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "max_denoising_steps"


@pytest.mark.parametrize("field", ["t_max", "t_min", "entropy_bound"])
def test_a_value_infinite_in_float32_is_400(server, field):
    r = post(server, {"messages": HELLO, "max_tokens": 2, field: 1e39})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_request_timeout_cuts_the_answer_with_a_reason(monkeypatch):
    ticks = iter(range(10**6))
    monkeypatch.setattr(worker_module, "_clock", lambda: float(next(ticks)))  # one "second" per look
    with BackgroundServer(create_app(str(DEMO24), request_timeout=2.5)) as srv:
        body = {"messages": HELLO, "max_tokens": 40, "max_denoising_steps": 8, "seed": 1}
        r = post(srv, body)
        assert r.status_code == 200
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert (
            out["error"]["code"] == "request_timeout" and "--request-timeout 2.5" in out["error"]["message"]
        )
        assert out["diffusion"]["decoder_passes"] < 8  # cut after a few steps
        with httpx.stream("POST", f"{srv.url}/chat/completions", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        last = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]][-1]
        assert last["choices"][0]["finish_reason"] == "length" and last["error"]["code"] == "request_timeout"


def test_shutdown_stops_the_running_request_at_its_next_step(monkeypatch):
    srv = BackgroundServer(create_app(str(DEMO24))).start()
    hold = Hold(monkeypatch)
    lines: list[str] = []

    def stream() -> None:
        body = {"messages": HELLO, "max_tokens": 200, "max_denoising_steps": 40, "stream": True, "seed": 1}
        with httpx.stream("POST", f"{srv.url}/chat/completions", json=body, timeout=600) as r:
            lines.extend(line for line in r.iter_lines() if line)

    t = threading.Thread(target=stream)
    t.start()
    assert hold.reached.wait(600)
    srv.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    hold.release()  # the worker goes on to its next step, and must stop there
    t.join(600)
    srv.thread.join(600)
    assert not srv.thread.is_alive()
    errors = [json.loads(line[6:])["error"] for line in lines if line.startswith('data: {"error"')]
    assert errors and errors[0]["code"] == "shutting_down"
    assert srv.app.state.worker.counters["cancelled"] == 1
    srv.socket.close()


# --- connections --------------------------------------------------------------------------------------------


def test_idle_connections_are_capped_and_timed_out():
    with BackgroundServer(create_app(str(DEMO24)), max_connections=4, header_timeout=HANG_S) as srv:
        # The cap, under a header time no busy machine outlasts: the four idle connections are all still open
        # when the fifth arrives (with a short one, a slow machine could time them out first).
        idle = [socket.create_connection((srv.host, srv.port)) for _ in range(4)]
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished: a slowloris
        extra = socket.create_connection((srv.host, srv.port))
        extra.settimeout(HANG_S)
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer
        for s in [*idle, extra]:
            s.close()
        connections = srv.server.server_state.connections
        wait_for(lambda: not connections, "the server still counts the closed connections")
        # The header time, now short (it only has to pass; a slow machine makes it pass later, not never).
        srv.server.config.http_protocol_class.header_timeout = 0.5
        idle = [socket.create_connection((srv.host, srv.port)) for _ in range(4)]
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for s in idle:  # each is closed by the server once its header time is up
            s.settimeout(HANG_S)
            assert s.recv(4096) == b""
            s.close()
        assert httpx.get(f"{base(srv)}/health").status_code == 200


def test_an_accept_flood_is_logged_once_without_a_traceback(caplog):
    handler = FloodLog()
    loop = type("Loop", (), {"default_exception_handler": lambda self, ctx: pytest.fail("not handled")})()
    with caplog.at_level(logging.ERROR, logger="mlx_dgemma.server"):
        for _ in range(500):
            handler(
                loop,
                {
                    "message": "socket.accept() out of system resource",  # type: ignore[arg-type]
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                },
            )
    records = [r for r in caplog.records if "file descriptors" in r.message]
    assert len(records) == 1 and records[0].exc_info is None


# --- slots ----------------------------------------------------------------------------------------------------


def test_a_queued_client_that_leaves_frees_its_slot(server, monkeypatch):
    hold = Hold(monkeypatch)
    first = httpx.Client(timeout=600)
    body = {"messages": HELLO, "max_tokens": 20, "stream": True, **FAST}
    with first.stream("POST", f"{server.url}/chat/completions", json=body) as running:
        # Kept for the whole block: a dropped line iterator is closed when it is collected, and closing it closes
        # the connection (httpcore), so the running client would leave by itself, racing the hold.
        lines = running.iter_lines()
        first_line = next(lines)  # the one running request, held
        assert hold.reached.wait(600), first_line
        # Queued behind it (the server says so), then gone: closed on that event, not after a read timeout.
        gone = send_raw(server, {"messages": HELLO, "max_tokens": 2})
        try:
            wait_for(lambda: health(server)["queued"] == 1, "the second request was not queued")
        finally:
            gone.close()
        wait_for(lambda: health(server)["queued"] == 0, "the queued client that left still holds its slot")
        queued: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: queued.update(r=post(server, {"messages": HELLO, "max_tokens": 2, **FAST}))
        )
        t.start()
        wait_for(lambda: health(server)["queued"] == 1, "the next request was not queued")
        hold.release()
    t.join(600)
    first.close()
    assert queued["r"].status_code == 200


def test_a_finished_request_frees_its_slot_before_its_answer(monkeypatch):
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=1)) as srv:
        worker = srv.app.state.worker
        after, release = threading.Event(), threading.Event()
        real = worker.prompt_cache.keep

        def slow_keep(
            entries: Any, keys: Any = None
        ) -> None:  # the worker's bookkeeping after an answer was sent
            real(entries, keys)
            if entries:
                after.set()
                assert release.wait(600)

        monkeypatch.setattr(worker.prompt_cache, "keep", slow_keep)
        try:
            r = post(srv, {"messages": HELLO, "max_tokens": 2, **FAST})
            assert r.status_code == 200 and after.wait(600)  # the worker is now held in its bookkeeping
            nxt: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: nxt.update(r=post(srv, {"messages": HELLO, "max_tokens": 2, **FAST}))
            )
            t.start()
            wait_for(
                lambda: "r" in nxt or worker.queued == 1, "the next request was neither queued nor answered"
            )
        finally:
            release.set()
        t.join(600)
        assert nxt["r"].status_code == 200, nxt["r"].text  # not a 429


# --- command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--port", "70000"], ["70000", "not a TCP port"]),
        (["--context-length", "0"], ["context length", "(got 0)"]),
        (["--max-body-bytes", "10"], ["max_body_bytes"]),
        (["--top-p", "0.9"], ["--top-p", "entropy_bound"]),
        (["--kv-bits", "4"], ["--kv-bits", "quantized model"]),
        (["--draft-model", "x"], ["--drafter"]),
        (["--max-conc", "4"], ["unrecognized", "--max-conc"]),  # no abbreviations of --max-concurrency
    ],
)
def test_command_line_errors_are_one_line_and_before_loading(monkeypatch, capsys, argv, words):
    import mlx_dgemma.server.cli as cli

    monkeypatch.setattr(cli, "create_app", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and all(w in err[0] for w in words), err


def test_command_line_names(monkeypatch, capsys):
    import mlx_dgemma.server.cli as cli

    seen: dict[str, Any] = {}

    def fake_create_app(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise cli.DGemmaError("stop here")

    monkeypatch.setattr(cli, "create_app", fake_create_app)
    with pytest.raises(SystemExit):
        main(
            [
                "--temp",
                "0.6",
                "--trust-remote-code",
                "--log-level",
                "INFO",
                "--allowed-origins",
                "*",
                "--strict",
                "--port",
                "0",
            ]
        )
    err = capsys.readouterr().err
    assert seen["default_temperature"] == 0.6 and seen["allowed_origins"] == ["*"] and seen["strict"]
    assert "--trust-remote-code is ignored" in err


def test_a_port_in_use_is_a_one_line_error(monkeypatch, capsys):
    import mlx_dgemma.server.cli as cli

    monkeypatch.setattr(cli, "create_app", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            main(["--port", str(taken.getsockname()[1])])
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_bad_adapter_path_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma.server", "--adapter-path", str(tmp_path / "none"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    why = f"exit code {proc.returncode}, stderr: {proc.stderr!r}"  # one failure in ~40 fresh-clone runs: say all
    assert proc.returncode == 2, why
    assert proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr, why


def test_worker_joins_its_thread_on_a_load_error(tmp_path):
    """The worker thread has ended before a loading error reaches the caller: an interpreter that exits while
    the thread still tears down its MLX state aborts (rc 134, 1 run in 11). The thread is made to linger
    after reporting the error; ``start`` must wait for it."""

    class Lingering(threading.Event):
        def set(self) -> None:
            super().set()
            if threading.current_thread().name == "mlx_dgemma-worker":
                time.sleep(1)  # still tearing down (a bound, not a race: the assertion waits for nothing)

    w = worker_module.Worker(None, adapter_path=tmp_path / "none")
    w._ready = Lingering()
    with pytest.raises(Exception, match="adapters"):
        w.start()
    assert not w._thread.is_alive()


# --- CORS -----------------------------------------------------------------------------------------------------


def test_cors_preflight_is_answered():
    with BackgroundServer(create_app(str(DEMO24), allowed_origins=["http://localhost:3000"])) as srv:
        r = httpx.options(
            f"{srv.url}/chat/completions",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.post(
            f"{srv.url}/chat/completions",
            json={"messages": HELLO, "max_tokens": 2, "top_p": 0.5, **FAST},
            headers={"Origin": "http://localhost:3000"},
            timeout=600,
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "x-ignored-fields" in r.headers["access-control-expose-headers"].lower()
        r = httpx.options(
            f"{srv.url}/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers


def test_server_default_temperature_maps_like_a_requests(server):
    """--temp T: requests that set neither temperature nor t_max/t_min are served as temperature T."""
    from mlx_dgemma.server.app import _Limits, _prepare

    served, limits = server.app.state.served, _Limits(1 << 20, False, temperature=0.6)
    plain = _prepare("chat", json.dumps({"messages": HELLO}).encode(), served, limits)[0]
    assert plain.sampler == {"t_max": 0.6, "t_min": 0.3}
    own = _prepare("chat", json.dumps({"messages": HELLO, "t_max": 0.9}).encode(), served, limits)[0]
    assert own.sampler == {"t_max": 0.9}


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(server):
    from mlx_dgemma.server.protocol import max_token_chars

    tokenizer = server.app.state.served.tokenizer
    chars = server.app.state.served.context_length * max_token_chars(tokenizer) + 1
    r = post(server, {"messages": [{"role": "user", "content": "x" * chars}]})
    error = r.json()["error"]
    assert (
        r.status_code == 400 and error["code"] == "context_length_exceeded" and "at least" in error["message"]
    )


def test_the_fast_tokenizer_path_gives_the_same_ids(server):
    from mlx_dgemma.server.protocol import encode

    tokenizer = server.app.state.served.tokenizer
    text = "<start_of_turn>user\nHéllo wörld 你好 \n\n   code(x)  🙂<end_of_turn>\n" * 50
    assert encode(tokenizer, text, False, None, "messages") == list(
        tokenizer.encode(text, add_special_tokens=False)
    )
    assert encode(tokenizer, "Once upon", True, None, "prompt") == list(tokenizer.encode("Once upon"))
