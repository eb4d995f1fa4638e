"""The OpenAI-compatible server, driven over loopback by the real ``openai`` client and raw HTTP (httpx).

Servers run in-process (uvicorn on a background thread, a free port) on the embedded default model, with
few denoising steps and small ``max_tokens``; one test starts the real command line in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from mlx_dgemma import Commit, generate, load
from mlx_dgemma.server import BackgroundServer, create_app, main
from mlx_dgemma.server.protocol import APIError, ChatRequest, schedule, seed_of
from mlx_dgemma.server.worker import StopScanner
from tests.conftest import DEMO24, HANG_S

FAST = {"max_denoising_steps": 3}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def reference():
    """The model and tokenizer in this process, to compute what the server should answer."""
    return load(DEMO24)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=HANG_S)


def base(server: BackgroundServer) -> str:
    return server.url.removesuffix("/v1")


def health(server: BackgroundServer) -> dict[str, Any]:
    return httpx.get(f"{base(server)}/health").json()


def chat(client: openai.OpenAI, messages=HELLO, *, seed: int = 0, max_tokens: int = 20, **kw: Any):
    extra = {**FAST, **kw.pop("extra_body", {})}
    return client.chat.completions.create(
        model="default", messages=messages, max_tokens=max_tokens, seed=seed, extra_body=extra, **kw
    )


def stream_chat(client: openai.OpenAI, messages=HELLO, **kw: Any) -> list[Any]:
    return list(chat(client, messages, stream=True, **kw))


def content_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


class HoldPoint(threading.Event):
    """Set when a generation reaches the hold point. ``wait`` fails at once, with the error's text, when a
    generation failed (or ended) before reaching it: a test never waits out its hang guard for a point that
    can no longer come."""

    def __init__(self) -> None:
        super().__init__()
        self.hit, self.failure = False, ""

    def reach(self) -> None:
        self.hit = True
        self.set()

    def fail(self, why: str) -> None:
        if not self.hit and not self.failure:
            self.failure = why
            self.set()  # wakes a waiting test, which raises

    def wait(self, timeout: float | None = None) -> bool:
        super().wait(timeout)
        if not self.hit and self.failure:
            raise AssertionError(f"the held generation never reached its hold point: {self.failure}")
        return self.hit


class Hold:
    """Holds the server's generation at a chosen point until the test releases it, so that tests about
    cancellation and saturation never race the machine's speed (a fast machine may finish the answer first).
    ``after_commits``: the number of canvases committed (and sent) before the hold. A generation that fails
    first (a ``Failed`` answer, an exception, or an end before the hold point) makes ``reached.wait`` raise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after_commits: int = 0):
        import mlx_dgemma.server.worker as worker_module

        self.reached, self.released = HoldPoint(), threading.Event()
        real, real_answer = worker_module.run_steps, worker_module.Worker._answer

        def held(*args: Any, **kwargs: Any):
            commits = 0
            try:
                for event in real(*args, **kwargs):
                    if commits >= after_commits:
                        self.wait()
                    yield event
                    commits += isinstance(event, Commit)
                self.wait()
            except Exception as e:
                self.reached.fail(f"{type(e).__name__}: {e}")
                raise
            finally:  # closed by the worker (the answer ended: max_tokens, a stop sequence) before the hold
                self.reached.fail(f"the generation ended after {commits} commits, before the hold point")

        def answer(
            worker: Any, job: Any, event: Any
        ) -> None:  # a job's last event: an error, before any hold
            if isinstance(event, worker_module.Failed):
                self.reached.fail(f"the request failed: {event.error.status} {event.error.message}")
            real_answer(worker, job, event)

        monkeypatch.setattr(worker_module, "run_steps", held)
        monkeypatch.setattr(worker_module.Worker, "_answer", answer)

    def wait(self) -> None:
        self.reached.reach()
        assert self.released.wait(HANG_S), "the test never released the held generation"

    def release(self) -> None:
        self.released.set()


