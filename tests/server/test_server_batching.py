"""The server decodes concurrent requests together (``--decode-concurrency``): one pass for all, answers unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest

from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.server import BackgroundServer, create_app
from tests.conftest import DEMO24, HANG_S

PROMPTS = ["Hello there", "Fill the record: Meet Ana, 29, a nurse in Lima.", "Tell me about Oslo", "Hi"]


def ask(url: str, content: str, seed: int, stream: bool = False) -> str:
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 48,
        "seed": seed,
        "stream": stream,
        "max_denoising_steps": 4,
    }
    if not stream:
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=HANG_S)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text = ""
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=HANG_S) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
    return text


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """The number of requests each decoder pass of the server carried."""
    seen: list[int] = []
    real = Model.denoise_rows

    def spy(self: Model, rows: Any) -> Any:
        seen.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(Model, "denoise_rows", spy)
    return seen


def concurrently(url: str) -> dict[int, str]:
    gate = threading.Barrier(len(PROMPTS))
    out: dict[int, str] = {}

    def one(i: int) -> None:
        gate.wait(HANG_S)
        out[i] = ask(url, PROMPTS[i], seed=i, stream=bool(i % 2))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    return out


def test_concurrent_requests_share_passes_and_answer_as_alone(passes):
    with BackgroundServer(create_app(str(DEMO24), decode_concurrency=1)) as srv:
        alone = {i: ask(srv.url, p, seed=i) for i, p in enumerate(PROMPTS)}
        assert httpx.get(srv.url.removesuffix("/v1") + "/health").json()["decode_concurrency"] == 1
    assert max(passes) == 1
    passes.clear()
    with BackgroundServer(create_app(str(DEMO24), decode_concurrency=4)) as srv:
        # Several rounds: requests arriving together are decoded together at least once.
        for _ in range(3):
            assert concurrently(srv.url) == alone
            if max(passes) > 1:
                break
        health = httpx.get(srv.url.removesuffix("/v1") + "/health").json()
    assert max(passes) > 1, "no decoder pass carried more than one request"
    assert max(passes) <= 4 and health["running"] == 0 and health["failed"] == 0


@pytest.mark.parametrize("name", ["decode_concurrency", "prompt_concurrency"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_concurrency_is_one_line(name, value):
    with pytest.raises(DGemmaError, match=name) as info:
        create_app(str(DEMO24), **{name: value})
    assert "\n" not in str(info.value)


def test_the_command_line_refuses_a_bad_decode_concurrency():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma", "server", "--decode-concurrency", "0", "--model", str(DEMO24)],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert r.returncode != 0 and "decode_concurrency must be" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_two_conversations_keep_their_prompt_caches_and_answer_as_without_them():
    """Interleaved conversations (clients sharing a server) each reuse their own encoder cache, and every
    answer is the one a server without a prompt cache gives."""
    turns = {c: [{"role": "user", "content": PROMPTS[c]}] for c in (0, 1)}

    def talk(url: str) -> tuple[list[str], list[int]]:
        answers, cached = [], []
        convo = {c: list(m) for c, m in turns.items()}
        for turn in range(2):
            for c in (0, 1):  # interleaved
                body = {"messages": convo[c], "max_tokens": 24, "seed": c, "max_denoising_steps": 4}
                r = httpx.post(f"{url}/chat/completions", json=body, timeout=HANG_S).json()
                text = r["choices"][0]["message"]["content"]
                answers.append(text)
                cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
                convo[c] += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"And {turn}?"},
                ]
        return answers, cached

    with BackgroundServer(create_app(str(DEMO24), prompt_cache=False)) as srv:
        plain, none = talk(srv.url)
    with BackgroundServer(create_app(str(DEMO24))) as srv:
        answers, cached = talk(srv.url)
    assert answers == plain and not any(none)
    assert cached[2] > 0 and cached[3] > 0  # each conversation's second turn reused its first


EIGHT = [*PROMPTS, "Write a haiku", "Name three rivers", "What is 2 + 2?", "Fill: Bo, 41, a cook in Rome."]
CUT, GONE = 5, 6  # the client whose answer the request timeout cuts, the one that hangs up after a chunk


def stream_chunks(url: str, content: str, seed: int, hang_up: bool = False) -> list[dict]:
    """A streaming client's chunks (all of them, or the first one only when it ``hang_up``s)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 48, "seed": seed}
    chunks = []
    with httpx.stream(
        "POST",
        f"{url}/chat/completions",
        json={**body, "stream": True, "max_denoising_steps": 4},
        timeout=HANG_S,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if hang_up:
                    break
    return chunks


def test_eight_streaming_clients_one_cut_one_gone_the_others_as_alone(passes, monkeypatch):
    """Eight clients stream at once through one batch; the request timeout cuts one of them after its first
    canvas and another hangs up after its first chunk: every other answer is its solo answer."""
    from mlx_dgemma.server import worker as worker_module

    with BackgroundServer(create_app(str(DEMO24), decode_concurrency=1)) as srv:
        alone = {i: ask(srv.url, p, seed=i) for i, p in enumerate(EIGHT)}
    passes.clear()

    real = worker_module._Live.timed_out

    def timed_out(self: Any) -> bool:  # the timeout, for one job, once its first canvas is out
        answer = self.answer
        return (self.job.plan.seed == CUT and answer is not None and answer.canvases >= 1) or real(self)

    monkeypatch.setattr(worker_module._Live, "timed_out", timed_out)
    out: dict[int, list[dict]] = {}
    with BackgroundServer(create_app(str(DEMO24), decode_concurrency=8, request_timeout=HANG_S)) as srv:
        gate = threading.Barrier(len(EIGHT))

        def one(i: int) -> None:
            gate.wait(HANG_S)
            out[i] = stream_chunks(srv.url, EIGHT[i], seed=i, hang_up=i == GONE)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(EIGHT))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_S)
        health = httpx.get(srv.url.removesuffix("/v1") + "/health").json()

    def text(chunks: list[dict]) -> str:
        return "".join(c["delta"].get("content") or "" for k in chunks for c in k.get("choices", []))

    for i in set(range(len(EIGHT))) - {CUT, GONE}:
        assert text(out[i]) == alone[i], i
        assert not any("error" in k for k in out[i])
    last = [k for k in out[CUT] if k.get("choices") and k["choices"][0]["finish_reason"]][-1]
    assert last["choices"][0]["finish_reason"] == "length" and last["error"]["code"] == "request_timeout"
    assert alone[CUT].startswith(text(out[CUT])) and text(out[CUT]) != alone[CUT]
    assert len(out[GONE]) == 1
    assert max(passes) > 1 and max(passes) <= 8, "no decoder pass carried more than one request"
    assert health["failed"] == 0


def test_a_job_failing_between_steps_fails_alone(monkeypatch):
    """An error while the worker checks a job between two steps fails that job; the worker goes on serving."""
    from mlx_dgemma.server import worker as worker_module

    def timed_out(self: Any) -> bool:
        return self.job.plan.seed == CUT and self.answer is not None and self.answer.canvases >= 1

    def cut(self: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(worker_module._Live, "timed_out", timed_out)
    monkeypatch.setattr(worker_module._Live, "cut", cut)
    with BackgroundServer(create_app(str(DEMO24), request_timeout=HANG_S)) as srv:
        chunks = stream_chunks(srv.url, EIGHT[CUT], seed=CUT)
        assert "boom" in chunks[-1]["error"]["message"], chunks[-1]
        assert ask(srv.url, PROMPTS[0], seed=0)
        health = httpx.get(srv.url.removesuffix("/v1") + "/health").json()
    assert health["failed"] == 1 and health["running"] == 0
