"""Hostile-client and load run of ``mlx_dgemma.server``, on loopback only, bounded in time and sockets.

    python -m benchmarks.stress_server              # the embedded demo model
    python -m benchmarks.stress_server --model PATH --clients 16 --requests 5

Starts the server itself (``python -m mlx_dgemma.server`` on a free 127.0.0.1 port) and runs the probes of
issue 16 as a regression suite: bad bodies (malformed, lone surrogate, 100k-deep nesting, a 5000-digit
integer, a float infinite in float32, unbounded steps), a body over the limit, a large prompt being
tokenized, 300 slow (slowloris) connections, clients that disconnect, saturation by N clients at
``--max-concurrency N`` (no 429 may happen), concurrent streams, and SIGTERM during a generation. A
thread polls ``/health`` throughout: no answer may take more than a second. Every answer under load must
equal the same request served alone (same seed). Prints a table (probe, expected, got, pass), then
latency percentiles and requests served; exits 1 if a probe failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

HELLO = [{"role": "user", "content": "Hello there"}]


def poll_health(base: str, stop: Any, out: Any) -> None:
    """Polls /health every 50 ms (in its own process: the load's client threads do not delay it) and sends
    back (start time, seconds) per answer; an answer that failed counts as infinitely slow."""
    samples = []
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                ok = c.get(f"{base}/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((t0, time.monotonic() - t0 if ok else float("inf")))
            time.sleep(0.05)
    out.put(samples)


class Health:
    """The /health poller, and the phases of the run (CLOCK_MONOTONIC is shared by the two processes)."""

    def __init__(self, base: str):
        self.stop, self.out = multiprocessing.Event(), multiprocessing.Queue()
        self.process = multiprocessing.Process(
            target=poll_health, args=(base, self.stop, self.out), daemon=True
        )
        self.marks: list[tuple[float, str]] = []

    @property
    def phase(self) -> str:
        return self.marks[-1][1] if self.marks else "start"

    @phase.setter
    def phase(self, name: str) -> None:
        self.marks.append((time.monotonic(), name))

    def finish(self) -> dict[str, tuple[float, float, int]]:
        """Per phase: the slowest answer, the 99th percentile, and how many answers."""
        self.stop.set()
        samples = self.out.get(timeout=60)
        self.process.join(10)
        by_phase: dict[str, list[float]] = {}
        for t0, dt in samples:
            phase = next((name for start, name in reversed(self.marks) if start <= t0), "start")
            by_phase.setdefault(phase, []).append(dt)
        return {p: (max(v), percentile(v, 99), len(v)) for p, v in by_phase.items()}


class Run:
    def __init__(self, base: str):
        self.base, self.url, self.rows = base, f"{base}/v1", []

    def check(self, probe: str, expected: str, got: Any, ok: bool) -> None:
        self.rows.append((probe, expected, str(got), ok))
        print(f"  {'ok ' if ok else 'FAIL'} {probe}: {got}", flush=True)

    def post(self, body: Any, timeout: float = 120, **kw: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            f"{self.url}/chat/completions",
            content=content,
            timeout=timeout,
            headers={"content-type": "application/json"},
            **kw,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mlx_dgemma.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-concurrency",
        str(args.clients),
        "--header-timeout",
        "3",
        "--log-level",
        "warning",
    ]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the server did not start: {proc.stderr.read() if proc.stderr else ''}"
                ) from None
            time.sleep(0.2)


def bad_bodies(run: Run) -> None:
    cases = {
        "malformed JSON": b'{"messages": [',
        "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "100k-deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "5000-digit integer": b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}",
        "t_max 1e39 (inf in float32)": json.dumps({"messages": HELLO, "t_max": 1e39}).encode(),
        "max_denoising_steps 1e9": json.dumps({"messages": HELLO, "max_denoising_steps": 10**9}).encode(),
    }
    for name, body in cases.items():
        code = run.post(body).status_code
        run.check(name, "400", code, code == 400)
    r = run.post({"messages": HELLO, "max_tokens": 10**6})
    code = r.json()["error"].get("code") if r.status_code == 400 else None
    run.check(
        "prompt too long: error code", "context_length_exceeded", code, code == "context_length_exceeded"
    )
    r = run.post({"messages": HELLO, "max_tokens": 4, "max_denoising_steps": 4, "top_p": 0.9, "top_k": 40})
    got = f"{r.status_code} {r.headers.get('x-ignored-fields')}"
    run.check("client sending top_p/top_k", "200 top_p, top_k", got, got == "200 top_p, top_k")


def huge_bodies(run: Run, health: Health) -> None:
    health.phase = "huge bodies"
    big = json.dumps({"messages": [{"role": "user", "content": "word " * 4_000_000}]}).encode()  # 20 MB
    code = run.post(big).status_code
    run.check("20 MB body", "413", code, code == 413)
    near = json.dumps({"messages": [{"role": "user", "content": "word " * 1_500_000}]}).encode()  # 7.5 MB
    r = run.post(near)
    code = r.json()["error"]["code"] if r.status_code == 400 else r.status_code
    run.check(
        "7.5 MB prompt (refused before tokenizing)",
        "context_length_exceeded",
        code,
        code == "context_length_exceeded",
    )
    # The longest prompts that are still tokenized (the refusal above cannot rule them out), 16 at once.
    card = httpx.get(f"{run.url}/models").json()["data"][0]
    longest = "word " * (card["context_length"] * 3)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                run.post({"messages": [{"role": "user", "content": longest}]}).status_code
            )
        )
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.check(
        f"16 prompts of {len(longest)} characters at once",
        "16 x 400",
        f"{results.count(400)} x 400",
        results == [400] * 16,
    )


def slowloris(run: Run, health: Health, n: int) -> None:
    health.phase = "slowloris"
    host, port = run.base.removeprefix("http://").split(":")
    socks = []
    for i in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
        socks.append(s)
    r = run.post({"messages": HELLO, "max_tokens": 4, "max_denoising_steps": 4})
    run.check(f"request during {n} slow connections", "200", r.status_code, r.status_code == 200)
    closed = 0
    for s in socks:
        s.settimeout(30)
        try:
            closed += s.recv(1) == b""
        except OSError:
            closed += 1
        s.close()
    run.check("slow connections closed by the header timeout", f"{n}", closed, closed == n)


def disconnects(run: Run, n: int) -> None:
    body = {"messages": HELLO, "max_tokens": 200, "max_denoising_steps": 16, "seed": 1}
    for _ in range(n):
        with contextlib.suppress(httpx.TimeoutException):
            run.post(body, timeout=0.05)
    deadline = time.monotonic() + 120
    while (h := httpx.get(f"{run.base}/health").json())["queued"] or h["running"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    run.check(f"{n} clients gone: slots freed", "queued 0", f"queued {h['queued']}", h["queued"] == 0)


def load(run: Run, health: Health, clients: int, requests: int) -> tuple[list[float], int, int, int, int]:
    """N clients x M requests; returns latencies, served, 429s, 5xx, answers that differ from alone."""

    def body(i: int) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": f"Tell me about item {i % 7}."}],
            "seed": i,
            "max_tokens": 48,
            "max_denoising_steps": 8,
            "stream": i % 2 == 1,
        }

    def answer(r: httpx.Response, stream: bool) -> str:
        if not stream:
            return r.json()["choices"][0]["message"]["content"]
        out = ""
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                out += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
        return out

    total = clients * requests
    alone = {i: answer(run.post(body(i)), body(i)["stream"]) for i in range(total)}
    health.phase = "load"
    lat: list[float] = []
    codes: list[int] = []
    differ = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as c:
            for j in range(requests):
                i = k * requests + j
                t0 = time.monotonic()
                r = c.post(f"{run.url}/chat/completions", json=body(i))
                dt = time.monotonic() - t0
                with lock:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        lat.append(dt)
                        differ[0] += answer(r, body(i)["stream"]) != alone[i]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, codes.count(200), codes.count(429), sum(c >= 500 for c in codes), differ[0]


def shutdown(run: Run, proc: subprocess.Popen) -> float:
    started = threading.Event()

    def long_stream() -> None:
        body = {
            "messages": HELLO,
            "max_tokens": 1000,
            "max_denoising_steps": 48,
            "entropy_bound": 1e-6,
            "stream": True,
            "seed": 3,
        }
        try:
            with httpx.stream("POST", f"{run.url}/chat/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=long_stream, daemon=True)
    t.start()
    started.wait(60)
    time.sleep(0.5)  # well into the generation
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return float("inf")
    return time.monotonic() - t0


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))] if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", help="model folder or repo id (default: the embedded demo model)")
    p.add_argument(
        "--clients", type=int, default=16, help="concurrent clients = --max-concurrency (default 16)"
    )
    p.add_argument("--requests", type=int, default=5, help="requests per client (default 5)")
    p.add_argument("--slow", type=int, default=300, help="slow connections held at once (default 300)")
    args = p.parse_args()
    port = free_port()
    print(f"starting the server on 127.0.0.1:{port} ...", flush=True)
    proc = start_server(args, port)
    run = Run(f"http://127.0.0.1:{port}")
    health = Health(run.base)
    health.process.start()
    try:
        health.phase = "bad bodies"
        bad_bodies(run)
        huge_bodies(run, health)
        slowloris(run, health, args.slow)
        health.phase = "disconnects"
        disconnects(run, 20)
        lat, served, busy, errors, differ = load(run, health, args.clients, args.requests)
        total = args.clients * args.requests
        run.check(f"{args.clients} clients x {args.requests}: served", f"{total}", served, served == total)
        run.check("spurious 429s", "0", busy, busy == 0)
        run.check("5xx answers", "0", errors, errors == 0)
        run.check("answers under load = served alone", "0 differ", f"{differ} differ", differ == 0)
        for phase, (worst, p99, n) in health.finish().items():
            run.check(
                f"/health slowest of {n} during {phase} (p99 {p99:.3f} s)",
                "< 1 s",
                f"{worst:.3f} s",
                worst < 1.0,
            )
        took = shutdown(run, proc)
        run.check("SIGTERM during a generation: exit", "< 5 s", f"{took:.2f} s", took < 5)
    finally:
        if proc.poll() is None:
            proc.kill()
    print("\n| probe | expected | got | pass |\n|---|---|---|---|")
    for probe, expected, got, ok in run.rows:
        print(f"| {probe} | {expected} | {got} | {'yes' if ok else 'NO'} |")
    print(
        f"\nat {args.clients} clients: {served} requests served, latency p50 {percentile(lat, 50):.2f} s, "
        f"p95 {percentile(lat, 95):.2f} s"
    )
    return 0 if all(row[3] for row in run.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