def send_raw(server: BackgroundServer, body: dict[str, Any], path: str = "chat/completions") -> socket.socket:
    """POSTs ``body`` on a raw socket and returns it unread: the test closes it (the client leaving) when an
    event says the server has the request, never after a read timeout that a busy machine could outlast."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=HANG_S)
    sock.sendall(
        b"POST /v1/%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), server.host.encode(), server.port, len(data), data)
    )
    return sock


def wait_until_cancelled(server: BackgroundServer, hold: Hold) -> None:
    """Waits (bounded against a hang, not timed) for the held job to be cancelled, then lets it go on."""
    try:
        assert hold.reached.wait(HANG_S)
        jobs = list(server.app.state.worker.running)
        assert len(jobs) == 1 and jobs[0].cancelled.wait(HANG_S), (
            "the server did not notice the client leaving"
        )
    finally:
        hold.release()


def wait_while_running(server: BackgroundServer, before: dict[str, Any]) -> None:
    deadline = time.monotonic() + HANG_S  # a hang guard; the worker checks the flag at its next step
    while health(server)["running"] or health(server)["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the cancelled request still holds the worker"
        time.sleep(0.02)


# --- models, health, CLI -------------------------------------------------------------------------------------


def test_models_reports_the_native_context(server, reference):
    model, _ = reference
    card = httpx.get(f"{server.url}/models").json()["data"][0]
    native = model.args.max_position_embeddings
    assert card["id"] == DEMO24.name  # a folder's name (the embedded default's is "default")
    assert card["context_length"] == card["max_model_len"] == native
    assert health(server)["status"] == "ok"


def test_lowered_context_length_is_reported_and_enforced(reference):
    _, tokenizer = reference
    with BackgroundServer(create_app(str(DEMO24), context_length=300)) as srv:
        card = httpx.get(f"{srv.url}/models").json()["data"][0]
        assert card["context_length"] == card["max_model_len"] == 300
        prompt = "count " * 400
        n = len(tokenizer.encode(prompt))
        r = httpx.post(f"{srv.url}/completions", json={"prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert str(n) in message and "300" in message


def test_command_line_serves_on_loopback():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_dgemma.server", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = (
            time.monotonic() + HANG_S
        )  # a bound against a hang, not a speed test: a loaded machine is slow
        while True:
            try:
                card = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()  # reading the output of a live server would block for ever
                    pytest.fail(f"the server did not come up: {proc.communicate()[0].decode()}")
                time.sleep(0.2)
        assert card["id"] == "default" and card["context_length"] > 0
    finally:
        proc.terminate()
        proc.wait(HANG_S)


def test_command_line_rejects_a_context_beyond_the_native_window(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--context-length", "99999999"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "99999999" in err and "native window" in err


# --- answers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 45])
def test_chat_matches_the_library_and_max_tokens_is_exact(client, reference, max_tokens):
    model, tokenizer = reference
    r = chat(client, seed=5, max_tokens=max_tokens)
    expected = generate(model, tokenizer, HELLO, max_tokens=max_tokens, seed=5, **FAST)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    u = r.usage
    assert u.completion_tokens <= max_tokens
    assert (r.choices[0].finish_reason == "length") == (u.completion_tokens == max_tokens)
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_sends_each_canvas_as_it_is_committed(client, reference, monkeypatch):
    model, _ = reference
    max_tokens = 3 * model.args.canvas_length
    record = [
        {
            "role": "user",
            "content": "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi.",
        }
    ]  # the demo model's task: an answer that spans two canvases
    plain = chat(client, record, seed=2, max_tokens=max_tokens)
    hold = Hold(monkeypatch, after_commits=1)  # held after the first canvas is committed, before the second
    chunks: list[Any] = []
    errors: list[BaseException] = []
    first_text, done = threading.Event(), threading.Event()

    def read() -> None:
        try:
            for chunk in chat(
                client,
                record,
                seed=2,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            ):
                chunks.append(chunk)
                if chunk.choices and chunk.choices[0].delta.content:
                    first_text.set()
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()
            first_text.set()  # wakes the test at once if the stream ended (or failed) before any text

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert hold.reached.wait(HANG_S), "the generation did not commit its first canvas"
        # Sent as committed, not replayed at the end: the first canvas arrives while the second is not made.
        assert first_text.wait(HANG_S), "the first canvas was not sent while the generation was held"
        assert not done.is_set(), f"the stream ended while the generation was held: {errors or chunks}"
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) == 1, chunks
    finally:
        hold.release()
        reader.join(HANG_S)
    assert not reader.is_alive() and not errors, errors
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content]
    canvases = plain.model_extra["diffusion"]["canvases"]
    assert len(texts) == canvases >= 2  # one chunk per committed canvas: the second came after the release
    assert content_of(chunks) == plain.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("option, key", [("include_previews", "preview"), ("include_drafts", "draft")])
def test_previews_extension_sends_every_step(client, option, key):
    """``include_previews``; ``include_drafts``, its old name, keeps the old chunk key."""
    chunks = stream_chat(client, seed=1, max_tokens=20, stream_options={option: True})
    drafts = [c.model_extra[key] for c in chunks if key in (c.model_extra or {})]
    stats = next(c.model_extra["diffusion"] for c in chunks if c.choices and c.choices[0].finish_reason)
    assert len(drafts) == stats["decoder_passes"] >= 1
    assert all(isinstance(d["text"], str) and d["canvas"] == 0 for d in drafts)
    assert [d["step"] for d in drafts] == list(range(FAST["max_denoising_steps"], 0, -1))[: len(drafts)]


def test_completions_stream_and_not(client, reference):
    model, tokenizer = reference
    kw = {"model": "default", "prompt": "Once upon a time", "max_tokens": 40, "seed": 3, "extra_body": FAST}
    r = client.completions.create(**kw)
    expected = generate(
        model, tokenizer, "Once upon a time", max_tokens=40, seed=3, use_chat_template=False, **FAST
    )
    assert r.choices[0].text == expected and r.object == "text_completion"
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_sequence_across_canvases_is_not_returned(client, reference):
    model, _ = reference
    max_tokens = 3 * model.args.canvas_length
    full = chat(client, seed=7, max_tokens=max_tokens)
    parts = [
        c.choices[0].delta.content
        for c in stream_chat(client, seed=7, max_tokens=max_tokens)
        if c.choices and c.choices[0].delta.content
    ]
    text, cut = "".join(parts), len(parts[0])
    assert text == full.choices[0].message.content
    # A 5-character stop sequence that first occurs across the end of the first canvas.
    stop = next(
        text[cut - k : cut - k + 5] for k in (2, 1, 3, 4) if text.find(text[cut - k : cut - k + 5]) == cut - k
    )
    expected = text[: text.find(stop)]
    r = chat(client, seed=7, max_tokens=max_tokens, stop=[stop, "never-there"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens
    chunks = stream_chat(client, seed=7, max_tokens=max_tokens, stop=stop)
    assert content_of(chunks) == expected and stop not in content_of(chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]


def test_stop_scanner_holds_back_a_possible_start():
    s = StopScanner(["END"])
    assert s.feed("abcE") == "ab"  # the last len("END") - 1 characters could begin "END"
    assert s.feed("Nx") == "cE"
    assert s.feed("yEND tail") == "Nxy" and s.stop_end == len("abcENxyEND")
    assert s.flush() == ""
    s = StopScanner([])
    assert s.feed("abc") == "abc" and s.flush() == ""


def test_temperature_maps_onto_the_schedule(reference):
    model, _ = reference
    one = ChatRequest(messages=HELLO, temperature=1.0)
    assert schedule(one, model) == {"t_max": 1.0, "t_min": 0.5}
    zero = ChatRequest(messages=HELLO, temperature=0)
    assert schedule(zero, model) == {"t_max": 0.01, "t_min": 0.005} and seed_of(zero) == 0
    with pytest.raises(APIError, match="temperature"):
        schedule(ChatRequest(messages=HELLO, temperature=1.0, t_max=0.9), model)


def test_temperature_zero_is_reproducible(client):
    a = client.chat.completions.create(
        model="default", messages=HELLO, max_tokens=12, temperature=0, extra_body=FAST
    )
    b = client.chat.completions.create(
        model="default", messages=HELLO, max_tokens=12, temperature=0, extra_body=FAST
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_system_prompt_and_thinking_reach_the_template(client):
    plain = chat(client, max_tokens=1).usage.prompt_tokens
    system = chat(
        client, [{"role": "system", "content": "Be terse."}, *HELLO], max_tokens=1
    ).usage.prompt_tokens
    thinking = chat(client, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert system > plain and thinking.usage.prompt_tokens != plain


# --- concurrency, disconnects, failures ----------------------------------------------------------------------


def test_concurrent_requests_are_all_served_correctly(client):
    seeds = [11, 12, 13, 14]
    expected = {s: chat(client, seed=s, max_tokens=40).choices[0].message.content for s in seeds}
    results: dict[int, str] = {}

    def one(seed: int) -> None:
        if seed % 2:
            results[seed] = content_of(stream_chat(client, seed=seed, max_tokens=40))
        else:
            results[seed] = chat(client, seed=seed, max_tokens=40).choices[0].message.content

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert results == expected


def test_disconnect_mid_stream_frees_the_slot(server, client, monkeypatch):
    hold = Hold(monkeypatch, after_commits=1)
    before = health(server)
    stream = chat(client, seed=1, max_tokens=40, stream=True, extra_body={"max_denoising_steps": 8})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the first canvas is committed; the generation is held before the next
    stream.close()
    wait_until_cancelled(server, hold)
    wait_while_running(server, before)
    monkeypatch.undo()
    r = chat(client, seed=2, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["served"] == before["served"] + 1


def test_a_client_gone_before_a_plain_answer_is_cancelled(server, monkeypatch):
    hold = Hold(monkeypatch)
    before = health(server)
    body = {"messages": HELLO, "max_tokens": 40, "max_denoising_steps": 8}
    client = send_raw(server, body)  # no read timeout to race: the test closes it when the server has the job
    try:
        assert hold.reached.wait(HANG_S), "the server did not start the request"  # held: no answer can come
    finally:
        client.close()  # the client leaves
    wait_until_cancelled(server, hold)
    wait_while_running(server, before)
    after = health(server)
    assert after["served"] == before["served"] and after["queued"] == 0


def test_busy_server_answers_429(monkeypatch):
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=1)) as srv:
        hold = Hold(monkeypatch)
        c = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        stream = c.chat.completions.create(
            model="default", messages=HELLO, stream=True, max_tokens=40, extra_body=FAST
        )
        next(iter(stream))  # the one slot is taken ...
        assert hold.reached.wait(HANG_S), "the server did not start the request"  # ... and held
        with pytest.raises(openai.RateLimitError, match="max-concurrency 1"):
            c.chat.completions.create(model="default", messages=HELLO, max_tokens=4)
        before = httpx.get(f"{base(srv)}/health").json()
        stream.close()
        wait_until_cancelled(srv, hold)
        wait_while_running(srv, before)
        monkeypatch.undo()
        assert c.chat.completions.create(model="default", messages=HELLO, max_tokens=4, extra_body=FAST).usage


def test_a_failing_request_does_not_take_the_server_down(server, client, monkeypatch):
    import mlx_dgemma.server.worker as worker

    real = worker.run_steps

    def failing(model: Any, tokenizer: Any, request: Any):
        if request.seed == 666:
            raise RuntimeError("boom")
        return real(model, tokenizer, request)

    monkeypatch.setattr(worker, "run_steps", failing)
    with pytest.raises(openai.InternalServerError, match="boom"):
        chat(client, seed=666)
    body = {"messages": HELLO, "stream": True, "seed": 666, "max_tokens": 4}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body) as r:
        chunks = [line for line in r.iter_lines() if line]
    errors = [json.loads(line[6:]) for line in chunks if line.startswith('data: {"error"')]
    assert errors and "boom" in errors[0]["error"]["message"] and chunks[-1] == "data: [DONE]"
    assert chat(client, seed=1).choices[0].message.content is not None
    assert health(server)["failed"] >= 2


def test_a_hold_fails_at_once_when_the_generation_fails(server, monkeypatch):
    """A test waiting for a held point raises with the error's text when the generation fails first, instead
    of waiting out its hang guard."""
    import mlx_dgemma.server.worker as worker

    def failing(*args: Any, **kwargs: Any):
        raise RuntimeError("boom before the hold")
        yield  # a generator, like run

    monkeypatch.setattr(worker, "run_steps", failing)
    hold = Hold(monkeypatch)
    answers: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{server.url}/chat/completions", json={"messages": HELLO, "max_tokens": 4, **FAST})
        )
    )
    t.start()
    try:
        with pytest.raises(AssertionError, match="boom before the hold"):
            hold.reached.wait(HANG_S)
    finally:
        hold.release()
        t.join(HANG_S)
    assert answers[0].status_code == 500 and "boom before the hold" in answers[0].text


# --- client errors -------------------------------------------------------------------------------------------


def test_malformed_json_is_400(server):
    r = httpx.post(
        f"{server.url}/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert "JSON" in error["message"] and error["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/chat/completions", json={"max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_oversize_prompt_is_400_with_both_numbers(client, reference):
    model, tokenizer = reference
    window = model.args.max_position_embeddings
    prompt = "word " * window
    n = len(tokenizer.encode(prompt))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt=prompt, max_tokens=4)
    assert str(n) in e.value.message and str(window) in e.value.message
    with pytest.raises(openai.BadRequestError, match=f"max_tokens={window}") as e:
        chat(client, max_tokens=window)
    assert e.value.body["param"] == "max_tokens"
    assert (
        e.value.body["code"] == "context_length_exceeded" and e.value.body["type"] == "invalid_request_error"
    )


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=HELLO, max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and "gpt-5" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="google/gpt-5", messages=HELLO, max_tokens=4)


def test_publisher_prefixed_model_ids_are_accepted(client):
    r = client.chat.completions.create(
        model="lmstudio-community/default", messages=HELLO, max_tokens=2, extra_body=FAST
    )
    assert r.usage.completion_tokens <= 2


@pytest.mark.parametrize(
    "field,value",
    [
        ("logprobs", True),
        ("n", 2),
        ("echo", True),
        ("logit_bias", {"5": 10}),
        ("response_format", {"type": "xml"}),
        ("tool_choice", "required"),
    ],
)
def test_unsupported_field_is_400_naming_it(server, field, value):
    r = httpx.post(f"{server.url}/chat/completions", json={"messages": HELLO, "max_tokens": 4, field: value})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]


SAMPLING = {"top_p": 0.5, "top_k": 5, "presence_penalty": 0.5, "frequency_penalty": 1.0, "min_p": 0.1}


def test_autoregressive_sampling_fields_are_ignored_and_named(server, client, monkeypatch):
    r = httpx.post(
        f"{server.url}/chat/completions",
        json={"messages": HELLO, "max_tokens": 4, "seed": 3, **FAST, **SAMPLING},
    )
    assert r.status_code == 200 and r.headers["X-Ignored-Fields"] == ", ".join(SAMPLING)
    plain = chat(client, seed=3, max_tokens=4)
    assert r.json()["choices"][0]["message"]["content"] == plain.choices[0].message.content
    # A client that sends top_p by default (the openai client passes what it is given).
    assert (
        chat(client, seed=3, max_tokens=4, top_p=0.9).choices[0].message.content
        == plain.choices[0].message.content
    )
    monkeypatch.setattr(server.app.state.limits, "strict", True)  # --strict: today's 400s
    for field, value in SAMPLING.items():
        r = httpx.post(
            f"{server.url}/chat/completions", json={"messages": HELLO, "max_tokens": 4, field: value}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    neutral = {
        "top_p": 1,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "response_format": {"type": "text"},
        "user": "me",
        "max_denoising_steps": 2,
    }
    r = httpx.post(f"{server.url}/chat/completions", json={"messages": HELLO, "max_tokens": 4, **neutral})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


# --- prompt cache and agents ---------------------------------------------------------------------------------


def test_prompt_cache_is_reused_across_turns_with_the_same_output(client):
    turn1 = chat(client, seed=1, max_tokens=10)
    messages = [
        *HELLO,
        {"role": "assistant", "content": turn1.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    reused = chat(client, messages, seed=4, max_tokens=30)
    cached = reused.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < reused.usage.prompt_tokens
    # Another conversation in between (another client of a shared server) does not evict this one's caches.
    chat(client, [{"role": "user", "content": "Something else entirely"}], max_tokens=2)
    again = chat(client, messages, seed=4, max_tokens=30)
    assert again.usage.prompt_tokens_details.cached_tokens >= cached
    assert again.choices[0].message.content == reused.choices[0].message.content


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]


def test_tools_need_a_template_that_takes_them(server):
    r = httpx.post(
        f"{server.url}/chat/completions", json={"messages": HELLO, "max_tokens": 4, "tools": TOOLS}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_agent_finds_a_64k_context_and_chats_in_turns(tmp_path):
    """A model whose config says 131072 positions, and whose template renders tool definitions."""
    folder = tmp_path / "long-context"
    shutil.copytree(DEMO24, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 131072
    (folder / "config.json").write_text(json.dumps(config))
    template = (folder / "chat_template.jinja").read_text()
    tools = "{%- if tools -%}{{- '<tools>' + (tools | tojson) + '</tools>' -}}{%- endif -%}"
    (folder / "chat_template.jinja").write_text(
        template.replace("{{- bos_token -}}", "{{- bos_token -}}" + tools, 1)
    )
    with BackgroundServer(create_app(str(folder))) as srv:
        models = httpx.get(f"{srv.url}/models").json()["data"]
        model = models[0]["id"]
        assert (
            model == "long-context" and models[0]["context_length"] >= 65536
        )  # the agent would refuse below
        agent = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent."}]
        prompt_tokens = []
        for turn, ask in enumerate(["List the files.", "Now open the first one."]):
            messages.append({"role": "user", "content": ask})
            chunks = list(
                agent.chat.completions.create(
                    model=model,
                    messages=messages,
                    stream=True,
                    max_tokens=24,
                    stream_options={"include_usage": True},
                    tools=TOOLS,
                    extra_body={**FAST, "seed": turn},
                )
            )
            prompt_tokens.append(chunks[-1].usage.prompt_tokens)
            answer = content_of(chunks)
            assert chunks[-2].choices[0].finish_reason in ("stop", "length")  # the demo model may answer ""
            assert (chunks[-1].usage.prompt_tokens_details.cached_tokens > 0) == (turn > 0)
            messages.append({"role": "assistant", "content": answer})
        without_tools = agent.chat.completions.create(
            model=model, messages=messages[:2], max_tokens=1, extra_body=FAST
        )
        assert (
            without_tools.usage.prompt_tokens < prompt_tokens[0]
        )  # the tool definitions reached the template


def test_bad_adapter_path_is_a_one_line_startup_error(tmp_path):
    from mlx_dgemma import DGemmaError

    with pytest.raises(DGemmaError) as info:
        create_app(str(DEMO24), adapter_path=tmp_path / "missing")
    assert "no adapters" in str(info.value) and "\n" not in str(info.value)
